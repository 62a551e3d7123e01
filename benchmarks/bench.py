"""The benchmark runner: one model against several peers, trtexec-style.

    python -m benchmarks --model resnet50 --precision fp16 --compare eager,inductor,compile_backend
    python -m compile_backend bench ...            (the same command)

A peer ``compile_backend[cuda_graphs=off]`` (any ``k=v`` options, comma-separated) is
compile_backend with those options on top of ``--options``, so option sets compare side by side.

Every peer runs the same model object on the same inputs in this process, with
``torch._dynamo.reset()`` between peers. Per peer it records:

* ``compile_s``: wall time of the first call (compile + one run) with empty caches: a fresh
  temporary ``cache_dir`` for compile_backend, fresh Inductor/Triton cache directories for all;
* ``warm_compile_s`` (``--warm-compile``): the same first call in a fresh subprocess whose
  caches are the ones the cold run just filled;
* ``median_ms``, ``p20_ms``, ``p80_ms``: per-call latency after warm-up (CUDA events on a GPU,
  ``time.perf_counter`` on a CPU);
* ``peak_mem_mb``: peak allocated GPU memory over the timed calls (weights, inputs, activations,
  workspaces, CUDA-graph pools: everything the peer holds while it runs);
* ``accuracy`` against an FP32 eager reference computed from an fp32 copy of the model with
  TF32 off: ``max_abs``, ``max_rel`` (max |out - ref| / max |ref|), ``rel_l2``
  (||out - ref|| / ||ref||), ``cosine``, and ``top1`` (argmax agreement over the last dim) when
  the output is logits.

Records are written to ``--out`` after every peer, so a run that is cut off keeps what it
measured. A peer that fails is recorded with an ``error`` field; the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

PEERS = ("eager", "inductor", "inductor-max-autotune", "inductor-reduce-overhead", "compile_backend")
DEFAULT_PEERS = ("eager", "inductor", "compile_backend")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_INDUCTOR_MODES = {"inductor": None, "inductor-max-autotune": "max-autotune",
                   "inductor-reduce-overhead": "reduce-overhead"}
_FIRST_CALL_TAG = "BENCH_FIRST_CALL_JSON "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(ValueError):
    """A mistake in the command line or in the user's model factory: ``main`` prints it as one
    line (the cause and the fix) and exits with status 2, without a traceback."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- arguments

def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Benchmark a model against torch.compile peers.")
    p.add_argument("--model", default="resnet50",
                   help="zoo name (mlp, resnet50, bert, gpt2, vit) or module:function returning (model, inputs)")
    p.add_argument("--size", choices=("tiny", "base"), default=None,
                   help="zoo size (default: base on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the zoo's)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="dtype the model and float inputs are cast to; also compile_backend's precision")
    p.add_argument("--options", default=None,
                   help="compile_backend options: JSON object or comma-separated k=v pairs")
    p.add_argument("--compare", default=",".join(DEFAULT_PEERS),
                   help=f"comma-separated peers among {', '.join(PEERS)}; "
                        "compile_backend[k=v,...] adds options to that peer alone")
    p.add_argument("--iters", type=int, default=50, help="timed calls per peer")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls after the first one")
    p.add_argument("--warm-compile", action="store_true",
                   help="also time the first call in a fresh subprocess with the filled caches")
    p.add_argument("--out", default=None, help="results JSON: a list of records, appended to")
    p.add_argument("--plot", default=None, help="write a PNG of latency and speedup here")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--cache-root", default=None,
                   help="keep the per-peer cache directories here (default: a temporary directory)")
    p.add_argument("--warm-timeout", type=float, default=600.0, help="seconds for the warm subprocess")
    # internal: the warm-compile subprocess only times the first call and prints JSON
    p.add_argument("--_first-call-only", dest="first_call_only", action="store_true",
                   help=argparse.SUPPRESS)
    return p


