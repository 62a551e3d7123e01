"""Compile, time and check one peer: the measurement behind every benchmark record."""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..report import Report
from .peers import PEERS, split_peer
from .results import SOURCE_ROOT

_INDUCTOR_MODES = {"inductor": None, "inductor-max-autotune": "max-autotune",
                   "inductor-reduce-overhead": "reduce-overhead"}
#: the warm-compile subprocess prints its result on a line starting with this
FIRST_CALL_TAG = "BENCH_FIRST_CALL_JSON "


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def to_device(t: Any, device: str, dtype: torch.dtype) -> Any:
    """A tensor on ``device``, cast to ``dtype`` when it is floating point (integer inputs such
    as token ids keep their dtype); anything else unchanged."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


# ----------------------------------------------------------------------------- peers

def compile_peer(peer: str, model: torch.nn.Module, options: Dict[str, Any], report: Any = None) -> Callable:
    """The peer's callable. For compile_backend, ``report`` (a Report) collects what the backend
    did, so a result records why it is as fast as it is."""
    if peer == "eager":
        return model
    if peer in _INDUCTOR_MODES:
        return torch.compile(model, mode=_INDUCTOR_MODES[peer])
    name, peer_opts = split_peer(peer)
    if name == "compile_backend":
        ensure_backend_registered()
        opts = {**options, **peer_opts}
        if report is None:
            return torch.compile(model, backend="compile_backend", options=opts)
        from ..backend import compile_backend as backend_fn

        return torch.compile(model, backend=lambda gm, ins: backend_fn(gm, ins, options=opts, report=report))
    raise ValueError(f"unknown peer {peer!r}; choose among {', '.join(PEERS)}")


def report_summary(report: Any) -> List[Dict[str, Any]]:
    """Per compiled graph, what a results file needs to explain a latency: groups by kind and
    implementation, ATen fallbacks, the speed check's times and choice, CUDA graph, passes."""
    out = []
    for g in report.graphs:
        impls: Dict[str, int] = {}
        choices: Dict[str, Dict[str, float]] = {}  # the tuner's picks: count and summed tuned ms
        for k in g.kernels:
            key = f"{k['kind']}:{k.get('impl', '?')}"
            impls[key] = impls.get(key, 0) + 1
            c = k.get("config") or {}
            pick = key + "".join(f" {c[f]}" for f in ("epilogue", "epilogue_tile") if f in c)
            entry = choices.setdefault(pick, {"n": 0, "tuned_ms": 0.0})
            entry["n"] += 1
            entry["tuned_ms"] = round(entry["tuned_ms"] + float(c.get("tuned_ms", 0.0)), 5)
        out.append({"name": g.name, "role": g.role, "groups": impls, "choices": choices, "cuda_graph": g.cuda_graph,
                    "fallbacks": sorted({f"{f.get('op')}: {str(f.get('reason'))[:160]}" for f in g.fallbacks}),
                    "speed_check": g.speed_check, "passes": g.fired()})
    return out


def ensure_backend_registered() -> None:
    """Make ``backend="compile_backend"`` resolve when the project runs from a source tree.

    After ``pip install`` Dynamo finds the backend through the ``torch_dynamo_backends``
    entry point; from a plain checkout (``PYTHONPATH=.``, as on the GPU machine) there is no
    entry point and importing the package does not register it, so register it here.
    """
    if "compile_backend" in torch._dynamo.list_backends(exclude_tags=()):
        return
    from ..backend import compile_backend as backend_fn

    torch._dynamo.register_backend(backend_fn, name="compile_backend")


def peer_options(peer: str, precision: str, user_options: Dict[str, Any], cache_dir: str) -> Dict[str, Any]:
    """What the peer is compiled with (cache_dir included; it is dropped from the record)."""
    name, peer_opts = split_peer(peer)
    if name == "compile_backend":
        return {"precision": precision, **user_options, **peer_opts, "cache_dir": cache_dir}
    if peer in _INDUCTOR_MODES and _INDUCTOR_MODES[peer]:
        return {"mode": _INDUCTOR_MODES[peer]}
    return {}


def peer_cache_root(cache_root: str, peer: str) -> str:
    """The peer's cache directories (compile_backend's ``cache_dir`` is ``<this>/compile_backend``)."""
    return os.path.join(cache_root, re.sub(r"[^A-Za-z0-9_.-]+", "_", peer).strip("_"))


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


# ----------------------------------------------------------------------------- timing

