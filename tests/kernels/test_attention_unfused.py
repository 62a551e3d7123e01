"""Unfused short-sequence attention (kernels/attention_unfused.py): the softmax kernel against
its reference and the whole path against the attention reference, under TRITON_INTERPRET=1
on odd shapes (1, 17, 67, 130 keys: never a power of two) for every dtype and mask kind.

Tolerances: the softmax kernel vs ``masked_softmax_reference`` on the same fp32 scores: fp32
1e-6, fp16 1e-3, bf16 8e-3 elementwise (one rounding of a probability in [0, 1] to the output
dtype); the whole path vs ``attention_reference`` as the flash kernel's tests (NORM_RTOL and
the per-dtype elementwise tolerances), since both round P to q's dtype before the second product.
"""
from __future__ import annotations

import pytest
import torch

from compile_backend.kernels.attention_unfused import MAX_KEYS, masked_softmax, masked_softmax_reference, unfused_attention
from test_attention import B, DTYPES, H, _assert_matches, _padding_mask, _qkv, _reference

SOFTMAX_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
MASKS = ("none", "padding", "additive2d", "additive4d", "dead_rows")


def _mask(kind, sq, sk, dtype):
    if kind == "padding":
        return _padding_mask(sk)
    if kind == "additive2d":
        return torch.randn(sq, sk).to(dtype)
    if kind == "additive4d":
        return torch.randn(B, H, sq, sk).to(dtype)
    if kind == "dead_rows":  # every key of query row 0 masked out
        m = torch.ones(B, 1, sq, sk, dtype=torch.bool)
        m[:, :, 0, :] = False
        return m
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_kernel_matches_reference(mask_kind, causal, dtype):
    sq, sk = 17, 67
    scores = torch.randn(B, H, sq, sk, generator=torch.Generator().manual_seed(0)) * 4
    mask = _mask(mask_kind, sq, sk, dtype)
    for nan_rows in (False, True):
        got = masked_softmax(scores, mask, 0.3, causal, nan_rows, dtype)
        want = masked_softmax_reference(scores, mask, 0.3, causal, nan_rows, dtype)
        assert got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=SOFTMAX_TOL[dtype], equal_nan=True)
    if mask_kind == "dead_rows":
        assert (got[:, :, 0].isnan()).all() and not got[:, :, 1:].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(17, 17, 32, False, "padding"), (1, 130, 64, False, "additive2d"),
                                   (67, 67, 80, True, "additive4d"), (130, 67, 16, False, "none")], ids=str)
def test_unfused_attention_matches_reference(shape, dtype):
    sq, sk, d, causal, mask_kind = shape
    q, k, v = _qkv(sq, sk, d, dtype)
    mask = _mask(mask_kind, sq, sk, dtype)
    out = unfused_attention(q, k, v, mask, None, causal)
    _assert_matches(out, _reference(q, k, v, mask, None, causal), dtype)


def test_non_contiguous_inputs_and_dead_rows_give_zeros():
    dtype = torch.float16
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(9, 13, 16, dtype))  # [B,S,H,D] views
    assert not q.is_contiguous()
    mask = _mask("dead_rows", 9, 13, dtype)
    out = unfused_attention(q, k, v, mask, 0.25, False)
    assert (out[:, :, 0] == 0).all()
    _assert_matches(out[:, :, 1:].contiguous(), _reference(q, k, v, mask, 0.25, False)[:, :, 1:], dtype)


def test_launcher_checks():
    with pytest.raises(ValueError, match="contiguous 4-d"):
        masked_softmax(torch.randn(3, 4), None, 1.0, False, False, torch.float32)
    with pytest.raises(ValueError, match="keys outside"):
        masked_softmax(torch.randn(1, 1, 1, MAX_KEYS + 1), None, 1.0, False, False, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_bert_shape_matches_reference(dtype):
    """BERT at 128 tokens with an additive padding mask [B, 1, 1, S]: the scores come from
    bmm(..., out_dtype=float32) where torch has it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 12, 128, 64, generator=g).to(dtype).cuda() for _ in range(3))
    mask = torch.zeros(4, 1, 1, 128)
    mask[..., 100:] = torch.finfo(dtype).min
    mask = mask.to(dtype).cuda()
    out = unfused_attention(q, k, v, mask, None, False)
    _assert_matches(out.cpu(), _reference(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), None, False), dtype)
