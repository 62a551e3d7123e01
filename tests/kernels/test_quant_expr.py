"""The activation quantize as generated code (compile_backend/kernels/expr_casts.py): a pointwise
or row-reduction kernel whose chain ends in the INT8 / FP8 quantize ops writes exactly the bits
of ``quant_ref.quantize``.

CPU tensors under the Triton interpreter, odd shapes, fp32/fp16/bf16 inputs with NaN, +-inf,
huge values, -0.0 and exact .5 ties after scaling. Tolerance: none (bit-identical; NaN codes
compared as NaN). The interpreter's own fp8 conversions are wrong (round half up without carry,
NaN lost), so the kernels convert with integer arithmetic there: these tests check that path;
the native GPU conversion is checked by the ``gpu`` tests at the end.
"""
from __future__ import annotations

import pytest
import torch

from groups import DTYPES, make_group, randn  # tests/kernels/groups.py
from compile_backend.fx_passes.partition import classify
from compile_backend.kernels import expr, quant_ref
from compile_backend.kernels.base import KernelContext
from compile_backend.kernels.pointwise import build_pointwise
from compile_backend.kernels.reduction import build_reduction
from compile_backend.options import Options

FP8 = torch.float8_e4m3fn
QMAX = quant_ref.QMAX


def static_quantize(x, inv, precision):
    """The ops the quantize pass leaves before a scaled GEMM (static per-tensor scale)."""
    y = x.float() * inv
    if precision == "int8":
        return torch.nan_to_num(y, nan=0.0).round().clamp(-127, 127).to(torch.int8)
    return y.clamp(-448, 448).to(FP8)


def dynamic_quantize(x, zero, one, precision):
    """Per-row scale computed where the row is owned, with quant_ref's steps as the graph pass
    emits them (0 and 1 as 0-d constant inputs); returns (q, x_scale [rows, 1])."""
    xf = x.float()
    scale, inv = quant_ref.row_scale_steps(quant_ref.eager, xf, precision, zero, one)
    return quant_ref.quantize_steps(quant_ref.eager, xf, torch.float32, inv, precision), scale


def special_input(shape, dtype, scale, seed=0):
    """Random values, plus every case the quantize must get right: NaN, +-inf, huge, -0.0,
    values landing exactly on .5 ties (and fp8 rounding ties) after multiplying by 1/scale."""
    x = randn(*shape, seed=seed) * 40 * scale
    specials = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, -0.0, 0.0, 1e-30]
    ties = [v * scale for v in (0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5, 127.5, 200.0, 17.5, 464.0, -464.0, 5.5, 0.25)]
    flat = x.view(-1)
    vals = torch.tensor(specials + ties, dtype=torch.float32)
    flat[: min(len(vals), flat.numel())] = vals[: flat.numel()]
    return x.to(dtype)


def assert_same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.int8:
        assert torch.equal(got, want)
    else:
        g, w = got.float(), want.float()
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        same = torch.isnan(w) | (g.view(torch.int32) == w.view(torch.int32))  # -0.0 vs 0.0 counts
        assert bool(same.all()), (g[~same][:8], w[~same][:8])


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 5, 33)], ids=str)
def test_static_quantize_is_bit_identical(shape, dtype, precision):
    scale = torch.tensor(0.0625 if dtype != torch.float16 else 0.25)  # powers of two: ties stay ties
    x = special_input(shape, dtype, float(scale))
    inv = quant_ref.inverse_scale(scale)
    group = make_group(lambda x, inv: static_quantize(x, inv, precision), x, inv)
    kernel = build_pointwise(group, KernelContext(Options(), torch.device("cpu"), True))
    (q,) = kernel(x, inv)
    assert_same_bits(q, quant_ref.quantize(x, scale, precision))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_static_quantize_after_a_producer(precision):
    """The producer's kernel writes the quantized activation (GELU -> quantize), one group."""
    x = randn(9, 40, seed=3)
    scale = quant_ref.scale_from_amax(torch.tensor(3.0), precision)
    inv = quant_ref.inverse_scale(scale)
    fn = lambda x, inv: static_quantize(torch.nn.functional.gelu(x), inv, precision)  # noqa: E731
    group = make_group(fn, x, inv)
    assert all(classify(n) == "pointwise" for n in group.gm.graph.nodes if n.op == "call_function")
    (q,) = build_pointwise(group, KernelContext(Options(), torch.device("cpu"), True))(x, inv)
    assert_same_bits(q, quant_ref.quantize(torch.nn.functional.gelu(x), scale, precision))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dynamic_row_quantize_in_a_reduction_kernel(dtype, precision):
    x = randn(5, 37, seed=4).to(dtype)
    x[1] = 0.0  # zero amax: scale 0, exact zeros
    x[2, 3] = float("inf")  # amax inf: scale 0, zeros (never NaN)
    x[3] *= 1e-9  # tiny amax
    zero, one = quant_ref.constants()
    group = make_group(lambda *a: dynamic_quantize(*a, precision), x, zero, one, kind="reduction")
    kernel = build_reduction(group, KernelContext(Options(), torch.device("cpu"), True))
    q, s = kernel(x, zero, one)
    want_q, want_s = dynamic_quantize(x, zero, one, precision)
    assert torch.equal(s, want_s) and torch.equal(s, quant_ref.row_scale(x, precision))
    assert_same_bits(q, want_q)


