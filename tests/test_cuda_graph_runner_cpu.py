"""The CUDA graph runner's bookkeeping for borrowed inputs (written ones, a training graph's static
ones: recordings per set of addresses, copy mode) and for training steps, on the CPU:
``torch.cuda``'s graph, stream and event calls are replaced by stand-ins whose "recording"
remembers the engine's work and whose replay does it, so a test can count what ran where. The
real thing runs in tests/test_input_writes.py and tests/test_cuda_graphs.py (GPU)."""
import pytest
import torch

from compile_backend import cuda_graph
from cuda_standins import Capture, install


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
        if Capture.graph is not None:
            out = torch.empty(c.shape[0])
            Capture.graph.work = lambda: (c.add_(x), out.copy_(c.sum(1)))
            return out
        self.launches += 1
        c.add_(x)
        return c.sum(1)

    def run(self, args):
        self.eager_runs += 1
        return self.launch(args)


@pytest.fixture
def fake_cuda(monkeypatch):
    install(monkeypatch)


def test_written_input_is_borrowed_written_once_a_call_and_not_held(fake_cuda):
    engine = AccumulateEngine()
    runner = cuda_graph.CudaGraphRunner(engine)
    c, x = torch.zeros(3, 4), torch.ones(3, 4)
    for step in range(1, 6):
        out = runner([c, x])
        assert torch.equal(c, torch.full((3, 4), float(step))) and torch.equal(out, torch.full((3,), 4.0 * step))
    # the first call ran for real (the warm-up), the others replayed one recording on c itself
    assert engine.eager_runs == 1 and engine.launches == 1 and len(runner.slots) >= 1
    assert runner.borrowed == {0} and runner.addresses[0] == {c.data_ptr()} and runner.static_args[0] is None


def test_alternating_tensors_replay_one_recording_each(fake_cuda):
    engine = AccumulateEngine()
    runner = cuda_graph.CudaGraphRunner(engine)
    x = torch.ones(2, 3)
    first = torch.zeros(2, 3)
    for _ in range(5):
        runner([first, x])
    tensors = [torch.full((2, 3), 10.0), torch.full((2, 3), 20.0)]
    for step in range(6):  # alternating between two caches: one recording for each, no copies
        runner([tensors[step % 2], x])
    assert torch.equal(tensors[0], torch.full((2, 3), 13.0)) and torch.equal(tensors[1], torch.full((2, 3), 23.0))
    assert torch.equal(first, torch.full((2, 3), 5.0))  # untouched since it was last passed
    assert len(runner.bindings) == 3 and not runner.copied_back and runner.borrowed == {0}
    assert all(len(b.slots) == 1 for b in runner.bindings.values())
    assert engine.eager_runs == 1  # recordings replayed from then on


def test_a_new_tensor_every_call_is_copied_in_and_out(fake_cuda):
    engine = AccumulateEngine()
    runner = cuda_graph.CudaGraphRunner(engine)
    x = torch.ones(2, 3)
    tensors = [torch.full((2, 3), 10.0 * k) for k in range(8)]  # all alive: eight addresses
    for t in tensors:
        runner([t, x])
    assert all(torch.equal(t, torch.full((2, 3), 10.0 * k + 1)) for k, t in enumerate(tensors))
    assert runner.copied_back == {0} and not runner.borrowed  # given up after MAX_ADDRESSES
    assert len(runner.bindings) == 1 and runner.static_args[0] is not None
    assert engine.eager_runs == 1


def test_an_engine_writing_nothing_warms_up_on_copies_then_replays(fake_cuda):
    engine = AccumulateEngine(writes=False)  # says it writes nothing: its input is copied in
    runner = cuda_graph.CudaGraphRunner(engine)
    c, x = torch.zeros(2, 2), torch.ones(2, 2)
    runner([c, x])
    assert engine.eager_runs == 0 and engine.launches == 2  # the side-stream warm-up, on copies
    assert torch.equal(c, torch.zeros(2, 2)) and not runner.borrowed


class ReadEngine:
    """``return (w, w.t(), x @ w)`` reading its argument 0 (a weight, static) in place."""

    frozen: dict = {}
    constants: dict = {}
    written_inputs = frozenset()

    def __init__(self):
        self.static_inputs = frozenset({0})
        self.eager_runs = 0

    def launch(self, args):
        w, x = args
        if Capture.graph is not None:
            out = torch.empty(x.shape[0], w.shape[1])
            Capture.graph.work = lambda: out.copy_(x @ w)
            return w, w.t(), out
        return w, w.t(), x @ w

    def run(self, args):
        self.eager_runs += 1
        return self.launch(args)


def test_a_static_input_is_read_in_place_and_returned_as_the_callers_tensor(fake_cuda):
    engine = ReadEngine()
    runner = cuda_graph.CudaGraphRunner(engine)
    w, x = torch.randn(4, 3), torch.randn(2, 4)
    for step in range(4):
        w.add_(1.0)  # an optimizer step: same tensor, new values, read by the replay
        same, t, y = runner([w, x])
        assert same is w and t.data_ptr() == w.data_ptr() and t.shape == (3, 4)  # no clone
        torch.testing.assert_close(y, x @ w)
    assert engine.eager_runs == 1 and runner.static_args[0] is None and len(runner.bindings) == 1


def test_an_output_in_a_copied_inputs_buffer_is_the_callers_tensor(fake_cuda):
    """An input copied into the runner's buffer (not static: a new batch each call) that the
    engine also returns (a training forward saving its input): the caller's own tensor comes
    back, as in eager, not the buffer's copy nor a clone."""
    engine = ReadEngine()
    engine.static_inputs = frozenset()
    runner = cuda_graph.CudaGraphRunner(engine)
    x = torch.randn(2, 4)
    for step in range(3):
        w = torch.randn(4, 3)[:, :3] + step  # a new tensor every call
        same, t, y = runner([w, x])
        assert same is w and t.data_ptr() == w.data_ptr() and torch.equal(t, w.t())
        torch.testing.assert_close(y, x @ w)
    assert runner.static_args[0] is not None and runner.replays == 3  # copied in, replayed
