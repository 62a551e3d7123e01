"""select_rows_first: a select / slice of a layer norm's output along a row dim becomes the norm of
the selected rows (ViT's class token), with the same values; a norm whose output is read
elsewhere, or a select along a normalised dim, stays."""
import pytest
import torch
import torch.nn as nn

from compile_backend.fx_passes.row_select import select_rows_first
from fx_passes.graphs import checked_run, count, ctx, inference_graph, training_graph


class ClassToken(nn.Module):
    """The norm over [B, T, H], then the class token (or a slice of rows), then a head."""

    def __init__(self, pick):
        super().__init__()
        self.norm, self.head, self.pick = nn.LayerNorm(12), nn.Linear(12, 5), pick

    def forward(self, x):
        return self.head(self.pick(self.norm(x)))


def _rewritten(model, x):
    t = inference_graph(model, x)
    with torch.no_grad():
        expected = model(x)
    counts = select_rows_first(t.gm, ctx())
    got = checked_run(t)
    got = got[0] if isinstance(got, (list, tuple)) and not isinstance(expected, tuple) else got
    torch.testing.assert_close(tuple(got) if isinstance(expected, tuple) else got, expected,
                               rtol=0, atol=0)  # per-row math: the same bits
    return t, counts["select_before_layer_norm"]


@pytest.mark.parametrize("pick", [lambda y: y[:, 0], lambda y: y[:, 1:3], lambda y: y[1]], ids=["cls", "slice", "batch"])
def test_the_norm_runs_on_the_picked_rows(pick):
    t, n = _rewritten(ClassToken(pick).eval(), torch.randn(3, 7, 12))
    assert n == 1
    norm = next(nd for nd in t.gm.graph.nodes if "native_layer_norm" in str(nd.target))
    assert norm.args[0].meta["val"].numel() < 3 * 7 * 12  # normalises the selected rows only


class ReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        y = self.norm(x)
        return y[:, 0], y.sum()


class NormPick(nn.Module):
    def __init__(self, pick):
        super().__init__()
        self.norm, self.pick = nn.LayerNorm(12), pick

    def forward(self, x):
        return self.pick(self.norm(x))


def test_a_norm_read_elsewhere_or_picked_along_its_normalised_dim_stays():
    _, n = _rewritten(ReadTwice().eval(), torch.randn(2, 4, 12))
    assert n == 0
    _, n = _rewritten(NormPick(lambda y: y[..., 3]).eval(), torch.randn(2, 4, 12))
    assert n == 0


def test_training_graphs_keep_the_norm_whole():
    """The backward reads the norm's mean and rstd of every row: no match."""
    t = training_graph(ClassToken(lambda y: y[:, 0]).train(), torch.randn(2, 4, 12))
    assert select_rows_first(t.gm, ctx(training=True))["select_before_layer_norm"] == 0
    assert count(t.gm, "native_layer_norm") == 1
