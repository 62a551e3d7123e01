"""Test helpers: build a KernelGroup by tracing a small function, and compare a kernel with it.

``make_group(fn, *inputs)`` traces ``fn`` with make_fx (ATen ops, real tensors), then runs
FakeTensorProp so every node carries ``meta['val']`` (a FakeTensor with the real shape, stride
and dtype, or a Python scalar), as the partitioner hands groups to builders.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from typing import Any, Callable, Dict, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from compile_backend.kernels.base import KernelContext, KernelGroup, propagate_fake  # noqa: E402
from compile_backend.options import Options  # noqa: E402

# Tolerances per dtype. fp32: a few ulp of the transcendental functions. fp16/bf16: the kernel
# rounds every op like eager, so results differ by at most one unit in the last place where a
# transcendental lands on a rounding boundary (fp16 ulp <= 2**-10, bf16 ulp <= 2**-7 relative).
TOL: Dict[torch.dtype, Dict[str, float]] = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-5, rtol=8e-3),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_group(fn: Callable, *inputs: Any, kind: str = "pointwise", name: str = "group") -> KernelGroup:
    def as_tuple(*args):
        out = fn(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    gm = make_fx(as_tuple)(*inputs)
    fake_prop(gm, inputs)
    return KernelGroup(kind, gm, name=name)


def fake_prop(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    propagate_fake(gm, inputs)


def context() -> KernelContext:
    return KernelContext(options=Options(), device=torch.device("cpu"), interpret=True)


def assert_matches(kernel, group: KernelGroup, inputs: Sequence[Any], tol: Dict[str, float] = None,
                   check_strides: bool = True) -> None:
    """Kernel outputs equal the ATen reference in shape, dtype, layout and values."""
    expected = group.reference(*inputs)
    got = kernel(*inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, g.dtype, e.shape, e.dtype)
        if check_strides and e.is_contiguous() is False and _dense(e):
            assert g.stride() == e.stride(), (g.stride(), e.stride())
        t = tol if tol is not None else TOL.get(e.dtype, dict(atol=0, rtol=0))
        if e.dtype.is_floating_point:
            torch.testing.assert_close(g, e, equal_nan=True, **t)
        else:
            assert torch.equal(g, e)


def _dense(t: torch.Tensor) -> bool:
    from compile_backend.kernels.launch import dense_order

    return dense_order(tuple(t.shape), tuple(t.stride())) is not None


def randn(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)
