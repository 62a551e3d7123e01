"""Where an activation's quantize runs (issue #18: no standalone quantize kernel where the
producer is ours): a LayerNorm feeding a Linear through the [B, S, H] -> [B*S, H] flatten
quantizes inside the norm's kernel, static (per tensor) and dynamic (per row: the row amax
joins the norm's reduction). Generated kernels under the interpreter; values as eager's
fake-quantized model within the quantization error."""
import pytest
import torch

import compile_backend
from compile_backend import quant
from helpers import groups_built  # tests/helpers.py
from quant_models import AttentionBlock, NormLinear  # tests/quant/quant_models.py


def _calibrated_report(model, x, precision, tmp_path):
    """(calibration, report) of ``model`` quantized static at ``precision`` (one graph)."""
    cfg = quant.QuantConfig(precision=precision, min_features=1)
    calib = quant.calibrate(model, [(x,)], cfg, progress=False, use_cache=False)
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path), autotune="off",
                                         speed_check=False)
    return calib, report


def _engine_cosine(model, x, q, tmp_path, **options) -> float:
    """Cosine of the quantized engine's output (options["quant"] = q) with eager's, dtypes equal."""
    fast = torch.compile(model, backend="compile_backend", options={"quant": q, "cache_dir": str(tmp_path), **options})
    with torch.no_grad():
        y, ref = fast(x), model(x)
    assert y.dtype == ref.dtype
    return torch.nn.functional.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0).item()


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_quantize_joins_the_norm_kernel(activations, tmp_path):
    model = NormLinear().eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    cfg = quant.QuantConfig(precision="int8", activations=activations, min_features=1)
    q = quant.calibrate(model, [(x,)], cfg, progress=False, use_cache=False) if activations == "static" else cfg
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=q, cache_dir=str(tmp_path), autotune="off",
                                         speed_check=False)
    (g,) = report.graphs
    kinds = [(k["kind"], k["ops"]) for k in g.kernels]
    assert [kind for kind, _ in kinds] == ["reduction", "gemm"], kinds  # no quantize kernel of its own
    norm_ops = set(kinds[0][1])
    assert {"aten.native_layer_norm", "aten.round"} <= norm_ops
    if activations == "dynamic":
        assert "aten.amax" in norm_ops
    fast = torch.compile(model, backend="compile_backend", options={"quant": q, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        y, ref = fast(x), model(x)
    assert y.dtype == ref.dtype
    cos = torch.nn.functional.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0).item()
    assert cos > 0.999 and not torch.equal(y, ref)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_attention_writes_the_output_projections_codes(precision, tmp_path):
    """The output projection's input quantize runs inside the attention kernel (no pointwise
    kernel of its own), int8 and fp8 alike (fp8 through the generated kernels' conversion helper:
    integer arithmetic under the interpreter, whose own fp8 cast is wrong). Regression: the float
    projection's metadata, re-derived when the attention's output turned fp8, once gave the
    scaled GEMM an fp8 output dtype."""
    model = AttentionBlock().eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    calib, report = _calibrated_report(model, x, precision, tmp_path)
    (g,) = report.graphs
    kinds = [k["kind"] for k in g.kernels]
    assert kinds.count("attention") == 1 and "aten" not in kinds
    standalone = [k for k in g.kernels if k["kind"] == "pointwise"]
    # the graph input's quantize (for the merged Q/K/V projection) has no producer of ours
    assert len(standalone) == 1, [k["ops"] for k in standalone]
    # the report names it and why: the merged Q/K/V projection reads the graph input
    (left,) = g.standalone_quantizes
    assert g.kernels[left["kernel"]]["kind"] == "pointwise" and "graph input" in left["reason"]
    assert "standalone quantize: kernel #" in str(report)
    cos = _engine_cosine(model, x, calib, tmp_path)
    assert cos > 0.99, cos


class GeluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(40, 48), torch.nn.Linear(48, 48), torch.nn.Linear(48, 24)

    def forward(self, x):
        return self.fc3(torch.nn.functional.gelu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_dynamic_row_quantize_reads_the_16_bit_value_once(precision, tmp_path):
    """Dynamic per-row activations of an fp16 model: each GEMM's epilogue writes its fp16 output
    once, and one row-reduction kernel reads it, computes the row scale and writes the codes
    (no fp32 copy, no |x| tensor: before, the epilogue also stored both as fp32 and the first
    layer's input had a cast kernel of its own). Two kernels a layer; values as eager's."""
    model = GeluMLP().half().eval()
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)).half()
    cfg = quant.QuantConfig(precision=precision, activations="dynamic", min_features=1)
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path), autotune="off",
                                         speed_check=False)
    (g,) = report.graphs
    kinds = [k["kind"] for k in g.kernels]
    assert kinds == ["reduction", "gemm"] * 3, [(k["kind"], k["ops"]) for k in g.kernels]
    for k in g.kernels:
        if k["kind"] == "gemm":
            assert "aten.abs" not in k["ops"] and "aten._to_copy" not in k["ops"], k["ops"]
    # each row quantize is reported, with why its producer cannot compute the row's scale
    reasons = [q["reason"] for q in g.standalone_quantizes]
    assert len(reasons) == 3 and "graph input" in reasons[0], reasons
    assert all("dynamic quantize" in r and "all N columns" in r for r in reasons[1:]), reasons
    cos = _engine_cosine(model, x, cfg, tmp_path)
    assert cos > 0.995, cos


