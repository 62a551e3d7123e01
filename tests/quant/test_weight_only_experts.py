"""Weight-only quantization of a mixture-of-experts layer's experts (fx_passes/weight_only.py,
rule ``weight_only_experts``): ``torch._grouped_mm`` over a frozen [E, K, N] expert weight (as
transformers 5 runs Mixtral, Qwen-MoE and DeepSeek-V3 experts) becomes
``compile_backend.weight_only_grouped_mm`` over the stacked experts' codes, one report row per
expert parameter; the routing (top-k, sort, histc, cumsum) stays as it is.

Expectation: the same model with each expert's [N, K] weight dequantized (``weight_only_ref``)
run eagerly. In fp32 the engine computes that function up to the order of fp32 sums (the fp32
tolerance of tests/quant/test_weight_only_flow.py); in bf16 each GEMM's one rounding may land on
the other side (1e-2 relative over the output). The plain CPU path (``aten_only``: the op's
implementation, the reference) and the Triton kernel under the interpreter both run.

torch's meta function of ``_grouped_mm`` takes bf16 only (torch 2.11-2.13), which is why
transformers runs other dtypes through its ``grouped_mm_fallback`` op under torch.compile: the
fp32 cases here use that op (registered below when transformers has not), bf16 ``_grouped_mm``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_backend
from compile_backend import quant
from compile_backend.kernels import weight_only_ref as ref

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")
FP32 = dict(rtol=1e-4, atol=1e-5)


class MoE(nn.Module):
    """A top-2 of 4 experts SwiGLU layer on [T, 32] tokens, as transformers' grouped_mm experts
    run it: tokens sorted by expert, offsets from histc + cumsum, two grouped GEMMs, the routing
    weights, the tokens gathered back. ``fallback`` runs the GEMMs through ``grouped`` instead
    (transformers' grouped_mm_fallback op where _grouped_mm is not traced)."""

    def __init__(self, experts=4, h=32, f=48, grouped=None):
        super().__init__()
        torch.manual_seed(0)
        self.experts, self.grouped = experts, grouped or torch._grouped_mm
        self.router = nn.Linear(h, experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * f, h) / h**0.5)  # [E, N, K]
        self.down_proj = nn.Parameter(torch.randn(experts, h, f) / f**0.5)
        self.out = nn.Linear(h, h)

    def forward(self, x):
        weights, chosen = torch.topk(F.softmax(self.router(x), -1), 2)
        ids, perm = torch.sort(chosen.reshape(-1))
        rows = x[perm // 2]
        offs = torch.cumsum(torch.histc(ids.float(), bins=self.experts, min=0, max=self.experts - 1), 0,
                            dtype=torch.int32)
        gate, up = self.grouped(rows, self.gate_up_proj.transpose(1, 2), offs).chunk(2, -1)
        y = self.grouped(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs)
        y = y * weights.reshape(-1)[perm, None]
        back = torch.empty_like(perm)
        back[perm] = torch.arange(perm.shape[0])
        return self.out(y[back].reshape(x.shape[0], 2, -1).sum(1))


def dequantized(w, cfg):
    """A [N, K] weight through weight_only_ref: quantized row by row, dequantized."""
    s = ref.scales(w, cfg.precision, cfg.group_size, cfg.clip)
    return ref.dequantize(ref.quantize(w, s, cfg.precision, cfg.group_size), s, cfg.precision, cfg.group_size)


def expected(model, cfg):
    """``model`` with each expert's weight dequantized row by row (the pass's stacked [E * N, K])
    and the ``out`` linear's (the router has N = 4 < min_features: float)."""
    out = copy.deepcopy(model)
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(out, name)
        e, n, k = p.shape
        p.data = dequantized(p.detach().reshape(e * n, k), cfg).reshape(e, n, k).to(p.dtype)
    out.out.weight.data = dequantized(out.out.weight.detach(), cfg).to(out.out.weight.dtype)
    return out


MODES = [("int8", None), ("int4", 32)]


def check_report(report, precision, path):
    (g,) = report.graphs
    assert g.rules["quantize"] == {"weight_only_linear": 1, "weight_only_experts": 2}
    layers = {q["name"]: q for q in g.quant}
    for name, (k, n) in {"gate_up_proj": (32, 96), "down_proj": (48, 32)}.items():
        row = layers[name]
        assert (row["status"], row["kind"], row["experts"], row["k"], row["n"]) == ("quantized", "experts", 4, k, n)
        assert row["sqnr_db"] > (40 if precision == "int8" else 20)
    assert layers["router.weight"]["status"] == "float"  # N = 4 < min_features
    kernels = [k for k in g.kernels if "compile_backend.weight_only_grouped_mm" in k["ops"]]
    assert len(kernels) == 2 and {k["impl"] for k in kernels} == {"triton" if path == "triton" else "aten"}
    assert not any("grouped_mm" in op and "weight_only" not in op for k in g.kernels for op in k["ops"])


@pytest.mark.parametrize("precision,group_size", MODES, ids=str)
@pytest.mark.parametrize("path", ["aten", "triton"])
def test_experts_quantized_and_match_the_dequantized_model(path, precision, group_size, monkeypatch, tmp_path):
    """fp32 experts through transformers' fallback op (a host sync a call: offs.tolist()), which
    the rewrite removes with the float GEMM."""
    if path == "aten":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, x = MoE(grouped=_fallback_op().default).eval(), torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    cfg = quant.QuantConfig(precision=precision, activations=None, group_size=group_size, min_features=16)
    check_report(compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path)), precision, path)
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        got, want, flt = fast(x), expected(model, cfg)(x), model(x)
    torch.testing.assert_close(got, want, **FP32)
    assert 0 < ((got - flt).norm() / flt.norm()).item() < (1e-2 if precision == "int8" else 0.2)


