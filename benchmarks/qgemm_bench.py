"""Quantized GEMM kernels (issue #18): our scaled GEMM template vs ``_scaled_mm`` / ``_int_mm`` vs fp16.

    PYTHONPATH=. python3 -m benchmarks.qgemm_bench --out $OUT/qgemm_bench.json --deadline 300

For each GEMM shape of issue #18 (BERT, GPT-2, the MLP, 8192^3) and each of fp8 / int8, one
record with
  * ``fp16_ms``: cuBLAS ``F.linear`` with bias, fp16 (what the quantized layer replaces);
  * ``vendor_raw_ms``: the vendor's 8-bit GEMM alone: ``_scaled_mm`` per-tensor scales, bias, fp16
    out; ``_int_mm`` int32 out (no scales, no bias: a lower bound for that path);
  * every candidate of our ``scaled_mm`` group builder (``kernels/qgemm.py``) for
    ``scaled_mm(xq, x_scale, wq, w_scale, bias) -> fp16`` (per-row x scales for the dynamic
    flavour, per-channel w scales), timed by the tuner at level ``max`` without a cache: every
    Triton config, the vendor GEMM + our epilogue kernel, and the float linear yardstick;
  * for fp8, per ``--accumulation`` mode (``tile``: fp32 promotion every K tile, the default
    numerics; ``fast``: the tensor cores' accumulator alone, ``Options.fp8_accumulation="fast"``,
    with ``_scaled_mm(use_fast_accum=True)`` as its vendor), and at level ``max`` the best Triton
    config again with promotion after every wgmma (the template's setting before session 5);
  * with ``--epilogue gelu_quant`` also the FFN1 form: ``quantize(gelu(scaled_mm(...)))``.
Times are CUDA-event medians over inputs rotated beyond the L2 cache (``gemm_bench.bench_ms``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from benchmarks import gemm_bench
from benchmarks.gemm_bench import Recorder, bench_ms, rotated, tflops
from compile_backend import ops  # noqa: F401  (registers compile_backend.scaled_mm)
from compile_backend.kernels import quant_ref
from compile_backend.kernels.base import KernelContext, KernelGroup
from compile_backend.kernels.template import traced_group

SMOKE = "--smoke" in sys.argv  # tiny shapes on the CPU under the interpreter (gemm_bench sets it)
DEV = torch.device("cpu" if SMOKE else "cuda")
SHAPES = [  # (name, M, N, K)
    ("bert qkv", 2048, 2304, 768), ("bert attn-out", 2048, 768, 768), ("bert ffn1", 2048, 3072, 768),
    ("bert ffn2", 2048, 768, 3072), ("gpt2 ffn1", 4096, 3072, 768), ("gpt2 ffn2", 4096, 768, 3072),
    ("mlp", 2048, 4096, 4096), ("square", 8192, 8192, 8192),
    # torchvision ViT-B/16 at batch 32: 32 x 197 tokens (session 19: INT8 0.93x FP16, 13 of 50
    # layers quantized; its INT8 GEMMs at "fast" tuning ran at cuBLAS fp16's time)
    ("vit qkv", 6304, 2304, 768), ("vit attn-out", 6304, 768, 768), ("vit ffn1", 6304, 3072, 768),
    ("vit ffn2", 6304, 768, 3072),
    # torchvision ResNet-50 at batch 32: its 1x1 convolutions as the rows GEMMs they run as
    # (channels-last: M = 32 x H x W). Session 20 (H100): 8-bit 58.4 / 34.5 / 21.1 us against
    # cuDNN fp16's 28.0 / 14.1 / 11.9 at these three expanding layers: which config, if any, is
    # at the store bandwidth the fp16 output needs
    ("resnet 1x1 64-256", 100352, 256, 64), ("resnet 1x1 128-512", 25088, 512, 128),
    ("resnet 1x1 256-1024", 6272, 1024, 256),
]
STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def operands(precision: str, m: int, n: int, k: int, per_row: bool):
    x = torch.randn(m, k, device=DEV)
    w = torch.randn(n, k, device=DEV) / k ** 0.5
    xs = quant_ref.row_scale(x, precision) if per_row else quant_ref.scale_from_amax(x.abs().amax(), precision)
    wq, ws = quant_ref.quantize_weight(w, precision, per_channel=True)
    bias = torch.randn(n, device=DEV, dtype=torch.float16)
    out_scale = torch.tensor(0.05, device=DEV)  # the next layer's static input scale (gelu_quant form)
    return quant_ref.quantize(x, xs, precision), xs, wq, ws, bias, quant_ref.inverse_scale(out_scale)


def group_of(fn, inputs) -> KernelGroup:
    return traced_group(fn, inputs, "gemm", "scaled_mm")


def form(epilogue: str, precision: str):
    def linear(xq, xs, wq, ws, bias, inv):
        return torch.ops.compile_backend.scaled_mm(xq, xs, wq, ws, bias, torch.float16)

    def gelu_quant(xq, xs, wq, ws, bias, inv):
        y = F.gelu(linear(xq, xs, wq, ws, bias, inv))
        return quant_ref.quantize_steps(quant_ref.eager, y, torch.float16, inv, precision)

    return linear if epilogue == "linear" else gelu_quant


def tune(group: KernelGroup, cache_dir: str, level: str = "max", accumulation: str = "tile", configs=None):
    from compile_backend.cache.timing import TimingCache
    from compile_backend.kernels.autotune import Tuner
    from compile_backend.kernels.qgemm import scaled_mm_candidates
    from compile_backend.options import Options

    ctx = KernelContext(options=Options(autotune=level), device=DEV, interpret=SMOKE,
                        timing_cache=TimingCache(cache_dir))
    ctx.tuner = Tuner(level, cache=None, device=DEV)  # no cache: always measure
    tuning = scaled_mm_candidates(group, ctx, configs=configs, accumulation=accumulation)
    t0 = time.monotonic()
    choice = ctx.tuner.choose(tuning.key, tuning.candidates, tuning.make_inputs)
    return choice, tuning, time.monotonic() - t0


def vendor_scaled(precision: str, sets) -> Optional[float]:
    """FP8: ``_scaled_mm`` with the layer's real scales (rowwise: [M, 1] x [1, N]) and bias, fp16
    out: the GEMM part of the scaled candidate (None for int8)."""
    if precision != "fp8":
        return None

    def call(xq, xs, wq, ws, b, inv):
        sa = xs.float().reshape(-1, 1).expand(xq.shape[0], 1).contiguous()
        return torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=ws.float().reshape(1, -1), bias=b,
                                out_dtype=torch.float16)
    return bench_ms(call, sets)


def chain_ms(precision: str, m: int, n: int) -> Dict[str, float]:
    """The FFN1 chain alone over an fp16 product, ``quantize(gelu(y))``: eager ATen and
    Inductor's generated kernel (the yardstick for our epilogue kernel), and a plain copy of
    y (the bandwidth floor)."""
    ys = [(torch.randn(m, n, device=DEV, dtype=torch.float16), torch.tensor(20.0, device=DEV)) for _ in range(4)]

    def chain(y, inv):
        return quant_ref.quantize_steps(quant_ref.eager, F.gelu(y), torch.float16, inv, precision)
    return {"eager_chain_ms": bench_ms(chain, ys), "inductor_chain_ms": bench_ms(torch.compile(chain), ys),
            "copy_ms": bench_ms(lambda y, inv: y.clone(), ys)}


def vendor_raw(precision: str, sets, fast: bool = False) -> float:
    if precision == "int8":
        return bench_ms(lambda xq, xs, wq, ws, b, inv: torch._int_mm(xq, wq.t()), sets)
    one = torch.ones((), device=DEV)
    return bench_ms(lambda xq, xs, wq, ws, b, inv: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, bias=b,
                                                                    out_dtype=torch.float16, use_fast_accum=fast), sets)


def run_shape(rec: Recorder, cache_dir: str, name: str, m: int, n: int, k: int, precision: str,
              epilogue: str, per_row: bool, level: str = "max", accumulation: str = "tile") -> None:
    from compile_backend.kernels.gemm_config import GemmConfig

    sets = rotated(lambda: operands(precision, m, n, k, per_row), 2 * m * k + n * k + 2 * m * n)
    x16 = [(torch.randn(m, k, device=DEV, dtype=torch.float16), torch.randn(n, k, device=DEV, dtype=torch.float16),
            torch.randn(n, device=DEV, dtype=torch.float16)) for _ in range(len(sets))]
    fp16 = (bench_ms(lambda x, w, b: F.gelu(F.linear(x, w, b)), x16) if epilogue == "gelu_quant"
            else bench_ms(F.linear, x16))
    fn = form(epilogue, precision)
    group = group_of(fn, sets[0])
    accumulation = accumulation if precision == "fp8" else "exact"
    choice, tuning, tune_s = tune(group, cache_dir, level, "tile" if precision != "fp8" else accumulation)
    expected = group.reference(*sets[0])[0]
    got = choice.runner(*sets[0])[0]
    diff = (got.float() - expected.float()).abs()
    timings = choice.timings_ms
    triton = {c: t for c, t in timings.items() if c.startswith("triton")}
    best_cfg = min(triton, key=triton.get) if triton else None
    row = dict(shape=name, m=m, n=n, k=k, precision=precision, epilogue=epilogue,
               x_scale="per_row" if per_row else "per_tensor", fp16_ms=fp16, accumulation=accumulation,
               vendor_raw_ms=(vendor_raw(precision, sets, accumulation == "fast") if epilogue == "linear" and not SMOKE
                              else None),
               choice=choice.candidate.name, choice_ms=timings.get(choice.candidate.name),
               best_triton=best_cfg, best_triton_ms=triton.get(best_cfg),
               best_triton_tflops=tflops(2 * m * n * k, triton[best_cfg]) if best_cfg else None,
               vendor_epilogue_ms=next((t for c, t in timings.items() if "+ triton epilogue" in c), None),
               timed=f"{len(timings)}/{len(tuning.candidates)}", tune_s=round(tune_s, 1),
               max_abs_diff=diff.max().item(), timings_ms=timings)
    if epilogue == "gelu_quant" and not SMOKE:
        row.update(vendor_scaled_ms=vendor_scaled(precision, sets), **chain_ms(precision, m, n))
    if accumulation == "tile" and best_cfg and level == "max":  # what promotion after every wgmma costs
        cfg = GemmConfig(**_cfg_fields(tuning, best_cfg))
        old, _, _ = tune(group, cache_dir, level, "instruction", configs=[cfg])
        row["best_triton_promote_every_wgmma_ms"] = min(
            (t for c, t in old.timings_ms.items() if c.startswith("triton")), default=None)
    rec.add(**row)


def _cfg_fields(tuning, name: str) -> dict:
    cand = next(c for c in tuning.candidates if c.name == name)
    fields = ("block_m", "block_n", "block_k", "group_m", "split_k", "num_warps", "num_stages", "tma")
    return {f: cand.config[f] for f in fields if f in cand.config}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qgemm_bench")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=300.0)
    p.add_argument("--precisions", nargs="*", default=["fp8", "int8"])
    p.add_argument("--shapes", nargs="*", default=None, help="shape names (default: all)")
    p.add_argument("--epilogue", nargs="*", default=["linear"], choices=("linear", "gelu_quant"))
    p.add_argument("--per-row", action="store_true", help="per-row (dynamic) activation scales")
    p.add_argument("--accumulation", nargs="*", default=["tile"], choices=("tile", "fast"),
                   help="FP8 accumulation modes to time (tile: fp32 every K tile; fast: Options.fp8_accumulation)")
    p.add_argument("--level", choices=("fast", "max"), default="max", help="tuning level: which candidates are timed")
    p.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU (checks the script)")
    args = p.parse_args(argv)
    if args.smoke:
        gemm_bench.SMOKE = True
        SHAPES[:] = [("tiny", 48, 64, 96)]
    elif not torch.cuda.is_available():
        print("qgemm_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    gemm_bench.DEV = DEV
    rec = Recorder(args.out, args.deadline)
    rec.data["meta"]["commit"] = os.environ.get("COMMIT")
    with tempfile.TemporaryDirectory() as cache_dir:
        for name, m, n, k in SHAPES:
            if args.shapes and name not in {s.replace("_", " ") for s in args.shapes}:  # bert_ffn1 = "bert ffn1"
                continue
            for epilogue in args.epilogue:
                for precision in args.precisions:
                    for acc in (args.accumulation if precision == "fp8" else ["tile"]):
                        if rec.left() < 20:
                            return 0
                        try:
                            run_shape(rec, cache_dir, name, m, n, k, precision, epilogue, args.per_row, args.level, acc)
                        except Exception as exc:  # recorded, the next shape still runs
                            rec.error(f"{name} {precision} {epilogue} {acc}", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