def layer_norm_dynamic_quantize(x, w, b, zero, one, precision):
    """Layer norm, its per-row scale and the quantize as the graph pass writes them: 0 and 1 are
    0-d constant tensors (Python scalars in ``where`` trace to ``scalar_tensor``, an ATen group
    that would split the kernel), the rest quant_ref's formulas."""
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b)
    amax = h.float().abs().amax(-1, keepdim=True)
    scale = torch.where((amax > quant_ref.TINY_AMAX) & (amax != float("inf")), amax / QMAX[precision], zero)
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, one), zero)
    return static_quantize(h, inv, precision), scale


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_and_dynamic_quantize_partition_into_one_kernel(dtype, precision):
    """The producer owns the row: layer norm, amax, scale and quantize are one reduction group
    (the partitioner's choice) and one kernel. fp16/bf16 layer norms round like ATen's, so the
    outputs equal quant_ref's bit for bit; an fp32 layer norm may differ from ATen's by an ulp,
    which may move the scale by an ulp and a quantized value by one step."""
    from compile_backend.fx_passes.partition import partition

    x, w, b = randn(7, 37, seed=8).to(dtype), randn(37, seed=9).to(dtype), randn(37, seed=10).to(dtype)
    x[2] = 0.0
    zero, one = torch.zeros(()), torch.ones(())
    group = make_group(lambda *a: layer_norm_dynamic_quantize(*a, precision), x, w, b, zero, one, kind="reduction")
    kinds = [g.kind for g in partition(make_group(lambda *a: layer_norm_dynamic_quantize(*a, precision),
                                                  x, w, b, zero, one).gm)]
    assert kinds == ["reduction"], kinds
    q, s = build_reduction(group, KernelContext(Options(), torch.device("cpu"), True))(x, w, b, zero, one)
    h = torch.nn.functional.layer_norm(x, (37,), w, b)
    want_s = quant_ref.row_scale(h, precision)
    want_q = quant_ref.quantize(h, want_s, precision)
    if dtype == torch.float32:
        torch.testing.assert_close(s, want_s, rtol=1e-6, atol=0)
        assert (q.float() - want_q.float()).abs().max() <= (1 if precision == "int8" else 32)  # one step
    else:
        assert torch.equal(s, want_s)
        assert_same_bits(q, want_q)


