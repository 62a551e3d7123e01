"""Generated row-reduction kernels (compile_backend/kernels/reduction.py) against ATen.

CPU tensors under the Triton interpreter; odd shapes (1x1, 3x5x7, 37x129, rows longer than one
block through a looped config), fp32/fp16/bf16, reductions over the last dim and over other
dims, non-contiguous inputs, fused prologue/epilogue ops, multi-output layer norm.

Tolerances per dtype (``TOL_RED``): the kernel sums in a different order than ATen, so besides
the pointwise rounding tolerance (groups.TOL) fp32 results of sums over n elements may differ
by ~n * 2**-24 of the summed magnitudes: atol 1e-4 covers n <= 3000 of N(0,1) data; fp16/bf16
outputs are rounded once from fp32 (one ulp: 2**-10 / 2**-7 relative, atol for values near 0).
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from groups import DTYPES, assert_matches, context, fake_prop, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels.base import KernelContext, KernelGroup, Unsupported
from compile_backend.kernels.launch import ReductionConfig, reduction_heuristic
from compile_backend.kernels.reduction import build_reduction
from compile_backend.options import Options

aten = torch.ops.aten
TOL_RED = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
}
LOOPED = ReductionConfig(xblock=2, rblock=32, num_warps=4, persistent=False)


def check(fn, *inputs, config=None, dtype=torch.float32, tol=None):
    group = make_group(fn, *inputs, kind="reduction")
    kernel = build_reduction(group, context(), config)
    assert kernel.kind == "reduction" and kernel.impl == "triton"
    assert_matches(kernel, group, list(inputs), tol=tol or TOL_RED[dtype])
    return kernel


def softmax(x):
    return torch.softmax(x, -1)


def log_softmax(x):
    return torch.log_softmax(x, -1)


def layer_norm_residual(x, r, w, b):
    return torch.ops.aten.native_layer_norm(x + r, [x.shape[-1]], w, b, 1e-5)


def rms_norm(x, w):
    """The decomposed chain HF models trace to: pow -> mean -> add -> rsqrt -> mul -> mul."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * y.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7), (37, 129)], ids=str)
