"""GEMM / convolution templates vs cuBLAS / cuDNN on one GPU; JSON results.

Usage (on the GPU machine, repo root):
    PYTHONPATH=. python3 benchmarks/gemm_bench.py --out $OUT/gemm_bench.json --deadline 320

Sections (each record goes to the JSON as soon as it is measured; the run stops a section when
the deadline nears, so a partial file is still useful):
  square   fp16 4096^3, pointer and persistent-TMA template configs + cuBLAS, both B layouts;
           PTX checked for wgmma, registers/spills read off the compiled kernel
  models   the GEMM shapes of bert/gpt2/mlp base (linear layout: B = W.t()), autotune="fast":
           every candidate's time (best pointer config, best TMA config, cuBLAS) and the tuned
           pick, for the plain GEMM and for linear+bias+GELU (vs cuBLAS addmm + ATen GELU)
  epilogue the epilogue-only kernel that follows cuBLAS, alone, vs ATen's GELU, a few tiles
  tuning  wall time of autotune="fast" and "max" on one shape with a fresh timing cache, and a
           second build from the cache
  conv     ResNet-50 convolution shapes, batch 32, fp16 channels-last: cuDNN vs the untuned
           choice vs the tuned choice
``--smoke`` runs every section on tiny shapes on the CPU under the Triton interpreter (checks
the script, measures nothing).
Timing: CUDA events per launch after a spin kernel (so host launch overhead is not counted),
median of repeats, inputs rotated over enough copies to exceed twice the L2 cache.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

if "--smoke" in sys.argv:  # the interpreter must be chosen before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from compile_backend.kernels import gemm_template as tpl
from compile_backend.kernels.timers import CudaEventTimer, WallClockTimer
from compile_backend.kernels.base import KernelContext, KernelGroup
from compile_backend.kernels.conv import build_conv
from compile_backend.kernels.gemm import build_gemm
from compile_backend.kernels.gemm_config import GemmConfig, candidate_configs, heuristic_config
from compile_backend.kernels.gemm_runner import GemmRunner
from compile_backend.cache.timing import TimingCache
from compile_backend.options import Options

DEV = torch.device("cuda")
SMOKE = False  # --smoke: tiny shapes on the CPU under the Triton interpreter (checks the script)
MODEL_SHAPES = [  # (model, M, K, N)
    ("bert", 2048, 768, 768), ("bert", 2048, 768, 2304), ("bert", 2048, 768, 3072), ("bert", 2048, 3072, 768),
    ("gpt2", 4096, 768, 768), ("gpt2", 4096, 768, 2304), ("gpt2", 4096, 768, 3072), ("gpt2", 4096, 3072, 768),
    ("gpt2-lm-head", 4096, 768, 50257),
    ("mlp", 2048, 4096, 4096),
]
# ResNet-50 (torchvision v1.5) convolutions at 224x224: (C, H, OC, k, stride, pad), batch 32
RESNET50 = [
    (3, 224, 64, 7, 2, 3),
    (64, 56, 64, 1, 1, 0), (64, 56, 64, 3, 1, 1), (64, 56, 256, 1, 1, 0), (256, 56, 64, 1, 1, 0),
    (256, 56, 128, 1, 1, 0), (128, 56, 128, 3, 2, 1), (128, 28, 512, 1, 1, 0), (256, 56, 512, 1, 2, 0),
    (512, 28, 128, 1, 1, 0), (128, 28, 128, 3, 1, 1),
    (512, 28, 256, 1, 1, 0), (256, 28, 256, 3, 2, 1), (256, 14, 1024, 1, 1, 0), (512, 28, 1024, 1, 2, 0),
    (1024, 14, 256, 1, 1, 0), (256, 14, 256, 3, 1, 1),
    (1024, 14, 512, 1, 1, 0), (512, 14, 512, 3, 2, 1), (512, 7, 2048, 1, 1, 0), (1024, 14, 2048, 1, 2, 0),
    (2048, 7, 512, 1, 1, 0), (512, 7, 512, 3, 1, 1),
]


class Recorder:
    def __init__(self, path: str, deadline_s: float):
        self.path, self.t0, self.deadline = path, time.monotonic(), deadline_s
        self.data = {"meta": meta(), "records": [], "errors": []}

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    def add(self, **record) -> None:
        self.data["records"].append(record)
        print(json.dumps(record), flush=True)
        self.flush()

    def error(self, where: str, exc: BaseException) -> None:
        self.data["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}",
                                    "trace": traceback.format_exc()[-3000:]})
        print(f"ERROR {where}: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
        self.flush()

    def flush(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def meta() -> dict:
    import triton

    if SMOKE:
        return {"device": "cpu (smoke)", "torch": torch.__version__, "triton": triton.__version__}
    props = torch.cuda.get_device_properties(DEV)
    return {"device": props.name, "sm_count": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def bench_ms(fn, input_sets, reps: int = 30) -> float:
    """Median ms per call of ``fn(*inputs)`` over rotated input sets."""
    if SMOKE:
        return statistics.median(WallClockTimer().measure(fn, input_sets, 2, 0.0))
    timer = CudaEventTimer()
    fn(*input_sets[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*input_sets[-1])
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return statistics.median(timer.measure(fn, input_sets, reps, host))


def rotated(make, nbytes: int):
    if SMOKE:
        return [make()]
    l2 = getattr(torch.cuda.get_device_properties(DEV), "L2_cache_size", 50 << 20)
    return [make() for _ in range(int(min(8, max(1, math.ceil(2 * l2 / max(1, nbytes))))))]


def tflops(flops: float, ms: float) -> float:
    return round(flops / (ms * 1e-3) / 1e12, 1)


def plain_runner(cfg: GemmConfig, precision: str = "fp32") -> GemmRunner:
    spec = tpl.EpilogueSpec(stores=("acc",))
    dot = tpl.dot_fields("float16", precision != "fp32", SMOKE, False)
    src, name = tpl.render_gemm(spec, dot)
    tma = None
    if cfg.tma:
        tsrc, tname = tpl.render_gemm_tma(spec, dot)
        tma = tpl.load_kernel(tsrc, tname)
    sms = 132 if SMOKE else torch.cuda.get_device_properties(DEV).multi_processor_count
    return GemmRunner(tpl.load_kernel(src, name), cfg, False, tma, sms)


def kernel_facts(runner: GemmRunner) -> dict:
    ck = runner.compiled
    if ck is None:
        return {}
    ptx = ck.asm.get("ptx", "") if hasattr(ck, "asm") else ""
    md = getattr(ck, "metadata", None)
    return {"wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
            "regs": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None),
            "shared": getattr(md, "shared", None)}


# ----------------------------------------------------------------------------- sections
SQUARE = 4096


def section_square(rec: Recorder) -> None:
    m = n = k = SQUARE
    flops = 2 * m * n * k
    for layout in ("nt", "nn"):  # nt: B = W.t() (nn.Linear); nn: B row-major
        def make():
            a = torch.randn(m, k, device=DEV, dtype=torch.float16)
            b = torch.randn(n, k, device=DEV, dtype=torch.float16).t() if layout == "nt" else \
                torch.randn(k, n, device=DEV, dtype=torch.float16)
            return a, b

        sets = rotated(make, 2 * (m * k + k * n + m * n))
        ms = bench_ms(lambda a, b: torch.mm(a, b), sets, 50)
        rec.add(section="square", layout=layout, impl="cublas", shape=[m, n, k], ms=ms, tflops=tflops(flops, ms))
        out = torch.empty(m, n, device=DEV, dtype=torch.float16)
        ref = torch.mm(*sets[0]).float()
        # run 1: pointer kernels peaked at 80 % (nt) / 87 % (nn) of cuBLAS; run 2 adds the
        # persistent TMA kernel
        pointer = [GemmConfig(256, 128, 64, 8, 1, 8, 3), GemmConfig(128, 256, 64, 8, 1, 8, 3)]
        tma = [GemmConfig(128, 256, 64, 8, 1, 8, 3, tma=True), GemmConfig(128, 256, 64, 8, 1, 8, 4, tma=True),
               GemmConfig(256, 128, 64, 8, 1, 8, 3, tma=True), GemmConfig(128, 128, 64, 8, 1, 8, 4, tma=True),
               GemmConfig(128, 128, 64, 8, 1, 4, 4, tma=True), GemmConfig(128, 256, 64, 16, 1, 8, 3, tma=True)]
        if SMOKE:
            pointer, tma = [GemmConfig(32, 32, 32, num_stages=1)], [GemmConfig(32, 32, 32, num_stages=1, tma=True)]
        for cfg in pointer + (tma if layout == "nt" else tma[:3]):
            if rec.left() < 200:
                return
            try:
                runner = plain_runner(cfg)
                fn = lambda a, b: runner(a.unsqueeze(0), b.unsqueeze(0), [], [out.unsqueeze(0)])  # noqa: E731
                fn(*sets[0])
                if not SMOKE:
                    torch.cuda.synchronize()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = bench_ms(fn, sets, 50)
                rec.add(section="square", layout=layout, impl="triton", config=cfg.name, shape=[m, n, k], ms=ms,
                        tflops=tflops(flops, ms), rel_err=err, **kernel_facts(runner))
            except Exception as exc:
                rec.error(f"square {layout} {cfg.name}", exc)


def traced_group(kind: str, fn, *inputs) -> KernelGroup:
    """A KernelGroup of ``fn`` traced to ATen, with meta['val'] as the partitioner provides it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = make_fx(lambda *xs: (fn(*xs),))(*inputs)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    anchors = ("mm", "addmm", "bmm", "baddbmm") if kind == "gemm" else ("convolution",)
    anchor = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target.overloadpacket.__name__ in anchors)
    return KernelGroup(kind, gm, anchor=anchor.name)


