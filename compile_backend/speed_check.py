"""First-call speed check: the built engine against the plain ATen graph, the fastest runs.

Kernels are tuned one group at a time; the whole engine can still lose to eager where no
group wins much and the engine adds work of its own (a CUDA graph copies its inputs in and its
outputs out: two full passes over a large activation in a chain of large GEMMs, where launches
cost nothing). So on CUDA inference, once the engine is built, its call is timed against the
same call without its CUDA graph and against the ATen graph Dynamo handed us (eager's kernels,
without Python), interleaved on the real inputs, and the fastest is kept for that input
signature; the engine wins ties (``MARGIN``). The report records the three times and the
choice (``GraphReport.speed_check``). Option ``speed_check=False`` keeps the engine unchecked.

Skipped where running the graph more than once would show (graphs that write their inputs) and
for quantized engines (the ATen graph computes in float: another function than the one asked for).

The verdict is stored beside the tuning records (the timing cache of the engine's cache scope),
keyed by the engine cache key: a later process that loads the same engine from the cache applies
the stored choice instead of timing again (33 runs of the model: about a second of a warm start
on HF BERT). The report marks such an entry ``from_cache``.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .fx_passes.rules import written_placeholders

#: another runner must be this much faster than the engine to replace it (timing noise)
MARGIN = 0.03
WARMUP, REPS = 2, 9

ENGINE, NO_GRAPH, ATEN = "engine", "engine without CUDA graph", "aten graph"


def writes_inputs(gm: fx.GraphModule) -> bool:
    """Whether any op writes one of the graph's inputs (an input mutation)."""
    return bool(written_placeholders(gm.graph))


def cuda_event_ms(fn: Callable[[], Any]) -> float:
    """One call's GPU time in ms between two CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_interleaved(runners: Dict[str, Callable[[], Any]], timer: Callable[[Callable[[], Any]], float],
                     warmup: int = WARMUP, reps: int = REPS) -> Dict[str, float]:
    """Median time of each runner, the runners taking turns (clock and cache drift hit all)."""
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    samples: Dict[str, list] = {name: [] for name in runners}
    for _ in range(reps):
        for name, fn in runners.items():
            samples[name].append(timer(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def fastest(times: Dict[str, float], margin: float = MARGIN) -> str:
    """The runner to keep: the fastest, unless the engine is within ``margin`` of it."""
    best = min(times, key=times.get)
    if ENGINE in times and times[ENGINE] <= times[best] * (1 + margin):
        return ENGINE
    return best


def race(engine: Any, aten_gm: fx.GraphModule, args: Sequence[Any],
         timer: Optional[Callable[[Callable[[], Any]], float]] = None,
         known: Optional[Dict[str, Any]] = None) -> Tuple[Any, Dict[str, Any]]:
    """(what to run for this signature: ``engine`` or ``aten_gm``, the report entry). An engine
    that loses to itself without its CUDA graph drops the graph. ``known``: a stored verdict for
    this very engine (:class:`Verdicts`), applied without timing."""
    if known is not None and known.get("chosen") in (ENGINE, NO_GRAPH, ATEN):
        chosen = known["chosen"]
        entry = {"ms": dict(known.get("ms", {})), "chosen": chosen, "from_cache": True}
    else:
        runners = {ENGINE: lambda: engine(args)}
        if engine.cuda_graph is not None:
            runners[NO_GRAPH] = lambda: engine.run(args)
        runners[ATEN] = lambda: aten_gm(*args)
        times = time_interleaved(runners, timer or cuda_event_ms)
        chosen = fastest(times)
        entry = {"ms": {k: round(v, 5) for k, v in times.items()}, "chosen": chosen}
    if chosen == ATEN:
        return aten_gm, entry
    if chosen == NO_GRAPH:
        engine.cuda_graph = None
    return engine, entry


class Verdicts:
    """Speed-check verdicts on disk, per engine cache key (in the timing cache's file)."""

    ENV = {"record": "speed_check"}

    def __init__(self, timing_cache: Any):
        self.timing = timing_cache

    @classmethod
    def open(cls, cache_dir: Optional[str], device: torch.device) -> Optional["Verdicts"]:
        from .cache import scope

        timing = scope.timing_cache(scope.open_scope(cache_dir, device))
        return cls(timing) if timing is not None else None

    def get(self, engine_key: str) -> Optional[Dict[str, Any]]:
        return self.timing.get({"engine": engine_key}, self.ENV)

    def put(self, engine_key: str, entry: Dict[str, Any]) -> None:
        self.timing.put({"engine": engine_key}, self.ENV, {"chosen": entry["chosen"], "ms": entry["ms"]})


__all__ = ["race", "Verdicts", "writes_inputs", "fastest", "time_interleaved", "cuda_event_ms", "ENGINE", "NO_GRAPH", "ATEN"]
