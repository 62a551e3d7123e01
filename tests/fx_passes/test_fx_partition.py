"""Partitioner: groups per kind on small graphs, no node in two groups, dependency safety, and
the groups run (through the pipeline's own group extraction) to the same values."""
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import compile_backend.ops  # noqa: F401  (registers compile_backend.attention)
from compile_backend.fx_passes.constant_fold import constant_fold
from compile_backend.fx_passes.partition import classify, partition, validate
from fx_passes.graphs import Builder, ctx, inference_graph, run

aten = torch.ops.aten


def _kinds(groups):
    return [(g.kind, g.ops) for g in groups]


def _run_grouped(t, groups):
    """Execute the graph the way the engine does: one call per group (reference semantics)."""
    from compile_backend.groups import fuse_groups

    graph, _ = fuse_groups(t.gm, groups)
    gm = fx.GraphModule(t.gm, graph)
    with torch.no_grad():
        return gm(*t.inputs)


def _partitioned(model, *inputs):
    t = inference_graph(model, *inputs)
    constant_fold(t.gm, ctx())
    with torch.no_grad():
        expected = model(*inputs)
    groups = partition(t.gm)
    t.gm.graph.lint()
    validate(t.gm, groups)
    got = _run_grouped(t, groups)
    torch.testing.assert_close(got[0] if len(got) == 1 else tuple(got), expected, rtol=1e-6, atol=1e-6)
    return t, groups


class LinearEpilogue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(7, 7)

    def forward(self, x):
        return (F.gelu(self.fc(x)) + x) * 0.5


def test_gemm_takes_bias_activation_residual_and_scale():
    _, groups = _partitioned(LinearEpilogue().eval(), torch.randn(3, 5, 7))
    assert _kinds(groups) == [("gemm", ("addmm", "view", "gelu", "add", "mul"))]
    assert groups[0].anchor.target is aten.addmm.default


class ConvEpilogue(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x).to(torch.float64)


def test_conv_takes_residual_relu_and_cast():
    _, groups = _partitioned(ConvEpilogue().eval(), torch.randn(2, 3, 5, 6))
    assert _kinds(groups) == [("conv", ("convolution", "add", "relu", "_to_copy"))]


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(9)
        self.w = nn.Parameter(torch.randn(9))

    def forward(self, x):
        h = self.ln(x * 2.0)
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        return torch.softmax(rms, dim=-1)


def test_reductions_take_prologue_and_epilogue():
    # layer norm, a decomposed RMS norm and a softmax over the same rows: one row kernel
    _, groups = _partitioned(Norms().eval(), torch.randn(4, 9))
    assert _kinds(groups) == [
        ("reduction", ("mul", "native_layer_norm", "getitem", "pow", "mean", "add", "rsqrt", "mul", "mul",
                       "_softmax")),
    ]


def test_reductions_over_different_rows_are_separate_groups():
    b = Builder()
    x = b.input(torch.randn(4, 9))
    cols = b.op(aten.sum.dim_IntList, x, [0], True)  # reduces the other dim
    centred = b.op(aten.sub.Tensor, x, cols)
    t = b.build(b.op(aten._softmax.default, centred, -1, False))
    groups = partition(t.gm)
    validate(t.gm, groups)
    assert _kinds(groups) == [("reduction", ("sum", "sub")), ("reduction", ("_softmax",))]


def test_pointwise_chain_with_broadcasting_is_one_group():
    b = Builder()
    x = b.input(torch.randn(4, 6))
    row = b.input(torch.randn(6))
    a = b.op(aten.add.Tensor, x, row)
    s = b.op(aten.sigmoid.default, a)
    m = b.op(aten.mul.Tensor, s, a)  # a has two users: computed once, inside the group
    t = b.build(b.op(aten.tanh.default, m))
    groups = partition(t.gm)
    validate(t.gm, groups)
    assert _kinds(groups) == [("pointwise", ("add", "sigmoid", "mul", "tanh"))]


class ConvPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(torch.relu(self.conv(x)), 3, 2, 1) * 2.0


