"""drop_copies: a contiguous copy whose readers take any strides is read through the original;
a copy some reader needs (a view of it that the original cannot give, an output, a value
written in place) stays. Values unchanged, metadata consistent."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from compile_backend.fx_passes.attention import fuse_attention
from compile_backend.fx_passes.cleanup_rules import remove_noops
from compile_backend.fx_passes.copies import drop_copies
from fx_passes.graphs import check_meta, checked_run, count, ctx, inference_graph, run


def _dropped(model, *inputs, fuse=False):
    t = inference_graph(model, *inputs)
    remove_noops(t.gm, ctx())
    if fuse:
        fuse_attention(t.gm, ctx())
    with torch.no_grad():
        expected = model(*inputs)
    counts = drop_copies(t.gm, ctx())
    got = checked_run(t)
    got = got[0] if isinstance(got, (list, tuple)) and len(got) == 1 else got
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    return t, counts["copy_into_any_layout"]


class EmptyCacheCat(nn.Module):
    """HF DynamicCache on the first call: keys and values concatenated onto tensor([])."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)
        k = torch.cat([torch.tensor([]), k], dim=-2)
        v = torch.cat([torch.tensor([]), v], dim=-2)
        return F.scaled_dot_product_attention(q, k, v)


def test_cat_onto_an_empty_cache_reads_the_projection():
    t, n = _dropped(EmptyCacheCat().eval(), torch.randn(2, 5, 8), fuse=True)
    assert n == 2 and count(t.gm, "cat") == 0


class CloneIntoGemm(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 7))

    def forward(self, x):
        return (x.t().contiguous() @ self.w).relu()


def test_contiguous_before_a_gemm_is_dropped():
    t, n = _dropped(CloneIntoGemm().eval(), torch.randn(6, 5))
    assert n == 1 and count(t.gm, "clone") == 0


class CloneIntoFlatten(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2).contiguous().view(x.shape[0], -1) * 2.0


def test_copy_a_view_needs_stays():
    t, n = _dropped(CloneIntoFlatten().eval(), torch.randn(2, 3, 4))
    assert n == 0 and count(t.gm, "clone") == 1


class CloneReturned(nn.Module):
    def forward(self, x):
        return x.t().contiguous()


def test_returned_copy_stays():
    _, n = _dropped(CloneReturned().eval(), torch.randn(3, 4))
    assert n == 0


def test_training_graphs_are_left_alone():
    t = inference_graph(CloneIntoGemm().eval(), torch.randn(6, 5))
    assert drop_copies(t.gm, ctx(training=True)) == {}


class HeadsBackToTokens(nn.Module):
    """HF attention: SDPA, then transpose(1, 2).contiguous() and flatten the heads."""

    def forward(self, q, k, v):
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).contiguous().view(q.shape[0], q.shape[2], -1) * 2.0


class SeqFirstHeads(nn.Module):
    """nn.MultiheadAttention: permute(2, 0, 1, 3).contiguous() to [L, B, H, D], then flatten."""

    def forward(self, q, k, v):
        o = F.scaled_dot_product_attention(q, k, v)
        return o.permute(2, 0, 1, 3).contiguous().view(q.shape[2] * q.shape[0], -1) + 1.0


def test_attention_writes_the_order_its_reader_permutes_to():
    for model, perm in ((HeadsBackToTokens(), [0, 2, 1, 3]), (SeqFirstHeads(), [2, 0, 1, 3])):
        qkv = [torch.randn(2, 3, 5, 4) for _ in range(3)]
        t, _ = _dropped(model.eval(), *qkv, fuse=True)
        (att,) = [n for n in t.gm.graph.nodes if n.target is torch.ops.compile_backend.attention.default]
        assert list(att.args[7]) == perm and count(t.gm, "clone") == 0
        assert att.meta["val"].permute(perm).is_contiguous()


class PackedSelfAttention(nn.Module):
    """nn.MultiheadAttention (batch_first): the packed in-projection is reordered to [3, L, B, E]
    by a copy, then q, k, v are each viewed [L, B*H, D] -> [B, H, L, D]: no single step views
    the projection, the end result does (one strided view each)."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.att(x, x, x, need_weights=False)[0] * 2.0


def test_packed_qkv_copy_becomes_strided_views():
    model = PackedSelfAttention().eval()
    x = torch.randn(3, 5, 16)
    t = inference_graph(model, x)
    remove_noops(t.gm, ctx())
    fuse_attention(t.gm, ctx())
    clones = count(t.gm, "clone")
    with torch.no_grad():
        expected = model(x)
    counts = drop_copies(t.gm, ctx())
    t.gm.graph.lint()
    check_meta(t.gm)
    got = run(t)
    torch.testing.assert_close(got[0] if isinstance(got, (list, tuple)) else got, expected, rtol=1e-6, atol=1e-6)
    assert counts["copy_through_strided_views"] == 1
    assert count(t.gm, "clone") < clones and count(t.gm, "as_strided") == 3


class SlotWrite(nn.Module):
    """HF StaticCache's update at the decode position: index_copy of one slice along dim 2."""

    def forward(self, cache, new, position):
        return cache.index_copy(2, position, new) * 2.0


