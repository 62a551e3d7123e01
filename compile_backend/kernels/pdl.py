"""Programmatic Dependent Launch (Hopper and later): a kernel may start launching while the one
before it on the stream is still running.

Why: a decode step is ~135 short launches (6 a layer) whose weights are read at the memory's
speed; what is left between them is the launch and the drain of each kernel, a few
microseconds apiece, which a weight-only step (a quarter of the fp16 bytes) pays as fully as the
fp16 one. With PDL, kernel B is launched with ``launch_pdl=True`` and its programs are placed
on the SMs as soon as every program of kernel A has signalled (``gdc_launch_dependents``); B's
first instruction waits (``gdc_wait``) until A has completed and its writes are visible. So the
ordering is the stream's (B reads nothing before A is done), only the launch overlaps.

Rules this module's users keep: a kernel launched with PDL waits before its first memory
access (``with_entry`` puts the wait, then the signal, at the top of its body); every kernel
launched with PDL waits, so a wait chains through all predecessors; kernels launched without it
(cuBLAS, ATen, ours with the option off) keep plain stream order. ``Options.pdl`` turns it on
for the generated pointwise, reduction, GEMV and flash-decoding kernels (off by default until
measured on the H200). Imports no Triton.
"""
from __future__ import annotations

import ast
from typing import Any, Dict

import torch

#: the first statements of a kernel launched with PDL: wait for the previous kernel, then let
#: the next one launch (its programs wait in turn before touching memory)
ENTRY = ("tl.extra.cuda.gdc_wait()", "tl.extra.cuda.gdc_launch_dependents()")


def available(device: torch.device) -> bool:
    """PDL can be used here: a CUDA device of compute capability 9.0 or later and a Triton that
    has the grid-dependency intrinsics and the ``launch_pdl`` launch option."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        if torch.cuda.get_device_capability(device)[0] < 9:
            return False
        import dataclasses

        import triton.language as tl
        from triton.backends.nvidia.compiler import CUDAOptions

        has_option = any(f.name == "launch_pdl" for f in dataclasses.fields(CUDAOptions))
        return has_option and hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    except Exception:  # an older Triton, another backend: plain launches
        return False


def with_entry(source: str, kernel: str, after: int = 0) -> str:
    """``source`` with :data:`ENTRY` as the first statements of the function ``kernel`` (found by
    parsing, so a signature over several lines or a docstring is no matter), or after its first
    ``after`` statements (ones that touch no memory: the program id a combined kernel's parts
    are matched by)."""
    tree = ast.parse(source)
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == kernel), None)
    if fn is None:
        raise ValueError(f"no function {kernel!r} in the kernel source")
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # after a docstring
    if len(body) <= after:
        raise ValueError(f"{kernel!r} has {len(body)} statements, fewer than {after + 1}")
    first = body[after]
    lines = source.split("\n")
    indent = " " * first.col_offset
    at = first.lineno - 1
    return "\n".join(lines[:at] + [indent + s for s in ENTRY] + lines[at:])


def launch_kwargs(enabled: bool) -> Dict[str, Any]:
    """The launch option of a kernel built with :func:`with_entry` (nothing when off)."""
    return {"launch_pdl": True} if enabled else {}


__all__ = ["ENTRY", "available", "with_entry", "launch_kwargs"]