def parse_options(text: Optional[str]) -> Dict[str, Any]:
    """``'{"autotune": "max"}'`` or ``autotune=max,validate=false`` -> dict (values JSON-decoded
    when they parse, e.g. numbers and booleans, else kept as strings)."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ValueError("a JSON value of options must be an object")
        return value
    options: Dict[str, Any] = {}
    for pair in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in pair:
            raise ValueError(f"options entry {pair!r} is not key=value")
        key, raw = (s.strip() for s in pair.split("=", 1))
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def parse_peers(text: str) -> List[str]:
    """Comma-separated peers; ``compile_backend[k=v,...]`` is compile_backend with these options
    on top of ``--options`` (so one run can compare option sets, e.g. ``cuda_graphs=off``)."""
    peers, depth, current = [], 0, ""
    for ch in text:  # commas inside [...] or {...} belong to a peer's options
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            peers.append(current.strip())
            current = ""
        else:
            current += ch
    peers = [p for p in peers + [current.strip()] if p]
    unknown = [p for p in peers if split_peer(p)[0] not in PEERS]
    if unknown or not peers:
        raise UsageError(f"--compare: unknown peer(s) {unknown}; choose among {', '.join(PEERS)}"
                         " (compile_backend also as compile_backend[option=value,...])")
    return peers


def split_peer(peer: str) -> Tuple[str, Dict[str, Any]]:
    """``'compile_backend[cuda_graphs=off]'`` -> ``('compile_backend', {'cuda_graphs': 'off'})``;
    the options are validated now, so a typo fails before anything is compiled."""
    if not peer.endswith("]") or "[" not in peer:
        return peer, {}
    name, text = peer[:-1].split("[", 1)
    if name != "compile_backend":
        raise UsageError(f"--compare: only compile_backend takes [options], got {peer!r}")
    try:
        options = parse_options(text)
    except ValueError as exc:
        raise UsageError(f"--compare {peer}: {exc}") from None
    from compile_backend.options import Options

    try:
        Options.from_mapping(options)
    except ValueError as exc:
        raise UsageError(f"--compare {peer}: {exc}") from None
    return name, options


def check_args(args) -> None:
    """Everything that can be checked before a model is built or compiled: a typo in an option
    must not surface as a peer's ``BackendCompilerFailed`` after minutes of work."""
    from compile_backend.options import Options

    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be a positive integer, got {args.batch}")
    if args.iters < 1 or args.warmup < 0:
        raise UsageError("--iters must be >= 1 and --warmup >= 0")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here (torch "
                         f"{torch.__version__}); use --device cpu or run on a GPU machine")
    try:
        Options.from_mapping({"precision": args.precision, **args.user_options})
    except ValueError as exc:
        raise UsageError(f"--options: {exc}") from None
    if ":" not in args.model:
        from benchmarks import zoo

        if args.model not in zoo.NAMES:
            raise UsageError(f"--model {args.model!r} is neither a zoo model ({', '.join(zoo.NAMES)}) "
                             "nor module:function returning (model, inputs)")


# ----------------------------------------------------------------------------- model and inputs

def load_model(spec: str, size: str, batch: Optional[int], device: str, seed: int):
    """(fp32 model in eval mode, fp32 inputs, outputs-are-logits or None when unknown)."""
    from benchmarks import zoo

    if ":" not in spec:
        model, inputs = zoo.get(spec, size, batch=batch, device=device, seed=seed)
        return model, inputs, zoo.spec(spec, size).logits
    model, inputs = call_factory(spec, dict(size=size, batch=batch, device=device, seed=seed))
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    model = model.to(device).float().eval()
    inputs = tuple(_to(t, device, torch.float32) for t in inputs)
    return model, inputs, None


def call_factory(spec: str, wanted: Dict[str, Any]) -> Tuple[torch.nn.Module, Any]:
    """``module:function`` -> what the function returns for the arguments it declares among
    ``wanted``; every failure is a UsageError naming the cause and the fix."""
    module_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (ImportError, or the module itself failing)
        raise UsageError(f"--model {spec}: cannot import module {module_name!r} ({type(exc).__name__}: "
                         f"{exc}); it must be importable from the current directory or PYTHONPATH") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"--model {spec}: module {module_name!r} has no function {fn_name!r}; "
                         "give module:function where the function returns (model, inputs)")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        result = fn(**{k: v for k, v in wanted.items() if k in params and v is not None})
    except Exception as exc:  # noqa: BLE001  (the user's code: report it, do not dump our stack)
        raise UsageError(f"--model {spec}: {fn_name}() raised {type(exc).__name__}: {exc}; "
                         "fix the factory (call it in Python to see the traceback)") from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"--model {spec}: {fn_name}() must return (model, inputs) with model an "
                         f"nn.Module, got {type(result).__name__}")
    return result[0], result[1]


def _to(t: Any, device: str, dtype: torch.dtype) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def batch_of(inputs: Sequence[Any]) -> Optional[int]:
    first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return int(first.shape[0]) if first is not None else None


# ----------------------------------------------------------------------------- peers

