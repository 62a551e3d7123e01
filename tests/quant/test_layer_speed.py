"""``options["quant_layers"]``: on CUDA an INT8/FP8 engine quantizes a linear layer only where its
8-bit GEMM is measured faster than its float one (``quant/speed.py``); the rest stay float and
the report gives both times. The CPU has nothing to measure: a fake measurement stands in for
the pass's side, and the GPU test times real GEMMs."""
import contextlib

import pytest
import torch

import compile_backend
from compile_backend import pipeline, quant
from compile_backend.kernels.base import KernelContext
from compile_backend.options import Options
from helpers import groups_built  # tests/helpers.py
from quant_models import ConvsWin, ResidualBlock, TwoConvs, TwoLinears, quant_status  # tests/quant/quant_models.py


def _fake_speed(monkeypatch, slow_n: int, seen: list):
    """The quantize pass gets a measurement where the GEMM of N=slow_n loses to float."""
    @contextlib.contextmanager
    def fake(ctx, options):
        if ctx.quant is not None and options.quant_layers == "faster":
            def speed(m, n, k, dtype, bias):
                seen.append((m, n, k, dtype, bias))
                return (0.020, 0.010) if n == slow_n else (0.005, 0.010)
            ctx.quant.speed = speed
        yield None
    monkeypatch.setattr(pipeline, "layer_speed", fake)


@pytest.mark.parametrize("mode", ["faster", "all"])
def test_a_layer_slower_in_8_bits_stays_float(mode, monkeypatch, tmp_path):
    model = TwoLinears().half().eval()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)).half()
    seen = []
    _fake_speed(monkeypatch, 48, seen)
    calib = quant.calibrate(model, [(x,)], quant.QuantConfig(precision="int8", min_features=1), progress=False,
                            use_cache=False)
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=calib, quant_layers=mode, cache_dir=str(tmp_path),
                                         autotune="off", speed_check=False)
    (g,) = report.graphs
    status = {r["name"]: (r["status"], r["reason"]) for r in g.quant}
    if mode == "all":
        assert not seen and all(s == "quantized" for s, _ in status.values()), status
        return
    assert set(seen) == {(5, 48, 32, torch.float16, True), (5, 40, 48, torch.float16, True)}
    assert status["b.weight"][0] == "quantized"
    kept, why = status["a.weight"]
    assert kept == "float" and "faster in float16" in why and "20.0 us against 10.0 us" in why, why
    fast = torch.compile(model, backend="compile_backend",
                         options={"quant": calib, "quant_layers": mode, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        y, ref = fast(x), model(x)
    cos = torch.nn.functional.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0).item()
    assert cos > 0.999, cos


def test_a_convolution_slower_in_8_bits_stays_float(monkeypatch, tmp_path):
    seen = []

    class Speed:
        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, stride, padding, dilation, groups, dtype, bias):
            seen.append((x_shape, w_shape, list(stride), list(padding), groups, dtype, bias))
            return (0.03, 0.01) if w_shape[2] == 3 else (0.001, 0.01)

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, TwoConvs().half().eval(), x, Speed())
    assert ((2, 3, 9, 11), (16, 3, 3, 3), [1, 1], [1, 1], 1, torch.float16, True) in seen
    assert status["a.weight"][0] == "float" and "convolution took 30.0 us against 10.0 us" in status["a.weight"][1]
    assert status["b.weight"][0] == "quantized"


def test_every_layer_probe_is_prepared_before_any_is_timed(monkeypatch, tmp_path):
    """The pass hands the measurement every probe it will ask for before it asks for any (so
    their candidates compile in one pool: ``LayerSpeed.prepare``), then asks for each of them."""
    events = []

    class Speed:
        def prepare(self, probes):
            events.append(("prepare", [(kind, tuple(args[:2])) for kind, args in probes]))

        def __call__(self, m, n, k, dtype, bias):
            events.append(("time", ("linear", (m, n))))
            return (0.001, 0.010)

        def conv(self, x_shape, w_shape, *rest):
            events.append(("time", ("conv", (x_shape, w_shape))))
            return (0.001, 0.010)

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, Mixed().half().eval(), x, Speed())
    assert all(s == "quantized" for s, _ in status.values()), status
    (first, probes), *timed = events
    assert first == "prepare" and sorted(probes, key=repr) == sorted([("conv", ((2, 3, 9, 11), (8, 3, 3, 3))),
                                                                      ("linear", (2, 5))], key=repr)
    assert sorted(what for _, what in timed) == sorted(probes)


