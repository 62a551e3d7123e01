"""Training steps under CUDA graphs (the forward and the backward recorded and replayed), on the
CPU: ``torch.cuda``'s graph calls are stand-ins whose capture runs the engine once for its
outputs' memory and aliasing (undoing its writes to inputs) and whose replay runs it again on the
recorded tensors, copying the results into the recorded outputs, as a replay writes the same
addresses. Values against eager over several optimizer steps; the bookkeeping (weights read in
place, saved activations per forward slot, held outputs never replayed over) asserted. The real
thing: tests/test_cuda_graphs.py::test_gpu_training_steps_replay (GPU)."""
import pytest
import torch

from compile_backend import cuda_graph, pipeline
from compile_backend.engine import Engine
from cuda_standins import Capture, TrainNet, install, train_steps


@pytest.fixture
def graphed(monkeypatch, engines):
    launch = Engine.launch

    def captured_launch(self, args):
        g = Capture.graph
        if g is None:
            return launch(self, args)
        saved = {i: args[i].clone() for i in self.written_inputs}
        out = launch(self, args)  # the capture: the outputs' memory and aliasing; its writes undone
        for i, t in saved.items():
            args[i].copy_(t)
        # a graph holds addresses, not tensors: the runner's own buffers are read from it, the
        # borrowed ones from the replaying call, which must pass them at the recorded addresses
        kept = [t if t is b else None for t, b in zip(args, self.cuda_graph.static_args)]
        ptrs, outs = [t.data_ptr() if isinstance(t, torch.Tensor) else None for t in args], cuda_graph._tensors(out)

        def work():
            bound = [k if k is not None else a for k, a in zip(kept, Capture.args)]
            assert [t.data_ptr() if isinstance(t, torch.Tensor) else None for t in bound] == ptrs
            for static, new in zip(outs, cuda_graph._tensors(launch(self, bound))):
                if static.data_ptr() != new.data_ptr():
                    static.copy_(new)

        g.work = work
        return out

    call = cuda_graph.CudaGraphRunner.__call__

    def calling(self, args):
        Capture.args = args
        try:
            return call(self, args)
        finally:
            Capture.args = None

    install(monkeypatch)
    monkeypatch.setattr(Engine, "launch", captured_launch)
    monkeypatch.setattr(cuda_graph.CudaGraphRunner, "__call__", calling)
    monkeypatch.setattr(pipeline, "wants_cuda_graph", lambda options, role, device: options.cuda_graphs != "off")
    return engines


@pytest.mark.parametrize("accumulate,set_to_none,keep", [(1, True, False), (2, False, False), (1, True, True)],
                         ids=["plain", "accumulate-zero-grad-in-place", "outputs-kept"])
def test_training_steps_replay_and_match_eager(graphed, tmp_path, accumulate, set_to_none, keep):
    eager, ours = TrainNet(12, 24, 5), TrainNet(12, 24, 5)
    batches = [torch.randn(7, 12, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    compiled = torch.compile(ours, backend="compile_backend", options={"cache_dir": str(tmp_path)})
    kept_eager, kept_ours = ([], []) if keep else (None, None)
    want = train_steps(eager, eager.parameters(), 6, batches, accumulate, set_to_none, kept_eager)
    got = train_steps(compiled, ours.parameters(), 6, batches, accumulate, set_to_none, kept_ours)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    if keep:  # outputs the caller kept were never replayed over
        for g, w in zip(kept_ours, kept_eager):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    forward, backward = graphed
    for engine in graphed:
        runner = engine.cuda_graph
        assert runner is not None and runner.usable and runner.warm
        assert runner.replays == 6 * accumulate - 1, (engine, runner.replays)  # all but the warm-up
    weights = {i for i, t in enumerate(forward.cuda_graph.static_args) if t is None}
    assert len(weights) == 6 and weights <= forward.static_inputs  # the weights: read in place
    # the caller's outputs are copies, the saved activations handed out and freed by the backward:
    # one forward recording serves every step, outputs kept or not; the backward reads its saved
    # activations in place; the batch it also saves is a copy per call (the forward's own input
    # buffer), at whatever address the allocator gives: a few bindings, or copied in
    assert forward.returned_outputs == 1
    runner = forward.cuda_graph
    assert len(runner.bindings) == 1 and len(runner.slots) == 1 and next(iter(runner.bindings.values())).copy_slot is None
    assert len(backward.cuda_graph.bindings) <= cuda_graph.MAX_BINDINGS


class ConvBN(torch.nn.Module):
    """BatchNorm in training: its running statistics (buffers) are written every step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_batchnorm_running_statistics_under_replay(graphed, tmp_path):
    eager, ours = ConvBN(), ConvBN()
    batches = [torch.randn(4, 3, 7, 9, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    compiled = torch.compile(ours, backend="compile_backend", options={"cache_dir": str(tmp_path)})
    want = train_steps(eager, eager.parameters(), 5, batches)
    got = train_steps(compiled, ours.parameters(), 5, batches)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, b), e in zip(ours.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, e, rtol=1e-4, atol=1e-5, msg=name)  # running mean / var / count
    for (name, p), q in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert all(e.cuda_graph.replays == 4 for e in graphed), [e.cuda_graph.replays for e in graphed]


def test_a_training_graph_replays_for_its_first_shapes_only(graphed, tmp_path):
    """Each recording keeps its saved activations' memory: past TRAINING_GRAPHED_SHAPES shapes of
    one training graph (variable batch or sequence sizes) the engines run launch by launch."""
    from compile_backend.runtime import TRAINING_GRAPHED_SHAPES

    eager, ours = TrainNet(12, 24, 5), TrainNet(12, 24, 5)
    sizes = (7, 5, 6, 9, 3)
    batches = [torch.randn(n, 12, generator=torch.Generator().manual_seed(n)) for n in sizes]
    compiled = torch.compile(ours, backend="compile_backend", options={"cache_dir": str(tmp_path)})
    want = train_steps(eager, eager.parameters(), 2 * len(sizes), batches)
    got = train_steps(compiled, ours.parameters(), 2 * len(sizes), batches)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    graphs = {}  # per compiled graph (Dynamo's, by its engines' graph source), engines with a recording
    for engine in graphed:
        graphs.setdefault(engine.source, []).append(engine.cuda_graph is not None)
    assert any(not g for flags in graphs.values() for g in flags)  # later shapes: launch by launch
    assert all(sum(flags) <= TRAINING_GRAPHED_SHAPES for flags in graphs.values())
