"""Helpers of the fused decode GEMV's tests (test_gemv.py, test_gemv_norm.py): a group traced as
the partitioner hands it, the kernel chosen with a forced split-K, the comparison with the
group's reference at the module docstring's tolerances, launch counts, INT8 / INT4 weights, and
Llama's RMS norm."""
from __future__ import annotations

import torch

import compile_backend
import compile_backend.ops  # noqa: F401 (registers compile_backend::weight_only_linear)
from compile_backend.kernels import weight_only_ref as ref

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def gemv_group(fn, inputs, anchor_op="weight_only_linear"):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from compile_backend.kernels.base import KernelGroup

    gm = make_fx(lambda *a: (fn(*a),))(*inputs)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    anchor = next(n.name for n in gm.graph.nodes if anchor_op in str(n.target))
    return KernelGroup("gemm", gm, anchor=anchor)


def choose_gemv(group, inputs, monkeypatch, split_k):
    from compile_backend.kernels import weight_only
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.select import choose_kernel

    if split_k is not None:  # the first (heuristic) candidate is what runs with tuning off
        cfg = weight_only.WeightOnlyConfig("gemv", 1, 16, 16, split_k=split_k)
        monkeypatch.setattr(weight_only, "heuristic", lambda m: cfg)
    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cpu"), interpret=True)
    kernel, fallbacks = choose_kernel(group, inputs, ctx)
    assert (kernel.impl, fallbacks, kernel.config.get("fused")) == ("triton", [], True), (kernel.impl, fallbacks)
    return kernel


def assert_close(got, want):
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert got.dtype == want.dtype and got.shape == want.shape and err < TOL[want.dtype], err


def count_launches(monkeypatch):
    """Counts the fused kernel's launches and any generated epilogue kernel's."""
    from compile_backend.kernels import weight_only_build as wob
    from compile_backend.kernels import gemv

    runs = []
    real_launch, real_epilogue = gemv.launch, wob.epilogue_only
    monkeypatch.setattr(gemv, "launch", lambda *a, **k: runs.append("gemv") or real_launch(*a, **k))
    monkeypatch.setattr(wob, "epilogue_only", lambda *a, **k: runs.append("epilogue") or real_epilogue(*a, **k))
    return runs


def quantized_weights(n, k, precision, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    return ref.quantize_weight(torch.randn(n, k, generator=gen), precision, group_size)


class Norm(torch.nn.Module):
    """Llama's RMS norm: the mean of squares in fp32, the scale applied in the input dtype."""

    def __init__(self, k, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, k))

    def forward(self, h):
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(h.dtype) * h32.to(h.dtype)


def rms_norm(h, w, eps=1e-6):
    """Llama's RMS norm (as ``Norm``) of ``h`` with weight ``w``."""
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return w.to(h.dtype) * h32.to(h.dtype)


__all__ = ["TOL", "gemv_group", "choose_gemv", "assert_close", "count_launches", "quantized_weights", "Norm", "rms_norm"]