def test_the_inputs_quantize_counts_against_the_8_bit_gemm(monkeypatch, tmp_path):
    """A layer whose 8-bit GEMM wins by less than the estimated cost of writing its input in 8
    bits stays float (INT8 BERT, session 13: FFN2 won 2 us and its producer FFN1 lost 19)."""
    class Speed:
        def __call__(self, m, n, k, dtype, bias):
            return (0.008, 0.010) if n == 40 else (0.002, 0.010)

        def quantize_ms(self, numel):
            return 0.004

    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)).half()
    status = quant_status(monkeypatch, tmp_path, TwoLinears().half().eval(), x, Speed())
    assert status["a.weight"][0] == "quantized"
    kept, why = status["b.weight"]
    assert kept == "float" and "8.0 us + 4.0 us (estimated) to write its input in int8 against 10.0 us" in why, why


def test_a_float_gemm_producers_measured_write_cost_counts(monkeypatch, tmp_path):
    """Where a float GEMM / convolution makes the layer's input, what its kernel pays to write it
    in 8 bits is measured on that producer (ResNet-50, session 15: 1x1 convolutions went from
    12.5 to 17.8 us, losing cuDNN's fused epilogue, to feed FP8 3x3 ones that won 1.4 us) and
    replaces the instruction estimate; the producer's shape and activation are what it measures."""
    asked = []

    class Speed:
        def __call__(self, m, n, k, dtype, bias):
            return (0.008, 0.010) if n == 40 else (0.020, 0.010)  # a: float; b: wins 2 us

        def quantize_ms(self, numel):
            return 0.0005

        def write_ms(self, producer, activation, tanh_unit):
            asked.append((producer, activation))
            assert tanh_unit  # Options.quant_gelu's default
            return 0.005

    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)).half()
    status = quant_status(monkeypatch, tmp_path, TwoLinears().half().eval(), x, Speed())
    # b read transposed (nn.Linear's weight), the ReLU in x's own [5, 48] frame
    assert asked == [(("linear", 5, 48, 32, torch.float16, True, True, (5, 48)), "relu")], asked
    kept, why = status["b.weight"]
    assert kept == "float" and "8.0 us + 5.0 us (measured: its producer's kernel) to write its input in int8" in why, why
    # convolutions: the producer's geometry; a graph input has no producer (the estimate applies)
    asked.clear()

    class ConvSpeed(Speed):
        def conv(self, x_shape, w_shape, stride, padding, dilation, groups, dtype, bias):
            return (0.020, 0.010) if w_shape[2] == 3 else (0.001, 0.010)  # a: float

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, TwoConvs().half().eval(), x, ConvSpeed())
    assert asked == [(("conv", (2, 3, 9, 11), (16, 3, 3, 3), ([1, 1], [1, 1], [1, 1], 1), torch.float16, True),
                      "relu")], asked
    assert status["a.weight"][0] == "float" and status["b.weight"][0] == "quantized"  # 1 + 5 < 10 us


def test_the_group_probes_of_winning_layers_are_prepared_first(monkeypatch, tmp_path):
    """Before the rules run, the write probe of each float producer feeding a layer whose 8-bit
    kernel wins, and that convolution's own float group, are handed to the measurement
    (``prepare_groups``: compiled in one pool), with the arguments the rules then pass to
    ``write_ms`` and ``float_ms``."""
    events = []

    class Speed:
        def prepare(self, probes):
            events.append("prepare")

        def prepare_groups(self, writes, floats):
            events.append(("prepare_groups", list(writes), list(floats)))

        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, *rest):
            # a: float; b: wins by less than FLOAT_RACE_MARGIN, so its float group races it
            return (0.020, 0.010) if w_shape[2] == 3 else (0.0088, 0.010)

        def quantize_ms(self, numel):
            return 0.0

        def write_ms(self, producer, activation, tanh_unit):
            events.append(("write_ms", (producer, activation, tanh_unit)))
            return 0.001

        def float_ms(self, producer, activation):
            events.append(("float_ms", (producer, activation)))
            return 0.0099

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, TwoConvs().half().eval(), x, Speed())
    assert status["a.weight"][0] == "float" and status["b.weight"][0] == "quantized"  # 8.8 + 1 < 9.9 us
    assert [e if isinstance(e, str) else e[0] for e in events] == ["prepare", "prepare_groups", "write_ms", "float_ms"]
    (_, writes, floats), (_, written), (_, own) = events[1:]
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    assert writes == [written] == [(("conv", (2, 3, 9, 11), (16, 3, 3, 3), geometry, torch.float16, True), "relu", True)]
    # b's own group: the convolution alone (the graph returns it)
    assert floats == [own] == [(("conv", (2, 16, 9, 11), (8, 16, 1, 1), ([1, 1], [0, 0], [1, 1], 1), torch.float16,
                                 True), None)], events


