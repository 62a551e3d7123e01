"""Flash-attention forward (compile_backend/kernels/attention.py) against the fp32 reference.

CPU tests run the Triton kernel under TRITON_INTERPRET=1 (tests/conftest.py sets it), on odd
sequence lengths (1, 17, 67, 130: never a multiple of a block) so that every tail mask runs.

Tolerances, both must hold (reference computed in fp32 from the same rounded inputs):
  relative error ||out - ref|| / ||ref||: fp32 1e-5 (the interpreter's dots are exact fp32),
      fp16 2e-3 (output and P are rounded to fp16: ~5e-4 each), bf16 1e-2 (the same with 8
      mantissa bits: ~4e-3 each; the interpreter truncates fp32->bf16 instead of rounding)
  elementwise (rtol = atol), catches a single wrong or unwritten element: the helpers'
      per-dtype tolerances, fp32 1e-4, fp16 1e-2, bf16 5e-2.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx

import compile_backend.ops  # noqa: F401  (registers torch.ops.compile_backend.attention)
from compile_backend.kernels.attention import (
    AttentionConfig,
    attention_reference,
    build_attention,
    candidate_configs,
    default_config,
    flash_attention,
)
from compile_backend.kernels.base import KernelContext, KernelGroup, Unsupported
from compile_backend.kernels.select import check_outputs
from compile_backend.options import Options
from helpers import TOLERANCES

NORM_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_BLOCKS = AttentionConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
TALL_BLOCKS = AttentionConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
B, H = 2, 3


def _qkv(sq, sk, d, dtype, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, sq, d, generator=g).to(dtype)
    k = torch.randn(B, H, sk, d, generator=g).to(dtype)
    v = torch.randn(B, H, sk, dv or d, generator=g).to(dtype)
    return q, k, v


def _reference(q, k, v, mask, scale, causal):
    """fp32 reference on the same (already rounded) inputs; an additive mask is rounded to
    q's dtype first, as the fused op does."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype).float()
    return attention_reference(q.float(), k.float(), v.float(), mask, scale, causal)


def _assert_matches(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert not out.isnan().any()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err <= NORM_RTOL[dtype], f"relative error {err:.2e} > {NORM_RTOL[dtype]:.0e}"
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)


def _padding_mask(sk, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, 1, sk, generator=g) > 0.3
    keep[..., 0] = True  # at least one visible key per row: no fully masked rows here
    return keep


