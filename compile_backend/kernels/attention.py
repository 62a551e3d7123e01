"""Flash-attention forward for ``compile_backend::attention`` (see ``compile_backend/ops.py``).

Three layers plus a reference, as every kernel here:

* ``_flash_attention_fwd`` (@triton.jit): one program per (block of BLOCK_M query rows,
  batch x head). It walks the keys in blocks of BLOCK_N keeping, per query row, the running
  maximum ``m``, the running softmax denominator ``l`` and an fp32 output accumulator
  (online softmax), so the [Sq, Sk] score matrix never exists in memory.
* ``flash_attention(q, k, v, mask, scale, causal, config)``: checks inputs, reads the mask's
  broadcast strides, allocates the output and launches.
* ``build_attention(group, ctx)``: turns a KernelGroup holding one fused attention node into a
  :class:`Kernel`, or raises :class:`Unsupported` so the engine falls back to ATen SDPA.
* ``attention_reference(...)``: the same function in plain PyTorch, in fp32.

Fully masked query rows (every key masked out by the mask, e.g. an all-False bool row or an
all ``-inf`` additive row) produce zeros. That is what SDPA returns on CPU (its "safe" softmax,
PyTorch >= 2.5) and, on CUDA (torch 2.11, H100), for an all ``-inf`` additive row; for an
all-False *bool* row CUDA SDPA returned neither zeros, NaN nor the mean of v, so on such
inputs the engine's validation rejects this kernel and runs ATen (benchmarks/notes/attention.md).

A decode step (at most ``DECODE_MAX_Q`` query rows, the query heads of one K/V head sharing its
tiles) runs the flash-decoding kernel of :mod:`.attention_decode` instead: key ranges split over
the GPU, blocks every row masks out skipped. Untuned it is the choice; tuned, its configs are
timed first beside the flash kernel's and SDPA.

This module imports Triton at the top: only the builder loader (``select._load``) and tests
import it, never ``import compile_backend``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import triton
import triton.language as tl

from .autotune import tuner_for
from .base import Kernel, KernelContext, KernelGroup, Unsupported, meta_of, output_tensor
from . import quant_ref
from .attention_config import (DECODE_CONFIGS, AttentionConfig, DecodeConfig, candidate_configs, decode_applies,
                               default_config, pow2_at_least)
from .attention_parts import MASK_ADDITIVE, MASK_BOOL, MASK_NONE, mask_argument, quantize_output
from .launch import strides_for
from .base import triton_interpret

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MASK_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: largest head dim (of q/k and of v) the kernel keeps in registers; the D block is padded to
#: the next power of two with masked loads, so 80 or 96 work too
MAX_HEAD_DIM = 128
#: the decode kernel (few query rows a K/V head) takes wider heads: Gemma's and Gemma 2's 256
MAX_DECODE_HEAD_DIM = 256



# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    dead_rows_nan: bool = False,
) -> torch.Tensor:
    """Plain PyTorch, computed in fp32; returns q's dtype. Fully masked rows give zeros (NaN
    with ``dead_rows_nan``, as compile_backend::attention).

    An additive mask is first rounded to q's dtype, as the fused op does before SDPA.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    sq, sk = scores.shape[-2], scores.shape[-1]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(q.dtype).float()
    if causal:
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    dead_rows = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1).masked_fill(dead_rows, float("nan") if dead_rows_nan else 0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)




# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # Masks only where a tail can exist (constexpr), so full tiles compile to plain loads.
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=col_ok[None, :], other=0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # UPCAST_DOT: Triton's CPU interpreter computes bf16 dots wrongly (3.9); bf16 x bf16
    # products are exact in fp32, so an fp32 dot of the upcast tiles is the same arithmetic.
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _attend_key_blocks(
    acc, l_i, m_i, q,
    k_base, v_base, kv_b, kv_h, mask_rows,
    offs_m, offs_n, offs_d, offs_dv,
    lo, hi,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    seq_q, seq_k, head_dim, head_dim_v, qk_scale,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, KEY_TAIL: tl.constexpr, SCALE_IN_EXP: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi); CAUSAL/KEY_TAIL say which masks this range needs.

    m_i is kept in the scaled log2 domain. SCALE_IN_EXP (scale > 0, no additive mask): the
    scale is applied to the row max and inside exp2's argument (one FMA per score) instead of
    a separate multiply of every score; a positive scale keeps the row max where it was. (The
    scale is not folded into q: that would round q * scale to q's dtype, an error SDPA does
    not make, and would save nothing: exp2's argument stays one FMA per score.)

    USE_TMA: k_base / v_base are tensor descriptors of the whole [B, H, S, D] K and V (tile
    [1, 1, BLOCK_N, BLOCK_D] at (kv_b, kv_h, start_n, 0)): one bulk copy per tile into shared
    memory, no per-thread addresses; keys past Sk and head-dim lanes past D read as 0.
    """
    row_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        col_ok = cols < seq_k
        # K^T tile [BLOCK_D, BLOCK_N]: padded head-dim lanes load 0 and add nothing to q.k
        if USE_TMA:
            k_t = tl.trans(k_base.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
        else:
            k_t = _load_tile(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn,
                             d_ok, col_ok, not EVEN_D, KEY_TAIL)
        qk = _dot(q, k_t, None, DOT_PRECISION, UPCAST_DOT)
        if SCALE_IN_EXP:
            row_scale = qk_scale
        else:
            qk = qk * qk_scale  # log2 domain
            row_scale = 1.0
        if MASK_KIND == 2:
            bias = _load_tile(mask_rows + cols[None, :] * stride_mn, row_ok, col_ok, not EVEN_M, KEY_TAIL)
            # the fused op rounds an additive mask to q's dtype before SDPA: do the same.
            # finfo(fp32).min * log2(e) overflows: keep a finite mask finite (a fully masked
            # row is then uniform, as in SDPA), -inf stays -inf and NaN stays NaN
            bias = bias.to(q.dtype).to(tl.float32)
            bias2 = bias * 1.4426950408889634
            qk += tl.where((bias2 == float("-inf")) & (bias != float("-inf")), -3.4028234663852886e38, bias2)
        if MASK_KIND == 1:
            keep = _load_tile(mask_rows + cols[None, :] * stride_mn, row_ok, col_ok, not EVEN_M, KEY_TAIL)
            qk = tl.where(keep != 0, qk, float("-inf"))
        if CAUSAL:
            qk = tl.where(cols[None, :] <= offs_m[:, None], qk, float("-inf"))
        if KEY_TAIL:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * row_scale)
        if MASK_KIND != 0:
            # a row with no visible key so far keeps m = -inf; subtract 0 instead so that
            # exp2(-inf - -inf) never makes a NaN (its p and alpha are then exactly 0)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.math.exp2(qk * row_scale - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_base.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v = _load_tile(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                           col_ok, dv_ok, KEY_TAIL, not EVEN_DV)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_attention_fwd(
    Q, K, V, Mask, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, kv_group, seq_q, seq_k, head_dim, head_dim_v, qk_scale, quant_inv_scale,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, SCALE_IN_EXP: tl.constexpr, DEAD_ROWS_NAN: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    QUANT: tl.constexpr = False, QMAX: tl.constexpr = 127.0, ROUND_TO: tl.constexpr = tl.float16,
    QUANT_FP8: tl.constexpr = False, SOFT_FP8: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # the last query blocks see the most keys: start them first so they do not end the launch
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_q

    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   row_ok, offs_d < head_dim, not EVEN_M, not EVEN_D)
    if USE_TMA:  # K and V are tensor descriptors, addressed by (batch, head, key, 0)
        k_base, v_base = K, V
    else:  # grouped-query attention: kv_group query heads share one k/v head
        k_base = K + b * stride_kb + (h // kv_group) * stride_kh
        v_base = V + b * stride_vb + (h // kv_group) * stride_vh
    kv_b, kv_h = pid_bh // num_heads, (pid_bh % num_heads) // kv_group
    # int64 rows: Sq * Sk mask elements can pass 2**31 on long sequences
    mask_rows = Mask + b * stride_mb + h * stride_mh + offs_m.to(tl.int64)[:, None] * stride_mm

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Keys [0, unmasked_hi) are inside Sk and (causal) left of every row of this block: no
    # per-element masking there. The rest [unmasked_hi, hi) takes the tail/diagonal masks.
    full_blocks_end = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M)
        unmasked_hi = tl.minimum(full_blocks_end, (start_m // BLOCK_N) * BLOCK_N)
    else:
        hi = seq_k
        unmasked_hi = full_blocks_end
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, k_base, v_base, kv_b, kv_h, mask_rows, offs_m, offs_n, offs_d, offs_dv, 0, unmasked_hi,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seq_q, seq_k, head_dim, head_dim_v, qk_scale,
        MASK_KIND, False, False, SCALE_IN_EXP, EVEN_M, EVEN_D, EVEN_DV, DOT_PRECISION, UPCAST_DOT, USE_TMA,
        BLOCK_N, BLOCK_D, BLOCK_DV)
    if CAUSAL or not EVEN_N:  # else the range is empty: emit no second loop at all
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, k_base, v_base, kv_b, kv_h, mask_rows, offs_m, offs_n, offs_d, offs_dv, unmasked_hi,
            hi, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seq_q, seq_k, head_dim, head_dim_v, qk_scale,
            MASK_KIND, CAUSAL, not EVEN_N, SCALE_IN_EXP, EVEN_M, EVEN_D, EVEN_DV, DOT_PRECISION, UPCAST_DOT,
            USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV)

    if MASK_KIND != 0 and not DEAD_ROWS_NAN:
        # every key masked out: l = 0 and acc = 0; return 0 like SDPA's safe softmax
        # (DEAD_ROWS_NAN: 0 * (1 / 0) is NaN, like softmax(all -inf) @ v)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (1.0 / l_i)[:, None]
    if QUANT:
        out = quantize_output(out, quant_inv_scale, QMAX, ROUND_TO, QUANT_FP8, SOFT_FP8)
    out_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    dv_ok = offs_dv < head_dim_v
    if EVEN_M and EVEN_DV:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return triton_interpret()


def _tma_strides(t: torch.Tensor) -> List[int]:
    """t's strides, with those of size-1 dims (never stepped along) replaced by dense ones."""
    strides = list(t.stride())
    if t.shape[-1] == 1:
        strides[-1] = 1
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1]
    return strides