def section_models(rec: Recorder, cache_dir: str) -> None:
    from compile_backend.kernels.autotune import Tuner
    from compile_backend.kernels.gemm import gemm_candidates

    for model, m, k, n in MODEL_SHAPES:
        if rec.left() < 150:
            return
        flops = 2 * m * n * k
        try:
            def make():
                return (torch.randn(m, k, device=DEV, dtype=torch.float16), torch.randn(n, k, device=DEV, dtype=torch.float16),
                        torch.randn(n, device=DEV, dtype=torch.float16))

            sets = rotated(make, 2 * (m * k + k * n + m * n))
            row = dict(section="models", model=model, shape=[m, n, k])
            ms_mm = bench_ms(lambda x, w, b: torch.mm(x, w.t()), sets)
            ms_epi = bench_ms(lambda x, w, b: F.gelu(torch.addmm(b, x, w.t())), sets)
            results = {}
            for act in (False, True):
                ctx = KernelContext(options=Options(autotune="fast"), device=DEV, interpret=SMOKE,
                                    timing_cache=TimingCache(cache_dir))
                ctx.tuner = Tuner("fast", cache=None, device=DEV)  # no cache: always measure
                x, w, b = sets[0]
                if act:
                    group = traced_group("gemm", lambda x, w, b: F.gelu(F.linear(x, w, b)), x, w, b)
                    pick = lambda x, w, b: (x, w, b)  # noqa: E731
                else:
                    group = traced_group("gemm", lambda x, w: F.linear(x, w), x, w)
                    pick = lambda x, w, b: (x, w)  # noqa: E731
                t0 = time.monotonic()
                tuning = gemm_candidates(group, ctx)
                choice = ctx.tuner.choose(tuning.key, tuning.candidates, tuning.make_inputs)
                tune_s = time.monotonic() - t0
                run = choice.runner
                expected = group.reference(*pick(x, w, b))[0].float()
                got = run(*pick(x, w, b))[0].float()
                err = ((got - expected).norm() / expected.norm()).item()
                ms = bench_ms(lambda *xs, run=run, pick=pick: run(*pick(*xs)), sets)
                t = choice.timings_ms
                best = lambda pred: min(((v, k2) for k2, v in t.items() if pred(k2)), default=(None, None))  # noqa: E731
                ptr_ms, ptr_name = best(lambda k2: k2.startswith("triton") and not k2.endswith("tma"))
                tma_ms, tma_name = best(lambda k2: k2.endswith("tma"))
                vendor_ms, _ = best(lambda k2: k2.startswith("cublas"))
                results[act] = dict(choice=choice.candidate.name, ms=ms, tune_s=round(tune_s, 1), rel_err=err,
                                    timed=f"{len(t)}/{len(tuning.candidates)}", best_pointer=ptr_name,
                                    best_pointer_ms=ptr_ms, best_tma=tma_name, best_tma_ms=tma_ms, vendor_ms=vendor_ms)
            plain, fused = results[False], results[True]
            rec.add(**row, cublas_ms=ms_mm, cublas_tflops=tflops(flops, ms_mm),
                    **{f"mm_{key}": v for key, v in plain.items()},
                    mm_tflops=tflops(flops, plain["ms"]),
                    pointer_vs_cublas=round(plain["vendor_ms"] / plain["best_pointer_ms"], 3) if plain["best_pointer_ms"] else None,
                    tma_vs_cublas=round(plain["vendor_ms"] / plain["best_tma_ms"], 3) if plain["best_tma_ms"] else None,
                    chosen_vs_cublas=round(ms_mm / plain["ms"], 3),
                    aten_addmm_gelu_ms=ms_epi,
                    **{f"gelu_{key}": v for key, v in fused.items()},
                    fused_vs_aten_addmm_gelu=round(ms_epi / fused["ms"], 3))
        except Exception as exc:
            rec.error(f"models {model} {m}x{n}x{k}", exc)