def test_the_producers_float_groups_start_compiling_before_the_layers_are_timed(monkeypatch, tmp_path):
    """Before any layer probe is timed, the float form of each probed layer's producer group is
    handed to ``prepare_groups_async`` (compiled in the workers while the probes are timed:
    in ResNet-50 b32 INT8's first call they began after the probes' 3.7 s of timing, H100 session 27); the winners'
    writes then go to ``prepare_groups`` as before."""
    events = []

    class Speed:
        def prepare(self, probes):
            events.append("prepare")

        def prepare_groups_async(self, writes):
            events.append(("prepare_groups_async", list(writes)))

        def prepare_groups(self, writes, floats):
            events.append(("prepare_groups", list(writes)))

        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, *rest):
            events.append("conv")
            return (0.020, 0.010) if w_shape[2] == 3 else (0.001, 0.010)  # a: float, b: wins

        def quantize_ms(self, numel):
            return 0.0

        def write_ms(self, producer, activation, tanh_unit):
            return 0.001

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, TwoConvs().half().eval(), x, Speed())
    assert status["b.weight"][0] == "quantized"
    names = [e if isinstance(e, str) else e[0] for e in events]
    assert names[:3] == ["prepare", "prepare_groups_async", "conv"] and "prepare_groups" in names, names
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    # a's input is the graph's (no producer group); b's is a's convolution + ReLU
    assert events[1][1] == [(("conv", (2, 3, 9, 11), (16, 3, 3, 3), geometry, torch.float16, True), "relu", True)]


@pytest.mark.parametrize("streams", [True, False])
def test_probes_stream_their_compiles_where_the_tuner_can(streams, monkeypatch):
    """``prepare`` and ``prepare_groups`` hand their tunings to the tuner's streamed compile
    (each probe timed once its own candidates compiled); where it sends nothing (no compile
    workers, off CUDA), to the synchronous precompile instead."""
    from compile_backend.kernels import autotune
    from compile_backend.quant.speed import LayerSpeed

    sent = []

    class Tuning:
        def __init__(self, name):
            self.key, self.candidates = name, [name + ":c"]

    class FakeTuner:
        def precompile_async(self, tunings, each=False):
            sent.append(("stream" if each else "async", [k for k, _ in tunings]))
            return len(tunings) if streams else 0

        def precompile(self, tunings):
            sent.append(("sync", [k for k, _ in tunings]))

    monkeypatch.setattr(autotune, "tuner_for", lambda ctx: FakeTuner())
    speed = LayerSpeed(None, "int8", True, False)
    monkeypatch.setattr(speed, "_tuning", lambda key: Tuning(key[0] + str(key[1])))
    monkeypatch.setattr(speed, "_tagged", lambda tuning, tag: tuning.key)
    monkeypatch.setattr(speed, "_write_tunings", lambda producer, act, tanh: [Tuning(producer[0])])
    speed.prepare([("linear", (33, 48, 32, torch.float16, True)), ("linear", (17, 48, 32, torch.float16, False))])
    write = (("p1", (1, 8, 4, 4), (8, 8, 1, 1), ([1, 1], [0, 0], [1, 1], 1), torch.float16, True), "relu", True)
    speed.prepare_groups([write])
    expected = [("stream", ["linear33", "linear17"]), ("stream", ["p1"])]
    if not streams:
        expected = [expected[0], ("sync", ["linear33", "linear17"]), expected[1], ("sync", ["p1"])]
    assert sent == expected


