"""Small models shared by the quantization tests (tests/quant is on sys.path for its modules), and
:func:`quant_status`: a model compiled INT8 with a stand-in for the layer speed measurement."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

import compile_backend
from compile_backend import pipeline, quant


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


class TwoLinears(torch.nn.Module):
    """Linear -> ``activation`` -> Linear (with GELU on [batch, seq, hidden]: BERT's FFN, the GEMMs
    addmm between views)."""

    def __init__(self, activation=torch.relu):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(32, 48), torch.nn.Linear(48, 40)
        self.activation = activation

    def forward(self, x):
        return self.b(self.activation(self.a(x)))


class TwoConvs(torch.nn.Module):
    """conv -> ReLU (-> a 3x3 stride-2 max pool with ``pool``) -> 1x1 conv."""

    def __init__(self, pool: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1)
        self.pool = pool

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.nn.functional.max_pool2d(h, 3, 2, 1) if self.pool else h)


class ResidualBlock(torch.nn.Module):
    """``c(relu(b(relu(a(x))) + r))``, r = x or a downsample convolution of x computed after b
    (torchvision's Bottleneck order)."""

    def __init__(self, downsample: bool):
        super().__init__()
        torch.manual_seed(0)
        out = 16 if downsample else 8
        self.a, self.b = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, out, 1)
        self.ds = torch.nn.Conv2d(8, out, 1) if downsample else None
        self.c = torch.nn.Conv2d(out, 4, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return self.c(torch.relu(y + (self.ds(x) if self.ds is not None else x)))


class ConvsWin:
    """A stand-in measurement (``request.speed``) where every 8-bit convolution wins by far
    (1 us against 10: no float-group race), no GEMM is measured and a fused quantize costs
    nothing; tests subclass it with the probes they record."""

    def __call__(self, *args):
        return None

    def conv(self, *args):
        return (0.001, 0.010)

    def quantize_ms(self, numel):
        return 0.0


class ResidualStream(torch.nn.Module):
    """Two residual blocks: ``z = relu(b(relu(a(x))) + x)``, then ``relu(c(z) + z)``: c's input
    is read by its skip connection too (ResNet's block output)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        z = torch.relu(self.b(torch.relu(self.a(x))) + x)
        return torch.relu(self.c(z) + z)


def quant_status(monkeypatch, tmp_path, model, x, speed, **options):
    """{layer: (status, reason)} of ``model`` compiled INT8 with ``speed`` standing in for the
    quantize pass's measurement (``options``: the backend's, e.g. quant_residuals)."""
    @contextlib.contextmanager
    def fake(ctx, options):
        if ctx.quant is not None:
            ctx.quant.speed = speed
        yield None
    monkeypatch.setattr(pipeline, "layer_speed", fake)
    calib = quant.calibrate(model, [(x,)], quant.QuantConfig(precision="int8", min_features=1), progress=False,
                            use_cache=False)
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path), autotune="off",
                                         speed_check=False, **options)
    return {r["name"]: (r["status"], r["reason"]) for r in report.graphs[0].quant}