def test_every_fp8_and_rounding_case_exhaustively():
    """fp32 -> e4m3fn on every fp8 boundary and tie (and the values between), fp8 -> fp32 of
    every code, round() on ties up to 2^24: all against torch."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
    v = codes.float()
    finite = v[torch.isfinite(v)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    probes = torch.cat([finite, mids, mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(-float("inf"))),
                        torch.tensor([460.0, 464.0, 470.0, 480.0, 1e4, float("inf"), float("nan"), 2**-10, 2**-12])])
    probes = torch.cat([probes, -probes])
    group = make_group(lambda x: (x.to(FP8), x.to(FP8).float(), x.round()), probes)
    kernel = build_pointwise(group, KernelContext(Options(), torch.device("cpu"), True))
    got8, back, rounded = kernel(probes)
    assert_same_bits(got8, probes.to(FP8))
    assert_same_bits(back, probes.to(FP8).float())
    ties = torch.cat([torch.arange(-40, 40) + 0.5, torch.tensor([2.0**23 - 0.5, 2.0**23 + 1, 2.0**24 + 2, -0.0, -0.3])])
    (r,) = build_pointwise(make_group(torch.round, ties), KernelContext(Options(), torch.device("cpu"), True))(ties)
    assert_same_bits(r, ties.round())
    assert_same_bits(rounded, probes.round())


def test_fp8_overflow_follows_this_torchs_cast(monkeypatch):
    """torch 2.13 saturates an overflowing fp8 cast to +-448, older torch (2.11) makes it NaN:
    the generated cast does what the running torch does (quantize clamps first either way)."""
    from compile_backend.kernels import expr_casts

    x = torch.tensor([448.0, 464.0, 465.0, 1e4, float("inf"), -float("inf"), -500.0, float("nan")])
    for saturates in (True, False):
        monkeypatch.setattr(expr_casts, "fp8_saturates", lambda: saturates)
        group = make_group(lambda x: x.to(FP8), x)
        (got,) = build_pointwise(group, KernelContext(Options(), torch.device("cpu"), True))(x)
        big = 448.0 if saturates else float("nan")
        want = torch.tensor([448.0, 448.0, big, big, big, -big, -big, float("nan")])
        torch.testing.assert_close(got.float(), want, equal_nan=True, rtol=0, atol=0)


def test_round_and_nan_to_num_lowerings():
    x = expr.Var("x", torch.float32)
    assert "cb_rint(x, 8388608.0)" == expr.lower(torch.ops.aten.round.default, [x], {}, torch.float32)
    assert "cb_rint64(x, 4503599627370496.0)" == expr.lower(torch.ops.aten.round.default,
                                                             [expr.Var("x", torch.float64)], {}, torch.float64)
    assert expr.lower(torch.ops.aten.round.default, [expr.Var("i", torch.int32)], {}, torch.int32) == "i"
    with pytest.raises(expr.Unsupported, match="decimals"):
        expr.lower(torch.ops.aten.round.decimals, [x], {"decimals": 2}, torch.float32)
    text = expr.lower(torch.ops.aten.nan_to_num.default, [expr.Var("x", torch.float16), 0.0], {}, torch.float16)
    assert "65504.0" in text and "-65504.0" in text
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        y = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5, -0.0], dtype=dt)
        g = make_group(lambda y: (torch.nan_to_num(y), torch.nan_to_num(y, nan=2.0, posinf=7.0, neginf=-1.0)), y)
        for a, b in zip(build_pointwise(g, KernelContext(Options(), torch.device("cpu"), True))(y), g.reference(y)):
            assert_same_bits(a, b) if dt == torch.float32 else torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_quantize_chains_lower_without_redundant_work():
    """A producer's epilogue runs the quantize chain per element, so its code is kept short
    (``python -m benchmarks.kernel_sass`` counts the instructions): the FP8 conversion rounds
    once (its result is not rounded again) and, after the clamp to +-448, without the overflow
    guard a NaN-making torch (2.11) needs; number bounds clamp with NaN-keeping min/max, the
    default nan_to_num is a min and a max, and on the GPU round is the hardware's ``cvt.rni``."""
    def code(fn, *inputs):
        g = make_group(fn, *inputs)
        nodes = [n for n in g.gm.graph.nodes if n.op == "call_function" and not n.target.__name__.startswith("view")]
        names = {p: p.name for p in g.gm.graph.nodes if p.op == "placeholder"}
        return "\n".join(expr.emit_pointwise(nodes, names))

    x, inv = randn(5, 7).half(), torch.tensor(3.0)
    fp8 = code(lambda x, inv: static_quantize(x, inv, "fp8"), x, inv)
    # one rounding, without the overflow guard (the clamp came first)
    assert fp8.count("cb_round_fp8_in_range(") == 1 and "cb_round_fp8(" not in fp8 and "tl.where" not in fp8, fp8
    assert "tl.maximum(" in fp8 and "tl.minimum(" in fp8
    wide = code(lambda x: x.float().clamp(-500, 500).to(FP8), x)  # past +-448: the guard stays
    assert "cb_round_fp8(" in wide and "in_range" not in wide, wide
    int8 = code(lambda x, inv: static_quantize(x, inv, "int8"), x, inv)
    assert int8.count("tl.where") == 1 and "cb_rint(" in int8, int8  # the NaN test of nan_to_num only
    # the tail (nan_to_num, round, clamp, cast) as one conversion to int32 and an integer clamp;
    # the float steps' lines stay, unused (the compiler drops them)
    last = int8.strip().splitlines()[-1]
    assert "cb_rint_s32(" in last and "tl.maximum(" in last and ", -127)" in last and ", 127)" in last, last
    assert "cvt.rni.s32.f32" in expr.HELPERS["rint_s32"]
    int4_like = code(lambda x, inv: (x.float() * inv).nan_to_num(0.0).round().clamp(-7, 7).to(torch.int8), x, inv)
    assert "cb_rint_s32(" in int4_like.splitlines()[-1]
    # a replacement for infinity inside the bounds keeps the chain (saturation would differ)
    custom = code(lambda x, inv: (x.float() * inv).nan_to_num(0.0, 5.0).round().clamp(-127, 127).to(torch.int8), x, inv)
    assert "cb_rint_s32(" not in custom, custom
    # a zero bound keeps compare-and-select: clamp(-0.0, min=0) is -0.0 in eager
    relu_like = code(lambda x: x.clamp(min=0), x)
    assert "tl.where" in relu_like and "tl.maximum" not in relu_like
    # a custom nan_to_num replacement keeps the exact test of each infinity
    assert expr.lower(torch.ops.aten.nan_to_num.default, [expr.Var("x", torch.float32), 0.0, 7.0], {},
                      torch.float32).count("tl.where") == 3
    assert "cvt.rni.f32.f32" in expr.HELPERS["rint"] and "cvt.rni.f64.f64" in expr.HELPERS["rint64"]


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_quantize_bit_identical(dtype, precision):
    """The native GPU conversions (fp8 needs sm_89+) write the bits quant_ref writes."""
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    dev = torch.device("cuda")
    scale = torch.tensor(0.0625, device=dev)
    x = special_input((129, 257), dtype, 0.0625).to(dev)
    inv = quant_ref.inverse_scale(scale)
    group = make_group(lambda x, inv: static_quantize(x, inv, precision), x, inv)
    (q,) = build_pointwise(group, KernelContext(Options(), dev, False))(x, inv)
    assert_same_bits(q.cpu(), quant_ref.quantize(x.cpu(), scale.cpu(), precision))
    zero, one = quant_ref.constants(dev)
    group = make_group(lambda *a: dynamic_quantize(*a, precision), x, zero, one, kind="reduction")
    q, s = build_reduction(group, KernelContext(Options(), dev, False))(x, zero, one)
    want_q, want_s = dynamic_quantize(x.cpu(), *quant_ref.constants(), precision)
    assert torch.equal(s.cpu(), want_s)
    assert_same_bits(q.cpu(), want_q)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gemm_epilogue_writes_the_quantized_activation(precision):
    """A float GEMM's epilogue as the producer: linear -> GELU -> quantize in one kernel."""
    from compile_backend.kernels.gemm import build_gemm
    from compile_backend.kernels.base import KernelGroup

    x, w, b = randn(17, 40, seed=5), randn(24, 40, seed=6), randn(24, seed=7)
    scale = quant_ref.scale_from_amax(torch.tensor(2.0), precision)
    inv = quant_ref.inverse_scale(scale)
    fn = lambda x, w, b, inv: static_quantize(torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)), inv,  # noqa: E731
                                              precision)
    g = make_group(fn, x, w, b, inv)
    anchor = next(n for n in g.gm.graph.nodes if n.op == "call_function" and n.target._opname == "addmm")
    group = KernelGroup("gemm", g.gm, anchor=anchor.name)
    (q,) = build_gemm(group, KernelContext(Options(), torch.device("cpu"), True))(x, w, b, inv)
    (want,) = group.reference(x, w, b, inv)
    assert q.dtype == want.dtype
    # the GEMM sums in another order than ATen: a value on a rounding boundary may move one step
    assert (q.float() - want.float()).abs().max() <= (1 if precision == "int8" else 0.0625 * want.float().abs().max())
