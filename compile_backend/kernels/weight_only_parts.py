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
    fp32, an fp16 value), rounded to DTYPE, as fp32; 0 past N and K. For 16-bit DTYPE through
    :func:`int8_weights16`: no int -> float conversion a weight (Hopper issues those at 1/8 of the
    FMA rate; the decode GEMV's elementwise loop was bound by them: ``kernel_sass --gemv``)."""
    if DTYPE != tl.float32:
        return int8_weights16(w_ptr, rn, rk, n_ok, K, swn, scale.to(tl.float16), DTYPE, not SOFT_BF16).to(tl.float32)
    ok = n_ok[:, None] & (rk < K)[None, :]
    codes = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=ok, other=0)
    return round_to(codes.to(tl.float32) * scale, DTYPE, SOFT_BF16).to(tl.float32)


@triton.jit
def packed_bytes_ok(rb, K, ODD_K: tl.constexpr):
    """Which packed INT4 bytes ``rb`` hold codes below K. With K even the bound is K // 2, which
    keeps K's divisibility (Triton specialises K on 16), so the mask is constant over 8 bytes
    and the codes load 8 bytes at a time; ``(K + 1) // 2`` (needed only for an odd K) loses it
    and the loads went one byte each (sm_90 SASS of the decode GEMV: 52 loads a K step, 24 with
    K // 2; ``benchmarks/kernel_sass.py``)."""
    if ODD_K:
        return rb < (K + 1) // 2
    return rb < K // 2


@triton.jit
def int4_weights(w_ptr, s_ptr, rn, rb, k0, n_ok, K, swn, ssn, GROUP: tl.constexpr, DTYPE: tl.constexpr,
                 SOFT_BF16: tl.constexpr, ODD_K: tl.constexpr):
    """INT4 weight rows ``rn`` at packed bytes ``rb`` (byte j holds k = 2j in its low nibble,
    2j + 1 in its high one), dequantized with the scale of the group holding ``k0`` (the tile
    never straddles two groups), rounded to DTYPE: (low, high) as fp32, 0 past N and K (K: the
    bound the caller masks at, e.g. its K slice's end; a tile past it loads no scale). ODD_K:
    K may be odd (see :func:`packed_bytes_ok`). For 16-bit DTYPE through :func:`int4_weights16`
    (see :func:`int8_weights`)."""
    if DTYPE != tl.float32:
        lo16, hi16 = int4_weights16(w_ptr, s_ptr, rn, rb, k0, n_ok, K, swn, ssn, GROUP, DTYPE, ODD_K)
        return lo16.to(tl.float32), hi16.to(tl.float32)
    ok = n_ok[:, None] & packed_bytes_ok(rb, K, ODD_K)[None, :]
    packed = tl.load(w_ptr + rn[:, None] * swn + rb[None, :], mask=ok, other=0).to(tl.int32)
    # rn * 0 + k0: a vector (the interpreter refuses a mask term without a shape)
    scale = tl.load(s_ptr + rn * ssn + k0 // GROUP, mask=n_ok & (rn * 0 + k0 < K), other=0.0).to(tl.float32)[:, None]
    lo = round_to(((((packed & 15) ^ 8) - 8).to(tl.float32) * scale), DTYPE, SOFT_BF16).to(tl.float32)
    hi = round_to((((((packed >> 4) & 15) ^ 8) - 8).to(tl.float32) * scale), DTYPE, SOFT_BF16).to(tl.float32)
    return lo, hi


@triton.jit
def offset_codes_to(u, OFFSET: tl.constexpr, scale, DTYPE: tl.constexpr):
    """``(u - OFFSET) * scale`` rounded to DTYPE (fp16 or bf16), returned in DTYPE: ``u`` int32
    codes offset into [0, 256), ``scale`` fp16. No int->float or float->float conversion
    instruction per weight (Hopper issues those at 1/8 of the FMA rate; session 8 found them not
    to be the GEMV's main bound, but they cost issue slots): the code becomes a float by its bits
    (2**10 + u is exact in fp16, 2**23 + u in fp32).
    fp16: one fp16 multiply, correctly rounded, equals fp32's exact product rounded to fp16.
    bf16 (an fp16 scale is not a bf16 value): the exact fp32 product rounded to nearest even on
    its bits (finite: a code times a finite fp16 scale)."""
    if DTYPE == tl.float16:
        c = (u | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)
        return (c.to(tl.float16) * scale).to(tl.float16)
    else:
        c = (u.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)
        b = (c * scale.to(tl.float32)).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)


