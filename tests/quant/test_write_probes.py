"""The write probes of ``options["quant_layers"] = "faster"`` (fx_passes/quant_probes.py,
``quant/speed.py``): what writing a layer's input in 8 bits costs the kernel that produces it,
measured on that producer's own group as the engine builds it (a float GEMM or convolution, a
residual block's conv + add + ReLU, a convolution already 8-bit), with the probe's tuning key
the engine's. A stand-in measurement on the CPU; the GPU tests in test_layer_speed.py."""
import contextlib

import pytest
import torch

from compile_backend import pipeline, quant
from compile_backend.kernels import quant_ref
from compile_backend.kernels.base import KernelContext
from compile_backend.options import Options
from quant_models import ConvsWin, ResidualBlock, ResidualStream, TwoConvs, TwoLinears, quant_status  # tests/quant/quant_models.py


@pytest.mark.parametrize("downsample", [False, True])
def test_a_residual_blocks_write_cost_is_measured_on_its_conv_add_relu(downsample, monkeypatch, tmp_path):
    """A layer reading a residual block's ``relu(conv + r)``: what writing it in 8 bits costs is
    measured on the convolution whose group the partition gives the add (b's with an identity, the
    downsample's when it comes after b), with the residual among its inputs (the engine's conv +
    add + ReLU group: ResNet-50 INT8 quantized two 2048 -> 512 layers that won 1 us each on an
    estimated write cost and ran 16 us slower than FP16, session 20)."""
    asked = []

    class Speed:
        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, *rest):
            return (0.001, 0.010) if w_shape[0] == 4 else (0.020, 0.010)  # only c wins

        def quantize_ms(self, numel):
            return 0.0

        def write_ms(self, producer, activation, tanh_unit):
            asked.append((producer, activation))
            return 0.050  # the fused conv + add + ReLU lost: c stays float

    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, ResidualBlock(downsample).half().eval(), x, Speed())
    out = 16 if downsample else 8
    at = 0 if downsample else 1  # b's output + r: the residual is the add's first operand for the downsample's group
    assert asked == [(("conv", (2, 8, 9, 11), (out, 8, 1, 1), ([1, 1], [0, 0], [1, 1], 1), torch.float16, True, at),
                      "relu")], asked
    assert status["c.weight"][0] == "float" and "measured: its producer's kernel" in status["c.weight"][1]


def test_the_residual_write_probe_is_the_engines_conv_add_relu_group():
    """The probe's groups for a residual producer: conv, add, ReLU (and the quantize), with the
    residual of the output's shape after x, w and the bias, as the engine's group reads them."""
    from compile_backend.quant.speed import write_groups

    producer = ("conv", (2, 8, 7, 9), (16, 8, 1, 1), ([1, 1], [0, 0], [1, 1], 1), torch.float16, True, 1)
    quantized, plain = write_groups(producer, "relu", True, "int8", torch.device("cpu"))
    shapes = [tuple(n.meta["val"].shape) for n in plain.gm.graph.nodes if n.op == "placeholder"]
    assert shapes == [(2, 8, 7, 9), (16, 8, 1, 1), (16,), (2, 16, 7, 9)]
    assert plain.ops == ("aten.convolution", "aten.add", "aten.relu")
    assert quantized.ops[:3] == plain.ops and "aten.round" in quantized.ops


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_a_quantized_producers_write_cost_is_measured_on_its_8_bit_group(precision, monkeypatch, tmp_path):
    """A layer reading a residual block whose convolution is already 8-bit: the write probe
    times that convolution's own 8-bit group (scaled_conv + add + ReLU, with the quantize and
    without), not an estimate (ResNet-50 b32 FP8: those groups took 56 us against the float
    group's 28 where 1.5 us was estimated; H100, session 22). Its groups run (the interpreter)."""
    from compile_backend.kernels.qconv import scaled_conv_candidates
    from compile_backend.quant.speed import write_groups

    asked = []

    class Speed:
        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, *rest):
            return (0.001, 0.010)  # every 8-bit convolution wins

        def quantize_ms(self, numel):
            return 0.0

        def write_ms(self, producer, activation, tanh_unit):
            asked.append((producer, activation))
            return 0.050 if producer[0] == "qconv" and producer[2][2] == 1 else 0.0  # b's 8-bit group loses

    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, ResidualBlock(False).half().eval(), x, Speed())
    qconv = [pa for i, pa in enumerate(asked) if pa[0][0] == "qconv" and pa not in asked[:i]]
    assert qconv == [(("qconv", (2, 8, 9, 11), (8, 8, 3, 3), ([1, 1], [1, 1], [1, 1], 1), torch.float16, True), "relu"),
                     (("qconv", (2, 8, 9, 11), (8, 8, 1, 1), ([1, 1], [0, 0], [1, 1], 1), torch.float16, True, 1),
                      "relu")], asked
    assert [status[n][0] for n in ("a.weight", "b.weight", "c.weight")] == ["quantized", "quantized", "float"], status
    assert "measured: its producer's kernel" in status["c.weight"][1]
    quantized, plain = write_groups(qconv[1][0], "relu", True, precision, torch.device("cpu"), per_channel=True)
    assert plain.ops == ("compile_backend.scaled_conv", "aten.add", "aten.relu") and "aten.clamp" in quantized.ops
    for group in (quantized, plain):
        inputs = [n.meta["val"] for n in group.gm.graph.nodes if n.op == "placeholder"]
        assert inputs[0].dtype == inputs[2].dtype == quant_ref.STORAGE[precision]
        ctx = KernelContext(Options(), torch.device("cpu"), True)
        assert scaled_conv_candidates(group, ctx, vendor=False).candidates
        group.reference(*[torch.zeros(v.shape, dtype=v.dtype).contiguous(memory_format=torch.channels_last) if v.dim() == 4
                          else torch.ones(v.shape, dtype=v.dtype) for v in inputs])