def clean_slate(device: str) -> None:
    """Before a peer: none of the last one's compiled graphs, generated kernels, garbage or
    cached GPU memory."""
    torch._dynamo.reset()
    forget_compiled_kernels()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def forget_compiled_kernels() -> None:
    """Drop this process's memo of our generated kernel modules (and so Triton's in-memory
    binaries of their kernels): the next peer's first call compiles every kernel it needs, as a
    fresh process would. Without it a quantized engine built after the FP16 one found the
    kernels of its float groups compiled already, and its "cold" compile looked cheaper than it
    is (session 20's notes)."""
    from ..kernels import gemv, launch

    launch.forget_loaded()
    gemv.plain_kernel.cache_clear()


def prime_process(device: str, cache_root: str) -> float:
    """Pay, before the first peer, what only a process's first compile pays (Dynamo's and
    AOTAutograd's first use, Triton's compiler, cuDNN's and cuBLAS's handles): a small
    convolution + linear + attention model through our backend, then a clean slate. Without
    it the first peer's first call carries those seconds (session 20: ResNet-50's FP16 engine
    46.3 s first in its process, 37.4 s after another case). Returns the seconds it took."""
    t0 = time.perf_counter()
    ensure_backend_registered()

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
            self.fc = torch.nn.Linear(16, 32)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # [B, HW, 16]
            q = self.fc(y).view(y.shape[0], y.shape[1], 2, 16).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).sum()

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = Small().to(device, dtype).eval()
    x = torch.randn(2, 3, 8, 8, device=device, dtype=dtype)
    with fresh_compiler_caches(os.path.join(cache_root, "prime")), torch.no_grad():
        fn = torch.compile(model, backend="compile_backend",
                           options={"cache_dir": os.path.join(cache_root, "prime", "cb")})
        fn(x)
    sync(device)
    clean_slate(device)
    return time.perf_counter() - t0


def sync(device: str) -> None:
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
    sync(device)
    start = time.perf_counter()
    out = call()
    sync(device)
    return time.perf_counter() - start, out


def time_calls(call: Callable[[], Any], iters: int, warmup: int, device: str) -> List[float]:
    """Per-call latencies in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    sync(device)
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


def first_and_steady(call: Callable[[], Any], iters: int, warmup: int, device: str) -> Dict[str, float]:
    """The first call's seconds (compiles), then median / p20 / p80 ms of ``iters`` calls after
    ``warmup`` more."""
    first, _ = time_first_call(call, device)
    times = time_calls(call, iters, warmup, device)
    return {"first_s": first, "median_ms": percentile(times, 50), "p20_ms": percentile(times, 20),
            "p80_ms": percentile(times, 80)}


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
            report = Report() if split_peer(peer)[0] == "compile_backend" else None
            call = make_call(peer, compile_peer(peer, model, options, report), inputs)
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
        if report is not None:
            record["report"] = report_summary(report)
        record["warm_compile_s"] = None
        if args.warm_compile and peer != "eager":
            log(f"{base['model']}: {peer}: warm first call in a subprocess ...")
            record["warm_compile_s"] = warm_first_call(peer, options, args, peer_cache)
        log(f"{base['model']}: {peer}: {record['median_ms']:.3f} ms, first call {first_s:.1f} s")
    except Exception as exc:  # noqa: BLE001  (one failing peer must not end the run)
        record_failure(record, exc, lambda m: log(f"{base['model']}: {peer}: {m}"))
    finally:
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return record


def record_failure(record: Dict[str, Any], exc: BaseException, say: Callable[[str], None]) -> None:
    """A peer that failed: its error and traceback in the record (never hidden), a log line."""
    record["error"] = f"{type(exc).__name__}: {exc}"
    record["traceback"] = traceback.format_exc()[-4000:]
    say(f"FAILED: {record['error'][:300]}")


def warm_first_call(peer: str, options: Dict[str, Any], args, peer_cache: str) -> Optional[float]:
    """Time the first call in a fresh process that reuses this peer's filled caches."""
    cmd = [sys.executable, "-m", "compile_backend", "bench", "--_first-call-only", "--model", args.model,
           "--size", args.size, "--precision", args.precision, "--compare", peer,
           "--device", args.device, "--seed", str(args.seed), "--options", json.dumps(options)]
    if args.batch is not None:
        cmd += ["--batch", str(args.batch)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(peer_cache, "inductor"),
               TRITON_CACHE_DIR=os.path.join(peer_cache, "triton"))
    # this process's compile_backend (a checkout or an install) and the user's module:function
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, os.getcwd(), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.warm_timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(FIRST_CALL_TAG):
            return json.loads(line[len(FIRST_CALL_TAG):])["first_call_s"]
    raise RuntimeError(f"warm-compile subprocess failed (rc={proc.returncode}): {proc.stderr[-1500:]}")
