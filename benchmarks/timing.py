"""GPU timing shared by the kernel benchmarks: calls replayed from one CUDA graph.

Launch overhead from Python (~15 us per launch on the H100) would swamp kernels of tens of
microseconds, so the calls are recorded once and replayed; L2 is flushed before each replay and
the calls are expected to rotate over input sets larger than L2 together, so no call finds its
inputs cached.
"""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch

_FLUSH_WORDS = 64 * 1024 * 1024  # 256 MiB of int32: more than any Hopper L2


def graph_median_ms(calls: Sequence[Callable[[], object]], reps: int = 25, warm_replays: int = 2) -> float:
    """Median time of one call (ms): all ``calls`` recorded into one CUDA graph, replayed
    ``reps`` times after an L2 flush, each replay's time divided by the number of calls."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    flush = torch.empty(_FLUSH_WORDS, dtype=torch.int32, device="cuda")
    for _ in range(warm_replays):
        graph.replay()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del graph, flush
    return float(statistics.median(times))
