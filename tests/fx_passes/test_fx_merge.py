"""Horizontal GEMM / 1x1-conv merge: fires on one shared input with constant weights, values
unchanged; never for different inputs, non-constant weights, or where the conv merge loses."""
import operator

import torch
import torch.nn as nn
from expecttest import assert_expected_inline

from compile_backend.fx_passes import total
from compile_backend.fx_passes.cleanup_rules import eliminate_common_subexpressions
from compile_backend.fx_passes.merge_gemms import merge_parallel_gemms
from fx_passes.graphs import Builder, check_meta, count, ctx, inference_graph, run, show

aten = torch.ops.aten


class QKV(nn.Module):
    def __init__(self, bias=True, flatten=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(10, n, bias=bias) for n in (10, 6, 7))
        self.flatten = flatten

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.flatten:  # a view that a column slice of the merged result cannot serve
            return q.reshape(-1), k.reshape(-1) * 2, v
        return q.view(3, 5, 2, 5).transpose(1, 2), k + 1, torch.relu(v)


def _trace(model, *inputs):
    t = inference_graph(model, *inputs)
    eliminate_common_subexpressions(t.gm, ctx())  # one view(x) shared by all projections
    with torch.no_grad():
        expected = model(*inputs)
    return t, expected


def test_qkv_linears_become_one_addmm_and_a_split():
    t, expected = _trace(QKV().eval(), torch.randn(3, 5, 10))
    assert count(t.gm, "addmm") == 3
    assert total(merge_parallel_gemms(t.gm, ctx())) == 1
    assert count(t.gm, "addmm") == 1 and count(t.gm, "split_with_sizes") == 1
    merged = next(n for n in t.gm.graph.nodes if n.target is aten.addmm.default)
    assert tuple(merged.meta["val"].shape) == (15, 23)
    t.gm.graph.lint()
    check_meta(t.gm)
    for got, want in zip(run(t), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bias_free_linears_merge_into_one_mm():
    t, expected = _trace(QKV(bias=False).eval(), torch.randn(3, 5, 10))
    assert total(merge_parallel_gemms(t.gm, ctx())) == 1
    assert count(t.gm, "mm") == 1 and count(t.gm, "addmm") == 0
    for got, want in zip(run(t), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_consumers_that_need_contiguous_values_get_a_copy():
    t, expected = _trace(QKV(flatten=True).eval(), torch.randn(3, 5, 10))
    assert total(merge_parallel_gemms(t.gm, ctx())) == 1
    check_meta(t.gm)
    assert count(t.gm, "clone") >= 1  # reshape(-1) of a column slice needs its own copy
    for got, want in zip(run(t), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_hand_built_merge_graph():
    b = Builder()
    x = b.input(torch.randn(4, 3))
    w1, w2 = b.const("w1", torch.randn(5, 3)), b.const("w2", torch.randn(2, 3))
    b1, b2 = b.const("b1", torch.randn(5)), b.const("b2", torch.randn(2))
    y1 = b.op(aten.addmm.default, b1, x, b.op(aten.t.default, w1))
    y2 = b.op(aten.addmm.default, b2, x, b.op(aten.t.default, w2))
    t = b.build(b.op(aten.relu.default, y1), b.op(aten.sigmoid.default, y2))
    before = run(t)
    assert total(merge_parallel_gemms(t.gm, ctx())) == 1
    assert_expected_inline(show(t.gm), """\
v0 = cat([b1, b2], 0)
v1 = cat([w1, w2], 0)
v2 = t(v1)
v3 = addmm(v0, x0, v2)
v4 = split_with_sizes(v3, [5, 2], 1)
v5 = getitem(v4, 0)
v6 = getitem(v4, 1)
v7 = relu(v5)
v8 = sigmoid(v6)
return [v7, v8]""")
    for got, want in zip(run(t), before):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_merge_for_different_inputs_or_non_constant_weights():
    b = Builder()
    x, z = b.input(torch.randn(4, 3)), b.input(torch.randn(4, 3))
    w1, w2 = b.const("w1", torch.randn(3, 5)), b.const("w2", torch.randn(3, 2))
    w_in = b.input(torch.randn(3, 6))  # a weight that is a graph input (not frozen)
    on_x = b.op(aten.mm.default, x, w1)
    on_z = b.op(aten.mm.default, z, w2)  # same weights kind, other input
    live = b.op(aten.mm.default, z, w_in)  # shares z but its weight is not a constant
    t = b.build(on_x, on_z, live)
    assert total(merge_parallel_gemms(t.gm, ctx())) == 0


class Inception(nn.Module):
    """Parallel 1x1 branches on one input, concatenated: the merge pays."""

    def __init__(self, relu=False, strides=(1, 1, 1)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(6, c, 1, stride=s) for c, s in zip((4, 5, 3), strides))
        self.relu = relu

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.relu:
            outs = [torch.relu(o) for o in outs]
        return torch.cat([o[:, :, :3, :3] for o in outs], 1)


def test_parallel_1x1_convs_merge_when_no_epilogue_is_lost():
    model = Inception().eval()
    x = torch.randn(2, 6, 7, 5)
    t, expected = _trace(model, x)
    assert total(merge_parallel_gemms(t.gm, ctx())) == 1
    assert count(t.gm, "convolution") == 1
    check_meta(t.gm)
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-6)


def test_parallel_1x1_convs_stay_apart_with_epilogues_or_different_strides():
    x = torch.randn(2, 6, 7, 5)
    t, _ = _trace(Inception(relu=True).eval(), x)
    assert total(merge_parallel_gemms(t.gm, ctx())) == 0
    t, _ = _trace(Inception(strides=(1, 2, 1)).eval(), x)
    assert total(merge_parallel_gemms(t.gm, ctx())) == 1  # the two stride-1 branches only
    assert count(t.gm, "convolution") == 2


def test_getitem_of_merge_is_plain_operator():
    # the split pieces are read with operator.getitem, as every other multi-output op
    t, _ = _trace(QKV().eval(), torch.randn(3, 5, 10))
    merge_parallel_gemms(t.gm, ctx())
    split = next(n for n in t.gm.graph.nodes if n.target is aten.split_with_sizes.default)
    assert all(u.target is operator.getitem for u in split.users)
