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
