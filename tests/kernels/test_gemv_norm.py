"""The fused decode GEMV's norm prologues (kernels/gemv_prologue.py, gemv.py; issue #20): an RMS
norm before the GEMV (Llama's: fp32 mean of squares), its row factor deferred to the GEMV's
sums; a norm whose square a previous GEMM's epilogue computed (a loaded row statistic); the
tensor-core loop with row values; row values that are no factor of x (added, squared, a mean
subtracted), computed by the row loop before the main loop. Groups, tolerances and helpers as
test_gemv.py's (tests/kernels/gemv_groups.py); a deferred factor skips eager's rounding of
h * rstd (and of the products after it) to x's dtype: about one rounding of the output more,
within the same bounds; in fp16 those products stay fp32 (unrounded: they may pass 65504), and
such kernels run the elementwise loops only."""
from __future__ import annotations

import pytest
import torch

import compile_backend
import compile_backend.ops  # noqa: F401 (registers compile_backend::weight_only_linear)
from gemv_groups import (Norm, assert_close, choose_gemv, count_launches, gemv_group,  # tests/kernels/gemv_groups.py
                         quantized_weights, rms_norm)


@pytest.mark.parametrize("m,split_k", [(1, 3), (4, 3), (2, 1)], ids=str)
@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_rms_norm_prologue(dtype, precision, group_size, m, split_k, monkeypatch):
    """The norm's row factor rsqrt(mean(h^2) + eps) is deferred: x_at computes w * h (in x's
    dtype; fp16's in fp32, unrounded: w * h could overflow fp16 where the normalised x does not),
    the main loop sums h^2 next to it, the factor multiplies the sums after the loop (K 70: a
    partial tile), with a bias; three K slices (each its share of the row's sum) or one."""
    k, n = 70, 33
    norm = Norm(k)
    codes, scales = quantized_weights(n, k, precision, group_size, seed=3)
    gen = torch.Generator().manual_seed(4)
    h = (4 * torch.randn(1, m, k, generator=gen)).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    w = norm.weight.detach()

    def fn(h, c, s, b, w):
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.eps)
        x = w.to(h.dtype) * h32.to(h.dtype)
        return torch.ops.compile_backend.weight_only_linear(x, c, s, b, precision, group_size)

    inputs = (h, codes, scales, bias, w)
    group = gemv_group(fn, inputs)
    kernel = choose_gemv(group, inputs, monkeypatch, split_k=split_k)
    assert kernel.fn.plan.row_values and kernel.fn.plan.deferred
    assert kernel.fn.plan.unrounded_x == (dtype == torch.float16) and not kernel.config["tensor_cores"]
    runs = count_launches(monkeypatch)
    assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])
    assert runs == ["gemv"]


def test_norm_of_a_square_computed_elsewhere(monkeypatch):
    """The square is an input (the previous GEMM's epilogue stored it): the row loop loads it;
    the mean is kept 2-D without keepdim and broadcast back through an unsqueeze."""
    m, k, n = 2, 37, 33
    codes, scales = quantized_weights(n, k, "int4", 32, seed=5)
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(m, k, generator=gen)
    sq = h * h

    def fn(h, sq, c, s):
        x = h * torch.rsqrt(sq.mean(-1) + 1e-5).unsqueeze(-1)
        return torch.ops.compile_backend.weight_only_linear(x, c, s, None, "int4", 32)

    inputs = (h, sq, codes, scales)
    group = gemv_group(fn, inputs)
    kernel = choose_gemv(group, inputs, monkeypatch, split_k=3)
    assert kernel.fn.plan.deferred  # the loaded square summed by the main loop
    assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [70, 69], ids=["even_k", "odd_k"])
def test_int4_tensor_core_loop_with_row_values(dtype, k, monkeypatch):
    """INT4 on the tensor cores with one row a program (an RMS norm's row values before the
    GEMV): x is read along K in one piece and split into the even and odd k its nibbles meet;
    an odd K masks the packed bytes at (K + 1) // 2, an even one at K // 2 (the bound whose
    divisibility lets the codes load 8 bytes at a time). fp16's deferred norm is unrounded: its
    tensor-core configs are left out, and the elementwise loop runs."""
    from compile_backend.kernels import weight_only
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.select import choose_kernel

    n = 33
    codes, scales = quantized_weights(n, k, "int4", 32, seed=41)
    gen = torch.Generator().manual_seed(42)
    monkeypatch.setattr(weight_only, "heuristic", lambda m: weight_only.WeightOnlyConfig(
        "gemv", 1, 16, 32, split_k=2, tensor_cores=True))
    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cpu"), interpret=True)

    def normed(h, c, s):
        h32 = h.float()
        x = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype)
        return torch.ops.compile_backend.weight_only_linear(x, c, s, None, "int4", 32)

    inputs = (torch.randn(2, k, generator=gen).to(dtype), codes, scales)
    group = gemv_group(normed, inputs)
    kernel, fallbacks = choose_kernel(group, inputs, ctx)
    assert (kernel.impl, fallbacks, kernel.config.get("fused")) == ("triton", [], True)
    assert kernel.fn.plan.row_values is True and kernel.fn.plan.deferred
    assert kernel.config["tensor_cores"] == (dtype == torch.bfloat16)
    assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])




