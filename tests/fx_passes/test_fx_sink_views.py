"""sink_views: element-wise work with scalar operands after a row-major reshape of an
element-wise value moves in front of the reshape (one kernel instead of two); a tensor operand
or a non-element-wise producer leaves it."""
import torch
import torch.nn as nn

from compile_backend.fx_passes.sink_views import sink_views
from fx_passes.graphs import count, rewritten


class CopyThenScale(nn.Module):
    """A transposed copy viewed as rows, then scaled, rounded, clamped and cast (a static
    quantize's chain), beside a view followed by a per-column add that must stay after it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv", torch.tensor(4.0))
        self.register_buffer("col", torch.randn(6))

    def forward(self, x):
        rows = x.transpose(1, 2).contiguous().view(-1, 6)
        codes = torch.clamp(torch.round(rows * self.inv), -128, 127).to(torch.int8)
        other = (x * 2).view(-1, 6) + self.col
        return codes, other


def test_a_scalar_chain_moves_in_front_of_the_view():
    t, n = rewritten(sink_views, "elementwise_before_view", CopyThenScale().eval(), torch.randn(2, 6, 5) * 10)
    assert n == 4  # mul, round, clamp, cast: each moved once
    assert count(t.gm, "view") == 2  # one behind the quantize chain, one before the per-column add


def test_nothing_moves_behind_a_non_elementwise_producer():
    class MatmulThenScale(nn.Module):
        def forward(self, a, b):
            return (a @ b).view(-1) * 3.0

    _, n = rewritten(sink_views, "elementwise_before_view", MatmulThenScale().eval(), torch.randn(3, 4), torch.randn(4, 5))
    assert n == 0
