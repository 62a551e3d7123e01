"""OutputLease: when a CUDA-graph recording's outputs may be overwritten (runs on CPU tensors)."""
import pytest
import torch

from compile_backend import cuda_graph

pytestmark = pytest.mark.skipif(cuda_graph.storage_use_count is None, reason="no storage use count")


def test_free_until_a_view_is_held_and_again_after():
    out = torch.empty(5, 3)
    lease = cuda_graph.OutputLease([out])
    assert lease.free()
    held = out.detach()
    assert not lease.free()
    row = held[1]  # a view of the handed-out view keeps the storage too
    del held
    assert not lease.free()
    del row
    assert lease.free()


def test_outputs_sharing_one_storage():
    base = torch.empty(8)
    a, b = base[:4], base[4:]
    lease = cuda_graph.OutputLease([a, b])
    assert len(lease.refs) == 1
    kept = b.detach()
    assert not lease.free()
    del kept
    assert lease.free()


def test_slot_hands_out_views_and_clones_what_it_does_not_own():
    owned, fixed = torch.randn(4), torch.randn(4)
    slot = cuda_graph.Recording(None, (owned, fixed, 3), {fixed.untyped_storage().data_ptr()}, hand_out=True)
    a, b, n = slot.outputs(())
    assert a.data_ptr() == owned.data_ptr() and b.data_ptr() != fixed.data_ptr() and n == 3
    assert not slot.free()
    del a
    assert slot.free()
    copy_slot = cuda_graph.Recording(None, (owned,), set(), hand_out=False)
    (c,) = copy_slot.outputs(())
    assert c.data_ptr() != owned.data_ptr() and copy_slot.free()
