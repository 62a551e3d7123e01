"""Pieces the weight-only kernels share: the hand-written ones (:mod:`.weight_only`) and the
generated fused GEMV (:mod:`.gemv`, which also takes float weights), whose source imports the
``@triton.jit`` helpers below by name.

Numerics are ``weight_only_ref``'s: a weight is ``code * scale`` in fp32 (exact: an 8-bit code
times an 11-bit fp16 significand), rounded to the activations' dtype, the operand the reference
multiplies. This module imports Triton: only kernel modules import it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_to(v, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 ``v`` rounded to DTYPE, to nearest even. The interpreter truncates fp32 -> bf16
    (Triton 3.9; see expr_casts), so there (SOFT_BF16) bf16 is rounded on the bits, NaN kept."""
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, u.to(tl.float32, bitcast=True))
    return v.to(DTYPE)


@triton.jit
def int8_weights(w_ptr, rn, rk, n_ok, K, swn, scale, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """INT8 weight rows ``rn`` at columns ``rk`` dequantized with their ``scale`` ([BLOCK_N, 1]
    fp32), rounded to DTYPE, as fp32; 0 past N and K."""
    ok = n_ok[:, None] & (rk < K)[None, :]
    codes = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=ok, other=0)
    return round_to(codes.to(tl.float32) * scale, DTYPE, SOFT_BF16).to(tl.float32)


@triton.jit
def int4_weights(w_ptr, s_ptr, rn, rb, k0, n_ok, K, swn, ssn, GROUP: tl.constexpr, DTYPE: tl.constexpr,
                 SOFT_BF16: tl.constexpr):
    """INT4 weight rows ``rn`` at packed bytes ``rb`` (byte j holds k = 2j in its low nibble,
    2j + 1 in its high one), dequantized with the scale of the group holding ``k0`` (the tile
    never straddles two groups), rounded to DTYPE: (low, high) as fp32, 0 past N and K."""
    ok = n_ok[:, None] & (rb < (K + 1) // 2)[None, :]
    packed = tl.load(w_ptr + rn[:, None] * swn + rb[None, :], mask=ok, other=0).to(tl.int32)
    scale = tl.load(s_ptr + rn * ssn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    lo = round_to(((((packed & 15) ^ 8) - 8).to(tl.float32) * scale), DTYPE, SOFT_BF16).to(tl.float32)
    hi = round_to((((((packed >> 4) & 15) ^ 8) - 8).to(tl.float32) * scale), DTYPE, SOFT_BF16).to(tl.float32)
    return lo, hi


@triton.jit
def float_weights(w_ptr, rn, rk, n_ok, K, swn, swk):
    """Float weight rows ``rn`` at columns ``rk`` (any strides) as fp32; 0 past N and K."""
    ok = n_ok[:, None] & (rk < K)[None, :]
    return tl.load(w_ptr + rn[:, None] * swn + rk[None, :] * swk, mask=ok, other=0.0).to(tl.float32)


def auto_split(programs: int, k_tiles: int, device: torch.device, waves: int = 2, min_tiles: int = 2) -> int:
    """K slices for about ``waves`` programs per SM, each slice at least ``min_tiles`` tiles of K
    long (at most 64 slices). The interpreter runs programs one by one: more of them only cost
    time there."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(waves * sms, programs), k_tiles // min_tiles, 64))


def k_slices(k: int, block_k: int, split: int):
    """(slice length, number of slices) for ``split`` slices asked over K: only slices that hold
    tiles (5 tiles asked in 4 make 3 slices of 2), each a multiple of block_k, so no tile crosses
    into the next slice (or INT4 scale group)."""
    k_tiles = triton.cdiv(k, block_k)
    k_slice = triton.cdiv(k_tiles, min(split, k_tiles)) * block_k
    return k_slice, triton.cdiv(k, k_slice)


__all__ = ["round_to", "int8_weights", "int4_weights", "float_weights", "auto_split", "k_slices"]
