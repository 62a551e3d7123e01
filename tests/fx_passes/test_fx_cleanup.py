"""CSE and no-op removal: rewritten graphs (inline expectations) and unchanged values."""
import torch
from expecttest import assert_expected_inline

from compile_backend.fx_passes import total
from compile_backend.fx_passes.cleanup_rules import eliminate_common_subexpressions, remove_noops
from fx_passes.graphs import Builder, check_meta, ctx, run, show

aten = torch.ops.aten


def _same(before, after):
    """The rewrites here only drop exact no-ops: results are bit-identical."""
    if isinstance(before, (list, tuple)):
        for b, a in zip(before, after):
            _same(b, a)
        return
    assert before.dtype == after.dtype and before.shape == after.shape
    assert torch.equal(before, after)


def test_cse_merges_equal_pure_nodes():
    b = Builder()
    x = b.input(torch.randn(3, 5, 7))
    w = b.const("w", torch.randn(7, 4))
    v1 = b.op(aten.view.default, x, [15, 7])
    v2 = b.op(aten.view.default, x, [15, 7])
    m1 = b.op(aten.mm.default, v1, w)
    m2 = b.op(aten.mm.default, v2, w)
    out = b.op(aten.add.Tensor, m1, m2)
    t = b.build(out)
    before = run(t)
    assert eliminate_common_subexpressions(t.gm, ctx()) == 2
    assert_expected_inline(show(t.gm), """\
v0 = view(x0, [15, 7])
v1 = mm(v0, w)
v2 = add(v1, v1)
return [v2]""")
    _same(before, run(t))


def test_cse_keeps_different_scalar_types_random_ops_and_mutated_reads():
    b = Builder()
    xi = b.input(torch.arange(12).reshape(3, 4))
    x = b.input(torch.randn(3, 4))
    buf = b.input(torch.zeros(3, 4))
    as_int = b.op(aten.mul.Tensor, xi, 2)  # int64 result
    as_float = b.op(aten.mul.Tensor, xi, 2.0)  # float32 result: not the same value
    d1 = b.op(aten.native_dropout.default, x, 0.5, True)
    d2 = b.op(aten.native_dropout.default, x, 0.5, True)  # two random draws
    r1 = b.op(aten.add.Tensor, buf, 1)
    b.op(aten.copy_.default, buf, x)
    r2 = b.op(aten.add.Tensor, buf, 1)  # reads buf after the write
    t = b.build(as_int, as_float, d1, d2, r1, r2)
    assert eliminate_common_subexpressions(t.gm, ctx()) == 0


def test_remove_noops_drops_every_identity():
    b = Builder()
    x = b.input(torch.randn(6, 5))
    y = b.input(torch.randn(6, 5))
    v = b.op(aten.view.default, x, [6, 5])  # identity view
    tt = b.op(aten.t.default, b.op(aten.t.default, v))  # transposes that cancel
    e = b.op(aten.expand.default, tt, [6, 5])  # identity expand
    m = b.op(aten.mul.Tensor, e, 1)
    a = b.op(aten.add.Tensor, m, -0.0)  # exact for every x; x + 0 is not (-0.0 + 0 = +0.0)
    s = b.op(aten.sub.Tensor, a, 0)
    d = b.op(aten.div.Tensor, s, 1)
    c = b.op(aten.clone.default, d)
    cast = b.op(aten._to_copy.default, c, dtype=torch.float32)
    drop = b.op(aten.dropout.default, cast, 0.1, False)
    nd = b.op(aten.native_dropout.default, drop, 0.1, False)
    g = b.op(__import__("operator").getitem, nd, 0)
    sl = b.op(aten.slice.Tensor, g, 0, 0, 9223372036854775807)
    pad = b.op(aten.constant_pad_nd.default, sl, [0, 0, 0, 0], 0.0)  # Swin's pad to whole windows, of 0
    out = b.op(aten.add.Tensor, pad, y)
    t = b.build(out)
    before = run(t)
    n = total(remove_noops(t.gm, ctx()))
    assert n == 13  # the transpose pair is one match
    assert_expected_inline(show(t.gm), """\
v0 = add(x0, x1)
return [v0]""")
    _same(before, run(t))


def test_remove_noops_keeps_real_work():
    b = Builder()
    x = b.input(torch.randn(4, 6))
    xi = b.input(torch.arange(24).reshape(4, 6))
    xt = b.op(aten.t.default, x)
    layout_copy = b.op(aten.clone.default, xt, memory_format=torch.contiguous_format)  # changes strides
    widen = b.op(aten._to_copy.default, x, dtype=torch.float64)  # changes dtype
    promote = b.op(aten.mul.Tensor, xi, 1.0)  # int * 1.0 is a float tensor
    train_drop = b.op(aten.dropout.default, x, 0.5, True)
    returned_clone = b.op(aten.clone.default, x)  # a graph output keeps its own storage
    scaled = b.op(aten.mul.Tensor, x, 2)
    padded = b.op(aten.constant_pad_nd.default, x, [0, 1], 0.0)
    buf = b.input(torch.zeros(4, 6))
    view_of_written = b.op(aten.view.default, buf, [4, 6])
    b.op(aten.copy_.default, buf, x)
    t = b.build(layout_copy, widen, promote, train_drop, returned_clone, scaled, padded, view_of_written)
    assert total(remove_noops(t.gm, ctx())) == 0


def test_cleanup_keeps_meta_valid_on_a_traced_model():
    from fx_passes.graphs import inference_graph

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(12, 12)
            self.k = torch.nn.Linear(12, 12)
            self.drop = torch.nn.Dropout(0.2)

        def forward(self, x):
            q = self.q(x).view(2, 5, 3, 4).transpose(1, 2)
            k = self.k(x).view(2, 5, 3, 4).transpose(1, 2)
            return self.drop(q.transpose(1, 2).transpose(1, 2) * 1.0 + k)

    model = Heads()
    x = torch.randn(2, 5, 12)
    t = inference_graph(model, x)
    with torch.no_grad():
        expected = model(x)
    assert eliminate_common_subexpressions(t.gm, ctx()) == 1  # the two view(x, [10, 12])
    assert total(remove_noops(t.gm, ctx())) >= 1
    t.gm.graph.lint()
    check_meta(t.gm)
    torch.testing.assert_close(run(t), expected, rtol=0, atol=0)
