"""canonical_norms: GroupNorm as a layer norm plus the per-channel affine, and the 2-norm as
sqrt(sum(x * x)), value for value against eager in fp32 / fp16 / bf16; a group norm whose mean
or rstd is read (a training graph's) and norms of other orders are left alone."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compile_backend.fx_passes.norms import canonical_norms
from fx_passes.graphs import Builder, check_meta, count, ctx, inference_graph, run

aten = torch.ops.aten
#: (rtol, atol): both sides compute in fp32 and round once; the sums' order differs
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn = nn.GroupNorm(3, 6)
        self.gn1 = nn.GroupNorm(1, 6, affine=False)  # PoolFormer's: one group

    def forward(self, x, v):
        y = self.gn(x) + self.gn1(x)
        grn = torch.norm(y, p=2, dim=(2, 3), keepdim=True)  # ConvNeXt V2's global response norm
        return y * grn, F.normalize(v, dim=-1), torch.linalg.vector_norm(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_norm_and_two_norm_rewrite_and_match_eager(dtype):
    torch.manual_seed(0)
    model = Norms().eval()
    with torch.no_grad():
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.uniform_(-0.3, 0.3)
    model = model.to(dtype)
    inputs = (torch.randn(2, 6, 5, 7, dtype=dtype), torch.randn(3, 9, dtype=dtype))
    t = inference_graph(model, *inputs)
    counts = canonical_norms(t.gm, ctx())
    assert counts == {"group_norm_as_layer_norm": 2, "vector_norm_as_sum": 3}, counts
    assert count(t.gm, "native_group_norm") == 0 and count(t.gm, "linalg_vector_norm") == 0
    t.gm.graph.lint()
    check_meta(t.gm)
    with torch.no_grad():
        expected = model.double()(*(x.double() for x in inputs))
    rtol, atol = TOL[dtype]
    for got, want in zip(run(t), expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def test_read_statistics_and_other_orders_are_left_alone():
    b = Builder()
    x = b.input(torch.randn(2, 4, 3, 3))
    gn = b.op(aten.native_group_norm.default, x, None, None, 2, 4, 9, 2, 1e-5)
    out, mean = b.op(operator.getitem, gn, 0), b.op(operator.getitem, gn, 1)  # mean read: a backward's
    one = b.op(aten.linalg_vector_norm.default, x, 1, [1])
    t = b.build(out, mean, one)
    assert canonical_norms(t.gm, ctx()) == {"group_norm_as_layer_norm": 0, "vector_norm_as_sum": 0}
