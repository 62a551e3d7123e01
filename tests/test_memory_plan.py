"""Memory planning (compile_backend/memory_plan.py) and the engine running over planned buffers.

* hand-built engine graphs: a chain reuses bytes (arena below the sum of its buffers), a view
  keeps its base alive, graph outputs / inputs / mutated values and kernel outputs that alias
  an input are never planned, ``check`` rejects an overlapping plan;
* property tests (hypothesis): random lifetimes and sizes always give a valid placement within
  [live-bytes bound, sum of sizes]; random engine graphs (kernels, views, fresh ATen ops,
  several outputs, pass-through outputs) give plans whose shared bytes never hold two values
  live at once by an independent read analysis, and the engine run over the arena returns what
  it returns without one;
* kernels: every Triton launcher with ``supports_out`` writes into the given tensors and
  rejects one of another layout;
* end to end under the Triton interpreter: a small model runs over planned buffers, matches
  eager, keeps call N's output unchanged at call N+1, fills ``report.memory``, keeps its arena
  across a refit, and gives right answers to two threads calling it at once.
"""
from __future__ import annotations

import copy
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "kernels"))

import compile_backend  # noqa: E402
from compile_backend import groups, memory_plan  # noqa: E402
from compile_backend.engine import Engine, GroupCall  # noqa: E402
from compile_backend.kernels.base import Kernel, KernelGroup  # noqa: E402
from compile_backend.memory_plan import ALIGN, Buffer, MemoryPlan, assign, check  # noqa: E402

aten = torch.ops.aten


# --------------------------------------------------------------------------- hand-built graphs
class EngineGraph:
    """Builds engine graphs as ``fuse_groups``/``inline_aten_groups`` leave them: group calls
    (kernels that write into given tensors, run here in plain torch) with getitems, ATen ops."""

    def __init__(self):
        self.graph = fx.Graph()
        self.n_inputs = 0
        self.n_calls = 0

    def input(self, n: int = 8) -> fx.Node:
        node = self.graph.placeholder(f"x{self.n_inputs}")
        node.meta["arg_index"] = self.n_inputs
        node.meta["val"] = torch.empty(n, device="meta")
        self.n_inputs += 1
        return node

    def kernel(self, *inputs: fx.Node, sizes=(8,), passthrough: bool = False, writes: bool = True,
               pause: float = 0.0):
        """A group call with one fresh output per ``sizes`` entry (each value: arange(n) * (k+1)
        plus the sum of every input, so a corrupted input shows), and with ``passthrough`` one
        more output that is its first input itself; it sleeps ``pause`` seconds after writing (the
        GIL goes to other threads). Returns the getitem nodes."""
        g = fx.Graph()
        ph = [g.placeholder(f"in{i}") for i in range(len(inputs))]
        for p, x in zip(ph, inputs):
            p.meta["val"] = x.meta["val"]
        outs = []
        for n in sizes:
            o = g.call_function(aten.mul.Tensor, (ph[0], 2.0))
            o.meta["val"] = torch.empty(n, device="meta")
            outs.append(o)
        if passthrough:
            outs.append(ph[0])
        g.output(tuple(outs))
        group = KernelGroup("pointwise", fx.GraphModule(torch.nn.Module(), g), name=f"g{self.n_calls}")
        layouts = tuple(((n,), (1,), torch.float32) for n in sizes) + ((None,) if passthrough else ())

        def fn(*args, out=None):
            total = sum(a.sum() for a in args)
            results = []
            for k, n in enumerate(sizes):
                value = torch.arange(n, dtype=torch.float32) * (k + 1) + total
                target = out[k] if out is not None and out[k] is not None else None
                results.append(target.copy_(value) if target is not None else value)
            time.sleep(pause)
            return tuple(results) + ((args[0],) if passthrough else ())

        call = GroupCall(self.n_calls, group)
        call.kernel = Kernel("pointwise", "triton", (), fn, supports_out=writes, out_layouts=layouts if writes else ())
        self.n_calls += 1
        node = self.graph.call_function(call, tuple(inputs))
        items = []
        for k in range(len(layouts)):
            item = self.graph.call_function(groups.getitem, (node, k))
            item.meta["val"] = outs[k].meta["val"] if k < len(sizes) else inputs[0].meta["val"]
            items.append(item)
        return items

    def aten(self, op, *args) -> fx.Node:
        node = self.graph.call_function(op, args)
        x = args[0]
        node.meta["val"] = op(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in args]) \
            if isinstance(x, fx.Node) else None
        return node

    def output(self, *nodes: fx.Node) -> fx.Graph:
        self.graph.output(tuple(nodes))
        return self.graph