def test_index_copy_of_one_slice_becomes_a_select():
    cache, new = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 1, 4)
    for position in (torch.tensor([0]), torch.tensor([5]), torch.tensor([8])):
        t = inference_graph(SlotWrite(), cache, new, position)
        expected = SlotWrite()(cache, new, position)
        counts = drop_copies(t.gm, ctx())
        t.gm.graph.lint()
        check_meta(t.gm)
        torch.testing.assert_close(run(t), expected, rtol=0, atol=0)
        assert counts["slot_write_as_select"] == 1 and count(t.gm, "index_copy") == 0 and count(t.gm, "where") == 1


class SlidingWrite(nn.Module):
    """transformers' full sliding-window cache at a decode step: roll left by one, then the new
    key into the last slot by a one-element index tensor (index_put), the cache copied back."""

    def forward(self, cache, new, index):
        rolled = cache.roll(-1, dims=-2)
        rolled[:, :, index] = new
        return rolled * 2.0


def test_index_put_of_one_slice_becomes_a_select():
    cache, new = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 1, 4)
    for index in (torch.tensor([-1]), torch.tensor([0]), torch.tensor([4]), torch.tensor([-9])):
        t = inference_graph(SlidingWrite(), cache, new, index)
        expected = SlidingWrite()(cache, new, index)
        counts = drop_copies(t.gm, ctx())
        t.gm.graph.lint()
        check_meta(t.gm)
        torch.testing.assert_close(run(t), expected, rtol=0, atol=0)
        assert counts["slot_put_as_select"] == 1 and count(t.gm, "index_put") == 0 and count(t.gm, "where") == 1


def test_index_put_of_several_slices_or_accumulating_stays():
    cache = torch.randn(2, 3, 9, 4)
    t = inference_graph(SlidingWrite(), cache, torch.randn(2, 3, 2, 4), torch.tensor([1, 4]))
    assert drop_copies(t.gm, ctx())["slot_put_as_select"] == 0 and count(t.gm, "index_put") == 1

    class Accumulate(nn.Module):
        def forward(self, cache, new, index):
            return torch.ops.aten.index_put(cache, [None, None, index], new, True) * 2.0

    t = inference_graph(Accumulate(), cache, torch.randn(2, 3, 1, 4), torch.tensor([3]))
    assert drop_copies(t.gm, ctx())["slot_put_as_select"] == 0 and count(t.gm, "index_put") == 1


class FilledBySlices(nn.Module):
    """DeepSeek-V3's keys: a new_empty tensor filled by two slice copies along the last dim (the
    second from a broadcast rotary part, cast on the way)."""

    def forward(self, nope, rot):
        keys = nope.new_empty(*nope.shape[:-1], nope.shape[-1] + rot.shape[-1])
        keys[..., : nope.shape[-1]].copy_(nope)
        keys[..., nope.shape[-1]:].copy_(rot.expand(*nope.shape[:-1], -1))
        return keys * 2.0


def test_slices_filling_an_empty_tensor_become_a_cat():
    nope, rot = torch.randn(2, 3, 5, 4), torch.randn(2, 1, 5, 2, dtype=torch.float64)
    t = inference_graph(FilledBySlices(), nope, rot)
    expected = FilledBySlices()(nope, rot)
    counts = drop_copies(t.gm, ctx())
    t.gm.graph.lint()
    check_meta(t.gm)
    torch.testing.assert_close(run(t), expected, rtol=0, atol=0)
    assert counts["slices_filling_as_cat"] == 1 and count(t.gm, "cat") == 1
    assert count(t.gm, "slice_scatter") == 0 and count(t.gm, "new_empty") == 0


class PartlyFilled(nn.Module):
    def forward(self, x, part):
        out = x.clone()
        out[..., 1:3].copy_(part)
        return out * 2.0


def test_slices_that_leave_part_of_the_tensor_stay():
    t = inference_graph(PartlyFilled(), torch.randn(2, 5), torch.randn(2, 2))
    assert drop_copies(t.gm, ctx())["slices_filling_as_cat"] == 0 and count(t.gm, "slice_scatter") == 1


def test_index_copy_of_several_slices_stays():
    cache, new = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 2, 4)
    t = inference_graph(SlotWrite(), cache, new, torch.tensor([1, 4]))
    assert drop_copies(t.gm, ctx())["slot_write_as_select"] == 0 and count(t.gm, "index_copy") == 1
