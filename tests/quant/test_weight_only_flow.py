"""Weight-only quantization (W8A16 / W4A16, issue #20) end to end: QuantConfig's weight-only mode,
the rewrite (fx_passes/weight_only.py) to ``compile_backend.weight_only_linear`` over codes and
scales folded from the frozen weights, the report, refit, and the kernel builder
(kernels/weight_only_build.py) through the selector.

Expectation: the model with every layer the config selects given its dequantized weight
(``weight_only_ref``: scales, codes, dequantize), run eagerly in fp32. The engine computes that
function up to the order of fp32 sums: within 1e-4 relative / 1e-5 absolute (the fp32 tolerance
of tests/helpers.py). Against the float model the stated bounds are on the relative error
‖y − y_float‖ / ‖y_float‖: 1e-2 for INT8 per channel (measured at most 5e-3), 0.2 for INT4 in
groups of 32 (7 levels a sign: a weight SQNR about 24 dB, ~6 % error per layer; up to three
quantized layers in a row here, measured at most 0.12).

Most flows run the plain CPU path (``aten_only``: the op's implementation is the reference); the
builder runs Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_backend
from compile_backend import quant
from compile_backend.kernels import weight_only_ref as ref
from compile_backend.quant import config as config_module

FP32 = dict(rtol=1e-4, atol=1e-5)
#: relative error against the float model, per (precision, group size)
VS_FLOAT = {("int8", None): 1e-2, ("int4", 32): 0.2}
MODES = [("int8", None), ("int4", 32)]


class MLP(nn.Module):
    """Odd sizes: K = 37 and 40 leave a short last group of 32 (5 and 8 inputs); fc2 has no bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(37, 48)
        self.fc2 = nn.Linear(48, 40, bias=False)
        self.fc3 = nn.Linear(40, 24)
        self.lm_head = nn.Linear(24, 33, bias=False)  # a default exclusion: stays float
        self.tiny = nn.Linear(24, 8)  # N = 8 < min_features 16: stays float

    def forward(self, x):
        h = self.fc3(torch.relu(self.fc2(F.gelu(self.fc1(x)))))
        return self.lm_head(h), self.tiny(h)


class Block(nn.Module):
    """A pre-norm decoder block on [B, S, 40] (4 heads of 10): q/k/v (merged into one GEMM by
    merge_parallel_gemms), causal SDPA, an output projection without bias, a GELU MLP, lm_head."""

    def __init__(self, vocab=50, h=40, heads=4, ff=72):
        super().__init__()
        torch.manual_seed(1)
        self.heads = heads
        self.emb = nn.Embedding(vocab, h)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(h), nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.k, self.v = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.o = nn.Linear(h, h, bias=False)
        self.up, self.down = nn.Linear(h, ff), nn.Linear(ff, h, bias=False)
        self.lm_head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        b, s, h = x.shape
        y = self.ln1(x)
        q, k, v = (p(y).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.o(a)
        x = x + self.down(F.gelu(self.up(self.ln2(x))))
        return self.lm_head(self.ln_f(x))


def config(precision, group_size, **kw):
    return quant.QuantConfig(precision=precision, activations=None, group_size=group_size, **kw)


def expected_model(model, cfg):
    """``model`` with the dequantized weight of every Linear ``cfg`` selects (weight_only_ref)."""
    out = copy.deepcopy(model)
    for name, mod in out.named_modules():
        if isinstance(mod, nn.Linear) and cfg.decide(name, type(mod), mod.in_features, mod.out_features) is None:
            w, g = mod.weight.detach(), cfg.group_size
            s = ref.scales(w, cfg.precision, g, cfg.clip)
            mod.weight.data = ref.dequantize(ref.quantize(w, s, cfg.precision, g), s, cfg.precision, g).to(w.dtype)
    return out


def rel_err(y, ref_y):
    return ((y - ref_y).double().norm() / ref_y.double().norm()).item()


def outputs(model, x):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, tuple) else (y,)


