"""Entry point Dynamo calls: ``torch.compile(model, backend="compile_backend", options={...})``."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from .options import Options
from .report import Report, device_name, versions

log = logging.getLogger("compile_backend")

# torch.compile's `mode` mapped onto our options, so the familiar spellings do something sane
_MODES = {
    "default": {},
    "max-autotune": {"autotune": "max"},
    "max-autotune-no-cudagraphs": {"autotune": "max", "cuda_graphs": "off"},
    "reduce-overhead": {"cuda_graphs": "on"},
}


def compile_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Optional[dict] = None,
    mode: Optional[str] = None,
    report: Optional[Report] = None,
) -> Callable:
    """The Dynamo backend: lowers ``gm`` to ATen and compiles each ATen graph lazily."""
    opts = resolve_options(options, mode)
    report = report if report is not None else Report()
    _describe_run(report, opts, example_inputs)
    from . import capture
    from .pipeline import CompiledGraph

    def compile_aten(aten_gm, *, role, name, frozen):
        return CompiledGraph(aten_gm, role=role, name=name, frozen=frozen if opts.freeze else None, options=opts,
                             report_sink=report.new_graph)

    try:
        return capture.lower(gm, example_inputs, compile_aten)
    except Exception as exc:
        if opts.fallback == "error" or _is_dynamo_signal(exc):
            raise
        warnings.warn(
            f"compile_backend: could not lower this graph to ATen ({type(exc).__name__}: {exc}); "
            "running it eagerly. Pass options={'fallback': 'error'} to raise instead.", stacklevel=2)
        g = report.new_graph(f"dynamo graph ({len(gm.graph.nodes)} nodes)", "eager")
        g.fallbacks.append({"op": "graph", "reason": f"capture failed: {type(exc).__name__}: {exc}"})
        return gm.forward


def _is_dynamo_signal(exc: BaseException) -> bool:
    """Dynamo's own control flow (restart the analysis, skip the frame) passes through us."""
    from torch._dynamo import exc as dynamo_exc

    return isinstance(exc, (dynamo_exc.RestartAnalysis, dynamo_exc.SkipFrame))


def resolve_options(options: Any, mode: Optional[str] = None) -> Options:
    opts = Options.from_mapping(options)
    if mode is not None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        explicit = set(options or {})
        opts = opts.replace(**{k: v for k, v in _MODES[mode].items() if k not in explicit})
    return opts


def _describe_run(report: Report, opts: Options, example_inputs: Sequence[Any]) -> None:
    device = next((a.device for a in example_inputs if isinstance(a, torch.Tensor)), torch.device("cpu"))
    report.device = device_name(device)
    report.options = opts.as_dict()
    report.versions = versions()
    from .kernels.select import triton_enabled

    report.generated_kernels = triton_enabled(device)
    from .cache.location import resolve_root

    report.cache["dir"] = str(resolve_root(opts.cache_dir))
