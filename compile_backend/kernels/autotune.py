"""Generic auto-tuner: pick the fastest of several candidate implementations of one problem.

Any template (GEMM, convolution, later pointwise / reduction / attention launch parameters)
describes its problem as a :class:`TuningKey` and its options as :class:`Candidate` s, ordered
by the template's own heuristic (the first is what runs with tuning off), and calls
``Tuner.choose(key, candidates, make_inputs)``.

What the tuner does, by ``Options.autotune``:
- ``"off"``: the first candidate that compiles (on CUDA: and runs once) wins; nothing timed.
- ``"fast"`` / ``"max"``: candidates are compiled in parallel (a thread pool; Triton's compile
  is the slow part), then each is timed with CUDA events: warm-up, then the median of repeats,
  the inputs rotated over enough copies that L2 does not flatter small problems. The repeats
  replay the candidate's calls captured in CUDA graphs (as the engine runs them), which spares
  the host's Python of each launch; a call that cannot be captured is timed as launched
  (the timers: ``timers.py``). A candidate
  that fails to compile or to run (e.g. out of shared memory) is skipped with a debug log.
- ``Tuner.precompile(tunings)``: the candidates of several problems compiled at once, in one
  wider pool, before any is timed (a quantized engine's layer probes: one problem at a time
  keeps at most its own 7-13 compiles in flight on a 16-core machine); each problem's
  ``choose`` then times the runners already built.
- a number of seconds: a budget for the whole graph, shared by every ``choose`` of one tuner;
  candidates are timed in heuristic order until it runs out, then the best so far wins.
- on CPU (the Triton interpreter) there is nothing worth timing: the heuristic choice wins,
  unless the tuner was given a timer explicitly (tests do, to exercise the timing path).

Winners go to the timing store the context carries (``cache.timing.TimingCache``); a later process with the same key
compiles only the cached winner and reports ``from_cache=True``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import compile_pool
from .base import triton_interpret, tuning_level
from .timers import CudaEventTimer, release_graphs, replay


log = logging.getLogger("compile_backend")

#: how thorough a level is; a cached winner is reused when it was tuned at least as thoroughly
LEVEL_RANK = {"off": 0, "budget": 1, "fast": 2, "max": 3}
#: threads of ``Tuner.precompile``'s pool at most (one a core below that): compiling is mostly
#: outside the GIL (LLVM, ptxas), and threads scaled as processes did (session 19's notes)
PRECOMPILE_WORKERS = 16


def default_compile_processes() -> int:
    """Compile worker processes when the caller names none: one a core but one, at most
    :data:`PRECOMPILE_WORKERS`; 0 on a machine of 2 cores or fewer (the workers' start would
    not pay)."""
    cores = os.cpu_count() or 1
    return min(PRECOMPILE_WORKERS, cores - 1) if cores > 2 else 0


@dataclasses.dataclass(frozen=True)
class TuningSettings:
    """Timing effort per level: repeats are chosen to fill ``target_ms``, within bounds."""

    min_reps: int
    max_reps: int
    target_ms: float

    def __post_init__(self) -> None:
        if not (1 <= self.min_reps <= self.max_reps) or self.target_ms <= 0:
            raise ValueError(f"invalid tuning settings {self}")


#: a launch costs the tuner the larger of its GPU time and the host's time to queue it (our
#: templates' runners: ~270 us a call, ResNet-50 b32 on the H100, session 23), so ``target_ms``
#: is wall time; "fast" took 30 launches of every candidate until session 23 (15 ms of target)
SETTINGS = {
    "fast": TuningSettings(min_reps=5, max_reps=20, target_ms=10.0),
    "budget": TuningSettings(min_reps=5, max_reps=20, target_ms=10.0),
    "max": TuningSettings(min_reps=10, max_reps=100, target_ms=60.0),
}


@dataclasses.dataclass(frozen=True)
class TuningKey:
    """What makes two tuning problems the same. Everything here must be JSON-able."""

    kind: str  # gemm | conv | pointwise | ...
    template: str  # hash of the generated source the candidates share
    shapes: Tuple[Tuple[int, ...], ...]
    strides: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[str, ...]
    extra: str = ""  # epilogue signature, precision, anything else that changes the winner

    def as_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def describe(self) -> str:
        shapes = " ".join("x".join(map(str, s)) for s in self.shapes)
        return f"{self.kind} [{shapes}] {','.join(sorted(set(self.dtypes)))}"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run the problem.

    config: JSON-able parameters that identify the candidate across processes (stored in the
        timing cache as the winner).
    compile: builds the candidate and returns ``runner(*inputs)``; may raise (skipped).
    """

    name: str
    config: Mapping[str, Any]
    compile: Callable[[], Callable[..., Any]]
    impl: str = "triton"
    # timed beside the others and recorded in the timings, never chosen: a yardstick such as
    # the float GEMM a quantized layer replaces (its time says whether quantizing paid off)
    reference: bool = False

    def config_json(self) -> Any:
        return json.loads(json.dumps(dict(self.config), sort_keys=True))