# (sq, sk, d, causal, mask kind, config): each case covers tails of q, k and the head dim
CASES = {
    "s17-d32-plain": (17, 17, 32, False, None, SMALL_BLOCKS),
    "s67x130-d80-causal-padding": (67, 130, 80, True, "padding", TALL_BLOCKS),
    "s130x67-d64-additive2d": (130, 67, 64, False, "additive2d", SMALL_BLOCKS),
    "s1x17-d64-decode": (1, 17, 64, False, "padding", None),
    "s67-d32-causal-additive4d": (67, 67, 32, True, "additive4d", None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    sq, sk, d, causal, mask_kind, config = CASES[case]
    q, k, v = _qkv(sq, sk, d, dtype)
    mask = None
    if mask_kind == "padding":
        mask = _padding_mask(sk)
    elif mask_kind == "additive2d":
        mask = torch.randn(sq, sk).to(dtype)
    elif mask_kind == "additive4d":
        mask = torch.randn(B, H, sq, sk).to(dtype)
    out = flash_attention(q, k, v, mask, None, causal, config, allow_tf32=False)
    _assert_matches(out, _reference(q, k, v, mask, None, causal), dtype)


def test_reference_is_the_fused_op():
    """attention_reference computes what compile_backend::attention (SDPA) computes."""
    q, k, v = _qkv(17, 23, 16, torch.float32)
    for mask, causal in ((None, True), (_padding_mask(23), True), (torch.randn(17, 23), False)):
        ref = attention_reference(q, k, v, mask, 0.3, causal)
        op = torch.ops.compile_backend.attention(q, k, v, mask, 0.3, causal)
        torch.testing.assert_close(ref, op, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_fully_masked_rows_give_zeros_like_sdpa(mask_kind):
    """Rows with no visible key return 0, as SDPA does on CPU (safe softmax), not NaN."""
    dtype = torch.float16
    q, k, v = _qkv(17, 33, 32, dtype)
    keep = torch.rand(B, H, 17, 33, generator=torch.Generator().manual_seed(3)) > 0.5
    keep[:, :, 4] = False  # row 4 sees nothing in every head
    keep[1, 2, 16] = False  # the last (tail) row of one head
    if mask_kind == "bool":
        mask = keep
    else:
        mask = torch.zeros(B, H, 17, 33, dtype=dtype).masked_fill(~keep, float("-inf"))
    out = flash_attention(q, k, v, mask, None, False, SMALL_BLOCKS)
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    assert torch.equal(out[1, 2, 16], torch.zeros_like(out[1, 2, 16]))
    _assert_matches(out, _reference(q, k, v, mask, None, False), dtype)
    sdpa = torch.ops.compile_backend.attention(q, k, v, mask, 1 / math.sqrt(32), False)
    assert torch.equal(sdpa.isnan(), out.isnan())
    _assert_matches(out, sdpa.float(), dtype)


def test_strided_inputs_value_dim_scale_and_fp32_mask():
    """q/k/v as transposed views of [B, S, H, D], Dv != D (48 pads to 64), a custom scale,
    an fp32 additive mask broadcast over batch and heads with fp16 q: the fused op rounds it to
    fp16 first; around 1000 that moves scores by up to 0.25, far beyond the tolerance, while
    the common offset itself cancels in the softmax."""
    dtype = torch.float16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, 19, H, 40, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, 37, H, 40, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, 37, H, 48, generator=g).to(dtype).transpose(1, 2)
    mask = 1000 + torch.randn(19, 37, generator=g) * 3
    out = flash_attention(q, k, v, mask, 0.21, True, TALL_BLOCKS)
    assert out.shape == (B, H, 19, 48)
    _assert_matches(out, _reference(q, k, v, mask, 0.21, True), dtype)


def test_negative_scale_with_bool_mask():
    """scale <= 0 cannot move the scale into exp2 (it would flip the row max): general path."""
    q, k, v = _qkv(33, 40, 32, torch.float16)
    mask = _padding_mask(40)
    out = flash_attention(q, k, v, mask, -0.2, False, SMALL_BLOCKS)
    _assert_matches(out, _reference(q, k, v, mask, -0.2, False), torch.float16)


def test_causal_with_more_queries_than_keys():
    """Top-left causal with Sq > Sk: rows past Sk see every key."""
    q, k, v = _qkv(40, 9, 32, torch.float16)
    out = flash_attention(q, k, v, None, None, True, SMALL_BLOCKS)
    _assert_matches(out, _reference(q, k, v, None, None, True), torch.float16)


TMA_BLOCKS = AttentionConfig(block_m=16, block_n=32, num_warps=4, num_stages=2, tma=True)


@pytest.fixture
def count_descriptors(monkeypatch):
    """Counts the TMA descriptors the launcher makes (so a test knows which path ran)."""
    import triton.tools.tensor_descriptor as td

    made = []

    class Counting(td.TensorDescriptor):
        def __init__(self, *args, **kwargs):
            made.append(args[0].shape)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(td, "TensorDescriptor", Counting)
    return made


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["s67x130-d80-causal-padding", "s130x67-d64-additive2d"])
def test_tma_loads_match_reference(case, dtype, count_descriptors):
    """K/V through TMA descriptors: keys past Sk and head-dim lanes past D (80 -> 128) read as
    zeros from the descriptor's bounds instead of masks; transposed [B, S, H, D] views too."""
    sq, sk, d, causal, mask_kind, _ = CASES[case]
    q, k, v = _qkv(sq, sk, d, dtype)
    if case.startswith("s67"):  # K and V as transposed views of [B, S, H, D]
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    mask = _padding_mask(sk) if mask_kind == "padding" else torch.randn(sq, sk).to(dtype)
    out = flash_attention(q, k, v, mask, None, causal, TMA_BLOCKS)
    assert len(count_descriptors) == 2
    _assert_matches(out, _reference(q, k, v, mask, None, causal), dtype)


def test_tma_falls_back_to_plain_loads_where_the_layout_does_not_allow_it(count_descriptors):
    """Rows of 33 fp16 (66 bytes, not a multiple of 16), fp32, a K broadcast over heads
    (stride 0): plain loads, same results."""
    cases = [(_qkv(17, 19, 33, torch.float16), torch.float16), (_qkv(17, 19, 32, torch.float32), torch.float32)]
    q, k, v = _qkv(17, 19, 32, torch.float16)
    cases.append(((q, k[:, :1].expand_as(k), v), torch.float16))
    for (q, k, v), dtype in cases:
        out = flash_attention(q, k, v, None, None, True, TMA_BLOCKS, allow_tf32=False)
        _assert_matches(out, _reference(q, k, v, None, None, True), dtype)
    assert count_descriptors == []


def test_launcher_rejects_bad_inputs():
    q, k, v = _qkv(5, 7, 32, torch.float16)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(*_qkv(5, 7, 256, torch.float16))
    with pytest.raises(ValueError, match="does not broadcast"):
        flash_attention(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool))