def _recording_write_probe(monkeypatch) -> list:
    """Every layer's 8-bit kernel measured faster; the producers' write probes asked are recorded
    (producer, activation, tanh_unit) and cost nothing."""
    asked = []

    class Speed:
        def __call__(self, *args):
            return (0.001, 0.010)

        def conv(self, *args):
            return (0.001, 0.010)

        def quantize_ms(self, numel):
            return 0.0

        def write_ms(self, producer, activation, tanh_unit):
            asked.append((producer, activation, tanh_unit))
            return 0.0

    @contextlib.contextmanager
    def fake(ctx, options):
        if ctx.quant is not None:
            ctx.quant.speed = Speed()
        yield None
    monkeypatch.setattr(pipeline, "layer_speed", fake)
    return asked


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_the_producer_probe_is_the_engines_own_group(precision, monkeypatch, tmp_path, engines):
    """The write probe traces the producer as the engine's partition groups it (input order, b
    transposed, the view to [batch, seq, N] the GELU runs in, canonical names): the same tuning
    key, so the engine reuses the probe's timings instead of tuning that GEMM again (INT8 BERT's
    FFN1 was tuned three times, FP16's once: session 19)."""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.gemm import gemm_candidates
    from compile_backend.quant.speed import write_groups

    asked = _recording_write_probe(monkeypatch)
    model, x = TwoLinears(torch.nn.functional.gelu).half().eval(), torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3)).half()
    cfg = quant.QuantConfig(precision=precision, min_features=1, weights="per_tensor", exclude=("a",))
    calib = quant.calibrate(model, [(x,)], cfg, progress=False, use_cache=False)
    fn = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path),
                                                                  "autotune": "off"})
    with torch.no_grad():
        fn(x)
    ((producer, activation, tanh_unit),) = asked
    assert producer == ("linear", 14, 48, 32, torch.float16, True, True, (2, 7, 48)) and activation == "gelu"
    ctx = KernelContext(options=Options(autotune="off"), device=torch.device("cpu"), interpret=True)
    (producer_group,) = [c.group for e in engines for c in e.calls
                         if getattr(c, "group", None) is not None and "aten.gelu" in c.group.ops]
    with_quantize, without = write_groups(producer, activation, tanh_unit, precision, torch.device("cpu"))
    assert gemm_candidates(with_quantize, ctx).key == gemm_candidates(producer_group, ctx).key
    assert "aten.gelu" in without.ops and len(without.ops) < len(with_quantize.ops)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_a_quantized_gemms_write_cost_is_measured_on_its_8_bit_group(precision, monkeypatch, tmp_path, engines):
    """A layer reading a GEMM already 8-bit (a transformer's FFN2 after FFN1 + GELU): the write
    probe times FFN1's own 8-bit group (scaled_mm + GELU, with the quantize and without), not the
    7-instructions-an-element estimate (ViT-B/16 INT8 left FFN2 float on an estimated 4.6 us,
    where the quantize also turns FFN1's erf GELU into the tanh unit's form). The probe's group
    with the quantize has the engine's FFN1 group's tuning key, and both groups run."""
    from compile_backend.kernels.qgemm import scaled_mm_candidates
    from compile_backend.quant.speed import write_groups

    asked = _recording_write_probe(monkeypatch)
    model, x = TwoLinears(torch.nn.functional.gelu).half().eval(), torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3)).half()
    cfg = quant.QuantConfig(precision=precision, min_features=1, weights="per_tensor")
    calib = quant.calibrate(model, [(x,)], cfg, progress=False, use_cache=False)
    fn = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path),
                                                                  "autotune": "off"})
    with torch.no_grad():
        fn(x)
    qlinear = [a for a in asked if a[0][0] == "qlinear"]
    assert qlinear and qlinear[0][:2] == (("qlinear", 14, 48, 32, torch.float16, True, False, (2, 7, 48)), "gelu"), asked
    producer, activation, tanh_unit = qlinear[0]
    ctx = KernelContext(options=Options(autotune="off"), device=torch.device("cpu"), interpret=True)
    with_quantize, without = write_groups(producer, activation, tanh_unit, precision, torch.device("cpu"),
                                          per_channel=False)
    assert without.ops[0] == "compile_backend.scaled_mm" and "aten.gelu" in without.ops
    assert len(without.ops) < len(with_quantize.ops)
    (engine_group,) = [c.group for e in engines for c in e.calls
                       if getattr(c, "group", None) is not None and "compile_backend.scaled_mm" in c.group.ops
                       and "aten.gelu" in c.group.ops]
    assert scaled_mm_candidates(with_quantize, ctx).key == scaled_mm_candidates(engine_group, ctx).key
    for group in (with_quantize, without):
        inputs = [n.meta["val"] for n in group.gm.graph.nodes if n.op == "placeholder"]
        assert scaled_mm_candidates(group, ctx, vendor=False).candidates
        group.reference(*[torch.ones(v.shape, dtype=v.dtype) for v in inputs])


