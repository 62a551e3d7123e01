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
        self.log_gain = nn.Parameter(torch.full((hidden,), 0.1))

    def forward(self, h):
        b, s, _ = h.shape
        tt = self.token_type(self.token_type_ids[:, :s].expand(b, s))
        return self.proj(h + tt) * self.log_gain.exp()  # exp of a constant: folds


def test_a_large_constant_value_stays_a_node_and_the_rest_folds():
    model = TokenTypeEncoder().eval()
    h = torch.randn(16, 128, 256)  # the embedding lookup would be 2 MiB > the growth allowance
    assert 16 * 128 * 256 * 4 > MAX_GROWTH_BYTES
    t = inference_graph(model, h)
    folded = constant_fold(t.gm, ctx())
    assert folded > 0  # once, the one large value stopped every fold (HF BERT: constant_fold 0)
    assert count(t.gm, "embedding") == 1  # computed per call from folded inputs
    assert count(t.gm, "exp") == 0  # folded
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
    assert count(t.gm, "embedding") == 0 and count(t.gm, "exp") == 0
    with torch.no_grad():
        expected = model(h)
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-5)


def test_a_view_of_a_large_weight_stays_a_view_not_a_copy():
    """``t(weight)`` of a linear folded into a stored copy of the weight (twice the weights'
    memory for nothing: the GEMM reads the transposed strides); past the growth allowance it
    stays a node."""
    model = nn.Sequential(nn.Linear(640, 512), nn.ReLU(), nn.Linear(512, 8)).eval()  # 1.25 MiB, 16 KiB
    x = torch.randn(4, 640)
    t = inference_graph(model, x)
    constant_fold(t.gm, ctx())
    assert count(t.gm, "t") == 1  # the large weight's transpose stays a view; the small one folds
    weights = {p.data_ptr() for p in model.parameters()}
    copies = [n for n, v in t.gm.named_buffers() if n.startswith("_folded_") and v.numel() == 640 * 512]
    assert not copies
    assert all(v.untyped_storage().data_ptr() in weights for n, v in t.gm.named_buffers() if n.startswith("_frozen_"))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-5)


def test_engine_runs_the_gemm_on_the_weight_view():
    """End to end (generated kernels under the interpreter in the suite): the GEMM group takes
    the transposed weight view as its operand and matches eager."""
    import compile_backend

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(640, 512), nn.GELU()).eval()
    x = torch.randn(3, 640)
    report = compile_backend.explain(model, x)
    assert report.graphs[0].groups_by_kind() == {"gemm": 1}
    with torch.no_grad():
        torch.testing.assert_close(compile_backend.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


class ShiftedWindowMask(nn.Module):
    """torchvision Swin's shape of problem: a mask built on ``x.new_zeros`` by slice writes (a
    value of ``x``'s shape alone, recomputed by ~20 ATen launches a block), then a bare
    ``zeros_like(x)`` in a select, which a kernel computes for free and must stay a node."""

    def forward(self, x):
        mask = x.new_zeros((6, 6))
        count = 0
        for h in (slice(0, -3), slice(-3, -1), slice(-1, None)):
            for w in (slice(0, -3), slice(-3, -1), slice(-1, None)):
                mask[h, w] = count
                count += 1
        bias = (mask.view(1, 36) - mask.view(36, 1)).ne(0).float() * -100.0
        y = x.view(-1, 36, 1) + bias.view(1, 36, 36)
        return torch.where(y > 0, y, torch.zeros_like(y)), torch.ones_like(x).new_full((3,), 2.0)


def test_values_built_from_shape_only_fills_fold_and_bare_fills_stay_nodes():
    model = ShiftedWindowMask().eval()
    x = torch.randn(2, 6, 6).to(memory_format=torch.contiguous_format)
    t = inference_graph(model, x)
    assert count(t.gm, "slice_scatter") > 0
    assert constant_fold(t.gm, ctx()) > 0
    assert count(t.gm, "slice_scatter") == 0 and count(t.gm, "new_zeros") == 0  # the mask is one constant
    assert count(t.gm, "zeros_like") == 1  # read as it is by the select: computed in its kernel
    with torch.no_grad():
        expected = model(x)
    for got, want in zip(run(t), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