def test_group_probes_prepared_asynchronously_are_built_once_and_handed_on(monkeypatch):
    """``prepare_groups_async`` makes each write probe's tunings once and sends them to the
    tuner's asynchronous compile; ``prepare_groups`` hands those asked again to the tuner's
    precompile (their runners built in one pool) without making them again, and leaves the
    others pending."""
    from compile_backend.kernels import autotune
    from compile_backend.quant.speed import LayerSpeed

    made, sent = [], []

    class Tuning:
        def __init__(self, name):
            self.key, self.candidates = name, [name + ":c"]

    class FakeTuner:
        def precompile_async(self, tunings, each=False):
            if each:  # the synchronous path below stands for a streamed one
                return 0
            sent.append(("async", [k for k, _ in tunings]))
            return len(tunings)

        def precompile(self, tunings):
            sent.append(("sync", [k for k, _ in tunings]))

    monkeypatch.setattr(autotune, "tuner_for", lambda ctx: FakeTuner())
    speed = LayerSpeed(None, "int8", True, False)
    monkeypatch.setattr(speed, "_write_tunings", lambda producer, act, tanh: made.append(producer[0]) or [Tuning(producer[0])])
    w = {name: ((name, (1, 8, 4, 4), (8, 8, 1, 1), ([1, 1], [0, 0], [1, 1], 1), torch.float16, True), "relu", True)
         for name in ("p1", "p2", "p3")}
    speed.prepare_groups_async([w["p1"], w["p2"]])
    speed.prepare_groups_async([w["p1"]])  # already on its way: not sent twice
    speed.prepare_groups([w["p1"], w["p3"]])
    assert made == ["p1", "p2", "p3"]
    assert sent == [("async", ["p1", "p2"]), ("async", []), ("sync", ["p1", "p3"])]
    assert speed.counts["async_candidates"] == 2 and speed.counts["group_candidates"] == 2
    assert speed.pending == {speed._write_key(*w["p2"])}
    speed.built.pop(speed._write_key(*w["p2"]))  # taken by its probe meanwhile: made again when asked
    speed.prepare_groups([w["p2"]])
    assert made == ["p1", "p2", "p3", "p2"] and sent[-1] == ("sync", ["p2"]) and not speed.pending


@pytest.mark.parametrize("downsample", [False, True])
def test_a_convolution_ahead_of_cudnn_still_races_its_own_float_group(downsample, monkeypatch, tmp_path):
    """A convolution whose 8-bit kernel beats the bare cuDNN call is timed against its own float
    group, as a float engine builds it (bias, residual add, ReLU fused; ResNet-50 batch 1,
    session 21: ten layers won 0.5-2.8 us against cuDNN and the INT8 engine ran 8 us slower than
    FP16, whose templates ran them faster): it stays float when that group is as fast."""
    asked = []

    class Speed:
        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, *rest):
            return (0.009, 0.010)  # every 8-bit convolution ahead of bare cuDNN, within the race margin

        def quantize_ms(self, numel):
            return 0.0

        def write_ms(self, producer, activation, tanh_unit):
            return 0.0

        def float_ms(self, producer, activation):
            asked.append((producer, activation))
            return 0.005 if producer[2][0] == (16 if downsample else 8) and producer[2][2] == 1 else 0.0095

    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, ResidualBlock(downsample).half().eval(), x, Speed())
    out = 16 if downsample else 8
    geometry = ([1, 1], [0, 0], [1, 1], 1)
    # a: conv + ReLU; b: + x and ReLU without a downsample, else alone (the downsample takes the add)
    b_group = (("conv", (2, 8, 9, 11), (out, 8, 1, 1), geometry, torch.float16, True) + (() if downsample else (1,)),
               None if downsample else "relu")
    assert (("conv", (2, 8, 9, 11), (8, 8, 3, 3), ([1, 1], [1, 1], [1, 1], 1), torch.float16, True), "relu") in asked
    assert b_group in asked, asked
    assert status["a.weight"][0] == "quantized"
    assert status["b.weight"][0] == "float", status
    assert "against 5.0 us (its float group, as a float engine runs it)" in status["b.weight"][1]


