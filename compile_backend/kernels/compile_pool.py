"""Triton compiles in worker processes, for the tuner's candidates.

Why: a candidate's Triton compile (~0.3-1 s of CPU) is LLVM and MLIR passes plus ptxas, and a
quantized engine's first call is mostly these compiles (ResNet-50 b32's INT8 one: 22 of its 34
s, H100, session 26). The tuner's threads hold the GIL for part of each compile (Triton 3.6,
sm_90, on a 2-core machine: four GEMM configs 1.51 s one after another, 1.40 s on two threads)
and were at most 8; processes take every core but one. Measured on one H100 host of 16 cores
(session 27): ResNet-50 b32's INT8 first call 26.2 s compiling in process, 20.8 s with 15
workers (its probes' 153 kernels 12.3 -> 8.2 s); the FP16 engine's 12.4 -> 12.8 s (8 threads
had already compiled its 82 kernels in 6.2 s; and, inferred from the pool's rates, not timed
apart: the first engine of a process waited ~1-2 s for the workers' start, which now begins
with the cold build).

How, in three steps (:func:`precompile`):

1. **record**: each candidate's build runs on this thread with Triton's ``jit_cache_hook``
   answering "skip" for this thread: the builds render their sources and make their warm-up
   launches as usual, and every kernel they would have compiled is recorded instead (its
   module, name and Triton's serialized specialization) and not launched;
2. **compile**: worker processes (fresh interpreters: no CUDA state inherited) load each kernel's
   module (generated source is shipped as text, ``launch.load_source``) and compile it with
   Triton's ``JITFunction.preload`` into the same binary cache directory;
3. the tuner's usual build then finds every kernel in that cache (a file read, not a compile).

Anything that fails here (a Triton without the hook, a worker that dies, a kernel that does not
compile) only costs the time spent: step 3 compiles whatever the cache lacks, as before. The
pool lives as long as the process (started at the first use, shut down at exit); the tuner's
``compile_processes`` (``Options.compile_processes``) sets its size, 0 disables it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

#: fewer kernels than this compile in this process (a pool's start, ~2-4 s of imports in each
#: worker, overlaps the recording but not a handful of compiles)
MIN_JOBS = 4
#: a worker silent this long on one kernel is taken for hung: the pool is dropped, the rest
#: compiles in this process (Triton's slowest compiles here took ~10 s: a TMA convolution)
JOB_TIMEOUT_S = 180.0

_LOCAL = threading.local()  # .jobs: the list the hook appends to on a recording thread
_HOOK_LOCK = threading.Lock()
_hook_state: Dict[str, Any] = {"users": 0, "previous": None}
_pool_lock = threading.Lock()
_pool: Dict[str, Any] = {"workers": [], "broken": False}
#: one batch of jobs on the workers at a time (their pipes carry one job each way in turn)
_run_lock = threading.Lock()
#: jobs the workers compiled in this process's life: sent again (a batch compiled
#: asynchronously, then the tuner's own build of the same candidates), they are skipped
_done: set = set()


@dataclasses.dataclass(frozen=True)
class Job:
    """One kernel to compile: its module (``source`` set for generated code), its name in the
    module, Triton's serialized specialization, the device index and binary cache directory."""

    module: str
    name: str
    specialization: str
    device: int
    cache_dir: Optional[str]
    source: Optional[str] = None


def _hook(**kwargs) -> Optional[bool]:
    jobs = getattr(_LOCAL, "jobs", None)
    if jobs is None:
        previous = _hook_state["previous"]
        return previous(**kwargs) if previous is not None else None
    fn, compile_args = kwargs["fn"], kwargs["compile"]
    jit_fn = fn.jit_function
    module = jit_fn.fn.__module__
    from .launch import generated_source

    jobs.append(Job(module=module, name=jit_fn.fn.__name__, specialization=compile_args["specialization_data"],
                    device=int(compile_args["device"]), cache_dir=_cache_dir(), source=generated_source(module)))
    return True  # skip: nothing compiles or launches on this thread now


