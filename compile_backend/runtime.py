"""The runtime Dynamo calls: one engine per input-shape signature, built on first use.

``CompiledGraph`` is what AOTAutograd receives for each ATen graph. A call with a new input
signature builds its engine (``pipeline.compile_graph_cached``) under a lock, so threads that
meet a new shape together build it once; building runs the graph on the real inputs, so the
random generators are restored afterwards (``preserve_rng``). Declared dynamic dimensions
(``Options.profiles``) map a call onto the engine of its size bucket (see profiles).

Every call finds its engine by that signature, the layouts of its arguments but the frozen
weights (the engine checks those itself). A decode step passes dozens of KV caches and calls
again with the same layouts: its inputs are first checked in one C++ pass against the layouts of
the last key met (``layout_check``), and read field by field only where they differ.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import operator
import threading
import time
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx

try:  # Dynamo's C++ check of tensors' layouts (what its guards on tensor inputs are made of)
    from torch._C._dynamo.guards import TensorGuards
except ImportError:  # then every call computes its engine key field by field
    TensorGuards = None

from . import pipeline, speed_check
from .cuda_graph import items_at
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
        self._unfrozen_args = items_at(())  # args -> the arguments at those indices
        # per engine key, (a C++ check that a call's inputs have that key's layouts, the key);
        # the last one met is tried first: a call like the last one gets its key without reading
        # its inputs' fields one by one (a decoder's 44 KV caches: ~30 us a call)
        self._layout_checks: Dict[EngineKey, Tuple[Callable[[Sequence[Any]], bool], EngineKey]] = {}
        self._recent: Optional[Tuple[Callable[[Sequence[Any]], bool], EngineKey]] = None
        self._checkable = True  # False once a call's inputs could not be checked so (sizes among them)
        self._arity = -1
        self.profiles = (GraphProfiles.bind(aten_gm, options.profiles, role=role, name=name)
                         if options.profiles else None)

    def __call__(self, *args: Any) -> Any:
        if self._unfrozen is None or len(args) != self._arity:
            self._arity = len(args)
            self._unfrozen = tuple(i for i in range(len(args)) if i not in self._weights)
            self._unfrozen_args = items_at(self._unfrozen)
            self._recent, self._checkable = None, True  # made for another number of inputs
        plan = self.profiles.plan(args) if self.profiles is not None else None
        if plan is not None:
            padded = plan.pad(args)
            key = self._key(padded)
            # a new bucket past the engine bound is not padded: it takes the bound's fallback
            if (key in self.engines or len(self.engines) < self.options.max_engines) \
                    and self._padding_checked(plan, args):
                return plan.unpad(self._run(padded, key, plan))
        return self._run(args, self._key(args))

    def _key(self, args: Sequence[Any]) -> EngineKey:
        """``_signature`` of the non-frozen arguments; the last key met when they pass its check."""
        inputs = self._unfrozen_args(args)
        recent = self._recent  # one read: another thread may replace it
        if recent is not None and recent[0](inputs):
            return recent[1]
        key = _signature(inputs)
        if not self._checkable:
            return key
        checked = self._layout_checks.get(key)
        # a check per key of an engine (max_engines of them), not for the keys past that bound,
        # whose calls run the ATen graph (making one costs ~50 us)
        if checked is None and len(self._layout_checks) < self.options.max_engines:
            check = layout_check(inputs)
            if check is None:
                self._checkable = False
                return key
            checked = self._layout_checks[key] = (check, key)
        self._recent = checked
        # the key object the check was made with: the one the engines are filed under, found by
        # identity rather than compared field by field
        return checked[1] if checked is not None else key

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
                t0 = time.perf_counter()
                with preserve_rng(args):  # the timed calls draw random numbers the user's must not see
                    engine, report.speed_check = speed_check.race(engine, self.aten_gm, args, known=known)
                report.stages["speed_check"] = round(time.perf_counter() - t0, 3)
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


class EngineKey(tuple):
    """An engine key (``_signature``) that computes its hash once: looking a decoder's engine up
    hashed ~60 layouts on every call."""

    def __new__(cls, fields: Any) -> "EngineKey":
        key = super().__new__(cls, fields)
        key.hash = tuple.__hash__(key)
        return key

    def __hash__(self) -> int:
        return self.hash


_SHAPE, _DTYPE, _DEVICE, _REQUIRES_GRAD = map(operator.attrgetter, ("shape", "dtype", "device", "requires_grad"))


def layout_check(inputs: Sequence[Any]) -> Optional[Callable[[Sequence[Any]], bool]]:
    """A check that later inputs have the layouts of ``inputs`` (shape, stride, dtype, device,
    requires_grad: the fields of ``_signature``), then having the same key: Dynamo's
    ``TensorGuards``, which compares them in C++ (and the dispatch keys besides: stricter, so a
    call it rejects only computes its key). ~5 us for 60 tensors, against ~30 us read field by
    field. None where it cannot be made: a non-tensor or a symbolic size among the inputs, a
    PyTorch without it."""
    if TensorGuards is None or not all(map(isinstance, inputs, itertools.repeat(torch.Tensor))):
        return None
    sizes, strides = [list(t.shape) for t in inputs], [list(t.stride()) for t in inputs]
    if not all(type(n) is int for dims in (*sizes, *strides) for n in dims):
        return None
    try:
        guards = TensorGuards(*inputs, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides)
    except Exception:  # a PyTorch whose TensorGuards takes other arguments
        return None
    return lambda later: guards.check(*later)


def _signature(inputs: Sequence[Any]) -> EngineKey:
    """The engine key of a call: the layouts of ``inputs``, every argument but the frozen
    weights. Those are left out: this runs on every call, a model passes hundreds of them (a
    22-layer decoder: 200 of its 250 arguments), and the engine itself checks each one's
    identity and version (and raises ``WeightLayoutChanged`` when a new one has another layout)."""
    if all(map(isinstance, inputs, itertools.repeat(torch.Tensor))):
        # tensors only (nearly every call): one C-level pass per field, not a Python loop over
        # the inputs (a decoder's 44 KV caches: ~25 us a call); the same tuples as below
        return EngineKey(zip(map(_SHAPE, inputs), map(torch.Tensor.stride, inputs), map(_DTYPE, inputs),
                             map(_DEVICE, inputs), map(_REQUIRES_GRAD, inputs)))
    return EngineKey([(a.shape, a.stride(), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor)
                      else a if isinstance(a, (int, float, bool)) else type(a) for a in inputs])


def _describe(args: Sequence[Any]) -> str:
    shapes = [("x".join(map(str, a.shape)) or "scalar") + f":{str(a.dtype).replace('torch.', '')}"
              for a in args if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]
    return ", ".join(shapes[:6]) + (" …" if len(shapes) > 6 else "")


__all__ = ["CompiledGraph", "preserve_rng"]