def _by_value(plan: MemoryPlan):
    return {b.value: b for b in plan.buffers}


def _positions(graph: fx.Graph):
    return {n: i for i, n in enumerate(graph.nodes)}


def test_chain_reuses_memory():
    b = EngineGraph()
    h = b.input()
    items = []
    for _ in range(6):
        (h,) = b.kernel(h, sizes=(256,))
        items.append(h)
    graph = b.output(b.aten(aten.mul.Tensor, h, 2.0))  # last kernel's output: read, not returned
    plan = memory_plan.plan(graph)
    check(plan)
    size = 256 * 4
    assert plan.planned_count == 6 and all(x.size == size for x in plan.buffers)
    # each kernel reads its input while writing its output: two buffers suffice for the chain
    assert plan.arena_bytes == 2 * size < sum(x.size for x in plan.buffers)
    buffers = _by_value(plan)
    assert buffers[items[0].name].offset == buffers[items[2].name].offset
    assert buffers[items[0].name].offset != buffers[items[1].name].offset


@pytest.mark.parametrize("op", ["view", "clone"])
def test_view_keeps_its_base_alive(op):
    """k1's value, read through a view by k3, must survive k2's write; a clone instead of the
    view is a new tensor, so k1's bytes die at the clone and k2 may take them."""
    b = EngineGraph()
    x = b.input(64)
    (v1,) = b.kernel(x, sizes=(64,))
    alias = b.aten(aten.view.default, v1, [8, 8]) if op == "view" else b.aten(aten.clone.default, v1)
    (v2,) = b.kernel(x, sizes=(64,))
    (v3,) = b.kernel(alias, v2, sizes=(64,))
    graph = b.output(b.aten(aten.mul.Tensor, v3, 2.0))
    plan = memory_plan.plan(graph)
    check(plan)
    buffers, pos = _by_value(plan), _positions(graph)
    k3 = v3.args[0]
    if op == "view":
        assert buffers[v1.name].end >= pos[k3]
        assert buffers[v1.name].offset != buffers[v2.name].offset
    else:
        assert buffers[v1.name].end < pos[v2.args[0]]
        assert buffers[v1.name].offset == buffers[v2.name].offset  # best fit reuses the dead bytes


def test_outputs_inputs_and_aliases_are_not_planned():
    b = EngineGraph()
    x = b.input()
    (returned,) = b.kernel(x)
    (viewed,) = b.kernel(x)
    view = b.aten(aten.view.default, viewed, [2, 4])
    (mutated,) = b.kernel(x)
    b.aten(aten.add_.Tensor, mutated, 1.0)
    (fresh, through) = b.kernel(x, passthrough=True)
    (unwritable,) = b.kernel(x, writes=False)
    (internal,) = b.kernel(fresh, through, unwritable, mutated)
    graph = b.output(returned, view, b.aten(aten.mul.Tensor, internal, 2.0))
    plan = memory_plan.plan(graph)
    assert {x.value for x in plan.buffers} == {fresh.name, internal.name}
    groups = [n.target.group for n in graph.nodes if isinstance(n.target, GroupCall)]
    assert memory_plan.group_output_aliases(groups[3]) == [frozenset(), frozenset({0})]


def test_fresh_op_reads_schemas_conservatively():
    assert memory_plan.fresh_op(aten.add.Tensor) and memory_plan.fresh_op(aten.mm.default)
    for op in (aten.view.default, aten._unsafe_view.default, aten.add_.Tensor, aten.reshape.default,
               aten.type_as.default, aten.set_.source_Tensor, aten.copy_.default):
        assert not memory_plan.fresh_op(op), op
    assert not memory_plan.fresh_op(groups.getitem)


