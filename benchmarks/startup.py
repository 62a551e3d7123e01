"""Start-up time: a fresh process, from nothing to the first compiled output (issues #6, #8).

    python -m benchmarks.startup --autotune fast max --out $OUT/startup.json --commit <sha>
    python -m benchmarks.startup --models mlp bert --autotune fast

For every zoo base model (its default batch: mlp 2048, resnet50 32, bert 16x128, gpt2 8x512,
vit 32) and every autotune level, a fresh empty cache directory, and in it two child processes
(``python -m benchmarks.startup --_child ...``), one after the other:

* cold: the directory is empty (compile_backend's engine and timing caches, Triton's binaries);
* warm: a new process on the same directory, as a second run of a user's script would be.

Each child records wall-clock points: its first line (the parent's spawn time gives the
interpreter's start), after ``import torch``, after CUDA is initialised, after the model and its
inputs are built on the device in fp16 (the model's own construction: not our cost, its own
column), and after the first output of ``torch.compile(model, backend=compile_backend,
options={"autotune": level, "cache_dir": dir, "precision": "fp16"})``, synchronised.

``beyond_torch_s`` is that last step alone: importing compile_backend, Dynamo's trace, our
pipeline (or the engine-cache hit) and the first run, i.e. everything a user waits for beyond
starting Python, importing torch, initialising CUDA and building the model. Issue #8's goal:
warm ``beyond_torch_s`` <= 3 s. ``total_s`` is spawn to first output.

The child compiles through compile_backend's own entry function with a ``Report`` attached (what
``backend="compile_backend"`` calls, plus the report), and returns from it: the engine cache's
hits/misses and the tuned choices served by the timing cache (``report.cache_summary()``), and
the tuner's counters summed over graphs (``GraphReport.tuning``: tuned, from_cache, heuristic,
candidates_timed, seconds).

Records (one per model and level, appended to ``--out``) are written after every row; a part
time budget (``--budget-s``) skips what would not fit, recorded with an ``error``.
"""
from __future__ import annotations

import time

_START = time.perf_counter()  # first thing: the child's phases are measured from here
_START_WALL = time.time()

import argparse  # noqa: E402  (stdlib only above torch: the child times `import torch` itself)
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

ZOO_MODELS = ("mlp", "resnet50", "bert", "gpt2", "vit")
LEVELS = ("off", "fast", "max")
BACKENDS = ("compile_backend", "eager", "aot_eager")
PRECISIONS = ("fp16", "bf16", "fp32")
WARM_GOAL_S = 3.0
_TAG = "STARTUP_CHILD_JSON "
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TUNING_KEYS = ("tuned", "from_cache", "heuristic", "candidates_timed", "seconds")