def test_max_pool_is_its_own_group_with_its_getitems():
    # the pooling neither joins the conv's epilogue nor takes the pointwise op after it; its
    # group holds the getitem of the values, so the group's output is a tensor
    t, groups = _partitioned(ConvPool().eval(), torch.randn(2, 3, 9, 7))
    assert _kinds(groups) == [("conv", ("convolution", "relu")), ("pool", ("max_pool2d_with_indices", "getitem")),
                              ("pointwise", ("mul",))]
    pool = next(n for n in t.gm.graph.nodes if n.target is aten.max_pool2d_with_indices.default)
    assert classify(pool) == "pool" and groups[1].nodes[0] is pool


def test_max_pool_group_takes_both_outputs_when_indices_are_used():
    b = Builder()
    x = b.input(torch.randn(1, 2, 6, 6))
    pooled = b.op(aten.max_pool2d_with_indices.default, x, [2, 2], [2, 2])
    values = b.op(operator.getitem, pooled, 0)
    indices = b.op(operator.getitem, pooled, 1)
    t = b.build(b.op(aten.relu.default, values), indices)
    groups = partition(t.gm)
    validate(t.gm, groups)
    assert _kinds(groups) == [("pool", ("max_pool2d_with_indices", "getitem", "getitem")), ("pointwise", ("relu",))]
    from compile_backend.groups import extract_group

    group = extract_group(t.gm, groups[0], "g0")
    assert [o.args[1] for o in group.outputs] == [0, 1]  # values and indices leave the group


def test_epilogue_leaves_sinks_their_readers_compute():
    """A GEMM epilogue does not store ``abs`` read only by a row reduction, nor a widening cast
    read by fusable ops: it stores the fp16 value once and the reduction kernel computes both
    (a dynamic row quantize). A widening cast that is a graph output stays in the epilogue."""
    b = Builder()
    x, w = b.input(torch.randn(4, 6).half()), b.input(torch.randn(6, 5).half())
    y = b.op(aten.gelu.default, b.op(aten.mm.default, x, w))
    amax = b.op(aten.amax.default, b.op(aten.abs.default, y), [-1], True)
    wide = b.op(aten._to_copy.default, y, dtype=torch.float32)
    q = b.op(aten.mul.Tensor, wide, b.op(aten.reciprocal.default, b.op(aten._to_copy.default, amax, dtype=torch.float32)))
    t = b.build(q)
    groups = partition(t.gm)
    validate(t.gm, groups)
    assert _kinds(groups) == [("gemm", ("mm", "gelu")),
                              ("reduction", ("abs", "amax", "_to_copy", "_to_copy", "reciprocal", "mul"))], _kinds(groups)
    expected = run(t)
    torch.testing.assert_close(_run_grouped(t, groups)[0], expected if isinstance(expected, torch.Tensor) else expected[0])

    b = Builder()
    x, w = b.input(torch.randn(4, 6).half()), b.input(torch.randn(6, 5).half())
    t = b.build(b.op(aten._to_copy.default, b.op(aten.mm.default, x, w), dtype=torch.float32))
    assert _kinds(partition(t.gm)) == [("gemm", ("mm", "_to_copy"))]


def test_autocast_backward_casts_are_element_wise():
    """AOT's backward graphs spell autocast's casts as ``_to_copy(dtype, layout=strided,
    device=<the input's>)``: a dtype conversion, fused (a weight gradient's GEMM writes fp32
    itself); one that changes the device stays an ATen op."""
    from compile_backend.fx_passes.partition import classify

    b = Builder()
    g, x = b.input(torch.randn(8, 4).bfloat16()), b.input(torch.randn(8, 6).bfloat16())
    dw = b.op(aten.mm.default, b.op(aten.t.default, g), x)
    wide = b.op(aten._to_copy.default, dw, dtype=torch.float32, layout=torch.strided, device=torch.device("cpu"))
    t = b.build(wide)
    assert classify(wide) == "pointwise"
    assert _kinds(partition(t.gm)) == [("gemm", ("mm", "_to_copy"))]
    moved = b.graph.call_function(aten._to_copy.default, (dw,), {"dtype": torch.float32, "device": torch.device("meta")})
    moved.meta["val"] = torch.empty(4, 6, device="meta")
    assert classify(moved) == "aten"


