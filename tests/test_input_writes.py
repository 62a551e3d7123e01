"""Inputs written in place (compile_backend/input_writes.py): an inference graph's write into one of
its inputs (``copy_(input, new)``, kept in the graph at capture) is done by the kernel that makes
``new``, straight into the caller's tensor, exactly once per call; where that is unsafe (the
kernel or a later one reads the old value elsewhere, the new value is returned) an ATen
``copy_`` writes it, still once per call. The build never writes the caller's tensor."""
import pytest
import torch

from compile_backend.backend import compile_backend
from compile_backend.options import Options
from compile_backend.profiles import Profile
from compile_backend.report import Report


def _compiled(fn, tmp_path):
    report = Report()

    def backend(gm, example_inputs):
        return compile_backend(gm, example_inputs, options=Options(cache_dir=str(tmp_path)), report=report)

    return torch.compile(fn, backend=backend), report


def _accumulate(c, x):
    c.add_(torch.tanh(x) * 2)  # one element-wise kernel: reads c where it writes it
    return c.sum(dim=1)


def _shift_in(c, x):
    c.copy_(torch.cat([c[:, 1:], x], dim=1))  # reads c one slot to the right of where it writes
    return c * 2


def _old_value_read_later(c, x, w):
    new = c + x
    r = c @ w  # the old c, read by a GEMM after the kernel making the new one
    c.copy_(new)
    return r


def _returns_new_value(c, x):
    new = torch.relu(c + x)
    c.copy_(new)
    return new  # a separate tensor in eager: must not alias c


def _run(fn, make, tmp_path, calls=3):
    """Calls the compiled and eager ``fn`` on their own copies of the same inputs ``calls``
    times; the outputs and the written input agree after every call."""
    compiled, report = _compiled(fn, tmp_path)
    eager_args = make()
    ours_args = tuple(a.clone() for a in eager_args)
    outs = []
    with torch.no_grad():
        for _ in range(calls):
            want, got = fn(*eager_args), compiled(*ours_args)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours_args[0], eager_args[0], rtol=1e-5, atol=1e-5)
            outs.append((got.clone(), got))
    for kept, got in outs:  # no output changed under a later call's write
        torch.testing.assert_close(got, kept)
    (graph,) = report.graphs
    return graph


def test_element_wise_update_is_written_by_its_kernel(tmp_path):
    graph = _run(_accumulate, lambda: (torch.randn(5, 7), torch.randn(5, 7)), tmp_path)
    assert [w["by"] for w in graph.input_writes] == ["kernel"], graph.input_writes
    assert graph.input_writes[0]["input"] == 0
    kernel = graph.kernels[graph.input_writes[0]["kernel"]]
    assert kernel["impl"] == "triton" and "aten.add" in kernel["ops"], kernel
    report = Report(graphs=[graph])
    assert "inputs written: 1 (1 in place by the kernel making the value, 0 by an ATen op in place, 0 by an ATen copy_)" \
        in str(report)


def test_shifted_read_of_the_input_keeps_the_copy(tmp_path):
    graph = _run(_shift_in, lambda: (torch.randn(3, 6), torch.randn(3, 1)), tmp_path)
    assert [w["by"] for w in graph.input_writes] == ["copy_"], graph.input_writes


def test_old_value_read_after_the_new_one_is_made_keeps_the_copy(tmp_path):
    w = torch.randn(6, 4)
    graph = _run(_old_value_read_later, lambda: (torch.randn(5, 6), torch.randn(5, 6), w), tmp_path)
    assert [x["by"] for x in graph.input_writes] == ["copy_"], graph.input_writes


def test_returned_new_value_keeps_the_copy(tmp_path):
    graph = _run(_returns_new_value, lambda: (torch.randn(4, 9), torch.randn(4, 9)), tmp_path)
    assert [w["by"] for w in graph.input_writes] == ["copy_"], graph.input_writes


def _slot_update_read_widened(c, new, pos):
    """Falcon's fp16 decode step: the new key into its cache slot, then the whole updated cache
    widened to fp32 (in the same pointwise kernel as the slot's write)."""
    c.index_copy_(1, pos, new)
    return c.float() * 0.5


def test_slot_write_whose_value_is_read_again_is_whole(tmp_path):
    # the kernel writes the slot into the cache in place; the widened copy must still see every
    # other slot's old value (it read zeros when the in-place store skipped loading the cache)
    graph = _run(_slot_update_read_widened,
                 lambda: (torch.randn(2, 9, 4).half(), torch.randn(2, 1, 4).half(), torch.tensor([5])), tmp_path)
    assert [w["by"] for w in graph.input_writes] == ["kernel"], graph.input_writes


def test_engine_knows_its_written_inputs(engines, tmp_path):
    _run(_accumulate, lambda: (torch.randn(5, 7), torch.randn(5, 7)), tmp_path, calls=1)
    (engine,) = engines
    assert engine.written_inputs == frozenset({0})
    assert "copy_" not in engine.source