def _cache_dir() -> Optional[str]:
    try:
        from triton import knobs

        return knobs.cache.dir
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_CACHE_DIR")


def record(builds: Sequence[Callable[[], Any]]) -> List[Job]:
    """Run ``builds`` on this thread with Triton's compiles recorded, not done (their launches
    skipped); the kernels they would have compiled, each once. A build that raises is skipped."""
    from triton import knobs

    with _HOOK_LOCK:
        if _hook_state["users"] == 0:
            _hook_state["previous"] = knobs.runtime.jit_cache_hook
            knobs.runtime.jit_cache_hook = _hook
        _hook_state["users"] += 1
    _LOCAL.jobs = jobs = []
    try:
        for build in builds:
            try:
                build()
            except Exception as exc:  # the real build (step 3) reports it
                log.debug("compile_backend: recording a build failed: %s", exc)
    finally:
        _LOCAL.jobs = None
        with _HOOK_LOCK:
            _hook_state["users"] -= 1
            if _hook_state["users"] == 0:
                knobs.runtime.jit_cache_hook = _hook_state["previous"]
                _hook_state["previous"] = None
    unique = {(j.module, j.name, j.specialization): j for j in jobs}
    return list(unique.values())


def compile_job(job: Job) -> Optional[str]:
    """In a worker: compile ``job`` into its cache directory; None, or why it failed."""
    try:
        if job.cache_dir:
            os.environ["TRITON_CACHE_DIR"] = job.cache_dir
            try:
                from triton import knobs

                knobs.cache.dir = job.cache_dir
            except (ImportError, AttributeError):
                pass
        if job.source is not None:
            from .launch import load_source

            module = load_source(job.source)
        else:
            module = importlib.import_module(job.module)
        if job.device:  # set_device creates a CUDA context (CUDA 12): only off device 0
            import torch

            torch.cuda.set_device(job.device)
        getattr(module, job.name).preload(job.specialization)
        return None
    except Exception as exc:  # the tuner's own build compiles it in-process
        return f"{job.module}.{job.name}: {type(exc).__name__}: {exc}"


class _Worker:
    """One compile process: pickled jobs in on its stdin, length-prefixed pickled answers out on
    a pipe of its own (its stdout is discarded: whatever Triton or torch print there cannot break
    the stream). A plain ``python -c`` subprocess, not multiprocessing's spawn, which would re-run
    the user's ``__main__`` script in every worker."""

    def __init__(self):
        read_fd, write_fd = os.pipe()
        code = ("import sys; sys.path[:0] = " + repr(list(sys.path)) + "; "
                "from compile_backend.kernels.compile_pool import serve; serve(" + str(write_fd) + ")")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, pass_fds=(write_fd,),
                                         stdout=subprocess.DEVNULL)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.answers = read_fd

    def ask(self, job: Job, timeout_s: float) -> Optional[str]:
        """The worker's answer to ``job``; raises TimeoutError past ``timeout_s`` (a hung
        compile), EOFError / BrokenPipeError if the worker died."""
        pickle.dump(job, self.proc.stdin)
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        size = int.from_bytes(self._read(4, deadline), "little")
        return pickle.loads(self._read(size, deadline))

    def _read(self, count: int, deadline: float) -> bytes:
        data = b""
        while len(data) < count:
            ready, _, _ = select.select([self.answers], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("a compile worker did not answer in time")
            chunk = os.read(self.answers, count - len(data))
            if not chunk:
                raise EOFError("a compile worker exited")
            data += chunk
        return data

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.answers)


def serve(answer_fd: int) -> None:
    """A worker's loop: a job from stdin, its answer (None or why it failed) to ``answer_fd``."""
    import triton  # noqa: F401  (imported before the first job: while the parent traces)

    from . import launch  # noqa: F401

    jobs = sys.stdin.buffer
    while True:
        try:
            job = pickle.load(jobs)
        except EOFError:
            return
        answer = pickle.dumps(compile_job(job))
        os.write(answer_fd, len(answer).to_bytes(4, "little") + answer)