def log(message: str) -> None:
    print(f"[startup] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the child

def child(args) -> int:
    """One process: import torch, init CUDA, build the model, compile, first output; print JSON."""
    marks = {"start": _START}
    import torch

    marks["torch"] = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.empty(1, device=device)  # the context: every CUDA user pays it, before any model
        torch.cuda.synchronize(device)
    marks["cuda"] = time.perf_counter()

    from compile_backend import zoo

    from . import real_models

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    if args.model in real_models.REAL:  # a model no one here wrote (transformers, torchvision)
        from compile_backend.bench.cli import load_model, to_device

        model, inputs, _ = load_model(real_models.model_spec(args.model), args.size, args.batch, args.device, 0)
        model, inputs = model.to(dtype), tuple(to_device(t, args.device, dtype) for t in inputs)
    else:
        model, inputs = zoo.get(args.model, args.size, batch=args.batch, dtype=dtype, device=device)
    if cuda:
        torch.cuda.synchronize(device)
    marks["built"] = time.perf_counter()

    import torch._dynamo  # noqa: F401  (every torch.compile user pays it; timed on its own)

    marks["dynamo"] = time.perf_counter()
    from compile_backend.backend import compile_backend
    from compile_backend.report import Report

    marks["imported"] = time.perf_counter()
    report = Report()
    entered: List[float] = []  # Dynamo hands a graph to the backend (its trace is done)
    returned: List[float] = []  # the backend returns (AOTAutograd done; our graphs compile lazily)

    def backend(gm, example_inputs, **kwargs):  # what backend="compile_backend" runs, + a report
        entered.append(time.perf_counter())
        try:
            if args.backend == "compile_backend":
                return compile_backend(gm, example_inputs, report=report, **kwargs)
            if args.backend == "aot_eager":
                from torch._dynamo.backends.common import aot_autograd
                from functorch.compile import make_boxed_func

                return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)
            return gm.forward  # "eager": Dynamo's trace alone
        finally:
            returned.append(time.perf_counter())

    options = {"autotune": args.level, "cache_dir": args.cache_dir, "precision": args.precision}
    compiled = torch.compile(model, backend=backend,
                             options=options if args.backend == "compile_backend" else None)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    with torch.no_grad():
        out = compiled(*inputs)
    if cuda:
        torch.cuda.synchronize(device)
    marks["output"] = time.perf_counter()
    if profiler is not None:
        profiler.disable()
        _write_profile(profiler, args.profile)

    tuning = {k: 0 for k in _TUNING_KEYS}
    for g in report.graphs:
        for k in _TUNING_KEYS:
            tuning[k] += g.tuning.get(k, 0)
    cache = report.cache_summary()
    result = {
        "interpreter_s": _START_WALL - args.spawned_at if args.spawned_at else None,
        "import_torch_s": marks["torch"] - marks["start"],
        "cuda_init_s": marks["cuda"] - marks["torch"],
        "build_s": marks["built"] - marks["cuda"],
        "beyond_torch_s": marks["output"] - marks["built"],
        "import_dynamo_s": marks["dynamo"] - marks["built"],  # part of beyond_torch_s
        "import_backend_s": marks["imported"] - marks["dynamo"],  # part of beyond_torch_s
        # the stages of the first call (parts of beyond_torch_s): Dynamo's trace up to the first
        # graph handed over; the backend's calls (AOTAutograd, the engine cache's lookup); the
        # rest: our lazy per-ATen-graph compile (backend_compile_s), the first run, guards
        "dynamo_trace_s": (entered[0] - marks["imported"]) if entered else None,
        "backend_calls_s": sum(b - a for a, b in zip(entered, returned)),
        "after_backend_s": (marks["output"] - returned[-1]) if returned else None,
        "backend": args.backend,
        "child_s": marks["output"] - marks["start"],
        # our pipeline (or the cache hit) summed over graphs; beyond_torch_s less this and the
        # import is Dynamo's trace, AOTAutograd and the first run
        "backend_compile_s": sum(g.compile_s for g in report.graphs),
        "graphs": len(report.graphs),
        "kernels": sum(len(g.kernels) for g in report.graphs),
        "fallbacks": sum(len(g.fallbacks) for g in report.graphs),
        "tuning": tuning,
        "engine_hits": cache["hits"], "engine_misses": cache["misses"],
        "timing_hits": cache["timing_hits"], "cache_bypasses": cache["bypasses"],
        "engine_states": [g.cache.get("engine") for g in report.graphs],
        # per graph on a hit: "skipped" (the stored post-pass graph was read) or "ran", and why
        "passes_states": [g.cache.get("passes") for g in report.graphs],
        "graph_reasons": [g.cache.get("graph_reason") for g in report.graphs if g.cache.get("graph_reason")],
        "output_shape": list(out.shape) if isinstance(out, torch.Tensor) else None,
        "batch": int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else None,
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
    }
    if result["interpreter_s"] is not None:
        result["total_s"] = result["interpreter_s"] + result["child_s"]
    print(_TAG + json.dumps(result), flush=True)
    return 0


