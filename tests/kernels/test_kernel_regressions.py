"""Regressions for generated kernels that validation used to catch (issue #14, item 5).

Each case must be right with ``validate=False``: validation is a safety net, not the fix.
CPU tensors under the Triton interpreter (tests/conftest.py), odd shapes.

* A reduction over a dim along which its input is broadcast (``expand``: stride 0) loads an
  [XBLOCK, 1] tile; reducing it must count every element of the row, not one
  (softmax of a row of 4 equal values is 0.25, not 1.0).
* A comparison of an fp16/bf16 tensor with a Python float rounds the float to the tensor's
  dtype first, as eager does (bf16 ``p > 0.3`` compares with 0.30078125); arithmetic with a
  Python float keeps it unrounded in fp32 (``x * 0.1``).
* Variance (var/std/var_mean/layer norm) of rows whose mean is large against their spread:
  within fp32 rounding of float64 (the corrected two-pass formula), like eager's.
* fp32 exp is range reduced (``cb_exp``): within ~1 ulp under the interpreter wherever the
  hardware form exp2(x * log2 e) loses up to ~|x| ulp by rounding the product.

Tolerances: exact equality for bool outputs and for fp16/bf16 results of one comparison;
otherwise groups.TOL / test_reduction.TOL_RED per dtype, and stated per check against float64.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from groups import DTYPES, TOL, assert_matches, context, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels.launch import ReductionConfig
from compile_backend.kernels.pointwise import build_pointwise
from compile_backend.kernels.reduction import build_reduction

TOL_RED = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
}
CONFIGS = {"persistent": None,
           "looped": ReductionConfig(xblock=2, rblock=8, num_warps=4, persistent=False)}
NO_VALIDATION = {"validate": False}


def compiled(fn):
    return torch.compile(fn, backend="compile_backend", options=NO_VALIDATION)


def check_reduction(fn, *inputs, config=None, tol=None):
    group = make_group(fn, *inputs, kind="reduction")
    kernel = build_reduction(group, context(), config)
    assert kernel.impl == "triton"
    assert_matches(kernel, group, list(inputs), tol=tol)
    return kernel


# ------------------------------------------------------------ reductions over broadcast dims
def test_softmax_of_expanded_row_end_to_end():
    x = randn(1, 4, 1)
    fn = lambda t: F.softmax(t.expand(3, 4, 4), 2)  # noqa: E731
    out = compiled(fn)(x)
    torch.testing.assert_close(out, torch.full((3, 4, 4), 0.25), rtol=0, atol=1e-7)


# (input shape, expanded shape, reduced dim). A row length that fills the block exactly (8,
# 4) is emitted without masks, the case that went wrong; odd lengths go through the masks.
EXPANDED = {
    "last": ((1, 5, 1), (3, 5, 8), 2), "last_odd": ((1, 5, 1), (3, 5, 7), 2),
    "last_of_row": ((3, 1, 1), (3, 5, 8), 2), "mid": ((3, 1, 7), (3, 4, 7), 1),
    "first": ((1, 5, 7), (4, 5, 7), 0),
}
OPS = {
    "softmax": lambda t, d: torch.softmax(t, d), "log_softmax": lambda t, d: torch.log_softmax(t, d),
    "logsumexp": lambda t, d: torch.logsumexp(t, d), "sum": lambda t, d: t.sum(d),
    "mean": lambda t, d: t.mean(d, keepdim=True), "amax": lambda t, d: t.amax(d),
    "var": lambda t, d: t.var(d), "sum_of_exp": lambda t, d: torch.exp(t).sum(d),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("case", sorted(EXPANDED))
def test_reduction_over_expanded_dim(case, op, config):
    shape, big, dim = EXPANDED[case]
    x = randn(*shape, seed=3)
    check_reduction(lambda t: OPS[op](t.expand(*big), dim), x, config=CONFIGS[config],
                    tol=TOL_RED[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [32, 37])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_norms_and_constants_over_expanded_dim(config, n, dtype):
    """A layer norm of a constant (broadcast) row is exactly 0; ones_like(x).sum counts the row."""
    x = randn(1, 5, 1, dtype=dtype)
    cfg, tol = CONFIGS[config], TOL_RED[dtype]
    k = check_reduction(lambda t: F.layer_norm(t.expand(3, 5, n), (n,)), x, config=cfg, tol=tol)
    out = k(x)[0]
    assert torch.equal(out, torch.zeros_like(out))
    check_reduction(lambda t: torch.ones_like(t.expand(3, 5, n)).sum(-1), x, config=cfg, tol=tol)
    check_reduction(lambda t: torch.softmax(t.expand(3, 5, n) * 2.0, -1), x, config=cfg, tol=tol)


# ------------------------------------------------------------ comparisons with Python scalars
def near(value: float, dtype: torch.dtype, n: int = 31) -> torch.Tensor:
    """Values of ``dtype`` around ``value``: its rounding, the neighbours, and random ones."""
    base = torch.tensor([value], dtype=dtype)
    step = torch.finfo(dtype).eps * abs(value)
    around = torch.cat([base + k * step for k in (-2, -1, 0, 1, 2)]).to(dtype)
    return torch.cat([around, randn(n, dtype=dtype, seed=4)])


COMPARISONS = {"gt": operator.gt, "lt": operator.lt, "le": operator.le, "ge": operator.ge,
               "eq": operator.eq, "ne": operator.ne}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(COMPARISONS))
@pytest.mark.parametrize("scalar", [0.3, 0.1, -1.7, 3])
def test_compare_with_python_scalar_is_exact(scalar, name, dtype):
    op = COMPARISONS[name]
    p = near(float(scalar), dtype)
    for fn in (lambda t: op(t, scalar), lambda t: op(scalar, t),
               lambda t: t.masked_fill(op(t, scalar), 0.0), lambda t: torch.where(op(t, scalar), t * 0.1, t)):
        group = make_group(fn, p)
        assert_matches(build_pointwise(group, context()), group, [p], tol=dict(atol=0, rtol=0))


def test_compare_bf16_end_to_end():
    """The issue's case: bf16 values masked where they exceed 0.3 (values at 0.3's bf16
    rounding must stay), compiled without validation; p is an input so that the comparison
    runs in the generated kernel (a frozen parameter's mask would be constant-folded)."""
    p = near(0.3, torch.bfloat16, n=40).view(5, 9)
    y = randn(5, 9, dtype=torch.bfloat16, seed=6)
    fn = lambda p, y: (p * y).masked_fill(p > 0.3, 0.0)  # noqa: E731
    assert torch.equal(compiled(fn)(p, y), fn(p, y))


def test_compare_with_scalar_kernel_argument():
    """A Python float reaching the kernel as an argument rounds like a literal."""
    p = near(0.3, torch.bfloat16)
    group = make_group(lambda t: t > 0.3, p)
    graph = group.gm.graph
    first = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(first):
        s = graph.placeholder("s")
    s.meta["val"] = 0.3
    gt = next(n for n in graph.nodes if n.op == "call_function")
    gt.args = (gt.args[0], s)
    group.gm.recompile()
    kernel = build_pointwise(group, context())
    assert torch.equal(kernel(p, 0.3)[0], p > 0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_arithmetic_with_python_scalar_keeps_it_unrounded(dtype):
    """mul/div with a Python float compute in fp32 with the unrounded scalar and round once
    (eager's opmath on CPU and CUDA): x * 0.1 is not x * bf16(0.1)."""
    x = randn(13, 21, dtype=dtype, seed=8) * 3
    for fn in (lambda t: t * 0.1, lambda t: t / 0.3, lambda t: t * 0.1 > 0.05):
        group = make_group(fn, x)
        assert_matches(build_pointwise(group, context()), group, [x], tol=dict(atol=0, rtol=0))


# ------------------------------------------------------------------------ variance precision
def rel_err_vs_float64(kernel_out, fn, x):
    ref = fn(x.double())
    return ((kernel_out.double() - ref).abs().max() / ref.abs().max()).item()


VARIANCES = {
    "var": lambda t: t.var(-1), "std": lambda t: t.std(-1, correction=0),
    "var_mean_var": lambda t: torch.var_mean(t, -1)[0], "var_mean_mean": lambda t: torch.var_mean(t, -1)[1],
    "layer_norm": lambda t: F.layer_norm(t, (t.shape[-1],)),
    "layer_norm_rstd": lambda t: torch.ops.aten.native_layer_norm(t, [t.shape[-1]], None, None, 1e-5)[2],
    "layer_norm_of_exp": lambda t: F.layer_norm(torch.exp(t), (t.shape[-1],)),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(VARIANCES))
@pytest.mark.parametrize("mean,spread", [(0.0, 1.0), (1e4, 0.1), (3e4, 1.0)], ids=str)
def test_variance_with_large_mean_matches_float64(mean, spread, name, config):
    """fp32 data of mean 1e4 and spread 0.1: a plain two-pass variance is off by
    (rounding of the mean / spread)**2 ~ 5e-5; the corrected two-pass is within fp32 rounding
    (eager's CPU var accumulates in double: within ~1e-7). The layer norm of exp(x) near
    exp(10) has mean/std ~ 1e3: its output and rstd stay within 1e-6 of float64 given the same
    fp32 input to the norm (exp's own rounding is compared separately below)."""
    fn = VARIANCES[name]
    x = randn(5, 37, seed=11) * spread + mean
    if name == "layer_norm_of_exp":
        x = randn(5, 37, seed=11) * 1e-3 + 10.0
    group = make_group(fn, x, kind="reduction")
    out = build_reduction(group, context(), CONFIGS[config])(x)[0]
    err = rel_err_vs_float64(out, fn, x)
    assert err < (2e-5 if name == "layer_norm_of_exp" else 1e-6), err


# --------------------------------------------------------------------------------- fp32 exp
def test_exp_within_one_ulp_over_the_range():
    """exp over [-110, 95] and its special values: within 1 ulp of float64 for normal results
    (exp2(x * log2 e) in fp32 is off by up to ~30 ulp here), subnormals within one subnormal
    step, and the same infinities, zeros and NaN as eager."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.72, 88.73, -103.9, -87.3])
    x = torch.cat([torch.linspace(-110.0, 95.0, 20011), special])
    group = make_group(torch.exp, x)
    kernel = build_pointwise(group, context())
    assert "cb_exp(" in kernel.source
    out, eager, ref = kernel(x)[0], torch.exp(x), torch.exp(x.double())
    normal = torch.isfinite(eager) & (eager >= torch.finfo(torch.float32).tiny)
    ulps = (out.double() - ref).abs() / (torch.finfo(torch.float32).eps * ref.abs())
    assert ulps[normal].max().item() <= 1.0
    subnormal = (eager > 0) & (eager < torch.finfo(torch.float32).tiny)
    assert ((out - eager)[subnormal].abs() <= 2.0 ** -149).all()
    rest = ~normal & ~subnormal  # inf, 0 and NaN results
    assert torch.equal(out[rest].nan_to_num(), eager[rest].nan_to_num())
    assert torch.isnan(out[-len(special)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exp_then_layer_norm_end_to_end(dtype):
    x = (randn(7, 37, seed=12) * 2 + 3).to(dtype)
    fn = lambda t: F.layer_norm(torch.exp(t), (37,))  # noqa: E731
    torch.testing.assert_close(compiled(fn)(x), fn(x), **(TOL_RED[dtype] if dtype != torch.float32 else TOL[dtype]))