def section_epilogue(rec: Recorder) -> None:
    """The epilogue-only kernel (after cuBLAS) alone vs ATen's GELU, for a few tiles."""
    import re

    from compile_backend.kernels.gemm import gemm_candidates
    from compile_backend.kernels.gemm_runner import epilogue_only
    from compile_backend.kernels.template import as3d

    for m, n in ((2048, 3072), (4096, 3072)) if not SMOKE else ((32, 48),):
        if rec.left() < 60:
            return
        try:
            x = torch.randn(m, 64, device=DEV, dtype=torch.float16)
            w = torch.randn(n, 64, device=DEV, dtype=torch.float16)
            b = torch.randn(n, device=DEV, dtype=torch.float16)
            group = traced_group("gemm", lambda x, w, b: F.gelu(F.linear(x, w, b)), x, w, b)
            ctx = KernelContext(options=Options(autotune="off"), device=DEV, interpret=SMOKE)
            src = gemm_candidates(group, ctx, vendor=True).sources["cublas"]
            kernel = tpl.load_kernel(src, re.search(r"def (gemm_\w+)\(", src).group(1))
            acc = torch.addmm(b, x, w.t())
            out = torch.empty_like(acc)
            sets = [(acc, out)]
            ms_aten = bench_ms(lambda a, o: F.gelu(a), sets)
            row = dict(section="epilogue", shape=[m, n], aten_gelu_ms=ms_aten,
                       floor_ms=round(2 * m * n * 2 / 3.0e12 * 1e3, 5))
            for cfg in (GemmConfig(64, 128, 16, 8, 1, 4, 1), GemmConfig(32, 256, 16, 8, 1, 4, 1),
                        GemmConfig(16, 256, 16, 8, 1, 4, 1), GemmConfig(64, 256, 16, 8, 1, 8, 1),
                        GemmConfig(128, 128, 16, 8, 1, 8, 1), GemmConfig(32, 128, 16, 8, 1, 4, 1)):
                fn = lambda a, o, cfg=cfg: epilogue_only(kernel, as3d(a), [], [as3d(o)], cfg)  # noqa: E731
                fn(acc, out)
                err = (out.float() - F.gelu(acc).float()).abs().max().item()
                row[f"{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}_ms"] = bench_ms(fn, sets)
                row[f"{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}_maxerr"] = err
            rec.add(**row)
        except Exception as exc:
            rec.error(f"epilogue {m}x{n}", exc)