def _tma_compatible(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address ``t``: fp16/bf16 (the wgmma path the option is
    for), unit stride in the last dim, 16-byte aligned base and other strides (no broadcast
    stride 0), and Triton new enough to have host-side tensor descriptors."""
    strides = _tma_strides(t)
    if t.dtype not in (torch.float16, torch.bfloat16) or strides[-1] != 1 or t.data_ptr() % 16:
        return False
    if any(st <= 0 or (st * t.element_size()) % 16 for st in strides[:-1]):
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # an older Triton
        return False
    return True


def check_attention_inputs(q: Any, k: Any, v: Any, mask: Any, max_head_dim: int = MAX_HEAD_DIM) -> Optional[str]:
    """None when the kernel supports these tensors (real or meta), else the reason it does not
    (``max_head_dim``: ``MAX_DECODE_HEAD_DIM`` where the decode kernel serves)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} must be 4-d [B, H, S, D], got {t.dim()}-d"
        if t.dtype != q.dtype:
            return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not supported (fp16, bf16, fp32)"
    (bq, hq, seq_q, d), (bk, hk, seq_k, dk), (bv, hv, seq_v, dv) = q.shape, k.shape, v.shape
    # grouped-query attention: k and v may have fewer heads, each serving hq // hk query heads
    if bq != bk or bq != bv or hk != hv or not hk or hq % hk:
        return f"batch/head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if dk != d or seq_v != seq_k:
        return f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}"
    if not (1 <= d <= max_head_dim and 1 <= dv <= max_head_dim):
        return f"head dims {d}/{dv} outside 1..{max_head_dim}"
    if seq_k == 0:
        return "no keys (Sk = 0)"
    if bq * hq > 65535:
        return f"batch x heads = {bq * hq} exceeds the grid's second axis (65535)"
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            return "mask is not a tensor"
        if mask.dtype != torch.bool and mask.dtype not in MASK_FLOAT_DTYPES:
            return f"mask dtype {mask.dtype} not supported (bool, fp16, bf16, fp32)"
        # by hand: torch.broadcast_shapes costs ~10 us per call on the launch path
        target = (bq, hq, seq_q, seq_k)
        if mask.dim() > 4 or any(m not in (1, t) for m, t in zip(reversed(mask.shape), reversed(target))):
            return f"mask {tuple(mask.shape)} does not broadcast to {target}"
    return None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    config: Optional[AttentionConfig] = None,
    allow_tf32: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, as ``compile_backend::attention``; output contiguous.

    allow_tf32 only matters for fp32 inputs: False computes both products in full fp32.
    """
    problem = check_attention_inputs(q, k, v, mask)
    if problem is not None:
        raise ValueError(f"flash_attention: {problem}")
    if not (q.device == k.device == v.device) or (mask is not None and mask.device != q.device):
        raise ValueError("flash_attention: q, k, v and mask must be on one device")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError("flash_attention: needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if config is None:
        config = default_config(q.shape[-1], v.shape[-1], q.shape[-2], k.shape[-2], q.dtype, bool(causal))
    return _launch(q, k, v, mask, scale, bool(causal), config, allow_tf32)


def _launch(q, k, v, mask, scale: float, causal: bool, config: AttentionConfig, allow_tf32: bool,
            into: Optional[torch.Tensor] = None, dead_rows_nan: bool = False,
            out_perm: Optional[Sequence[int]] = None, quant: Optional[Tuple[str, float]] = None) -> torch.Tensor:
    """Allocate (or write ``into``, checked) and launch, no other checks: callers have validated
    (flash_attention) or built for exactly these shapes and dtypes (build_attention)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k, head_dim_v = k.shape[2], v.shape[3]
    out_dtype = q.dtype if quant is None else quant_ref.STORAGE[quant[0]]
    out = output_tensor((into,), 0, _out_layout(q.shape, v.shape, out_dtype, out_perm), q.device)
    if out.numel() == 0:
        return out

    mask_kind, mask_arg, mask_strides = mask_argument(mask, q, seq_k)

    block_d, block_dv = pow2_at_least(head_dim), pow2_at_least(head_dim_v)
    k_arg, v_arg = k, v
    use_tma = config.tma and _tma_compatible(k) and _tma_compatible(v)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg = TensorDescriptor(k, list(k.shape), _tma_strides(k), [1, 1, config.block_n, block_d])
        v_arg = TensorDescriptor(v, list(v.shape), _tma_strides(v), [1, 1, config.block_n, block_dv])
    grid = (triton.cdiv(seq_q, config.block_m), batch * heads)
    _flash_attention_fwd[grid](
        q, k_arg, v_arg, mask_arg, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        heads, heads // k.shape[1], seq_q, seq_k, head_dim, head_dim_v, scale * 1.4426950408889634,
        0.0 if quant is None else float(quant[1]),
        MASK_KIND=mask_kind, CAUSAL=causal, SCALE_IN_EXP=scale > 0 and mask_kind != MASK_ADDITIVE,
        DEAD_ROWS_NAN=dead_rows_nan,
        EVEN_M=seq_q % config.block_m == 0, EVEN_N=seq_k % config.block_n == 0,
        EVEN_D=head_dim == block_d, EVEN_DV=head_dim_v == block_dv,
        DOT_PRECISION="tf32" if allow_tf32 else "ieee",
        UPCAST_DOT=_interpreting() and q.dtype == torch.bfloat16, USE_TMA=use_tma,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        QUANT=quant is not None,
        QMAX=127.0 if quant is None else quant_ref.QMAX[quant[0]], ROUND_TO=_TL_TYPES[q.dtype],
        QUANT_FP8=quant is not None and quant[0] == "fp8", SOFT_FP8=_interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


# ----------------------------------------------------------------------------------------------
# builder
# ----------------------------------------------------------------------------------------------

_ARG_NAMES = ("q", "k", "v", "mask", "scale", "causal", "dead_rows_nan", "out_perm", "quant", "quant_inv_scale")


def _attention_node(group: KernelGroup) -> fx.Node:
    calls = [n for n in group.gm.graph.nodes if n.op == "call_function"]
    target = torch.ops.compile_backend.attention.default
    if len(calls) != 1 or calls[0].target not in (target, torch.ops.compile_backend.attention):
        raise Unsupported(f"expected one compile_backend.attention call, got {list(group.ops)}")
    node = calls[0]
    if len(group.outputs) != 1 or group.outputs[0] is not node:
        raise Unsupported("the group must return exactly the attention output")
    return node


def _node_args(node: fx.Node) -> Dict[str, Any]:
    args = dict(zip(_ARG_NAMES, node.args))
    args.update({k: val for k, val in node.kwargs.items() if k in _ARG_NAMES})
    missing = [n for n in _ARG_NAMES[:6] if n not in args and n != "mask"]
    if missing:
        raise Unsupported(f"attention node lacks arguments {missing}")
    args.setdefault("mask", None)
    args.setdefault("dead_rows_nan", False)
    args.setdefault("out_perm", None)
    args.setdefault("quant", None)
    args.setdefault("quant_inv_scale", 0.0)
    return args


def build_attention(group: KernelGroup, ctx: KernelContext, config: Optional[AttentionConfig] = None) -> Kernel:
    """Kernel for a group holding one ``compile_backend.attention`` node (placeholders q, k, v
    and optionally mask; scale and causal constants), or Unsupported with the reason."""
    if group.kind != "attention":
        raise Unsupported(f"group kind {group.kind!r} is not attention")
    node = _attention_node(group)
    args = _node_args(node)
    placeholders = group.placeholders
    positions: Dict[str, Optional[int]] = {}
    for name in ("q", "k", "v", "mask"):
        arg = args[name]
        if arg is None and name == "mask":
            positions[name] = None
        elif isinstance(arg, fx.Node) and arg in placeholders:
            positions[name] = placeholders.index(arg)
        else:
            raise Unsupported(f"attention {name} must be a group input, got {arg!r}")
    scale, causal = args["scale"], args["causal"]
    if isinstance(scale, fx.Node) or isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise Unsupported(f"attention scale must be a constant number, got {scale!r}")
    if not isinstance(causal, bool) or not isinstance(args["dead_rows_nan"], bool):
        raise Unsupported(f"attention causal/dead_rows_nan must be constant bools, got {causal!r}")
    dead_rows_nan = args["dead_rows_nan"]
    out_perm = args["out_perm"]
    quant = None
    if args["quant"] is not None:
        if args["quant"] not in quant_ref.PRECISIONS or not isinstance(args["quant_inv_scale"], (int, float)):
            raise Unsupported(f"attention quant must be one of {quant_ref.PRECISIONS} with a constant scale, "
                              f"got {args['quant']!r}")
        quant = (args["quant"], float(args["quant_inv_scale"]))
    if out_perm is not None and sorted(out_perm) != [0, 1, 2, 3]:
        raise Unsupported(f"attention out_perm must be a permutation of 4 dims, got {out_perm!r}")

    metas = {name: (meta_of(args[name]) if positions[name] is not None else None) for name in positions}
    problem = check_attention_inputs(metas["q"], metas["k"], metas["v"], metas["mask"], MAX_DECODE_HEAD_DIM)
    if problem is not None:
        raise Unsupported(problem)
    q_meta, k_meta, v_meta = metas["q"], metas["k"], metas["v"]
    # a decode step (a few query rows per K/V head): flash-decoding, key ranges split over the
    # GPU (kernels/attention_decode.py); the tuner also times the flash kernel and SDPA
    decode = decode_applies(q_meta.shape[2], q_meta.shape[1], k_meta.shape[1])
    wide = max(q_meta.shape[-1], v_meta.shape[-1]) > MAX_HEAD_DIM  # the decode kernel's alone
    if wide and (not decode or config is not None):
        raise Unsupported(f"head dims {q_meta.shape[-1]}/{v_meta.shape[-1]} outside 1..{MAX_HEAD_DIM} "
                          f"(up to {MAX_DECODE_HEAD_DIM} for a decode step only)")
    allow_tf32 = ctx.allow_tf32  # fp32 attention on TF32 tensor cores only when precision allows
    dims = (q_meta.shape[-1], v_meta.shape[-1], q_meta.shape[-2], k_meta.shape[-2], q_meta.dtype, causal)
    tuned = config is None and tuner_for(ctx).times
    explicit = config
    if config is None:
        config = default_config(*dims)
    scale = float(scale)
    iq, ik, iv, im = positions["q"], positions["k"], positions["v"], positions["mask"]
    shapes = tuple(tuple(m.shape) for m in (q_meta, k_meta, v_meta))
    mask_shape = tuple(metas["mask"].shape) if im is not None else None

    def operands(inputs: Sequence[Any]):
        # the builder checked dtypes and shapes on the metas; only re-check the shapes (cheap)
        # so an engine handing other shapes gets an error instead of a wrong launch
        q, k, v = inputs[iq], inputs[ik], inputs[iv]
        mask = inputs[im] if im is not None else None
        if (q.shape, k.shape, v.shape) != shapes or (mask is not None and mask.shape != mask_shape):
            raise ValueError(f"attention kernel built for {shapes} (mask {mask_shape}), called with "
                             f"{(tuple(q.shape), tuple(k.shape), tuple(v.shape))}")
        return q, k, v, mask

    def runner(config: AttentionConfig):
        def run(*inputs: Any, out: Optional[Sequence[Optional[torch.Tensor]]] = None):
            q, k, v, mask = operands(inputs)
            return (_launch(q, k, v, mask, scale, causal, config, allow_tf32, out[0] if out else None,
                            dead_rows_nan, out_perm, quant),)

        return run

    def decode_runner(config: DecodeConfig):
        from .attention_decode import DecodeRunner

        launch = DecodeRunner(config, scale, causal, dead_rows_nan, quant, allow_tf32, ctx.pdl)

        def run(*inputs: Any, out: Optional[Sequence[Optional[torch.Tensor]]] = None):
            q, k, v, mask = operands(inputs)
            return (launch(q, k, v, mask, layouts[0], out[0] if out else None),)

        run.counters = launch.counters  # type: ignore[attr-defined]  (tests: left at zero)
        return run

    def unfused(*inputs: Any, out=None):
        from .attention_unfused import unfused_attention

        mask = inputs[im] if im is not None else None
        res = unfused_attention(inputs[iq], inputs[ik], inputs[iv], mask, scale, causal, dead_rows_nan)
        if quant is not None:
            res = quant_ref.quantize_steps(quant_ref.eager, res, res.dtype, quant[1], quant[0])
        return (res if out_perm is None else _in_layout(res, layouts[0]),)

    out_dtype = q_meta.dtype if quant is None else quant_ref.STORAGE[quant[0]]
    layouts = (_out_layout(q_meta.shape, v_meta.shape, out_dtype, out_perm),)
    if tuned:
        # short sequences: also two batched GEMMs around one softmax kernel (16-bit only: the
        # fp32 products would follow the user's global TF32 setting, not options.precision)
        # (not for grouped-query attention: the batched GEMMs would need k/v repeated per head)
        short = q_meta.dtype in (torch.float16, torch.bfloat16) and k_meta.shape[-2] <= _unfused_max_keys() \
            and k_meta.shape[1] == q_meta.shape[1]
        return _tuned_attention(group, ctx, dims, None if wide else runner, layouts,
                                f"scale={scale} causal={causal} tf32={allow_tf32} nan_rows={dead_rows_nan} quant={quant}",
                                unfused if short else None, decode_runner if decode else None)
    if decode and explicit is None:
        first = DECODE_CONFIGS[0]
        return Kernel(kind="attention", impl="triton", ops=group.ops, fn=decode_runner(first), config=first.as_dict(),
                      supports_out=True, out_layouts=layouts)
    return Kernel(kind="attention", impl="triton", ops=group.ops, fn=runner(config), config=config.as_dict(),
                  supports_out=True, out_layouts=layouts)


def _unfused_max_keys() -> int:
    from .attention_unfused import MAX_KEYS

    return MAX_KEYS


def _tuned_attention(group: KernelGroup, ctx: KernelContext, dims, runner, layouts, extra: str,
                     unfused=None, decode=None) -> Kernel:
    """Our kernel's configs timed against PyTorch SDPA (the vendor candidate, through the group's
    ATen reference) and, for short sequences, ``unfused`` (bmm + softmax kernel + bmm), so a
    tuned attention is never slower than either on this GPU and shape. ``fast`` times the
    heuristic and the next five configs, ``max`` the whole list."""
    from .autotune import Candidate, TuningKey
    from .template import Probe, group_dtypes, group_shapes, group_strides, warmed

    # our kernels compile (Triton's JIT, on the GPU) by running once on the probe's inputs, in the
    # tuner's compile threads: run first in the timing loop instead, one after another, the HF
    # decoder's decode attention spent 23-25 s tuning with "0.0 s compiling" (H100, session 15)
    probe = Probe(group, ctx.device)
    configs = candidate_configs(*dims) if runner is not None else []  # None: heads too wide for it
    if ctx.tuning != "max":
        configs = configs[:6]
    candidates = [Candidate(f"triton {c.as_dict()}", {"impl": "triton", **c.as_dict()},
                            (lambda c=c: warmed(runner(c), probe)), "triton") for c in configs]
    if decode is not None:  # first: the untuned choice for a decode step
        decodes = DECODE_CONFIGS if ctx.tuning == "max" else DECODE_CONFIGS[:4]
        candidates[:0] = [Candidate(f"triton decode {c.as_dict()}", {"impl": "triton", **c.as_dict()},
                                    (lambda c=c: warmed(decode(c), probe)), "triton") for c in decodes]
    candidates.append(Candidate("sdpa", {"impl": "sdpa"}, lambda: group.reference, "sdpa"))
    if unfused is not None:
        candidates.append(Candidate("bmm + triton softmax + bmm", {"impl": "unfused"}, lambda: unfused, "unfused"))
    key = TuningKey(kind="attention", template=_source_hash(), shapes=group_shapes(group),
                    strides=group_strides(group), dtypes=group_dtypes(group), extra=extra)
    choice = tuner_for(ctx).choose(key, candidates, probe.make)
    probe.release()
    cand = choice.candidate
    config = dict(cand.config)
    if cand.name in choice.timings_ms:
        config["tuned_ms"] = round(choice.timings_ms[cand.name], 5)
    ours = cand.impl == "triton"  # writes the planned output (SDPA and the unfused path allocate theirs)
    return Kernel(kind="attention", impl=cand.impl, ops=group.ops, fn=choice.runner, config=config,
                  tuned_from_cache=choice.from_cache, supports_out=ours, out_layouts=layouts if ours else ())


_SOURCE_HASH: List[str] = []


def _source_hash() -> str:
    """Tuning results are tied to the kernels' sources, this module's and the unfused path's
    (a changed kernel re-tunes)."""
    if not _SOURCE_HASH:
        import hashlib
        import os

        digest = hashlib.sha256()
        for path in (__file__, *(os.path.join(os.path.dirname(__file__), name)
                                  for name in ("attention_unfused.py", "attention_decode.py"))):
            with open(path, "rb") as f:
                digest.update(f.read())
        _SOURCE_HASH.append(digest.hexdigest()[:16])
    return _SOURCE_HASH[0]


def _out_layout(q_shape, v_shape, dtype: torch.dtype, out_perm: Optional[Sequence[int]] = None):
    """The output the kernel writes: [B, H, Sq, Dv] in q's dtype, contiguous, or with its dims
    in memory in ``out_perm`` order (outer first; the op's ``out_perm``)."""
    shape = (*(int(s) for s in tuple(q_shape)[:3]), int(v_shape[3]))
    return shape, strides_for(shape, range(4) if out_perm is None else out_perm), dtype


_TL_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _in_layout(t: torch.Tensor, layout) -> torch.Tensor:
    """``t`` copied into ``layout`` (shape, strides, dtype): for candidates that allocate their
    own contiguous output (SDPA, the unfused path) when the op asks for another layout."""
    shape, stride, dtype = layout
    return torch.empty_strided(shape, stride, dtype=dtype, device=t.device).copy_(t)