@needs_grouped_mm
@pytest.mark.parametrize("precision,group_size", MODES, ids=str)
@pytest.mark.parametrize("path", ["aten", "triton"])
def test_bf16_grouped_mm_experts(path, precision, group_size, monkeypatch, tmp_path):
    if path == "aten":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = MoE().eval().to(torch.bfloat16)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    cfg = quant.QuantConfig(precision=precision, activations=None, group_size=group_size, min_features=16)
    check_report(compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path)), precision, path)
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        got, want = fast(x).float(), expected(model, cfg)(x).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_excluded_and_unfrozen_experts_stay_float_with_a_reason(aten_only, tmp_path):
    model = MoE(grouped=_fallback_op().default).eval()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    cfg = quant.QuantConfig(precision="int8", activations=None, min_features=16, exclude=["*down_proj"])
    report = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path))
    layers = {q["name"]: q for g in report.graphs for q in g.quant}
    assert layers["down_proj"]["status"] == "float" and "excluded by pattern" in layers["down_proj"]["reason"]
    assert layers["gate_up_proj"]["status"] == "quantized"
    report = compile_backend.explain(model, x, quant=cfg, freeze=False, cache_dir=str(tmp_path))
    layers = {q["name"]: q for g in report.graphs for q in g.quant}
    assert "frozen parameter" in layers.get("gate_up_proj", {"reason": "frozen parameter (not traced)"})["reason"]


def _fallback_op():
    """transformers' ``transformers::grouped_mm_fallback`` (the (x, w, offs) contract of
    _grouped_mm, looped per expert), registered here when transformers has not."""
    op = getattr(torch.ops.transformers, "grouped_mm_fallback", None)
    if op is not None:
        return op

    @torch.library.custom_op("transformers::grouped_mm_fallback", mutates_args=())
    def grouped_mm_fallback(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(input.shape[0], weight.shape[2], dtype=input.dtype)
        start = 0
        for e, end in enumerate(offs.tolist()):
            out[start:end] = input[start:end] @ weight[e]
            start = end
        return out

    @grouped_mm_fallback.register_fake
    def _(input, weight, offs):
        return input.new_empty(input.shape[0], weight.shape[2])

    return torch.ops.transformers.grouped_mm_fallback


def test_w8a8_reports_the_experts_as_float_with_the_mode_that_takes_them(aten_only, tmp_path):
    """INT8 dynamic has no grouped kernel: the experts (most of an MoE model's weights) stay float,
    and the report says so instead of leaving them out."""
    model = MoE(grouped=_fallback_op().default).eval()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    cfg = quant.QuantConfig(precision="int8", activations="dynamic", min_features=16)
    report = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path))
    layers = {q["name"]: q for g in report.graphs for q in g.quant}
    for name in ("gate_up_proj", "down_proj"):
        assert layers[name]["status"] == "float" and layers[name]["experts"] == 4
        assert "weight-only modes (activations=None)" in layers[name]["reason"]
    assert layers["out.weight"]["status"] == "quantized"


