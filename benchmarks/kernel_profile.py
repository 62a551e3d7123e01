"""Where a compiled model's GPU time goes, kernel by kernel, for several peers side by side.

    python -m benchmarks.kernel_profile --case resnet50:1 \
        --peers "inductor,compile_backend[cuda_graphs=off]" --out $OUT/profile.json

For each peer (same syntax as ``python -m compile_backend bench``), in one process, fp16: compile, warm up,
then ``torch.profiler`` over ``--calls`` calls. The GPU kernels are grouped by name and
reported per call: time, count, share. Run peers without CUDA graphs (Inductor's default mode
has the kernels of ``reduce-overhead``; ``compile_backend[cuda_graphs=off]`` those of our
default): kernel durations do not depend on how they were launched, and the profiler sees
each kernel only outside a graph. ``sum_kernels_ms`` per call against the graph-replayed
latency says whether a model is bound by its kernels or by the gaps between them.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import torch

from compile_backend.bench.cli import load_model
from compile_backend.bench.measure import (compile_peer, fresh_compiler_caches, make_call, peer_options,
                                           to_device)
from compile_backend.bench.peers import PRECISIONS, parse_options, parse_peers, split_peer
from compile_backend.bench.results import ResultsFile, environment

from . import real_models


def log(message: str) -> None:
    print(f"[kernel_profile] {message}", file=sys.stderr, flush=True)


def profile_peer(peer: str, model, inputs, args, user_options: Dict[str, Any], cache_dir: str) -> Dict[str, Any]:
    options = peer_options(peer, args.precision, user_options, cache_dir)
    report = None
    if split_peer(peer)[0] == "compile_backend":
        # our peer with a Report attached: which groups ran in which implementation
        from compile_backend.backend import compile_backend
        from compile_backend.report import Report

        report = Report()
        fn = torch.compile(model, backend=lambda gm, ex: compile_backend(gm, ex, options=options, report=report))
    else:
        fn = compile_peer(peer, model, {k: v for k, v in options.items() if k != "mode"})
    call = make_call(peer, fn, inputs)
    return {"peer": peer, "report": str(report) if report is not None else None,
            **profile_kernels(call, calls=args.calls, warmup=args.warmup, top=args.top)}


def profile_kernels(call, *, calls: int = 20, warmup: int = 10, top: int = 30) -> Dict[str, Any]:
    """GPU kernels of ``calls`` calls of ``call()`` under torch.profiler, grouped by name, per call."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(warmup):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
    per_kernel: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name
        if name.startswith(("Memcpy", "Memset")) or "cudaGraph" in name:
            continue
        per_kernel[name][0] += event.device_time_total  # a kernel event: its own duration, us
        per_kernel[name][1] += 1
    rows = sorted(((n, t / calls / 1000.0, c / calls) for n, (t, c) in per_kernel.items()),
                  key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"sum_kernels_ms": total, "kernels_per_call": sum(r[2] for r in rows),
            "top": [{"kernel": n[:160], "ms": ms, "count": c, "share": ms / total if total else 0.0}
                    for n, ms, c in rows[:top]]}


def format_profile(record: Dict[str, Any]) -> str:
    lines = [f"{record['peer']}: {record['sum_kernels_ms']:.3f} ms of kernels per call, "
             f"{record['kernels_per_call']:.0f} kernels"]
    for r in record["top"]:
        lines.append(f"  {r['ms'] * 1000:8.1f} us  x{r['count']:<4.0f} {100 * r['share']:5.1f}%  {r['kernel'][:110]}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_profile", description=__doc__.split("\n")[0])
    p.add_argument("--case", default="resnet50:1",
                   help="model:batch, the model a zoo name or one of benchmarks.real_models.REAL (hf_bert, ...)")
    p.add_argument("--peers", default="inductor,compile_backend[cuda_graphs=off]")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16")
    p.add_argument("--size", choices=("tiny", "base"), default="base")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--options", default=None, help="compile_backend options (cache_dir, autotune...)")
    p.add_argument("--out", default=None)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        log("needs a CUDA device")
        return 2
    import tempfile

    name, batch = args.case.rsplit(":", 1)
    if name in real_models.REAL:  # a model no one here wrote (transformers / torchvision)
        absent = real_models.missing_packages(name)
        if absent:
            log(f"{name}: skipped, {', '.join(absent)} not installed")
            return 0
        name = real_models.model_spec(name)
    model, inputs, _ = load_model(name, args.size, int(batch), "cuda", 0)
    dtype = PRECISIONS[args.precision]
    model = model.to(dtype)
    inputs = tuple(to_device(t, "cuda", dtype) for t in inputs)
    user = parse_options(args.options)
    results = ResultsFile(args.out)
    env = environment("cuda", commit=args.commit)
    records = []
    for peer in parse_peers(args.peers):
        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as tmp, fresh_compiler_caches(tmp):
            cache_dir = user.get("cache_dir", tmp)
            record = profile_peer(peer, model, inputs, args, user, cache_dir)
        record.update(case=args.case, precision=args.precision, kind="kernel_profile", **env)
        records.append(record)
        print(format_profile(record), flush=True)
        results.write(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
