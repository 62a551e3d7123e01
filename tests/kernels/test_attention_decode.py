"""Flash-decoding (kernels/attention_decode.py): a few query rows per (batch, kv head) against the
plain-PyTorch reference (``attention.attention_reference``), under the interpreter.

Odd shapes: Sk 77 (a partial key block), head dims 40 / 24 (padded lanes), grouped-query heads
(8 query heads on 2 K/V heads) and plain multi-head, Sq 1 and 3; masks none, bool (a padding
mask whose empty tail skips whole blocks), additive with -inf, causal; a fully masked row
(zeros, or NaN with ``dead_rows_nan``); key ranges merged from 3 splits and 1, and 22 (in chunks); the INT8 / FP8
output quantize. Tolerances per dtype as the flash kernel's tests: the same math in another
order of fp32 sums (and tf32 for fp32 where allowed: not here).
"""
from __future__ import annotations

import pytest
import torch

from compile_backend.kernels import quant_ref
from compile_backend.kernels.attention import attention_reference
from compile_backend.kernels.attention_config import DecodeConfig, decode_applies
from compile_backend.kernels.attention_decode import DecodeRunner

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _layout(q, v, dtype):
    shape = (*q.shape[:3], v.shape[3])
    return shape, torch.empty(shape).stride(), dtype


def _inputs(b, h, kvh, sq, sk, d, dv, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen).to(dtype)
    k = torch.randn(b, kvh, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, kvh, sk, dv, generator=gen).to(dtype)
    return q, k, v


def _run(q, k, v, mask=None, causal=False, splits=3, dead_rows_nan=False, quant=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    runner = DecodeRunner(DecodeConfig(block_n=16, splits=splits), scale, causal, dead_rows_nan, quant,
                          allow_tf32=False)
    dtype = q.dtype if quant is None else quant_ref.STORAGE[quant[0]]
    return runner(q, k, v, mask, _layout(q, v, dtype))


def _expect(q, k, v, mask=None, causal=False, dead_rows_nan=False):
    kv_group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(kv_group, 1), v.repeat_interleave(kv_group, 1)
    return attention_reference(q, kk, vv, mask, None, causal, dead_rows_nan)


def _close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.isnan(), want.isnan())
    tol = TOL[want.dtype] * max(1.0, want.float().nan_to_num().abs().max().item())
    assert (got.float() - want.float()).nan_to_num().abs().max().item() <= tol