@dataclasses.dataclass
class Choice:
    candidate: Candidate
    runner: Callable[..., Any]
    from_cache: bool = False
    timings_ms: Dict[str, float] = dataclasses.field(default_factory=dict)
    tuned: bool = False  # candidates were timed in this process


class TuningBudget:
    """Seconds left for tuning, shared by every group of a graph."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"tuning budget must be positive, got {seconds}")
        self.seconds = float(seconds)
        self._deadline: Optional[float] = None

    def start(self) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.seconds

    def remaining(self) -> float:
        self.start()
        return max(0.0, self._deadline - time.monotonic())

    @property
    def exhausted(self) -> bool:
        return self.remaining() <= 0.0


# --------------------------------------------------------------------------- timers (timers.py)
#: a candidate's host time per call counted as slow in ``Tuner.stats["slow_hosts"]``
SLOW_HOST_S = 100e-6


def current_environment(device: Any = None) -> Dict[str, str]:
    """What a timing depends on besides the problem itself: the GPU and the software stack."""
    import torch

    env = {"torch": torch.__version__, "triton": _version("triton"), "compile_backend": _version("compile_backend")}
    if device is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["arch"] = f"sm_{props.major}{props.minor}"
    else:
        env["gpu"] = "cpu"
        env["arch"] = "cpu"
    return env


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        if package == "triton":
            try:
                import triton

                return triton.__version__
            except Exception:
                return "none"
        return "dev"


# --------------------------------------------------------------------------- tuner
class Tuner:
    """Chooses among candidates; one instance per compilation so a seconds budget is shared."""

    def __init__(
        self,
        autotune: Any = "fast",
        cache: Any = None,  # a timing store with get(key, env) / put(key, env, record): cache.timing.TimingCache
        device: Optional[torch.device] = None,
        progress: Optional[Callable[[str], None]] = None,
        timer: Any = None,
        compile_workers: Optional[int] = None,
        compile_processes: Optional[int] = None,
        progress_after_s: float = 2.0,
    ):
        self.level = tuning_level(autotune)
        self.budget = TuningBudget(float(autotune)) if self.level == "budget" else None
        self.cache = cache
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.progress = progress
        on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        # without a device to time on (CPU / interpreter) tuning would only measure Python
        self.timer = timer if timer is not None else (CudaEventTimer() if on_cuda else None)
        self.compile_workers = compile_workers or max(1, min(8, os.cpu_count() or 1))
        # Triton compiles in this many worker processes (compile_pool; 0 or 1: in this process)
        self.compile_processes = (default_compile_processes() if compile_processes is None
                                  else max(0, int(compile_processes)))
        self.progress_after_s = progress_after_s  # tunings shorter than this print nothing
        self.settings = SETTINGS.get(self.level, SETTINGS["fast"])
        self.env = current_environment(self.device)
        # of "seconds": spin_seconds, the GPU's spins before each timed launch (CudaEventTimer);
        # inputs_seconds, making each problem's input sets; warmup_seconds, each candidate's
        # first launches and host-time probe (module loading, vendor heuristics) before its reps;
        # spin_fallbacks, the measurements timed again with a spin before each launch;
        # spin_rebatches, those timed again behind one longer spin (CudaEventTimer), and
        # behind_queue_ratio the median queueing a launch over the probed host time of the
        # batches that fell behind;
        # host_seconds, the host time of one call summed over the candidates timed (what the
        # spins cover: ~270 us a call on average at ResNet-50 b32, H100 session 23, where our
        # runners' own Python, the launch stubbed, took ~20 us on the CI machine), slow_hosts
        # those over SLOW_HOST_S; captured, the candidates timed as replays of CUDA graphs
        # (CudaEventTimer.captured), capture_failures those timed as launched instead;
        # pool_kernels, the Triton kernels recorded for the compile workers (compile_pool),
        # pool_compiled / pool_failed their outcome there, pool_seconds recording + compiling,
        # pool_record_seconds the recording alone; async_kernels / async_seconds, those of them
        # compiled asynchronously (precompile_async) and the workers' time on them;
        # stream_wait_seconds, what choose waited for a streamed problem's kernels
        self.stats = {"tuned": 0, "from_cache": 0, "heuristic": 0, "candidates_timed": 0, "seconds": 0.0,
                      "precompile_seconds": 0.0, "spin_seconds": 0.0, "inputs_seconds": 0.0,
                      "warmup_seconds": 0.0, "spin_fallbacks": 0, "spin_rebatches": 0, "behind_queue_ratio": 0.0,
                      "host_seconds": 0.0, "slow_hosts": 0, "captured": 0, "capture_failures": 0,
                      "pool_kernels": 0, "pool_compiled": 0, "pool_failed": 0, "pool_seconds": 0.0,
                      "pool_record_seconds": 0.0, "async_kernels": 0, "async_seconds": 0.0,
                      "async_pending": 0, "stream_wait_seconds": 0.0}
        # batches compile_pool.precompile_async is compiling; their stats join self.stats once done
        self._async: List[concurrent.futures.Future] = []
        # problems precompile_async(each=True) is compiling: {key: (its stream, its group)}
        self._streamed: Dict[TuningKey, Tuple[Any, int]] = {}
        # runners (None: failed to compile) that precompile built, by (key, candidate name):
        # each is taken by the first tuning of its key
        self._prebuilt: Dict[Tuple[TuningKey, str], Optional[Callable]] = {}

    @property
    def times(self) -> bool:
        return self.timer is not None and self.level != "off"

    @property
    def compiles_ahead(self) -> bool:
        """Whether :meth:`precompile` compiles anything (it times, without a seconds budget)."""
        return self.times and self.budget is None

    def choose(self, key: TuningKey, candidates: Sequence[Candidate], make_inputs: Callable[[], Sequence[Any]]) -> Choice:
        if not any(not c.reference for c in candidates):
            raise ValueError(f"no candidates to choose from for {key.describe()}")
        if not self.times:
            return self._heuristic(key, candidates, make_inputs)
        cached = self._from_cache(key, candidates)
        if cached is not None:
            return cached
        if self.budget is not None and self.budget.exhausted:
            return self._heuristic(key, candidates, make_inputs)
        return self._tune(key, candidates, make_inputs)

    def precompile(self, tunings: Sequence[Tuple[TuningKey, Sequence[Candidate]]],
                   workers: Optional[int] = None) -> int:
        """Compile the candidates of every problem in ``tunings`` that the next ``choose`` of its
        key would compile (it times; not cached; not built already), all in one pool of
        ``workers`` threads (default: one a core, at most :data:`PRECOMPILE_WORKERS`), so a
        dozen problems of a dozen candidates keep every core busy; returns how many compiled."""
        if not self.compiles_ahead:
            return 0  # a seconds budget tunes in heuristic order until spent: nothing compiled ahead
        todo = []
        for key, candidates in tunings:
            if self._cached_record(key) is not None:
                continue  # a cache hit compiles its winner only
            todo += [(key, c) for c in candidates if (key, c.name) not in self._prebuilt]
        todo = list({(key, c.name): (key, c) for key, c in todo}.values())
        if not todo:
            return 0
        t0 = time.monotonic()
        workers = workers or max(1, min(PRECOMPILE_WORKERS, os.cpu_count() or 1))
        built = self._build_each(todo, workers)
        self._prebuilt.update({(key, c.name): r for (key, c), r in zip(todo, built)})
        took = time.monotonic() - t0
        self.stats["precompile_seconds"] += took
        if took >= self.progress_after_s:
            self._say(f"compiled {len(todo)} candidates of {len({key for key, _ in todo})} problems "
                      f"in {took:.1f}s ({workers} threads)")
        return sum(r is not None for r in built)

    def precompile_async(self, tunings: Sequence[Tuple[TuningKey, Sequence[Candidate]]], each: bool = False) -> int:
        """Start compiling the Triton kernels of the candidates :meth:`precompile` would build for
        ``tunings``, in the worker processes, and return at once: the problems a caller may ask
        next compile while this thread times others (the quantize pass's producer groups, while
        the layer probes are timed: in ResNet-50 b32 INT8's first call those compiles, 4.3 s,
        started only after the probes' 3.7 s of timing, H100 session 27). Nothing is built
        here; the later build loads the kernels from Triton's binary cache (the workers finish
        this batch before compiling another).
        ``each``: the problems compile in the order given, and :meth:`choose` of one waits for
        its own kernels only, not the batch (the layer probes: their 4.3-4.7 s of compiling
        came before their 3.4-3.5 s of timing, ResNet-50 b32 INT8 / FP8, H100 session 29).
        Only on CUDA with compile processes; returns how many candidates were recorded."""
        if not self.compiles_ahead or self.compile_processes < 2 or self.device.type != "cuda" or triton_interpret():
            return 0
        self.collect_async()
        todo = []
        for key, candidates in tunings:
            if self._cached_record(key) is None:
                todo += [(key, c) for c in candidates if c.impl == "triton" and (key, c.name) not in self._prebuilt]
        todo = list({(key, c.name): (key, c) for key, c in todo}.values())
        index = cuda_index(self.device)
        keys = list(dict.fromkeys(key for key, _ in todo)) if each else [None]
        stream = compile_pool.precompile_groups_async(
            [[functools.partial(self._build, index, item) for item in todo if not each or item[0] == key] for key in keys],
            self.compile_processes)
        if stream is None:
            return 0
        self._async.append(stream.future)
        if each:
            self._streamed.update({key: (stream, i) for i, key in enumerate(keys)})
        return len(todo)

    def collect_async(self, wait: bool = False) -> None:
        """Add the stats of the batches compiled asynchronously that have finished (``wait``:
        after waiting for every one; ``async_pending``: those still compiling)."""
        for future in [f for f in self._async if wait or f.done()]:
            self._async.remove(future)
            got = future.result()
            self.stats["async_kernels"] += int(got["kernels"])
            self.stats["async_seconds"] += got["compile_seconds"]
            self.stats["pool_record_seconds"] += got["record_seconds"]
        self.stats["async_pending"] = len(self._async)

    # ------------------------------------------------------------------ paths
    def _heuristic(self, key: TuningKey, candidates: Sequence[Candidate], make_inputs) -> Choice:
        probe_inputs = None
        for cand in candidates:
            if cand.reference:
                continue
            try:
                runner = cand.compile()
                if self.device.type == "cuda":  # resource errors show only at launch
                    probe_inputs = probe_inputs if probe_inputs is not None else make_inputs()
                    runner(*probe_inputs)
                    torch.cuda.synchronize()
            except Exception as exc:
                log.debug("compile_backend: candidate %s for %s skipped: %s", cand.name, key.describe(), exc)
                continue
            self.stats["heuristic"] += 1
            return Choice(cand, runner)
        raise RuntimeError(f"every candidate failed for {key.describe()}")

    def _cached_record(self, key: TuningKey) -> Optional[Dict[str, Any]]:
        """The timing cache's record of ``key``, if tuned at least as thoroughly as this level."""
        if self.cache is None:
            return None
        record = self.cache.get(key.as_dict(), self.env)
        if record is None or LEVEL_RANK.get(record.get("level"), 0) < LEVEL_RANK[self.level]:
            return None
        return record

    def _from_cache(self, key: TuningKey, candidates: Sequence[Candidate]) -> Optional[Choice]:
        record = self._cached_record(key)
        if record is None:
            return None
        for cand in candidates:
            if not cand.reference and cand.config_json() == record.get("winner"):
                try:
                    runner = cand.compile()
                except Exception as exc:
                    log.debug("compile_backend: cached winner %s no longer compiles: %s", cand.name, exc)
                    return None
                self.stats["from_cache"] += 1
                return Choice(cand, runner, from_cache=True, timings_ms=dict(record.get("timings_ms", {})))
        return None  # the winner is not among today's candidates: tune again

    def _tune(self, key: TuningKey, candidates: Sequence[Candidate], make_inputs) -> Choice:
        t0 = time.monotonic()
        if self.budget is not None:
            self.budget.start()
        label = key.describe()
        runners = self._compile_all(key, candidates)
        compiled_s = time.monotonic() - t0  # said in the progress line: which half a slow tuning spent
        input_sets = self._input_sets(make_inputs)
        self.stats["inputs_seconds"] += time.monotonic() - t0 - compiled_s
        timings: Dict[str, float] = {}
        best: Optional[Tuple[float, Candidate]] = None
        chatty = False
        last_line = t0
        for i, cand in enumerate(candidates):
            runner = runners.get(cand.name)
            if runner is None:
                continue
            if self.budget is not None and self.budget.exhausted and best is not None and not cand.reference:
                break
            ms = self._time_one(key, cand, runner, input_sets)
            if ms is None:
                continue
            timings[cand.name] = ms
            if cand.reference:
                continue
            if best is None or ms < best[0]:
                best = (ms, cand)
            now = time.monotonic()
            # only long tunings earn progress lines, and at most one every few seconds
            if now - t0 >= self.progress_after_s and now - last_line >= self.progress_after_s:
                chatty, last_line = True, now
                self._say(f"tuning {label}: {i + 1}/{len(candidates)} candidates, best {best[0]:.4f} ms ({best[1].name})")
        self.stats["seconds"] += time.monotonic() - t0
        self.stats["spin_seconds"] = round(getattr(self.timer, "spin_s", 0.0), 3)
        self.stats["spin_fallbacks"] = getattr(self.timer, "fallbacks", 0)
        self.stats["spin_rebatches"] = getattr(self.timer, "rebatches", 0)
        self.stats["capture_failures"] = getattr(self.timer, "capture_failures", 0)
        ratios = sorted(getattr(self.timer, "behind_ratios", ()))
        self.stats["behind_queue_ratio"] = round(ratios[len(ratios) // 2], 2) if ratios else 0.0
        if best is None:
            raise RuntimeError(f"every candidate failed for {label}")
        winner = best[1]
        if chatty:
            self._say(f"tuned {label}: {winner.name} {best[0]:.4f} ms in {time.monotonic() - t0:.1f}s "
                      f"({compiled_s:.1f}s compiling {len(runners)} of {len(candidates)} candidates)")
        self.stats["tuned"] += 1
        self.stats["candidates_timed"] += len(timings)
        if self.cache is not None:
            try:
                self.cache.put(key.as_dict(), self.env, {
                    "winner": winner.config_json(), "name": winner.name, "impl": winner.impl,
                    "level": self.level, "timings_ms": timings,
                })
            except OSError as exc:
                log.warning("compile_backend: could not write timing cache: %s", exc)
        return Choice(winner, runners[winner.name], timings_ms=timings, tuned=True)

    def _compile_all(self, key: TuningKey, candidates: Sequence[Candidate]) -> Dict[str, Callable]:
        runners = {c.name: self._prebuilt.pop((key, c.name)) for c in candidates if (key, c.name) in self._prebuilt}
        todo = [(key, c) for c in candidates if c.name not in runners]
        streamed = self._streamed.pop(key, None)
        if streamed is not None and todo:
            t0 = time.monotonic()
            streamed[0].wait(streamed[1], compile_pool.JOB_TIMEOUT_S)  # its kernels, not the batch's
            self.stats["stream_wait_seconds"] += time.monotonic() - t0
        built = self._build_each(todo, self.compile_workers, pool=streamed is None)
        runners.update({c.name: r for (_, c), r in zip(todo, built)})
        return {c.name: runners[c.name] for c in candidates if runners.get(c.name) is not None}

    @staticmethod
    def _build(index: Optional[int], item: Tuple[TuningKey, Candidate]) -> Optional[Callable]:
        """``item``'s runner (None: it failed to compile), on CUDA device ``index``."""
        key, cand = item
        try:
            if index is not None:  # a worker thread has no current CUDA context:
                torch.cuda.set_device(index)  # cuBLAS warned and guessed the primary one
            return cand.compile()
        except Exception as exc:
            log.debug("compile_backend: candidate %s for %s failed to compile: %s", cand.name, key.describe(), exc)
            return None

    def _build_each(self, todo: Sequence[Tuple[TuningKey, Candidate]], workers: int,
                    pool: bool = True) -> List[Optional[Callable]]:
        """Each candidate's runner (None: it failed to compile), built on ``workers`` threads
        (``pool``: after the compile workers compiled their kernels, unless streamed there)."""
        build = functools.partial(self._build, cuda_index(self.device))

        # Compiling a candidate may run it (on CUDA, ``template.warmed``). Under TRITON_INTERPRET=1
        # (CUDA tensors included) kernels run in Triton's interpreter, whose state is process-wide:
        # two threads in it at once fail each other (InterpreterError), and every candidate but
        # one or two was dropped as "failed to compile". So one at a time there.
        if workers <= 1 or len(todo) <= 1 or triton_interpret():
            return [build(item) for item in todo]
        if pool and self.compile_processes > 1 and self.device.type == "cuda":
            # worker processes (every core but one, no GIL shared) fill Triton's binary cache
            # first; the threads below then load from it (compile_pool's docstring: measured)
            got = compile_pool.precompile([functools.partial(build, item) for item in todo if item[1].impl == "triton"],
                                          self.compile_processes)
            for name in ("kernels", "compiled", "failed"):
                self.stats["pool_" + name] += int(got[name])
            self.collect_async()  # (its batches ran before this one)
            self.stats["pool_seconds"] += got["record_seconds"] + got["compile_seconds"]
            self.stats["pool_record_seconds"] += got["record_seconds"]
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(todo))) as pool:
            return list(pool.map(build, todo))

    def _input_sets(self, make_inputs) -> List[Sequence[Any]]:
        first = make_inputs()
        nbytes = sum(x.numel() * x.element_size() for x in first if isinstance(x, torch.Tensor))
        l2 = 0
        if self.device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 << 20)
        copies = 1 if nbytes == 0 else int(min(8, max(1, math.ceil(2 * l2 / nbytes))))
        return [first] + [make_inputs() for _ in range(copies - 1)]

    def _time_one(self, key: TuningKey, cand: Candidate, runner, input_sets) -> Optional[float]:
        t_warm = time.perf_counter()
        graphs = None
        try:
            runner(*input_sets[0])  # warm-up: lazy compile, autotune-free first launch
            self.timer.sync()
            t0 = time.perf_counter()  # the host time of a call, from two in a row
            runner(*input_sets[-1])
            runner(*input_sets[0])
            host_s = (time.perf_counter() - t0) / 2
            self.stats["host_seconds"] += host_s
            self.stats["slow_hosts"] += host_s > SLOW_HOST_S
            self.timer.sync()
            graphs = self.timer.captured(runner, input_sets) if hasattr(self.timer, "captured") else None
            if graphs:  # the captured calls are what is timed, at a replay's host time
                runner, input_sets = replay, [(g,) for g in graphs]
                t0 = time.perf_counter()
                replay(graphs[-1])
                replay(graphs[0])
                host_s = (time.perf_counter() - t0) / 2
                self.stats["captured"] += 1
            self.stats["warmup_seconds"] += time.perf_counter() - t_warm
            estimate = self.timer.measure(runner, input_sets, 2, host_s)
            per_run = max(min(estimate), host_s * 1e3, 1e-4)  # ms of wall a launch
            reps = int(min(self.settings.max_reps, max(self.settings.min_reps, self.settings.target_ms / per_run)))
            return statistics.median(self.timer.measure(runner, input_sets, reps, host_s))
        except Exception as exc:  # out of resources, illegal config, ...: skip, never crash
            log.debug("compile_backend: candidate %s for %s failed to run: %s", cand.name, key.describe(), exc)
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass
            return None
        finally:
            if graphs:
                release_graphs(graphs)

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
        else:
            print(f"[compile_backend] {message}", file=sys.stderr, flush=True)


def cuda_index(device: torch.device) -> Optional[int]:
    """The CUDA device index a worker thread should make current (None off CUDA). A bare
    ``cuda`` device means the caller's current one: ``torch.cuda.set_device`` refuses it (every
    quantized GEMM candidate on the H200 'failed to compile' for a context made with 'cuda')."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def start_compile_workers(options: Any, device: torch.device) -> None:
    """Start the compile workers a cold build on ``device`` will use (``Options.compile_processes``),
    so that their start overlaps the build's tracing and passes."""
    if device.type != "cuda" or triton_interpret() or tuning_level(options.autotune) == "off":
        return
    count = options.compile_processes
    compile_pool.start(default_compile_processes() if count is None else count)


def tuner_for(ctx: Any) -> Tuner:
    """The tuner of one compilation (a ``KernelContext``), created on first use and kept on it
    so that a seconds budget is shared by every group the context builds."""
    if ctx.tuner is None:
        ctx.tuner = Tuner(autotune=ctx.options.autotune, cache=ctx.timing_cache, device=ctx.device,
                          progress=ctx.progress, compile_processes=getattr(ctx.options, "compile_processes", None))
    return ctx.tuner
