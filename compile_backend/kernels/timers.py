"""How the tuner times a candidate's launches: on CUDA, :class:`CudaEventTimer` (CUDA events
around launches queued back to back behind a GPU spin, the calls captured in CUDA graphs and
replayed where they can be); on the CPU, :class:`WallClockTimer` (the host clock, for tests and
the interpreter). ``measure(runner, input_sets, reps, host_s)`` returns each launch's ms."""
from __future__ import annotations

import gc
import logging
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("compile_backend")


class CudaEventTimer:
    """Per-launch CUDA event timings with the host's launch overhead left out. A spin kernel
    keeps the GPU busy while the host queues the timed launches, each between two events, so
    the GPU runs them back to back as they would run in an engine; a launch the host queues
    after the GPU went idle would be timed with the GPU's wait for it (on the H200, session 8,
    the tuner once chose a 38 us GEMV config over a 12 us one that way).

    ``batched`` (the default): one spin for all of a measurement's launches, sized for the host
    time of queueing them (:func:`batch_spin_cycles`); if the spin has ended before the last
    launch was queued (``Event.query`` after queueing), the host fell behind. Where its queueing
    took longer than the host time it was sized for, by at most :data:`REBATCH_MAX_RATIO`, the
    batch is timed once more behind a spin sized for the queueing seen (``rebatches``); else,
    or behind again, with one spin before each launch (``fallbacks``). (ResNet-50 b32's INT8
    layer probes fell behind in 532 of ~1,800 batches, their spaced spins 15.5 s of a 78 s
    first call: H100, session 24.) ``batched=False``: always one spin before
    each launch, 4x the host time of one call (at least ~100 us, at most ~2 ms): what the tuner
    did until session 23, when these spins were 92% of every tuning's seconds (ResNet-50 b32's
    FP16 engine: 11.3 of 12.4 s, ~37 ms a candidate; H100). ``spin_s``: the seconds of spin
    queued so far (at 2 GHz), which the tuner reports; ``fallbacks``: the batches timed again."""

    def __init__(self, batched: bool = True, graphs: bool = True):
        self.batched = batched
        self.graphs = graphs
        self.spin_s = 0.0
        self.fallbacks = 0
        self.rebatches = 0
        self.capture_failures = 0
        self.behind_ratios: List[float] = []  # a fallen-behind batch's queueing a launch over its probed host time
        self._side: Optional[Any] = None  # the capture stream (cuBLAS keeps a workspace a handle and stream)
        self._failed_graphs: List[Any] = []  # failed captures' graphs, kept (see _end_failed_capture)

    def captured(self, runner: Callable, input_sets: Sequence[Sequence[Any]]) -> Optional[List[Any]]:
        """Each input set's call of ``runner`` captured in a CUDA graph (one memory pool), for
        the measurement to replay: a replay costs the host ~10 us where our templates' runners
        cost ~270 (their Python: binding, output allocation, Triton's launcher; H100, session 23),
        so the spins covering the host's queueing shrink with it; the engine runs its kernels in
        CUDA graphs too. None where a call cannot be captured (it synchronises, say): those
        launches are timed as they are, counted in ``capture_failures``. ``graphs=False``: never."""
        if not self.graphs or not input_sets:
            return None
        graphs: List[Any] = []
        self._side = side = self._side or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        pool = torch.cuda.graph_pool_handle()  # known before the capture: a failed one is ended by it
        graph = None
        try:
            with torch.cuda.stream(side):
                runner(*input_sets[0])  # on this stream once uncaptured: its workspaces, lazy inits
                for inputs in input_sets:
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                    try:
                        runner(*inputs)
                    finally:
                        graph.capture_end()
                    graphs.append(graph)
        except Exception as exc:  # noqa: BLE001  (timed uncaptured instead)
            log.debug("compile_backend: a candidate's call could not be captured (%s: %s); timed as launched",
                      type(exc).__name__, exc)
            self.capture_failures += 1
            release_graphs(graphs)
            graphs = []
            self._end_failed_capture(graph, pool)
        finally:
            torch.cuda.current_stream().wait_stream(side)
        return graphs or None

    def _end_failed_capture(self, graph: Any, pool: Any) -> None:
        """Undo what a failed capture leaves behind, and capture nothing more: torch (2.11-2.13)
        ends a capture's routing of allocations to its memory pool only after the capture ended
        well, so the caching allocator would go on consulting the dead capture (its frees deferred,
        its pool never released). Where torch has the hooks, the routing is ended and the pool
        released here; the graph object stays referenced (the host allocator's routing names it).
        (A GPU test runs a failed capture, then compiles and captures, in a process of its own.)"""
        self.graphs = False
        self._failed_graphs += [graph] if graph is not None else []
        end = getattr(torch._C, "_cuda_endAllocateToPool", None)
        release = getattr(torch._C, "_cuda_releasePool", None)
        try:
            torch.cuda.synchronize()
            if end is not None and release is not None:
                end(torch.cuda.current_device(), pool)
                release(torch.cuda.current_device(), pool)  # the failed capture's use of it
        except Exception as exc:  # noqa: BLE001  (best effort: the timing goes on uncaptured)
            log.debug("compile_backend: ending a failed capture's memory pool failed (%s: %s)", type(exc).__name__, exc)
        self._reset_generators()

    @staticmethod
    def _reset_generators() -> None:
        """Take the CUDA random generators out of capture mode: torch ends a generator's capture
        (``capture_epilogue``) only after a capture ended well, so after a failed one every
        random op raised "Offset increment outside graph capture encountered unexpectedly"
        (H100, session 27). A capture begins every registered generator's capture and a good
        end ends it: one tiny capture that ends well, released at once, does that."""
        try:
            scratch = torch.zeros(1, device="cuda")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(torch.cuda.Stream()):
                graph.capture_begin()
                scratch.add_(1)
                graph.capture_end()
            del graph
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            log.debug("compile_backend: resetting the generators after a failed capture failed (%s: %s)",
                      type(exc).__name__, exc)

    def measure(self, runner: Callable, input_sets: Sequence[Sequence[Any]], reps: int, host_s: float) -> List[float]:
        if self.batched:
            times, queued_s = self._batch(runner, input_sets, reps, host_s)
            ratio = queued_s / reps / (host_s + EVENTS_S)
            if times is None:
                self.behind_ratios.append(ratio)
            if times is None and 1.0 < ratio <= REBATCH_MAX_RATIO:
                # the host was a little slower than its two-call probe said: once more, behind a
                # spin sized for the queueing seen, with margin (a call that waits for the GPU
                # falls behind again, and is timed spaced)
                self.rebatches += 1
                times, _ = self._batch(runner, input_sets, reps, 1.5 * ratio * (host_s + EVENTS_S) - EVENTS_S)
            if times is not None:
                return times
            self.fallbacks += 1
        return self._spaced(runner, input_sets, reps, host_s)

    def _batch(self, runner, input_sets, reps: int, host_s: float) -> Tuple[Optional[List[float]], float]:
        """The launches back to back behind one spin: (their times, None when the host fell
        behind the spin; the host's seconds queueing them)."""
        spin = batch_spin_cycles(reps, host_s)
        self.spin_s += spin / SPIN_HZ
        spun = torch.cuda.Event()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        collecting = gc.isenabled()
        gc.disable()  # a collection of a large graph's objects mid-batch outlasts any spin
        try:
            torch.cuda._sleep(spin)
            spun.record()
            t0 = time.perf_counter()
            for i, (start, end) in enumerate(events):
                start.record()
                runner(*input_sets[i % len(input_sets)])
                end.record()
            queued_s = time.perf_counter() - t0
        finally:
            if collecting:
                gc.enable()
        behind = spun.query()  # the GPU finished the spin before the host queued the last launch
        torch.cuda.synchronize()
        return (None if behind else [s.elapsed_time(e) for s, e in events]), queued_s

    def _spaced(self, runner, input_sets, reps: int, host_s: float) -> List[float]:
        """One spin before each launch (4x one call's host time): slow, but the host is never behind."""
        spin = int(min(4e6, max(2e5, 4 * host_s * SPIN_HZ)))
        self.spin_s += reps * spin / SPIN_HZ
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            torch.cuda._sleep(spin)
            starts[i].record()
            runner(*input_sets[i % len(input_sets)])
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def sync(self) -> None:
        torch.cuda.synchronize()