def test_config_validation_and_defaults():
    with pytest.raises(ValueError, match="block_m"):
        AttentionConfig(block_m=48)
    with pytest.raises(ValueError, match="num_warps"):
        AttentionConfig(num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        AttentionConfig(num_stages=0)
    assert default_config(64, 64, 1, 17, torch.float16).block_m == 16  # decode: no dead rows
    assert default_config(64, 64, 512, 512, torch.float16) == AttentionConfig(64, 64, 4, 3)
    assert default_config(64, 64, 2048, 2048, torch.float16) == AttentionConfig(128, 64, 4, 3)
    assert default_config(64, 64, 2048, 2048, torch.float16, causal=True) == AttentionConfig(64, 64, 4, 3)
    assert default_config(128, 128, 2048, 2048, torch.bfloat16) == AttentionConfig(64, 64, 4, 3)
    assert default_config(64, 64, 512, 512, torch.float32) == AttentionConfig(128, 32, 8, 2)
    space = candidate_configs(64, 64, 512, 512, torch.float16, causal=True)
    assert space[0] == default_config(64, 64, 512, 512, torch.float16, causal=True)
    assert len(space) == len(set(space)) > 10
    assert any(c.tma for c in space) and not any(c.tma for c in candidate_configs(64, 64, 512, 512, torch.float32))
    assert candidate_configs(64, 64, 1, 17, torch.float16) == [default_config(64, 64, 1, 17, torch.float16)]
    with pytest.raises(ValueError, match="tma"):
        AttentionConfig(tma=1)


# ----------------------------------------------------------------------------------------------
# builder
# ----------------------------------------------------------------------------------------------


def _attention_group(shapes, dtype, mask=None, scale=0.125, causal=False, as_kwargs=False, extra_op=False,
                     out_perm=None, quant=None):
    graph = fx.Graph()
    nodes = []
    for name, shape in zip("qkv", shapes):
        node = graph.placeholder(name)
        node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        nodes.append(node)
    mask_node = None
    if mask is not None:
        mask_node = graph.placeholder("mask")
        mask_node.meta["val"] = torch.empty(mask.shape, dtype=mask.dtype, device="meta")
    op = torch.ops.compile_backend.attention.default
    if as_kwargs:
        att = graph.call_function(op, tuple(nodes), {"mask": mask_node, "scale": scale, "causal": causal})
    elif out_perm is not None or quant is not None:
        att = graph.call_function(op, (*nodes, mask_node, scale, causal, False, out_perm, *(quant or ())))
    else:
        att = graph.call_function(op, (*nodes, mask_node, scale, causal))
    b, h, sq, _ = shapes[0]
    out_dtype = dtype if quant is None else {"int8": torch.int8, "int4": torch.int8, "fp8": torch.float8_e4m3fn}[quant[0]]
    att.meta["val"] = torch.empty((b, h, sq, shapes[2][-1]), dtype=out_dtype, device="meta")
    if out_perm is not None:
        att.meta["val"] = att.meta["val"].permute(out_perm).contiguous().permute(
            [out_perm.index(d) for d in range(4)])
    result = att
    if extra_op:
        result = graph.call_function(torch.ops.aten.relu.default, (att,))
        result.meta["val"] = att.meta["val"]
    graph.output((result,))
    return KernelGroup("attention", fx.GraphModule(torch.nn.Module(), graph), anchor=att.name)


def _ctx(precision="fp32"):
    return KernelContext(options=Options(precision=precision), device=torch.device("cpu"), interpret=True)


@pytest.mark.parametrize("as_kwargs", [False, True])
def test_builder_kernel_matches_group_reference(as_kwargs):
    dtype = torch.float16
    q, k, v = _qkv(30, 45, 64, dtype)
    mask = _padding_mask(45)
    group = _attention_group([q.shape, k.shape, v.shape], dtype, mask, 0.125, True, as_kwargs)
    kernel = build_attention(group, _ctx())
    assert kernel.kind == "attention" and kernel.impl == "triton"
    assert AttentionConfig(**kernel.config) == default_config(64, 64, 30, 45, dtype, causal=True)
    assert check_outputs(kernel, (q, k, v, mask), group.reference(q, k, v, mask)) is None
    (out,) = kernel(q, k, v, mask)
    _assert_matches(out, _reference(q, k, v, mask, 0.125, True), dtype)


def test_builder_without_mask_and_explicit_config():
    dtype = torch.bfloat16
    q, k, v = _qkv(17, 17, 32, dtype)
    group = _attention_group([q.shape, k.shape, v.shape], dtype)
    kernel = build_attention(group, _ctx(), config=SMALL_BLOCKS)
    assert kernel.config == SMALL_BLOCKS.as_dict()
    assert check_outputs(kernel, (q, k, v), group.reference(q, k, v)) is None


def test_builder_kernel_rejects_other_shapes():
    dtype = torch.float16
    q, k, v = _qkv(17, 17, 32, dtype)
    kernel = build_attention(_attention_group([q.shape, k.shape, v.shape], dtype), _ctx())
    q2, k2, v2 = _qkv(18, 17, 32, dtype)
    with pytest.raises(ValueError, match="built for"):
        kernel(q2, k2, v2)


@pytest.mark.parametrize(
    "why",
    ["head_dim_256", "float64", "int_mask", "extra_op", "batch_broadcast", "no_keys", "grid_limit"],
)
def test_builder_unsupported(why):
    shapes = [(B, H, 8, 32), (B, H, 8, 32), (B, H, 8, 32)]
    dtype, mask, extra = torch.float16, None, False
    if why == "head_dim_256":
        shapes = [(B, H, 8, 256)] * 3
    elif why == "float64":
        dtype = torch.float64
    elif why == "int_mask":
        mask = torch.ones(8, 8, dtype=torch.int32)
    elif why == "extra_op":
        extra = True
    elif why == "batch_broadcast":
        shapes[1] = shapes[2] = (1, H, 8, 32)
    elif why == "no_keys":
        shapes[1] = shapes[2] = (B, H, 0, 32)
    elif why == "grid_limit":
        shapes = [(4096, 17, 8, 32)] * 3  # meta tensors: no memory
    group = _attention_group(shapes, dtype, mask, extra_op=extra)
    with pytest.raises(Unsupported):
        build_attention(group, _ctx())


# ----------------------------------------------------------------------------------------------
# GPU (run on the GPU machine with TRITON_INTERPRET=0)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [False, True], ids=["plain", "tma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_matches_reference(dtype, causal, tma):
    if torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set TRITON_INTERPRET=0 to run the compiled kernel")
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(3, 5, 333, 96), (3, 5, 517, 96), (3, 5, 517, 80)]
    q, k, v = (torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes)
    mask = torch.rand(3, 1, 1, 517, device="cuda", generator=g) > 0.2
    mask[..., 0] = True
    config = AttentionConfig(64, 64, 4, 2, tma=True) if tma else None  # fp32: TMA falls back
    out = flash_attention(q, k, v, mask, None, causal, config, allow_tf32=False)
    tol = dict(NORM_RTOL)
    tol[torch.float32] = 1e-4  # compiled fp32 dot: exact products, other summation order
    ref = _reference(q, k, v, mask, None, causal)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err <= tol[dtype]
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)