def check_against_expectation(fast, model, cfg, x):
    want, flt = outputs(expected_model(model, cfg), x), outputs(model, x)
    got = outputs(fast, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32)
    # the first output (the quantized path) against float, within the stated bound
    assert 0 < rel_err(got[0], flt[0]) < VS_FLOAT[(cfg.precision, cfg.group_size)]
    return got


# ----------------------------------------------------------------------------- the config
def test_weight_only_config_resolves_its_fields():
    w4 = quant.QuantConfig(precision="int4", activations=None)
    assert w4.weight_only and (w4.group_size, w4.clip) == (128, "minmax")  # stored resolved
    w8 = quant.QuantConfig(activations=None)
    assert (w8.precision, w8.group_size, w8.clip) == ("int8", None, "minmax")
    assert quant.QuantConfig().group_size is None and quant.QuantConfig().clip is None  # W8A8: not used
    again = quant.QuantConfig.from_mapping(w4.as_dict())
    assert again == w4 and again.digest() == w4.digest()
    assert len({w4.digest(), w4.replace(group_size=32).digest(), w4.replace(clip="mse").digest(), w8.digest()}) == 4
    # replace keeps the weight-only fields while the mode takes them, else drops them
    assert w4.replace(group_size=64).replace(precision="int8").group_size is None
    assert w4.replace(clip="mse").replace(precision="int8").clip == "mse"
    assert w4.replace(activations="static").group_size is None and w8.replace(precision="int4").group_size == 128


def test_config_tables_agree_with_the_reference():
    assert config_module.GROUP_SIZES == ref.GROUP_SIZES
    for method in config_module.CLIP_METHODS:
        ref.scales(torch.ones(2, 4), "int8", None, method)  # every method the config offers exists


