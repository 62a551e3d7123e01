"""The checks every call makes before it runs an engine, and their fast paths: the engine key
(runtime: a C++ layout check of the non-frozen inputs, else field by field), the frozen weights'
staleness (engine: C-level passes, else weight by weight), the outputs a CUDA graph hands out
(cuda_graph). Whatever path answers, a new layout gets its own engine and a changed weight is
refitted, as before the fast paths (benchmarks/host_overhead.py measures them)."""
import pytest
import torch
import torch.nn as nn

from compile_backend import cuda_graph, runtime


@pytest.fixture
def graphs(monkeypatch):
    """Every CompiledGraph made during the test, each counting the engines it builds."""
    made = []

    class Counting(runtime.CompiledGraph):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.builds = []
            made.append(self)

        def _build(self, args, key):
            self.builds.append(key)
            return super()._build(args, key)

    monkeypatch.setattr(runtime, "CompiledGraph", Counting)
    return made


class Scale(nn.Module):
    """``x * w + b``: two frozen weights, one input, no kernel to tune."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.w = nn.Parameter(torch.arange(1.0, n + 1))
        self.b = nn.Parameter(torch.full((n,), 0.5))

    def forward(self, x):
        return x * self.w + self.b


def _graph_and_args(graphs, model, x):
    """The model's one CompiledGraph, after a first call, and the arguments it was called with."""
    compiled = torch.compile(model, backend="compile_backend")
    compiled(x)
    (graph,) = graphs
    engine = next(iter(graph.engines.values()))
    args = [None] * graph._arity
    for i, (t, *_) in engine._bound.items():
        args[i] = t
    (free,) = [i for i, a in enumerate(args) if a is None]
    return graph, engine, args, free


def test_signature_fast_path_gives_the_field_by_field_key():
    inputs = (torch.randn(2, 3), torch.randn(3, 2).t(), torch.zeros(1, dtype=torch.int64), torch.randn(2, requires_grad=True))
    key = runtime._signature(inputs)
    assert key == tuple((t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in inputs)
    mixed = runtime._signature((inputs[0], 3, None))
    assert mixed == ((inputs[0].shape, inputs[0].stride(), inputs[0].dtype, inputs[0].device, False), 3, type(None))
    assert hash(key) == hash(tuple(key)) and {key: 1}[tuple(key)] == 1


@pytest.mark.parametrize("guards", ["tensor_guards", "field_by_field"])
def test_every_new_layout_builds_its_engine_and_an_old_one_finds_its_own(aten_only, graphs, monkeypatch, guards):
    if guards == "field_by_field":
        monkeypatch.setattr(runtime, "TensorGuards", None)
    model = Scale().eval()
    with torch.no_grad():
        graph, _, args, free = _graph_and_args(graphs, model, torch.randn(3, 4))
        layouts = {
            "rows": torch.randn(3, 4),
            "strided": torch.randn(4, 3).t(),  # same shape, another stride
            "double": torch.randn(3, 4, dtype=torch.float64),
            "grad": torch.randn(3, 4).requires_grad_(),
            "shape": torch.randn(5, 4),
        }
        for name, x in [*layouts.items(), *layouts.items()]:  # each twice: the second finds its engine
            args[free] = x
            torch.testing.assert_close(_values(graph(*args)), model(x), msg=name)
    keys = graph.builds
    assert len(keys) == len(set(keys)) == 5  # the first call's layout is "rows"'s: 1 + 4 new
    assert (graph._recent is not None) == (guards == "tensor_guards")


def test_a_tensor_whose_layout_changes_in_place_gets_another_engine(aten_only, graphs):
    with torch.no_grad():
        graph, _, args, free = _graph_and_args(graphs, Scale().eval(), torch.randn(3, 4))
        x = torch.randn(3, 4)
        args[free] = x
        graph(*args)
        graph(*args)  # the layout check's fast path
        x.set_(torch.randn(4, 3).t())  # same object, same shape, another stride
        graph(*args)
    assert len(graph.builds) == 2


def _values(out):
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("update", ["in_place", "data_assign", "new_object", "new_scalar_object"])
def test_a_changed_weight_is_refitted_before_the_call(aten_only, graphs, update):
    """In place (a new version), ``p.data = new`` (a new storage), another tensor object of the
    same layout passed (also one of one element equal in value: identity, not equality)."""
    model = Scale(n=1 if update == "new_scalar_object" else 4).eval()
    x = torch.randn(3, model.w.shape[0])
    with torch.no_grad():
        graph, engine, args, free = _graph_and_args(graphs, model, x)
        args[free] = x
        weight = next(i for i, (t, *_) in engine._bound.items() if t is model.w)
        assert not engine._stale(args)
        if update == "in_place":
            model.w.mul_(3.0)
        elif update == "data_assign":
            model.w.data = torch.randn(model.w.shape)
        else:
            args[weight] = model.w.detach().clone()  # the same values in another tensor
            if update == "new_object":
                args[weight].mul_(3.0)
        expected = x * args[weight] + 0.5
        assert engine._stale(args)
        torch.testing.assert_close(_values(graph(*args)), expected)
        assert not engine._stale(args)  # bound to what it was just called with
    assert len(graph.builds) == 1  # refitted, not rebuilt


def test_items_at_picks_a_tuple_for_any_number_of_indices():
    seq = ["a", "b", "c"]
    assert cuda_graph.items_at(()) (seq) == ()
    assert cuda_graph.items_at((1,))(seq) == ("b",)
    assert cuda_graph.items_at([2, 0])(seq) == ("c", "a")


@pytest.mark.skipif(cuda_graph.storage_use_count is None, reason="no storage use count")
@pytest.mark.parametrize("kind", [list, tuple])
def test_flat_handed_out_outputs_are_views_of_the_recordings_memory(kind):
    a, b = torch.randn(3), torch.randn(2)
    slot = cuda_graph.Recording(None, kind([a, b]), set(), hand_out=True)
    assert slot.flat_handed
    out = slot.outputs(())
    assert type(out) is kind and out[0] is not a and out[0].data_ptr() == a.data_ptr()
    assert not slot.free()
    del out
    assert slot.free()


def test_sizes_among_the_inputs_are_keyed_field_by_field(aten_only, graphs):
    """A dynamic-shape graph passes its sizes as integers: no layout check, every call its key."""
    model = Scale().eval()
    compiled = torch.compile(model, backend="compile_backend", dynamic=True)
    with torch.no_grad():
        for rows in (2, 3, 2, 3):
            x = torch.randn(rows, 4)
            torch.testing.assert_close(_values(compiled(x)), model(x))
    (graph,) = graphs
    assert len(graph.builds) == 2 and not graph._checkable and graph._recent is None
