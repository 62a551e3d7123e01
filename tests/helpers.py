"""Shared checks: compile with compile_backend and compare with eager.

Order of checks: output structure, then shape and dtype of every tensor, then values with the
per-dtype tolerances below, then (training) gradients of inputs and parameters.

Tolerances (rtol, atol), elementwise as in torch.allclose, chosen from what a reordered fp32
reduction or a reduced-precision GEMM legitimately changes:
  float32: 1e-4, 1e-4   (different summation order in fused kernels)
  float16: 1e-2, 1e-2   (one fp16 rounding step more or less per op)
  bfloat16: 5e-2, 5e-2  (bf16 has 8 bits of mantissa)
Gradients are sums over the batch and over every layer above them, so their absolute
tolerance scales with the gradient itself: |a - e| <= rtol*|e| + rtol*max|e|, with rtol 1e-3 in
fp32 (the forward rtol for fp16/bf16).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence

import torch

TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_same(actual: Any, expected: Any, tol: Optional[Dict] = None, path: str = "out") -> None:
    tol = tol or TOLERANCES
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {type(actual).__name__}"
        assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        if expected.is_floating_point():
            rtol, atol = tol[expected.dtype]
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")
        else:
            assert torch.equal(actual, expected), f"{path}: values differ"
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{path}: structure differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, tol, f"{path}[{i}]")
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: keys differ"
        for k in expected:
            assert_same(actual[k], expected[k], tol, f"{path}[{k!r}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def compile_and_compare(
    model: torch.nn.Module,
    inputs: Sequence[Any],
    *,
    training: bool = False,
    options: Optional[dict] = None,
    tol: Optional[Dict] = None,
    calls: int = 2,
    report: Optional[Any] = None,
):
    """Compile a copy of ``model`` with compile_backend and check it against eager.

    Inference runs under no_grad; training runs forward and backward on the sum of the
    outputs and compares gradients of every parameter and floating input. ``report``: a
    compile_backend Report the build fills (what ``compile_backend.explain`` returns for it).
    """
    eager = model
    ours = copy.deepcopy(model)
    if report is None:
        compiled = torch.compile(ours, backend="compile_backend", options=options)
    else:
        from compile_backend.backend import compile_backend as backend_fn

        compiled = torch.compile(ours, backend=lambda gm, ex: backend_fn(gm, ex, options=options, report=report))
    if not training:
        with torch.no_grad():
            expected = eager(*inputs)
            for _ in range(calls):
                actual = compiled(*inputs)
                assert_same(actual, expected, tol)
        return compiled
    e_in = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in inputs]
    a_in = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in inputs]
    expected = eager(*e_in)
    actual = compiled(*a_in)
    assert_same(actual, expected, tol)
    _loss(expected).backward()
    _loss(actual).backward()
    for (name, p_e), (_, p_a) in zip(eager.named_parameters(), ours.named_parameters()):
        if p_e.grad is None:
            assert p_a.grad is None, f"grad of {name}: eager has none, compiled has one"
            continue
        assert_grad_close(p_a.grad, p_e.grad, tol, f"grad[{name}]")
    for i, (x_e, x_a) in enumerate(zip(e_in, a_in)):
        if isinstance(x_e, torch.Tensor) and x_e.requires_grad:
            assert_grad_close(x_a.grad, x_e.grad, tol, f"grad[input {i}]")
    return compiled


def _loss(out: Any) -> torch.Tensor:
    # a fixed random weighting: sum(out) has an exactly-zero gradient behind a LayerNorm or a
    # softmax, which would compare rounding noise instead of gradients
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point():
            return out.sum() * 0.0
        g = torch.Generator().manual_seed(1234)
        w = torch.randn(out.shape, generator=g).to(out.device)
        return (out.float() * w).sum()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(_loss(o) for o in out if isinstance(o, (torch.Tensor, list, tuple, dict)))


def assert_grad_close(actual, expected, tol, path):
    assert actual is not None, f"{path}: missing"
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{path}: shape/dtype differ"
    rtol = 1e-3 if expected.dtype == torch.float32 else (tol or TOLERANCES)[expected.dtype][0]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-6,
                               msg=lambda m: f"{path}: {m}")


class ConvMLP(torch.nn.Module):
    """A conv and two linears (the quant tests' small model; every layer big enough to be
    quantized), optionally a 4-class head (N=4: below min_features, stays float)."""

    def __init__(self, head: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 24, 3, padding=1)
        self.fc1 = torch.nn.Linear(24 * 6 * 6, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 4) if head else None

    def forward(self, x):
        h = torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        return self.fc2(h) if self.head is None else self.head(torch.relu(self.fc2(h)))


def image_batches(n: int, seed: int = 0, size: int = 8):
    """``n`` calibration batches (input tuples) of random [size, 3, 6, 6] images for ConvMLP."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 6, 6, generator=g),) for _ in range(n)]


def groups_built(monkeypatch) -> list:
    """The kernel groups the pipeline builds from now on (appended as it partitions)."""
    from compile_backend import pipeline

    seen = []
    real = pipeline.fuse_groups

    def spy(gm, groups):
        graph, calls = real(gm, groups)
        seen.extend(c.group for c in calls)
        return graph, calls
    monkeypatch.setattr(pipeline, "fuse_groups", spy)
    return seen