def compile_peer(peer: str, model: torch.nn.Module, options: Dict[str, Any]) -> Callable:
    if peer == "eager":
        return model
    if peer in _INDUCTOR_MODES:
        return torch.compile(model, mode=_INDUCTOR_MODES[peer])
    name, peer_opts = split_peer(peer)
    if name == "compile_backend":
        ensure_backend_registered()
        return torch.compile(model, backend="compile_backend", options={**options, **peer_opts})
    raise ValueError(f"unknown peer {peer!r}; choose among {', '.join(PEERS)}")


def ensure_backend_registered() -> None:
    """Make ``backend="compile_backend"`` resolve when the project runs from a source tree.

    After ``pip install`` Dynamo finds the backend through the ``torch_dynamo_backends``
    entry point; from a plain checkout (``PYTHONPATH=.``, as on the GPU machine) there is no
    entry point and importing the package does not register it, so register it here.
    """
    if "compile_backend" in torch._dynamo.list_backends(exclude_tags=()):
        return
    from compile_backend.backend import compile_backend as backend_fn

    torch._dynamo.register_backend(backend_fn, name="compile_backend")


def peer_options(peer: str, precision: str, user_options: Dict[str, Any], cache_dir: str) -> Dict[str, Any]:
    """What the peer is compiled with (cache_dir included; it is dropped from the record)."""
    name, peer_opts = split_peer(peer)
    if name == "compile_backend":
        return {"precision": precision, **user_options, **peer_opts, "cache_dir": cache_dir}
    if peer in _INDUCTOR_MODES and _INDUCTOR_MODES[peer]:
        return {"mode": _INDUCTOR_MODES[peer]}
    return {}


@contextlib.contextmanager
def fresh_compiler_caches(root: str):
    """Point Inductor's and Triton's on-disk caches at ``root`` and drop in-memory ones."""
    try:
        from torch._inductor.utils import clear_caches

        clear_caches()
    except Exception:  # noqa: BLE001  (older/newer torch: the env vars still isolate disk caches)
        pass
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_call(peer: str, fn: Callable, inputs: Sequence[Any]) -> Callable[[], Any]:
    mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if peer in ("inductor-reduce-overhead", "inductor-max-autotune") and mark_step is not None:
        # CUDA-graph trees reuse output memory; each call is a new step, outputs are not kept
        def call():
            mark_step()
            return fn(*inputs)
        return call
    return lambda: fn(*inputs)


def time_first_call(call: Callable[[], Any], device: str) -> Tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = call()
    _sync(device)
    return time.perf_counter() - start, out


def time_calls(call: Callable[[], Any], iters: int, warmup: int, device: str) -> List[float]:
    """Per-call latencies in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    _sync(device)
    if device.startswith("cuda"):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            call()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- accuracy

def flat_tensors(out: Any) -> List[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def snapshot(out: Any) -> List[torch.Tensor]:
    """Float64 CPU copies: outputs may live in reused buffers (CUDA graphs) and the reference
    should not count toward a peer's GPU memory."""
    return [t.detach().to("cpu", torch.float64) for t in flat_tensors(out)]


def compare(out: List[torch.Tensor], ref: List[torch.Tensor], logits: Optional[bool]) -> Dict[str, Any]:
    if len(out) != len(ref) or any(a.shape != b.shape for a, b in zip(out, ref)):
        raise ValueError(f"output structure differs from the reference: "
                         f"{[tuple(t.shape) for t in out]} vs {[tuple(t.shape) for t in ref]}")
    o = torch.cat([t.flatten() for t in out])
    r = torch.cat([t.flatten() for t in ref])
    diff = (o - r).abs()
    ref_max = float(r.abs().max()) if r.numel() else 0.0
    acc: Dict[str, Any] = {
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "max_rel": float(diff.max()) / ref_max if ref_max > 0 else None,
        "rel_l2": float(diff.norm() / r.norm()) if float(r.norm()) > 0 else None,
        "cosine": float(torch.nn.functional.cosine_similarity(o, r, dim=0)) if o.numel() else None,
        "finite": bool(torch.isfinite(o).all()),
        "top1": None,
    }
    main_out, main_ref = out[0], ref[0]
    if logits is None:  # unknown model: treat a [batch, classes] output as logits
        logits = main_out.dim() == 2 and main_out.shape[-1] > 1
    if logits and main_out.dim() >= 2:
        acc["top1"] = float((main_out.argmax(-1) == main_ref.argmax(-1)).double().mean())
    return acc