def _write_profile(profiler, path: str) -> None:
    """The child's first call under cProfile, as text: cumulative and own-time tops."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(120)
    stats.sort_stats("tottime").print_stats(50)
    with open(path, "w") as f:
        f.write(text.getvalue())


# ----------------------------------------------------------------------------- the parent

def run_child(model: str, level: str, cache_dir: str, args, timeout: float,
              profile: Optional[str] = None) -> Dict[str, Any]:
    """Spawn one child; its JSON, or ``{"error": ...}`` when it failed or ran out of time."""
    cmd = [sys.executable, "-m", "benchmarks.startup", "--_child", "--models", model,
           "--autotune", level, "--cache-dir", cache_dir, "--device", args.device,
           "--size", args.size, "--precision", args.precision, "--backend", args.backend]
    if profile:
        cmd += ["--profile", profile]
    if args.batch is not None:
        cmd += ["--batch", str(args.batch)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT, env.get("PYTHONPATH")]))
    # every compiler cache the process could touch lives in the row's directory: cold is cold
    env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton-default")
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir, "inductor")
    spawned_at = time.time()
    proc = subprocess.Popen(cmd + ["--spawned-at", repr(spawned_at)], env=env, cwd=_REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": stderr[-2000:]}
    for line in reversed(stdout.splitlines()):
        if line.startswith(_TAG):
            return json.loads(line[len(_TAG):])
    return {"error": f"child exited with status {proc.returncode} without a result",
            "stderr_tail": stderr[-3000:]}


def measure_row(model: str, level: str, root: str, args, deadline: float) -> Dict[str, Any]:
    """Cold then warm child for one (model, level), on a fresh empty cache directory."""
    from compile_backend import zoo

    from . import real_models

    default = real_models.REAL[model].default_batch if model in real_models.REAL else \
        zoo.default_batch(model, args.size)
    row: Dict[str, Any] = {"model": model, "size": args.size, "precision": args.precision,
                           "autotune": level, "backend": args.backend, "warm_goal_s": WARM_GOAL_S,
                           "batch": default if args.batch is None else args.batch}
    cache_dir = os.path.join(root, f"{model}-{level}-{args.backend}")
    shutil.rmtree(cache_dir, ignore_errors=True)
    os.makedirs(cache_dir, mode=0o700)
    for phase in ("cold", "warm"):
        remaining = min(args.child_timeout, deadline - time.monotonic())
        if remaining < 5:
            row[phase] = {"error": f"not measured: time budget ({args.budget_s:.0f} s) spent"}
        elif phase == "warm" and "error" in row["cold"]:
            row[phase] = {"error": "not measured: the cold run failed"}
        else:
            log(f"{model} autotune={level}: {phase} process ...")
            profile = None
            if args.profile_dir and phase == "warm":
                os.makedirs(args.profile_dir, exist_ok=True)
                profile = os.path.join(args.profile_dir, f"{model}-{level}-{args.backend}-warm.txt")
            row[phase] = run_child(model, level, cache_dir, args, remaining, profile)
        result = row[phase]
        if "error" in result:
            log(f"{model} autotune={level}: {phase}: {result['error']}")
            continue
        row[f"{phase}_total_s"] = result.get("total_s")
        row[f"{phase}_beyond_torch_s"] = result["beyond_torch_s"]
        log(f"{model} autotune={level}: {phase}: {result['beyond_torch_s']:.2f} s beyond torch, "
            f"{result.get('total_s') or 0:.2f} s in all")
    for key in ("import_torch_s", "cuda_init_s", "build_s", "interpreter_s"):
        row[key] = row["cold"].get(key)  # the process's own phases, from the cold run
    warm = row.get("warm_beyond_torch_s")
    row["warm_meets_goal"] = None if warm is None else warm <= WARM_GOAL_S
    if "error" in row["cold"] or "error" in row["warm"]:
        row["error"] = "; ".join(f"{p}: {row[p]['error']}" for p in ("cold", "warm") if "error" in row[p])
    return row


def format_table(rows: List[dict]) -> str:
    def num(v, fmt=".2f"):
        return "-" if v is None else format(v, fmt)

    def pair(r, key, fmt=".0f"):
        c, w = r["cold"].get("tuning", {}).get(key), r["warm"].get("tuning", {}).get(key)
        return f"{num(c, fmt)}/{num(w, fmt)}"

    head = ("model", "level", "torch s", "cuda s", "build s", "cold total", "cold ours", "warm total",
            "warm ours", "<=3s", "tune s c/w", "tuned c/w", "cached c/w", "engine h/m c|w")
    lines = [head]
    for r in rows:
        c, w = r["cold"], r["warm"]
        goal = {True: "yes", False: "NO", None: "-"}[r.get("warm_meets_goal")]
        engines = f"{c.get('engine_hits', '-')}/{c.get('engine_misses', '-')}|" \
                  f"{w.get('engine_hits', '-')}/{w.get('engine_misses', '-')}"
        lines.append((r["model"], r["autotune"], num(r.get("import_torch_s")), num(r.get("cuda_init_s")),
                      num(r.get("build_s")), num(r.get("cold_total_s")), num(r.get("cold_beyond_torch_s")),
                      num(r.get("warm_total_s")), num(r.get("warm_beyond_torch_s")), goal,
                      pair(r, "seconds", ".1f"), pair(r, "tuned"), pair(r, "from_cache"), engines))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = ["  ".join(str(c).rjust(wd) if i > 1 else str(c).ljust(wd) for i, (c, wd) in enumerate(zip(line, widths)))
            for line in lines]
    for r in rows:
        if r.get("error"):
            text.append(f"{r['model']} {r['autotune']}: {r['error'][:200]}")
    return "\n".join(text)


def run(args) -> List[dict]:
    from compile_backend.bench.results import ResultsFile, environment

    results = ResultsFile(args.out)
    deadline = time.monotonic() + args.budget_s
    own_root = args.cache_root is None
    root = tempfile.mkdtemp(prefix="startup-caches-") if own_root else args.cache_root
    rows: List[dict] = []
    env: Optional[Dict[str, Any]] = None
    try:
        for level in args.autotune:  # level-major: the default level's rows come first
            for model in args.models:
                row = measure_row(model, level, root, args, deadline)
                name = row["cold"].get("device_name") or row["warm"].get("device_name")
                if env is None or (name and env["device"] != name):
                    # the parent never initialises CUDA: the device's name comes from a child
                    cpu = not args.device.startswith("cuda")
                    env = environment(args.device, device_name=None if cpu else (name or args.device),
                                      commit=args.commit)
                rows.append({**row, **env})
                results.write(rows)
    finally:
        if own_root and not args.keep_caches:
            shutil.rmtree(root, ignore_errors=True)
    if rows:
        e = rows[0]
        print(f"\nstart-up  size={args.size} precision={args.precision} device={e['device']} "
              f"torch={e['torch']} triton={e['triton']} commit={e['commit']}")
        print("ours = first compiled output minus (python start, import torch, CUDA init, model build); "
              f"goal: warm ours <= {WARM_GOAL_S:.0f} s")
    print(format_table(rows), flush=True)
    print(format_split(rows), flush=True)
    return rows


def format_split(rows: List[dict]) -> str:
    """Where the warm child's seconds beyond torch went, stage by stage."""
    keys = ("beyond_torch_s", "import_dynamo_s", "import_backend_s", "dynamo_trace_s",
            "backend_calls_s", "backend_compile_s", "after_backend_s")
    lines = ["warm split (s): model level backend " + " ".join(k[:-2] for k in keys)]
    for r in rows:
        w = r.get("warm", {})
        if "error" in w:
            continue
        vals = " ".join("-" if w.get(k) is None else f"{w[k]:.2f}" for k in keys)
        lines.append(f"  {r['model']} {r['autotune']} {r.get('backend', 'compile_backend')} {vals}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup",
                                description="Cold and warm start-up of compile_backend per zoo model.")
    p.add_argument("--models", nargs="+", default=list(ZOO_MODELS),
                   help=f"zoo models ({', '.join(ZOO_MODELS)}) or models no one here wrote "
                        "(names of benchmarks.real_models.REAL, e.g. hf_bert tv_vit_b_16)")
    p.add_argument("--autotune", nargs="+", default=["fast"], choices=LEVELS)
    p.add_argument("--size", choices=("tiny", "base"), default=None,
                   help="zoo size (default: base on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: the zoo's)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="results JSON: a list of records, appended to")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all rows")
    p.add_argument("--child-timeout", type=float, default=300.0, help="seconds per child process")
    p.add_argument("--cache-root", default=None, help="where the per-row cache directories go")
    p.add_argument("--keep-caches", action="store_true", help="keep the temporary cache directories")
    p.add_argument("--backend", choices=BACKENDS, default="compile_backend",
                   help="eager / aot_eager: the floor any torch.compile backend pays (Dynamo's trace, "
                        "AOTAutograd), measured the same way")
    p.add_argument("--profile-dir", default=None,
                   help="write each warm child's first call under cProfile here (text)")
    p.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    # internal: the child process
    p.add_argument("--_child", dest="child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        args.model, args.level = args.models[0], args.autotune[0]
        return child(args)
    if args.device is None:
        import torch  # the parent asks, but never initialises CUDA (it would hold GPU memory)

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = "base" if args.device.startswith("cuda") else "tiny"
    args.models = list(dict.fromkeys(args.models))
    from . import real_models  # the parent only: the child times its own `import torch`

    unknown = [m for m in args.models if m not in ZOO_MODELS and m not in real_models.REAL]
    if unknown:
        build_parser().error(f"unknown model(s) {unknown}; choose among {list(ZOO_MODELS) + list(real_models.REAL)}")
    args.autotune = list(dict.fromkeys(args.autotune))
    rows = run(args)
    return 1 if rows and all(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
