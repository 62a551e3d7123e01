"""Flash-decoding for ``compile_backend::attention`` with a few query rows (a decode step).

Why a kernel of its own: the flash kernel (kernels/attention.py) gives each (query block, batch
x head) one program, so a decode step (Sq = 1, 32 heads) runs 32 programs on 132 SMs, each
walking all keys alone, and the 8 query heads that share a K/V head (grouped-query attention)
each read that head's keys again. Here:

* one program per (key range, batch x kv head): the kv_group query heads x Sq rows that share a
  K/V head are the rows of one tile, so every K/V tile is read once for all of them, and the
  rows fill a tensor-core tile (16 rows: 8 heads of a GQA group, padded);
* the keys are split into ranges (``DecodeConfig.splits``, or enough for ``waves`` programs per
  SM), each range's online softmax (m, l, acc) stored as a partial; the last program of a
  (batch, kv head) to arrive (an atomic counter, acquire/release, reset by that program: the
  runner keeps the counters, ``launch.Counters``) merges the ranges in order (deterministic);
* a key block every row masks out (a bool mask all False, an additive mask all -inf: a static
  KV cache's empty slots past the decode position) is skipped before its K and V are read.

Numerics as the flash kernel: scores in fp32 in the log2 domain, an additive mask rounded to
q's dtype first, fully masked rows give 0 (NaN with ``dead_rows_nan``), the output rounded to
q's dtype, optionally quantized for the next GEMM (``quant``) as the flash kernel does.
Reference: ``attention.attention_reference``. This module imports Triton.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import pdl, quant_ref
from .attention_parts import mask_argument, quantize_output
from .attention_config import DecodeConfig, pow2_at_least
from .base import output_tensor, triton_interpret

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
#: key ranges the merge reads at once (unrolled); more are merged in chunks of this many
MERGE_UNROLL = 16


@triton.jit
def _row_offsets(base, b, head, qi, sb, sh, sm):
    return base + b * sb + head.to(tl.int64) * sh + qi.to(tl.int64) * sm


@triton.jit
def _decode_fwd(
    Q, K, V, Mask, Out, WS, ML, COUNT,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som, sod,
    kv_heads, kv_group, seq_q, seq_k, head_dim, head_dim_v, qk_scale, keys_per_split, quant_inv_scale,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DEAD_ROWS_NAN: tl.constexpr, SPLITS: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    QUANT: tl.constexpr, QMAX: tl.constexpr, ROUND_TO: tl.constexpr, QUANT_FP8: tl.constexpr,
    SOFT_FP8: tl.constexpr, USE_GDC: tl.constexpr, MERGE: tl.constexpr,
):
    if USE_GDC:  # launched with PDL (kernels/pdl.py): the previous kernel done before any load
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // kv_heads).to(tl.int64)
    g = pid_bg % kv_heads
    r = tl.arange(0, BLOCK_R)
    row_ok = r < kv_group * seq_q
    head = g * kv_group + r // seq_q  # the query heads of this K/V head, each with its Sq rows
    qi = r % seq_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(_row_offsets(Q, b, head, qi, sqb, sqh, sqm)[:, None] + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    k_base = K + b * skb + g.to(tl.int64) * skh
    v_base = V + b * svb + g.to(tl.int64) * svh
    mask_rows = _row_offsets(Mask, b, head, qi, smb, smh, smm)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, seq_k)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        ok = row_ok[:, None] & (cols < hi)[None, :]
        if CAUSAL:  # top-left aligned, as SDPA's is_causal
            ok = ok & (cols[None, :] <= qi[:, None])
        if MASK_KIND == 1:
            keep = tl.load(mask_rows[:, None] + cols[None, :] * smn, mask=ok, other=0)
            ok = ok & (keep != 0)
        if MASK_KIND == 2:
            bias = tl.load(mask_rows[:, None] + cols[None, :] * smn, mask=ok, other=float("-inf"))
            bias = bias.to(q.dtype).to(tl.float32)  # rounded to q's dtype, as the op does
            ok = ok & (bias != float("-inf"))
        if tl.max(ok.to(tl.int32)) != 0:  # else every row masks this block out: skip its K and V
            k_t = tl.load(k_base + offs_d[:, None] * skd + cols[None, :] * skn,
                          mask=(offs_d < head_dim)[:, None] & (cols < hi)[None, :], other=0.0)
            # V's load goes out with K's, not after the softmax: one memory round trip less in a
            # program whose key range is one block (a decode step's splits), where nothing else hides it
            v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :] * svd,
                        mask=(cols < hi)[:, None] & (offs_dv < head_dim_v)[None, :], other=0.0)
            if UPCAST_DOT:
                qk = tl.dot(q.to(tl.float32), k_t.to(tl.float32), input_precision="ieee")
            else:
                qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
            qk = qk * qk_scale
            if MASK_KIND == 2:
                bias2 = bias * 1.4426950408889634
                # a finite mask stays finite (finfo.min * log2(e) would overflow to -inf)
                qk += tl.where((bias2 == float("-inf")) & (bias != float("-inf")), -3.4028234663852886e38, bias2)
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp2(-inf - -inf)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if UPCAST_DOT:
                acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
    last = pid_s == pid_s
    if SPLITS > 1:
        # this range's (m, l, acc); the last range of the (batch, kv head) to finish merges all
        part = (pid_s * tl.num_programs(1) + pid_bg) * BLOCK_R
        tl.store(WS + (part + r)[:, None] * BLOCK_DV + offs_dv[None, :], acc)
        tl.store(ML + 2 * (part + r), m_i)
        tl.store(ML + 2 * (part + r) + 1, l_i)
        tl.debug_barrier()  # every thread's partials are written before the release below
        counter = COUNT + pid_bg
        last = tl.atomic_add(counter, 1, sem="acq_rel") == SPLITS - 1
        if last:
            tl.store(counter, 0)  # free for the next launch
            # MERGE ranges unrolled at a time (their loads go out together), chunks in a loop: fully
            # unrolled, 64 ranges took 13 s to compile for sm_90 (16: 1 s; Triton 3.6, session 19)
            m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
            for c in range(0, SPLITS, MERGE):
                for j in tl.static_range(MERGE):
                    rows = ((c + j) * tl.num_programs(1) + pid_bg) * BLOCK_R + r
                    m_i = tl.maximum(m_i, tl.load(ML + 2 * rows, mask=(c + j < SPLITS) & (r >= 0),
                                                  other=float("-inf"), cache_modifier=".cg"))
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
            l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c in range(0, SPLITS, MERGE):  # in range order: the same sum whichever program merges
                for j in tl.static_range(MERGE):
                    rows = ((c + j) * tl.num_programs(1) + pid_bg) * BLOCK_R + r
                    here = (c + j < SPLITS) & (r >= 0)  # a range past SPLITS (the last chunk's tail) adds 0
                    w = tl.math.exp2(tl.load(ML + 2 * rows, mask=here, other=float("-inf"), cache_modifier=".cg") - m_safe)
                    l_i += w * tl.load(ML + 2 * rows + 1, mask=here, other=0.0, cache_modifier=".cg")
                    acc += w[:, None] * tl.load(WS + rows[:, None] * BLOCK_DV + offs_dv[None, :], mask=here[:, None],
                                                other=0.0, cache_modifier=".cg")
    if last:
        if not DEAD_ROWS_NAN:
            l_i = tl.where(l_i == 0.0, 1.0, l_i)  # every key masked out: 0, as SDPA's safe softmax
        out = acc * (1.0 / l_i)[:, None]
        if QUANT:  # the next GEMM's static input quantize, as the flash kernel writes it
            out = quantize_output(out, quant_inv_scale, QMAX, ROUND_TO, QUANT_FP8, SOFT_FP8)
        tl.store(_row_offsets(Out, b, head, qi, sob, soh, som)[:, None] + offs_dv[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < head_dim_v)[None, :])


def splits_for(batch_kv: int, seq_k: int, config: DecodeConfig, device: torch.device) -> Tuple[int, int]:
    """(splits, keys per split, a multiple of block_n) for ``batch_kv`` (batch x kv heads)."""
    blocks = triton.cdiv(seq_k, config.block_n)
    splits = config.splits
    if not splits:
        if device.type != "cuda":
            splits = 1
        else:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = triton.cdiv(config.waves * sms, batch_kv)
    # at most MAX_SPLITS ranges (the merge reads them MERGE_UNROLL at a time)
    per = triton.cdiv(blocks, max(1, min(splits, blocks, MAX_SPLITS))) * config.block_n
    return triton.cdiv(seq_k, per), per


class DecodeRunner:
    """Launches the decode kernel for one built problem; keeps the split counters."""

    def __init__(self, config: DecodeConfig, scale: float, causal: bool, dead_rows_nan: bool,
                 quant: Optional[Tuple[str, float]], allow_tf32: bool, use_pdl: bool = False) -> None:
        from .launch import Counters

        self.config, self.scale, self.causal, self.dead_rows_nan = config, scale, causal, dead_rows_nan
        self.quant, self.allow_tf32, self.use_pdl = quant, allow_tf32, use_pdl
        self.counters = Counters()

    def __call__(self, q, k, v, mask, layout, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, heads, seq_q, head_dim = q.shape
        kv_heads, seq_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
        out = output_tensor((into,), 0, layout, q.device)
        if out.numel() == 0:
            return out
        kind, mask_arg, mask_strides = mask_argument(mask, q, seq_k)
        group = heads // kv_heads
        block_r = pow2_at_least(group * seq_q)
        block_dv = pow2_at_least(head_dim_v)
        splits, per = splits_for(batch * kv_heads, seq_k, self.config, q.device)
        if splits > 1:
            ws = torch.empty(splits * batch * kv_heads * block_r * block_dv, dtype=torch.float32, device=q.device)
            ml = torch.empty(splits * batch * kv_heads * block_r * 2, dtype=torch.float32, device=q.device)
            count = self.counters.get(batch * kv_heads, q.device)
        else:
            ws = ml = count = q  # never read with one range
        interpret = triton_interpret()
        quant = self.quant
        _decode_fwd[(splits, batch * kv_heads)](
            q, k, v, mask_arg, out, ws, ml, count,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            kv_heads, group, seq_q, seq_k, head_dim, head_dim_v, self.scale * LOG2E, per,
            0.0 if quant is None else float(quant[1]),
            MASK_KIND=kind, CAUSAL=self.causal, DEAD_ROWS_NAN=self.dead_rows_nan, SPLITS=splits,
            UPCAST_DOT=interpret and q.dtype == torch.bfloat16 or q.dtype == torch.float32 and not self.allow_tf32,
            DOT_PRECISION="tf32" if self.allow_tf32 else "ieee",
            BLOCK_R=block_r, BLOCK_N=self.config.block_n, BLOCK_D=pow2_at_least(head_dim), BLOCK_DV=block_dv,
            QUANT=quant is not None, QMAX=127.0 if quant is None else quant_ref.QMAX[quant[0]],
            ROUND_TO=_TL_TYPES[q.dtype], QUANT_FP8=quant is not None and quant[0] == "fp8",
            SOFT_FP8=interpret, USE_GDC=self.use_pdl, MERGE=min(splits, MERGE_UNROLL),
            num_warps=self.config.num_warps, num_stages=1, **pdl.launch_kwargs(self.use_pdl),
        )
        return out


_TL_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

__all__ = ["DecodeRunner", "splits_for"]