def _conv_probe_and_engine_keys(monkeypatch, tmp_path, engines, model, x, exclude, engine_op: str):
    """(the write probe's asked producer, the probe group's tuning key, the engine's producer
    group's key) for ``model`` compiled INT8 with ``exclude`` float; the engine's group is the
    one whose ops include ``engine_op``."""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.conv import conv_candidates
    from compile_backend.quant.speed import write_groups

    asked = _recording_write_probe(monkeypatch)
    calib = quant.calibrate(model, [(x,)], quant.QuantConfig(precision="int8", min_features=1, exclude=exclude),
                            progress=False, use_cache=False)
    fn = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path),
                                                                  "autotune": "off"})
    with torch.no_grad():
        fn(x)
    ((producer, activation, tanh_unit),) = asked
    ctx = KernelContext(options=Options(autotune="off"), device=torch.device("cpu"), interpret=True)
    (producer_group,) = [c.group for e in engines for c in e.calls
                         if getattr(c, "group", None) is not None and engine_op in c.group.ops]
    probe = conv_candidates(write_groups(producer, activation, tanh_unit, "int8", torch.device("cpu"))[0], ctx).key
    return (producer, activation), probe, conv_candidates(producer_group, ctx).key


def test_the_convolution_probe_is_the_engines_group_in_channels_last(monkeypatch, tmp_path, engines):
    """A convolution producer's probe: the engine's group (input order, ops, names) with its
    activations channels-last, as the layout pass makes them on CUDA (on the CPU it does not)."""
    import dataclasses

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(4)).half()
    _, probe, engine = _conv_probe_and_engine_keys(monkeypatch, tmp_path, engines, TwoConvs().half().eval(), x,
                                                   ("a",), "aten.relu")
    assert dataclasses.replace(probe, strides=()) == dataclasses.replace(engine, strides=())
    assert probe.strides[:2] == ((297, 1, 33, 3), (27, 1, 9, 3))  # NHWC x and weight


