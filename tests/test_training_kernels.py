"""Backward graphs run in our kernels: the backward ops of activations, dropout and softmax
(threshold/gelu/silu/sigmoid/tanh/native_dropout backward as generated element-wise lines,
softmax's through its decomposition into one row reduction), fused with the GEMMs around them.
Interpreted kernels on CPU; values against eager."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_backend
from helpers import compile_and_compare


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 12)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        h = self.drop(F.gelu(self.a(x)))
        h = torch.relu(self.b(h)) + torch.sigmoid(h) * torch.tanh(h) + F.silu(h)
        return torch.softmax(self.c(h), dim=-1)


def test_backward_ops_run_in_our_kernels():
    torch.manual_seed(0)
    model = Block().train()
    x = torch.randn(6, 12, requires_grad=True)
    report = compile_backend.explain(model, x)
    backward = next(g for g in report.graphs if g.role == "backward")
    assert backward.fallbacks == [], backward.fallbacks  # was six ops in ATen
    ops = {o.split(".")[-1] for k in backward.kernels for o in k["ops"]}
    assert {"gelu_backward", "threshold_backward", "native_dropout_backward"} <= ops
    assert "_softmax_backward_data" not in ops  # decomposed: a row sum and element-wise ops
    # the dropout and GELU backward join the GEMM that computes their gradient input
    assert any(k["kind"] == "gemm" and {"native_dropout_backward", "gelu_backward"} <= {o.split(".")[-1] for o in k["ops"]}
               for k in backward.kernels), backward.kernels


def test_backward_values_match_eager_without_dropout():
    torch.manual_seed(1)
    model = Block().train()
    model.drop.p = 0.0
    compile_and_compare(model, [torch.randn(7, 12)], training=True)