@pytest.mark.parametrize("looped", [False, True], ids=["persistent", "looped"])
def test_softmax_family(shape, dtype, looped):
    x = randn(*shape, dtype=dtype) * 3
    cfg = LOOPED if looped else None
    k = check(softmax, x, config=cfg, dtype=dtype)
    assert ("for roffset" in k.source) == looped
    check(log_softmax, x, config=cfg, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("looped", [False, True], ids=["persistent", "looped"])
def test_layer_norm_with_residual_three_outputs(dtype, looped):
    n, h = 19, 131
    x, r = randn(n, h, dtype=dtype, seed=1), randn(n, h, dtype=dtype, seed=2)
    w, b = randn(h, dtype=dtype, seed=3), randn(h, dtype=dtype, seed=4)
    k = check(layer_norm_residual, x, r, w, b, config=LOOPED if looped else None, dtype=dtype)
    assert k.source.count("tl.store(") == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_3d_no_affine_and_epilogue(dtype):
    x = randn(3, 5, 24, dtype=dtype) + 4.0  # offset mean: the two-pass variance keeps it exact
    check(lambda t: F.gelu(F.layer_norm(t, (24,))) * 2.0, x, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("looped", [False, True], ids=["persistent", "looped"])
def test_rms_norm_decomposed(dtype, looped):
    x, w = randn(13, 96, dtype=dtype), randn(96, dtype=dtype, seed=5)
    group = make_group(rms_norm, x, w, kind="reduction")
    assert "aten.mean" in group.ops and "aten.rsqrt" in group.ops
    check(rms_norm, x, w, config=LOOPED if looped else None, dtype=dtype)


REDUCTIONS = {
    "sum_last": lambda t: t.sum(-1), "mean_last_keep": lambda t: t.mean(-1, keepdim=True),
    "amax_last": lambda t: t.amax(-1), "amin_first": lambda t: t.amin(0),
    "var_last": lambda t: t.var(-1), "var_first_keep": lambda t: t.var(0, keepdim=True),
    "sum_mid": lambda t: t.sum(1), "mean_outer_two": lambda t: t.mean((0, 2)),
    "sum_all": lambda t: t.sum(), "std": lambda t: t.std(-1, correction=0),
    "var_mean": lambda t: torch.var_mean(t, -1), "logsumexp": lambda t: torch.logsumexp(t, 1),
    "softmax_mid": lambda t: torch.softmax(t, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reductions_over_any_dims(name, dtype):
    x = randn(6, 17, 9, dtype=dtype) + 0.5
    check(REDUCTIONS[name], x, dtype=dtype)
    check(REDUCTIONS[name], x, dtype=dtype, config=ReductionConfig(xblock=4, rblock=8, persistent=False))


def test_rows_longer_than_a_block_odd_large():
    x = randn(23, 1781)
    k = check(softmax, x, config=ReductionConfig(xblock=1, rblock=256, num_warps=4, persistent=False))
    assert "for roffset in range(0, 1781, RBLOCK)" in k.source
    check(lambda t: (t.sum(-1), t.amax(-1), t.var(-1)), x,
          config=ReductionConfig(xblock=2, rblock=512, persistent=False))


ONLINE = ReductionConfig(xblock=2, rblock=64, num_warps=4, persistent=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_looped_softmax_is_online(dtype):
    """A looped softmax finds the row max and the sum of exponentials in one pass (the sum
    rescaled whenever the max grows) and writes in a second: two loops over the row, not
    three. Odd row length over several chunks; the last pass reads the row for the last time."""
    x = randn(5, 301, dtype=dtype, seed=7) * 4
    x[:, 250:] += 6  # the max grows in a late chunk: earlier partial sums must be rescaled
    for fn in (softmax, log_softmax):
        k = check(fn, x, config=ONLINE, dtype=dtype)
        assert k.source.count("for roffset") == 2
        assert 'eviction_policy="evict_last"' in k.source and 'eviction_policy="evict_first"' in k.source
    k = check(lambda t: torch.logsumexp(t, -1), x, config=ONLINE, dtype=dtype)
    assert k.source.count("for roffset") == 1


@pytest.mark.parametrize("looped", [False, True], ids=["persistent", "looped"])
def test_softmax_family_infinities_and_nan_across_chunks(looped):
    """Rows whose running max starts at -inf, drops by 1000 after an all -inf prefix, meets
    +inf or NaN in a later chunk, or is all -inf: softmax, log_softmax and logsumexp equal
    torch's (NaN rows included), so the online rescaling never makes 0 * inf = NaN of its own."""
    inf = float("inf")
    x = randn(7, 40, seed=9)
    x[0, :16] = -inf
    x[0, 16:] -= 1000.0  # the reference point drops from 0 (all -inf so far) to about -1000
    x[1, 30] = inf
    x[2, :] = -inf
    x[3, 5] = float("nan")
    x[4, :8] += 80.0  # a large max early, then far smaller values
    x[5, 20:] += 80.0  # the max grows late: earlier partial sums rescale by about exp(-80)
    x[6, 33] = -inf
    fns = lambda t: (torch.softmax(t, -1), torch.log_softmax(t, -1), torch.logsumexp(t, -1))  # noqa: E731
    check(fns, x, config=ReductionConfig(xblock=2, rblock=8, persistent=False) if looped else None)


def test_row_longer_than_the_persistent_limit_runs_online():
    """The heuristic's own looped config on a row past the persistent limit (fp32, odd)."""
    x = randn(1, 40001, seed=3) * 3
    assert not reduction_heuristic(1, 40001, True).persistent
    k = check(softmax, x)
    assert not k.config["persistent"] and k.source.count("for roffset") == 2


def test_full_tiles_emit_no_masks():
    """Rows a multiple of RBLOCK and a row count a multiple of XBLOCK: no masks at all (they
    cost two selects per element in a softmax); a partial last row block masks rows only."""
    x = randn(8, 256, dtype=torch.float16)
    for cfg in (ReductionConfig(xblock=2, rblock=256), ReductionConfig(xblock=2, rblock=64, persistent=False)):
        k = check(softmax, x, config=cfg, dtype=torch.float16)
        assert "mask" not in k.source.split("def reduction_kernel")[1]
    k = check(softmax, randn(7, 256, dtype=torch.float16), config=ReductionConfig(xblock=2, rblock=256),
              dtype=torch.float16)
    body = k.source.split("def reduction_kernel")[1]
    assert "xmask" in body and "rmask" not in body


def test_large_odd_shape_persistent():
    x = randn(1823, 781, dtype=torch.float16)
    check(softmax, x, dtype=torch.float16, config=ReductionConfig(xblock=64, rblock=1024, persistent=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_broadcast_inputs(dtype):
    x = randn(40, 33, dtype=dtype).t()  # reduce along a strided dim
    bias = randn(40, dtype=dtype, seed=2)
    scale = randn(33, 1, dtype=dtype, seed=3)
    check(lambda t, b, s: torch.softmax((t + b) * s, -1), x, bias, scale, dtype=dtype)
    check(lambda t: t[:, ::2].sum(-1), randn(9, 30, dtype=dtype), dtype=dtype)


def test_epilogue_on_reduced_values_without_keepdim():
    x, b = randn(11, 20), randn(11)
    check(lambda t, c: (t.sum(-1) * 2 + c, t.mean(-1).unsqueeze(-1) * t), x, b)


def test_sum_dtype_and_integer_sum():
    x = randn(7, 15, dtype=torch.float16)
    check(lambda t: t.sum(-1, dtype=torch.float32), x, dtype=torch.float16)
    xi = torch.randint(-100, 100, (7, 15), dtype=torch.int32)
    group = make_group(lambda t: (t.sum(-1), t.amax(-1)), xi, kind="reduction")
    assert_matches(build_reduction(group, context()), group, [xi])


def test_nan_and_inf_propagate_like_torch():
    x = randn(6, 13)
    x[1, 3] = float("nan")
    x[2, :] = float("-inf")
    x[4, 5] = float("inf")
    check(lambda t: (t.amax(-1), t.amin(-1), t.sum(-1), torch.logsumexp(t, -1)), x)
    check(lambda t: (t.amax(-1), torch.logsumexp(t, -1)), x, config=LOOPED)


def test_scalar_input_in_prologue():
    graph = fx.Graph()
    x, s = graph.placeholder("x"), graph.placeholder("s")
    mul = graph.call_function(aten.mul.Tensor, (x, s))
    sm = graph.call_function(aten._softmax.default, (mul, -1, False))
    graph.output((sm,))
    gm = fx.GraphModule({}, graph)
    xv = randn(5, 21)
    fake_prop(gm, [xv, 0.7])
    group = KernelGroup("reduction", gm)
    kernel = build_reduction(group, context())
    assert_matches(kernel, group, [xv, 0.7], tol=TOL_RED[torch.float32])
    assert_matches(kernel, group, [xv, -2.0], tol=TOL_RED[torch.float32])


def test_unsupported_cases_say_why():
    x = randn(8, 9)
    with pytest.raises(Unsupported, match="no reduction"):
        build_reduction(make_group(lambda t: t + 1, x, kind="reduction"), context())
    with pytest.raises(Unsupported, match="different"):
        build_reduction(make_group(lambda t: (t.sum(0), t.sum(1)), x, kind="reduction"), context())
    with pytest.raises(Unsupported, match="rblock"):
        build_reduction(make_group(softmax, randn(3, 100), kind="reduction"), context(),
                        ReductionConfig(rblock=64, persistent=True))


def test_heuristic_and_config():
    assert reduction_heuristic(4096, 4096, True).persistent
    assert reduction_heuristic(4096, 4096, True).rblock == 4096
    assert not reduction_heuristic(8, 100000, True).persistent
    assert reduction_heuristic(8, 30000, True, row_inputs=1).persistent
    assert not reduction_heuristic(8, 30000, True, row_inputs=2).persistent
    col = reduction_heuristic(4096, 512, row_contiguous=False)
    assert col.xblock > 1
    with pytest.raises(ValueError):
        ReductionConfig(xblock=3)
    with pytest.raises(ValueError):
        ReductionConfig(xblock=1024, rblock=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_on_gpu(dtype):
    x, r = randn(67, 1500, dtype=dtype).cuda(), randn(67, 1500, dtype=dtype, seed=2).cuda()
    w, b = randn(1500, dtype=dtype, seed=3).cuda(), randn(1500, dtype=dtype, seed=4).cuda()
    for cfg in (None, ReductionConfig(xblock=1, rblock=256, persistent=False)):
        check(layer_norm_residual, x, r, w, b, config=cfg, dtype=dtype)
        check(lambda t: (torch.softmax(t, -1), t.amax(-1)), x, config=cfg, dtype=dtype)
        check(lambda t: t.var(0), x, config=cfg, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_chain_without_keepdim_then_full_rows(dtype):
    """A QAT weight's fake quantization in one kernel: per-row amax (no keepdim), the scale
    chain on the (N,) result with a fill, a view to (N, 1), then every element of the row."""
    w = randn(9, 37, dtype=dtype, seed=11)
    w[3] = 0  # an all-zero row: its scale is 0, guarded by the where

    def fn(w):
        amax = torch.ops.aten.amax(w.abs(), [1])
        scale = torch.where(amax > 0, amax / 7.0, torch.zeros_like(amax))
        s = scale.view(9, 1).clamp_min(1e-12)
        inv = torch.where(s > 1e-12, 1.0 / s, torch.zeros_like(s))
        return torch.round(w * inv).clamp(-7, 7) * s, s

    check(fn, w, dtype=dtype)
    check(fn, w, config=LOOPED, dtype=dtype)


# ------------------------------------------------------------------ split reductions (long rows)
def lsq_scale_gradient(dy, x, s):
    """The shape of QAT's LSQ scale gradient (quant/fake_quant.py): a pointwise chain over the
    whole activation summed to one value, then scaled: one row of every element."""
    v = x.float() / s
    inside = v.abs() <= 127
    q = torch.clamp(torch.round(v), -127, 127)
    return ((dy.float() * torch.where(inside, q - v, q)).sum() / 91.0).to(torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts", [2, 8])
def test_split_reduction_whole_tensor_sum(dtype, parts):
    """A whole-tensor sum cut in parts: odd size (the last part short), partials combined by
    the last program to arrive; the counters are left at 0, so the next launch works too."""
    dy, x = randn(37, 61, dtype=dtype), randn(37, 61, dtype=dtype, seed=2) * 60
    s = torch.tensor(0.5)
    cfg = ReductionConfig(xblock=1, rblock=16, num_warps=4, persistent=False, split=parts)
    k = check(lsq_scale_gradient, dy, x, s, config=cfg, dtype=torch.float16)
    assert k.config["split"] == parts and "split in" in k.source
    again = randn(37, 61, dtype=dtype, seed=5)
    group = make_group(lsq_scale_gradient, dy, x, s, kind="reduction")
    assert_matches(k, group, [again, x, s], tol=TOL_RED[torch.float16])


def test_split_reduction_parts_past_the_row_are_masked():
    """144 elements in 4 parts of rblock 16: each part is 48 long (3 blocks), so the row ends
    after 3 parts and the 4th has nothing to read. The chunk divides the row, yet the loads
    must keep their masks (ResNet-50's BatchNorm/QAT gradients read past their row on the
    H100 in session 13 and faulted)."""
    dy, x = randn(9, 16), randn(9, 16, seed=2) * 60
    s = torch.tensor(0.5)
    cfg = ReductionConfig(xblock=1, rblock=16, num_warps=4, persistent=False, split=4)
    k = check(lsq_scale_gradient, dy, x, s, config=cfg, dtype=torch.float16)
    assert "mask" in k.source.split("def reduction_kernel")[1].split("tl.atomic_add")[0]


def test_split_reduction_few_rows_several_reductions_and_nan():
    """Rows kept (a per-channel amax and sum over the rest), two reductions in one stage, a
    per-row epilogue, NaN in one row: the max propagates it as torch does."""
    x = randn(3, 5, 41)
    x[1, 2, 7] = float("nan")
    fn = lambda t: (t.amax((1, 2)), t.sum((1, 2)) * 0.5, t.abs().amin((1, 2), keepdim=True))  # noqa: E731
    for cfg in (ReductionConfig(xblock=1, rblock=8, persistent=False, split=4),
                ReductionConfig(xblock=2, rblock=32, persistent=False, split=2)):
        check(fn, x, config=cfg)


def test_split_only_where_one_stage_without_row_outputs():
    """A layer norm (mean, then the variance: two stages) or a softmax (row outputs) cannot
    run split: the builder says why instead of computing something else."""
    cfg = ReductionConfig(xblock=1, rblock=16, persistent=False, split=2)
    for fn in (softmax, lambda t: t.var(-1)):
        with pytest.raises(Unsupported, match="split"):
            build_reduction(make_group(fn, randn(4, 100), kind="reduction"), context(), cfg)
    with pytest.raises(ValueError, match="persistent"):
        ReductionConfig(rblock=64, persistent=True, split=2)


def test_split_heuristic():
    from compile_backend.kernels.launch import reduction_split

    assert reduction_split(1, 2048 * 3072, 8192, 132) == 256  # BERT FFN activation, one row
    assert reduction_split(1, 1 << 15, 8192, 132) == 1  # short: one program reads it quickly
    assert reduction_split(200, 1 << 20, 8192, 132) == 1  # the rows alone fill the GPU
    assert reduction_split(8, 1 << 20, 8192, 132) == 64  # two programs per SM in all


@pytest.mark.gpu
def test_gpu_whole_tensor_sum_runs_split():
    """On the GPU the heuristic splits a whole-tensor sum of a BERT FFN activation's size."""
    dy = randn(2048, 3072, dtype=torch.bfloat16).cuda()
    x = (randn(2048, 3072, dtype=torch.bfloat16, seed=2) * 60).cuda()
    s = torch.tensor(0.5, device="cuda")
    group = make_group(lsq_scale_gradient, dy, x, s, kind="reduction")
    ctx = KernelContext(options=Options(), device=torch.device("cuda"), interpret=False)
    kernel = build_reduction(group, ctx)
    assert kernel.config["split"] > 1, kernel.config
    for _ in range(3):  # the counters are reset by each launch
        assert_matches(kernel, group, [dy, x, s], tol=TOL_RED[torch.float16])