def test_llama_norm_plan_defers_one_factor():
    """The plan of Llama's norm: x_at computes w * h without the factor (no row lines or row
    arguments), the row sum's input is h^2, the factor lines end in the rsqrt; the prologue
    refuses a row loop and a deferred factor at once, or row sums without a factor."""
    from compile_backend.kernels.gemv_prologue import XPrologue, plan_x

    m, k = 2, 70
    codes, scales = quantized_weights(33, k, "int4", 32, seed=44)
    inputs = (torch.randn(m, k).bfloat16(), codes, scales, torch.linspace(0.5, 1.5, k))
    group = gemv_group(lambda h, c, s, w: torch.ops.compile_backend.weight_only_linear(
        rms_norm(h, w), c, s, None, "int4", 32), inputs)
    anchor = next(n for n in group.gm.graph.nodes if n.name == group.anchor)
    x, loads, _ = plan_x(group, anchor, anchor.args[0], m, k)
    assert x.deferred and x.row_values and not x.row_lines and not x.row_args and len(loads) == 2
    assert "rsqrt" in x.factor_lines[-1] and x.factor_lines[-1].startswith(x.factor)
    assert not any("rsqrt" in line for line in x.lines + x.row_input_lines)
    with pytest.raises(ValueError):
        XPrologue(x.loads, x.lines, x.value, row_lines=("v = 1.0",), row_input_lines=x.row_input_lines,
                  row_input=x.row_input, factor_lines=x.factor_lines, factor=x.factor)
    with pytest.raises(ValueError):
        XPrologue(x.loads, x.lines, x.value, row_input_lines=x.row_input_lines, row_input=x.row_input)


#: (weights, INT4 group size, the config's loop) per dtype: bf16 on every loop; fp16's deferred
#: norm is unrounded, so its tensor-core configs are left out (the elementwise loops only)
_LOOPS = {torch.bfloat16: (("int4", 64, dict(unroll=2)), ("int4", 64, dict(unroll=2, tensor_cores=True)),
                           ("int8", None, dict(tensor_cores=True)), ("float", None, dict(tensor_cores=True))),
          torch.float16: (("int4", 64, dict(unroll=2)), ("int8", None, dict(unroll=2)), ("float", None, {}))}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_deferred_norm_in_the_one_load_and_tensor_core_loops(dtype, monkeypatch):
    """The deferred factor's row sum next to each main loop's x: INT4 as 16-bit words,
    elementwise and on the tensor cores (a step's tiles in one load, the first step peeled off
    the loop), INT8 and float weights on the tensor cores; K 200 (a multiple of 4 for the words,
    a short last INT4 group, a partial last step), two slices, two rows. fp16 (x unrounded): the
    elementwise loops; a tensor-core config is no candidate, and a launch asked for one refuses
    (x could pass fp16's range there)."""
    from compile_backend.kernels import weight_only
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.select import choose_kernel

    m, k, n = 2, 200, 33
    gen = torch.Generator().manual_seed(45)
    h = (4 * torch.randn(m, k, generator=gen)).to(dtype)
    nw = torch.linspace(0.5, 1.5, k)
    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cpu"), interpret=True)
    for weights, group_size, loop in _LOOPS[dtype]:
        monkeypatch.setattr(weight_only, "heuristic", lambda m, loop=loop: weight_only.WeightOnlyConfig(
            "gemv", 1, 16, 64, split_k=2, **loop))
        if weights == "float":
            inputs, op = (h, (torch.randn(n, k, generator=gen) * 0.1).to(dtype), nw), "aten.mm"

            def fn(h, w, nw):
                return rms_norm(h, nw) @ w.t()
        else:
            inputs, op = (h, *quantized_weights(n, k, weights, group_size, seed=46), nw), "weight_only_linear"

            def fn(h, c, s, nw, weights=weights, group_size=group_size):
                return torch.ops.compile_backend.weight_only_linear(rms_norm(h, nw), c, s, None, weights, group_size)
        group = gemv_group(fn, inputs, anchor_op=op)
        kernel, fallbacks = choose_kernel(group, inputs, ctx)
        assert (kernel.impl, fallbacks, kernel.config.get("fused")) == ("triton", [], True)
        assert kernel.fn.plan.deferred and kernel.config["tensor_cores"] == loop.get("tensor_cores", False)
        assert kernel.fn.plan.unrounded_x == (dtype == torch.float16)
        assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])
    if dtype == torch.float16:
        tc = weight_only.WeightOnlyConfig("gemv", 1, 64, 128, tensor_cores=True)
        assert not kernel.fn.plan.runs(tc)
        monkeypatch.setattr(kernel.fn, "cfg", tc)
        with pytest.raises(ValueError, match="tensor-core config"):
            kernel(*inputs)