def test_group_inputs_fed_by_constants_are_marked():
    """A kernel may derive a value from a constant input once (qgemm's spread x scale)."""
    from compile_backend.groups import extract_group

    b = Builder()
    x = b.input(torch.randn(4, 6))
    w = b.const("w", torch.randn(4, 6))
    t = b.build(b.op(aten.relu.default, b.op(aten.mul.Tensor, x, w)))
    groups = partition(t.gm)
    group = extract_group(t.gm, groups[0], "g0")
    assert group.constants == {group.placeholders[1].name}


def test_attention_op_is_alone_and_others_stay_apart():
    b = Builder()
    q, k, v = (b.input(torch.randn(1, 2, 3, 4)) for _ in range(3))
    qs = b.op(aten.mul.Tensor, q, 2.0)
    o = b.op(torch.ops.compile_backend.attention.default, qs, k, v, None, 0.5, True)
    t = b.build(b.op(aten.relu.default, o))
    groups = partition(t.gm)
    validate(t.gm, groups)
    assert _kinds(groups) == [("pointwise", ("mul",)), ("attention", ("compile_backend.attention",)),
                              ("pointwise", ("relu",))]


def test_mutation_views_and_getitems_stay_out_of_groups():
    b = Builder()
    x = b.input(torch.randn(4, 6))
    buf = b.input(torch.zeros(4, 6))
    y = b.op(aten.exp.default, x)
    v = b.op(aten.view.default, y, [24])
    z = b.op(aten.neg.default, v)
    split = b.op(aten.split.Tensor, z, 12)
    first = b.op(operator.getitem, split, 0)
    b.op(aten.copy_.default, buf, y)
    t = b.build(first)
    groups = partition(t.gm)
    validate(t.gm, groups)
    grouped = {n for g in groups for n in g.nodes}
    assert {n.target for n in grouped} == {aten.exp.default, aten.neg.default}
    assert classify(next(n for n in t.gm.graph.nodes if n.target is aten.copy_.default)) is None


def test_group_never_reads_a_value_computed_inside_its_span():
    # c = relu(a) + d where d is computed from an unrelated input after a: the add cannot join
    # a's group at a's position, so dependency safety keeps it out
    b = Builder()
    x, y = b.input(torch.randn(5)), b.input(torch.randn(5, 5))
    a = b.op(aten.exp.default, x)
    r = b.op(aten.relu.default, a)
    s = b.op(aten.sum.dim_IntList, y, [0])  # a reduction between a and its consumer
    c = b.op(aten.add.Tensor, r, s)
    t = b.build(c, b.op(aten.cos.default, a))
    before = run(t)
    groups = partition(t.gm)
    t.gm.graph.lint()
    validate(t.gm, groups)
    owner = {n: i for i, g in enumerate(groups) for n in g.nodes}
    assert owner[a] == owner[r] and owner[c] != owner[a]
    for got, want in zip(_run_grouped(t, groups), before):
        torch.testing.assert_close(got, want)


def test_validate_rejects_overlaps_and_broken_order():
    import pytest

    from compile_backend.fx_passes.partition import GroupSpec

    b = Builder()
    x = b.input(torch.randn(3))
    a = b.op(aten.exp.default, x)
    c = b.op(aten.neg.default, a)
    t = b.build(c)
    with pytest.raises(AssertionError):
        validate(t.gm, [GroupSpec("pointwise", [a, c]), GroupSpec("pointwise", [c])])
    with pytest.raises(AssertionError):
        validate(t.gm, [GroupSpec("pointwise", [c, a])])