def _buf(name, start, end, size, offset=-1):
    return Buffer(name, "k", 0, (size // 4,), (1,), torch.float32, size, start, end, offset)


def test_check_rejects_overlap():
    ok = MemoryPlan(2 * ALIGN, (_buf("a", 0, 3, ALIGN, 0), _buf("b", 2, 5, ALIGN, ALIGN), _buf("c", 4, 6, ALIGN, 0)))
    check(ok)
    with pytest.raises(ValueError, match="live together"):
        check(MemoryPlan(2 * ALIGN, (_buf("a", 0, 3, 2 * ALIGN, 0), _buf("b", 3, 5, ALIGN, ALIGN))))
    with pytest.raises(ValueError, match="outside"):
        check(MemoryPlan(ALIGN, (_buf("a", 0, 3, ALIGN, ALIGN),)))


# --------------------------------------------------------------------------- properties
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12), st.integers(1, 16)), min_size=0, max_size=40))
def test_assign_places_any_lifetimes_validly(specs):
    buffers = [_buf(f"v{i}", s, s + d, n * ALIGN) for i, (s, d, n) in enumerate(specs)]
    plan = assign(buffers)
    check(plan)
    assert plan.live_bytes_bound() <= plan.arena_bytes <= sum(x.size for x in buffers)
    assert sorted(x.value for x in plan.buffers) == sorted(x.value for x in buffers)


@st.composite
def engine_graphs(draw):
    """A random engine graph: kernels reading random earlier values, views, fresh ATen ops,
    in-place updates, multi-output and pass-through kernels, random graph outputs."""
    b = EngineGraph()
    values = [b.input(draw(st.sampled_from([8, 16])))]
    for _ in range(draw(st.integers(1, 14))):
        step = draw(st.sampled_from(["kernel", "kernel", "kernel", "view", "fresh", "inplace"]))
        pick = draw(st.sampled_from(values))
        if step == "kernel":
            reads = [pick] + draw(st.lists(st.sampled_from(values), max_size=2))
            sizes = tuple(draw(st.lists(st.sampled_from([8, 64, 200, 1000]), min_size=1, max_size=2)))
            values += b.kernel(*reads, sizes=sizes, passthrough=draw(st.booleans()),
                               writes=draw(st.sampled_from([True, True, False])))
        elif step == "view":
            values.append(b.aten(aten.view.default, pick, [-1]))
        elif step == "fresh":
            values.append(b.aten(aten.add.Tensor, pick, 1.0))
        elif pick.op != "placeholder":
            b.aten(aten.add_.Tensor, pick, 1.0)
    outs = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))
    return b.output(*outs), b.n_inputs


def _aliases(graph: fx.Graph):
    """Independent oracle, from what the builder above generates: per value, the nodes that
    share its bytes (views, in-place results and pass-through outputs, transitively)."""
    derived = {n: {n} for n in graph.nodes}
    for n in graph.nodes:  # topological: aliases of aliases are found in one sweep
        if n.op != "call_function":
            continue
        if n.target in (aten.view.default, aten.add_.Tensor):
            src = n.args[0]
        elif n.target is groups.getitem and n.args[0].target.group.outputs[n.args[1]].op == "placeholder":
            src = n.args[0].args[0]  # the pass-through output is the call's first input
        else:
            continue
        for group in derived.values():
            if src in group:
                group.add(n)
    return derived