def test_a_convolution_far_ahead_races_no_float_group(monkeypatch, tmp_path):
    """An 8-bit convolution more than FLOAT_RACE_MARGIN ahead of bare cuDNN is quantized without
    tuning its own float group (ResNet-50 b32: those races refused nothing; H100, session 22)."""
    from compile_backend.fx_passes.quant_probes import FLOAT_RACE_MARGIN

    asked = []

    class Speed:
        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, *rest):
            return ((1 - FLOAT_RACE_MARGIN) * 0.010 - 1e-4, 0.010)

        def quantize_ms(self, numel):
            return 0.0

        def write_ms(self, producer, activation, tanh_unit):
            return 0.0

        def float_ms(self, producer, activation):
            asked.append(producer)
            return 0.001

    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, ResidualBlock(False).half().eval(), x, Speed())
    assert not asked and all(s == "quantized" for s, _ in status.values()), status


def test_a_failed_preparation_leaves_the_probes_to_the_rules(monkeypatch, tmp_path, caplog):
    """``prepare`` is only a speed-up: when it raises, the rules time each probe as before."""
    seen = []

    class Speed:
        def prepare(self, probes):
            raise RuntimeError("no pool here")

        def __call__(self, m, n, k, dtype, bias):
            seen.append(n)
            return (0.001, 0.010)

    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)).half()
    with caplog.at_level("WARNING", logger="compile_backend"):
        status = quant_status(monkeypatch, tmp_path, TwoLinears().half().eval(), x, Speed())
    assert sorted(seen) == [40, 48] and all(s == "quantized" for s, _ in status.values())
    assert "could not prepare the layer speed probes (RuntimeError: no pool here)" in caplog.text


@pytest.mark.gpu
def test_gpu_engine_reuses_the_producer_probes_tuning(monkeypatch, tmp_path):
    """On CUDA: the float FFN1 that writes FFN2's INT8 input is tuned by the write probe (with and
    without the quantize) and then found in the timing cache by the engine: no key tuned twice
    (session 18's INT8 BERT tuned it a third time under another key)."""
    from compile_backend.kernels import autotune
    from compile_backend.quant.speed import LayerSpeed

    tuned = []
    real = autotune.Tuner._tune

    def recording(self, key, candidates, make_inputs):
        tuned.append(key)
        return real(self, key, candidates, make_inputs)
    monkeypatch.setattr(autotune.Tuner, "_tune", recording)
    monkeypatch.setattr(LayerSpeed, "__call__", lambda self, *args: (0.001, 1.0))  # 8 bits win: probe FFN1
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768)).half().cuda().eval()
    x = torch.randn(16, 128, 768, device="cuda").half()
    cfg = quant.QuantConfig(precision="int8", weights="per_tensor", exclude=("0",))
    calib = quant.calibrate(model, [(x,)], cfg, progress=False, use_cache=False)
    fn = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        fn(x)
    seen = [repr(k) for k in tuned]
    assert len(seen) == len(set(seen)), seen
    assert sum("aten.gelu" in k.extra for k in tuned) == 2, seen  # the probe's two; the engine's is a hit


@pytest.mark.gpu
def test_gpu_report_gives_the_probes_seconds(tmp_path, monkeypatch):
    """On CUDA an INT8 engine's report says what its layer speed probes took: how many were
    timed, their seconds, and the seconds compiling their candidates ahead in one pool."""
    from compile_backend.quant.speed import LayerSpeed

    monkeypatch.setattr(LayerSpeed, "latency_floor_ms", 0.0)  # small layers, measured all the same
    model = TwoLinears().half().cuda().eval()
    x = torch.randn(256, 32, device="cuda").half()
    calib = quant.calibrate(model, [(x,)], quant.QuantConfig(precision="int8", min_features=1), progress=False,
                            use_cache=False)
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path), speed_check=False)
    probes = report.graphs[0].stages["probes"]
    # two layer probes, and a producer's write probe pair where an 8-bit layer won
    assert probes["tuned"] in (2, 4) and probes["seconds"] > 0 and probes["precompile_seconds"] > 0, probes
    assert "compile: passes " in str(report) and f"probes: {probes['tuned']} tuned in" in str(report)