@pytest.mark.parametrize("splits", [3, 1])
@pytest.mark.parametrize("heads,kv_heads,sq", [(8, 2, 1), (8, 2, 3), (3, 3, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_masks_and_shapes(dtype, heads, kv_heads, sq, splits):
    q, k, v = _inputs(2, heads, kv_heads, sq, 77, 40, 24, dtype, seed=1)
    pos = torch.tensor([30, 76])
    keep = (torch.arange(77)[None, :] <= pos[:, None])[:, None, None, :]  # a static cache's valid slots
    additive = torch.zeros(2, 1, sq, 77, dtype=dtype).masked_fill(torch.rand(2, 1, sq, 77) < 0.3, float("-inf"))
    for mask in (None, keep, additive):
        _close(_run(q, k, v, mask, splits=splits), _expect(q, k, v, mask))
    _close(_run(q, k, v, None, causal=True, splits=splits), _expect(q, k, v, None, causal=True))


@pytest.mark.parametrize("dead_rows_nan", [False, True])
def test_fully_masked_rows(dead_rows_nan):
    q, k, v = _inputs(2, 4, 2, 1, 50, 32, 32, torch.float16, seed=2)
    keep = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    keep[1] = False  # every key of the second batch row masked out
    got = _run(q, k, v, keep, dead_rows_nan=dead_rows_nan)
    _close(got, _expect(q, k, v, keep, dead_rows_nan=dead_rows_nan))
    assert (got[1].isnan().all() if dead_rows_nan else (got[1] == 0).all())


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_output(precision):
    q, k, v = _inputs(1, 8, 2, 1, 70, 64, 64, torch.float16, seed=3)
    inv_scale = 60.0
    got = _run(q, k, v, quant=(precision, inv_scale))
    ref = _expect(q, k, v)
    want = quant_ref.quantize_steps(quant_ref.eager, ref, ref.dtype, inv_scale, precision)
    assert got.dtype == want.dtype
    diff = (got.float() - want.float()).abs()
    step = 1.0 if precision == "int8" else want.float().abs().max().item() * 2.0**-3
    assert diff.max().item() <= step  # at most one step where the rounding boundary is close


def test_many_ranges_merge_in_chunks_in_range_order():
    """More ranges than the merge reads at once (MERGE_UNROLL 16): 22 ranges of 16 keys, merged as
    a chunk of 16 and one of 6 (the tail masked), with an empty tail of the cache; the sum in
    range order, so one range less in a chunk changes nothing but the order-free max."""
    from compile_backend.kernels.attention_decode import MERGE_UNROLL, splits_for

    q, k, v = _inputs(1, 8, 2, 1, 350, 32, 32, torch.float16, seed=5)
    assert splits_for(2, 350, DecodeConfig(block_n=16, splits=22), q.device)[0] == 22 > MERGE_UNROLL
    keep = (torch.arange(350) < 300)[None, None, None, :]
    for mask in (None, keep):
        _close(_run(q, k, v, mask, splits=22), _expect(q, k, v, mask))


def test_split_counters_are_reused_and_left_at_zero():
    q, k, v = _inputs(1, 8, 2, 1, 77, 32, 32, torch.float16, seed=4)
    runner = DecodeRunner(DecodeConfig(block_n=16, splits=4), 32 ** -0.5, False, False, None, allow_tf32=False)
    first = runner(q, k, v, None, _layout(q, v, q.dtype))
    (counts,) = runner.counters.buffers.values()
    assert not counts.any()
    assert torch.equal(runner(q, k, v, None, _layout(q, v, q.dtype)), first) and not counts.any()


def test_applies_to_decode_shapes_only():
    assert decode_applies(1, 32, 4) and decode_applies(4, 8, 8) and not decode_applies(16, 32, 4)
    assert not decode_applies(2, 64, 1)  # 128 rows would not fit one tile


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [0, 16])
def test_gpu_decode_step_shape(splits):
    """Compiled on the GPU at the base decoder's decode step: 32 query heads on 4 K/V heads, a
    static cache of 2048 slots of which 512 are valid (the rest skipped block by block), fp16;
    split over the GPU (auto) and in 16 ranges; twice (the counters reset)."""
    q, k, v = (t.cuda() for t in _inputs(1, 32, 4, 1, 2048, 64, 64, torch.float16, seed=5))
    keep = (torch.arange(2048, device="cuda") <= 511)[None, None, None, :]
    runner = DecodeRunner(DecodeConfig(splits=splits), 0.125, False, False, None, allow_tf32=True)
    want = _expect(q, k, v, keep)
    for _ in range(2):
        _close(runner(q, k, v, keep, _layout(q, v, q.dtype)), want)


@pytest.mark.parametrize("d", [256, 200], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_wide_heads(dtype, d):
    """Gemma's and Gemma 2's head dim 256 (and a padded 200): only the decode kernel takes heads
    wider than 128; grouped-query, a static cache's mask, 3 key ranges."""
    q, k, v = _inputs(1, 4, 2, 1, 45, d, d, dtype, seed=5)
    keep = (torch.arange(45) <= 39)[None, None, None, :]
    _close(_run(q, k, v, keep), _expect(q, k, v, keep))


def test_wide_heads_are_the_decode_kernels_alone():
    """The builder takes head dim 256 for a decode step (its kernel), and says why for a prefill."""
    import compile_backend
    from compile_backend.kernels.attention import build_attention
    from compile_backend.kernels.base import KernelContext, KernelGroup, Unsupported
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    import compile_backend.ops  # noqa: F401  (registers compile_backend::attention)

    def group(sq):
        q, k, v = _inputs(1, 4, 2, sq, 45, 256, 256, torch.float16, seed=6)
        gm = make_fx(lambda q, k, v: (torch.ops.compile_backend.attention(q, k, v, None, 0.0625, False),))(q, k, v)
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(q, k, v)
        return KernelGroup("attention", gm), (q, k, v)

    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cpu"), interpret=True)
    g, inputs = group(1)
    kernel = build_attention(g, ctx)
    assert kernel.config.get("decode") is True
    _close(kernel(*inputs)[0], g.reference(*inputs)[0])
    with pytest.raises(Unsupported, match="up to 256 for a decode step only"):
        build_attention(group(64)[0], ctx)
