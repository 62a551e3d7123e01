"""Engine overhead at small batches: CUDA graphs, launches, weight refit (issue #7).

    python -m benchmarks.engine_bench --out $OUT/engine.json --commit <sha>
    python -m benchmarks.engine_bench --cases bert:16 --peers eager,compile_backend

In one process, fp16, for each case (default: resnet50 base batch 1, bert base batch 1 and
batch 16, seq 128) and each peer (default: eager, Inductor ``reduce-overhead``, compile_backend
with CUDA graphs (its default) and ``compile_backend[cuda_graphs=off]``), the runner's own
measurement (``compile_backend.bench.measure.run_peer``): median, p20 and p80 latency over CUDA
events after warm-up, peak allocated memory over the timed calls, accuracy against an fp32 eager
reference, first-call seconds; ``torch._dynamo.reset()`` between peers.

Caches: each peer compiles into its own fresh directories, except that a compile_backend peer
after the first starts from a copy of the first one's cache directory (``--no-share-tuning``
turns that off): the option sets compared here do not change what tuning finds, and re-tuning
every shape per variant would not fit the time budget. Its ``compile_s`` is then not a cold
compile; the record says so in ``cache_from``.

Refit (``--refit``, default resnet50 and bert: the first case of each): the model compiled with
compile_backend (on the first compile_backend peer's cache: an engine-cache hit), called until
warm, then ``model.load_state_dict(perturbed copy)`` (every float weight and buffer times
1 + 0.1 N(0, 1), clamped to [0.5, 1.5]: BatchNorm variances stay positive) and the next call
timed: refit + run, against the median of plain calls (wall clock around a synchronised call,
the same way for both). Checked: the output changed, and it follows eager with the new weights
(its distance to eager-with-new-weights is under a tenth of its distance to the old output),
and no engine was rebuilt (a recompile would pass for a slow refit). The original weights are
loaded back afterwards.

Records (a JSON list, appended to ``--out``): the runner's peer records with ``kind:
"latency"``, and ``kind: "refit"`` records; each with device, torch, triton, commit, date.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from compile_backend.bench.cli import load_model
from compile_backend.bench.measure import (compare, peer_cache_root, peer_options, run_peer, snapshot,
                                           strict_fp32, sync, time_first_call, to_device)
from compile_backend.bench.peers import PRECISIONS, parse_options, parse_peers, split_peer
from compile_backend.bench.results import ResultsFile, add_ratios, environment, format_table

DEFAULT_CASES = "resnet50:1,bert:1,bert:16"
DEFAULT_PEERS = "eager,inductor-reduce-overhead,compile_backend,compile_backend[cuda_graphs=off]"
REFIT_SCALE = 0.1


def log(message: str) -> None:
    print(f"[engine_bench] {message}", file=sys.stderr, flush=True)


def parse_cases(text: str) -> List[Tuple[str, int]]:
    """``'resnet50:1,bert:16'`` -> ``[('resnet50', 1), ('bert', 16)]`` (zoo names, batch >= 1)."""
    from compile_backend import zoo

    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, batch = item.partition(":")
        zoo.spec(name, "tiny")  # validates the name
        if not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"case {item!r} must be model:batch with a positive batch")
        cases.append((name, int(batch)))
    if not cases:
        raise ValueError("no cases given")
    return cases


# ----------------------------------------------------------------------------- latency

def prepare_case(name: str, batch: int, args):
    """(model in the run's dtype, inputs, fp32 eager reference outputs, logits flag), as the runner's run."""
    fp32_model, fp32_inputs, logits = load_model(name, args.size, batch, args.device, args.seed)
    with torch.no_grad(), strict_fp32():
        ref = snapshot(fp32_model(*fp32_inputs))
    dtype = PRECISIONS[args.precision]
    model = copy.deepcopy(fp32_model).to(dtype).eval()
    inputs = tuple(to_device(t, args.device, dtype) for t in fp32_inputs)
    return model, inputs, ref, logits


def runner_args(name: str, batch: int, args) -> SimpleNamespace:
    """What run_peer reads from its command line."""
    return SimpleNamespace(model=name, size=args.size, batch=batch, precision=args.precision,
                           user_options=args.user_options, device=args.device, iters=args.iters,
                           warmup=args.warmup, warm_compile=False, seed=args.seed, warm_timeout=0)


def run_case(name: str, batch: int, args, env: Dict[str, Any], deadline: float,
             results: ResultsFile, records: List[dict]) -> None:
    model, inputs, ref, logits = prepare_case(name, batch, args)
    base = dict(model=name, size=args.size, batch=batch, precision=args.precision, iters=args.iters,
                warmup=args.warmup, kind="latency", **env)
    rargs = runner_args(name, batch, args)
    cache_root = tempfile.mkdtemp(prefix=f"engine-bench-{name}-{batch}-", dir=args.cache_root)
    first_cb: Optional[str] = None  # the first compile_backend peer: its cache seeds the others
    case_records: List[dict] = []
    try:
        for peer in args.peers:
            if time.monotonic() > deadline:
                record = dict(base, backend=peer, error=f"not measured: time budget ({args.budget_s:.0f} s) spent")
            else:
                cache_from = _seed_cache(peer, first_cb, cache_root, args)
                record = run_peer(peer, model, inputs, ref, logits, rargs, cache_root, base)
                record["cache_from"] = cache_from
                if first_cb is None and split_peer(peer)[0] == "compile_backend":
                    first_cb = peer
            case_records.append(record)
            add_ratios(case_records)
            results.write(records + case_records)
        print(f"\n{name} batch={batch} size={args.size} precision={args.precision} device={env['device']}")
        print(format_table(case_records), flush=True)
        records.extend(case_records)
        if name in args.refit and name not in args.refit_done:
            args.refit_done.add(name)
            if time.monotonic() > deadline:
                refit = dict(base, kind="refit", backend="compile_backend",
                             error=f"not measured: time budget ({args.budget_s:.0f} s) spent")
            else:
                cb_cache = peer_cache_root(cache_root, first_cb or "compile_backend")
                refit = measure_refit(model, inputs, logits, args, base, os.path.join(cb_cache, "compile_backend"))
            records.append(refit)
            results.write(records)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
        del model, inputs
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _seed_cache(peer: str, first_cb: Optional[str], cache_root: str, args) -> Optional[str]:
    """Copy the first compile_backend peer's cache directory into this peer's (see the module doc)."""
    if not args.share_tuning or first_cb is None or split_peer(peer)[0] != "compile_backend":
        return None
    src = os.path.join(peer_cache_root(cache_root, first_cb), "compile_backend")
    dst = os.path.join(peer_cache_root(cache_root, peer), "compile_backend")
    if not os.path.isdir(src):
        return None
    shutil.copytree(src, dst, symlinks=False, dirs_exist_ok=True)  # keeps the 0700 modes
    return first_cb


# ----------------------------------------------------------------------------- refit

def perturbed(state: Dict[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
    """Every float tensor times (1 + REFIT_SCALE * N(0, 1)) clamped to [0.5, 1.5]; others as-is."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=gen, dtype=torch.float32)
            factor = (1 + REFIT_SCALE * noise).clamp(0.5, 1.5).to(v.device, v.dtype)
            out[k] = v * factor
        else:
            out[k] = v.clone()
    return out


def _timed_ms(call, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    call()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def _rel_l2(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float((x - y).norm() / y.norm()) if float(y.norm()) > 0 else float((x - y).norm())


def measure_refit(model, inputs, logits, args, base: dict, cache_dir: str) -> dict:
    """Time the first call after ``load_state_dict`` (refit + run) against plain calls."""
    from compile_backend.backend import compile_backend
    from compile_backend.report import Report

    record = dict(base, kind="refit", backend="compile_backend")
    log(f"{base['model']} batch {base['batch']}: refit ...")
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = Report()

    def backend(gm, example_inputs, **kwargs):  # the registered backend's function, + a report
        return compile_backend(gm, example_inputs, report=report, **kwargs)

    options = peer_options("compile_backend", args.precision, args.user_options, cache_dir)
    record["options"] = {k: v for k, v in options.items() if k != "cache_dir"}
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend, options=options)
        call = lambda: compiled(*inputs)  # noqa: E731
        with torch.no_grad():
            record["first_call_s"], _ = time_first_call(call, args.device)
            for _ in range(args.warmup):
                call()
            before = snapshot(call())
            plain = [_timed_ms(call, args.device) for _ in range(args.refit_calls)]
            engines = len(report.graphs)
            model.load_state_dict(perturbed(original, args.seed + 7))
            refit_call = _timed_ms(call, args.device)
            rebuilt = len(report.graphs) - engines
            after = snapshot(call())
            later = [_timed_ms(call, args.device) for _ in range(args.refit_calls)]
            eager_new = snapshot(model(*inputs))
        plain_ms, later_ms = statistics.median(plain), statistics.median(later)
        changed = _rel_l2(after, before)
        vs_eager = compare(after, eager_new, logits)
        stale_vs_eager = _rel_l2(before, eager_new)
        record.update(
            plain_call_ms=plain_ms, refit_call_ms=refit_call, refit_ms=refit_call - plain_ms,
            after_refit_call_ms=later_ms, engines_rebuilt=rebuilt,
            output_changed_rel_l2=changed, stale_vs_new_eager_rel_l2=stale_vs_eager,
            accuracy_vs_new_eager=vs_eager,
            output_changed=changed > 1e-3,
            matches_new_eager=vs_eager["finite"] and vs_eager["rel_l2"] is not None
            and vs_eager["rel_l2"] < 0.1 * stale_vs_eager,
        )
        record["ok"] = record["output_changed"] and record["matches_new_eager"] and rebuilt == 0
        log(f"{base['model']} batch {base['batch']}: refit {record['refit_ms']:.2f} ms "
            f"(call {refit_call:.2f} ms vs {plain_ms:.2f} ms), ok={record['ok']}")
    except Exception as exc:  # noqa: BLE001  (record it; the run goes on)
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-4000:]
        log(f"{base['model']}: refit FAILED: {record['error'][:300]}")
    finally:
        model.load_state_dict(original)
        torch._dynamo.reset()
    return record


def format_refit_table(records: List[dict]) -> str:
    rows = [("model", "batch", "plain ms", "refit call ms", "refit ms", "after ms", "rebuilt",
             "changed", "vs new eager", "ok")]
    for r in records:
        if "error" in r:
            rows.append((r["model"], str(r["batch"]), "ERROR: " + r["error"][:100]) + ("",) * 7)
            continue
        rows.append((r["model"], str(r["batch"]), f"{r['plain_call_ms']:.3f}", f"{r['refit_call_ms']:.3f}",
                     f"{r['refit_ms']:.3f}", f"{r['after_refit_call_ms']:.3f}", str(r["engines_rebuilt"]),
                     f"{r['output_changed_rel_l2']:.2e}", f"{r['accuracy_vs_new_eager']['rel_l2']:.2e}",
                     "yes" if r["ok"] else "NO"))
    widths = [max(len(row[i]) for row in rows if not row[2].startswith("ERROR") or i < 2) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        if row[2].startswith("ERROR"):
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}")
        else:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_bench",
                                description="Small-batch latency, CUDA graphs and refit of compile_backend.")
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated model:batch (zoo models)")
    p.add_argument("--peers", default=DEFAULT_PEERS,
                   help="comma-separated peers as for the runner's --compare (compile_backend[k=v] too)")
    p.add_argument("--refit", default="resnet50,bert",
                   help="models whose first case also measures refit ('' for none)")
    p.add_argument("--refit-calls", type=int, default=20, help="plain calls timed around the refit")
    p.add_argument("--size", choices=("tiny", "base"), default=None, help="default: base on CUDA, tiny on CPU")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16")
    p.add_argument("--options", default=None, help="compile_backend options for every compile_backend peer")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON: a list of records, appended to")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="no new peer starts after this many seconds (one already running finishes: "
                        "leave room for a cold compile under the 10-minute limit)")
    p.add_argument("--cache-root", default=None, help="parent of the temporary cache directories")
    p.add_argument("--no-share-tuning", dest="share_tuning", action="store_false",
                   help="every compile_backend peer compiles from an empty cache")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.user_options = parse_options(args.options)
        args.peers = parse_peers(args.peers)
        cases = parse_cases(args.cases)
        args.refit = {m.strip() for m in args.refit.split(",") if m.strip()}
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.iters < 1 or args.warmup < 0 or args.refit_calls < 1:
        print("error: --iters and --refit-calls must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.size = args.size or ("base" if args.device.startswith("cuda") else "tiny")
    args.refit_done = set()
    env = environment(args.device, commit=args.commit)
    results = ResultsFile(args.out)
    records: List[dict] = []
    deadline = time.monotonic() + args.budget_s
    for name, batch in cases:
        try:
            run_case(name, batch, args, env, deadline, results, records)
        except Exception as exc:  # noqa: BLE001  (building the case failed: record it, go on)
            log(f"{name} batch {batch}: FAILED: {type(exc).__name__}: {exc}")
            records.append(dict(model=name, size=args.size, batch=batch, precision=args.precision,
                                kind="latency", backend=None, error=f"{type(exc).__name__}: {exc}",
                                traceback=traceback.format_exc()[-4000:], **env))
            results.write(records)
    refits = [r for r in records if r["kind"] == "refit"]
    if refits:
        print(f"\nrefit (load_state_dict, then one call), {args.size}, {args.precision}, {env['device']}")
        print(format_refit_table(refits), flush=True)
    print(f"\ntorch={env['torch']} triton={env['triton']} commit={env['commit']} date={env['date']}")
    failed = [r for r in records if "error" in r or r.get("ok") is False]
    return 1 if records and len(failed) == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