def test_a_layer_under_the_latency_floor_is_not_measured(monkeypatch, tmp_path):
    """A layer whose float kernel is under the measurement's latency floor of ideal work (batch-1
    convolutions) stays float without a probe, neither prepared nor timed; the report says why."""
    from compile_backend.quant.speed import LayerSpeed

    asked = []

    class Speed:
        latency_floor_ms = 0.0015
        ideal_ms = staticmethod(LayerSpeed.ideal_ms)

        def prepare(self, probes):
            asked.extend(("prepare", p[1][1]) for p in probes)

        def __call__(self, *args):
            return None

        def conv(self, x_shape, w_shape, *rest):
            asked.append(("time", w_shape))
            return (0.001, 0.010)

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, TwoConvs().half().eval(), x, Speed())
    assert asked == [] and all(s == "float" for s, _ in status.values()), (asked, status)
    assert "too small for int8 to pay: its float convolution is 0.00 us of work at peak rates, under the 1.5 us" \
        in status["a.weight"][1]
    # at ResNet-50's shapes: batch 1 under the floor, batch 32 over it; BERT-base b16's GEMMs over it
    ideal = LayerSpeed.ideal_ms
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    assert ideal("conv", ((1, 512, 7, 7), (512, 512, 3, 3)) + geometry) == pytest.approx(0.0010, rel=0.01)
    assert ideal("conv", ((32, 512, 7, 7), (512, 512, 3, 3)) + geometry) > 0.0015 * 4
    assert ideal("conv", ((32, 3, 224, 224), (64, 3, 7, 7), [2, 2], [3, 3], [1, 1], 1)) == pytest.approx(0.0127, rel=0.01)
    assert ideal("linear", (2048, 768, 768)) == pytest.approx(0.00244, rel=0.01)


def test_a_layer_8_bits_cannot_speed_up_much_is_not_measured(monkeypatch, tmp_path):
    """A layer whose ideal times leave 8 bits less than ``min_ideal_gain`` to win (its 16-bit
    output's bytes bound it: ResNet-50's stem and expanding 1x1 convolutions) stays float without
    a probe; the report says why. The 16 -> 8 channel 1x1 convolution after it is measured."""
    from compile_backend.quant.speed import LayerSpeed

    asked = []

    class Speed(ConvsWin):
        min_ideal_gain = 0.15
        ideal_ms = staticmethod(LayerSpeed.ideal_ms)
        ideal_gain = staticmethod(LayerSpeed.ideal_gain)

        def prepare(self, probes):
            asked.extend(("prepare", p[1][1]) for p in probes)

        def conv(self, x_shape, w_shape, *rest):
            asked.append(("time", w_shape))
            return (0.001, 0.010)

    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, TwoConvs().half().eval(), x, Speed())
    assert asked == [("prepare", (8, 16, 1, 1)), ("time", (8, 16, 1, 1))], asked
    assert status["a.weight"][0] == "float" and status["b.weight"][0] == "quantized", status
    assert "int8 could save only 12% of its float convolution at peak rates" in status["a.weight"][1]
    # ResNet-50 b32: the stem 8%, the expanding 1x1s ~10%, its 3x3s and reducing 1x1s 40-50%;
    # BERT's and GPT-2's GEMMs 50%
    gain = LayerSpeed.ideal_gain
    one, three = ([1, 1], [0, 0], [1, 1], 1), ([1, 1], [1, 1], [1, 1], 1)
    assert gain("conv", ((32, 3, 224, 224), (64, 3, 7, 7), [2, 2], [3, 3], [1, 1], 1)) == pytest.approx(0.08, abs=0.01)
    assert gain("conv", ((32, 64, 56, 56), (256, 64, 1, 1)) + one) == pytest.approx(0.10, abs=0.01)
    assert gain("conv", ((32, 64, 56, 56), (64, 64, 3, 3)) + three) == pytest.approx(0.46, abs=0.01)
    assert gain("conv", ((32, 1024, 14, 14), (256, 1024, 1, 1)) + one) == pytest.approx(0.40, abs=0.01)
    assert gain("linear", (2048, 2304, 768)) == pytest.approx(0.5)
    assert LayerSpeed.min_ideal_gain == 0.15


def test_the_quantize_estimate_is_zero_off_cuda():
    from compile_backend.kernels.base import KernelContext
    from compile_backend.quant.speed import LayerSpeed

    ctx = KernelContext(options=Options(), device=torch.device("cpu"), interpret=True)
    assert LayerSpeed(ctx, "int8", per_channel=True, dynamic=True).quantize_ms(10**6) == 0.0
    assert LayerSpeed(None, "fp8", per_channel=False, dynamic=False).quantize_ms(10**6) == 0.0


