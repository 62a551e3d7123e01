"""Partitioner: constants and small values inside bigger kernels. A fill (``zeros``, ``ones_like``,
``scalar_tensor``) is copied to each reader and computed there; a 0-d or per-channel chain
(a QAT layer's scale) joins the kernel of the full-size values it feeds and is stored beside
them; a per-row chain after a row reduction stays in the reduction's kernel; a GEMM epilogue
computes the other branch of a diamond (a straight-through gradient's mask) from loads."""
import operator

import torch

from compile_backend.fx_passes.partition import partition, validate
from fx_passes.graphs import Builder
from fx_passes.test_fx_partition import _kinds, _run_grouped

aten = torch.ops.aten


def _check(t, expected_kinds=None):
    with torch.no_grad():
        expected = t.gm(*t.inputs)
    groups = partition(t.gm)
    t.gm.graph.lint()
    validate(t.gm, groups)
    got = _run_grouped(t, groups)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    if expected_kinds is not None:
        assert [g.kind for g in groups] == expected_kinds, _kinds(groups)
    return groups


def test_a_shared_fill_is_copied_into_each_reader():
    b = Builder()
    x = b.input(torch.randn(5, 7))
    zero = b.op(aten.zeros.default, [5, 7], dtype=torch.float32, device=torch.device("cpu"))
    y = b.op(aten.where.self, b.op(aten.gt.Scalar, x, 0.5), x, zero)
    r = b.op(aten.sum.dim_IntList, y, [1], True)  # a reduction between the two readers
    z = b.op(aten.maximum.default, b.op(aten.mul.Tensor, x, r), zero)
    groups = _check(b.build(z))
    assert all(g.kind != "aten" for g in groups), _kinds(groups)
    assert sum(g.ops.count("full") for g in groups) == 2  # one copy per reader


def test_a_scale_chain_joins_the_fake_quantize_kernel_and_is_stored():
    b = Builder()
    x = b.input(torch.randn(6, 9))
    p = b.input(torch.tensor(0.05))
    s = b.op(aten.clamp_min.default, b.op(aten.div.Tensor, b.op(aten.mul.Tensor, p, 127.0), 127.0), 1e-12)
    inv = b.op(aten.where.self, b.op(aten.gt.Scalar, s, 0), b.op(aten.reciprocal.default, s),
               b.op(aten.scalar_tensor.default, 0.0, dtype=torch.float32))
    q = b.op(aten.clamp.default, b.op(aten.round.default, b.op(aten.mul.Tensor, x, inv)), -127.0, 127.0)
    y = b.op(aten.mul.Tensor, q, s)
    groups = _check(b.build(y, s), ["pointwise"])  # was three: chain, fill, fake-quantize
    assert {"mul", "clamp_min", "reciprocal", "round", "full"} <= set(groups[0].ops)


def test_a_per_row_chain_after_amax_stays_in_the_reduction_kernel():
    b = Builder()
    w = b.input(torch.randn(8, 33))
    amax = b.op(aten.amax.default, b.op(aten.abs.default, w), [1])  # (8,): no keepdim
    scale = b.op(aten.where.self, b.op(aten.gt.Scalar, amax, 0), b.op(aten.div.Tensor, amax, 127.0),
                 b.op(aten.zeros_like.default, amax))
    s = b.op(aten.clamp_min.default, b.op(aten.view.default, scale, [8, 1]), 1e-12)
    wq = b.op(aten.mul.Tensor, b.op(aten.round.default, b.op(aten.div.Tensor, w, s)), s)
    groups = _check(b.build(wq, s), ["reduction"])  # was four kernels
    assert {"amax", "where", "round"} <= set(groups[0].ops)


def test_a_gemm_epilogue_computes_the_other_branch_of_a_diamond():
    b = Builder()
    g = b.input(torch.randn(4, 6))
    x = b.input(torch.randn(6, 5))
    w = b.input(torch.randn(4, 5))
    s = b.input(torch.tensor(0.01))
    mm = b.op(aten.mm.default, g, x)
    inside = b.op(aten.le.Scalar, b.op(aten.abs.default, b.op(aten.div.Tensor, w, s)), 127.0)
    dw = b.op(aten.where.self, inside, mm, b.op(aten.scalar_tensor.default, 0.0, dtype=torch.float32))
    groups = _check(b.build(dw), ["gemm"])
    assert groups[0].ops == ("mm", "div", "abs", "le", "full", "where")


def test_cache_updates_of_keys_and_values_are_one_kernel_with_the_rotation():
    """A decode step's layer: the rotated key (rotate-half cat inside) is read only by the key
    cache's select, so it is computed there; the key and value selects share the slot mask and
    depend on nothing in between, so they are one kernel (three launches were: rotary, two
    selects)."""
    b = Builder()
    k = b.input(torch.randn(2, 2, 1, 8))
    v = b.input(torch.randn(2, 2, 1, 8))
    cos = b.input(torch.randn(2, 1, 1, 8))
    sin = b.input(torch.randn(2, 1, 1, 8))
    slot = b.input(torch.rand(2, 1, 5, 1) > 0.5)
    kc, vc = b.input(torch.randn(2, 2, 5, 8)), b.input(torch.randn(2, 2, 5, 8))
    lo = b.op(aten.slice.Tensor, k, 3, 0, 4)
    hi = b.op(aten.slice.Tensor, k, 3, 4, 8)
    rot = b.op(aten.cat.default, [b.op(aten.neg.default, hi), lo], -1)
    k_rot = b.op(aten.add.Tensor, b.op(aten.mul.Tensor, k, cos), b.op(aten.mul.Tensor, rot, sin))
    new_k = b.op(aten.where.self, slot, k_rot, kc)
    new_v = b.op(aten.where.self, slot, v, vc)
    groups = _check(b.build(new_k, new_v), ["pointwise"])
    assert groups[0].ops.count("where") == 2 and "cat" in groups[0].ops


