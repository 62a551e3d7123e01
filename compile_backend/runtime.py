"""The runtime Dynamo calls: one engine per input-shape signature, built on first use.

``CompiledGraph`` is what AOTAutograd receives for each ATen graph. A call with a new input
signature builds its engine (``pipeline.compile_graph_cached``) under a lock, so threads that
meet a new shape together build it once; building runs the graph on the real inputs, so the
random generators are restored afterwards (``preserve_rng``). Declared dynamic dimensions
(``Options.profiles``) map a call onto the engine of its size bucket (see profiles).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import pipeline, speed_check
from .engine import Engine, WeightLayoutChanged
from .errors import UserError
from .kernels.base import INTERPRETER_LOCK, triton_interpret
from .options import Options
from .profiles import GraphProfiles, Plan

log = logging.getLogger("compile_backend")

#: input shapes per training graph whose engines replay CUDA graphs (``cuda_graphs="auto"``):
#: a recording keeps the memory of the activations it saves for as long as its engine lives, so
#: a graph meeting many shapes (variable sequence lengths) runs the later ones launch by launch
#: rather than hold one activation pool per shape
TRAINING_GRAPHED_SHAPES = 2


class CompiledGraph:
    """What AOTAutograd calls: one engine per input-shape signature, built on first use.

    With declared dynamic dimensions (``Options.profiles``) a call whose sizes lie in the declared
    ranges runs the engine of its size bucket: inputs padded, outputs sliced back (see profiles).
    """

    def __init__(self, aten_gm: fx.GraphModule, *, role: str, name: str,
                 frozen: Optional[Sequence[bool]], options: Options, report_sink):
        self.aten_gm, self.role, self.name = aten_gm, role, name
        self.frozen, self.options, self.report_sink = frozen, options, report_sink
        self.engines: Dict[Tuple, Any] = {}
        # one build per input signature: threads calling a new shape at once wait for the first
        # one's engine (concurrent tunings would also skew each other's timings)
        self._build_lock = threading.Lock()
        self._warned_limit = False
        self._weights = frozenset(i for i, f in enumerate(frozen or ()) if f)
        self._unfrozen: Optional[Tuple[int, ...]] = None  # the other argument indices, on the first call
        self._arity = -1
        self.profiles = (GraphProfiles.bind(aten_gm, options.profiles, role=role, name=name)
                         if options.profiles else None)

    def __call__(self, *args: Any) -> Any:
        if self._unfrozen is None or len(args) != self._arity:
            self._arity = len(args)
            self._unfrozen = tuple(i for i in range(len(args)) if i not in self._weights)
        plan = self.profiles.plan(args) if self.profiles is not None else None
        if plan is not None:
            padded = plan.pad(args)
            key = _signature(padded, self._unfrozen)
            # a new bucket past the engine bound is not padded: it takes the bound's fallback
            if (key in self.engines or len(self.engines) < self.options.max_engines) \
                    and self._padding_checked(plan, args):
                return plan.unpad(self._run(padded, key, plan))
        return self._run(args, _signature(args, self._unfrozen))

    def _padding_checked(self, plan: Plan, args: Sequence[Any]) -> bool:
        with preserve_rng(args):  # the check runs the graph: its random draws are not the user's
            return self.profiles.check(plan, args, self.aten_gm)

    def _run(self, args: Sequence[Any], key: Tuple, plan: Optional[Plan] = None) -> Any:
        engine = self.engines.get(key)
        if engine is None:
            with self._build_lock:
                engine = self.engines.get(key)
                if engine is None:
                    engine = self._build(args, key)
                    if plan is not None:
                        self.profiles.built(plan)
        if not isinstance(engine, Engine):
            return engine(*args)
        try:
            return engine(args)
        except WeightLayoutChanged as exc:
            # another model's weights under the same graph: every engine was built for the old
            # layout, so start again (never run a kernel on shapes it was not built for)
            log.info("compile_backend: %s: %s; rebuilding its engines", self.name, exc)
            self.engines.clear()
            return self._run(args, key, plan)

    def _build(self, args: Sequence[Any], key: Tuple) -> Any:
        if len(self.engines) >= self.options.max_engines:
            if not self._warned_limit:
                warnings.warn(
                    f"compile_backend: {self.name} has seen {len(self.engines)} input shapes "
                    f"(max_engines={self.options.max_engines}); further shapes run the ATen graph "
                    "without our kernels. Raise max_engines or declare the dynamic dimension.",
                    stacklevel=3)
                self._warned_limit = True
            return self.aten_gm
        report = self.report_sink(self.name, self.role)
        report.shapes.append(_describe(args))
        if self.profiles is not None:
            report.profiles = self.profiles.state  # shared: later calls update it
        start = time.perf_counter()
        try:
            # building runs the graph on the real inputs (tuning, validation): the random
            # numbers it draws must not shift the ones the user's call then draws
            with preserve_rng(args), _interpreter_lock():
                engine = pipeline.compile_graph_cached(self.aten_gm, args, role=self.role, frozen=self.frozen,
                                              options=self._engine_options(), report=report)
        except Exception as exc:
            if self.options.fallback == "error" or isinstance(exc, UserError):
                raise
            op = getattr(exc, "op", None) or "graph"
            warnings.warn(
                f"compile_backend: compiling {self.name} failed at {op} ({type(exc).__name__}: {exc}); "
                "running this graph eagerly. Pass options={'fallback': 'error'} to raise instead.",
                stacklevel=3)
            report.fallbacks.append({"op": str(op), "reason": f"{type(exc).__name__}: {exc}"})
            engine = self.aten_gm
        if self._checks_speed(engine):
            try:
                engine_key = engine.cache_key
                verdicts = speed_check.Verdicts.open(self.options.cache_dir, engine.device) if engine_key else None
                known = verdicts.get(engine_key) if verdicts is not None else None
                with preserve_rng(args):  # the timed calls draw random numbers the user's must not see
                    engine, report.speed_check = speed_check.race(engine, self.aten_gm, args, known=known)
                if verdicts is not None and known is None:
                    verdicts.put(engine_key, report.speed_check)
            except Exception as exc:  # a check must never cost the user the engine
                log.warning("compile_backend: %s: speed check failed (%s: %s); keeping the engine",
                            self.name, type(exc).__name__, exc)
            report.cuda_graph = isinstance(engine, Engine) and engine.cuda_graph is not None
        report.compile_s = time.perf_counter() - start
        self.engines[key] = engine
        return engine

    def _engine_options(self) -> Options:
        """The options of the next engine: past TRAINING_GRAPHED_SHAPES shapes of a training
        graph, no CUDA graph unless asked for ("on")."""
        if self.role != "inference" and self.options.cuda_graphs == "auto" and \
                len(self.engines) >= TRAINING_GRAPHED_SHAPES:
            return dataclasses.replace(self.options, cuda_graphs="off")
        return self.options

    def _checks_speed(self, engine: Any) -> bool:
        """The first-call speed check applies: an engine for CUDA inference, one shape per
        engine (no padded profiles), a graph that may run more than once unseen, and no
        quantization (the ATen graph computes in float: not the function the user asked for)."""
        return (self.options.speed_check and self.options.quant is None and isinstance(engine, Engine)
                and self.role == "inference"
                and engine.device is not None and engine.device.type == "cuda" and self.profiles is None
                and not speed_check.writes_inputs(self.aten_gm))


def _interpreter_lock():
    """Builds run kernels (tuning, validation): under Triton's interpreter one thread at a time."""
    return INTERPRETER_LOCK if triton_interpret() else contextlib.nullcontext()


def preserve_rng(args: Sequence[Any]):
    """Restore the CPU generator, and that of every CUDA device among ``args``, on exit: work done
    on the user's behalf (building, checking) leaves the random stream where eager would."""
    devices = sorted({a.device.index or 0 for a in args
                      if isinstance(a, torch.Tensor) and a.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def _signature(args: Sequence[Any], indices: Sequence[int]) -> Tuple:
    """The engine key of a call: the layouts of the arguments at ``indices``, every one but the
    frozen weights. Those are left out: this runs on every call, a model passes hundreds of them
    (a 22-layer decoder: 200 of its 250 arguments), and the engine itself checks each one's
    identity and version (and raises ``WeightLayoutChanged`` when a new one has another layout)."""
    return tuple([(a.shape, a.stride(), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor)
                  else a if isinstance(a, (int, float, bool)) else type(a) for a in map(args.__getitem__, indices)])


def _describe(args: Sequence[Any]) -> str:
    shapes = [("x".join(map(str, a.shape)) or "scalar") + f":{str(a.dtype).replace('torch.', '')}"
              for a in args if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]
    return ", ".join(shapes[:6]) + (" …" if len(shapes) > 6 else "")


__all__ = ["CompiledGraph", "preserve_rng"]