class UpcastAttentionBlock(AttentionBlock):
    """:class:`AttentionBlock` in fp16 with the attention upcast to fp32 and cast back: the graph
    SDPA's math path gives on CUDA (HF BERT on the H200: a standalone quantize per layer)."""

    def forward(self, x):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2).float()  # noqa: E731
        a = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(a.half().transpose(1, 2).contiguous().view(b, s, d))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_upcast_attention_writes_the_projections_codes(precision, tmp_path):
    model = UpcastAttentionBlock().half().eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2)).half()
    calib, report = _calibrated_report(model, x, precision, tmp_path)
    (g,) = report.graphs
    assert g.passes["lower_upcast_attention"] == 1
    reasons = [q["reason"] for q in g.standalone_quantizes]
    assert len(reasons) == 1 and "graph input" in reasons[0], reasons  # the attention output's is fused
    cos = _engine_cosine(model, x, calib, tmp_path)
    assert cos > 0.99, cos


class ConvStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 6, 1))

    def forward(self, x):
        return self.body(x)


def test_quantized_convolutions_run_channels_last_on_cuda(monkeypatch, tmp_path):
    """``quantize`` runs before the layout pass, so a fully quantized conv stack has no ATen
    convolution left; the layout pass switches the quantized ones all the same (on the H200 a
    quantized ResNet-50 ran every convolution NCHW). The passes are told the device is CUDA
    (the layout policy's only condition); kernels still run here."""
    from compile_backend import pipeline

    class OnCuda(pipeline.fx_passes.PassContext):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "device": torch.device("cuda")})

    monkeypatch.setattr(pipeline.fx_passes, "PassContext", OnCuda)
    model = ConvStack().half().eval()
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(5)).half()
    calib = quant.calibrate(model, [(x,)], quant.QuantConfig(precision="int8", min_features=1), progress=False,
                            use_cache=False)
    seen = groups_built(monkeypatch)
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path), autotune="off",
                                         speed_check=False)
    (g,) = report.graphs
    assert g.passes["choose_layout"] == 3
    convs = [grp for grp in seen if grp.kind == "conv"]
    assert len(convs) == 3 and all("compile_backend.scaled_conv" in grp.ops for grp in convs)
    for grp in convs:
        xq = grp.placeholders[0].meta["val"]
        assert xq.is_contiguous(memory_format=torch.channels_last), xq.stride()
    cos = _engine_cosine(model, x, calib, tmp_path)
    assert cos > 0.995, cos