def test_tuned_builder_times_our_configs_against_sdpa(monkeypatch):
    """With a timing tuner the builder times its configs and SDPA (the group's ATen reference)
    and keeps the fastest; either way the kernel matches the reference, and the tuning key
    lands in the timing cache so the next build times nothing. Each of our candidates is warmed
    (compiled, on the GPU) in the tuner's compile step, not in its timing loop."""
    from compile_backend.kernels import template
    from compile_backend.kernels.autotune import Tuner
    from compile_backend.kernels.timers import WallClockTimer

    warmed, real_warmed = [], template.warmed
    monkeypatch.setattr(template, "warmed", lambda run, probe: warmed.append(probe) or real_warmed(run, probe))

    dtype = torch.float16
    q, k, v = _qkv(9, 13, 16, dtype)
    group = _attention_group([q.shape, k.shape, v.shape], dtype, causal=True)
    ctx = _ctx()

    class Cache:
        def __init__(self):
            self.records = {}

        def get(self, key, env):
            return self.records.get(str(key))

        def put(self, key, env, record):
            self.records[str(key)] = dict(record)

    cache = Cache()
    ctx.tuner = Tuner("fast", cache=cache, timer=WallClockTimer(), compile_workers=1)
    ctx.tuner.settings = type(ctx.tuner.settings)(min_reps=1, max_reps=1, target_ms=0.1)
    kernel = build_attention(group, ctx)
    assert kernel.impl in ("triton", "sdpa", "unfused") and "tuned_ms" in kernel.config
    ours = len(candidate_configs(16, 16, 9, 13, dtype, causal=True)[:6])
    # + SDPA + the unfused path (bmm + softmax kernel + bmm: 13 keys is a short sequence)
    assert ctx.tuner.stats["tuned"] == 1 and ctx.tuner.stats["candidates_timed"] == ours + 2
    assert len(warmed) == ours and len(set(map(id, warmed))) == 1  # one probe's inputs for all
    assert kernel.supports_out == (kernel.impl == "triton")
    assert check_outputs(kernel, (q, k, v), group.reference(q, k, v)) is None
    (record,) = cache.records.values()
    assert record["winner"]["impl"] == kernel.impl
    again = build_attention(group, ctx)
    assert again.tuned_from_cache and ctx.tuner.stats["tuned"] == 1