def _rstd(h32):
    return torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)


def _added(h32):
    return h32 + _rstd(h32)


def _squared(h32):
    r = _rstd(h32)
    return h32 * r * r


def _centred(h32):
    return h32 - h32.mean(-1, keepdim=True)


def _layer_norm(h32):
    c = _centred(h32)
    return c * _rstd(c)


@pytest.mark.parametrize("form", [_added, _squared, _centred, _layer_norm], ids=lambda f: f.__name__.strip("_"))
def test_row_values_that_are_no_factor_of_x_keep_the_row_loop(form, monkeypatch):
    """Row values added to x, read twice (squared), or a mean subtracted (LayerNorm's centring)
    are no single factor of x: they stay loops over the row before the main loop (here in steps
    of 32 of K 70), read by x_at, and the kernel equals its reference."""
    from compile_backend.kernels import gemv

    monkeypatch.setattr(gemv, "ROW_BLOCK_MAX", 32)
    m, k, n = 3, 70, 33
    codes, scales = quantized_weights(n, k, "int4", 32, seed=47)
    h = (4 * torch.randn(m, k, generator=torch.Generator().manual_seed(48))).half()

    def fn(h, c, s):
        return torch.ops.compile_backend.weight_only_linear(form(h.float()).to(h.dtype), c, s, None, "int4", 32)

    inputs = (h, codes, scales)
    group = gemv_group(fn, inputs)
    kernel = choose_gemv(group, inputs, monkeypatch, split_k=3)
    assert kernel.fn.plan.row_values and not kernel.fn.plan.deferred
    assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])


def test_deferred_norm_split_k_is_reproducible_and_near_the_row_loop(monkeypatch):
    """Three K slices each store their share of the row's sum of squares after their partial
    sums; the tile's last program adds them in slice order: two launches give the same bits
    (and leave the counters at 0). The row loop (deferral turned off) computes the same
    function: the two agree within the validation bound."""
    from compile_backend.kernels import gemv_prologue

    m, k, n = 3, 70, 33
    codes, scales = quantized_weights(n, k, "int8", None, seed=49)
    gen = torch.Generator().manual_seed(50)
    inputs = ((4 * torch.randn(m, k, generator=gen)).bfloat16(), codes, scales, torch.linspace(0.5, 1.5, k))

    def fn(h, c, s, w):
        return torch.ops.compile_backend.weight_only_linear(rms_norm(h, w), c, s, None, "int8", None)

    kernel = choose_gemv(gemv_group(fn, inputs), inputs, monkeypatch, split_k=3)
    assert kernel.fn.plan.deferred
    first = kernel(*inputs)[0]
    (counts,) = kernel.fn.counters.buffers.values()
    assert torch.equal(kernel(*inputs)[0], first) and not counts.any()
    monkeypatch.setattr(gemv_prologue._Writer, "_deferred_factor", lambda self, operands: None)
    row_loop = choose_gemv(gemv_group(fn, inputs), inputs, monkeypatch, split_k=3)
    assert not row_loop.fn.plan.deferred
    assert_close(first, row_loop(*inputs)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_norm_whose_unnormalised_input_overflows_fp16_stays_finite(dtype, monkeypatch):
    """An outlier of the residual stream (6000) times a norm weight of 20 is 120000: past fp16's
    65504, while eager's normalised x (~170) is not. Deferred in both: fp16's w * h in fp32, not
    rounded (rounded, it would be inf and the output with it); bf16's range takes it. Both
    match eager."""
    m, k, n = 1, 70, 33
    codes, scales = quantized_weights(n, k, "int8", None, seed=51)
    gen = torch.Generator().manual_seed(52)
    h = torch.randn(m, k, generator=gen)
    h[0, 5] = 6000.0
    w = torch.linspace(0.5, 1.5, k)
    w[5] = 20.0
    inputs = (h.to(dtype), codes, scales, w)

    def fn(h, c, s, w):
        return torch.ops.compile_backend.weight_only_linear(rms_norm(h, w), c, s, None, "int8", None)

    group = gemv_group(fn, inputs)
    kernel = choose_gemv(group, inputs, monkeypatch, split_k=3)
    assert kernel.fn.plan.deferred and kernel.fn.plan.unrounded_x == (dtype == torch.float16)
    got, want = kernel(*inputs)[0], group.reference(*inputs)[0]
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    assert_close(got, want)

