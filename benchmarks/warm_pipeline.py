"""Our pipeline's time on an engine-cache hit against a cold compile (issue #17's warm start).

    python -m benchmarks.warm_pipeline --models bert gpt2 --size base --device cpu

Per model, a fresh cache directory and two child processes, one after the other (as
``benchmarks.startup``): *cold* compiles into the empty directory, *warm* is a new process on
the same directory (an engine-cache hit). Each child compiles the model twice (the second time
after ``torch._dynamo.reset()``, a hit in both children) and records ``GraphReport.compile_s``
summed over graphs: our pipeline alone (no Dynamo trace, no AOTAutograd, no first run).

On a CPU without Triton (``TRITON_INTERPRET=0``, fp32) every group runs through ATen, so what is
measured is the pipeline itself: specialise/freeze/passes (or reading the stored graph),
partitioning, kernel choice, memory plan, engine. The engine cache is off on such a device in
the product (nothing to tune or generate); the child sends the compile through
``pipeline.compile_with_cache`` so that the cache path is what gets timed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

_TAG = "WARM_PIPELINE_JSON "
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> int:
    import torch

    from compile_backend import pipeline, zoo
    from compile_backend.backend import compile_backend
    from compile_backend.cache import EngineCache
    from compile_backend.report import Report

    if hasattr(pipeline, "compile_with_cache"):  # older checkouts cache on every device instead
        store = EngineCache(args.cache_dir)

        def through_cache(aten_gm, graph_args, **kw):
            return pipeline.compile_with_cache(store, aten_gm, graph_args, **kw)

        pipeline.compile_graph_cached = through_cache
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.precision]
    model, inputs = zoo.get(args.model, args.size, batch=args.batch, dtype=dtype, device=args.device)
    rounds = []
    for _ in range(2):
        torch._dynamo.reset()
        report = Report()
        compiled = torch.compile(model, backend=lambda gm, ex, **kw: compile_backend(gm, ex, report=report, **kw),
                                 options={"cache_dir": args.cache_dir, "precision": args.precision})
        start = time.perf_counter()
        with torch.no_grad():
            compiled(*inputs)
        rounds.append({"first_call_s": time.perf_counter() - start,
                       "pipeline_s": sum(g.compile_s for g in report.graphs),
                       "engine": [g.cache.get("engine") for g in report.graphs],
                       "passes": [g.cache.get("passes") for g in report.graphs],
                       "graph": [g.cache.get("graph_reason", g.cache.get("graph")) for g in report.graphs]})
    print(_TAG + json.dumps({"rounds": rounds}), flush=True)
    return 0


def run_child(model: str, cache_dir: str, args) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.warm_pipeline", "--_child", "--models", model, "--size", args.size,
           "--device", args.device, "--precision", args.precision, "--cache-dir", cache_dir]
    if args.batch is not None:
        cmd += ["--batch", str(args.batch)]
    env = dict(os.environ, TRITON_INTERPRET=args.interpret)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.root or _REPO_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, cwd=args.root or _REPO_ROOT, capture_output=True, text=True,
                          timeout=args.child_timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_TAG):
            return json.loads(line[len(_TAG):])
    return {"error": f"status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.warm_pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["bert", "gpt2"])
    p.add_argument("--size", default="base", choices=("tiny", "base"))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--interpret", default="0", help="TRITON_INTERPRET for the children")
    p.add_argument("--root", default=None, help="run the children in this checkout (a before/after pair)")
    p.add_argument("--out", default=None, help="write the rows here (JSON)")
    p.add_argument("--child-timeout", type=float, default=600.0)
    p.add_argument("--_child", dest="child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.model = args.models[0]
        return child(args)
    rows: List[Dict[str, Any]] = []
    root = tempfile.mkdtemp(prefix="warm-pipeline-")
    try:
        for model in args.models:
            cache_dir = os.path.join(root, model)
            os.makedirs(cache_dir, mode=0o700)
            row = {"model": model, "size": args.size, "precision": args.precision, "device": args.device}
            for phase in ("cold", "warm"):
                row[phase] = run_child(model, cache_dir, args)
            rows.append(row)
            for phase in ("cold", "warm"):
                r = row[phase]
                if "error" in r:
                    print(f"{model} {phase}: {r['error']}\n{r['stderr_tail']}")
                    continue
                (a, b) = r["rounds"]
                print(f"{model} {phase}: pipeline {a['pipeline_s']:.2f} s ({a['engine']}, passes {a['passes']}), "
                      f"again in-process {b['pipeline_s']:.2f} s ({b['engine']}, passes {b['passes']}) "
                      f"graph {a['graph']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
