"""Achieved memory bandwidth of the generated pointwise / reduction kernels vs copy, eager, Inductor.

Usage (GPU machine, repo root):
    PYTHONPATH=. python3 benchmarks/kernels_bandwidth.py --out $OUT/kernels_bandwidth.json --deadline 200
    PYTHONPATH=. python3 benchmarks/kernels_bandwidth.py --smoke   # CPU + interpreter, checks the script

Cases (each traced with make_fx into the group the builder gets, as the partitioner hands it):
  pointwise  add -> gelu -> mul -> cast chain, (x + bias[N]) .gelu * y .to(out dtype)
  layernorm  residual add + native_layer_norm (outputs: the sum and the normalised tensor)
  softmax    softmax over the last dim (persistent rows, and a looped long row)
Bytes = every input read once + every output written once; bandwidth = bytes / median time.
The copy ceiling is a device-to-device ``copy_`` of 1 GiB (bytes read + written). Inputs are
rotated over enough sets to exceed 2x the L2 cache. Times are ``triton.testing.do_bench``
medians (CUDA events). Our kernel is timed through its Python launcher (what the engine calls).
Results: JSON with the device, torch and triton versions; a compact table printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the interpreter must be chosen before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from torch.fx.passes.fake_tensor_prop import FakeTensorProp  # noqa: E402

from compile_backend.kernels.base import KernelContext, KernelGroup  # noqa: E402
from compile_backend.kernels.launch import PointwiseConfig, ReductionConfig  # noqa: E402
from compile_backend.kernels.pointwise import build_pointwise  # noqa: E402
from compile_backend.kernels.reduction import build_reduction  # noqa: E402
from compile_backend.options import Options  # noqa: E402

DEV = torch.device("cpu" if SMOKE else "cuda")


def chain(x, bias, y):
    return (F.gelu(x + bias) * y).to(torch.bfloat16 if x.dtype == torch.float32 else x.dtype)


def layernorm_residual(x, r, w, b):
    h = x + r
    return h, F.layer_norm(h, (x.shape[-1],), w, b, 1e-5)


def softmax(x):
    return torch.softmax(x, -1)


# (kind, name, fn, input maker, extra configs to try besides the heuristic)
def cases():
    def pw(m, n, dt):
        return lambda: [randn(m, n, dt), randn(n, dt), randn(m, n, dt)]

    def ln(m, h, dt):
        return lambda: [randn(m, h, dt), randn(m, h, dt), randn(h, dt), randn(h, dt)]

    def sm(m, n, dt):
        return lambda: [randn(m, n, dt) * 4]

    if SMOKE:
        return [("pointwise", "chain fp16 33x70", chain, pw(33, 70, torch.float16), []),
                ("layernorm", "ln+res bf16 9x96", layernorm_residual, ln(9, 96, torch.bfloat16), []),
                ("softmax", "softmax fp16 5x300 looped", softmax, sm(5, 300, torch.float16),
                 [ReductionConfig(xblock=1, rblock=128, persistent=False)])]
    pcfg = [PointwiseConfig(1024, 4), PointwiseConfig(2048, 8), PointwiseConfig(4096, 8)]
    return [
        ("pointwise", "chain fp16 8192x8192", chain, pw(8192, 8192, torch.float16), pcfg),
        ("pointwise", "chain fp32->bf16 8192x8192", chain, pw(8192, 8192, torch.float32), pcfg),
        ("pointwise", "chain fp16 1024x1024", chain, pw(1024, 1024, torch.float16), []),
        ("layernorm", "ln+res bf16 16384x768", layernorm_residual, ln(16384, 768, torch.bfloat16),
         [ReductionConfig(4, 1024, 4), ReductionConfig(2, 1024, 4), ReductionConfig(1, 1024, 2)]),
        ("layernorm", "ln+res bf16 8192x4096", layernorm_residual, ln(8192, 4096, torch.bfloat16),
         [ReductionConfig(1, 4096, 4), ReductionConfig(1, 4096, 16)]),
        ("softmax", "softmax fp16 32768x1024", softmax, sm(32768, 1024, torch.float16),
         [ReductionConfig(4, 1024, 4), ReductionConfig(1, 1024, 4)]),
        ("softmax", "softmax fp16 8192x4096", softmax, sm(8192, 4096, torch.float16),
         [ReductionConfig(1, 4096, 4), ReductionConfig(1, 4096, 16)]),
        ("softmax", "softmax fp16 2048x32768 (looped)", softmax, sm(2048, 32768, torch.float16),
         [ReductionConfig(1, 4096, 8, False), ReductionConfig(1, 2048, 4, False),
          ReductionConfig(1, 32768, 16, True)]),
    ]


def randn(*shape_and_dtype):
    *shape, dtype = shape_and_dtype
    return torch.randn(*shape, device=DEV).to(dtype)


def traced_group(kind: str, fn, inputs) -> KernelGroup:
    def as_tuple(*a):
        out = fn(*a)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    gm = make_fx(as_tuple)(*inputs)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    return KernelGroup("reduction" if kind != "pointwise" else "pointwise", gm)


def median_ms(fn, sets) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn(*sets[0])
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    i = [0]

    def call():
        fn(*sets[i[0] % len(sets)])
        i[0] += 1

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    n = (1 << 30) // 4 if not SMOKE else 1 << 16
    src, dst = torch.randn(n, device=DEV), torch.empty(n, device=DEV)
    ms = median_ms(lambda: dst.copy_(src), [()])
    return 2 * n * 4 / ms / 1e6  # GB/s


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def kernel_facts(kernel) -> dict:
    compiled = getattr(kernel.fn, "last_compiled", None)
    if compiled is None:
        return {}
    facts = {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None)}
    ptx = compiled.asm.get("ptx", "") if hasattr(compiled, "asm") else ""
    facts["ld_v4"] = ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4")
    facts["ld_v2"] = ptx.count("ld.global.v2") + ptx.count("ld.global.nc.v2")
    facts["st_v4"] = ptx.count("st.global.v4")
    return facts


def max_err(got, ref) -> float:
    return max(float((g.float() - r.float()).abs().max()) if g.numel() else 0.0 for g, r in zip(got, ref))


def meta() -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "commit": commit if commit and commit != "HEAD" else "uncommitted", "date": datetime.datetime.now().isoformat(timespec="seconds")}


def run_case(kind, name, fn, make, configs, copy_gbs, deadline, t0, with_inductor) -> dict:
    inputs = make()
    per_set = nbytes(inputs)
    l2 = 50 << 20
    sets = [inputs] + [make() for _ in range(max(0, min(4, (2 * l2) // max(per_set, 1))))]
    group = traced_group(kind, fn, inputs)
    ctx = KernelContext(options=Options(), device=DEV, interpret=SMOKE)
    build = build_pointwise if kind == "pointwise" else build_reduction
    kernel = build(group, ctx)
    ref = group.reference(*inputs)
    got = kernel(*inputs)
    total = per_set + nbytes(ref)
    rec = {"kind": kind, "case": name, "bytes": total, "config": kernel.config, "max_abs_err": max_err(got, ref)}
    rec["ours_ms"] = median_ms(kernel, sets)
    rec.update(kernel_facts(kernel))
    rec["eager_ms"] = median_ms(fn, sets)
    tried = []
    for cfg in configs:
        if time.monotonic() - t0 > deadline * 0.8:
            break
        try:
            k2 = build(group, ctx, cfg)
            err = max_err(k2(*inputs), ref)
            tried.append({"config": k2.config, "ms": median_ms(k2, sets), "max_abs_err": err, **kernel_facts(k2)})
        except Exception as e:  # a config a builder refuses is a result too
            tried.append({"config": str(cfg), "error": repr(e)[:200]})
    rec["configs"] = tried
    if with_inductor and time.monotonic() - t0 < deadline * 0.7:
        try:
            compiled = torch.compile(fn, dynamic=False)
            compiled(*inputs)
            rec["inductor_ms"] = median_ms(compiled, sets)
        except Exception as e:
            rec["inductor_error"] = repr(e)[:200]
    for key in ("ours_ms", "eager_ms", "inductor_ms"):
        if key in rec:
            rec[key.replace("_ms", "_gbs")] = total / rec[key] / 1e6
    best = min([rec["ours_ms"]] + [c["ms"] for c in tried if "ms" in c])
    rec["best_ms"], rec["best_gbs"] = best, total / best / 1e6
    rec["ours_pct_copy"] = 100 * rec["ours_gbs"] / copy_gbs
    rec["best_pct_copy"] = 100 * rec["best_gbs"] / copy_gbs
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernels_bandwidth.json"))
    ap.add_argument("--deadline", type=float, default=200.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-inductor", action="store_true")
    args = ap.parse_args()
    t0 = time.monotonic()
    data = {"meta": meta(), "records": [], "errors": []}
    data["meta"]["copy_gbs"] = copy_gbs = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
    paths = [args.out, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels_bandwidth.json")]
    for kind, name, fn, make, configs in cases():
        if time.monotonic() - t0 > args.deadline:
            data["errors"].append({"case": name, "error": "skipped: deadline"})
            continue
        try:
            rec = run_case(kind, name, fn, make, configs, copy_gbs, args.deadline, t0,
                           not args.no_inductor and not SMOKE)
            data["records"].append(rec)
            print(json.dumps(rec), flush=True)
        except Exception as e:
            data["errors"].append({"case": name, "error": repr(e)[:500], "trace": traceback.format_exc()[-2000:]})
            print(f"ERROR {name}: {e!r}", flush=True)
        for p in paths[:1] if SMOKE else paths:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
            with open(p, "w") as f:
                json.dump(data, f, indent=1)
        torch.cuda.empty_cache() if DEV.type == "cuda" else None
    m = data["meta"]
    print(f"\n{m['device']} torch {m['torch']} triton {m['triton']}  copy {copy_gbs:.0f} GB/s")
    print(f"{'case':36s} {'GB/s':>6s} {'%copy':>6s} {'best%':>6s} {'ours ms':>8s} {'eager':>8s} {'induct':>8s} err")
    for r in data["records"]:
        ind = f"{r['inductor_ms']:8.3f}" if "inductor_ms" in r else "       -"
        print(f"{r['case']:36s} {r['ours_gbs']:6.0f} {r['ours_pct_copy']:6.1f} {r['best_pct_copy']:6.1f} "
              f"{r['ours_ms']:8.3f} {r['eager_ms']:8.3f} {ind} {r['max_abs_err']:.1e}")
    for e in data["errors"]:
        print("ERROR", e["case"], e["error"][:200])


if __name__ == "__main__":
    main()
