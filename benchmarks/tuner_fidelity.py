"""Does a candidate take on the GPU, inside an engine's CUDA graph, the time the tuner measured?

Why (issue #18): on the H100 (session 15) BERT-base's float FFN1 group (``gelu(x @ W^T + b)``,
2048x3072x768) had two candidates the tuner timed within 2% (Triton GEMM + GELU 30.7 us, cuBLAS
+ ATen GELU 30.4) that took 33.3 and 25.6 us in the engine's graph, so our FP16 engine measured
1.047 or 1.127 ms by which one won, and an INT8 engine that quantized nothing ran 8% slower than
the FP16 one. This measures each candidate of a group four ways, side by side:

* ``tuner``: as ``autotune.Tuner`` does (a spin kernel before each launch, inputs rotated over
  copies larger than L2, median of the launches);
* ``graph``: ``LAYERS`` calls captured in one CUDA graph, one weight set per call (the layers of
  a model) and one x for all (a producer wrote it just before: in L2), per call;
* ``graph_cold_x``: the same with an x per call (x from memory, as the tuner reads it);
* ``graph_hot``: ``graph`` after 2 s of back-to-back replays (clocks and power under load).

Run on the GPU: ``python -m benchmarks.tuner_fidelity --out FILE [--cases bert_ffn1 ...]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from compile_backend.speed_check import cuda_event_ms

LAYERS = 12
CASES = {  # name: (M, N, K, epilogue)
    "bert_ffn1": (2048, 3072, 768, "gelu"),
    "bert_qkv": (2048, 2304, 768, "none"),
    "bert_ffn2": (2048, 768, 3072, "none"),
    "gpt2_ffn1": (4096, 3072, 768, "gelu"),
}


def layer_fn(epilogue: str) -> Callable:
    if epilogue == "gelu":
        return lambda x, w, b: F.gelu(F.linear(x, w, b))
    return lambda x, w, b: F.linear(x, w, b)


def graph_ms(runner, x_sets: Sequence, w_sets: Sequence, replays: int = 20, soak_s: float = 0.0) -> float:
    """Per-call microseconds of ``len(w_sets)`` calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i, w in enumerate(w_sets):  # warm-up outside the capture (lazy init, workspaces)
            runner(x_sets[i % len(x_sets)], *w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep = [runner(x_sets[i % len(x_sets)], *w) for i, w in enumerate(w_sets)]
    del keep
    end_soak = time.monotonic() + soak_s
    while time.monotonic() < end_soak:
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    times = [cuda_event_ms(graph.replay) * 1e3 / len(w_sets) for _ in range(replays)]
    return statistics.median(times)


def tuner_style_us(runner, input_sets: Sequence) -> float:
    """As ``autotune.Tuner`` times a candidate (``gemm_bench.bench_ms``: a spin kernel before
    each launch, sized by one call's host time; the median), in microseconds."""
    from benchmarks.gemm_bench import bench_ms

    return bench_ms(runner, input_sets, reps=50) * 1e3


def measure_case(name: str, dtype: torch.dtype, save: Callable[[List[Dict]], None]) -> List[Dict]:
    from compile_backend.kernels import gemm
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.template import traced_group
    from compile_backend.options import Options

    m, n, k, epilogue = CASES[name]
    dev = torch.device("cuda")

    def weights():
        return (torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5, torch.randn(n, device=dev, dtype=dtype))

    x0 = torch.randn(m, k, device=dev, dtype=dtype)
    group = traced_group(layer_fn(epilogue), (x0, *weights()), "gemm", "addmm")
    ctx = KernelContext(options=Options(autotune="max"), device=dev, interpret=False)
    tuning = gemm.gemm_candidates(group, ctx)
    w_sets = [weights() for _ in range(LAYERS)]
    x_cold = [torch.randn(m, k, device=dev, dtype=dtype) for _ in range(LAYERS)]
    rows, runners = [], {}
    for cand in tuning.candidates:
        row = {"case": name, "candidate": cand.name, "impl": cand.impl}
        try:
            runner = cand.compile()
            inputs = [tuning.make_inputs() for _ in range(8)]
            row["tuner_us"] = round(tuner_style_us(runner, inputs), 2)
            row["graph_us"] = round(graph_ms(runner, [x0], w_sets), 2)
            row["graph_cold_x_us"] = round(graph_ms(runner, x_cold, w_sets), 2)
            runners[cand.name] = runner
        except Exception as exc:  # a config this GPU cannot run: said, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(rows)  # a run cut short by its time limit keeps what it measured
    # under sustained load (2 s of replays first): the four fastest in the graph and by the tuner
    timed = [r for r in rows if "graph_us" in r]
    chosen = {r["candidate"] for key in ("graph_us", "tuner_us") for r in sorted(timed, key=lambda r: r[key])[:4]}
    for row in timed:
        if row["candidate"] in chosen:
            row["graph_hot_us"] = round(graph_ms(runners[row["candidate"]], [x0], w_sets, soak_s=2.0), 2)
            print(json.dumps({k: row[k] for k in ("candidate", "tuner_us", "graph_us", "graph_hot_us")}), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tuner_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cases", nargs="*", default=["bert_ffn1", "bert_qkv"], choices=list(CASES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tuner_fidelity needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.environ.get("COMMIT", "unknown"), "layers": LAYERS}
    done: List[Dict] = []

    def save(rows: List[Dict]) -> None:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": done + rows}, f, indent=1)

    for case in args.cases:
        done += measure_case(case, torch.float16, save)
        save([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