@pytest.mark.parametrize("downsample", [False, True])
def test_the_residual_probe_is_the_engines_conv_add_relu_group(downsample, monkeypatch, tmp_path, engines):
    """A residual block's producer probe has the engine's conv + add + ReLU group's key but for
    the channels-last strides (the layout pass's, on CUDA only)."""
    import dataclasses

    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(4)).half()
    (producer, activation), probe, engine = _conv_probe_and_engine_keys(
        monkeypatch, tmp_path, engines, ResidualBlock(downsample).half().eval(), x, ("a", "b", "ds"), "aten.add")
    # the downsample's group: b's output + its result; b's: its result + x
    assert producer[-1] == (0 if downsample else 1) and activation == "relu"
    assert dataclasses.replace(probe, strides=()) == dataclasses.replace(engine, strides=())


def test_a_quantize_of_its_own_is_estimated_as_one(monkeypatch, tmp_path):
    """A layer whose input no kernel of ours can write quantized (a graph input, a max pool's
    output) is charged a quantize kernel of its own (``speed.standalone_quantize_ms``: the bytes
    it moves and a kernel's latency), not the instructions a fused quantize adds."""
    asked = []

    class Speed:
        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, *rest):
            return (0.006, 0.010)

        def quantize_ms(self, numel):
            asked.append(("fused", numel))
            return 0.0001

        def standalone_quantize_ms(self, numel, itemsize):
            asked.append(("alone", numel, itemsize))
            return 0.005

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, TwoConvs(pool=True).half().eval(), x, Speed())
    assert ("alone", 2 * 3 * 9 * 11, 2) in asked and ("alone", 2 * 16 * 5 * 6, 2) in asked, asked
    assert all(s == "float" for s, _ in status.values()), status  # 6 + 5 > 10 us
    assert "+ 5.0 us (estimated: a quantize kernel of its own)" in status["b.weight"][1]


def test_a_norms_quantized_write_is_charged_its_codes_estimate(monkeypatch, tmp_path):
    """Where a kernel of ours that is no GEMM or convolution writes the layer's input (here a
    LayerNorm; GPT-2's tanh-GELU chain before FFN2), static scales charge ``speed.codes_ms``: the
    quantize's instructions less the bytes the codes save, the float value not kept."""
    from quant_models import NormLinear

    asked = []

    class Speed:
        def __call__(self, *args):
            return (0.0100, 0.0104)  # the 8-bit GEMM leads by 0.4 us

        def quantize_ms(self, numel):
            return 0.003  # alone, it would lose the race

        def codes_ms(self, numel, beside_float, itemsize):
            asked.append((numel, beside_float, itemsize))
            return 0.0

    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3)).half()
    status = quant_status(monkeypatch, tmp_path, NormLinear().half().eval(), x, Speed())
    assert asked == [(3 * 5 * 32, False, 2)], asked
    assert status["fc.weight"][0] == "quantized", status


def test_the_standalone_estimate_counts_bytes_and_a_launch():
    from compile_backend.quant.speed import LATENCY_FLOOR_MS, LayerSpeed

    speed = LayerSpeed(None, "int8", True, False)
    assert speed.standalone_quantize_ms(10 ** 6, 2) == 0.0  # nothing to measure off CUDA

    class OnCuda(LayerSpeed):
        def quantize_ms(self, numel):
            return 0.0

    cuda = OnCuda(type("Ctx", (), {"device": torch.device("cuda")})(), "int8", True, False)
    ms = cuda.standalone_quantize_ms(6_422_528, 2)  # ResNet-50 b32's pool output, fp16
    assert ms == pytest.approx(6_422_528 * 3 / 3.0e12 * 1e3 + LATENCY_FLOOR_MS)


