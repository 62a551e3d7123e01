"""Quantization-aware training on real data: the digit CNN on MNIST (issue #19's accuracy row).

    python -m benchmarks.qat_bench --out benchmarks/results/qat_mnist_cpu.json [--epochs 2] [--device cpu]

Per precision (int4 first: where PTQ loses, QAT shows its worth; then int8 and fp8), every
layer quantized (``min_features=1``: the 9-input first conv and the 10-class head too), static
activations calibrated on 512 training images:

1. FP32 top-1 on the 10k test set; PTQ top-1 through the quantized engine; D = FP32 - PTQ.
2. QAT from the pretrained weights: ``prepare_qat`` (scales from the same calibration), Adam
   (lr 1e-5 weights, scales learned), batch 128, fixed seed, at most ``--epochs`` over the 50k
   training split; the fake-quantized model's top-1 (eval), then ``convert`` and the quantized
   engine's top-1. Recovery = (QAT engine - PTQ) / D.

Training runs eagerly (``--compiled`` trains through the backend instead). Data comes from the
pinned wheels (benchmarks/quant_data.py); nothing downloads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

from compile_backend import quant
from compile_backend.bench.results import environment

from . import quant_data as data


def run(precision: str, epochs: float, device: torch.device, compiled: bool, seed: int = 0,
        eval_images: Optional[int] = None) -> Dict[str, Any]:
    """One precision's row; ``eval_images``: top-1 over the test set's first that many images
    (None: all 10,000; the CPU test's short run takes 5,000: its time is the four evaluations)."""
    torch.manual_seed(seed)
    test_x, test_y = data.load_mnist("test")
    test_x, test_y = test_x[:eval_images], test_y[:eval_images]
    train_x, train_y = data.load_mnist("train")
    model = data.load_digit_cnn().to(device)
    fp32 = data.top1(model, test_x, test_y)
    calib_batches = [(train_x[i:i + 128].to(device),) for i in range(0, 512, 128)]
    cfg = quant.QuantConfig(precision=precision, min_features=1)
    calib = quant.calibrate(model, calib_batches, cfg, progress=False, use_cache=False)
    torch._dynamo.reset()
    ptq = data.top1(torch.compile(model, backend="compile_backend", options={"quant": calib}), test_x, test_y)

    qmodel = quant.prepare_qat(model, cfg, calib_batches, progress=False)
    scales = [p for n, p in qmodel.named_parameters() if n.endswith("qat_scale")]
    weights = [p for n, p in qmodel.named_parameters() if not n.endswith("qat_scale")]
    opt = torch.optim.Adam([{"params": weights, "lr": 1e-5}, {"params": scales, "lr": 1e-4}])
    step = torch.compile(qmodel, backend="compile_backend") if compiled else qmodel
    gen = torch.Generator().manual_seed(seed)
    steps = int(epochs * train_x.shape[0] / 128)
    qmodel.train()
    t0 = time.perf_counter()
    order = torch.randperm(train_x.shape[0], generator=gen)
    for i in range(steps):
        at = (i * 128) % train_x.shape[0]
        if at == 0 and i:
            order = torch.randperm(train_x.shape[0], generator=gen)
        idx = order[at:at + 128]
        loss = torch.nn.functional.cross_entropy(step(train_x[idx].to(device)), train_y[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 100 == 0:
            print(f"[qat_bench] {precision} step {i}/{steps} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t0
    qmodel.eval()
    fake = data.top1(qmodel, test_x, test_y)
    qat_calib = quant.convert(qmodel)
    torch._dynamo.reset()
    engine = data.top1(torch.compile(qmodel, backend="compile_backend", options={"quant": qat_calib}), test_x, test_y)
    d = fp32 - ptq
    return {"fp32": fp32, "ptq": ptq, "D": d, "qat_fake_quant": fake, "qat_engine": engine,
            "recovery": (engine - ptq) / d if d > 0 else None, "steps": steps, "train_s": round(train_s, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qat_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--precisions", default="int4,int8,fp8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compiled", action="store_true", help="train through torch.compile(backend='compile_backend')")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = {}
    doc = {"epochs": args.epochs, "compiled": args.compiled, "results": results,
           "environment": environment(args.device, commit=os.environ.get("COMMIT"))}
    for precision in args.precisions.split(","):
        results[precision] = run(precision, args.epochs, device, args.compiled)
        print(precision, json.dumps(results[precision]), flush=True)
        with open(args.out, "w") as f:  # after each precision: a time-limited run keeps what it measured
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