def test_probes_run_their_code_path_on_the_cpu():
    """No timings on the CPU (the tuner does not measure there): both probes answer None."""
    import compile_backend.ops  # noqa: F401
    from compile_backend.kernels.base import KernelContext
    from compile_backend.quant.speed import LayerSpeed

    ctx = KernelContext(options=Options(autotune="fast"), device=torch.device("cpu"), interpret=True)
    speed = LayerSpeed(ctx, "int8", per_channel=True, dynamic=False)
    speed.prepare([("linear", (33, 48, 32, torch.float16, True)),
                   ("conv", ((2, 8, 7, 9), (16, 8, 3, 3), [1, 1], [1, 1], [1, 1], 1, torch.float16, True))])
    assert len(speed.built) == 2  # built (nothing compiled: no timing on the CPU), taken by the calls
    laid = speed.counts["layer_candidates"]
    assert laid == sum(len(t.candidates) for t in speed.built.values()) > 0  # handed to the pool, counted
    assert speed(33, 48, 32, torch.float16, True) is None
    assert speed.conv((2, 8, 7, 9), (16, 8, 3, 3), [1, 1], [1, 1], [1, 1], 1, torch.float16, True) is None
    assert not speed.built
    conv_group = (("conv", (2, 8, 7, 9), (16, 8, 1, 1), ([1, 1], [0, 0], [1, 1], 1), torch.float16, True, 1), "relu")
    speed.prepare_groups([(("linear", 33, 48, 32, torch.float16, True, True, (3, 11, 48)), "gelu", True)], [conv_group])
    assert len(speed.built) == 2  # the write probe's two tunings, the float group's; taken by the calls
    assert speed.counts["group_candidates"] > 0 and speed.counts["layer_candidates"] == laid
    assert speed.float_ms(*conv_group) is None and len(speed.built) == 1
    speed.prepare([("linear", (17, 48, 32, torch.float16, False))])  # beside a prepared write probe
    assert len(speed.built) == 2
    assert speed.write_ms(("linear", 33, 48, 32, torch.float16, True, True, (3, 11, 48)), "gelu") is None
    assert speed(17, 48, 32, torch.float16, False) is None and not speed.built
    # a frame that is not the GEMM's output viewed (an op between broadcast it): no view, no error
    from compile_backend.quant.speed import write_groups
    groups = write_groups(("linear", 33, 48, 32, torch.float16, False, False, (2, 33, 48)), "relu", True, "int8",
                          torch.device("cpu"))
    assert [("aten.view" in g.ops, "aten.mm" in g.ops) for g in groups] == [(False, True), (False, True)]
    assert speed.write_ms(("conv", (2, 8, 7, 9), (16, 8, 3, 3), ([1, 1], [1, 1], [1, 1], 1), torch.float16, True),
                          "relu") is None


def test_quant_layers_option_is_checked():
    assert Options().quant_layers == "faster"
    with pytest.raises(ValueError, match="quant_layers"):
        Options(quant_layers="some")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gpu_gemm_speed_measures_both(precision, tmp_path):
    from compile_backend.cache.timing import TimingCache
    from compile_backend.kernels.base import KernelContext
    from compile_backend.quant.speed import LayerSpeed

    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    ctx = KernelContext(options=Options(autotune="fast"), device=torch.device("cuda"), interpret=False,
                        timing_cache=TimingCache(str(tmp_path)))
    speed = LayerSpeed(ctx, precision, per_channel=True, dynamic=False)
    speed.prepare([("linear", (2048, 2304, 768, torch.float16, True)),
                   ("conv", ((32, 64, 56, 56), (64, 64, 3, 3), [1, 1], [1, 1], [1, 1], 1, torch.float16, True))])
    # both probes' candidates compiled in one pool, or streamed to the compile workers; timed below
    assert ctx.tuner._prebuilt or len(ctx.tuner._streamed) == 2
    q_ms, f_ms = speed(2048, 2304, 768, torch.float16, True)
    assert 0 < q_ms < 10 and 0 < f_ms < 10
    assert speed(2048, 2304, 768, torch.float16, True) == (q_ms, f_ms)  # measured once
    q_ms, f_ms = speed.conv((32, 64, 56, 56), (64, 64, 3, 3), [1, 1], [1, 1], [1, 1], 1, torch.float16, True)
    assert 0 < q_ms < 10 and 0 < f_ms < 10
    assert not ctx.tuner._prebuilt and not ctx.tuner._streamed  # every one taken by its probe
    # BERT FFN2's input (2048 x 3072): ~1.5 us in FP8, ~3.4 in INT8 on an H100/H200
    assert 0.0005 < speed.quantize_ms(2048 * 3072) < 0.01
    # what FFN1 (GEMM + GELU) and a ResNet-50 1x1 convolution (+ ReLU) pay to write 8 bits
    assert 0 <= speed.write_ms(("linear", 2048, 3072, 768, torch.float16, True, True, (16, 128, 3072)), "gelu") < 0.05
    assert 0 <= speed.write_ms(("conv", (32, 256, 56, 56), (64, 256, 1, 1), ([1, 1], [0, 0], [1, 1], 1),
                                torch.float16, True), "relu") < 0.05
    # a 3x3 convolution's own float group (conv + bias + ReLU), prepared in the pool, then timed:
    # no slower than the bare cuDNN call by more than its epilogue's cost
    group = (("conv", (32, 64, 56, 56), (64, 64, 3, 3), ([1, 1], [1, 1], [1, 1], 1), torch.float16, True), "relu")
    speed.prepare_groups([], [group])
    assert ctx.tuner._prebuilt or ctx.tuner._streamed
    assert 0 < speed.float_ms(*group) < 1.5 * f_ms and not ctx.tuner._prebuilt and not ctx.tuner._streamed


