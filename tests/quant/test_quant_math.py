"""A GELU (or tanh) whose output only an 8-bit quantize reads takes its tanh form on the GPU's
tanh unit (fx_passes/quant_math.py, ``options["quant_gelu"]``): which values qualify, that the
graph and the kernel say so, and that the quantized values stay as accurate (SQNR against erf
GELU; CPU kernels under the interpreter, which keep the exact tanh; the tanh unit on the GPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import compile_backend
from compile_backend import quant
from compile_backend.fx_passes import PassContext
from compile_backend.fx_passes.quant_math import approximate_before_quantize, only_quantized
from compile_backend.kernels import expr, quant_ref
from compile_backend.kernels.template import traced_group
from compile_backend.options import Options
from test_quant_fusion import GeluMLP  # tests/quant/test_quant_fusion.py


def _quantize(y, inv):
    return quant_ref.quantize_steps(quant_ref.eager, y, y.dtype, inv, "fp8")


def _graph(fn, *inputs):
    group = traced_group(fn, inputs, "pointwise", "mul")
    return group.gm, approximate_before_quantize(group.gm, PassContext())


def _flagged(gm):
    return [(str(n.target), n.kwargs.get("approximate")) for n in gm.graph.nodes if n.meta.get(expr.APPROXIMATE_TANH)]


def test_only_values_every_use_of_which_is_quantized_are_approximated():
    x, inv = torch.randn(8, 16), torch.tensor(30.0)
    gm, counts = _graph(lambda x, inv: _quantize(F.gelu(x), inv), x, inv)
    assert counts == {"gelu_before_quantize": 1, "tanh_before_quantize": 0}
    assert _flagged(gm) == [("aten.gelu.default", "tanh")]
    # the float GELU is also returned (or read by anything but a quantize): stays erf, unflagged
    def both(x, inv):
        g = F.gelu(x)
        return _quantize(g, inv), g * 2
    gm, counts = _graph(both, x, inv)
    assert sum(counts.values()) == 0 and not _flagged(gm)
    # a residual added before the quantize is arithmetic on the way: still only quantized
    gm, counts = _graph(lambda x, inv: _quantize(F.gelu(x) + x, inv), x, inv)
    assert counts["gelu_before_quantize"] == 1
    # GPT-2's gelu_new, written out with tanh: the tanh is flagged, nothing rewritten
    new_gelu = lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    gm, counts = _graph(lambda x, inv: _quantize(new_gelu(x), inv), x, inv)
    assert counts == {"gelu_before_quantize": 0, "tanh_before_quantize": 1}
    assert _flagged(gm) == [("aten.tanh.default", None)]
    gelu = next(n for n in traced_group(lambda x: F.gelu(x), (x,), "pointwise", "gelu").gm.graph.nodes
                if "gelu" in str(n.target))
    assert not only_quantized(gelu)  # returned as is


@pytest.mark.parametrize("activations", ["static", "dynamic"])
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_engine_counts_the_gelus_and_keeps_its_accuracy(precision, activations, tmp_path):
    """GeluMLP's two GELUs feed quantized layers: both take the tanh form (the report's rule
    counts), none with quant_gelu="exact"; the engine's output is as close to eager as with erf."""
    model = GeluMLP().half().eval()
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)).half()
    cfg = quant.QuantConfig(precision=precision, activations=activations, min_features=1)
    q = quant.calibrate(model, [(x,)], cfg, progress=False, use_cache=False) if activations == "static" else cfg
    cosines = {}
    for mode, count in (("tanh", 2), ("exact", 0)):
        with torch.no_grad():
            report = compile_backend.explain(model, x, quant=q, cache_dir=str(tmp_path), autotune="off",
                                             speed_check=False, quant_gelu=mode)
        (g,) = report.graphs
        assert g.rules["quantize"]["gelu_before_quantize"] == count, g.rules
        fast = torch.compile(model, backend="compile_backend",
                             options={"quant": q, "cache_dir": str(tmp_path), "quant_gelu": mode})
        with torch.no_grad():
            y, ref = fast(x), model(x)
        torch._dynamo.reset()
        cosines[mode] = F.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0).item()
    assert cosines["tanh"] > 0.995 and abs(cosines["tanh"] - cosines["exact"]) < 1e-3, cosines


def test_the_option_is_validated():
    with pytest.raises(ValueError, match="quant_gelu"):
        Options(quant_gelu="fast")


def test_the_gpu_lowering_uses_the_tanh_unit(monkeypatch):
    """The flagged lowering calls cb_tanh_approx: tanh.approx.f32 on the GPU, cb_tanh under the
    interpreter (same values as the unflagged tanh form there)."""
    from compile_backend.kernels.expr_helpers import helper_source

    gm, _ = _graph(lambda x, inv: _quantize(F.gelu(x), inv), torch.randn(8, 16), torch.tensor(30.0))
    gelu = next(n for n in gm.graph.nodes if n.meta.get(expr.APPROXIMATE_TANH))
    (line,) = expr.emit_pointwise([gelu], {gelu.args[0]: "x"})
    flagged = line.split(" = ", 1)[1]
    assert "cb_tanh_approx(" in flagged
    del gelu.meta[expr.APPROXIMATE_TANH]  # unflagged: the exact tanh helper
    assert "cb_tanh(" in expr.emit_pointwise([gelu], {gelu.args[0]: "x"})[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "tanh.approx.f32" in helper_source(flagged)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = helper_source(flagged)
    assert "tanh.approx.f32" not in interpreted and "def cb_tanh(" in interpreted


def _sqnr_of_quantized_gelu(dev, approximate, rows=300, cols=257):
    """SQNR (dB) of the FP8-quantized GELU of N(0, 1.5) values against fp64 erf GELU, the GELU
    computed by our pointwise kernel (erf, or tanh form on the tanh unit)."""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.pointwise import build_pointwise

    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 1.5).to(dev)
    exact = F.gelu(x.double())
    scale = quant_ref.scale_from_amax(exact.abs().max().float(), "fp8").to(dev)
    inv = quant_ref.inverse_scale(scale)
    group = traced_group(lambda x, inv: _quantize(F.gelu(x), inv), (x, inv), "pointwise", "gelu")
    if approximate:
        approximate_before_quantize(group.gm, PassContext())
    (q,) = build_pointwise(group, KernelContext(Options(), torch.device(dev), dev == "cpu"))(x, inv)
    got = q.double() * scale.double()
    return 10 * math.log10(float((exact ** 2).sum() / ((exact - got) ** 2).sum()))


def test_the_quantized_gelu_keeps_its_sqnr():
    exact, tanh_form = _sqnr_of_quantized_gelu("cpu", False), _sqnr_of_quantized_gelu("cpu", True)
    assert abs(exact - tanh_form) < 0.05, (exact, tanh_form)


@pytest.mark.gpu
def test_gpu_tanh_unit_keeps_the_sqnr_of_the_quantized_gelu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    exact, tanh_unit = (_sqnr_of_quantized_gelu("cuda", approximate, 1024, 1031) for approximate in (False, True))
    assert abs(exact - tanh_unit) < 0.05, (exact, tanh_unit)
