"""fold_gemm_bias: F.linear on a non-contiguous 3-D input (mm + view + bias add) becomes
view(addmm); a bias that is not one value per column, or a dtype-promoting add, stays."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from compile_backend.fx_passes.gemm_bias import fold_gemm_bias
from fx_passes.graphs import check_meta, count, ctx, inference_graph, run


def _folded(model, *inputs):
    t = inference_graph(model, *inputs)
    with torch.no_grad():
        expected = model(*inputs)
    n = fold_gemm_bias(t.gm, ctx())["bias_after_view"]
    t.gm.graph.lint()
    check_meta(t.gm)
    got = run(t)
    got = got[0] if isinstance(got, (list, tuple)) and len(got) == 1 else got
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return t, n


class SeqFirstLinear(nn.Module):
    """nn.MultiheadAttention's in-projection: linear on a transposed (L, B, E) input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 9)

    def forward(self, x):
        return F.linear(x.transpose(0, 1), self.fc.weight, self.fc.bias) * 2.0


def test_bias_after_a_reshaped_mm_becomes_addmm():
    t, n = _folded(SeqFirstLinear().eval(), torch.randn(3, 5, 6))
    assert n == 1 and count(t.gm, "addmm") == 1 and count(t.gm, "add") == 0


class RowBias(nn.Module):
    """A [rows, 1] tensor added after the GEMM is not a column bias."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x, r):
        return (x.reshape(-1, 6) @ self.w).view(3, 5, 4) + r


def test_a_bias_per_row_stays_an_add():
    _, n = _folded(RowBias().eval(), torch.randn(3, 5, 6), torch.randn(3, 5, 1))
    assert n == 0