def test_a_failed_measurement_quantizes_the_layer(caplog):
    """A probe that raises (a GPU without the vendor GEMM, say) never fails the compile."""
    from compile_backend.quant.speed import LayerSpeed

    class Broken(LayerSpeed):
        def _tuning(self, *args):
            raise RuntimeError("no such GEMM here")

    speed = Broken(ctx=None, precision="int8", per_channel=True, dynamic=False)
    with caplog.at_level("WARNING", logger="compile_backend"):
        assert speed(64, 32, 16, torch.float16, True) is None
    assert "could not time the int8 GEMM 64x32x16" in caplog.text


def test_a_quantized_layer_hands_its_probe_winners_to_its_group(monkeypatch, tmp_path):
    """The probe's fastest 8-bit candidates (``speed.seeds_of``) ride on the scaled op's node to
    the kernel build of the layer's group (``template.PROBE_SEEDS``), which then tunes those."""
    from compile_backend.kernels.template import PROBE_SEEDS

    class Speed(ConvsWin):
        def seeds_of(self, method, args):
            return ("triton a", "triton b") if args[1][2] == 3 else ()

    seen = groups_built(monkeypatch)
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2)).half()
    status = quant_status(monkeypatch, tmp_path, TwoConvs().half().eval(), x, Speed())
    assert all(s == "quantized" for s, _ in status.values()), status
    anchors = {n.args[2].meta["val"].shape[2]: n.meta.get(PROBE_SEEDS)
               for g in seen if g.kind == "conv" for n in g.gm.graph.nodes if n.name == g.anchor}
    assert anchors == {3: ("triton a", "triton b"), 1: None}, anchors


def test_the_probe_keeps_its_fastest_candidates_as_seeds(monkeypatch):
    """``LayerSpeed`` keeps the SEEDS fastest 8-bit candidates of each probe it times."""
    from types import SimpleNamespace

    from compile_backend.quant.speed import SEEDS, LayerSpeed

    speed = LayerSpeed(None, "int8", True, False)
    cands = [SimpleNamespace(name=n, reference=n == "float") for n in ("float", "t1", "t2", "t3", "t4", "broken")]
    tuning = SimpleNamespace(candidates=cands)
    times = {"float": 0.010, "t1": 0.009, "t2": 0.004, "t3": 0.006, "t4": 0.005}
    monkeypatch.setattr(speed, "_tuning", lambda key: tuning)
    monkeypatch.setattr(speed, "_timings", lambda tuning, tag=None: times)
    assert speed(8, 16, 32, torch.float16, True) == (0.004, 0.010)
    assert SEEDS == 3 and speed.seeds_of("linear", (8, 16, 32, torch.float16, True)) == ("t2", "t4", "t3")
    assert speed.seeds_of("linear", (8, 16, 64, torch.float16, True)) == ()