@pytest.mark.parametrize("fields, message", [
    ({"group_size": 100}, "quant option 'group_size' must be one of 32, 64, 128, got 100"),
    ({"group_size": True}, "quant option 'group_size' must be one of 32, 64, 128"),
    ({"clip": "max"}, "quant option 'clip' must be one of minmax, mse, got 'max'"),
    ({"precision": "fp8"}, "quant option 'precision' must be one of int8, int4 for weight-only"),
    ({"weights": "per_tensor"}, "weight-only quantization (activations=None) takes weights='per_channel'"),
    ({"precision": "int8", "group_size": 32}, "quant option 'group_size' applies to precision 'int4'"),
    ({"activations": "static", "group_size": 32}, "quant option 'group_size' applies to weight-only"),
    ({"activations": "dynamic", "clip": "mse"}, "quant option 'clip' applies to weight-only"),
    ({"activations": "none"}, "quant option 'activations' must be one of static, dynamic or None"),
])
def test_bad_weight_only_values_name_the_field_and_choices(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quant.QuantConfig.from_mapping({"precision": "int4", "activations": None, **fields})


def test_options_take_the_config_without_calibration():
    cfg = config("int4", 32)
    assert compile_backend.Options(quant=cfg).quant is cfg
    with pytest.raises(ValueError, match="weight-only config .* needs no calibration"):
        compile_backend.Options(quant=quant.Calibration(cfg))


# ----------------------------------------------------------------------------- the flow
@pytest.mark.parametrize("precision,group_size", MODES, ids=str)
def test_mlp_quantizes_selected_layers_and_matches_the_reference(aten_only, precision, group_size, tmp_path):
    model, x = MLP().eval(), torch.randn(5, 37, generator=torch.Generator().manual_seed(2))
    cfg = config(precision, group_size)
    report = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path))
    (g,) = report.graphs
    layers = {q["name"]: q for q in g.quant}
    assert g.rules["quantize"] == {"weight_only_linear": 3, "weight_only_experts": 0}
    assert [n for n, q in layers.items() if q["status"] == "quantized"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert layers["lm_head.weight"]["reason"] == "output layer (lm_head)"
    assert layers["tiny.weight"]["reason"] == "N=8 < min_features 16"
    fc1 = layers["fc1.weight"]
    assert fc1["weights"] == ("per_channel" if precision == "int8" else "per_group_32")
    assert fc1["precision"] == precision and fc1["sqnr_of"] == "weight" and fc1["sqnr_db"] > (40 if group_size is None else 20)
    assert "quantized: 3 of 5 GEMM/conv layers" in str(report)
    assert "compile_backend.weight_only_linear" in str(report)
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    check_against_expectation(fast, model, cfg, x)  # lm_head and tiny (float) read quantized layers' output


@pytest.mark.parametrize("precision,group_size", MODES, ids=str)
def test_transformer_block(aten_only, precision, group_size, tmp_path):
    model = Block().eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    cfg = config(precision, group_size)
    report = compile_backend.explain(model, ids, quant=cfg, cache_dir=str(tmp_path))
    layers = {q["name"]: q for g in report.graphs for q in g.quant}
    quantized = sorted(n for n, q in layers.items() if q["status"] == "quantized")
    # q/k/v run as one merged GEMM (one layer, named by its parts); each part's rows quantize alone
    assert quantized == ["down.weight", "k.weight+q.weight+v.weight", "o.weight", "up.weight"]
    assert layers["lm_head.weight"]["status"] == "float"
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    check_against_expectation(fast, model, cfg, ids)


def test_exclude_keeps_layers_float_and_mse_clip_never_loses(aten_only, tmp_path):
    model, x = MLP().eval(), torch.randn(3, 37, generator=torch.Generator().manual_seed(4))
    sqnr = {}
    for clip in ("minmax", "mse"):
        cfg = config("int4", 32, clip=clip, exclude=["fc2"])
        report = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path))
        layers = {q["name"]: q for g in report.graphs for q in g.quant}
        assert layers["fc2.weight"]["reason"] == "excluded by pattern 'fc2'"
        sqnr[clip] = {n: q["sqnr_db"] for n, q in layers.items() if q["status"] == "quantized"}
    assert set(sqnr["mse"]) == {"fc1.weight", "fc3.weight"}
    # mse tries the plain amax too and keeps it on ties: never a larger squared error per group
    assert all(sqnr["mse"][n] >= sqnr["minmax"][n] for n in sqnr["mse"])
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    check_against_expectation(fast, model, cfg, x)


def test_refit_requantizes_the_weights(aten_only, tmp_path):
    model, x = MLP().eval(), torch.randn(3, 37, generator=torch.Generator().manual_seed(5))
    cfg = config("int4", 32)
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    before = outputs(fast, x)
    with torch.no_grad():
        model.fc2.weight.mul_(-2.0)  # in place: the engine refits, the folded codes and scales follow
    after = check_against_expectation(fast, model, cfg, x)
    assert not torch.allclose(before[0], after[0])


def test_fp16_precision_runs_the_activations_in_16_bits(aten_only, tmp_path):
    model, x = MLP().eval(), torch.randn(4, 37, generator=torch.Generator().manual_seed(6))
    cfg = config("int8", None, include=["fc1"])
    fast = torch.compile(model, backend="compile_backend",
                         options={"quant": cfg, "precision": "fp16", "cache_dir": str(tmp_path)})
    got = outputs(fast, x)[0]
    assert got.dtype == torch.float32
    codes, s = ref.quantize_weight(model.fc1.weight.detach(), "int8")
    h = ref.weight_only_mm(x.half(), codes, s, "int8", bias=model.fc1.bias.detach(), out_dtype=torch.float32)
    with torch.no_grad():  # the rest: float layers in fp16 (lower_precision), the result in fp32
        h = F.linear(F.gelu(h).half(), model.fc2.weight.half()).float()
        h = F.linear(torch.relu(h).half(), model.fc3.weight.half(), model.fc3.bias.half()).float()
        want = F.linear(h.half(), model.lm_head.weight.half()).float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- the kernels
