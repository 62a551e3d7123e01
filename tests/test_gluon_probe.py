"""benchmarks/gluon_gemv_probe.py: the code order its loads assume (plain torch; the kernel itself
is compiled and run only on the GPU machine, and counted offline by ``--sass``)."""
import pytest
import torch

from benchmarks.gluon_gemv_probe import GROUP, fragment_order


def test_fragment_order_puts_a_lanes_pairs_together():
    """In each group's 64 bytes of a row, byte 16 q + j holds code pair 4 j + q: lane q of a quad
    reads its 16 pairs in one 16-byte load; rows and groups stay where they were."""
    gen = torch.Generator().manual_seed(5)
    packed = torch.randint(0, 256, (3, 3 * GROUP // 2), generator=gen, dtype=torch.uint8)
    got = fragment_order(packed)
    assert got.shape == packed.shape and got.is_contiguous()
    for g in range(3):
        for q in range(4):
            for j in range(16):
                assert torch.equal(got[:, g * 64 + 16 * q + j], packed[:, g * 64 + 4 * j + q])


def test_fragment_order_wants_whole_groups():
    with pytest.raises(ValueError, match="multiple of 128"):
        fragment_order(torch.zeros(2, 96, dtype=torch.uint8))


def _ptx_dequant(b: torch.Tensor):
    """The probe's PTX on bytes [..., 4] (one 32-bit register), bit for bit: (lo, hi) fp16 [..., 4]."""
    w = b.to(torch.int64)
    t = [w[..., 0] | (w[..., 1] << 16), w[..., 2] | (w[..., 3] << 16)]  # prmt 0x4140, 0x4342
    lo = [(ti & 0x000F000F) ^ 0x64086408 for ti in t]  # lop3 (a & b) ^ c
    hi = [((ti >> 4) & 0x000F000F) ^ 0x64086408 for ti in t]  # shr, lop3

    def halves(words):  # each 32-bit word as two fp16 (low half first), less 1032 (sub.f16x2)
        h = torch.stack([torch.stack([x & 0xFFFF, x >> 16], -1) for x in words], -2).reshape(*b.shape[:-1], 4)
        return h.to(torch.int16).view(torch.float16) - torch.tensor(1032.0, dtype=torch.float16)

    return halves(lo), halves(hi)


def test_probe_program_decodes_the_reference_weights():
    """The probe's tensor program on the CPU: its loads of fragment-ordered bytes, the permute and
    reshape back to k pairs, the PTX's dequantize (bit for bit) and the join give every weight's
    code, so its sums are the reference's up to where the scale is applied."""
    from compile_backend.kernels import weight_only_ref as ref

    n, k = 64, 2 * GROUP
    gen = torch.Generator().manual_seed(7)
    codes, scales = ref.quantize_weight(torch.randn(n, k, generator=gen), "int4", GROUP)
    stored = fragment_order(codes)
    x = torch.randn(k, generator=gen).half()
    out = torch.zeros(n)
    for g in range(k // GROUP):
        b = stored[:, g * 64:(g + 1) * 64].reshape(n, 4, 16).permute(0, 2, 1).reshape(n, 64)  # [r, c = 4 j + q]
        lo, hi = _ptx_dequant(b.reshape(n, 16, 4))
        w = torch.stack((lo.reshape(n, 64), hi.reshape(n, 64)), -1).reshape(n, GROUP)  # join: k = 2 c + h
        assert torch.equal(w.to(torch.int8), ref.unpack_int4(codes, k)[:, g * GROUP:(g + 1) * GROUP])
        out += (w.float() @ x[g * GROUP:(g + 1) * GROUP].float()) * scales[:, g].float()
    want = ref.dequantize(ref.unpack_int4(codes, k), scales, "int4", GROUP).half().float() @ x.float()
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