@pytest.mark.parametrize("out_perm", [[0, 2, 1, 3], [2, 0, 1, 3]], ids=["bshd", "sbhd"])
def _tuned_candidates(group):
    """Build ``group`` with a timing tuner and return what the tuner was handed: the runner
    factory, and the unfused path (SDPA is ``group.reference``), to call each candidate."""
    from compile_backend.kernels import attention as att_mod
    from compile_backend.kernels.autotune import Tuner
    from compile_backend.kernels.timers import WallClockTimer

    ctx = _ctx()
    ctx.tuner = Tuner("fast", timer=WallClockTimer(), compile_workers=1)
    ctx.tuner.settings = type(ctx.tuner.settings)(min_reps=1, max_reps=1, target_ms=0.1)
    real, seen = att_mod._tuned_attention, {}

    def spy(group, ctx, dims, runner, layouts, extra, unfused=None, decode=None):
        seen.update(runner=runner, unfused=unfused, extra=extra, decode=decode)
        return real(group, ctx, dims, runner, layouts, extra, unfused, decode)

    att_mod._tuned_attention = spy
    try:
        build_attention(group, ctx)
    finally:
        att_mod._tuned_attention = real
    return seen


@pytest.mark.parametrize("out_perm", [[0, 2, 1, 3], [2, 0, 1, 3]], ids=["bshd", "sbhd"])
def test_every_candidate_writes_the_requested_layout(out_perm):
    """out_perm: the output laid out as its reader permutes it (no .contiguous() copy after);
    our kernel, SDPA and the unfused path all give that layout and the reference's values."""
    dtype = torch.float16
    q, k, v = _qkv(9, 13, 16, dtype)
    group = _attention_group([q.shape, k.shape, v.shape], dtype, causal=True, out_perm=out_perm)
    expected = group.reference(q, k, v)[0]
    assert expected.permute(out_perm).is_contiguous()
    tuning = _tuned_candidates(group)
    for run in (build_attention(group, _ctx()), tuning["runner"](SMALL_BLOCKS), group.reference, tuning["unfused"]):
        (got,) = run(q, k, v)
        assert got.stride() == expected.stride()
        _assert_matches(got.contiguous(), expected.float(), dtype)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_output_quantized_for_the_next_gemm(precision):
    """quant: the attention writes the next GEMM's static input quantize to integer codes
    (quant_ref.quantize_steps of the output rounded to q's dtype); our kernel and the unfused path
    give the reference's codes (within one step on <= 1% of elements: the output's own rounding
    may differ)."""
    dtype = torch.float16
    q, k, v = _qkv(9, 13, 16, dtype)
    inv = 37.0 if precision == "int8" else 4.0  # codes spread over the grid, some saturate
    group = _attention_group([q.shape, k.shape, v.shape], dtype, causal=True, out_perm=[0, 2, 1, 3],
                             quant=(precision, inv))
    expected = group.reference(q, k, v)[0]
    assert expected.dtype == torch.int8
    tuning = _tuned_candidates(group)
    assert f"quant=('{precision}'," in tuning["extra"]
    for run in (build_attention(group, _ctx()), tuning["unfused"]):
        (out,) = run(q, k, v)
        assert out.dtype == expected.dtype and out.stride() == expected.stride()
        step = (out.float() - expected.float()).abs()
        assert (step <= 1).all() and (step > 0).float().mean() <= 0.01