def section_tuning(rec: Recorder) -> None:
    m, k, n = (2048, 768, 3072) if not SMOKE else (32, 48, 40)
    x = torch.randn(4, m // 4, k, device=DEV, dtype=torch.float16)
    w = torch.randn(n, k, device=DEV, dtype=torch.float16)
    b = torch.randn(n, device=DEV, dtype=torch.float16)
    r = torch.randn(4, m // 4, n, device=DEV, dtype=torch.float16)
    group = traced_group("gemm", lambda x, w, b, r: F.silu(F.linear(x, w, b)) + r, x, w, b, r)
    for level in ("fast", "max"):
        if rec.left() < (60 if level == "fast" else 120):
            return
        with tempfile.TemporaryDirectory() as d:
            try:
                ctx = KernelContext(options=Options(autotune=level), device=DEV, interpret=SMOKE, timing_cache=TimingCache(d))
                t0 = time.monotonic()
                kernel = build_gemm(group, ctx)
                tune_s = time.monotonic() - t0
                ctx2 = KernelContext(options=Options(autotune=level), device=DEV, interpret=SMOKE, timing_cache=TimingCache(d))
                t0 = time.monotonic()
                again = build_gemm(group, ctx2)
                cached_s = time.monotonic() - t0
                stats = ctx.tuner.stats
                rec.add(section="tuning", level=level, shape=[m, n, k], epilogue="addmm+silu+residual",
                        tune_s=round(tune_s, 1), candidates_timed=stats["candidates_timed"],
                        winner=kernel.impl + " " + json.dumps(kernel.config), winner_ms=kernel.config.get("tuned_ms"),
                        second_build_s=round(cached_s, 2), second_from_cache=again.tuned_from_cache)
            except Exception as exc:
                rec.error(f"tuning {level}", exc)


def section_conv(rec: Recorder, cache_dir: str) -> None:
    batch = 32 if not SMOKE else 2
    for c, h, oc, ks, stride, pad in RESNET50:
        if rec.left() < 25:
            return
        try:
            def make():
                x = torch.randn(batch, c, h, h, device=DEV, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
                w = torch.randn(oc, c, ks, ks, device=DEV, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
                return x, w

            oh = (h + 2 * pad - ks) // stride + 1
            flops = 2 * batch * oh * oh * oc * c * ks * ks
            sets = rotated(make, 2 * (batch * c * h * h + oc * c * ks * ks + batch * oc * oh * oh))
            ms_cudnn = bench_ms(lambda x, w: F.conv2d(x, w, None, stride, pad), sets)
            x, w = sets[0]
            group = traced_group("conv", lambda x, w: torch.relu(F.conv2d(x, w, None, stride, pad)), x, w)
            ms_cudnn_relu = bench_ms(lambda x, w: group.reference(x, w), sets)
            out = {}
            for level in ("off", "fast"):
                ctx = KernelContext(options=Options(autotune=level), device=DEV, interpret=SMOKE, timing_cache=TimingCache(cache_dir))
                kernel = build_conv(group, ctx)
                exp = group.reference(x, w)[0].float()
                err = ((kernel(x, w)[0].float() - exp).norm() / exp.norm()).item()
                out[level] = dict(impl=kernel.impl, config=kernel.config, ms=bench_ms(kernel, sets), rel_err=err)
            rec.add(section="conv", shape=dict(n=batch, c=c, h=h, oc=oc, k=ks, stride=stride, pad=pad),
                    cudnn_ms=ms_cudnn, cudnn_tflops=tflops(flops, ms_cudnn), cudnn_relu_ms=ms_cudnn_relu,
                    **{f"{lvl}_{key}": v for lvl, d in out.items() for key, v in d.items()},
                    fast_tflops=tflops(flops, out["fast"]["ms"]),
                    speedup_fast_vs_cudnn_relu=round(ms_cudnn_relu / out["fast"]["ms"], 3))
        except Exception as exc:
            rec.error(f"conv {c}x{h}->{oc} k{ks}s{stride}", exc)


def summary(rec: Recorder) -> None:
    """A short table for the end of the log."""
    for r in rec.data["records"]:
        sec = r["section"]
        if sec == "square":
            facts = "" if r["impl"] == "cublas" else f" wgmma={r.get('wgmma')} regs={r.get('regs')} spills={r.get('spills')}"
            print(f"square {r['layout']} {r['impl']:7s} {r.get('config', ''):24s} {r['tflops']:7.1f} TF/s{facts}")
        elif sec == "models":
            print(f"{r['model']:13s} {r['shape']} cublas {r['cublas_tflops']:6.1f} TF/s | ptr x{r['pointer_vs_cublas']} "
                  f"({r['mm_best_pointer']}) | tma x{r['tma_vs_cublas']} ({r['mm_best_tma']}) | chosen {r['mm_choice']} "
                  f"x{r['chosen_vs_cublas']} | gelu: {r['gelu_choice']} x{r['fused_vs_aten_addmm_gelu']} vs addmm+gelu")
        elif sec == "epilogue":
            print("epilogue", {k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in r.items() if k2 != "section"})
        elif sec == "tuning":
            print(f"tuning {r['level']}: {r['tune_s']}s, {r['candidates_timed']} timed; cache {r['second_build_s']}s "
                  f"from_cache={r['second_from_cache']}; winner {r['winner'][:60]}")
        elif sec == "conv":
            sh = r["shape"]
            print(f"conv {sh['c']}x{sh['h']}->{sh['oc']} k{sh['k']}s{sh['stride']} cudnn {r['cudnn_tflops']:6.1f} "
                  f"| off {r['off_impl']} {r['off_ms']:.3f}ms | fast {r['fast_impl']} {r['fast_tflops']:6.1f} "
                  f"x{r['speedup_fast_vs_cudnn_relu']} vs cudnn+relu")
    for e in rec.data["errors"]:
        print("ERROR", e["where"], e["error"][:200])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gemm_bench.json")
    p.add_argument("--deadline", type=float, default=320.0, help="seconds; sections stop before it")
    p.add_argument("--sections", default="square,models,epilogue,tuning,conv")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = p.parse_args()
    if args.smoke:
        global SMOKE, DEV, MODEL_SHAPES, RESNET50, SQUARE
        SMOKE, DEV = True, torch.device("cpu")
        MODEL_SHAPES, RESNET50, SQUARE = [("tiny", 32, 48, 40)], [(8, 9, 16, 3, 2, 1)], 64
    rec = Recorder(args.out, args.deadline)
    cache_dir = tempfile.mkdtemp(prefix="timing_")
    torch.manual_seed(0)
    for name in args.sections.split(","):
        t0 = time.monotonic()
        try:
            if name == "square":
                section_square(rec)
            elif name == "epilogue":
                section_epilogue(rec)
            elif name == "models":
                section_models(rec, cache_dir)
            elif name == "tuning":
                section_tuning(rec)
            elif name == "conv":
                section_conv(rec, cache_dir)
        except Exception as exc:
            rec.error(name, exc)
        print(f"section {name}: {time.monotonic() - t0:.1f}s, {rec.left():.0f}s left", file=sys.stderr, flush=True)
    rec.flush()
    summary(rec)


if __name__ == "__main__":
    main()