def _workers(count: int) -> Optional[List[_Worker]]:
    """``count`` running workers (started where fewer run), or None where they cannot start
    (no ``pass_fds`` off POSIX, no processes left): then every compile stays in this process."""
    with _pool_lock:
        if _pool["broken"]:
            return None
        workers = _pool["workers"]
        try:
            while len(workers) < count:
                workers.append(_Worker())
        except Exception as exc:  # noqa: BLE001
            log.warning("compile_backend: could not start compile workers (%s: %s); compiling in this process",
                        type(exc).__name__, exc)
            _pool["broken"] = True
            return None
        return workers[:count]


def start(workers: int) -> None:
    """Start ``workers`` processes now (if fewer run), without waiting: each spends ~2-4 s
    importing torch and Triton, which a cold build's tracing and passes then hide."""
    if workers >= 2:
        _workers(workers)


def shutdown() -> None:
    """Stop the worker processes (also at exit); the next :func:`precompile` starts new ones."""
    with _pool_lock:
        for worker in _pool["workers"]:
            worker.close()
        _pool["workers"] = []


def _run(workers: List[_Worker], jobs: List[Job], finished: Optional[Callable[[Job], None]] = None
         ) -> List[Optional[str]]:
    """Each job's answer, the jobs shared out to the workers by one thread each (waiting on a
    pipe releases the GIL), in the order given; ``finished`` is told of each job as it ends."""
    answers: List[Optional[str]] = [None] * len(jobs)
    queue = list(enumerate(jobs))
    queue.reverse()
    lock = threading.Lock()

    def drain(worker: _Worker) -> None:
        while True:
            with lock:
                if not queue:
                    return
                i, job = queue.pop()
            answers[i] = worker.ask(job, JOB_TIMEOUT_S)
            if finished is not None:
                finished(jobs[i])

    with concurrent.futures.ThreadPoolExecutor(len(workers)) as threads:
        for done in [threads.submit(drain, w) for w in workers]:
            done.result()  # a dead worker raises here (EOFError, BrokenPipeError)
    return answers


