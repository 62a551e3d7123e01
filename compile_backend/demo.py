"""The main job: a zoo model through the backend on this device, with its report and timing.

On a CUDA machine: ``resnet50`` (base, batch 32, fp16); on a CPU: ``mlp`` (tiny, fp32).
It compiles, prints the report, then runs the benchmark command against eager. On a CPU the
time comparison says nothing about the backend (it runs the ATen graph there, Triton kernels
need CUDA), so the demo says so instead of presenting a speedup.
"""
from __future__ import annotations

import argparse
import sys

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_SPEED_NOTE = ("speed: not meaningful on this device: on CPU the backend runs the ATen graph "
                  "(Triton kernels run only on CUDA, or in Triton's slow interpreter under "
                  "TRITON_INTERPRET=1); the timings above only show that it runs. Speed is measured "
                  "on CUDA (see README).")


def main(argv=None) -> int:
    from benchmarks import zoo

    p = argparse.ArgumentParser(prog="python -m compile_backend demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--model", choices=zoo.NAMES, default="resnet50" if cuda else "mlp")
    p.add_argument("--size", choices=zoo.SIZES, default="base" if cuda else "tiny")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16" if cuda else "fp32")
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        print(f"error: --batch must be a positive integer, got {args.batch}", file=sys.stderr)
        return 2

    import compile_backend

    device = "cuda" if cuda else "cpu"
    model, inputs = zoo.get(args.model, args.size, batch=args.batch, dtype=PRECISIONS[args.precision],
                            device=device)
    print(f"== compile_backend demo: {args.model} ({args.size}) {args.precision} on {device}")
    report = compile_backend.explain(model, *inputs, precision=args.precision)
    print(report)
    print()
    from .bench_cli import main as bench

    rc = bench(["--model", args.model, "--size", args.size, "--precision", args.precision,
                "--compare", "eager,compile_backend"]
               + (["--batch", str(args.batch)] if args.batch else []))
    if not cuda:
        print(CPU_SPEED_NOTE)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
