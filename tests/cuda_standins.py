"""Stand-ins for ``torch.cuda``'s graph and stream calls, so the CUDA graph runner's
bookkeeping runs on the CPU (tests/test_cuda_graph_runner_cpu.py, test_cuda_graph_training_cpu.py):
``Capture.graph`` is the graph being recorded while ``torch.cuda.graph(g)`` is entered; what a
"recording" does on replay is up to the test (``FakeGraph.work``). Also the small training net
the CPU and GPU training-under-graphs tests share."""
import contextlib

import torch
import torch.nn as nn


class Capture:
    graph = None  # the FakeGraph being recorded
    args = None  # the arguments of the runner call in progress (set by tests that need them)


class FakeGraph:
    def __init__(self):
        self.work = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.work()


class FakeStream:
    def wait_stream(self, other):
        pass


def install(monkeypatch) -> None:
    """Replace torch.cuda's graph and stream calls (and fork_rng's device handling)."""
    stream = FakeStream()

    @contextlib.contextmanager
    def graph(g, capture_error_mode=None):
        Capture.graph = g
        try:
            yield
        finally:
            Capture.graph = None

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: stream)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None: contextlib.nullcontext())


class TrainNet(nn.Module):
    """Linear, GELU, LayerNorm, Linear: a training step's forward saves activations, weights
    (for the input gradient) and the batch (for the first weight's gradient)."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.norm, self.b = nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.b(self.norm(torch.nn.functional.gelu(self.a(x))))


def train_steps(model, params, steps: int, batches, accumulate: int = 1, set_to_none: bool = True, keep=None,
                lr: float = 0.1):
    """SGD with momentum over ``batches`` in turn, ``accumulate`` backward passes a step; the
    outputs are appended to ``keep`` when given; returns the last output."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for step in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        for k in range(accumulate):
            out = model(batches[(step * accumulate + k) % len(batches)])
            (out * out).mean().backward()
            if keep is not None:
                keep.append(out)
        opt.step()
    return out
