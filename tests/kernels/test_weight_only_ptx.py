"""The weight-only GEMV's PTX dequantize (``weight_only_parts._INT4_PAIRS_F16`` /
``_INT8_QUADS_F16`` and their bf16 twins ``_INT4_PAIRS_BF16`` / ``_INT8_QUADS_BF16``), executed on the CPU: a numpy model of the few PTX instructions they use
runs the asm text itself over every 16-bit word of INT4 codes / every byte of INT8 codes, and
must equal the reference (``weight_only_ref.dequantize`` rounded to fp16 or bf16) bit for bit. The GPU
test ``test_gemv.py::test_gpu_native_dequantize_bit_identical`` checks the compiled kernels."""
import numpy as np
import pytest
import torch

from compile_backend.kernels import weight_only_ref as ref


def _lop3(a, b, c, lut):
    """PTX ``lop3.b32``: bit i of the result is bit (a_i b_i c_i as a 3-bit index) of ``lut``."""
    out = np.zeros_like(a)
    for index in range(8):
        if lut >> index & 1:
            out |= (a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c)
    return out


def _prmt(a, b, selector):
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte (selector's nibble i) of b:a."""
    both = a.astype(np.uint64) | (b.astype(np.uint64) << 32)
    out = np.zeros_like(a)
    for i in range(4):
        pick = selector >> (4 * i) & 7
        out |= ((both >> np.uint64(8 * pick)) & np.uint64(0xFF)).astype(np.uint32) << np.uint32(8 * i)
    return out


def _f16x2(op, a, b):
    """``{sub,mul}.rn.f16x2``: per 16-bit half, the exact result (float64 holds it) rounded once."""
    out = np.zeros_like(a)
    for shift in (0, 16):
        x = ((a >> shift) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
        y = ((b >> shift) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
        with np.errstate(all="ignore"):
            r = (x - y if op == "sub" else x * y).astype(np.float16)
        out |= r.view(np.uint16).astype(np.uint32) << np.uint32(shift)
    return out


def _f32(op, a, b):
    """``{sub,mul}.rn.f32`` on 32-bit registers: numpy's float32 arithmetic rounds to nearest even."""
    x, y = a.astype(np.uint32).view(np.float32), np.broadcast_to(b, a.shape).astype(np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        return (x - y if op == "sub" else x * y).astype(np.float32).view(np.uint32)


def _cvt_bf16x2(a, b):
    """``cvt.rn.bf16x2.f32 d, a, b``: a rounded to bf16 (nearest even) in the upper half, b in the lower."""
    def bf16_bits(v):
        t = torch.from_numpy(v.astype(np.uint32).view(np.float32).copy()).to(torch.bfloat16)
        return (t.view(torch.int16).numpy().astype(np.int64) & 0xFFFF).astype(np.uint32)
    return bf16_bits(a) << np.uint32(16) | bf16_bits(b)


def run_ptx(text, operands):
    """Execute inline asm ``text`` (the subset above; every register 32 bits) on numpy uint32
    ``operands`` ($i in order); returns the values of all $ operands after it."""
    regs = {f"${i}": v.astype(np.uint32) for i, v in enumerate(operands)}

    def value(token):
        token = token.strip()
        if token in regs:
            return regs[token]
        if token.startswith("0f"):  # an fp32 literal: its bits in hex
            return np.uint32(int(token[2:], 16))
        return np.uint32(int(token, 0))

    for line in text.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [t.strip() for t in args.split(",")]
        if op == "mov.b32":
            result = np.broadcast_to(value(src[0]), operands[0].shape).astype(np.uint32)
        elif op == "shr.b32":
            result = value(src[0]) >> value(src[1])
        elif op == "xor.b32":
            result = value(src[0]) ^ value(src[1])
        elif op == "and.b32":
            result = value(src[0]) & value(src[1])
        elif op == "shl.b32":
            result = value(src[0]) << value(src[1])
        elif op == "lop3.b32":
            result = _lop3(value(src[0]), value(src[1]), value(src[2]), int(src[3], 0))
        elif op == "prmt.b32":
            result = _prmt(value(src[0]), value(src[1]), int(src[2], 0))
        elif op in ("sub.rn.f16x2", "mul.rn.f16x2"):
            result = _f16x2(op[:3], value(src[0]), value(src[1]))
        elif op in ("sub.rn.f32", "mul.rn.f32"):
            result = _f32(op[:3], value(src[0]), value(src[1]))
        elif op == "cvt.rn.bf16x2.f32":
            result = _cvt_bf16x2(value(src[0]), value(src[1]))
        else:
            raise AssertionError(f"the PTX model lacks {op!r}: extend it with the instruction's semantics")
        regs[dst] = np.asarray(result, dtype=np.uint32) & np.uint32(0xFFFFFFFF)
    return [regs[f"${i}"] for i in range(len(operands))]


def _scale_pairs(n, gen):
    """fp16 scales of every magnitude (subnormal, huge, inf, NaN, -0.0), as [n] pairs (low, high)."""
    magnitude = torch.exp2(torch.randint(-24, 16, (n, 2), generator=gen).float())
    s = (torch.randn(n, 2, generator=gen) * magnitude).half()
    s[:4, 0] = torch.tensor([float("inf"), float("nan"), -0.0, 6.0e-8]).half()
    return s


def _same_bits(got_f16, want_f16):
    """Equal fp16 tensors, NaN matching NaN (the GPU's NaN bits are its own)."""
    nan = torch.isnan(want_f16)
    assert torch.equal(torch.isnan(got_f16), nan)
    assert torch.equal(got_f16[~nan].view(torch.int16), want_f16[~nan].view(torch.int16))


def _halves(reg, dtype=torch.float16):
    return torch.from_numpy((reg & 0xFFFF).astype(np.uint16).view(np.int16).copy()).view(dtype), \
        torch.from_numpy((reg >> 16).astype(np.uint16).view(np.int16).copy()).view(dtype)


def _f32_bits(scales_f16):
    """fp16 scales as the fp32 registers the bf16 PTX takes (exact)."""
    return scales_f16.float().view(torch.int32).numpy().astype(np.uint32)


@pytest.mark.parametrize("seed", [0, 1])
def test_int4_pairs_ptx_equals_reference(seed):
    """Every 16-bit word (4 codes, k = 4j .. 4j + 3 from the lowest nibble) in the low half of the
    register, the words reversed in the high half; each half with its own scale."""
    from compile_backend.kernels.weight_only_parts import _INT4_PAIRS_F16

    gen = torch.Generator().manual_seed(seed)
    low = torch.arange(65536, dtype=torch.int64)
    high = low[torch.randperm(65536, generator=gen)]
    scales = _scale_pairs(65536, gen)
    register = (low | high << 16).numpy().astype(np.uint32)
    pair = (scales.view(torch.int16).to(torch.int64) & 0xFFFF)
    pair = (pair[:, 0] | pair[:, 1] << 16).numpy().astype(np.uint32)
    zero = np.zeros(65536, dtype=np.uint32)
    outs = run_ptx(_INT4_PAIRS_F16.value, [zero, zero, zero, zero, register, pair])[:4]
    for half, (words, scale) in enumerate(((low, scales[:, 0]), (high, scales[:, 1]))):
        packed = torch.stack([(words >> (8 * b)) & 0xFF for b in range(2)], dim=1).to(torch.uint8)
        codes = ref.unpack_int4(packed, 4)  # [65536, 4]
        want = ref.dequantize(codes, scale[:, None], "int4", 32).half()  # one short group
        for i in range(4):
            _same_bits(_halves(outs[i])[half], want[:, i])


def test_int8_quads_ptx_equals_reference():
    """Every byte in every position of the register (four codes, k from the lowest byte)."""
    from compile_backend.kernels.weight_only_parts import _INT8_QUADS_F16

    gen = torch.Generator().manual_seed(2)
    n = 4 * 256
    codes = torch.stack([torch.arange(n) % 256] + [torch.randperm(n, generator=gen) % 256 for _ in range(3)], dim=1)
    register = (codes[:, 0] | codes[:, 1] << 8 | codes[:, 2] << 16 | codes[:, 3] << 24).numpy().astype(np.uint32)
    scales = _scale_pairs(n, gen)[:, 0]  # one scale a row: both halves of each pair
    bits = scales.view(torch.int16).to(torch.int64) & 0xFFFF
    pair = (bits | bits << 16).numpy().astype(np.uint32)
    zero = np.zeros(n, dtype=np.uint32)
    a, b = run_ptx(_INT8_QUADS_F16.value, [zero, zero, register, pair, pair])[:2]
    want = ref.dequantize(codes.to(torch.uint8).view(torch.int8), scales, "int8").half()
    got = [*_halves(a), *_halves(b)]
    for i in range(4):
        _same_bits(got[i], want[:, i])


def _widened(regs, f32_out):
    """The bf16 PTX's outputs as bf16 pairs: the f32 variant's two fp32 registers a pair (each
    a bf16 value widened) narrowed back, after checking their low 16 bits are zero."""
    if not f32_out:
        return regs
    pairs = []
    for lo, hi in zip(regs[0::2], regs[1::2]):
        assert not (lo & 0xFFFF).any() and not (hi & 0xFFFF).any()
        pairs.append((lo >> np.uint32(16)) | (hi & np.uint32(0xFFFF0000)))
    return pairs


@pytest.mark.parametrize("f32_out", [False, True], ids=["bf16x2", "f32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_int4_pairs_bf16_ptx_equals_reference(seed, f32_out):
    """The bf16 twin: every 16-bit word in the low half, the words reversed in the high half,
    each word with its own fp32 scale (an fp16 value, of every magnitude); nibble i of both words
    out in bf16x2 register i, bit for bit the reference's fp32 ``code * scale`` rounded to bf16."""
    from compile_backend.kernels.weight_only_parts import _INT4_PAIRS_BF16, _INT4_PAIRS_BF16_F32

    text, outs_n = (_INT4_PAIRS_BF16_F32.value, 8) if f32_out else (_INT4_PAIRS_BF16.value, 4)
    gen = torch.Generator().manual_seed(seed)
    low = torch.arange(65536, dtype=torch.int64)
    high = low[torch.randperm(65536, generator=gen)]
    scales = _scale_pairs(65536, gen)
    register = (low | high << 16).numpy().astype(np.uint32)
    zero = np.zeros(65536, dtype=np.uint32)
    outs = _widened(run_ptx(text, [zero] * outs_n + [register, _f32_bits(scales[:, 0]),
                                                     _f32_bits(scales[:, 1])])[:outs_n], f32_out)
    for half, (words, scale) in enumerate(((low, scales[:, 0]), (high, scales[:, 1]))):
        packed = torch.stack([(words >> (8 * b)) & 0xFF for b in range(2)], dim=1).to(torch.uint8)
        want = ref.dequantize(ref.unpack_int4(packed, 4), scale[:, None], "int4", 32).to(torch.bfloat16)
        for i in range(4):
            _same_bits(_halves(outs[i], torch.bfloat16)[half], want[:, i])


@pytest.mark.parametrize("f32_out", [False, True], ids=["bf16x2", "f32"])
def test_int8_quads_bf16_ptx_equals_reference(f32_out):
    """Every byte in every position, each code with its own fp32 scale register (an fp16 value)."""
    from compile_backend.kernels.weight_only_parts import _INT8_QUADS_BF16, _INT8_QUADS_BF16_F32

    text, outs_n = (_INT8_QUADS_BF16_F32.value, 4) if f32_out else (_INT8_QUADS_BF16.value, 2)
    gen = torch.Generator().manual_seed(3)
    n = 4 * 256
    codes = torch.stack([torch.arange(n) % 256] + [torch.randperm(n, generator=gen) % 256 for _ in range(3)], dim=1)
    register = (codes[:, 0] | codes[:, 1] << 8 | codes[:, 2] << 16 | codes[:, 3] << 24).numpy().astype(np.uint32)
    scales = torch.cat([_scale_pairs(n, gen), _scale_pairs(n, gen)], dim=1)  # [n, 4]
    zero = np.zeros(n, dtype=np.uint32)
    a, b = _widened(run_ptx(text, [zero] * outs_n + [register, *(_f32_bits(scales[:, i]) for i in range(4))])[:outs_n],
                    f32_out)
    want = ref.dequantize(codes.to(torch.uint8).view(torch.int8).reshape(-1, 1),
                          scales.reshape(-1), "int8").reshape(n, 4).to(torch.bfloat16)
    got = [*_halves(a, torch.bfloat16), *_halves(b, torch.bfloat16)]
    for i in range(4):
        _same_bits(got[i], want[:, i])


def test_model_refuses_unknown_instructions():
    with pytest.raises(AssertionError, match="lacks 'add.u32'"):
        run_ptx("{ add.u32 $0, $1, 1; }", [np.zeros(1, np.uint32), np.zeros(1, np.uint32)])
