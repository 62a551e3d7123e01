"""Convolution kernels (issue #18): our 8-bit and 16-bit convolution candidates against cuDNN fp16.

    PYTHONPATH=. python3 -m benchmarks.qconv_bench --out $OUT/qconv.json --deadline 300

For each convolution shape (ResNet-50 at batch 32 by default: its 3x3 layers and a stride-2
downsample, where the TMA convolution of ``kernels/conv_tma.py`` applies) and each of int8 / fp8 /
fp16, one record with
  * ``cudnn_fp16_ms``: ``F.conv2d`` fp16 channels-last with its bias, then ReLU (eager: two
    kernels), and ``cudnn_bare_ms``: the convolution alone, no bias (the float yardstick the
    quantize pass's probes use);
  * every candidate of the group builder for ``relu(conv + bias)`` (``qconv.scaled_conv_candidates``
    for 8 bits, per-tensor input and per-channel weight scales; ``conv.conv_candidates`` for
    fp16: cuDNN's fused kernels among them), timed by the tuner at ``--level`` without a cache;
  * the best TMA and the best other Triton candidate, and the choice.
Times are CUDA-event medians over inputs rotated beyond the L2 cache (``gemm_bench.bench_ms``).
``--smoke`` runs one tiny shape on the CPU under the interpreter (checks the script).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from benchmarks import gemm_bench
from benchmarks.gemm_bench import Recorder, bench_ms, rotated
from compile_backend import ops  # noqa: F401  (registers compile_backend.scaled_conv)
from compile_backend.kernels import quant_ref
from compile_backend.kernels.template import traced_group

SHAPES = [  # (name, batch, channels in, h = w (input), channels out, kernel, padding, stride)
    ("resnet 3x3 64 56", 32, 64, 56, 64, 3, 1, 1), ("resnet 3x3 128 28", 32, 128, 28, 128, 3, 1, 1),
    ("resnet 3x3 256 14", 32, 256, 14, 256, 3, 1, 1), ("resnet 3x3 512 7", 32, 512, 7, 512, 3, 1, 1),
    # the first block of stages 2-4: a stride-2 3x3 and the stride-2 1x1 downsample
    ("resnet 3x3 s2 128 56", 32, 128, 56, 128, 3, 1, 2), ("resnet 1x1 s2 256-512 56", 32, 256, 56, 512, 1, 0, 2),
    ("resnet 3x3 s2 256 28", 32, 256, 28, 256, 3, 1, 2),
    # the RGB stem (3 channels, 7x7, stride 2): cuDNN 107 us at b32 (H100, session 22); the
    # template's flat-K loop (few channels) since session 23
    ("resnet stem 7x7 s2 3-64 224", 32, 3, 224, 64, 7, 3, 2),
]
STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
CL = torch.channels_last


def _dev() -> torch.device:
    return torch.device("cpu" if gemm_bench.SMOKE else "cuda")


def operands(precision: str, nb: int, c: int, hw: int, oc: int, k: int):
    """The group's inputs: (xq, x_scale, wq, w_scale, bias) for 8 bits, (x, w, bias) for fp16,
    channels-last as the engine's layout pass makes them."""
    dev = _dev()
    x = torch.randn(nb, c, hw, hw, device=dev).contiguous(memory_format=CL)
    w = torch.randn(oc, c, k, k, device=dev) / (c * k * k) ** 0.5
    b = torch.randn(oc, device=dev, dtype=torch.float16)
    if precision == "fp16":
        return x.half(), w.half().contiguous(memory_format=CL), b
    xs = quant_ref.scale_from_amax(x.abs().amax(), precision)
    wq, ws = quant_ref.quantize_weight(w, precision, True)
    return quant_ref.quantize(x, xs, precision), xs, wq.contiguous(memory_format=CL), ws, b


def group_of(precision: str, pad: int, stride: int, inputs):
    if precision == "fp16":
        return traced_group(lambda x, w, b: torch.relu(F.conv2d(x, w, b, stride, pad)), inputs, "conv", "convolution")
    return traced_group(lambda xq, xs, wq, ws, b: torch.relu(torch.ops.compile_backend.scaled_conv(
        xq, xs, wq, ws, b, [stride] * 2, [pad, pad], [1, 1], 1, torch.float16)), inputs, "conv", "scaled_conv")


