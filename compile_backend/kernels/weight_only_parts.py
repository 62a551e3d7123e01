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
    its bits; a NaN product (a NaN scale, 0 * inf) kept as NaN: the GPU's canonical NaN
    0x7FFFFFFF carried into the sign bit and came out -0.0 (H100, session 36; the interpreter's
    0x7FC00000 did not)."""
    if DTYPE == tl.float16:
        c = (u | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)
        return (c.to(tl.float16) * scale).to(tl.float16)
    else:
        c = (u.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)
        p = c * scale.to(tl.float32)
        b = p.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return tl.where(p != p, p.to(tl.bfloat16), b.to(tl.uint16).to(tl.bfloat16, bitcast=True))


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


def _bf16_dequantize_ptx(fields, f32_out: bool) -> str:
    """PTX text dequantizing packed codes to bf16 (shared by INT8 and INT4, see below): the
    register after the outputs holds the codes; ``fields`` lists, per output pair, (source, mask, bias) of its two
    codes, source "c" (the register) or "s" (it shifted right by 16). ``lop3`` puts a code, top
    bit flipped (two's complement + 2**(bits-1)), under the fp32 exponent whose unit is the
    code's lowest bit: bias = that exponent's bits | the flipped bit, read as fp32 = 2**e + the
    code's offset (exact, no shift); less the bias (exact), times the element's fp32 scale (an
    fp16 value: exact, 8 + 11 significant bits at most), ``cvt.rn.bf16x2.f32`` rounds each once
    to nearest even: the reference's bf16 weight. Outputs: a bf16x2 a pair, or with ``f32_out``
    the pair's two bf16 values widened to fp32 (bf16 is fp32's upper half: a shift, a mask), for
    loops that multiply in fp32. Scales: one fp32 register an element, after the outputs and codes."""
    outs = len(fields) * (2 if f32_out else 1)
    scale0 = outs + 1
    lines = [".reg .b32 s, a, b, r;", f"shr.b32 s, ${outs}, 16;"]
    for pair, ((src_a, mask_a, bias_a, el_a), (src_b, mask_b, bias_b, el_b)) in enumerate(fields):
        ra, rb = (f"${outs}" if src == "c" else "s" for src in (src_a, src_b))
        lines += [f"lop3.b32 a, {ra}, {mask_a:#010x}, {bias_a:#010x}, 0x6a;",
                  f"lop3.b32 b, {rb}, {mask_b:#010x}, {bias_b:#010x}, 0x6a;",
                  f"sub.rn.f32 a, a, 0f{bias_a:08X};", f"sub.rn.f32 b, b, 0f{bias_b:08X};",
                  f"mul.rn.f32 a, a, ${scale0 + el_a};", f"mul.rn.f32 b, b, ${scale0 + el_b};"]
        if f32_out:  # element a in the low half, b in the high; widened back to fp32
            lines += ["cvt.rn.bf16x2.f32 r, b, a;", f"shl.b32 ${2 * pair}, r, 16;",
                      f"and.b32 ${2 * pair + 1}, r, 0xffff0000;"]
        else:
            lines += [f"cvt.rn.bf16x2.f32 ${pair}, b, a;"]
    return "{\n" + "\n".join(lines) + "\n}"


#: INT8: four codes a register (byte i = element i); bytes 0 and 2 under 2**23 (bias 2**23 +
#: 128), bytes 1 and 3 under 2**15 (their lowest bit is bit 8; bias 2**15 + 128); the shift
#: by 16 serves bytes 2 and 3. Pairs out: (0, 1), (2, 3). Without this the bf16 loop rounded on
#: the bits in 16-bit lanes: 12.3 SASS a weight against fp16's 5.5 (sm_90, 32x128 u2), and bf16
#: W8A16 decoded no faster than bf16 (session 34, H100)
_INT8_BF16_FIELDS = ((("c", 0xFF, 0x4B000080, 0), ("c", 0xFF00, 0x47008000, 1)),
                     (("s", 0xFF, 0x4B000080, 2), ("s", 0xFF00, 0x47008000, 3)))
_INT8_QUADS_BF16 = tl.constexpr(_bf16_dequantize_ptx(_INT8_BF16_FIELDS, False))
_INT8_QUADS_BF16_F32 = tl.constexpr(_bf16_dequantize_ptx(_INT8_BF16_FIELDS, True))


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


@triton.jit
def codes_to_f32(codes, scale, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """:func:`codes_to` widened to fp32 (the loops multiplying in fp32): NATIVE bf16 widens in its
    PTX (``_INT8_QUADS_BF16_F32``: no separate unpacking of bf16 pairs after it)."""
    if NATIVE and DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(_INT8_QUADS_BF16_F32, "=r,=r,=r,=r,r,r,r,r,r",
                                         [codes, tl.broadcast_to(scale.to(tl.float32), codes.shape)],
                                         dtype=tl.float32, is_pure=True, pack=4)
    return codes_to(codes, scale, DTYPE, NATIVE).to(tl.float32)


#: INT8 codes a TMA box holds along K (a box is at most 256 elements a dimension): a longer step
#: is a [rows, step / 256, 256] box of the codes viewed [N, K / 256, 256] (K a multiple of 256)
TMA_INT8_BOX_K = 256


@triton.jit
def dequant_tile(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, INT4: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Weight rows ``rn``, columns [k0, k0 + BLOCK_K), dequantized and rounded to DTYPE; 0 past
    N and K (x is 0 there too). INT4: the launcher keeps BLOCK_K <= GROUP (both powers of two),
    so a tile never straddles two scale groups: one scale per row."""
    n_ok = rn < N
    if INT4:
        rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ok = n_ok[:, None] & (rb < (K + 1) // 2)[None, :]
        packed = tl.load(w_ptr + rn[:, None] * swn + rb[None, :], mask=ok, other=0).to(tl.int32)
        lo = ((packed & 15) ^ 8) - 8  # sign-extend the 4-bit two's complement nibbles
        hi = (((packed >> 4) & 15) ^ 8) - 8
        codes = tl.interleave(lo, hi)  # byte j -> k = 2j (low), 2j + 1 (high)
        scale = tl.load(s_ptr + rn * ssn + k0 // GROUP, mask=n_ok, other=0.0)
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        ok = n_ok[:, None] & (rk < K)[None, :]
        codes = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=ok, other=0)
        scale = tl.load(s_ptr + rn * ssn, mask=n_ok, other=0.0)
    return round_to(codes.to(tl.float32) * scale.to(tl.float32)[:, None], DTYPE, SOFT_BF16)


@triton.jit
def dequant_tile16(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, INT4: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_K: tl.constexpr, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """:func:`dequant_tile` for 16-bit DTYPE with no conversion instruction per weight
    (``weight_only_parts.offset_codes_to``), as DTYPE. NATIVE (compiled for a GPU): INT8 with
    fp16 four codes a register in PTX (``codes_to``)."""
    n_ok = rn < N
    if INT4:
        rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        lo, hi = int4_weights16(w_ptr, s_ptr, rn, rb, k0, n_ok, K, swn, ssn, GROUP, DTYPE, True)  # any K
        return tl.interleave(lo, hi)  # byte j -> k = 2j (low), 2j + 1 (high)
    scale = tl.load(s_ptr + rn * ssn, mask=n_ok, other=0.0)[:, None]
    return int8_weights16(w_ptr, rn, k0 + tl.arange(0, BLOCK_K), n_ok, K, swn, scale, DTYPE, NATIVE)


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


#: INT4: two 16-bit words a register (word w = element w), nibble i of a word at bits 4i under
#: 2**(23 - 4i) (bias that + 8); the shift by 16 brings word 1 down. Output i: nibble i of both
#: words. The bf16 loop rounded on the bits before: 14.5 SASS a weight against fp16's 5.6
#: (sm_90, 32x128 u2), and bf16 W4A16 decoded no faster than bf16 (session 34, H100:
#: Llama-3-8B's shape 6.70 ms against 5.98)
_INT4_BF16_FIELDS = tuple((("c", 0xF << 4 * i, ((150 - 4 * i) << 23) | 8 << 4 * i, 0),
                           ("s", 0xF << 4 * i, ((150 - 4 * i) << 23) | 8 << 4 * i, 1)) for i in range(4))
_INT4_PAIRS_BF16 = tl.constexpr(_bf16_dequantize_ptx(_INT4_BF16_FIELDS, False))
_INT4_PAIRS_BF16_F32 = tl.constexpr(_bf16_dequantize_ptx(_INT4_BF16_FIELDS, True))


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


#: INT4, bf16, the scale left out (``words_dots``' SCALE_AFTER): two 16-bit words a register;
#: nibble i shifted down to bits 0-3 (bf16 keeps 7 mantissa bits, so no nibble but the lowest
#: fits under one exponent in place), under 0x4300 (128, unit 1) with the top bit flipped by the
#: `lop3`, minus 136: the signed code, exact. 11 instructions for 8 weights, against the scaled
#: fp32 route's ~28 (sm_90)
_INT4_CODE_PAIRS_BF16 = tl.constexpr("""{
.reg .b32 s1, s2, s3, m, o;
mov.b32 m, 0x000F000F;
mov.b32 o, 0x43084308;
shr.b32 s1, $4, 4;
shr.b32 s2, $4, 8;
shr.b32 s3, $4, 12;
lop3.b32 $0, $4, m, o, 0x6a;
lop3.b32 $1, s1, m, o, 0x6a;
lop3.b32 $2, s2, m, o, 0x6a;
lop3.b32 $3, s3, m, o, 0x6a;
sub.rn.bf16x2 $0, $0, o;
sub.rn.bf16x2 $1, $1, o;
sub.rn.bf16x2 $2, $2, o;
sub.rn.bf16x2 $3, $3, o;
}""")


@triton.jit
def words_to_codes(words, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """The four signed INT4 codes (-8..7) of each 16-bit word (as :func:`words_to`, nibble i
    from the lowest) as DTYPE values, exact and unscaled. NATIVE bf16: ``_INT4_CODE_PAIRS_BF16``."""
    if NATIVE and DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(_INT4_CODE_PAIRS_BF16, "=r,=r,=r,=r,r", [words],
                                         dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    w0 = ((((words & 15) ^ 8).to(tl.int32)) - 8).to(tl.float32).to(DTYPE)
    w1 = (((((words >> 4) & 15) ^ 8).to(tl.int32)) - 8).to(tl.float32).to(DTYPE)
    w2 = (((((words >> 8) & 15) ^ 8).to(tl.int32)) - 8).to(tl.float32).to(DTYPE)
    w3 = ((((words >> 12) ^ 8).to(tl.int32)) - 8).to(tl.float32).to(DTYPE)
    return w0, w1, w2, w3


@triton.jit
def words_to_f32(words, scale, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """:func:`words_to` widened to fp32 (the elementwise loops): NATIVE bf16 widens in its PTX
    (``_INT4_PAIRS_BF16_F32``; Triton's unpacking of the bf16 pairs took 2.2 SASS a weight)."""
    if NATIVE and DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(_INT4_PAIRS_BF16_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
                                         [words, tl.broadcast_to(scale.to(tl.float32), words.shape)],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=2)
    w0, w1, w2, w3 = words_to(words, scale, DTYPE, NATIVE)
    return w0.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32), w3.to(tl.float32)


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
    w0, w1, w2, w3 = words_to_f32(words, scale, DTYPE, NATIVE)
    # x at k = 4j + 2a + b as [u, j, a, b]: b split first, then a
    x_b0, x_b1 = tl.split(tl.reshape(x, [words.shape[1], words.shape[2], 2, 2]))
    x0, x2 = tl.split(x_b0)
    x1, x3 = tl.split(x_b1)
    part += w0 * x0[None, :, :]
    part += w1 * x1[None, :, :]
    part += w2 * x2[None, :, :]
    part += w3 * x3[None, :, :]
    return part


@triton.jit
def words_dots(part, words, scale, x, ROWS: tl.constexpr, DTYPE: tl.constexpr, NATIVE: tl.constexpr,
               UPCAST: tl.constexpr, SCALE_AFTER: tl.constexpr = False):
    """:func:`words_math` on the tensor cores: ``part [BLOCK_N, 16]``; ``x`` [UNROLL * BLOCK_K]
    (one row: column 0 of the dots' operand) or [UNROLL * BLOCK_K, 16] (ROWS 16: rows of x as
    the dots' columns). [BLOCK_N, UNROLL, BLOCK_K / 4] flattened is one K run for each nibble's
    dot. SCALE_AFTER (the caller's step lies inside one group, so every scale of a row is the
    same): the dots take the unscaled codes (``words_to_codes``) and their fp32 sums are scaled,
    sum_g s_g * sum_k x_k q_k instead of sum_k x_k * round(s_g q_k): closer to the exact product,
    not the reference's rounding of each weight (bf16 128x128 loop, sm_90: 4.88 -> 2.74 SASS a
    weight, ``benchmarks/notes/probes/int4_scale_after_sass.py``)."""
    BN: tl.constexpr = words.shape[0]
    if SCALE_AFTER:  # (scales are >= 0: the max over a row's tiles is its group's, masked tiles 0)
        w0, w1, w2, w3 = words_to_codes(words, DTYPE, NATIVE)
        row_scale = tl.max(tl.reshape(scale, [BN, words.shape[1]]), axis=1).to(tl.float32)[:, None]
        part = part + words_dots_of(tl.zeros(part.shape, tl.float32), w0, w1, w2, w3, x, ROWS, DTYPE, UPCAST) * row_scale
    else:
        w0, w1, w2, w3 = words_to(words, scale, DTYPE, NATIVE)
        part = words_dots_of(part, w0, w1, w2, w3, x, ROWS, DTYPE, UPCAST)
    return part


@triton.jit
def words_dots_of(part, w0, w1, w2, w3, x, ROWS: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """``part`` plus the four nibble planes' dots with ``x`` (``words_dots``)."""
    BN: tl.constexpr = w0.shape[0]
    KQ: tl.constexpr = w0.shape[1] * w0.shape[2]
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


__all__ = ["round_to", "dequant_tile", "dequant_tile16", "int8_weights", "packed_bytes_ok", "int4_weights", "offset_codes_to",
           "int8_weights16", "int4_weights16", "words_to", "codes_to", "step_weights", "first_weights",
           "words_math", "words_dots", "words_dots_of", "words_to_codes", "int8_step", "int4_step", "TMA_INT8_BOX_K", "dot16", "dot_column",
           "float_weights", "split_sum", "auto_split", "k_slices"]