class TwoReaders(torch.nn.Module):
    """One activation read by two convolutions (a ResNet stage's first block and its downsample)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.a(h) + self.b(h)


def test_one_activation_two_readers_one_quantize(tmp_path):
    model = TwoReaders().eval()
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(6))
    calib, report = _calibrated_report(model, x, "int8", tmp_path)
    (g,) = report.graphs
    stem = next(k for k in g.kernels if k["kind"] == "conv" and "aten.relu" in k["ops"])
    assert stem["ops"].count("aten.round") == 1, stem["ops"]  # the stem writes h's codes once
    cos = _engine_cosine(model, x, calib, tmp_path)
    assert cos > 0.999, cos


class Conv1DStyle(torch.nn.Module):
    """HF GPT-2's Conv1D: the weight stored [K, N], ``addmm(b, x, W)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(32, 48) / 6), torch.nn.Parameter(torch.zeros(48))
        self.w2, self.b2 = torch.nn.Parameter(torch.randn(48, 16) / 7), torch.nn.Parameter(torch.zeros(16))

    def forward(self, x):
        h = torch.addmm(self.b1, x.reshape(-1, 32), self.w1).relu()
        return torch.addmm(self.b2, h, self.w2)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_conv1d_style_weights_are_stored_k_major(precision, monkeypatch, tmp_path):
    """Codes of a [K, N] weight are folded K-major ([N, K] contiguous): cuBLAS's 8-bit GEMMs
    take nothing else and the template reads N-major 8-bit tiles slowly (the layout clone of a
    constant is not dropped: it is made once)."""
    seen = groups_built(monkeypatch)
    model = Conv1DStyle().half().eval()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(7)).half()
    calib, report = _calibrated_report(model, x, precision, tmp_path)
    gemms = [g for g in seen if "compile_backend.scaled_mm" in g.ops]
    assert len(gemms) == 2
    for g in gemms:
        wq = g.placeholders[2].meta["val"]
        assert wq.dtype.itemsize == 1 and wq.is_contiguous(), (wq.shape, wq.stride())
    cos = _engine_cosine(model, x, calib, tmp_path)
    assert cos > 0.99, cos


class AttentionReadTwice(AttentionBlock):
    """The flattened attention output is also returned: the attention kernel cannot write it
    quantized (the float value is needed too), so the projection's quantize runs alone."""

    def forward(self, x):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        flat = a.transpose(1, 2).contiguous().view(b, s, d)
        return self.o(flat), flat


def test_a_quantize_the_attention_cannot_take_says_why(tmp_path):
    model = AttentionReadTwice().eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    _, report = _calibrated_report(model, x, "int8", tmp_path)
    (g,) = report.graphs
    reasons = [q["reason"] for q in g.standalone_quantizes]
    assert any(r.startswith("the attention kernel cannot write it:") and "readers" in r for r in reasons), reasons
    _, again = _calibrated_report(model, x, "int8", tmp_path)  # an engine-cache hit: the stored graph says it too
    assert again.graphs[0].cache.get("passes") == "skipped", again.graphs[0].cache
    assert [q["reason"] for q in again.graphs[0].standalone_quantizes] == reasons


class ConvPoolConv(torch.nn.Module):
    """conv2 reads a max pooling's output: the pooling kernel takes no epilogue, so conv2's
    input quantize runs on its own, and the report names the pooling kernel as the reason."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2))


def test_a_standalone_quantize_names_our_kernel_that_produced_its_input(tmp_path):
    model = ConvPoolConv().eval()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    cfg = quant.QuantConfig(precision="int8", min_features=1)
    calib = quant.calibrate(model, [(x,)], cfg, progress=False, use_cache=False)
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path), autotune="off",
                                         speed_check=False)
    (g,) = report.graphs
    reasons = [q["reason"] for q in g.standalone_quantizes]
    assert any("its producer, a pool kernel" in r and "does not take this quantize" in r for r in reasons), reasons
    assert not any("producer getitem" in r for r in reasons), reasons  # what the H200 report said


class NormClassHead(torch.nn.Module):
    """ViT's ending: the encoder's final LayerNorm over every token, then the class token's head."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.head = torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.fc(x)))[:, 0])


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_class_token_head_quantizes_inside_the_norm(precision, tmp_path):
    """The norm runs on the class token only (fx_passes/row_select.py), so the head's input
    quantize joins the norm's kernel: the only standalone quantize left is the graph input's
    (the H200 ViT report named the norm's kernel for the head's)."""
    model = NormClassHead().eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    calib, report = _calibrated_report(model, x, precision, tmp_path)
    (g,) = report.graphs
    assert [q["reason"] for q in g.standalone_quantizes] == [
        "its input is a graph input: no producer of ours to write it quantized"], g.standalone_quantizes
    cos = _engine_cosine(model, x, calib, tmp_path)
    assert cos > 0.99, cos