#: INT8 codes to fp16 four at a time (PTX): a 32-bit register of four codes ($2) and their
#: rows' fp16 scales in pairs ($3, $4) in, ``code * scale`` as two f16x2 ($0, $1) out. The top
#: bits flipped (code + 128) and ``prmt`` puts each byte under an 0x64 byte: fp16 1024 + code
#: + 128 (exact); subtracting 1152 is exact, the multiply rounds once (see _INT4_PAIRS_F16)
_INT8_QUADS_F16 = tl.constexpr("""{
.reg .b32 t, a, b, h, o;
mov.b32 h, 0x64646464;
mov.b32 o, 0x64806480;
xor.b32 t, $2, 0x80808080;
prmt.b32 a, t, h, 0x4140;
prmt.b32 b, t, h, 0x4342;
sub.rn.f16x2 a, a, o;
sub.rn.f16x2 b, b, o;
mul.rn.f16x2 $0, a, $3;
mul.rn.f16x2 $1, b, $4;
}""")


#: INT8 codes to bf16 four at a time (PTX): four codes ($2) and each one's row scale in fp32
#: ($3..$6, an fp16 value) in, ``code * scale`` rounded to bf16 as two bf16x2 ($0, $1) out. A
#: byte put under an fp32 exponent by ``lop3`` (top bit flipped: code + 128) is exact:
#: byte 0 at bits 0-7 under 2**23 reads 2**23 + code + 128, byte 1 at bits 8-15 under 2**15
#: reads 2**15 + code + 128 (the shift by 16 serves bytes 2 and 3); subtracting the bias
#: is exact, so is the product with an fp16 scale (8 + 11 significant bits), and
#: ``cvt.rn.bf16x2.f32`` rounds it once to nearest even: the reference's bf16 weight. Without
#: this the bf16 loop rounded on the bits in 16-bit lanes: 12.3 SASS a weight against fp16's
#: 5.5 (sm_90), and bf16 W8A16 decoded no faster than bf16 (session 34, H100).
_INT8_QUADS_BF16 = tl.constexpr("""{
.reg .b32 s, a, b, k, l;
mov.b32 k, 0x4B000080;
mov.b32 l, 0x47008000;
shr.b32 s, $2, 16;
lop3.b32 a, $2, 0x000000FF, k, 0x6a;
lop3.b32 b, $2, 0x0000FF00, l, 0x6a;
sub.rn.f32 a, a, k;
sub.rn.f32 b, b, l;
mul.rn.f32 a, a, $3;
mul.rn.f32 b, b, $4;
cvt.rn.bf16x2.f32 $0, b, a;
lop3.b32 a, s, 0x000000FF, k, 0x6a;
lop3.b32 b, s, 0x0000FF00, l, 0x6a;
sub.rn.f32 a, a, k;
sub.rn.f32 b, b, l;
mul.rn.f32 a, a, $5;
mul.rn.f32 b, b, $6;
cvt.rn.bf16x2.f32 $1, b, a;
}""")


@triton.jit
def int8_weights16(w_ptr, rn, rk, n_ok, K, swn, scale, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """:func:`int8_weights` for 16-bit DTYPE, as DTYPE (``scale``: [BLOCK_N, 1] fp16). NATIVE
    (compiled for a GPU) with fp16: four codes a register through ``_INT8_QUADS_F16``."""
    ok = n_ok[:, None] & (rk < K)[None, :]
    codes = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=ok, other=0)
    return codes_to(codes, scale, DTYPE, NATIVE)