def tune(group, precision: str, level: str, cache_dir: str):
    from compile_backend.kernels.autotune import Tuner
    from compile_backend.kernels.timers import WallClockTimer
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.conv import conv_candidates
    from compile_backend.kernels.conv_tma import ConvTmaConfig
    from compile_backend.kernels.qconv import scaled_conv_candidates
    from compile_backend.options import Options

    ctx = KernelContext(options=Options(autotune=level, cache_dir=cache_dir), device=_dev(), interpret=gemm_bench.SMOKE)
    # no cache: always measure (the smoke run on the wall clock: every candidate runs once or twice)
    ctx.tuner = Tuner(level, cache=None, device=_dev(), timer=WallClockTimer() if gemm_bench.SMOKE else None)
    smoke = [ConvTmaConfig(1, 8, 16, 32, 4, 1)] if gemm_bench.SMOKE else None  # the interpreter: no Hopper to ask
    if precision == "fp16":
        tuning = conv_candidates(group, ctx, tma_configs=smoke)
    else:
        tuning = scaled_conv_candidates(group, ctx, tma_configs=smoke)
    return ctx.tuner.choose(tuning.key, tuning.candidates, tuning.make_inputs), tuning


def run_shape(rec: Recorder, cache_dir: str, name: str, nb: int, c: int, hw: int, oc: int, k: int, pad: int,
              stride: int, precision: str, level: str) -> None:
    elements = nb * c * hw * hw + oc * c * k * k + nb * oc * (hw // stride) ** 2
    sets = rotated(lambda: operands(precision, nb, c, hw, oc, k), 2 * elements)
    x16 = [operands("fp16", nb, c, hw, oc, k) for _ in range(len(sets))]
    smoke = gemm_bench.SMOKE
    cudnn = bench_ms(lambda x, w, b: torch.relu(F.conv2d(x, w, b, stride, pad)), x16) if not smoke else None
    bare = bench_ms(lambda x, w, b: F.conv2d(x, w, None, stride, pad), x16) if not smoke else None
    group = group_of(precision, pad, stride, sets[0])
    choice, tuning = tune(group, precision, level, cache_dir)
    want, got = group.reference(*sets[0])[0], choice.runner(*sets[0])[0]
    timings: Dict[str, float] = choice.timings_ms or {}
    tma = {n: t for n, t in timings.items() if n.endswith(" tma") and n.startswith("triton conv")}
    other = {n: t for n, t in timings.items() if n.startswith("triton") and n not in tma}

    def best(d: Dict[str, float]) -> Optional[str]:
        return min(d, key=d.get) if d else None
    rec.add(shape=name, batch=nb, c=c, hw=hw, oc=oc, k=k, padding=pad, stride=stride, precision=precision, level=level,
            cudnn_fp16_ms=cudnn, cudnn_bare_ms=bare, choice=choice.candidate.name,
            choice_ms=timings.get(choice.candidate.name), best_tma=best(tma), best_tma_ms=tma.get(best(tma)),
            best_other_triton=best(other), best_other_triton_ms=other.get(best(other)),
            timed=f"{len(timings)}/{len(tuning.candidates)}",
            rel_err=((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item(),
            timings_ms=timings)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qconv_bench")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=300.0)
    p.add_argument("--precisions", nargs="*", default=["int8", "fp8", "fp16"], choices=("int8", "fp8", "fp16"))
    p.add_argument("--shapes", nargs="*", default=None, help="shape names, spaces as underscores (default: all)")
    p.add_argument("--batch", type=int, default=None, help="another batch for every shape")
    p.add_argument("--level", choices=("fast", "max"), default="fast", help="tuning level: which candidates are timed")
    p.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU (checks the script)")
    args = p.parse_args(argv)
    shapes = list(SHAPES)
    if args.smoke:
        gemm_bench.SMOKE = True
        shapes = [("tiny", 2, 32, 6, 16, 3, 1, 1)]
    elif not torch.cuda.is_available():
        print("qconv_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    gemm_bench.DEV = _dev()
    rec = Recorder(args.out, args.deadline)
    rec.data["meta"]["commit"] = os.environ.get("COMMIT")
    with tempfile.TemporaryDirectory() as cache_dir:
        for name, nb, c, hw, oc, k, pad, stride in shapes:
            if args.shapes and name not in {s.replace("_", " ") for s in args.shapes}:
                continue
            for precision in args.precisions:
                if rec.left() < 20:
                    return 0
                try:
                    run_shape(rec, cache_dir, name, args.batch or nb, c, hw, oc, k, pad, stride, precision, args.level)
                except Exception as exc:  # recorded, the next shape still runs
                    rec.error(f"{name} {precision}", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