@pytest.mark.parametrize("precision,group_size,m", [("int8", None, 3), ("int4", 32, 17)], ids=str)
def test_builder_through_the_selector(precision, group_size, m):
    """A gemm group anchored on the op, with an epilogue (relu, residual add): the Triton kernel
    (the heuristic's path: gemv, skinny or tiled by M) is chosen and passes validation against the reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from compile_backend.kernels.base import KernelContext, KernelGroup
    from compile_backend.kernels.select import choose_kernel

    gen = torch.Generator().manual_seed(7)
    codes, scales = ref.quantize_weight(torch.randn(33, 37, generator=gen), precision, group_size)
    x, bias, res = torch.randn(m, 37, generator=gen), torch.randn(33, generator=gen), torch.randn(m, 33, generator=gen)

    def fn(x, c, s, b, r):
        return torch.relu(torch.ops.compile_backend.weight_only_linear(x, c, s, b, precision, group_size)) + r

    inputs = (x, codes, scales, bias, res)
    gm = make_fx(lambda *a: (fn(*a),))(*inputs)  # as the partitioner hands groups: meta['val'] on every node
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    anchor = next(n.name for n in gm.graph.nodes if "weight_only_linear" in str(n.target))
    group = KernelGroup("gemm", gm, anchor=anchor)
    ctx = KernelContext(options=compile_backend.Options(), device=torch.device("cpu"), interpret=True)
    kernel, fallbacks = choose_kernel(group, inputs, ctx)
    assert (kernel.impl, fallbacks) == ("triton", [])
    from compile_backend.kernels.weight_only import heuristic  # imports Triton: only here

    assert kernel.config["path"] == heuristic(m).path
    torch.testing.assert_close(kernel(*inputs)[0], group.reference(*inputs)[0], **FP32)
    # relu + residual add never run as ATen ops: for a GEMV (M <= 4) inside the one fused launch,
    # else as one generated epilogue kernel after the anchor
    from compile_backend.kernels import weight_only_build as wob

    runs = []
    real = wob.epilogue_only
    wob.epilogue_only = lambda *a, **k: runs.append(1) or real(*a, **k)
    try:
        torch.testing.assert_close(kernel(*inputs)[0], group.reference(*inputs)[0], **FP32)
    finally:
        wob.epilogue_only = real
    assert runs == ([] if m <= 4 else [1]) and bool(kernel.config.get("fused")) == (m <= 4)


def test_engine_runs_the_triton_kernel(tmp_path):
    """Under the interpreter the engine's weight-only groups get the Triton kernel, once the
    partitioner makes the op a gemm anchor (fx_passes/partition.py)."""
    partition = importlib.import_module("compile_backend.fx_passes.partition")
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.compile_backend.weight_only_linear.default, ())
    if partition.classify(node) != "gemm":
        pytest.skip("fx_passes/partition.py does not yet classify compile_backend.weight_only_linear as a "
                    "gemm anchor: its groups run the reference through ATen")
    model, x = MLP().eval(), torch.randn(3, 37, generator=torch.Generator().manual_seed(8))
    cfg = config("int4", 32)
    report = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path))
    impls = [k["impl"] for g in report.graphs for k in g.kernels if "compile_backend.weight_only_linear" in k["ops"]]
    assert impls == ["triton"] * 3
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    check_against_expectation(fast, model, cfg, x)


def test_calibrate_and_prepare_qat_refuse_weight_only_configs():
    from compile_backend import quant

    cfg = quant.QuantConfig(precision="int4", activations=None, group_size=32)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match="weight-only config"):
        quant.calibrate(model, [(torch.randn(2, 64),)], cfg, progress=False)
    with pytest.raises(ValueError, match="activations=None"):
        quant.prepare_qat(model, cfg)