def test_a_winning_producers_8_bit_write_probe_is_prepared_with_the_float_one(monkeypatch, tmp_path):
    """Where a layer's producer is a convolution whose own 8-bit kernel wins too, the rules may
    quantize the producer first and then ask for its 8-bit group's write probe ("qconv"): that
    probe is handed to ``prepare_groups`` beside the float one, so it compiles in the pool (FP8
    ResNet-50 b32 compiled 20 of them one problem at a time: H100, session 23)."""
    prepared, asked = [], []

    class Speed(ConvsWin):
        def prepare(self, probes):
            pass

        def prepare_groups(self, writes, floats):
            prepared.extend(writes)

        def write_ms(self, producer, activation, tanh_unit):
            asked.append((producer, activation, tanh_unit))
            return 0.0

    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, ResidualBlock(False).half().eval(), x, Speed())
    assert all(s[0] == "quantized" for s in status.values()), status
    qconv = [w for w in asked if w[0][0] == "qconv"]
    assert qconv and all(w in prepared for w in qconv), (asked, prepared)
    floats = [w[0][1:] for w in prepared if w[0][0] == "conv"]
    assert all(w[0][1:] in floats for w in prepared if w[0][0] == "qconv")  # each beside its float probe


@pytest.mark.parametrize("residuals", ["float", "quantized"])
def test_a_block_output_read_by_its_skip_connection_is_written_both_ways(residuals, monkeypatch, tmp_path):
    """c reads a block output that the next skip connection reads too: a producer writing it in
    8 bits writes it in float as well, and the write probe times that group ("+float": both
    outputs; ResNet-50 b32's 8-bit producers paid 3-12 us for both where the codes alone cost
    0-1.7, H100 session 23). Where residual adds read the codes, the codes alone."""
    from compile_backend.kernels.conv import conv_candidates
    from compile_backend.quant.speed import write_groups

    asked = []

    class Speed(ConvsWin):
        def write_ms(self, producer, activation, tanh_unit):
            asked.append(producer)
            return 0.0

    x = torch.randn(2, 8, 7, 9, generator=torch.Generator().manual_seed(2)).half()
    quant_status(monkeypatch, tmp_path, ResidualStream().half().eval(), x, Speed(), quant_residuals=residuals)
    c_input = [p for p in asked if p[2] == (8, 8, 1, 1) and len(p) == 7]  # b's conv + add + ReLU group
    assert c_input and {p[0] for p in c_input} <= ({"conv+float", "qconv+float"} if residuals == "float"
                                                   else {"conv", "qconv"}), asked
    both, plain = write_groups(("conv+float",) + c_input[0][1:], "relu", True, "int8", torch.device("cpu"))
    assert len(both.outputs) == 2 and len(plain.outputs) == 1 and "aten.round" in both.ops
    ctx = KernelContext(Options(), torch.device("cpu"), True)
    tuning = conv_candidates(both, ctx)
    inputs = [torch.randn(n.meta["val"].shape).to(n.meta["val"].dtype).contiguous(
        memory_format=torch.channels_last if n.meta["val"].dim() == 4 else torch.contiguous_format)
        for n in both.gm.graph.nodes if n.op == "placeholder"]
    got = next(c for c in tuning.candidates if not c.reference).compile()(*inputs)
    want = both.reference(*inputs)
    torch.testing.assert_close(got[0], want[0], atol=1e-2, rtol=1e-2)
    assert (got[1].float() - want[1].float()).abs().max() <= 1  # codes: one step at a rounding tie


