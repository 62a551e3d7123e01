"""Judging a compiled result against eager, with an fp64 run as the measure of eager's own error.

An element is fine when it is close to eager at the per-dtype tolerance below, or when its
distance from the fp64 reference is within ``SLACK`` times eager's own distance from it (at that
element, or eager's typical distance over the tensor, the 95th percentile, so one outlier does
not excuse the rest; or eager's distance of the same rank among the sorted distances, so a heavy
tail of errors as heavy as eager's own is no failure). That loosens long fp16/bf16 chains
exactly as much as eager itself drifts, and still flags a fused kernel that is clearly less
accurate than eager.

Exact checks: booleans and integers must be equal (the generator only thresholds values where
that is well defined); non-finite eager values must be matched unless the reference is finite
there (eager overflowed and a fused kernel did not); and a signed zero must match eager where
eager and the reference agree on it (``x + 0`` with ``x = -0.0`` is ``+0.0``), except in programs
with a max/min reduction or an accumulating product (``signed_zeros=False``): a max over +0.0
and -0.0, or a sum of zero products, has a sign that depends on the order or the accumulator's
start, which eager does not define (ops.ACCUMULATING_KINDS).
"""
from __future__ import annotations

from typing import Any

import torch

#: (rtol, atol) per dtype, elementwise as in torch.allclose (tests/helpers.py's values)
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
#: gradients: a sum over everything above them, so atol scales with the largest gradient
GRAD_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2}
SLACK = 4.0


class Mismatch(Exception):
    """A compiled value differs from eager; ``kind`` groups failures (out, grad, mutation, ...)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def check(actual: Any, expected: Any, reference: Any, *, kind: str, path: str, grad: bool = False,
          signed_zeros: bool = True) -> None:
    """Raise Mismatch for the first element of ``actual`` that eager's numbers do not excuse."""
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            raise Mismatch("structure", f"{path}: expected {len(expected)} values, got {_what(actual)}")
        refs = reference if isinstance(reference, (list, tuple)) and len(reference) == len(expected) else [None] * len(expected)
        for i, (a, e, r) in enumerate(zip(actual, expected, refs)):
            check(a, e, r, kind=kind, path=f"{path}[{i}]", grad=grad, signed_zeros=signed_zeros)
        return
    if expected is None or not isinstance(expected, torch.Tensor):
        if actual is not None and expected is None and isinstance(actual, torch.Tensor) and grad:
            return  # a zero gradient may come back as None or as zeros
        if (actual is None) != (expected is None):
            raise Mismatch(kind, f"{path}: expected {_what(expected)}, got {_what(actual)}")
        return
    if not isinstance(actual, torch.Tensor):
        if grad and actual is None and not expected.abs().any():
            return
        raise Mismatch(kind, f"{path}: expected a tensor, got {_what(actual)}")
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise Mismatch("shape/dtype", f"{path}: {tuple(actual.shape)} {actual.dtype} != eager {tuple(expected.shape)} {expected.dtype}")
    if expected.is_complex():
        actual, expected = torch.view_as_real(actual.resolve_conj()), torch.view_as_real(expected.resolve_conj())
        reference = torch.view_as_real(reference.resolve_conj()) if isinstance(reference, torch.Tensor) and reference.is_complex() else None
    if not expected.is_floating_point():
        if not torch.equal(actual, expected):
            bad = (actual != expected).nonzero()
            raise Mismatch(kind, f"{path}: {len(bad)}/{expected.numel()} {expected.dtype} elements differ, "
                                 f"first at {tuple(bad[0].tolist())}: eager {expected[tuple(bad[0])].item()}, "
                                 f"compiled {actual[tuple(bad[0])].item()}")
        return
    _check_float(actual, expected, reference, kind, path, grad, signed_zeros)


