"""CUDA-graph replay in the engine (GPU only: run on the GPU machine with `pytest -m gpu`)."""
import threading

import pytest
import torch
import torch.nn as nn

import compile_backend
from cuda_standins import TrainNet, train_steps
from helpers import assert_same

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.LayerNorm(32)).cuda().eval()


def test_replay_matches_and_outputs_are_stable():
    m = _model()
    compiled = torch.compile(m, backend="compile_backend")
    with torch.no_grad():
        x1, x2 = torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")
        out1 = compiled(x1)
        kept = out1.clone()
        out2 = compiled(x2)
        assert_same(out1, kept)  # call N's output unchanged by call N+1
        assert_same(out2, m(x2))
        for _ in range(3):
            assert_same(compiled(x1), m(x1))


def test_report_says_cuda_graph():
    report = compile_backend.explain(_model(), torch.randn(4, 64, device="cuda"))
    assert report.graphs[0].cuda_graph


def test_refit_under_graph():
    m = _model()
    compiled = torch.compile(m, backend="compile_backend")
    x = torch.randn(8, 64, device="cuda")
    with torch.no_grad():
        assert_same(compiled(x), m(x))
        m[0].weight.mul_(0.5)
        assert_same(compiled(x), m(x))
        state = {k: v + 0.01 for k, v in m.state_dict().items()}
        m.load_state_dict(state, assign=True)
        assert_same(compiled(x), m(x))


def test_aliasing_and_mutation_with_graph():
    def f(x, y):
        x.add_(1)
        return x * 2, y.view(-1)

    x, y = torch.randn(4, 3, device="cuda"), torch.randn(2, 6, device="cuda")
    x_ref = x.clone()
    out, view = torch.compile(f, backend="compile_backend")(x, y)
    assert_same(x, x_ref + 1)
    assert_same(out, (x_ref + 1) * 2)
    assert view.data_ptr() == y.data_ptr()


def test_threads_and_streams():
    m = _model()
    compiled = torch.compile(m, backend="compile_backend")
    xs = [torch.randn(8, 64, device="cuda") for _ in range(4)]
    with torch.no_grad():
        compiled(xs[0])  # compile in this thread
        expected = [m(x) for x in xs]
    errors = []

    def worker(k):
        try:
            stream = torch.cuda.Stream()
            with torch.no_grad(), torch.cuda.stream(stream):
                for _ in range(5):
                    out = compiled(xs[k])
                stream.synchronize()
                assert_same(out, expected[k])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_cuda_graphs_off_option():
    report = compile_backend.explain(_model(), torch.randn(4, 64, device="cuda"), cuda_graphs="off")
    assert not report.graphs[0].cuda_graph


def test_held_outputs_are_never_overwritten_and_free_ones_are_reused():
    m = _model()
    compiled = torch.compile(m, backend="compile_backend")
    xs = [torch.randn(8, 64, device="cuda") for _ in range(5)]
    with torch.no_grad():
        expected = [m(x) for x in xs]
        out = compiled(xs[0])
        first_ptr = out.data_ptr()
        out = compiled(xs[1])  # the first output is still held while this call runs
        second_ptr = out.data_ptr()
        assert second_ptr != first_ptr
        out = compiled(xs[2])  # the first is free now: its recording's memory comes back
        assert out.data_ptr() == first_ptr
        assert_same(out, expected[2])
        kept = [compiled(x) for x in xs]  # all held: the copy recording serves the rest
        for got, want in zip(kept, expected):
            assert_same(got, want)
        assert len({t.data_ptr() for t in kept}) == len(kept)


def test_held_outputs_when_no_copy_recording_can_be_made(monkeypatch):
    """Both hand-out recordings held and the copy recording failing (memory, say): such calls
    run without a graph, with outputs of their own; nothing held is overwritten."""
    from compile_backend.cuda_graph import CudaGraphRunner

    real = CudaGraphRunner._record

    def record(self, args, hand_out):
        if not hand_out:
            raise RuntimeError("out of memory (simulated)")
        return real(self, args, hand_out)

    monkeypatch.setattr(CudaGraphRunner, "_record", record)
    m = _model()
    compiled = torch.compile(m, backend="compile_backend", options={"speed_check": False})
    xs = [torch.randn(8, 64, device="cuda") for _ in range(5)]
    with torch.no_grad():
        kept = [compiled(x) for x in xs]
        for got, x in zip(kept, xs):
            assert_same(got, m(x))


@pytest.mark.parametrize("accumulate,set_to_none", [(1, True), (2, False)])
def test_gpu_training_steps_replay(engines, accumulate, set_to_none):
    """Forward and backward recorded and replayed over optimizer steps: parameters equal eager's
    (the weights read in place after each update, saved activations never replayed over)."""
    eager, ours = TrainNet(64, 96, 32).cuda(), TrainNet(64, 96, 32).cuda()
    compiled = torch.compile(ours, backend="compile_backend")
    batches = [torch.randn(16, 64, device="cuda") for _ in range(3)]
    for model, params in ((eager, eager.parameters()), (compiled, ours.parameters())):
        train_steps(model, params, 8, batches, accumulate, set_to_none, lr=0.05)
    for p, q in zip(ours.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4)
    runners = [e.cuda_graph for e in engines]
    assert len(runners) == 2 and all(r is not None and r.usable for r in runners)
    assert all(r.replays == 8 * accumulate - 1 for r in runners), [r.replays for r in runners]
