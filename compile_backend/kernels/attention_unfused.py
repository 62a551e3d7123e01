"""Unfused attention for short sequences: two batched GEMMs around one Triton softmax kernel.

At short key lengths (BERT at 128 tokens) the whole [Sq, Sk] score matrix is small, and two
cuBLAS batched GEMMs with one fused "scale + mask + softmax" pass between them can beat a flash
kernel, whose per-program work is then too little to hide its latency. The attention tuner
(:func:`attention._tuned_attention`) times this beside our flash kernel and SDPA.

* ``_masked_softmax_rows`` (@triton.jit): one program per ``ROWS`` score rows: scale, add (or
  apply, for bool) the mask read through broadcast strides, the causal cut, a softmax in fp32,
  fully masked rows to zeros (NaN with ``dead_rows_nan``), probabilities rounded to q's dtype.
* ``masked_softmax(scores, mask, scale, causal, dead_rows_nan, dtype)``: checks, allocates and
  launches; ``masked_softmax_reference`` beside it in plain PyTorch.
* ``unfused_attention(q, k, v, mask, scale, causal, dead_rows_nan)``: the op the engine calls:
  scores = q k^T in fp32 (``bmm(..., out_dtype=float32)`` where torch has it, else an fp32
  product of the 16-bit operands), the softmax kernel, then probs @ v by cuBLAS. Its reference
  is :func:`attention.attention_reference` (same numerics up to the score rounding noted there).

Imports Triton at the top: only the attention builder (loaded lazily by the selector) and tests
import it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_parts import mask_argument

#: longest key length this path takes: beyond it the score matrix costs more than flash saves
MAX_KEYS = 1024


@triton.jit
def _masked_softmax_rows(
    s_ptr, m_ptr, o_ptr,
    n_rows, heads, seq_q, seq_k,
    s_row, m_b, m_h, m_q, m_k, o_row,
    scale,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DEAD_ROWS_NAN: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < seq_k
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(s_ptr + rows[:, None] * s_row + cols[None, :], mask=ok, other=0.0).to(tl.float32) * scale
    qi = rows % seq_q
    bh = rows // seq_q
    b = bh // heads
    h = bh % heads
    if MASK_KIND != 0:
        m_off = b[:, None] * m_b + h[:, None] * m_h + qi[:, None] * m_q + cols[None, :] * m_k
        if MASK_KIND == 1:
            keep = tl.load(m_ptr + m_off, mask=ok, other=0) != 0
            x = tl.where(keep, x, float("-inf"))
        else:
            x = x + tl.load(m_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
    if CAUSAL:
        x = tl.where(cols[None, :] <= qi[:, None], x, float("-inf"))
    x = tl.where(ok, x, float("-inf"))
    row_max = tl.max(x, axis=1)
    dead = row_max == float("-inf")
    safe_max = tl.where(dead, 0.0, row_max)
    e = tl.exp(x - safe_max[:, None])
    total = tl.sum(e, axis=1)
    p = e / tl.where(dead, 1.0, total)[:, None]
    if DEAD_ROWS_NAN:
        p = tl.where(dead[:, None], float("nan"), p)
    tl.store(o_ptr + rows[:, None] * o_row + cols[None, :], p.to(o_ptr.dtype.element_ty), mask=ok)


def masked_softmax_reference(scores: torch.Tensor, mask: Optional[torch.Tensor], scale: float, causal: bool,
                             dead_rows_nan: bool, dtype: torch.dtype) -> torch.Tensor:
    """softmax(scores * scale + mask) over the last dim in fp32, fully masked rows 0 (or NaN)."""
    x = scores.float() * scale
    sq, sk = x.shape[-2], x.shape[-1]
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else x + mask.float()
    if causal:
        x = x.masked_fill(~torch.ones(sq, sk, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    dead = torch.isneginf(x).all(dim=-1, keepdim=True)
    return torch.softmax(x, dim=-1).masked_fill(dead, float("nan") if dead_rows_nan else 0.0).to(dtype)


def masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor], scale: float, causal: bool,
                   dead_rows_nan: bool, dtype: torch.dtype) -> torch.Tensor:
    """``masked_softmax_reference`` as one Triton kernel: scores [B, H, Sq, Sk] (rows contiguous
    in the last dim), mask broadcastable to it (bool, or additive already in its final dtype);
    returns a new contiguous [B, H, Sq, Sk] tensor of ``dtype``."""
    if scores.dim() != 4 or scores.stride(-1) != 1 or not scores.is_contiguous():
        raise ValueError(f"masked_softmax: scores must be a contiguous 4-d tensor, got {tuple(scores.shape)}")
    batch, heads, seq_q, seq_k = scores.shape
    if not 1 <= seq_k <= MAX_KEYS:
        raise ValueError(f"masked_softmax: {seq_k} keys outside 1..{MAX_KEYS}")
    out = torch.empty(scores.shape, dtype=dtype, device=scores.device)
    n_rows = batch * heads * seq_q
    if n_rows == 0:
        return out
    kind, mask_arg, strides = mask_argument(mask, scores, seq_k)  # broadcast dims read with stride 0
    block_k = triton.next_power_of_2(seq_k)
    rows = max(1, min(16, 4096 // block_k))  # ~4k elements per program
    grid = (triton.cdiv(n_rows, rows),)
    _masked_softmax_rows[grid](
        scores, mask_arg, out, n_rows, heads, seq_q, seq_k, seq_k, *strides, seq_k, float(scale),
        MASK_KIND=kind, CAUSAL=bool(causal), DEAD_ROWS_NAN=bool(dead_rows_nan), ROWS=rows, BLOCK_K=block_k,
        num_warps=4 if block_k * rows >= 2048 else 2,
    )
    return out


def _scores_fp32(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T [B, H, Sq, Sk] in fp32 from cuBLAS: the 16-bit product straight to an fp32 output
    where torch's bmm takes ``out_dtype`` (no rounding of the scores to fp16 before the
    softmax), else the fp32 product of upcast operands."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    q3, k3 = q.reshape(b * h, sq, d), k.reshape(b * h, sk, d).transpose(1, 2)
    if q.dtype != torch.float32 and q.is_cuda:
        try:
            return torch.bmm(q3, k3, out_dtype=torch.float32).view(b, h, sq, sk)
        except (TypeError, RuntimeError):  # torch without bmm(out_dtype=)
            pass
    return torch.bmm(q3.float(), k3.float()).view(b, h, sq, sk)


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      scale: Optional[float], causal: bool, dead_rows_nan: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v as cuBLAS bmm, the Triton softmax, cuBLAS bmm; output
    [B, H, Sq, Dv] contiguous in q's dtype. An additive mask is rounded to q's dtype first, as
    ``compile_backend::attention`` does."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    probs = masked_softmax(_scores_fp32(q, k), mask, scale, causal, dead_rows_nan, q.dtype)
    b, h, sq, sk = probs.shape
    out = torch.bmm(probs.view(b * h, sq, sk), v.reshape(b * h, sk, v.shape[3]))
    return out.view(b, h, sq, v.shape[3])


__all__ = ["MAX_KEYS", "masked_softmax", "masked_softmax_reference", "unfused_attention"]
