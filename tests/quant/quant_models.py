"""Small models shared by the quantization tests (tests/quant is on sys.path for its modules)."""
from __future__ import annotations

import torch
import torch.nn as nn


class NormLinear(nn.Module):
    """LayerNorm then Linear: the norm's kernel can write the linear's input quantized."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 48)

    def forward(self, x):
        return self.fc(self.norm(x))


class AttentionBlock(nn.Module):
    """HF-style self-attention: Q/K/V projections (merged by the passes), SDPA, heads flattened
    back, output projection."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(a.transpose(1, 2).contiguous().view(b, s, d))