def replay(graph: Any) -> None:
    """A runner of one captured call (:meth:`CudaEventTimer.captured`)."""
    graph.replay()


def release_graphs(graphs: Sequence[Any]) -> None:
    """Free captured calls' graphs and their memory pool."""
    torch.cuda.synchronize()
    for graph in graphs:
        graph.reset()


#: the clock ``torch.cuda._sleep``'s cycles are counted in, roughly (H100 / H200 SMs: ~2 GHz)
SPIN_HZ = 2e9


#: the host seconds of a timed launch's two event records, beside the call's own
EVENTS_S = 10e-6
#: a batch the host fell behind is timed again behind a longer spin only where its queueing was
#: at most this many times the probed host time: that spin (1.25 x 1.5 x the queueing) is then
#: shorter than the spaced spins (4x the probed time a launch). Rebatching every such batch cost
#: ResNet-50 b32's INT8 probes 19.6 s of spin against 15.5 spaced (716 batches; H100, session 25)
REBATCH_MAX_RATIO = 2.0


def batch_spin_cycles(reps: int, host_s: float) -> int:
    """Spin cycles covering the host's queueing of ``reps`` timed launches: each costs one
    call's host time (``host_s``) plus two event records (~10 us), with a quarter again as
    margin and 50 us for the spin's own launch; at least ~100 us. (With half again, none of
    ResNet-50 b32's ~900 measurements fell behind, and the spins were still 80% of tuning time:
    H100, session 23; a batch that falls behind is timed again, see :class:`CudaEventTimer`.)"""
    return int(max(2e5, (1.25 * reps * (host_s + EVENTS_S) + 50e-6) * SPIN_HZ))


class WallClockTimer:
    """Host-clock timings, for CPU runs (the interpreter) where there are no device events."""

    def measure(self, runner: Callable, input_sets: Sequence[Sequence[Any]], reps: int, host_s: float) -> List[float]:
        out = []
        for i in range(reps):
            t0 = time.perf_counter()
            runner(*input_sets[i % len(input_sets)])
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def sync(self) -> None:
        pass
