"""Constant folding: what folds, and what does not because folding it would grow memory."""
from __future__ import annotations

import torch
import torch.nn as nn

from compile_backend.fx_passes.constant_fold import MAX_GROWTH_BYTES, constant_fold
from fx_passes.graphs import count, ctx, inference_graph, run


class TokenTypeEncoder(nn.Module):
    """HF BERT's shape of problem: an index buffer of zeros, expanded to the batch and looked up
    in an embedding table, is constant but batch x seq x hidden large; beside it a linear whose
    weight transpose is a plain constant."""

    def __init__(self, hidden=256):
        super().__init__()
        self.register_buffer("token_type_ids", torch.zeros(1, 512, dtype=torch.long), persistent=False)
        self.token_type = nn.Embedding(2, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, h):
        b, s, _ = h.shape
        tt = self.token_type(self.token_type_ids[:, :s].expand(b, s))
        return self.proj(h + tt)


def test_a_large_constant_value_stays_a_node_and_the_rest_folds():
    model = TokenTypeEncoder().eval()
    h = torch.randn(16, 128, 256)  # the embedding lookup would be 2 MiB > the growth allowance
    assert 16 * 128 * 256 * 4 > MAX_GROWTH_BYTES
    t = inference_graph(model, h)
    folded = constant_fold(t.gm, ctx())
    assert folded > 0  # once, the one large value stopped every fold (HF BERT: constant_fold 0)
    assert count(t.gm, "embedding") == 1  # computed per call from folded inputs
    assert count(t.gm, "t") == 0  # the weight transpose folded
    big = [v for v in t.gm.buffers() if v.numel() * v.element_size() > MAX_GROWTH_BYTES]
    assert not big, [tuple(v.shape) for v in big]
    with torch.no_grad():
        expected = model(h)
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-5)


def test_a_small_constant_value_folds():
    model = TokenTypeEncoder(hidden=8).eval()
    h = torch.randn(2, 5, 8)
    t = inference_graph(model, h)
    assert constant_fold(t.gm, ctx()) > 0
    assert count(t.gm, "embedding") == 0
    with torch.no_grad():
        expected = model(h)
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-5)
