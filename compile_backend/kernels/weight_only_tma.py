"""The weight-only decode GEMV with its weights streamed by TMA (issue #20; Hopper and later).

Why: the elementwise GEMV (:mod:`.gemv`) holds its loads in flight in registers, so a program
either issues a whole K slice at once and does all its math after the last byte arrives (the
one-wave loops the tuner picks: H100, session 31, INT4 gate/up 5632 x 2048 at M = 1 took 6.4 us,
51% of a copy of its bytes; its math, ~6.4 SASS instructions a weight, is ~2.3 us of issue on
132 SMs and the transfer ~2 us: run one after the other, not together), or keeps a tile or two in
flight and waits on each. Triton pipelines tensor-descriptor loads in a ``tl.range(num_stages=)``
loop whatever consumes them (sm_90 TTGIR, Triton 3.6: ``STAGES - 1`` asynchronous TMA copies into
a shared-memory ring ahead of the step being computed; pointer loads not feeding ``tl.dot`` are
never pipelined), so here the bytes in flight live in shared memory and each step's dequantize
and multiply-adds overlap the next steps' transfers.

Layers, as every kernel here: ``_tma_gemv_kernel`` (one x row a program, ``BLOCK_N`` weight
rows, a K slice; the weights through a descriptor, x by pointer or descriptor, an INT4 step's
scales by pointer, from L1 after the first);
:func:`tma_gemv_ready` (which operands TMA can take) and :func:`tma_gemv` (checks, descriptors,
launch, and ``weight_only_parts.split_sum`` for split-K); the reference is
``weight_only.weight_only_linear_reference``. Numerics are the other paths': each weight
``code * scale`` rounded to x's dtype (``weight_only_parts.words_to`` / ``codes_to``), products
and sums in fp32, bias in fp32, one rounding at the end.

Operands TMA takes (else :func:`tma_gemv` raises, naming the cause): 16-bit x with unit stride
along K (16-byte aligned rows where x too goes through a descriptor); codes with 16-byte aligned
bases and row strides (INT8: K a multiple of 16, steps past 256 codes with K a multiple of 256:
3-D boxes; INT4: K a multiple of 32, read as 16-bit words of four codes); an INT4 step a divisor
of its scale group, or whole groups with K a multiple of the group. This module imports Triton: only kernel modules and tests import it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .base import triton_interpret
from .launch import next_pow2
from .weight_only_parts import (TMA_INT8_BOX_K, auto_split, codes_to, int4_step, int8_step, k_slices, round_to, split_sum, words_math,
                                words_to)

INT32_MAX = 2**31 - 1
#: the longest INT8 step (codes a row): four boxes of 256
INT8_MAX_STEP = 1024


@triton.jit
def _tma_gemv_kernel(w_desc, x_desc, x_ptr, s_ptr, b_ptr, out_ptr, M, N, K, K_SLICE, sxm, ssn,
                     INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFT_BF16: tl.constexpr, NATIVE: tl.constexpr, PARTIAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, X_TMA: tl.constexpr):
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n0 = pid_n * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    # K_SLICE is a multiple of BLOCK_K, and an INT4 step is whole groups or a part of one: no
    # step crosses a slice or a group; TMA reads zeros past N and K (no masks on the weights)
    k_lo = pid_k * K_SLICE
    k_hi = tl.minimum(k_lo + K_SLICE, K)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    # INT4: a step is U groups of Q words (U = 1: Q words of one group)
    U: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    Q: tl.constexpr = (GROUP if BLOCK_K > GROUP else BLOCK_K) // 4
    if INT4:
        part = tl.zeros([BLOCK_N, U, Q], tl.float32)
    else:
        row_scale = tl.load(s_ptr + rn * ssn, mask=n_ok, other=0.0)[:, None]
        part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        if INT4:
            # [BLOCK_N, U, Q] unsigned words (the descriptor's are int16: shifts sign-extend) and
            # their scales by pointer, not pipelined: a row's scales share 32-byte sectors (16
            # groups), so after the first step they mostly come from L1 (a descriptor needs
            # 16-byte rows; picking the step's column from the slice's scales held in registers
            # took a cross-lane sum a step: 112 SHFL in the loop, sm_90)
            words, scale = int4_step(w_desc, s_ptr, rn, n_ok, n0, k0, K, ssn, GROUP, BLOCK_K)
            if X_TMA:
                x = tl.reshape(x_desc.load([m, k0]), [BLOCK_K]).to(tl.float32)
                part = words_math(part, words, scale, x, DTYPE, NATIVE)
            else:
                # x at each nibble's k (4j + i) loaded in the layout the products take
                w0, w1, w2, w3 = words_to(words, scale, DTYPE, NATIVE)
                kq = k0 + (tl.arange(0, U) * GROUP)[:, None] + 4 * tl.arange(0, Q)[None, :]
                xq = x_ptr + m * sxm + kq
                part += w0.to(tl.float32) * tl.load(xq, mask=kq < K, other=0.0).to(tl.float32)[None, :, :]
                part += w1.to(tl.float32) * tl.load(xq + 1, mask=kq + 1 < K, other=0.0).to(tl.float32)[None, :, :]
                part += w2.to(tl.float32) * tl.load(xq + 2, mask=kq + 2 < K, other=0.0).to(tl.float32)[None, :, :]
                part += w3.to(tl.float32) * tl.load(xq + 3, mask=kq + 3 < K, other=0.0).to(tl.float32)[None, :, :]
        else:
            w = codes_to(int8_step(w_desc, n0, k0, BLOCK_N, BLOCK_K), row_scale, DTYPE, NATIVE)
            if X_TMA:
                x = tl.reshape(x_desc.load([m, k0]), [BLOCK_K]).to(tl.float32)
            else:
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + m * sxm + rk, mask=rk < K, other=0.0).to(tl.float32)
            part += w.to(tl.float32) * x[None, :]
    if INT4:
        acc = tl.sum(tl.reshape(part, [BLOCK_N, U * Q]), 1)
    else:
        acc = tl.sum(part, 1)
    if PARTIAL:  # this K slice's fp32 sums: [split, M, N]
        tl.store(out_ptr + (pid_k * M + m) * N + rn, acc, mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * N + rn, round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=n_ok)


def tma_weights_ready(codes: torch.Tensor, k: int, int4: bool, group: int, block_k: int) -> str:
    """Why TMA cannot stream these weights ('' when it can): 16-byte aligned base and rows, unit
    stride; INT8: K a multiple of 16, a step in [16, 256] or of whole 256s (up to 1024) with K a
    multiple of 256; INT4: K a multiple of 32, a step of 32
    or more dividing the group, or of whole groups with K a multiple of the group."""
    if int4 and (k % 32 or block_k < 32 or (group % block_k if block_k <= group else block_k % group or k % group)):
        return (f"INT4 needs K a multiple of 32 (got {k}) and a step of 32 or more that divides the group, or of "
                f"whole groups with K a multiple of the group (step {block_k}, group {group})")
    if not int4 and (k % 16 or block_k < 16 or block_k > INT8_MAX_STEP
                     or (block_k > TMA_INT8_BOX_K and (k % TMA_INT8_BOX_K or block_k % TMA_INT8_BOX_K))):
        return (f"INT8 needs K a multiple of 16 (got {k}) and a step in [16, {TMA_INT8_BOX_K}], or of whole "
                f"{TMA_INT8_BOX_K}s up to {INT8_MAX_STEP} with K a multiple of {TMA_INT8_BOX_K} (step {block_k})")
    if codes.stride(1) != 1 or codes.stride(0) * codes.element_size() % 16 or codes.data_ptr() % 16:
        return "the codes' rows are not 16-byte aligned with unit stride"
    if codes.device.type == "cuda" and torch.cuda.get_device_capability(codes.device)[0] < 9:
        return "TMA needs compute capability 9.0 or later"
    return ""


def int8_step_for(block_k: int, k: int) -> int:
    """The INT8 step a config's ``block_k`` runs at for K: at most :data:`INT8_MAX_STEP`, past
    one box (256 codes) only where K is whole boxes (else 256), at least 16."""
    step = max(16, min(block_k, INT8_MAX_STEP, next_pow2(k)))
    return min(step, TMA_INT8_BOX_K) if k % TMA_INT8_BOX_K else step


def int4_step_for(block_k: int, k: int, group: int) -> int:
    """The INT4 step (weights a row) a config's ``block_k`` runs at for K and the scale group: at
    most 1024 (256 words: TMA's box), whole groups past one only where K is whole groups (else
    one group)."""
    step = min(block_k, 1024, max(group, next_pow2(k)))
    return group if step > group and k % group else step


def int4_descriptor(codes: torch.Tensor, k: int, group: int, block_n: int, block_k: int):
    """The TMA descriptor :func:`weight_only_parts.int4_step` reads packed INT4 ``codes``
    [N, K / 2] through (checked by :func:`tma_weights_ready`), as 16-bit words of four codes:
    [block_n, block_k / 4] boxes of [N, K / 4], or for steps of whole groups [block_n,
    block_k / group, group / 4] boxes of the words viewed [N, K / group, group / 4]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n = codes.shape[0]
    words = codes.view(torch.int16)  # [N, K / 4]: four codes a word, the lowest nibble first
    if block_k <= group:
        return TensorDescriptor(words, [n, k // 4], [words.stride(0), 1], [block_n, block_k // 4])
    words = words.as_strided((n, k // group, group // 4), (words.stride(0), group // 4, 1))
    return TensorDescriptor(words, list(words.shape), list(words.stride()), [block_n, block_k // group, group // 4])


def int8_descriptor(codes: torch.Tensor, k: int, block_n: int, block_k: int):
    """The TMA descriptor :func:`weight_only_parts.int8_step` reads INT8 ``codes`` [N, K] through
    (checked by :func:`tma_weights_ready`): [block_n, block_k] boxes, or past 256 codes a step
    [block_n, block_k / 256, 256] boxes of the codes viewed [N, K / 256, 256]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n = codes.shape[0]
    if block_k <= TMA_INT8_BOX_K:
        return TensorDescriptor(codes, [n, k], [codes.stride(0), 1], [block_n, block_k])
    box = TMA_INT8_BOX_K
    return TensorDescriptor(codes, [n, k // box, box], [codes.stride(0), box, 1], [block_n, block_k // box, box])


def tma_gemv_ready(x: torch.Tensor, codes: torch.Tensor, int4: bool, group: int, block_k: int,
                   x_tma: bool = False) -> str:
    """Why :func:`tma_gemv` cannot take these operands ('' when it can): :func:`tma_weights_ready`,
    16-bit x, and with ``x_tma`` (x through its own descriptor) x's rows 16-byte aligned."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x is {x.dtype}: the TMA path takes fp16/bf16 activations"
    why = tma_weights_ready(codes, x.shape[1], int4, group, block_k)
    if why:
        return why
    if x_tma and (x.stride(1) != 1 or x.stride(0) * 2 % 16 or x.data_ptr() % 16):
        return "x's rows are not 16-byte aligned with unit stride along K (needed with tma_x)"
    return ""


def tma_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias, out: torch.Tensor, *, int4: bool,
             group: int, block_n: int, block_k: int, stages: int, warps: int, split_k: int = 0,
             waves: int = 8, x_tma: bool = False) -> None:
    """``out [M, N] = x [M, K] @ dequantize(codes, scales)^T + bias`` (operands as
    ``weight_only.weight_only_linear`` checked them; x contiguous along K). ``block_k`` is the
    step in weights along K (INT4: at most 1024, whole groups past one; INT8:
    :func:`int8_step_for`); ``split_k`` 0: enough slices for ``waves`` programs an SM. Raises
    ValueError naming the cause where TMA cannot take them."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (m, k), n = x.shape, codes.shape[0]
    bn = max(16, min(block_n, next_pow2(n)))
    # INT4: up to 256 words a row a step (TMA's box), whole groups past one (several groups a
    # step only where K is whole groups: else one group's step); INT8: int8_step_for
    bk = int4_step_for(block_k, k, group) if int4 else int8_step_for(block_k, k)
    why = tma_gemv_ready(x, codes, int4, group, bk, x_tma)
    if why:
        raise ValueError(f"the TMA GEMV cannot take these operands: {why}; use another weight-only path "
                         "(weight_only.CONFIGS 'gemv')")
    k_tiles = triton.cdiv(k, bk)
    split = split_k or auto_split(triton.cdiv(n, bn) * m, k_tiles, x.device, waves, min_tiles=2)
    k_slice, split = k_slices(k, bk, split)
    if max(x.stride(0) * m, codes.numel(), split * out.numel()) > INT32_MAX:
        raise ValueError("an operand (or the split-K workspace) has 2**31 elements or more: split the call")
    w_desc = int4_descriptor(codes, k, group, bn, bk) if int4 else int8_descriptor(codes, k, bn, bk)
    # x by pointer unless x_tma (then the descriptor is never read: x itself is passed)
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [1, bk]) if x_tma else x
    interpret = triton_interpret()
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    b = bias if bias is not None else out  # never read without HAS_BIAS
    _tma_gemv_kernel[(triton.cdiv(n, bn), split, m)](
        w_desc, x_desc, x, scales, b, part, m, n, k, k_slice, x.stride(0), scales.stride(0),
        INT4=int4, GROUP=group if int4 else 1,
        HAS_BIAS=bias is not None, SOFT_BF16=interpret, NATIVE=not interpret, PARTIAL=split > 1,
        BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, X_TMA=x_tma, num_warps=warps)
    if split > 1:
        block = 1024
        split_sum[(triton.cdiv(m * n, block),)](part, b, out, m * n, n, split, HAS_BIAS=bias is not None,
                                                SOFT_BF16=interpret, BLOCK=block)


__all__ = ["tma_gemv", "tma_gemv_ready", "tma_weights_ready", "int8_descriptor", "int8_step_for", "int4_descriptor",
           "int4_step_for", "INT8_MAX_STEP"]
