"""The ATen -> Triton expression table (compile_backend/kernels/expr.py) against eager.

Each op runs as a one-op pointwise group (build_pointwise) on CPU tensors under the Triton
interpreter, for fp32/fp16/bf16, on an odd shape, and must match the ATen reference within
the per-dtype tolerances of tests/kernels/groups.py (TOL): the module's rounding rule makes
fp16/bf16 results equal to eager's up to one rounding flip.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from groups import DTYPES, TOL, assert_matches, context, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels import expr
from compile_backend.kernels.base import Unsupported
from compile_backend.kernels.pointwise import build_pointwise

SHAPE = (13, 21)


def pos(*shape, dtype, seed=1):
    return (randn(*shape, seed=seed).abs() + 0.1).to(dtype)


# name -> (function, input maker); inputs are drawn per dtype
UNARY = {
    "neg": (torch.neg, randn), "abs": (torch.abs, randn), "exp": (torch.exp, randn),
    "log": (torch.log, pos), "sqrt": (torch.sqrt, pos), "rsqrt": (torch.rsqrt, pos),
    "tanh": (torch.tanh, randn), "sigmoid": (torch.sigmoid, randn), "relu": (torch.relu, randn),
    "gelu": (F.gelu, randn), "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), randn),
    "silu": (F.silu, randn), "erf": (torch.erf, randn), "reciprocal": (torch.reciprocal, pos),
    "sin": (torch.sin, randn), "cos": (torch.cos, randn),
    "pow2": (lambda x: x ** 2, randn), "pow3": (lambda x: torch.pow(x, 3), randn),
    "pow_half": (lambda x: x ** 0.5, pos), "pow_1.7": (lambda x: x ** 1.7, pos),
    "pow_neg1": (lambda x: x ** -1, pos), "pow_int_neg_base": (lambda x: x ** 5, randn),
    "scalar_pow": (lambda x: 2.0 ** x, randn),
    "clamp": (lambda x: x.clamp(-0.5, 0.7), randn), "clamp_min": (lambda x: x.clamp_min(0.1), randn),
    "clamp_max": (lambda x: torch.clamp_max(x, 0.1), randn),
    "add_scalar": (lambda x: x + 1.5, randn), "sub_scalar": (lambda x: x - 3, randn),
    "rsub": (lambda x: 2 - x, randn), "mul_scalar": (lambda x: x * 0.1, randn),
    "div_scalar": (lambda x: x / 3.0, randn), "fill": (lambda x: torch.full_like(x, 2.5), randn),
    "to_fp32": (lambda x: x.float(), randn), "to_fp16": (lambda x: x.half(), randn),
    "to_bf16": (lambda x: x.bfloat16(), randn), "to_int": (lambda x: x.to(torch.int32), lambda *s, dtype: (randn(*s) * 10).to(dtype)),
    "logical_not": (lambda x: torch.logical_not(x > 0), randn),
    "leaky_relu": (F.leaky_relu, randn), "hardtanh": (F.hardtanh, randn),
    "hardsigmoid": (F.hardsigmoid, randn), "hardswish": (F.hardswish, randn),
    "floor_div": (lambda x: torch.div(x, 0.3, rounding_mode="floor"), randn),
    "trunc_div": (lambda x: torch.div(x, 0.3, rounding_mode="trunc"), randn),
    "sign": (torch.sign, randn), "floor": (torch.floor, randn), "ceil": (torch.ceil, randn),
    # wide inputs: softplus's threshold (20) and log1p of a tiny exp (x << 0), elu's expm1 near 0
    "softplus": (F.softplus, lambda *s, dtype: (randn(*s) * 12).to(dtype)),
    "softplus_beta": (lambda x: F.softplus(x, beta=2.0, threshold=5.0), lambda *s, dtype: (randn(*s) * 6).to(dtype)),
    "mish": (F.mish, lambda *s, dtype: (randn(*s) * 12).to(dtype)),
    "elu": (F.elu, lambda *s, dtype: (randn(*s) * 4).to(dtype)), "selu": (F.selu, randn),
    "elu_tiny": (lambda x: F.elu(x, alpha=0.5), lambda *s, dtype: (randn(*s) * 1e-4).to(dtype)),
    "floor_divide": (lambda x: torch.floor_divide(x, 0.3), randn),
}

BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "add_alpha": lambda a, b: torch.add(a, b, alpha=2), "maximum": torch.maximum,
    "minimum": torch.minimum, "eq": torch.eq, "ne": lambda a, b: a != b,
    "lt": torch.lt, "gt": torch.gt, "le": torch.le, "ge": torch.ge,
    "where": lambda a, b: torch.where(a > b, a, b), "where_scalar": lambda a, b: torch.where(a > 0, a, 0.0),
    "masked_fill": lambda a, b: a.masked_fill(b > 0.5, -1e4), "pow_tt": lambda a, b: a.abs() ** b,
    "addcmul": lambda a, b: torch.addcmul(a, a, b, value=0.5), "clamp_tensor": lambda a, b: a.clamp(min=b),
    # backward ops of training graphs: (grad, saved input or output)
    "threshold_backward": lambda g, x: torch.ops.aten.threshold_backward(g, x, 0.0),
    "threshold_backward_t": lambda g, x: torch.ops.aten.threshold_backward(g, x, 0.25),
    "sigmoid_backward": lambda g, x: torch.ops.aten.sigmoid_backward(g, torch.sigmoid(x)),
    "tanh_backward": lambda g, x: torch.ops.aten.tanh_backward(g, torch.tanh(x)),
    "silu_backward": lambda g, x: torch.ops.aten.silu_backward(g, x),
    "gelu_backward": lambda g, x: torch.ops.aten.gelu_backward(g, x),
    "gelu_backward_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "native_dropout_backward": lambda g, x: torch.ops.aten.native_dropout_backward(g, x > 0.3, 1.25),
    # fills: constants of a shape (of an argument or another tensor), inside a group
    "fills": lambda a, b: torch.where(a > b, torch.zeros(a.shape, dtype=a.dtype), b) + torch.ones_like(a)
    + a.new_full(a.shape, 0.5) + torch.scalar_tensor(2.0, dtype=a.dtype) * a.new_ones(a.shape),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, dtype):
    fn, make = UNARY[name]
    x = make(*SHAPE, dtype=dtype)
    group = make_group(fn, x)
    assert_matches(build_pointwise(group, context()), group, [x])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary(name, dtype):
    a, b = randn(*SHAPE, dtype=dtype, seed=2), randn(*SHAPE, dtype=dtype, seed=3)
    a[0, 0] = b[0, 0]  # exercise equality in comparisons
    group = make_group(BINARY[name], a, b)
    assert_matches(build_pointwise(group, context()), group, [a, b])


@pytest.mark.parametrize("pair", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                  (torch.int32, torch.float16), (torch.bool, torch.float32),
                                  (torch.int64, torch.int32)], ids=str)
def test_type_promotion(pair):
    a = (randn(*SHAPE, seed=4) * 4).to(pair[0])
    b = (randn(*SHAPE, seed=5) * 4).to(pair[1])
    group = make_group(lambda x, y: (x + y, x * y, x > y, (x + y) * 0.5), a, b)
    kernel = build_pointwise(group, context())
    assert_matches(kernel, group, [a, b], tol=TOL[torch.float16])


def test_integer_ops_exact():
    a = torch.arange(-50, 49, dtype=torch.int32).reshape(9, 11)
    group = make_group(lambda x: (x * 3 - 7, torch.abs(x), torch.relu(x), x / 4, x > 3, torch.maximum(x, x * -1)), a)
    assert_matches(build_pointwise(group, context()), group, [a])


@pytest.mark.parametrize("dtype", (torch.int32, torch.int64), ids=str)
def test_integer_floor_division_rounds_down(dtype):
    """torch's floor_divide / div(rounding_mode="floor") on integers rounds toward -inf (Triton's
    // truncates): negative numerators and divisors, a tensor divisor, MoE's slot // top_k."""
    a = torch.arange(-50, 49, dtype=dtype).reshape(9, 11)
    b = torch.tensor([3, -4, 7, -1, 2, 5, -3, 11, 1, -9, 4], dtype=dtype).expand(9, 11)
    group = make_group(lambda x, y: (torch.floor_divide(x, 2), torch.floor_divide(x, -3), torch.floor_divide(x, y),
                                     torch.div(x, y, rounding_mode="floor")), a, b)
    assert_matches(build_pointwise(group, context()), group, [a, b])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_floor_division_is_exact(dtype):
    """1.5 // 0.3 is 4 in eager (exact remainder), though fp32 1.5 / 0.3 rounds to 5.0."""
    x = torch.tensor([[1.5, 3.0, -1.5, 0.6, -3.0, 2.7, 0.0, 7.5]], dtype=dtype)
    d = torch.tensor([[0.3, -0.3, 0.3, 0.2, 0.75, -0.9, 0.3, 2.5]], dtype=dtype)
    group = make_group(lambda a, b: (torch.div(a, 0.3, rounding_mode="floor"),
                                     torch.div(a, b, rounding_mode="floor")), x, d)
    assert_matches(build_pointwise(group, context()), group, [x, d])



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_floor_division_exact_with_twice_rounded_fma(dtype, monkeypatch):
    """Triton 3.6's interpreter (torch 2.11) computes tl.fma as x * y + z with two roundings:
    the remainder of 3.0 - 10 * 0.3f rounded to 0 and bf16 3.0 // 0.3 gave 10 (eager 9; the
    H200 run of test_every_op_fused_on_gpu[bf16] was interpreted). Simulated here on a newer
    Triton; a constant dividend too."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma",
                        lambda self, x, y, z: interpreter.TensorHandle(x.data * y.data + z.data, z.dtype.scalar))
    x = torch.tensor([[1.5, 3.0, -1.5, 0.6, -3.0, 2.7, 0.0, 7.5]], dtype=dtype)
    d = torch.tensor([[0.3, -0.3, 0.3, 0.2, 0.75, -0.9, 0.3, 2.5]], dtype=dtype)
    group = make_group(lambda a, b: (torch.div(a, 0.3, rounding_mode="floor"),
                                     torch.div(a, b, rounding_mode="floor"),
                                     torch.div(torch.full_like(b, 3.0), b, rounding_mode="floor")), x, d)
    assert_matches(build_pointwise(group, context()), group, [x, d])


def test_nan_propagation():
    x = randn(5, 7)
    x[1, 2] = float("nan")
    x[3, 3] = float("inf")
    group = make_group(lambda t: (torch.relu(t), torch.maximum(t, t * 0.5), t.clamp(-1, 1), t ** 0), x)
    assert_matches(build_pointwise(group, context()), group, [x])


def test_rounding_rule_matches_eager_op_by_op():
    """fp16 chain where skipping the per-op rounding visibly disagrees with eager."""
    x = (torch.rand(64, 33, generator=torch.Generator().manual_seed(7)) * 1000 + 1000).half()
    fn = lambda t: ((t + 0.3) * 1.001 - t) * 7.0  # noqa: E731
    group = make_group(fn, x)
    got = build_pointwise(group, context())(x)[0]
    exact = fn(x)
    assert torch.equal(got, exact)  # rounding each op like eager: bit-identical here
    fused = (((x.float() + 0.3) * 1.001 - x.float()) * 7.0).half()
    assert not torch.equal(fused, exact)  # the check above can fail: fp32 fusion differs


def test_emit_lines_are_readable():
    x = randn(3, 4, dtype=torch.float16)
    group = make_group(lambda t: F.gelu(t + 1) * 2, x)
    nodes = [n for n in group.gm.graph.nodes if n.op == "call_function"]
    ph = group.placeholders[0]
    names = {ph: "x"}
    helpers = set()
    lines = expr.emit_pointwise(nodes, names, helpers)
    assert len(lines) == len(nodes) == 3
    assert lines[0].startswith(f"v_{nodes[0].name} = (x + 1.0)") or "x + 1" in lines[0]
    assert lines[0].endswith(".to(tl.float16).to(tl.float32)")
    assert "tl.erf" in lines[1] and names[nodes[-1]] == f"v_{nodes[-1].name}"
    assert helpers == set()


def test_promote_matches_torch():
    cases = [(torch.ones(2, dtype=torch.int32), 2.5), (torch.ones(2, dtype=torch.bool), 3),
             (torch.ones(2, dtype=torch.float16), torch.tensor(1.0, dtype=torch.float64)),
             (torch.tensor(1, dtype=torch.int64), torch.ones(2, dtype=torch.int8)),
             (torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float16))]
    for a, b in cases:
        vars_ = [expr.Var("a", x.dtype, x.dim()) if isinstance(x, torch.Tensor) else x for x in (a, b)]
        assert expr.promote(vars_) == torch.result_type(a, b), (a, b)


def test_unsupported_op_says_why():
    x = randn(4, 4)
    group = make_group(lambda t: torch.cumsum(t, 0), x)
    with pytest.raises(Unsupported, match="cumsum"):
        build_pointwise(group, context())


def test_literals():
    assert expr.literal(float("inf"), torch.float32) == 'float("inf")'
    assert expr.literal(-math.inf, torch.float16) == '-float("inf")'
    assert expr.literal(2, torch.float32) == "2.0"
    assert expr.literal(True, torch.float32) == "1.0"
    assert expr.literal(0.1, torch.float64).startswith("tl.full([], 0.1, tl.float64")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_op_fused_on_gpu(dtype):
    """All table entries in one compiled kernel on CUDA (native bf16 conversion, libdevice erf)."""
    x = (randn(67, 45, seed=11).abs() + 0.1).to(dtype).cuda()
    y = randn(67, 45, seed=12).to(dtype).cuda()

    def every_op(a, b):
        outs = [fn(a) for fn, _ in UNARY.values()]
        return tuple(outs + [fn(a, b) for fn in BINARY.values()])

    group = make_group(every_op, x, y)
    kernel = build_pointwise(group, context())
    names = list(UNARY) + list(BINARY)
    failures = []
    for name, g, e in zip(names, kernel(x, y), group.reference(x, y)):
        try:
            torch.testing.assert_close(g, e, equal_nan=True, **TOL[dtype]) if e.dtype.is_floating_point \
                else torch.testing.assert_close(g, e, atol=0, rtol=0)
        except AssertionError as err:
            bad = ~torch.isclose(g.float(), e.float(), equal_nan=True, **TOL[dtype])
            failures.append(f"{name}: got {g[bad][:4].tolist()} expected {e[bad][:4].tolist()} "
                            f"for x={x[bad][:4].tolist()} y={y[bad][:4].tolist()}: {str(err).splitlines()[1]}")
    assert not failures, "\n".join(failures)


def test_backward_ops_in_fp64():
    """fp64 computes in fp64 (libdevice exp for exact GELU's pdf); the tanh helper's short
    series near 0 is sized for fp32, so the tanh form gets 1e-9."""
    g, x = randn(*SHAPE, dtype=torch.float64, seed=6), randn(*SHAPE, dtype=torch.float64, seed=7)
    for name, tol in (("gelu_backward", 1e-12), ("gelu_backward_tanh", 1e-9), ("silu_backward", 1e-12),
                      ("threshold_backward", 0.0)):
        group = make_group(BINARY[name], g, x)
        assert_matches(build_pointwise(group, context()), group, [g, x], tol=dict(rtol=tol, atol=tol))