class TanhGeluLinear(nn.Module):
    """GPT-2's gelu_new written out: the GEMM result is read three times (a DAG epilogue)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(9, 11)

    def forward(self, x):
        h = self.fc(x)
        return 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))


def test_gemm_epilogue_takes_a_dag_that_reads_the_result_several_times():
    _, groups = _partitioned(TanhGeluLinear().eval(), torch.randn(5, 9))
    assert [g.kind for g in groups] == ["gemm"], _kinds(groups)  # was gemm + 2 pointwise kernels
    assert {"addmm", "pow", "tanh", "mul", "add"} <= set(groups[0].ops)


class Diamond(nn.Module):
    """Two branches of one input joined by a multiply, after a reduction (no GEMM to take them)."""

    def forward(self, x):
        y = torch.softmax(x, -1) * 3.0
        return (y * 0.5) * (torch.tanh(y) + 1.0)


def test_pointwise_diamond_is_one_group():
    _, groups = _partitioned(Diamond().eval(), torch.randn(4, 13))
    kinds = [g.kind for g in groups]
    assert kinds.count("pointwise") <= 1, _kinds(groups)  # was mul | tanh, add, mul


class SideOutput(nn.Module):
    """A branch whose value is also used outside stays out of the other branch's group when
    taking it would add a second output, and the grouping still computes the same values."""

    def forward(self, x):
        y = torch.softmax(x, -1)
        a = y * 2.0
        b = torch.tanh(y)
        return a * b, b.sum(-1)


def test_diamond_with_a_shared_branch_keeps_values():
    _partitioned(SideOutput().eval(), torch.randn(4, 13))


def test_views_made_after_a_group_starts_do_not_split_it():
    """Llama's SwiGLU: ``silu(gate) * up``, gate and up views of one merged GEMM's output, the
    view of ``up`` made right before the multiply (after silu). The views move behind their
    input, so silu and the multiply are one kernel (they were two), and the graph stays valid."""
    b = Builder()
    x, w = b.input(torch.randn(3, 8)), b.input(torch.randn(12, 8))
    y = b.op(aten.mm.default, x, b.op(aten.t.default, w))
    gate = b.op(aten.slice.Tensor, y, 1, 0, 6)
    s = b.op(aten.silu.default, gate)
    up = b.op(aten.slice.Tensor, y, 1, 6, 12)
    t = b.build(b.op(aten.mul.Tensor, s, up))
    groups = partition(t.gm)
    validate(t.gm, groups)
    assert [g.kind for g in groups] == ["gemm", "pointwise"] and _kinds(groups)[1][1] == ("silu", "mul")
    run(t)  # the reordered graph computes the same values


def test_rotary_cat_and_its_negated_piece_join_the_multiply_adds():
    """``x * cos + cat((-x2, x1)) * sin``: one pointwise group (the cat and the ``neg`` of its
    piece included); a cat never joins a GEMM epilogue or a reduction (no cat in their code)."""
    b = Builder()
    x, cos, sin = b.input(torch.randn(2, 3, 5, 16)), b.input(torch.randn(5, 16)), b.input(torch.randn(5, 16))
    x2, x1 = b.op(aten.slice.Tensor, x, 3, 8, 16), b.op(aten.slice.Tensor, x, 3, 0, 8)
    rot = b.op(aten.cat.default, [b.op(aten.neg.default, x2), x1], -1)
    t = b.build(b.op(aten.add.Tensor, b.op(aten.mul.Tensor, x, cos), b.op(aten.mul.Tensor, rot, sin)))
    groups = partition(t.gm)
    validate(t.gm, groups)
    assert _kinds(groups) == [("pointwise", ("neg", "cat", "mul", "mul", "add"))]
    run(t)

    b = Builder()
    a, w = b.input(torch.randn(4, 8)), b.input(torch.randn(8, 8))
    y = b.op(aten.mm.default, a, w)
    t = b.build(b.op(aten.relu.default, b.op(aten.cat.default, [y, a], 0)))
    groups = partition(t.gm)
    validate(t.gm, groups)
    assert _kinds(groups) == [("gemm", ("mm",)), ("pointwise", ("cat", "relu"))]