@pytest.mark.parametrize("kind", ["qconv", "qlinear"])
def test_an_8_bit_producers_write_probe_tunes_its_probes_seeds(kind, monkeypatch):
    """An 8-bit producer's write probe tunes the producer's own probe's fastest configs (its
    seeds, on the groups' anchors: ``template.seeded`` narrows the candidates) as the producer's
    engine group will, not every config: ResNet-50 b32's first INT8 call compiled 45 s of
    candidates against 17 s before these probes were prepared in the pool (H100, session 24).
    Without seeds (a probe not timed) nothing is marked."""
    from compile_backend.kernels import qconv, qgemm
    from compile_backend.kernels.template import PROBE_SEEDS
    from compile_backend.quant.speed import LayerSpeed

    marked = []

    def record(group, ctx, **kwargs):
        marked.append(next(n for n in group.gm.graph.nodes if n.name == group.anchor).meta.get(PROBE_SEEDS))
    monkeypatch.setattr(qconv, "scaled_conv_candidates", record)
    monkeypatch.setattr(qgemm, "scaled_mm_candidates", record)
    ctx = KernelContext(options=Options(autotune="fast"), device=torch.device("cpu"), interpret=True)
    speed = LayerSpeed(ctx, "int8", per_channel=True, dynamic=False)
    if kind == "qconv":
        producer = ("qconv", (2, 8, 7, 9), (16, 8, 3, 3), ([1, 1], [1, 1], [1, 1], 1), torch.float16, True)
        probe_key = speed._conv_key((2, 8, 7, 9), (16, 8, 3, 3), [1, 1], [1, 1], [1, 1], 1, torch.float16, True)
    else:
        producer = ("qlinear", 14, 48, 32, torch.float16, True, False, (2, 7, 48))
        probe_key = ("linear", 14, 48, 32, torch.float16, True)
    speed._write_tunings(producer, "gelu", True)
    assert marked == [None, None]
    speed.seeds[probe_key] = ("triton a", "triton b")
    speed._write_tunings(producer + (0,) if kind == "qconv" else producer, "gelu", True)
    speed._write_tunings((kind + "+float",) + producer[1:], "gelu", True)
    assert marked[2:] == [("triton a", "triton b")] * 4, marked
    assert speed._write_tunings(producer, "relu", True) == [] and len(marked) == 6  # estimated: nothing tuned


@pytest.mark.parametrize("kind", ["conv", "conv+float", "qconv", "qconv+float", "linear"])
def test_a_write_after_no_gelu_is_estimated_from_the_float_group(kind, monkeypatch):
    """After no activation or a ReLU, what writing a producer's output in 8 bits costs is
    estimated, not timed on a group with the quantize (548 of the 822 candidates of ResNet-50
    b32's INT8 probes, H100 session 25): a float producer's group without the quantize (the
    engine's own) is tuned, and the cost is its fastest candidate of ours (ours take the quantize
    in their epilogue) plus the quantize's instructions, and its codes' bytes where the float value
    is written too, against its fastest of all; an 8-bit producer's kernel is ours: the quantize
    alone. After a GELU both groups are timed as before."""
    from types import SimpleNamespace

    from compile_backend.quant import speed as speed_module
    from compile_backend.quant.speed import LayerSpeed

    ctx = KernelContext(options=Options(autotune="fast"), device=torch.device("cpu"), interpret=True)
    speed = LayerSpeed(ctx, "int8", per_channel=True, dynamic=False)
    geometry = ([1, 1], [0, 0], [1, 1], 1)
    producer = (kind, 14, 48, 32, torch.float16, True, False, (14, 48)) if kind == "linear" else \
        (kind, (2, 8, 7, 9), (16, 8, 1, 1), geometry, torch.float16, True)
    numel = 14 * 48 if kind == "linear" else 2 * 16 * 7 * 9
    tunings = speed._write_tunings(producer, "relu", True)
    assert len(tunings) == (0 if kind.startswith("q") else 1)
    if tunings:  # the float group: no quantize in it
        assert "aten.relu" in tunings[0].key.extra or tunings[0].candidates
    codes = []
    monkeypatch.setattr(LayerSpeed, "codes_ms", lambda self, n, beside, size: codes.append((n, beside, size)) or 0.002)
    fake = SimpleNamespace(candidates=[SimpleNamespace(name="cudnn", impl="cudnn"),
                                       SimpleNamespace(name="ours a", impl="triton"),
                                       SimpleNamespace(name="ours b", impl="triton")])
    monkeypatch.setattr(speed, "_write_tunings", lambda *a: [] if kind.startswith("q") else [fake])
    monkeypatch.setattr(speed, "_timings", lambda tuning, tag=None: {"cudnn": 0.010, "ours a": 0.015, "ours b": 0.013})
    got = speed.write_ms(producer, "relu")
    assert codes == [(numel, kind.endswith("+float"), 2)]
    assert got == pytest.approx(0.002 if kind.startswith("q") else 0.013 + 0.002 - 0.010)
    assert LayerSpeed.write_estimated(None) and LayerSpeed.write_estimated("relu") and not LayerSpeed.write_estimated("gelu")
    if not kind.startswith("q"):  # none of ours timed there: the quantize runs as a kernel of its own
        monkeypatch.setattr(LayerSpeed, "standalone_quantize_ms", lambda self, n, size: 0.005)
        monkeypatch.setattr(speed, "_timings", lambda tuning, tag=None: {"cudnn": 0.010})
        speed.seen.clear()
        assert speed.write_ms(producer, "relu") == pytest.approx(0.005)
    assert speed_module.ESTIMATED_WRITE_ACTIVATIONS == (None, "relu")