def test_refit_requantizes_the_experts(aten_only, tmp_path):
    """Experts' weights changed in place: the engine refits, the folded codes and scales follow."""
    model = MoE(grouped=_fallback_op().default).eval()
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(6))
    cfg = quant.QuantConfig(precision="int4", activations=None, group_size=32, min_features=16)
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        before = fast(x)
        model.down_proj.mul_(-2.0)
        after, want = fast(x), expected(model, cfg)(x)
    torch.testing.assert_close(after, want, **FP32)
    assert not torch.allclose(before, after)


class BmmExperts(nn.Module):
    """Llama 4's experts: every expert over its slots of the routed tokens, one bmm each by a
    frozen [E, K, N] weight (stored K-major, unlike transformers' grouped_mm experts)."""

    def __init__(self, experts=4, h=32, f=48):
        super().__init__()
        torch.manual_seed(7)
        self.router = nn.Linear(h, experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, h, 2 * f) / h**0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, f, h) / f**0.5)

    def forward(self, x):
        scores = torch.sigmoid(self.router(x)).t()  # [E, T]: every expert sees every token, weighted
        slots = (x.unsqueeze(0) * scores.unsqueeze(-1))  # [E, T, H]
        gate, up = torch.bmm(slots, self.gate_up_proj).chunk(2, -1)
        return torch.bmm(F.silu(gate) * up, self.down_proj).sum(0)


@pytest.mark.parametrize("path", ["aten", "triton"])
def test_bmm_experts_quantized_and_match_the_dequantized_model(path, monkeypatch, tmp_path):
    if path == "aten":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, x = BmmExperts().eval(), torch.randn(5, 32, generator=torch.Generator().manual_seed(8))
    cfg = quant.QuantConfig(precision="int4", activations=None, group_size=32, min_features=16)
    report = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path))
    (g,) = report.graphs
    assert g.rules["quantize"]["weight_only_experts"] == 2
    layers = {q["name"]: q for q in g.quant}
    assert (layers["gate_up_proj"]["k"], layers["gate_up_proj"]["n"], layers["gate_up_proj"]["experts"]) == (32, 96, 4)
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    want = copy.deepcopy(model)
    for name in ("gate_up_proj", "down_proj"):  # stored [E, K, N]: the rows quantized are [E, N, K]'s
        p = getattr(want, name)
        e, k, n = p.shape
        rows = p.detach().transpose(1, 2).reshape(e * n, k)
        p.data = dequantized(rows, cfg).reshape(e, n, k).transpose(1, 2).contiguous()
    with torch.no_grad():
        got, flt = fast(x), model(x)
        torch.testing.assert_close(got, want(x), **FP32)
    assert 0.01 < ((got - flt).norm() / flt.norm()).item() < 0.35  # INT4 g32, two GEMMs through silu * up: 0.22


def test_fp16_precision_runs_the_experts_in_16_bits(aten_only, monkeypatch, tmp_path):
    """options precision="fp16" on an fp32 model: the experts' grouped GEMM takes fp16 rows (the
    A16 of W8A16, as a linear's) and still writes the fp32 value the graph had."""
    seen = []
    real = ref.grouped_weight_only_mm

    def recording(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ref, "grouped_weight_only_mm", recording)
    model = MoE(grouped=_fallback_op().default).eval()
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(9))
    cfg = quant.QuantConfig(precision="int8", activations=None, min_features=16)
    fast = torch.compile(model, backend="compile_backend",
                         options={"quant": cfg, "precision": "fp16", "cache_dir": str(tmp_path)})
    with torch.no_grad():
        got, want = fast(x), expected(model, cfg)(x)
    assert got.dtype == torch.float32 and ((got - want).norm() / want.norm()).item() < 5e-3
    assert seen and set(seen) == {torch.float16}, seen