def test_slot_index_made_after_the_rotation_from_a_count_still_joins_one_kernel():
    """transformers 5's StaticCache: the slot is ``arange(1) + cumulative_length`` (a count the
    step carries as an input), computed inside the cache update, after the key's rotation. That
    value of earlier inputs moves above the rotation when the rotation joins the select reading
    it, so it no longer fences them apart: one kernel (it was two per layer)."""
    b = Builder()
    k = b.input(torch.randn(1, 2, 1, 8))
    v = b.input(torch.randn(1, 2, 1, 8))
    cos = b.input(torch.randn(1, 1, 1, 8))
    count = b.input(torch.tensor(3))
    kc, vc = b.input(torch.randn(1, 2, 5, 8)), b.input(torch.randn(1, 2, 5, 8))
    first = b.const("first", torch.arange(1))
    slots = b.const("slots", torch.arange(5).view(1, 1, 5, 1))
    lo = b.op(aten.slice.Tensor, k, 3, 0, 4)
    hi = b.op(aten.slice.Tensor, k, 3, 4, 8)
    rot = b.op(aten.cat.default, [b.op(aten.neg.default, hi), lo], -1)
    k_rot = b.op(aten.add.Tensor, b.op(aten.mul.Tensor, k, cos), rot)
    index = b.op(aten.add.Tensor, first, count)  # made here, after the rotation
    hit_k = b.op(aten.eq.Tensor, slots, b.op(aten.view.default, index, [1, 1, 1, 1]))
    new_k = b.op(aten.where.self, hit_k, k_rot, kc)
    hit_v = b.op(aten.eq.Tensor, slots, b.op(aten.view.default, index, [1, 1, 1, 1]))
    new_v = b.op(aten.where.self, hit_v, v, vc)
    groups = _check(b.build(new_k, new_v))
    (update,) = [g for g in groups if "where" in g.ops]
    assert update.ops.count("where") == 2 and "cat" in update.ops, _kinds(groups)


def test_siblings_that_depend_on_each_other_through_a_kernel_stay_apart():
    b = Builder()
    x = b.input(torch.randn(4, 6))
    m = b.input(torch.rand(4, 6) > 0.5)
    a = b.op(aten.where.self, m, x, b.op(aten.neg.default, x))
    r = b.op(aten.cumsum.default, a, 1)  # an ATen op on the first between them
    c = b.op(aten.where.self, m, r, x)
    groups = _check(b.build(a, c))
    assert [g.kind for g in groups] == ["pointwise", "aten", "pointwise"]


def test_computed_indices_stay_out_of_their_embedding_group():
    """OPT's positions (cumsum(mask) * mask + 2, a small pointwise group read only by the position
    embedding) joined the embedding's group, whose kernel loads indices from group inputs: the
    generator refused it and both ran in ATen. They stay two pointwise groups."""
    b = Builder()
    wpe, x = b.input(torch.randn(9, 8)), b.input(torch.randn(1, 1, 8))
    ids = b.input(torch.tensor([[5]]))  # a decode step: [1, 1] broadcasts to the rows [1, 1, 8]
    pos = b.op(aten.add.Tensor, ids, 2)
    h = b.op(aten.add.Tensor, b.op(aten.embedding.default, wpe, pos), x)
    groups = _check(b.build(h), ["pointwise", "pointwise"])
    assert groups[0].ops == ("add",) and groups[1].ops == ("embedding", "add")


def test_embeddings_join_pointwise_kernels_only():
    """Token + position embeddings and their add are one pointwise kernel (was an ATen
    embedding per table); a norm after them stays a reduction of its own (no gather there)."""
    b = Builder()
    wte, wpe = b.input(torch.randn(40, 8)), b.input(torch.randn(6, 8))
    ids, pos = b.input(torch.randint(0, 40, (2, 6))), b.input(torch.arange(6).unsqueeze(0))
    h = b.op(aten.add.Tensor, b.op(aten.embedding.default, wte, ids), b.op(aten.embedding.default, wpe, pos))
    out = b.op(aten.native_layer_norm.default, h, [8], None, None, 1e-5)
    y = b.op(operator.getitem, out, 0)
    groups = _check(b.build(y), ["pointwise", "reduction"])
    assert groups[0].ops == ("embedding", "embedding", "add")


def test_elementwise_ops_torch_leaves_untagged_join_pointwise_kernels():
    # hardswish / leaky_relu / rsub.Tensor carry no `pointwise` tag in torch: they still fuse
    b = Builder()
    x = b.input(torch.randn(3, 5, 7))
    y = b.op(aten.hardswish.default, b.op(aten.mul.Tensor, x, 2.0))
    z = b.op(aten.rsub.Tensor, b.op(aten.leaky_relu.default, y, 0.2), x)
    groups = _check(b.build(z), ["pointwise"])
    assert set(groups[0].ops) >= {"hardswish", "leaky_relu", "rsub"}, _kinds(groups)