def _check_float(actual, expected, reference, kind, path, grad, signed_zeros=True):
    a, e = actual.detach().double(), expected.detach().double()
    r = reference.detach().double() if isinstance(reference, torch.Tensor) and reference.shape == expected.shape else None
    dtype = expected.dtype
    fin_e, fin_a = torch.isfinite(e), torch.isfinite(a)
    if grad:
        rtol = GRAD_RTOL.get(dtype, 1e-3)
        scale = e[fin_e].abs().max().item() if fin_e.any() else 0.0
        atol = rtol * max(scale, 1e-3)
    else:
        rtol, atol = TOLERANCES[dtype]
    # non-finite elements: matched exactly, unless eager overflowed where fp64 did not
    same_nonfinite = (torch.isnan(a) & torch.isnan(e)) | (a == e)
    excused = torch.zeros_like(fin_e) if r is None else torch.isfinite(r) & ~fin_e
    bad = ~fin_e & ~same_nonfinite & ~excused
    bad |= fin_e & ~fin_a & (torch.ones_like(fin_e) if r is None else torch.isfinite(r))
    both = fin_e & fin_a
    diff = (a - e).abs()
    close = diff <= atol + rtol * e.abs()
    if r is not None:
        fin_r = torch.isfinite(r)
        own = torch.where(fin_r & fin_e, (e - r).abs(), torch.zeros_like(e))
        typical = torch.quantile(own[fin_r & fin_e], 0.95).item() if (fin_r & fin_e).sum() > 0 else 0.0
        near_ref = (a - r).abs() <= SLACK * torch.clamp(own, min=typical) + atol + rtol * r.abs()
        close |= near_ref & fin_r
        close |= _no_heavier_tail(a, r, own, both & fin_r, atol, rtol) & ~close & both & fin_r
    bad |= both & ~close
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        ref_s = f", fp64 {r[idx].item():.6g}" if r is not None else ""
        n_bad = int(bad.sum())
        raise Mismatch(kind, f"{path}: {n_bad}/{e.numel()} elements differ (max |diff| "
                             f"{diff[both].max().item() if both.any() else float('nan'):.3g}), first at {idx}: "
                             f"eager {e[idx].item():.6g}, compiled {a[idx].item():.6g}{ref_s}")
    if not grad and signed_zeros:
        zero = (a == 0) & (e == 0) & (torch.signbit(a) != torch.signbit(e))
        if r is not None:
            zero &= (r == 0) & (torch.signbit(r) == torch.signbit(e))
        if zero.any():
            idx = tuple(zero.nonzero()[0].tolist())
            raise Mismatch("signed zero", f"{path}: signed zero differs at {idx}: eager {e[idx].item()}, "
                                          f"compiled {a[idx].item()}")


def _no_heavier_tail(a, r, own, valid, atol, rtol):
    """Elements whose distance from fp64 is within SLACK times eager's own distance *of the same
    rank* (errors sorted over the tensor). In an ill-conditioned chain (sin of large values
    summed by a GEMM) eager's and a kernel's errors have the same heavy-tailed distribution but
    land on different elements: one within eager's own error profile is not less accurate."""
    ours = (a - r).abs()[valid]
    order = torch.argsort(ours)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    bound = SLACK * torch.sort(own[valid]).values[rank] + atol + rtol * r.abs()[valid]
    out = torch.zeros_like(valid)
    out[valid] = ours <= bound
    return out


def _what(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)} {x.dtype}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of {len(x)}"
    return type(x).__name__


def first_line(exc: BaseException, limit: int = 300) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:limit] if msg else ''}"


def normalise(message: str) -> str:
    """A failure message without numbers, shapes and addresses: the key that groups failures."""
    import re

    m = re.sub(r"0x[0-9a-f]+", "ADDR", message)
    m = re.sub(r"\[[0-9, ]*\]|\([0-9, ]*\)", "SHAPE", m)
    m = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", m)
    m = re.sub(r"/[\w/.\-]+", "PATH", m)
    return m[:120]