@settings(max_examples=60, deadline=None)
@given(engine_graphs(), st.integers(0, 2**16))
def test_random_graphs_plan_and_run_correctly(case, seed):
    graph, n_inputs = case
    plan = memory_plan.plan(graph)
    check(plan)
    nodes = {n.name: n for n in graph.nodes}
    pos, aliases = _positions(graph), _aliases(graph)
    outputs = set(next(n for n in graph.nodes if n.op == "output").all_input_nodes)
    spans = {}
    for x in plan.buffers:
        value = nodes[x.value]
        assert not aliases[value] & outputs, f"{x.value} (or an alias of it) is a graph output"
        # written by its call, read or written wherever it or an alias is used
        spans[x.value] = (pos[value.args[0]], max(pos[u] for a in aliases[value] for u in list(a.users) + [a]))
        assert x.start <= spans[x.value][0] and spans[x.value][1] <= x.end  # the plan's lifetime covers the reads
    for a in plan.buffers:
        for c in plan.buffers:
            if a is not c and a.offset < c.offset + c.size and c.offset < a.offset + a.size:
                (s1, e1), (s2, e2) = spans[a.value], spans[c.value]
                assert e1 < s2 or e2 < s1, f"{a.value} and {c.value} share bytes while both live"
    gen = torch.Generator().manual_seed(seed)
    args = [torch.randn(n.meta["val"].shape, generator=gen) for n in graph.nodes if n.op == "placeholder"]
    expected = Engine(graph, n_inputs, {})([a.clone() for a in args])
    planned = Engine(graph, n_inputs, {}, memory=plan, device=torch.device("cpu"))
    for _ in range(2):
        got = planned([a.clone() for a in args])
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def test_engine_with_an_arena_runs_one_call_at_a_time():
    """Two threads through one engine: each kernel sleeps after writing its arena buffer, so
    without the engine's lock the other thread's call would overwrite it before it is read."""
    b = EngineGraph()
    h = b.input(64)
    for _ in range(4):
        (h,) = b.kernel(h, sizes=(64,), pause=0.002)
    graph = b.output(b.aten(aten.mul.Tensor, h, 1.0))
    engine = Engine(graph, 1, {}, memory=memory_plan.plan(graph), device=torch.device("cpu"))
    assert engine.memory.planned_count == 4
    inputs = [torch.full((64,), float(i)) for i in range(2)]
    expected = [engine([x])[0] for x in inputs]
    assert not torch.equal(expected[0], expected[1])
    errors = []

    def worker(i):
        for _ in range(5):
            got = engine([inputs[i]])[0]
            if not torch.equal(got, expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --------------------------------------------------------------------------- kernels
def _kernel_cases():
    import torch.nn.functional as F
    from groups import context, make_group

    from compile_backend.kernels.attention import build_attention
    from compile_backend.kernels.conv import build_conv
    from compile_backend.kernels.gemm import build_gemm
    from compile_backend.kernels.pointwise import build_pointwise
    from compile_backend.kernels.reduction import build_reduction

    def anchored(kind, fn, inputs, packets):
        g = make_group(fn, *inputs)
        anchor = next(n for n in g.gm.graph.nodes if n.op == "call_function"
                      and getattr(n.target, "overloadpacket", None) in packets)
        return KernelGroup(kind, g.gm, anchor=anchor.name)

    x, w = torch.randn(5, 6), torch.randn(6, 7)
    img, filt = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    yield "pointwise", build_pointwise(make_group(lambda a: (a.relu() * 2, a + 1), x), context()), (x,)
    yield "reduction", build_reduction(make_group(lambda a: a.softmax(-1), x, kind="reduction"), context()), (x,)
    yield "gemm", build_gemm(anchored("gemm", lambda a, b: (a @ b).relu(), (x, w), (aten.mm,)), context()), (x, w)
    yield "conv", build_conv(anchored("conv", lambda a, b: F.conv2d(a, b).relu(), (img, filt), (aten.convolution,)),
                             context()), (img, filt)
    g = fx.Graph()
    nodes = []
    for name, t in zip("qkv", (q, k, v)):
        nodes.append(g.placeholder(name))
        nodes[-1].meta["val"] = torch.empty(t.shape, device="meta")
    att = g.call_function(torch.ops.compile_backend.attention.default, (*nodes, None, 0.3, False))
    att.meta["val"] = torch.empty(1, 2, 5, 8, device="meta")
    g.output((att,))
    group = KernelGroup("attention", fx.GraphModule(torch.nn.Module(), g), anchor=att.name)
    yield "attention", build_attention(group, context()), (q, k, v)


def test_kernels_write_into_given_outputs():
    for kind, kernel, inputs in _kernel_cases():
        assert kernel.supports_out, kind
        expected = kernel(*inputs)
        given = tuple(torch.full(layout[0], float("nan"), dtype=layout[2]).as_strided(layout[0], layout[1])
                      if layout is not None else None for layout in kernel.out_layouts)
        got = kernel(*inputs, out=given)
        for i, (g, t, e) in enumerate(zip(got, given, expected)):
            if t is not None:
                assert g.data_ptr() == t.data_ptr() and g.stride() == t.stride(), (kind, i)
            torch.testing.assert_close(g, e, msg=lambda m: f"{kind} output {i}: {m}")
        i, layout = next((i, x) for i, x in enumerate(kernel.out_layouts) if x is not None)
        wrong = list(given)
        wrong[i] = torch.empty(layout[0], dtype=torch.float64)
        with pytest.raises(ValueError, match="dtype"):
            kernel(*inputs, out=tuple(wrong))
        wrong[i] = torch.empty_strided(layout[0], tuple(s * 2 for s in layout[1]), dtype=layout[2])
        with pytest.raises(ValueError, match="stride"):
            kernel(*inputs, out=tuple(wrong))
        with pytest.raises(ValueError, match="entries"):
            kernel(*inputs, out=given + (None,))


def test_kernel_without_out_support_refuses_out():
    kernel = Kernel("gemm", "cublas", (), lambda *a: a)
    with pytest.raises(ValueError, match="cannot write"):
        kernel(torch.ones(1), out=(torch.ones(1),))


# --------------------------------------------------------------------------- end to end
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        h = self.norm(h * 2 + 1)
        h = torch.tanh(self.l2(h)) + h
        return self.l3(h).softmax(-1)


def test_model_runs_over_planned_buffers(engines):
    torch.manual_seed(0)
    model = MLP().eval()
    x1, x2 = torch.randn(4, 16), torch.randn(4, 16)
    compiled = torch.compile(copy.deepcopy(model), backend="compile_backend")
    with torch.no_grad():
        first = compiled(x1)
        kept = first.clone()
        second = compiled(x2)
        torch.testing.assert_close(first, model(x1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second, model(x2), rtol=1e-4, atol=1e-5)
    assert torch.equal(first, kept)  # call 2 reused the arena, not call 1's output
    (engine,) = engines
    assert engine.memory is not None and engine.memory.planned_count >= 3
    assert engine.memory.arena_bytes < sum(b.size for b in engine.memory.buffers)
    assert "out=(buf" in engine.source
    # a refit (the weights changed in place) recomputes constants, never moves the arena
    arena = engine.arena.data_ptr()
    with torch.no_grad():
        for p in compiled.parameters():
            p.mul_(0.5)
        for p in model.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(compiled(x1), model(x1), rtol=1e-4, atol=1e-5)
    assert engine.arena.data_ptr() == arena


def test_report_shows_memory():
    report = compile_backend.explain(MLP().eval(), torch.randn(4, 16))
    memory = report.graphs[0].memory
    assert set(memory) == {"arena_bytes", "planned_peak_bytes", "eager_peak_bytes", "planned_buffers"}
    assert memory["planned_buffers"] >= 3 and 0 < memory["arena_bytes"] <= memory["planned_peak_bytes"]
    assert memory["eager_peak_bytes"] > 0
    assert report.to_dict()["graphs"][0]["memory"] == memory
    assert "memory: planned peak" in str(report) and f"{memory['planned_buffers']} buffers" in str(report)


def test_two_threads_share_one_compiled_model(engines):
    torch.manual_seed(0)
    model = MLP().eval()
    compiled = torch.compile(copy.deepcopy(model), backend="compile_backend")
    inputs = [torch.randn(4, 16) for _ in range(2)]
    with torch.no_grad():
        compiled(inputs[0])  # build the engine once, outside the threads
        expected = [model(x) for x in inputs]
    assert engines and engines[0].memory is not None
    errors = []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(4):
                    torch.testing.assert_close(compiled(inputs[i]), expected[i], rtol=1e-4, atol=1e-5)
        except Exception as exc:  # reported below: an assert in a thread does not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", ["off", "auto"])
def test_cuda_threads_on_their_own_streams(engines, cuda_graphs):
    """On CUDA, calls from two threads, each on its own stream, through one engine with an
    arena (launch by launch, or replaying one CUDA graph) give each thread its own answers."""
    torch.manual_seed(0)
    model = MLP().eval().cuda()
    compiled = torch.compile(copy.deepcopy(model), backend="compile_backend", options={"cuda_graphs": cuda_graphs})
    inputs = [torch.randn(64, 16, device="cuda") * (i + 1) for i in range(2)]
    with torch.no_grad():
        compiled(inputs[0])
        expected = [model(x) for x in inputs]
    assert engines[0].memory is not None and (engines[0].cuda_graph is not None) == (cuda_graphs == "auto")
    errors = []

    def worker(i):
        stream = torch.cuda.Stream()
        try:
            with torch.no_grad(), torch.cuda.stream(stream):
                results = [compiled(inputs[i]) for _ in range(50)]
            stream.synchronize()
            for r in results:
                torch.testing.assert_close(r, expected[i], rtol=1e-3, atol=1e-3)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