def test_profiles_do_not_apply_to_a_graph_writing_its_inputs():
    from compile_backend.profiles import GraphProfiles

    def f(x, c):
        c.add_(x.sum(0))
        return x * 2

    captured = {}

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(aten_gm, _):
            captured["gm"] = aten_gm
            return make_boxed_func(aten_gm)

        return aot_autograd(fw_compiler=keep, inference_compiler=keep, keep_inference_input_mutations=True)(
            gm, example_inputs)

    with torch.no_grad():
        torch.compile(f, backend=backend)(torch.randn(4, 3), torch.zeros(3))
    bound = GraphProfiles.bind(captured["gm"], (Profile(input=0, dim=0, min=2, opt=4, max=8),),
                               role="inference", name="g")
    assert not any(bound.active)
    assert "writes its inputs" in bound.state[0]["reason"]


@pytest.mark.gpu
def test_gpu_written_input_is_borrowed_by_the_cuda_graph(engines, tmp_path):
    """Under CUDA graphs the written input is recorded where the caller keeps it: written once a
    call, no copy in or out; a caller alternating two tensors replays one recording for each; a
    new tensor every call is copied in and out (and still gets the right values)."""
    make = lambda: (torch.randn(64, 33, device="cuda"), torch.randn(64, 33, device="cuda"))  # noqa: E731
    compiled, _ = _compiled(_accumulate, tmp_path)
    c, x = make()
    want = c.clone()
    with torch.no_grad():
        for _ in range(5):
            out = compiled(c, x)
            want += torch.tanh(x) * 2
            torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out, want.sum(1), rtol=1e-4, atol=1e-4)
        (engine,) = engines
        runner = engine.cuda_graph
        assert runner is not None and runner.usable and runner.borrowed == {0}
        assert runner.addresses[0] == {c.data_ptr()} and runner.static_args[0] is None  # recorded on c, not held
        others = [make()[0] for _ in range(2)]
        wants = [o.clone() for o in others]
        for step in range(8):  # alternate: one recording each, replayed, nothing copied
            i = step % 2
            compiled(others[i], x)
            wants[i] += torch.tanh(x) * 2
            torch.testing.assert_close(others[i], wants[i], rtol=1e-5, atol=1e-5)
        assert runner.borrowed == {0} and not runner.copied_back and len(runner.bindings) == 3
        fresh = [make()[0] for _ in range(4)]  # alive together: four new addresses
        for t in fresh:
            expect = t + torch.tanh(x) * 2
            compiled(t, x)
            torch.testing.assert_close(t, expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-5)  # the first tensor untouched since
        assert runner.copied_back == {0} and not runner.borrowed
    import gc
    import weakref

    gone = weakref.ref(c)
    del c
    gc.collect()
    assert gone() is None  # the runner keeps no reference to a tensor it borrowed


def _row_update(x, y):
    x[0].add_(y[0])
    return x.sum(1)


def _through_transpose(x, y):
    x.t().mul_(2)
    return x + y


def _two_writes(x, y):
    x.mul_(y)
    x.add_(1)
    return x * 3


def _strided_fill(x, y):
    x.view(-1)[::2] = 0.5
    return y * 2


@pytest.mark.parametrize("fn", [_row_update, _through_transpose, _two_writes, _strided_fill], ids=lambda f: f.__name__)
def test_writes_through_views_and_chains_are_exactly_eager(fn, tmp_path):
    _run(fn, lambda: (torch.randn(4, 6), torch.randn(4, 6)), tmp_path)


def test_write_into_a_slice_of_a_transposed_input(tmp_path):
    def slide(x, y):
        x[:, 1:].copy_(y[:, :-1])
        return x.mean(0)

    _run(slide, lambda: (torch.randn(5, 4).t(), torch.randn(4, 5)), tmp_path)


def test_engine_cache_hit_writes_in_place_too(tmp_path):
    first = _run(_accumulate, lambda: (torch.randn(5, 7), torch.randn(5, 7)), tmp_path, calls=1)
    torch._dynamo.reset()
    warm = _run(_accumulate, lambda: (torch.randn(5, 7), torch.randn(5, 7)), tmp_path, calls=2)
    assert first.cache["engine"] == "miss" and warm.cache["engine"] == "hit"
    assert warm.input_writes == first.input_writes and warm.input_writes[0]["by"] == "kernel"


def test_several_slots_copied_in_are_written_by_index_copy_in_place(tmp_path):
    def fill(c, src, idx):
        c.index_copy_(1, idx, src)
        return c * 2

    idx = torch.tensor([4, 1, 6])
    graph = _run(fill, lambda: (torch.randn(3, 8), torch.randn(3, 3), idx), tmp_path)
    assert [w["by"] for w in graph.input_writes] == ["aten in place"], graph.input_writes
    assert graph.kernels[graph.input_writes[0]["kernel"]]["config"] == {"in_place": "aten.index_copy_ into input 0"}
