"""Ops of torchvision classifiers the partitioner once left in ATen, found by
benchmarks/vision_families.py (session 37), now in our kernels under the interpreter: a
pre-activation BatchNorm after a cat (DenseNet; ``fold_batchnorm``'s rule ``bn_affine``), an
average pooling (DenseNet's transition, Inception's branch pool; kernels/avgpool.py), and
hard-swish / leaky ReLU, which torch does not tag ``pointwise``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compile_backend.report import Report
from helpers import compile_and_compare


class DenseTransition(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(7)
        self.conv = nn.Conv2d(7, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, a, b):
        x = self.conv(F.relu(self.bn(torch.cat([a, b], 1))))  # pre-activation: no layer before the BN
        x = F.avg_pool2d(x, 2, 2)
        y = F.avg_pool2d(F.hardswish(self.bn2(x)), 3, 1, 1, count_include_pad=False)
        return torch.rsub(F.leaky_relu(y, 0.1), x, alpha=2)  # rsub.Tensor: x - 2 * leaky_relu(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_transition_runs_in_our_kernels(dtype):
    torch.manual_seed(0)
    model = DenseTransition().eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    model = model.to(dtype)
    inputs = (torch.randn(2, 3, 9, 11, dtype=dtype), torch.randn(2, 4, 9, 11, dtype=dtype))
    report = Report()
    compile_and_compare(model, inputs, report=report)
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert fallbacks == [], fallbacks
    rules = report.graphs[0].rules["fold_batchnorm"]
    assert (rules["conv_bn"], rules["bn_affine"]) == (0, 2), rules  # bn2 reads the pool, which the add reads too


class GroupNormBlock(nn.Module):
    """PoolFormer's token mixer (GroupNorm of one group, avg pool minus input) and ConvNeXt V2's
    global response norm (a 2-norm over the spatial dims), then an F.normalize head."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(1, 6)
        self.norm2 = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = self.norm(x)
        x = x + F.avg_pool2d(y, 3, 1, 1, count_include_pad=False) - y
        x = self.norm2(x)
        g = torch.norm(x, p=2, dim=(2, 3), keepdim=True)
        x = x * (g / (g.mean(dim=1, keepdim=True) + 1e-6)) + x
        return F.normalize(self.fc(x.mean((2, 3))), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_group_norms_and_two_norms_run_in_our_kernels(dtype):
    torch.manual_seed(0)
    model = GroupNormBlock().eval().to(dtype)
    report = Report()
    compile_and_compare(model, (torch.randn(2, 6, 7, 9, dtype=dtype),), report=report)
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert fallbacks == [], fallbacks
    assert report.graphs[0].rules["canonical_norms"] == {"group_norm_as_layer_norm": 2, "vector_norm_as_sum": 2}


class ShiftedWindows(nn.Module):
    """Swin's block skeleton: LayerNorm, roll by half a window over H and W, the windows'
    permute-copy, and the roll back after a linear, added to the residual."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        y = torch.roll(self.norm(x), shifts=(-2, -3), dims=(1, 2))
        windows = y.view(b, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, c)
        z = self.fc(windows).view(b, h // 4, w // 4, 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return x + torch.roll(z, shifts=(2, 3), dims=(1, 2)), torch.roll(x, 5, 3) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rolls_run_in_our_kernels(dtype):
    torch.manual_seed(0)
    model = ShiftedWindows().eval().to(dtype)
    report = Report()
    compile_and_compare(model, (torch.randn(2, 8, 12, 6, dtype=dtype),), report=report)
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert fallbacks == [], fallbacks
    kernels = [k for g in report.graphs for k in g.kernels]
    rolled = [k for k in kernels if "aten.roll" in k["ops"]]
    assert sum(k["ops"].count("aten.roll") for k in rolled) == 3 and all(k["impl"] == "triton" for k in rolled), rolled


class Upsampling(nn.Module):
    """A segmentation head's resize (bilinear, align_corners False and True) and a UNet's
    nearest upsampling by 2, each with the ops around it."""

    def forward(self, x):
        a = F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=False)
        b = F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=True)
        c = F.interpolate(torch.relu(x), scale_factor=2, mode="nearest")
        return a + b, c * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_interpolations_run_in_our_kernels(dtype):
    torch.manual_seed(0)
    report = Report()
    compile_and_compare(Upsampling().eval(), (torch.randn(2, 3, 5, 7, dtype=dtype),), report=report)
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert fallbacks == [], fallbacks
    indexed = [k for g in report.graphs for k in g.kernels if "aten._unsafe_index" in k["ops"]]
    assert sum(k["ops"].count("aten._unsafe_index") for k in indexed) == 9, indexed
    assert len(indexed) <= 3 and all(k["impl"] == "triton" for k in indexed), indexed


class EdgeSizes(nn.Module):
    """Size-1 dims around the indexed loads: an interpolation to one row (left to ATen), one from a
    single row, a roll over a size-1 dim and by a whole turn (no rolled dim)."""

    def forward(self, x, y):
        a = F.interpolate(x, size=(1, 6), mode="nearest")  # one row of five: stays an ATen op
        b = F.interpolate(y, size=(1, 8), mode="bilinear")  # from a single row: no row lookup
        c = torch.roll(x, shifts=(3, 5), dims=(0, 3))  # size-1 dim 0; a whole turn of 5 along dim 3
        return a * 2, b + 1, c - 1


def test_size_one_dims_around_indexed_loads():
    torch.manual_seed(0)
    report = Report()
    compile_and_compare(EdgeSizes().eval(), (torch.randn(1, 3, 5, 5), torch.randn(2, 3, 1, 4)), report=report)
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert all(f["op"] == "aten._unsafe_index" and "no kernel of ours" in f["reason"] for f in fallbacks), fallbacks


class Padding(nn.Module):
    """Swin's pad of [B, H, W, C] up to whole windows before its roll, an explicit "same" pad
    with a value, and a negative pad (a crop), each with the ops around it."""

    def forward(self, x, y):
        a = F.pad(F.gelu(x), (0, 0, 0, 3, 0, 1))  # W + 3, H + 1 (zeros)
        b = torch.roll(a, shifts=(-2, -2), dims=(1, 2)) * 2
        c = F.pad(y, (1, 2, 2, 1), value=-1.5) + 1
        d = F.pad(y, (-1, 0, 0, -2)) - 3  # crops
        return b, c, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_pads_run_in_our_kernels(dtype):
    torch.manual_seed(0)
    report = Report()
    compile_and_compare(Padding().eval(), (torch.randn(2, 5, 6, 4, dtype=dtype), torch.randn(2, 3, 5, 6, dtype=dtype)),
                        report=report)
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert fallbacks == [], fallbacks
    padded = [k for g in report.graphs for k in g.kernels if "aten.constant_pad_nd" in k["ops"]]
    assert sum(k["ops"].count("aten.constant_pad_nd") for k in padded) == 3 and all(k["impl"] == "triton" for k in padded)