def test_output_quantized_to_fp8_for_the_next_gemm():
    """quant fp8: the attention writes float8_e4m3fn codes (saturated at +-448); our kernel
    (the generated kernels' conversion helper: native on the GPU, integer arithmetic under the
    interpreter) gives the reference's codes within one step on <= 1%, the unfused path (ATen
    matmuls) on <= 3%."""
    from compile_backend.kernels.select import quantized_mismatch

    dtype = torch.float16
    q, k, v = _qkv(9, 13, 16, dtype)
    group = _attention_group([q.shape, k.shape, v.shape], dtype, causal=True, out_perm=[0, 2, 1, 3],
                             quant=("fp8", 900.0))  # some values saturate at 448
    expected = group.reference(q, k, v)[0]
    assert expected.dtype == torch.float8_e4m3fn and (expected.float().abs() == 448).any()
    tuning = _tuned_candidates(group)
    # the unfused path's matmuls are the platform BLAS's: their summation order moves borderline
    # outputs across a rounding of the fp16 output (1.16% of codes one step off on one CPU)
    for run, fraction in ((build_attention(group, _ctx()), 0.01), (tuning["unfused"], 0.03)):
        (out,) = run(q, k, v)
        assert out.dtype == expected.dtype and out.stride() == expected.stride()
        assert quantized_mismatch(out, expected, step_fraction=fraction) is None


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
def test_grouped_query_attention(dtype):
    """k/v with fewer heads, each serving a group of query heads (Llama-style GQA): the kernel,
    the built group and the fused op against the reference on k/v repeated per query head."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 9, 32, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 23, 32, generator=g).to(dtype) for _ in range(2))
    mask = _padding_mask(23)
    ref = _reference(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask, None, True)
    _assert_matches(flash_attention(q, k, v, mask, None, True, SMALL_BLOCKS, allow_tf32=False), ref, dtype)
    op = torch.ops.compile_backend.attention(q, k, v, mask, 1 / math.sqrt(32), True)
    _assert_matches(op, ref, dtype)
    group = _attention_group([q.shape, k.shape, v.shape], dtype, mask, 1 / math.sqrt(32), True)
    kernel = build_attention(group, _ctx())
    assert check_outputs(kernel, (q, k, v, mask), group.reference(q, k, v, mask)) is None
    with pytest.raises(ValueError, match="head dims differ"):
        flash_attention(q, k[:, :1].expand(2, 4, 23, 32), v[:, :1].expand(2, 4, 23, 32))  # 6 % 4


@pytest.mark.parametrize("quant", [None, ("int8", 37.0)], ids=["float", "int8"])
def test_decode_shapes_build_the_decode_kernel(quant):
    """One query row per head, grouped K/V heads (the decode step): untuned, the builder picks
    flash-decoding (kernels/attention_decode.py), with a padding mask, a permuted output layout
    and the output quantize; tuned, its configs come first among the candidates."""
    dtype = torch.float16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, 8, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(B, 2, 45, 16, generator=g).to(dtype) for _ in range(2))
    mask = _padding_mask(45)
    group = _attention_group([q.shape, k.shape, v.shape], dtype, mask, 0.25, out_perm=[0, 2, 1, 3], quant=quant)
    kernel = build_attention(group, _ctx())
    assert kernel.impl == "triton" and kernel.config.get("decode")
    (got,), (want,) = kernel(q, k, v, mask), group.reference(q, k, v, mask)
    # the same layout (the stride of the size-1 query dim is arbitrary)
    assert [st for st, n in zip(got.stride(), got.shape) if n > 1] == \
        [st for st, n in zip(want.stride(), want.shape) if n > 1] and got.dtype == want.dtype
    if quant is None:
        _assert_matches(got.contiguous(), want.float(), dtype)
    else:  # codes within one step
        assert (got.float() - want.float()).abs().max().item() <= 1
    assert _tuned_candidates(group)["decode"] is not None


def test_quantized_attention_output_is_compared_in_steps():
    """An attention whose int8 output is the next GEMM's quantized input rounds float values:
    its codes may sit one step from ATen's where the two float results differ by rounding (the
    H100 rejected every INT8 BERT attention kernel by comparing them exactly); a plain float
    attention group is not such a group."""
    from compile_backend.kernels.base import Kernel
    from compile_backend.kernels.select import rounds_floats

    shapes = [(1, 2, 8, 16)] * 3
    quantized = _attention_group(shapes, torch.float16, quant=("int8", 40.0))
    assert rounds_floats(quantized) and not rounds_floats(_attention_group(shapes, torch.float16))
    ref = torch.arange(-100, 100, dtype=torch.int8).repeat(5)
    near = ref.clone()
    near[::250] += 1  # 0.4% one step off
    far = ref.clone()
    far[7] += 3
    kernel = lambda out: Kernel(kind="attention", impl="triton", ops=("compile_backend.attention",), fn=lambda *a: (out,))
    assert check_outputs(kernel(near), (), (ref,), rounds_to_int=rounds_floats(quantized)) is None
    assert "3 steps" in check_outputs(kernel(far), (), (ref,), rounds_to_int=rounds_floats(quantized))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_real_quantized_attention_passes_the_check_an_exact_one_rejected(dtype):
    """The built kernel against the group's reference at a BERT-like head (128 keys, d 64): its
    INT8 codes sit a step from the reference's on a few elements (outputs an ulp apart), so a
    code-for-code comparison rejects it (as the H100 did for every INT8 BERT attention) and the
    step rule accepts it. bf16 (8 significant bits: ~3% of codes a step off under the 1% rule,
    every bf16 INT8/FP8 attention ran in ATen) takes the bf16 fraction."""
    from compile_backend.kernels.select import quantized_mismatch, rounds_floats

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 128, 64, generator=gen).to(dtype) for _ in range(3))
    amax = attention_reference(q, k, v).abs().max().item()
    group = _attention_group([q.shape, k.shape, v.shape], dtype, scale=0.125, quant=("int8", 127 / amax))
    kernel = build_attention(group, _ctx())
    reference = group.reference(q, k, v)
    assert check_outputs(kernel, (q, k, v), reference) == "output 0: values differ"
    assert rounds_floats(group) and check_outputs(kernel, (q, k, v), reference, rounds_to_int=True) is None
    (codes,) = kernel(q, k, v)
    off = (codes.to(torch.int16) - reference[0].to(torch.int16)).abs()
    assert int(off.max()) == 1  # a step, never more: a wrong scale or sign is many steps off
    if dtype == torch.bfloat16:  # beyond the 1% every other group gets
        assert quantized_mismatch(codes, reference[0]) is not None