@triton.jit
def codes_to(codes, scale, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """INT8 ``codes`` (any shape; ``scale``: fp16, broadcastable to it) dequantized as DTYPE
    (16-bit): see :func:`int8_weights16`."""
    if NATIVE and DTYPE == tl.float16:
        return tl.inline_asm_elementwise(_INT8_QUADS_F16, "=r,=r,r,r,r", [codes, tl.broadcast_to(scale, codes.shape)],
                                         dtype=tl.float16, is_pure=True, pack=4)
    if NATIVE and DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(_INT8_QUADS_BF16, "=r,=r,r,r,r,r,r",
                                         [codes, tl.broadcast_to(scale.to(tl.float32), codes.shape)],
                                         dtype=tl.bfloat16, is_pure=True, pack=4)
    # code + 128 is the code's byte with its top bit flipped: 16-bit lanes, no add
    return offset_codes_to(codes.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x80, 128, scale, DTYPE)


#: INT8 codes a TMA box holds along K (a box is at most 256 elements a dimension): a longer step
#: is a [rows, step / 256, 256] box of the codes viewed [N, K / 256, 256] (K a multiple of 256)
TMA_INT8_BOX_K = 256


@triton.jit
def int8_step(desc, n0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A step's INT8 codes [BLOCK_N, BLOCK_K] from rows n0.., columns k0.. through ``desc`` (the
    descriptor ``weight_only_tma.int8_descriptor`` makes: 2-D up to 256 codes a step, 3-D past)."""
    if BLOCK_K > 256:  # TMA_INT8_BOX_K (a literal: the JIT reads no plain globals)
        codes = tl.reshape(desc.load([n0, k0 // 256, 0]), [BLOCK_N, BLOCK_K])
    else:  # (an if / else: code after a returning constexpr branch is still compiled)
        codes = desc.load([n0, k0])
    return codes


@triton.jit
def int4_step(desc, s_ptr, rn, n_ok, n0, k0, K, ssn, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """A step's INT4 codes through ``desc`` (``weight_only_tma.int4_descriptor``) as unsigned
    16-bit words [BLOCK_N, U, Q] (U groups of Q words; U = 1: Q words of one group) and their
    scales [BLOCK_N, U, 1] by pointer (a row's share 32-byte sectors: from L1 after the first)."""
    U: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    if BLOCK_K > GROUP:
        words = desc.load([n0, k0 // GROUP, 0])
    else:
        words = tl.expand_dims(desc.load([n0, k0 // 4]), 1)
    g = k0 // GROUP + tl.arange(0, U)
    scale = tl.load(s_ptr + rn[:, None] * ssn + g[None, :], mask=n_ok[:, None] & (g < tl.cdiv(K, GROUP))[None, :],
                    other=0.0)
    return words.to(tl.uint16, bitcast=True), scale[:, :, None]


@triton.jit
def int4_weights16(w_ptr, s_ptr, rn, rb, k0, n_ok, K, swn, ssn, GROUP: tl.constexpr, DTYPE: tl.constexpr,
                   ODD_K: tl.constexpr):
    """:func:`int4_weights` for 16-bit DTYPE: (low, high) as DTYPE. A nibble's two's complement
    plus 8 is the nibble with its top bit flipped."""
    ok = n_ok[:, None] & packed_bytes_ok(rb, K, ODD_K)[None, :]
    packed = tl.load(w_ptr + rn[:, None] * swn + rb[None, :], mask=ok, other=0).to(tl.uint16)  # 16-bit lanes
    scale = tl.load(s_ptr + rn * ssn + k0 // GROUP, mask=n_ok & (rn * 0 + k0 < K), other=0.0)[:, None]
    lo = offset_codes_to((packed & 15) ^ 8, 8, scale, DTYPE)
    hi = offset_codes_to(((packed >> 4) & 15) ^ 8, 8, scale, DTYPE)
    return lo, hi


#: INT4 codes to fp16 two at a time (PTX): a 32-bit register holding two 16-bit words of
#: codes ($4) and their rows' fp16 scales as a pair ($5) in, the pair's nibble i as
#: ``(code - 8) * scale`` in f16x2 ($i) out. ``lop3`` 0x6a is ``(a & b) ^ c``: the nibble, its
#: top bit flipped (two's complement + 8) and an exponent set make an exact fp16: nibbles 0 and
#: 2 at bits 0-3 under 0x6400 are 1024 + code + 8; nibbles 1 and 3 left at bits 4-7 under
#: 0x5400 (64, whose mantissa's unit there is 1/16 * 16 = 1) are 64 + code + 8, so one shift
#: serves four nibbles (three did: 15 instructions for 8 weights, now 13). Subtracting 1032 or
#: 72 is exact, the multiply rounds once, as the reference's fp32 product rounded to fp16
#: (``.rn``: ptxas does not contract it into an fma). tests/kernels/test_weight_only_ptx.py runs
#: this text over every 16-bit word (CPU); test_gemv.py checks the compiled kernel (GPU).
_INT4_PAIRS_F16 = tl.constexpr("""{
.reg .b32 t<4>, s, m, n, o, p;
mov.b32 m, 0x000F000F;
mov.b32 n, 0x00F000F0;
mov.b32 o, 0x64086408;
mov.b32 p, 0x54805480;
shr.b32 s, $4, 8;
lop3.b32 t0, $4, m, o, 0x6a;
lop3.b32 t1, $4, n, p, 0x6a;
lop3.b32 t2, s, m, o, 0x6a;
lop3.b32 t3, s, n, p, 0x6a;
sub.rn.f16x2 t0, t0, o;
sub.rn.f16x2 t1, t1, p;
sub.rn.f16x2 t2, t2, o;
sub.rn.f16x2 t3, t3, p;
mul.rn.f16x2 $0, t0, $5;
mul.rn.f16x2 $1, t1, $5;
mul.rn.f16x2 $2, t2, $5;
mul.rn.f16x2 $3, t3, $5;
}""")


#: INT4 codes to bf16 (PTX): two 16-bit words of codes ($4) and each word's row scale in fp32
#: ($5, $6: fp16 values) in, nibble i of both words as ``code * scale`` rounded to bf16 in a
#: bf16x2 ($i) out. ``lop3`` puts nibble i, top bit flipped (code + 8), under the fp32 exponent
#: whose unit is the nibble's lowest bit (2**23, 2**19, 2**15, 2**11 for bits 0, 4, 8, 12): an
#: exact 2**e + code + 8 with no shift (one shift by 16 serves the second word); less the bias
#: (exact), times the scale (exact: 4 + 11 significant bits), ``cvt.rn.bf16x2.f32`` rounds once
#: to nearest even, as the reference. The bf16 loop rounded on the bits in 16-bit lanes before:
#: 14.5 SASS a weight against fp16's 5.6 (sm_90, 32x128 u2), and bf16 W4A16 decoded no faster
#: than bf16 (session 34, H100: Llama-3-8B's shape 6.70 ms against 5.98).
_INT4_PAIRS_BF16 = tl.constexpr("""{
.reg .b32 s, a, b, k<4>;
mov.b32 k0, 0x4B000008;
mov.b32 k1, 0x49000080;
mov.b32 k2, 0x47000800;
mov.b32 k3, 0x45008000;
shr.b32 s, $4, 16;
lop3.b32 a, $4, 0x0000000F, k0, 0x6a;
lop3.b32 b, s, 0x0000000F, k0, 0x6a;
sub.rn.f32 a, a, k0;
sub.rn.f32 b, b, k0;
mul.rn.f32 a, a, $5;
mul.rn.f32 b, b, $6;
cvt.rn.bf16x2.f32 $0, b, a;
lop3.b32 a, $4, 0x000000F0, k1, 0x6a;
lop3.b32 b, s, 0x000000F0, k1, 0x6a;
sub.rn.f32 a, a, k1;
sub.rn.f32 b, b, k1;
mul.rn.f32 a, a, $5;
mul.rn.f32 b, b, $6;
cvt.rn.bf16x2.f32 $1, b, a;
lop3.b32 a, $4, 0x00000F00, k2, 0x6a;
lop3.b32 b, s, 0x00000F00, k2, 0x6a;
sub.rn.f32 a, a, k2;
sub.rn.f32 b, b, k2;
mul.rn.f32 a, a, $5;
mul.rn.f32 b, b, $6;
cvt.rn.bf16x2.f32 $2, b, a;
lop3.b32 a, $4, 0x0000F000, k3, 0x6a;
lop3.b32 b, s, 0x0000F000, k3, 0x6a;
sub.rn.f32 a, a, k3;
sub.rn.f32 b, b, k3;
mul.rn.f32 a, a, $5;
mul.rn.f32 b, b, $6;
cvt.rn.bf16x2.f32 $3, b, a;
}""")


@triton.jit
def words_to(words, scale, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """The four weights of each 16-bit word of packed INT4 codes (word j holds k = 4j .. 4j + 3,
    a nibble each from the lowest; any shape; ``scale``: fp16, broadcastable to it),
    dequantized as :func:`int4_weights16`, as DTYPE. Read as words, the nibbles are masked and
    shifted in 16-bit lanes as loaded: no byte permute to widen each code (the byte loads' loop
    spent 118 of its 498 instructions on PRMT, sm_90). NATIVE (compiled for a GPU, not the
    interpreter) with fp16: two words a register through ``_INT4_PAIRS_F16`` (Triton's own
    lowering worked on one 16-bit word a register and packed the pairs for the f16x2
    arithmetic after: 138 shift/logic/permute instructions for 64 weights in the main loop,
    sm_90; this takes 56)."""
    if NATIVE and DTYPE == tl.float16:
        return tl.inline_asm_elementwise(_INT4_PAIRS_F16, "=r,=r,=r,=r,r,r", [words, tl.broadcast_to(scale, words.shape)],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
    if NATIVE and DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(_INT4_PAIRS_BF16, "=r,=r,=r,=r,r,r,r",
                                         [words, tl.broadcast_to(scale.to(tl.float32), words.shape)],
                                         dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    w0 = offset_codes_to((words & 15) ^ 8, 8, scale, DTYPE)
    w1 = offset_codes_to(((words >> 4) & 15) ^ 8, 8, scale, DTYPE)
    w2 = offset_codes_to(((words >> 8) & 15) ^ 8, 8, scale, DTYPE)
    w3 = offset_codes_to((words >> 12) ^ 8, 8, scale, DTYPE)
    return w0, w1, w2, w3


@triton.jit
def step_weights(W, S, rn, n_ok, k_step, k_hi, swn, ssn, WEIGHTS: tl.constexpr, ONE_LOAD: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr):
    """The weights of one main-loop step of the decode GEMV, all in one load: INT4 as 16-bit
    words [BLOCK_N, UNROLL, BLOCK_K / 4] with each tile's fp16 scale [BLOCK_N, UNROLL, 1];
    INT8 as codes [BLOCK_N, UNROLL, BLOCK_K] (their scale, one a row, is loaded once by the
    caller: returned twice). Masked past ``k_hi``. Without ONE_LOAD (other loops) nothing is
    loaded: the GEMV calls this for its first step before its prologue either way."""
    if ONE_LOAD and WEIGHTS == 1:
        k0s = k_step + tl.arange(0, UNROLL) * BLOCK_K  # each tile's first k (a tile never straddles two groups)
        rq = (k0s // 4)[:, None] + tl.arange(0, BLOCK_K // 4)[None, :]
        w16 = W.to(tl.pointer_type(tl.uint16)) + rn[:, None, None] * (swn // 2)
        words = tl.load(w16 + rq[None, :, :], mask=n_ok[:, None, None] & (rq < k_hi // 4)[None, :, :], other=0)
        scale = tl.load(S + rn[:, None] * ssn + (k0s // GROUP)[None, :], mask=n_ok[:, None] & (k0s < k_hi)[None, :],
                        other=0.0)
        return words, scale[:, :, None]
    elif ONE_LOAD and WEIGHTS == 0:
        rk = k_step + (tl.arange(0, UNROLL) * BLOCK_K)[:, None] + tl.arange(0, BLOCK_K)[None, :]
        codes = tl.load(W + rn[:, None, None] * swn + rk[None, :, :], mask=n_ok[:, None, None] & (rk < k_hi)[None, :, :],
                        other=0)
        return codes, codes
    else:
        return k_step, k_step


@triton.jit
def first_weights(W, WD, S, rn, n_ok, k_lo, k_hi, swn, ssn, n0, WEIGHTS: tl.constexpr, ONE_LOAD: tl.constexpr,
                  TMA: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  UNROLL: tl.constexpr):
    """The decode GEMV's first step of weights, loaded before anything else: through the
    descriptor ``WD`` in TMA loops (INT4 words and scales, :func:`int4_step`; INT8 codes, returned
    twice), else :func:`step_weights`."""
    if TMA and WEIGHTS == 1:
        first = int4_step(WD, S, rn, n_ok, n0, k_lo, k_hi, ssn, GROUP, BLOCK_K)
    elif TMA:
        codes = int8_step(WD, n0, k_lo, BLOCK_N, BLOCK_K)
        first = (codes, codes)
    else:
        first = step_weights(W, S, rn, n_ok, k_lo, k_hi, swn, ssn, WEIGHTS, ONE_LOAD, GROUP, BLOCK_K, UNROLL)
    return first


@triton.jit
def words_math(part, words, scale, x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """``part [BLOCK_N, UNROLL, BLOCK_K / 4] += w * x`` for a step of INT4 words (from
    :func:`step_weights`), ``x`` the step's activations [UNROLL * BLOCK_K] in fp32: nibble i
    of word (u, j) meets x at k = 4 (u BLOCK_K / 4 + j) + i (products in fp32, exact)."""
    w0, w1, w2, w3 = words_to(words, scale, DTYPE, NATIVE)
    # x at k = 4j + 2a + b as [u, j, a, b]: b split first, then a
    x_b0, x_b1 = tl.split(tl.reshape(x, [words.shape[1], words.shape[2], 2, 2]))
    x0, x2 = tl.split(x_b0)
    x1, x3 = tl.split(x_b1)
    part += w0.to(tl.float32) * x0[None, :, :]
    part += w1.to(tl.float32) * x1[None, :, :]
    part += w2.to(tl.float32) * x2[None, :, :]
    part += w3.to(tl.float32) * x3[None, :, :]
    return part


@triton.jit
def words_dots(part, words, scale, x, ROWS: tl.constexpr, DTYPE: tl.constexpr, NATIVE: tl.constexpr,
               UPCAST: tl.constexpr):
    """:func:`words_math` on the tensor cores: ``part [BLOCK_N, 16]``; ``x`` [UNROLL * BLOCK_K]
    (one row: column 0 of the dots' operand) or [UNROLL * BLOCK_K, 16] (ROWS 16: rows of x as
    the dots' columns). [BLOCK_N, UNROLL, BLOCK_K / 4] flattened is one K run for each nibble's
    dot."""
    BN: tl.constexpr = words.shape[0]
    KQ: tl.constexpr = words.shape[1] * words.shape[2]
    w0, w1, w2, w3 = words_to(words, scale, DTYPE, NATIVE)
    w0 = tl.reshape(w0, [BN, KQ])
    w1 = tl.reshape(w1, [BN, KQ])
    w2 = tl.reshape(w2, [BN, KQ])
    w3 = tl.reshape(w3, [BN, KQ])
    if ROWS == 16:
        x_b0, x_b1 = tl.split(tl.permute(tl.reshape(x, [KQ, 2, 2, 16]), (0, 3, 1, 2)))
        x0, x2 = tl.split(x_b0)
        x1, x3 = tl.split(x_b1)
        part = dot16(w0, x0.to(DTYPE), part, UPCAST)
        part = dot16(w1, x1.to(DTYPE), part, UPCAST)
        part = dot16(w2, x2.to(DTYPE), part, UPCAST)
        part = dot16(w3, x3.to(DTYPE), part, UPCAST)
    else:
        x_b0, x_b1 = tl.split(tl.reshape(x, [KQ, 2, 2]))
        x0, x2 = tl.split(x_b0)
        x1, x3 = tl.split(x_b1)
        part = dot_column(w0, x0.to(DTYPE), part, 16, UPCAST)
        part = dot_column(w1, x1.to(DTYPE), part, 16, UPCAST)
        part = dot_column(w2, x2.to(DTYPE), part, 16, UPCAST)
        part = dot_column(w3, x3.to(DTYPE), part, 16, UPCAST)
    return part


@triton.jit
def dot16(w, xt, acc, UPCAST: tl.constexpr):
    """``acc [BLOCK_N, R] += w [BLOCK_N, BK] @ xt [BK, R]`` on the tensor cores (16-bit
    operands: products exact, summed in fp32). UPCAST: the interpreter multiplies bf16 dot
    operands as raw integers (Triton 3.9): there both go in fp32 (exact) with ieee products."""
    if UPCAST:
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, xt, acc)


@triton.jit
def dot_column(w, x, acc, ROWS: tl.constexpr, UPCAST: tl.constexpr):
    """:func:`dot16` with one row of x: ``x`` ([BK], w's dtype) in column 0 of a [BK, ROWS]
    operand (ROWS = 16, the smallest tl.dot takes; the other columns are 0, so column 0 alone
    holds the sums)."""
    col0 = tl.arange(0, ROWS)[None, :] == 0
    return dot16(w, tl.where(col0, x[:, None], tl.zeros([x.shape[0], ROWS], x.dtype)), acc, UPCAST)


@triton.jit
def float_weights(w_ptr, rn, rk, n_ok, K, swn, swk):
    """Float weight rows ``rn`` at columns ``rk`` (any strides) as fp32; 0 past N and K."""
    ok = n_ok[:, None] & (rk < K)[None, :]
    return tl.load(w_ptr + rn[:, None] * swn + rk[None, :] * swk, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def split_sum(part_ptr, b_ptr, out_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr,
              BLOCK: tl.constexpr):
    """out = the sum of the fp32 partial sums [SPLIT, M, N] (MN = M * N) over their slices, in
    slice order (bitwise reproducible), plus the bias in fp32, rounded once to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):  # slices in order: the same sum whatever order the programs ran in
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


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


__all__ = ["round_to", "int8_weights", "packed_bytes_ok", "int4_weights", "offset_codes_to",
           "int8_weights16", "int4_weights16", "words_to", "codes_to", "step_weights", "first_weights",
           "words_math", "words_dots", "int8_step", "int4_step", "TMA_INT8_BOX_K", "dot16", "dot_column",
           "float_weights", "split_sum", "auto_split", "k_slices"]
