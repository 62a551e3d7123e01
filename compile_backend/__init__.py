"""compile_backend: an optimizing backend for torch.compile, written in Python on Triton.

    model = torch.compile(model, backend="compile_backend")

Importing this package is cheap: it neither imports Triton nor initialises CUDA.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .options import Options  # noqa: E402  (light: dataclasses only)


def compile(model: Any, **options: Any):
    """``torch.compile(model, backend="compile_backend", options=options)``."""
    import torch

    Options.from_mapping(options)  # reject bad options now, not at the first call
    return torch.compile(model, backend="compile_backend", options=options or None)


def explain(model: Any, *example_inputs: Any, **options: Any):
    """Compile ``model`` with these options, run it once on ``example_inputs`` (and once
    backward when it is explained as training), return a Report. Other compiled models keep
    their compiled code (no ``torch._dynamo.reset()``); see compile_backend.explainer."""
    from .explainer import explain as run

    return run(model, *example_inputs, **options)


def __getattr__(name: str):
    # lazy public names: keep `import compile_backend` free of torch.fx / Triton work
    if name == "Report":
        from .report import Report

        return Report
    if name == "refit":
        from .weights import refit

        return refit
    if name == "compile_backend":
        from .backend import compile_backend

        return compile_backend
    raise AttributeError(f"module 'compile_backend' has no attribute {name!r}")


__all__ = ["compile", "explain", "refit", "Options", "Report", "__version__"]
