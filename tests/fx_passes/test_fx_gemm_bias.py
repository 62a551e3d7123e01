"""fold_gemm_bias: F.linear on a non-contiguous 3-D input (mm + view + bias add) becomes
view(addmm); a bias that is not one value per column, or a dtype-promoting add, stays."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from compile_backend.fx_passes.gemm_bias import fold_gemm_bias
from fx_passes.graphs import check_meta, count, ctx, inference_graph, rewritten, run


def _folded(model, *inputs):
    return rewritten(fold_gemm_bias, "bias_after_view", model, *inputs)


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


class RotaryFrequencies(nn.Module):
    """HF decoders' rotary angles: ``inv_freq[None, :, None] @ position[:, None, :]`` (a bmm over
    K = 1), and a plain mm over K = 1, beside a real GEMM that stays one."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(8))
        self.fc = nn.Linear(5, 3)

    def forward(self, position, x):
        freqs = self.inv_freq[None, :, None].expand(position.shape[0], -1, 1) @ position[:, None, :]
        outer = x[:, :1] @ x[:1, :]
        return torch.cos(freqs), outer * 2, self.fc(x)


def test_matmul_over_k_of_one_is_a_product():
    model = RotaryFrequencies().eval()
    inputs = (torch.arange(6, dtype=torch.float32).view(2, 3), torch.randn(4, 5))
    t = inference_graph(model, *inputs)
    with torch.no_grad():
        expected = model(*inputs)
    counts = fold_gemm_bias(t.gm, ctx())
    t.gm.graph.lint()
    check_meta(t.gm)
    for got, want in zip(run(t), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # one product rounded once, as the GEMM
    assert counts["outer_product"] == 2 and count(t.gm, "bmm") == 0
    assert count(t.gm, "addmm") == 1  # the Linear's K is 5: still a GEMM
