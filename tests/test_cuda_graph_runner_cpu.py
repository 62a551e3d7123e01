"""The CUDA graph runner's bookkeeping for inputs the engine writes (borrowing, recording again,
copy mode), on the CPU: ``torch.cuda``'s graph, stream and event calls are replaced by stand-ins
whose "recording" remembers the engine's work and whose replay does it, so a test can count
what ran where. The real thing runs in tests/test_input_writes.py (GPU)."""
import contextlib

import pytest
import torch

from compile_backend import cuda_graph


class _Capture:
    graph = None


class FakeGraph:
    def __init__(self):
        self.work = None

    def replay(self):
        self.work()


class FakeStream:
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass


class FakeEvent:
    def record(self, stream=None):
        pass


class AccumulateEngine:
    """``c += x; return c.sum(1)`` writing its input ``c`` (argument 0); recording remembers the
    work on the tensors it was given, as a CUDA graph does the addresses."""

    frozen: dict = {}
    constants: dict = {}

    def __init__(self, writes=True):
        self.written_inputs = frozenset({0}) if writes else frozenset()
        self.eager_runs = self.launches = 0

    def launch(self, args):
        c, x = args
        if _Capture.graph is not None:
            out = torch.empty(c.shape[0])
            _Capture.graph.work = lambda: (c.add_(x), out.copy_(c.sum(1)))
            return out
        self.launches += 1
        c.add_(x)
        return c.sum(1)

    def run(self, args):
        self.eager_runs += 1
        return self.launch(args)


@pytest.fixture
def fake_cuda(monkeypatch):
    stream = FakeStream()

    @contextlib.contextmanager
    def graph(g, capture_error_mode=None):
        _Capture.graph = g
        try:
            yield
        finally:
            _Capture.graph = None

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: stream)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None: contextlib.nullcontext())


def test_written_input_is_borrowed_written_once_a_call_and_not_held(fake_cuda):
    engine = AccumulateEngine()
    runner = cuda_graph.CudaGraphRunner(engine)
    c, x = torch.zeros(3, 4), torch.ones(3, 4)
    for step in range(1, 6):
        out = runner([c, x])
        assert torch.equal(c, torch.full((3, 4), float(step))) and torch.equal(out, torch.full((3,), 4.0 * step))
    # the first call ran for real (the warm-up), the others replayed one recording on c itself
    assert engine.eager_runs == 1 and engine.launches == 1 and len(runner.slots) >= 1
    assert runner.borrowed == {0} and runner.borrowed_ptrs[0] == c.data_ptr() and runner.static_args[0] is None


def test_a_new_tensor_records_again_and_one_changing_every_call_is_copied(fake_cuda):
    engine = AccumulateEngine()
    runner = cuda_graph.CudaGraphRunner(engine)
    x = torch.ones(2, 3)
    first = torch.zeros(2, 3)
    for _ in range(5):
        runner([first, x])
    tensors = [torch.full((2, 3), 10.0), torch.full((2, 3), 20.0)]
    for step in range(6):  # alternating: records again twice, then copies in and out
        runner([tensors[step % 2], x])
    assert torch.equal(tensors[0], torch.full((2, 3), 13.0)) and torch.equal(tensors[1], torch.full((2, 3), 23.0))
    assert torch.equal(first, torch.full((2, 3), 5.0))  # untouched since it was last passed
    assert runner.rebinds == 3 and runner.copied_back == {0} and not runner.borrowed
    assert engine.eager_runs == 1  # recordings replayed from then on, copy mode included


def test_an_engine_writing_nothing_warms_up_on_copies_then_replays(fake_cuda):
    engine = AccumulateEngine(writes=False)  # says it writes nothing: its input is copied in
    runner = cuda_graph.CudaGraphRunner(engine)
    c, x = torch.zeros(2, 2), torch.ones(2, 2)
    runner([c, x])
    assert engine.eager_runs == 0 and engine.launches == 2  # the side-stream warm-up, on copies
    assert torch.equal(c, torch.zeros(2, 2)) and not runner.borrowed
