"""Flash-attention forward (compile_backend/kernels/attention.py) vs PyTorch on a CUDA GPU.

  PYTHONPATH=. python3 benchmarks/attention_bench.py --sweep --out $OUT/attention_bench.json

(about 3 minutes on an H100, most of it compiling the swept configs; --budget-s caps the sweep)

1. records device/torch/triton and the two ceilings (device copy bandwidth, fp16 matmul rate);
2. checks correctness on CUDA against the fp32 reference (output poisoned with NaN first, so an
   unwritten element shows), and records what CUDA SDPA returns for fully masked rows;
3. times ours (heuristic config), ``F.scaled_dot_product_attention`` (default dispatch), the
   explicit eager chain (matmul, softmax, matmul) and, on the goal shapes (s512 d64 / d128
   fp16), that chain through ``torch.compile`` (Inductor; it may rewrite it to SDPA): median ms
   and TFLOP/s
   (4*B*H*Sq*Sk*D flops, halved for causal as is customary). Default timing: a CUDA graph of
   one call per input set (4 sets, rotated so that no call finds its inputs in L2), replayed
   after an L2 flush: GPU time without the Python launch cost. ``--timing events`` is what
   runs 1-2 used (do_bench per call), which adds host time when the host is the slower side;
4. with --sweep, times every candidate config (``candidate_configs``: block shapes, warps,
   stages, TMA loads) on the goal shapes s512-d64-fp16 and s512-d128-fp16, then the default and
   the fastest few of the matching goal shape on the other shapes (stops at --budget-s); every
   timed config is checked against SDPA. The summary prints each shape's winner against the
   default and SDPA.

Writes JSON to --out (default $OUT/attention_bench.json, else ./attention_bench.json) and says so.
Notes and conclusions: benchmarks/notes/attention.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compile_backend.ops  # noqa: E402,F401  (registers torch.ops.compile_backend.attention)
from compile_backend.kernels.attention import (  # noqa: E402
    AttentionConfig,
    attention_reference,
    candidate_configs,
    default_config,
    flash_attention,
)
from benchmarks.timing import graph_median_ms  # noqa: E402

# (name, B, H, Sq, Sk, D, dtype, causal, mask kind)
SHAPES = [
    ("s512-d64-fp16", 16, 12, 512, 512, 64, torch.float16, False, None),
    ("s512-d64-fp16-causal", 16, 12, 512, 512, 64, torch.float16, True, None),
    ("s2048-d64-fp16", 16, 12, 2048, 2048, 64, torch.float16, False, None),
    ("s2048-d64-fp16-causal", 16, 12, 2048, 2048, 64, torch.float16, True, None),
    ("s512-d128-fp16", 16, 12, 512, 512, 128, torch.float16, False, None),
    ("s512-d64-bf16", 16, 12, 512, 512, 64, torch.bfloat16, False, None),
    ("s512-d64-fp16-padmask", 16, 12, 512, 512, 64, torch.float16, False, "padding"),
    ("s512-d80-fp16", 16, 12, 512, 512, 80, torch.float16, False, None),
]
#: the benchmark is for CUDA; a module variable so a CPU dry run of the script logic can swap it
DEVICE = "cuda"
#: swept over every candidate config (issue #5: s512 d64 fp16 no slower than SDPA; d128 too)
GOAL_SHAPES = ("s512-d64-fp16", "s512-d128-fp16")
#: then, each with the default and the fastest configs of the goal shape of its head dim
FOLLOW_SHAPES = ("s512-d64-fp16-causal", "s512-d64-bf16", "s2048-d64-fp16", "s2048-d64-fp16-causal", "s512-d80-fp16")
SWEEP_SHAPES = GOAL_SHAPES + FOLLOW_SHAPES
COMPARE_SHAPES = ("s512-d64-fp16", "s512-d64-fp16-causal", "s2048-d64-fp16", "s512-d64-bf16")


#: "graph" (default): one CUDA graph holding one call per input set, replayed after an L2
#: flush; "events": triton's do_bench per call (runs 1-2 used it; it counts host launch time
#: whenever the host takes longer than the GPU, see benchmarks/notes/attention.md)
TIMING = "graph"
#: input sets rotated inside the graph so that no call finds its inputs in L2 (50 MB on H100)
N_INPUT_SETS = 4


def _median_ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _graph_median_ms(fns, reps: int = 25) -> float:
    return graph_median_ms(fns, reps=reps, warm_replays=3)


def time_call(make_fn, input_sets) -> tuple:
    """(median ms per call, method). make_fn(inputs) -> zero-argument callable."""
    fns = [make_fn(inputs) for inputs in input_sets]
    if TIMING == "graph":
        try:
            return _graph_median_ms(fns), "graph"
        except Exception as exc:  # capture failed: fall back, and say so in the record
            torch.cuda.synchronize()
            return _median_ms(fns[0]), f"events (graph failed: {type(exc).__name__}: {str(exc)[:120]})"
    return _median_ms(fns[0]), "events"


def ceilings() -> dict:
    n = 1 << 28  # 512 MiB of fp16 per side
    src = torch.randn(n, device=DEVICE, dtype=torch.float16)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.float16)
    mm_ms = _median_ms(lambda: a @ b)
    del src, dst, a, b
    return {"copy_TBps": 2 * n * 2 / copy_ms / 1e9, "fp16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def make_inputs(b, h, sq, sk, d, dtype, mask_kind, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(b, h, sq, d, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(b, h, sk, d, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(b, h, sk, d, device=DEVICE, dtype=dtype, generator=g)
    mask = None
    if mask_kind == "padding":
        lengths = torch.randint(sk // 2, sk + 1, (b,), device=DEVICE, generator=g)
        mask = (torch.arange(sk, device=DEVICE)[None, :] < lengths[:, None])[:, None, None, :]
    elif mask_kind == "additive":
        mask = torch.randn(b, h, sq, sk, device=DEVICE, generator=g).to(dtype)
    return q, k, v, mask


def poisoned_call(fn, numel, dtype):
    """Fill a block of the output's size with NaN and free it, so the caching allocator hands
    that memory to the output: any element the kernel does not write stays NaN."""
    junk = torch.full((numel,), float("nan"), device=DEVICE, dtype=dtype)
    del junk
    return fn()


def check_correctness() -> list:
    rows = []
    cases = [  # odd sizes: tails everywhere
        (2, 3, 197, 333, 64, torch.float16, False, "padding"),
        (2, 3, 333, 197, 80, torch.float16, True, None),
        (2, 3, 257, 257, 96, torch.bfloat16, True, "additive"),
        (2, 3, 130, 130, 128, torch.bfloat16, False, None),
        (2, 3, 67, 129, 32, torch.float32, True, "padding"),
        (1, 2, 1, 300, 64, torch.float16, False, None),
        (16, 12, 512, 512, 64, torch.float16, False, None),
        (4, 12, 2048, 2048, 64, torch.float16, True, None),
    ]
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
    tma = AttentionConfig(64, 64, 4, 2, tma=True)
    for b, h, sq, sk, d, dtype, causal, mk in cases:
        q, k, v, mask = make_inputs(b, h, sq, sk, d, dtype, mk, seed=sq)
        runs = [(False, None), (True, None)] if dtype == torch.float32 else [(True, None)]
        if dtype != torch.float32 and sq >= 64 and (sq % 64 or sk % 64):  # TMA descriptors, with tails
            runs.append((True, tma))
        for allow_tf32, cfg in runs:
            try:
                out = poisoned_call(lambda: flash_attention(q, k, v, mask, None, causal, cfg, allow_tf32),
                                    b * h * sq * d, dtype)
                torch.cuda.synchronize()
            except Exception as exc:  # e.g. a Triton that cannot compile the TMA variant
                rows.append({"shape": [b, h, sq, sk, d], "dtype": str(dtype), "causal": causal, "mask": mk,
                             "config": cfg.as_dict() if cfg else "default", "rel_err": float("nan"), "ok": False,
                             "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            ref = attention_reference(q.float(), k.float(), v.float(), mask, None, causal)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            sdpa = torch.ops.compile_backend.attention(q, k, v, mask, 1 / math.sqrt(d), causal).float()
            sdpa_err = ((sdpa - ref).norm() / ref.norm()).item()
            limit = 5e-3 if (dtype == torch.float32 and allow_tf32) else tol[dtype]
            rows.append({
                "shape": [b, h, sq, sk, d], "dtype": str(dtype), "causal": causal, "mask": mk,
                "config": cfg.as_dict() if cfg else "default", "allow_tf32": allow_tf32, "rel_err": err, "sdpa_rel_err": sdpa_err,
                "nan": bool(out.isnan().any()), "ok": bool(err <= limit and not out.isnan().any()),
            })
    return rows


def fully_masked_rows() -> dict:
    """What CUDA SDPA (through the fused op) and our kernel return for a row with no visible key."""
    q, k, v, _ = make_inputs(2, 3, 64, 64, 64, torch.float16, None)
    keep = torch.ones(2, 3, 64, 64, dtype=torch.bool, device=DEVICE)
    keep[:, :, 5] = False
    additive = torch.zeros(2, 3, 64, 64, device=DEVICE, dtype=torch.float16).masked_fill(~keep, float("-inf"))
    result = {}
    for name, mask in (("bool", keep), ("additive_-inf", additive)):
        sdpa = torch.ops.compile_backend.attention(q, k, v, mask, 0.125, False)
        ours = flash_attention(q, k, v, mask, 0.125, False)
        result[name] = {
            "sdpa_row": "nan" if sdpa[:, :, 5].isnan().any() else ("zero" if (sdpa[:, :, 5] == 0).all() else "other"),
            "ours_row": "nan" if ours[:, :, 5].isnan().any() else ("zero" if (ours[:, :, 5] == 0).all() else "other"),
            "other_rows_rel_diff": ((ours[:, :, 6:].float() - sdpa[:, :, 6:].float()).norm() / sdpa[:, :, 6:].float().norm()).item(),
            # a finite "very negative" fill instead of -inf makes the row a plain mean of v
            "sdpa_row_minus_mean_v": (sdpa[:, :, 5].float() - v.float().mean(dim=2)).abs().max().item(),
        }
    return result


def flops(b, h, sq, sk, d, causal) -> float:
    f = 4.0 * b * h * sq * sk * d
    return f / 2 if causal else f


def eager_chain(q, k, v, mask, causal):
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def time_shapes() -> list:
    rows = []
    for name, b, h, sq, sk, d, dtype, causal, mk in SHAPES:
        sets = [make_inputs(b, h, sq, sk, d, dtype, mk, seed=i) for i in range(N_INPUT_SETS)]
        cfg = default_config(d, d, sq, sk, dtype, causal)
        providers = {
            "compile_backend_triton": lambda t: (lambda: flash_attention(*t, None, causal, cfg)),
            "torch_sdpa": lambda t: (lambda: F.scaled_dot_product_attention(t[0], t[1], t[2], attn_mask=t[3], is_causal=causal)),
            "eager_chain": lambda t: (lambda: eager_chain(*t, causal)),
        }
        if name in GOAL_SHAPES:  # Inductor compiles in ~10 s per shape: the goal shapes only
            torch._dynamo.reset()
            compiled_chain = torch.compile(eager_chain, dynamic=False)
            providers["inductor_chain"] = lambda t: (lambda: compiled_chain(*t, causal))
        for provider, make_fn in providers.items():
            try:
                ms, method = time_call(make_fn, sets)
                rows.append({"shape": name, "provider": provider, "median_ms": ms, "timing": method,
                             "tflops": flops(b, h, sq, sk, d, causal) / ms / 1e9,
                             "config": cfg.as_dict() if provider == "compile_backend_triton" else None})
            except Exception as exc:  # e.g. out of memory in the eager chain
                rows.append({"shape": name, "provider": provider, "error": f"{type(exc).__name__}: {exc}"[:300]})
        del sets
    return rows


def compiled_kernel_info(call, out_dir=None, tag="") -> dict:
    """Registers, spills and instruction counts of the kernel that ``call`` launches (captured
    by wrapping the module's jit function for one launch)."""
    import compile_backend.kernels.attention as module

    real, captured = module._flash_attention_fwd, {}

    class _Capture:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                captured["kernel"] = real[grid](*args, **kwargs)
                return captured["kernel"]
            return launch

    module._flash_attention_fwd = _Capture()
    try:
        call()
        torch.cuda.synchronize()
    finally:
        module._flash_attention_fwd = real
    kernel = captured.get("kernel")
    if kernel is None:
        return {"error": "no kernel captured"}
    ptx = kernel.asm.get("ptx", "")
    info = {"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
            "shared": getattr(kernel.metadata, "shared", None)}
    for needle in ("cp.async.cg", "cp.async.bulk", "wgmma.mma_async", "mma.sync", "ex2.approx",
                   "cvt.rn.f16x2.f32", "cvt.rn.bf16x2.f32", "cvt.rn.bf16.f32", "ld.global", "st.shared"):
        info[needle] = ptx.count(needle)
    try:
        import collections
        import re
        sass = kernel.asm["sass"]
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
        info["sass_top"] = collections.Counter(o.split(".")[0] for o in ops).most_common(24)
        if out_dir:
            with open(os.path.join(out_dir, f"attn_{tag}.sass"), "w") as f:
                f.write(sass)
    except Exception as exc:  # nvdisasm missing
        info["sass_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if out_dir:
        with open(os.path.join(out_dir, f"attn_{tag}.ttgir"), "w") as f:
            f.write(kernel.asm.get("ttgir", ""))
    return info


def diagnostics(out_dir) -> dict:
    result = {}
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, mask = make_inputs(16, 12, 512, 512, 64, dtype, None)
        tag = str(dtype).split(".")[-1]
        result[tag] = compiled_kernel_info(lambda: flash_attention(q, k, v), out_dir, tag)
    return result


def compare_module(path: str) -> list:
    """Times another version of the kernel file (e.g. the previous one) on the main shapes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compile_backend.kernels.attention_compare", path)  # relative imports
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    rows = []
    for name, b, h, sq, sk, d, dtype, causal, mk in SHAPES:
        if name not in COMPARE_SHAPES:
            continue
        sets = [make_inputs(b, h, sq, sk, d, dtype, mk, seed=i) for i in range(N_INPUT_SETS)]
        ms, method = time_call(lambda t: (lambda: module.flash_attention(*t, None, causal)), sets)
        rows.append({"shape": name, "provider": f"compare:{os.path.basename(path)}", "median_ms": ms,
                     "timing": method, "tflops": flops(b, h, sq, sk, d, causal) / ms / 1e9})
    return rows


def _leader_key(d: int) -> str:
    return "d64" if d <= 64 else "d128"


def sweep(deadline: float, follow_top: int = 4) -> list:
    """Every candidate on the goal shapes; on the others only the default and the
    ``follow_top`` fastest configs of the goal shape with the same head-dim class."""
    rows: list = []
    leaders: dict = {}
    by_name = {s[0]: s for s in SHAPES}
    for name in SWEEP_SHAPES:
        _, b, h, sq, sk, d, dtype, causal, mk = by_name[name]
        sets = [make_inputs(b, h, sq, sk, d, dtype, mk, seed=i) for i in range(N_INPUT_SETS)]
        q, k, v, mask = sets[0]
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).float()
        configs = candidate_configs(d, d, sq, sk, dtype, causal)
        if name not in GOAL_SHAPES:
            configs = [configs[0]] + [c for c in leaders.get(_leader_key(d), []) if c != configs[0]]
        timed = []
        for cfg in configs:
            if time.time() > deadline:
                rows.append({"shape": name, "stopped": "time budget"})
                return rows
            try:
                ms, method = time_call(lambda t: (lambda: flash_attention(*t, None, causal, cfg)), sets)
                # every timed config is also checked, so any of them may become the default
                out = flash_attention(q, k, v, mask, None, causal, cfg).float()
                err = ((out - expected).norm() / expected.norm()).item()
                rows.append({"shape": name, "config": cfg.as_dict(), "median_ms": ms, "timing": method,
                             "tflops": flops(b, h, sq, sk, d, causal) / ms / 1e9, "rel_err_vs_sdpa": err,
                             "is_default": cfg == configs[0]})
                if err < 1e-2:
                    timed.append((ms, cfg))
            except Exception as exc:  # out of shared memory / registers for this config
                rows.append({"shape": name, "config": cfg.as_dict(), "error": f"{type(exc).__name__}: {exc}"[:200]})
        if name in GOAL_SHAPES:
            leaders[_leader_key(d)] = [cfg for _, cfg in sorted(timed, key=lambda t: t[0])[:follow_top]]
        del sets, q, k, v, mask, expected
    return rows


def _short(cfg: dict) -> str:
    return f"({cfg['block_m']},{cfg['block_n']},{cfg['num_warps']}w,{cfg['num_stages']}s{',tma' if cfg.get('tma') else ''})"


def winners(result: dict) -> list:
    """Per swept shape: the fastest correct config against the default and SDPA."""
    sdpa = {r["shape"]: r["median_ms"] for r in result.get("timings", [])
            if r.get("provider") == "torch_sdpa" and "median_ms" in r}
    out = []
    for shape in SWEEP_SHAPES:
        done = [r for r in result.get("sweep", []) if r.get("shape") == shape and "median_ms" in r
                and r["rel_err_vs_sdpa"] < 1e-2]
        if not done:
            continue
        best = min(done, key=lambda r: r["median_ms"])
        default = next((r for r in done if r.get("is_default")), None)
        out.append({"shape": shape, "winner": best["config"], "winner_ms": best["median_ms"],
                    "default": default["config"] if default else None,
                    "default_ms": default["median_ms"] if default else None,
                    "sdpa_ms": sdpa.get(shape), "configs_timed": len(done),
                    "winner_vs_sdpa": best["median_ms"] / sdpa[shape] - 1 if shape in sdpa else None})
    return out


def main() -> None:
    global TIMING
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time every candidate config on the main shapes")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop the sweep this many seconds after the start")
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", default=None, help="path of another attention.py to time on the main shapes")
    parser.add_argument("--timing", choices=("graph", "events"), default=TIMING,
                        help="graph: CUDA-graph replays over rotated inputs (kernel time); events: do_bench per call")
    parser.add_argument("--diagnose", action="store_true", help="registers/spills/instruction counts (+ ttgir, sass)")
    args = parser.parse_args()
    TIMING = args.timing
    start = time.time()
    out_path = args.out or os.path.join(os.environ.get("OUT") or ".", "attention_bench.json")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "timing": args.timing, "input_sets": N_INPUT_SETS,
    }

    def save():
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    result["ceilings"] = ceilings()
    result["correctness"] = check_correctness()
    result["fully_masked_rows"] = fully_masked_rows()
    save()
    if args.diagnose:
        result["diagnostics"] = diagnostics(os.path.dirname(out_path))
        save()
    result["timings"] = time_shapes()
    if args.compare:
        result["timings"] += compare_module(args.compare)
    save()
    if args.sweep:
        result["sweep"] = sweep(start + args.budget_s)
        result["winners"] = winners(result)
        save()

    print(f"device {result['device']}  torch {result['torch']}  triton {result['triton']}")
    print("ceilings:", {k: round(v, 1) for k, v in result["ceilings"].items()})
    bad = [r for r in result["correctness"] if not r["ok"]]
    print(f"correctness: {len(result['correctness']) - len(bad)}/{len(result['correctness'])} ok;",
          "max rel err", max((r["rel_err"] for r in result["correctness"] if "error" not in r), default=None))
    for r in bad:
        print("  FAIL", r)
    print("fully masked rows:", result["fully_masked_rows"])
    for tag, info in result.get("diagnostics", {}).items():
        print("diagnostics", tag, {k: v for k, v in info.items() if k != "sass_top"})
        print("   sass", info.get("sass_top"))
    print(f"{'shape':28s} {'provider':24s} {'ms':>8s} {'TFLOP/s':>8s}")
    for r in result["timings"]:
        if "error" in r:
            print(f"{r['shape']:28s} {r['provider']:24s} {r['error'][:60]}")
        else:
            print(f"{r['shape']:28s} {r['provider']:24s} {r['median_ms']:8.4f} {r['tflops']:8.1f}  {r['timing'][:40]}")
    if args.sweep:
        for shape in SWEEP_SHAPES:
            done = sorted((r for r in result["sweep"] if r.get("shape") == shape and "median_ms" in r),
                          key=lambda r: r["median_ms"])
            for r in done[:4]:
                print(f"sweep {shape:24s} {r['median_ms']:8.4f} ms {r['tflops']:6.1f} TFLOP/s "
                      f"{_short(r['config'])} err {r['rel_err_vs_sdpa']:.1e}")
            errors = [r for r in result["sweep"] if r.get("shape") == shape and "error" in r]
            if errors:
                print(f"sweep {shape}: {len(errors)} configs failed, e.g. {_short(errors[0]['config'])} "
                      f"{errors[0]['error'][:100]}")
        if any("stopped" in r for r in result["sweep"]):
            print("sweep stopped at the time budget (--budget-s)")
        print(f"\n{'winner per shape':24s} {'winner':26s} {'ms':>8s} {'default':26s} {'ms':>8s} {'SDPA ms':>8s} vs SDPA")
        for w in result["winners"]:
            dflt = (_short(w["default"]), f"{w['default_ms']:8.4f}") if w["default"] else ("-", "       -")
            vs = f"{100 * w['winner_vs_sdpa']:+.1f}%" if w["winner_vs_sdpa"] is not None else "-"
            sdpa_ms = f"{w['sdpa_ms']:8.4f}" if w["sdpa_ms"] else "       -"
            print(f"{w['shape']:24s} {_short(w['winner']):26s} {w['winner_ms']:8.4f} {dflt[0]:26s} {dflt[1]} {sdpa_ms} {vs}")
    print(f"wrote {out_path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