@contextlib.contextmanager
def strict_fp32():
    """True FP32 for the reference: no TF32 in matmuls or cuDNN convolutions."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- environment, results

def environment(device: str, device_name: Optional[str] = None, commit: Optional[str] = None) -> Dict[str, Any]:
    """Versions, commit, date and the device's name (``device_name`` skips asking CUDA;
    ``commit`` names the commit where the tree has no ``.git``, as on the GPU machine)."""
    from importlib import metadata

    triton_version = None
    for dist in ("triton", "pytorch-triton"):
        try:
            triton_version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    if device_name is not None:
        name = device_name
    elif device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "commit": commit or git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def git_commit() -> str:
    """HEAD of the source tree, or "unknown" (no git, no .git, no commits)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # a repository without commits prints "HEAD" and fails: only accept a real hash
    if proc.returncode == 0 and all(c in "0123456789abcdef" for c in proc.stdout.strip()):
        return proc.stdout.strip() or "unknown"
    return "unknown"


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultsFile:
    """A JSON list of records; this run's records are appended to what was there."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.existing: List[dict] = []
        if path and os.path.exists(path) and os.path.getsize(path) > 0:
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError) as exc:
                raise UsageError(f"--out {path}: cannot read it as JSON ({exc}); "
                                 "give a new file or a results file of this tool") from None
            self.existing = data.get("records") if isinstance(data, dict) else data
            if not isinstance(self.existing, list):
                raise UsageError(f"--out {path} does not hold a list of benchmark records; "
                                 "give a new file or a results file of this tool")

    def write(self, records: List[dict]) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(_clean(self.existing + records), f, indent=1, allow_nan=False)
        os.replace(tmp, self.path)


def add_ratios(records: List[dict]) -> None:
    """``ratio_vs_best`` (median / best median) and ``speedup_vs_eager`` within one run."""
    ok = [r for r in records if r.get("median_ms")]
    if not ok:
        return
    best = min(r["median_ms"] for r in ok)
    eager = next((r["median_ms"] for r in ok if r["backend"] == "eager"), None)
    for r in ok:
        r["ratio_vs_best"] = r["median_ms"] / best
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None


def format_table(records: List[dict]) -> str:
    def num(v, fmt, suffix=""):
        return "-" if v is None else format(v, fmt) + suffix

    head = ("backend", "median ms", "p20-p80 ms", "vs best", "vs eager", "compile s", "warm s",
            "peak MB", "max abs", "cosine", "top1")
    rows = [head]
    for r in records:
        if "error" in r:
            rows.append((r["backend"], "ERROR: " + (r["error"].splitlines() or [""])[0][:90]) + ("",) * 9)
            continue
        a = r.get("accuracy") or {}
        rows.append((
            r["backend"], num(r["median_ms"], ".3f"), f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            num(r.get("ratio_vs_best"), ".2f", "x"), num(r.get("speedup_vs_eager"), ".2f", "x"),
            num(r.get("compile_s"), ".1f"), num(r.get("warm_compile_s"), ".1f"),
            num(r.get("peak_mem_mb"), ".0f"), num(a.get("max_abs"), ".2e"), num(a.get("cosine"), ".6f"),
            num(a.get("top1"), ".3f"),
        ))
    widths = [max(len(row[i]) for row in rows if not row[1].startswith("ERROR") or i == 0)
              for i in range(len(head))]
    lines = []
    for row in rows:
        if row[1].startswith("ERROR"):
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one peer

def run_peer(peer: str, model, inputs, ref, logits, args, cache_root: str, base: dict) -> dict:
    """Compile, time and check one peer; failures become a record with ``error``."""
    record = dict(base, backend=peer)
    peer_cache = peer_cache_root(cache_root, peer)
    options = peer_options(peer, args.precision, args.user_options, os.path.join(peer_cache, "compile_backend"))
    record["options"] = {k: v for k, v in options.items() if k != "cache_dir"}
    cuda = args.device.startswith("cuda")
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with fresh_compiler_caches(peer_cache), torch.no_grad():
            log(f"{base['model']}: {peer}: first call (compile) ...")
            call = make_call(peer, compile_peer(peer, model, options), inputs)
            first_s, _ = time_first_call(call, args.device)
            record["first_call_s"] = first_s
            record["compile_s"] = None if peer == "eager" else first_s
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = time_calls(call, args.iters, args.warmup, args.device)
            record["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            record.update(median_ms=percentile(times, 50), p20_ms=percentile(times, 20),
                          p80_ms=percentile(times, 80))
            out = snapshot(call())
        record["accuracy"] = compare(out, ref, logits)
        record["warm_compile_s"] = None
        if args.warm_compile and peer != "eager":
            log(f"{base['model']}: {peer}: warm first call in a subprocess ...")
            record["warm_compile_s"] = warm_first_call(peer, options, args, peer_cache)
        log(f"{base['model']}: {peer}: {record['median_ms']:.3f} ms, first call {first_s:.1f} s")
    except Exception as exc:  # noqa: BLE001  (one failing peer must not end the run)
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-4000:]
        log(f"{base['model']}: {peer}: FAILED: {record['error'][:300]}")
    finally:
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return record


def peer_cache_root(cache_root: str, peer: str) -> str:
    """The peer's cache directories (compile_backend's ``cache_dir`` is ``<this>/compile_backend``)."""
    return os.path.join(cache_root, re.sub(r"[^A-Za-z0-9_.-]+", "_", peer).strip("_"))


def warm_first_call(peer: str, options: Dict[str, Any], args, peer_cache: str) -> Optional[float]:
    """Time the first call in a fresh process that reuses this peer's filled caches."""
    cmd = [sys.executable, "-m", "benchmarks", "--_first-call-only", "--model", args.model,
           "--size", args.size, "--precision", args.precision, "--compare", peer,
           "--device", args.device, "--seed", str(args.seed), "--options", json.dumps(options)]
    if args.batch is not None:
        cmd += ["--batch", str(args.batch)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(peer_cache, "inductor"),
               TRITON_CACHE_DIR=os.path.join(peer_cache, "triton"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.getcwd(), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.warm_timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_FIRST_CALL_TAG):
            return json.loads(line[len(_FIRST_CALL_TAG):])["first_call_s"]
    raise RuntimeError(f"warm-compile subprocess failed (rc={proc.returncode}): {proc.stderr[-1500:]}")


def first_call_only(args) -> int:
    """Internal (warm-compile subprocess): build, compile ``args.compare``, time the first call."""
    model, inputs, _ = load_model(args.model, args.size, args.batch, args.device, args.seed)
    dtype = PRECISIONS[args.precision]
    model = model.to(dtype)
    inputs = tuple(_to(t, args.device, dtype) for t in inputs)
    peer = parse_peers(args.compare)[0]
    with torch.no_grad():
        call = make_call(peer, compile_peer(peer, model, args.user_options), inputs)
        seconds, _ = time_first_call(call, args.device)
    print(_FIRST_CALL_TAG + json.dumps({"first_call_s": seconds}), flush=True)
    return 0


# ----------------------------------------------------------------------------- the run

def run(args) -> List[dict]:
    peers = parse_peers(args.compare)
    dtype = PRECISIONS[args.precision]
    results = ResultsFile(args.out)
    fp32_model, fp32_inputs, logits = load_model(args.model, args.size, args.batch, args.device, args.seed)
    log(f"{args.model} ({args.size}) on {args.device}: fp32 eager reference ...")
    with torch.no_grad(), strict_fp32():
        ref = snapshot(fp32_model(*fp32_inputs))
    model = copy.deepcopy(fp32_model).to(dtype).eval()
    inputs = tuple(_to(t, args.device, dtype) for t in fp32_inputs)
    del fp32_model, fp32_inputs
    base = dict(model=args.model, size=args.size, batch=args.batch or batch_of(inputs),
                precision=args.precision, iters=args.iters, warmup=args.warmup,
                **environment(args.device, commit=args.commit))
    records: List[dict] = []
    own_root = args.cache_root is None
    cache_root = tempfile.mkdtemp(prefix="bench-caches-") if own_root else args.cache_root
    try:
        for peer in peers:
            records.append(run_peer(peer, model, inputs, ref, logits, args, cache_root, base))
            add_ratios(records)
            results.write(records)
    finally:
        if own_root:
            shutil.rmtree(cache_root, ignore_errors=True)
    print(f"\n{args.model} size={args.size} batch={base['batch']} precision={args.precision} "
          f"device={base['device']} torch={base['torch']} triton={base['triton']}")
    print(format_table(records), flush=True)
    if args.plot:
        from benchmarks.plot import plot_records

        plot_records(records, args.plot)
        log(f"plot written to {args.plot}")
    return records


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = "base" if args.device.startswith("cuda") else "tiny"
    try:
        try:
            args.user_options = parse_options(args.options)
        except ValueError as exc:  # a JSON error or a pair without "="
            raise UsageError(f"--options: {exc}") from None
        parse_peers(args.compare)
        check_args(args)
        if args.first_call_only:
            return first_call_only(args)
        records = run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if all("error" in r for r in records) else 0