class Stream:
    """A batch compiling asynchronously in groups (:func:`precompile_groups_async`): the
    workers take the groups' kernels in the order given, and :meth:`wait` returns as soon as one
    group's are compiled, so the caller can use that group while the workers go on with the rest
    (the quantize pass times each layer probe as its candidates are ready, instead of after all
    of them). ``future``: the batch's stats, as :func:`precompile`'s."""

    def __init__(self, groups: List[List[Job]]):
        self.groups = groups
        self.future: "concurrent.futures.Future[Dict[str, float]]" = concurrent.futures.Future()
        self._finished: set = set()
        self._over = False
        self._changed = threading.Condition()

    def finished(self, job: Job) -> None:
        with self._changed:
            self._finished.add(job)
            self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self._over = True
            self._changed.notify_all()

    def wait(self, group: int, timeout_s: Optional[float] = None) -> bool:
        """Wait until group ``group``'s kernels have compiled (or failed, or the batch ended: a
        kernel left out then compiles in the caller's build, as without the workers); False
        past ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._over or all(job in self._finished for job in self.groups[group]), timeout_s)


def precompile(builds: Sequence[Callable[[], Any]], workers: int) -> Dict[str, float]:
    """Compile the Triton kernels ``builds`` would compile in ``workers`` processes, into Triton's
    binary cache (steps 1-2 above); the builds themselves are not kept. Returns counts and
    seconds for the tuner's stats: kernels recorded, compiled, failed. A batch started
    asynchronously (:func:`precompile_async`) finishes on the workers first."""
    recorded = _recorded([builds], workers)
    if recorded is None:
        return _no_stats()
    pool, jobs_of, stats = recorded
    return _compile(pool, jobs_of[0], stats)


def precompile_async(builds: Sequence[Callable[[], Any]], workers: int
                      ) -> Optional["concurrent.futures.Future[Dict[str, float]]"]:
    """As :func:`precompile`, but only step 1 runs before it returns: the workers compile on a
    thread of this module's while the caller goes on (the quantize pass times its layer probes
    meanwhile). The future's result is :func:`precompile`'s stats; None where nothing was sent.
    A later :func:`precompile` waits for this batch (one batch on the workers at a time), and a
    kernel of it built in this process meanwhile is only compiled twice, never wrong: Triton
    writes each cache entry whole."""
    stream = precompile_groups_async([builds], workers)
    return None if stream is None else stream.future


def precompile_groups_async(groups: Sequence[Sequence[Callable[[], Any]]], workers: int) -> Optional[Stream]:
    """:func:`precompile_async` of the builds of every group, recorded group by group: the
    returned :class:`Stream` says when each group's kernels are compiled. A kernel two groups
    share compiles once, with the first. None where nothing was sent."""
    recorded = _recorded(groups, workers)
    if recorded is None or not any(recorded[1]):
        return None
    pool, jobs_of, stats = recorded
    stream = Stream(jobs_of)
    jobs = list(dict.fromkeys(job for group in jobs_of for job in group))

    def run() -> None:
        try:
            stream.future.set_result(_compile(pool, jobs, stats, stream.finished))  # _compile catches a worker's error
        finally:
            stream.end()

    threading.Thread(target=run, name="compile_backend-precompile-async", daemon=True).start()
    return stream


def _no_stats() -> Dict[str, float]:
    return {"kernels": 0, "compiled": 0, "failed": 0, "record_seconds": 0.0, "compile_seconds": 0.0}


def _recorded(groups: Sequence[Sequence[Callable[[], Any]]], workers: int):
    """Step 1 for the builds of each group: (the workers, the recorded jobs of each group, the
    stats so far), or None where the pool is not used (too few builds or workers, a pool that
    cannot start, a Triton that cannot record)."""
    stats = _no_stats()
    if workers < 2 or sum(len(group) for group in groups) < MIN_JOBS:
        return None
    pool = _workers(workers)  # started now: their imports overlap the recording
    if pool is None:
        return None
    t0 = time.monotonic()
    try:
        jobs_of = [record(group) for group in groups]
    except Exception as exc:  # e.g. a Triton without jit_cache_hook
        log.debug("compile_backend: could not record the candidates' kernels: %s", exc)
        return None
    stats["record_seconds"] = time.monotonic() - t0
    stats["kernels"] = len({job for jobs in jobs_of for job in jobs})
    return pool, jobs_of, stats


def _compile(pool: List[_Worker], jobs: List[Job], stats: Dict[str, float],
             finished: Optional[Callable[[Job], None]] = None) -> Dict[str, float]:
    """Step 2: the jobs on the workers, one batch at a time; counts and seconds into ``stats``;
    ``finished`` is told of each job as it ends (a job compiled before, at once)."""
    with _run_lock:
        t1 = time.monotonic()
        if finished is not None:
            for job in jobs:
                if job in _done:
                    finished(job)
        jobs = [job for job in jobs if job not in _done]
        try:
            for job, why in zip(jobs, _run(pool[:max(1, min(len(pool), len(jobs)))], jobs, finished) if jobs else []):
                stats["compiled" if why is None else "failed"] += 1
                if why is None:
                    _done.add(job)
                else:
                    log.debug("compile_backend: a worker could not compile %s", why)
        except Exception as exc:  # a worker died: compile in this process from now on
            log.warning("compile_backend: the compile workers failed (%s: %s); compiling in this process",
                        type(exc).__name__, exc)
            shutdown()
            with _pool_lock:
                _pool["broken"] = True
        stats["compile_seconds"] = time.monotonic() - t1
    return stats


import atexit  # noqa: E402

atexit.register(shutdown)

__all__ = ["MIN_JOBS", "JOB_TIMEOUT_S", "Job", "Stream", "record", "compile_job", "serve", "start", "precompile",
           "precompile_async", "precompile_groups_async", "shutdown"]
