"""Stacks written in place (compile_backend/stack_outputs.py): a ``stack`` of our kernels' outputs
is one buffer allocated before its first piece, each piece's kernel writes its slice (no ATen
stack, no second copy); pieces read elsewhere are read from their slices; a stack of pieces that
are not our kernels' outputs stays an ATen stack."""
import pytest
import torch

import compile_backend
from compile_backend import zoo


class PerLayer(torch.nn.Module):
    """A value per layer, each also read by the next layer, returned stacked (a decode step's
    caches), beside a stack of inputs (not ours to write)."""

    def forward(self, x, a, b):
        outs, h = [], x
        for i in range(3):
            h = torch.tanh(h * (i + 1)) + x
            outs.append(h)
        return torch.stack(outs), torch.stack([a, b]), h.sum()


def test_pieces_write_their_slices(engines, tmp_path):
    model = PerLayer().eval()
    x, a, b = torch.randn(4, 5), torch.randn(2, 3), torch.randn(2, 3)
    fast = torch.compile(model, backend="compile_backend", options={"cache_dir": str(tmp_path)})
    with torch.no_grad():
        got, want = fast(x, a, b), model(x, a, b)
        again = fast(x * 2, a, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again[0], model(x * 2, a, b)[0], rtol=1e-5, atol=1e-6)
    (engine,) = engines
    # the buffer first, the kernel writing its three slices, one ATen stack left (the inputs')
    assert "= empty_" in engine.source and "[0], " in engine.source and "[2], ))" in engine.source
    assert engine.source.count("stack_default") == 1
    with torch.no_grad():
        report = compile_backend.explain(model, x, a, b, cache_dir=str(tmp_path / "r"))
    (g,) = report.graphs
    impls = [k["impl"] for k in g.kernels if k["ops"] == ["aten.stack"]]
    assert sorted(impls) == ["aten", "in place"], impls  # the inputs' stack stays ATen's


def test_decode_step_caches(engines, tmp_path):
    """The zoo decoder's stacked caches: no ATen stack left, the step still equals eager."""
    model, inputs = zoo.get("llama_decode", "tiny")
    with torch.no_grad():
        want = model(*inputs)
        report = compile_backend.explain(model, *inputs, cache_dir=str(tmp_path / "r"))
        got = torch.compile(model, backend="compile_backend", options={"cache_dir": str(tmp_path)})(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    (g,) = report.graphs
    assert not g.fallbacks, g.fallbacks
    assert [k["impl"] for k in g.kernels if k["ops"] == ["aten.stack"]] == ["in place", "in place"]


@pytest.mark.gpu
def test_gpu_stack_in_place_under_cuda_graphs(engines, tmp_path):
    """On the GPU the engine replays a CUDA graph: the stack's buffer is a recorded allocation,
    handed out like any output; two calls kept alive both stay correct."""
    model = PerLayer().eval()
    xs = [torch.randn(4, 5, device="cuda") for _ in range(3)]
    a, b = torch.randn(2, 3, device="cuda"), torch.randn(2, 3, device="cuda")
    fast = torch.compile(model, backend="compile_backend", options={"cache_dir": str(tmp_path)})
    with torch.no_grad():
        outs = [fast(x, a, b) for x in xs]
        for x, got in zip(xs, outs):
            torch.testing.assert_close(got[0], model(x, a, b)[0], rtol=1e-5, atol=1e-6)
    assert engines[0].cuda_graph is not None


class ReturnsAPiece(torch.nn.Module):
    def forward(self, x):
        a, b = torch.sin(x), torch.cos(x) * 2
        return torch.stack([a, b]), a


def test_a_piece_the_graph_returns_keeps_the_stack_a_copy(tmp_path):
    """Eager's stack copies: the returned piece and the stack are separate memory. Written in
    place they would alias (a later in-place write to one would show in the other): not done."""
    model, x = ReturnsAPiece().eval(), torch.randn(3, 4)
    with torch.no_grad():
        report = compile_backend.explain(model, x, cache_dir=str(tmp_path / "r"))
        stacked, piece = torch.compile(model, backend="compile_backend", options={"cache_dir": str(tmp_path)})(x)
    (g,) = report.graphs
    assert [k["impl"] for k in g.kernels if k["ops"] == ["aten.stack"]] == ["aten"]
    piece.add_(1)
    torch.testing.assert_close(stacked[0], torch.sin(x), rtol=1e-5, atol=1e-6)
