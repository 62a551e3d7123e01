"""The main job: a zoo model through the backend on this device, with its report and timing.

On a CUDA machine: ``resnet50`` (base, batch 32, fp16); on a CPU: ``mlp`` (tiny, fp32).
It compiles, prints the report, then runs the benchmark command against eager.
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compile_backend demo", description=__doc__)
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="resnet50" if cuda else "mlp")
    p.add_argument("--size", default="base" if cuda else "tiny")
    p.add_argument("--precision", default="fp16" if cuda else "fp32")
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args(argv)

    import compile_backend
    from benchmarks import zoo

    device = "cuda" if cuda else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    model, inputs = zoo.get(args.model, args.size, batch=args.batch, dtype=dtype, device=device)
    print(f"== compile_backend demo: {args.model} ({args.size}) {args.precision} on {device}")
    report = compile_backend.explain(model, *inputs, precision=args.precision)
    print(report)
    print()
    from .bench_cli import main as bench

    return bench(["--model", args.model, "--size", args.size, "--precision", args.precision,
                  "--compare", "eager,compile_backend"]
                 + (["--batch", str(args.batch)] if args.batch else []))


if __name__ == "__main__":
    raise SystemExit(main())