def test_the_codes_estimate_counts_their_bytes_beside_a_float_value(monkeypatch):
    """``codes_ms``: the quantize's instructions, plus the codes' bytes where the float value is
    written too; where the codes replace it, less the bytes they save (never below 0); 0 off CUDA."""
    from compile_backend.quant.speed import DYNAMIC_BYTES_PER_S, LayerSpeed

    ctx = KernelContext(options=Options(), device=torch.device("cpu"), interpret=True)
    speed = LayerSpeed(ctx, "int8", per_channel=True, dynamic=False)
    assert speed.codes_ms(10**6, True) == 0.0
    speed.ctx = KernelContext(options=Options(), device=torch.device("cuda"), interpret=True)
    monkeypatch.setattr(LayerSpeed, "quantize_ms", lambda self, n: 0.001)
    saved = 10**6 / DYNAMIC_BYTES_PER_S * 1e3  # an fp16 value's second byte, not written
    assert speed.codes_ms(10**6, True) == pytest.approx(0.001 + saved)
    assert speed.codes_ms(10**6, False) == pytest.approx(0.001 - saved)
    assert speed.codes_ms(10**6, False, float_itemsize=4) == pytest.approx(max(0.0, 0.001 - 3 * saved))
    monkeypatch.setattr(LayerSpeed, "quantize_ms", lambda self, n: 0.0001)
    assert speed.codes_ms(10**6, False) == 0.0  # the bytes saved outweigh the instructions


@pytest.mark.parametrize("a_wins_with_its_write", [True, False])
def test_a_linear_producers_known_decision_prepares_one_write_probe(a_wins_with_its_write, monkeypatch, tmp_path):
    """FFN1 -> GELU -> FFN2 with both 8-bit GEMMs winning their probes: FFN1's input comes from
    no GEMM (its write cost is the estimate), so whether the rules quantize FFN1 is known before
    they run, and only FFN2's write probe of that form is prepared: the 8-bit one ("qlinear")
    where FFN1 will be quantized, the float one where its estimated write makes it lose (both
    were compiled before, one for nothing: BERT INT8, H100 session 24). The probe asked is the
    one prepared."""
    prepared, asked = [], []

    class Speed:
        def prepare(self, probes):
            pass

        def prepare_groups(self, writes, floats):
            prepared.extend(writes)

        def __call__(self, m, n, k, *rest):
            return (0.001, 0.010) if k == 48 or a_wins_with_its_write else (0.009, 0.010)  # b; a

        def quantize_ms(self, numel):
            return 0.0 if numel != 14 * 32 else 0.002  # a's input: 2 us estimated

        def write_ms(self, producer, activation, tanh_unit):
            asked.append((producer, activation, tanh_unit))
            return 0.0

    model, x = TwoLinears(torch.nn.functional.gelu).half().eval(), torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3)).half()
    status = quant_status(monkeypatch, tmp_path, model, x, Speed())
    assert status["a.weight"][0] == ("quantized" if a_wins_with_its_write else "float"), status
    assert status["b.weight"][0] == "quantized", status
    kinds = [w[0][0] for w in prepared]
    assert kinds == (["qlinear"] if a_wins_with_its_write else ["linear"]), prepared
    assert asked and all(w in prepared for w in asked), (asked, prepared)
