"""What writing 8-bit codes costs a convolution producer (issue #18), per ResNet-50 layer.

    PYTHONPATH=. python3 -m benchmarks.write_bench --out $OUT/write.json --deadline 200

The quantize pass charges a layer the time its producer's group takes to write the layer's input
in 8 bits (``quant/speed.py``'s write probe: the group with the quantize against without). This
times, for each producer shape of ResNet-50 (b32 by default) and each precision, the producer's
group three ways with every candidate the engine has (``conv_candidates`` for a float producer,
cuDNN's fused kernels among them; ``scaled_conv_candidates`` for an 8-bit one):
  * ``float_ms``: the activation written in fp16 (what a float consumer reads);
  * ``codes_ms``: only the 8-bit codes (a consumer in 8 bits and no other reader);
  * ``both_ms``: fp16 and the codes (a residual stream read by the next block's 8-bit conv and
    by its skip connection).
The probe's charge is ``codes - float`` (clamped at 0); the engine pays ``both - float`` where the
value has another float reader. ``--smoke`` runs one tiny shape on the CPU (checks the script).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Optional

import torch

from benchmarks import gemm_bench
from benchmarks.gemm_bench import Recorder
from compile_backend import ops  # noqa: F401  (registers compile_backend.scaled_conv)
from compile_backend.kernels import quant_ref

#: (name, batch, channels in, h = w, channels out, kernel, padding, stride, residual, activation)
PRODUCERS = [
    ("conv2 3x3 64 56", 32, 64, 56, 64, 3, 1, 1, False, "relu"),
    ("conv3 1x1 64-256 56 +res", 32, 64, 56, 256, 1, 0, 1, True, "relu"),
    ("conv1 1x1 256-64 56", 32, 256, 56, 64, 1, 0, 1, False, "relu"),
    ("conv2 3x3 128 28", 32, 128, 28, 128, 3, 1, 1, False, "relu"),
    ("conv3 1x1 128-512 28 +res", 32, 128, 28, 512, 1, 0, 1, True, "relu"),
    ("conv3 1x1 256-1024 14 +res", 32, 256, 14, 1024, 1, 0, 1, True, "relu"),
]
CL = torch.channels_last


def groups(kind: str, precision: str, nb: int, c: int, hw: int, oc: int, k: int, pad: int, stride: int,
           residual: bool, activation: Optional[str], device: torch.device):
    """(inputs, {"float": group, "codes": group, "both": group}) of the producer's three writes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from compile_backend.kernels.base import KernelGroup, canonical_names, propagate_fake

    dtype = torch.float16
    x = torch.randn(nb, c, hw, hw, device=device)
    w = torch.randn(oc, c, k, k, device=device) / (c * k * k) ** 0.5
    b = torch.randn(oc, device=device).to(dtype)
    out_hw = (hw + 2 * pad - k) // stride + 1
    if kind == "qconv":
        xs = quant_ref.scale_from_amax(x.abs().amax(), precision)
        wq, ws = quant_ref.quantize_weight(w, precision, True)
        inputs = (quant_ref.quantize(x, xs, precision).contiguous(memory_format=CL), xs,
                  wq.contiguous(memory_format=CL), ws, b)
    else:
        inputs = (x.to(dtype).contiguous(memory_format=CL), w.to(dtype).contiguous(memory_format=CL), b)
    if residual:
        inputs += (torch.randn(nb, oc, out_hw, out_hw, device=device).to(dtype).contiguous(memory_format=CL),)
    inputs += (torch.tensor(16.0, device=device),)
    act = torch.relu if activation == "relu" else (lambda y: y)

    def value(*args):
        if kind == "qconv":
            y = torch.ops.compile_backend.scaled_conv(*args[:5], [stride] * 2, [pad] * 2, [1, 1], 1, dtype)
            rest = args[5:-1]
        else:
            y = torch.nn.functional.conv2d(args[0], args[1], args[2], stride, pad)
            rest = args[3:-1]
        return act(rest[0] + y if residual else y)

    def codes(v, inv):
        return quant_ref.quantize_steps(quant_ref.eager, v, dtype, inv, precision)

    fns = {"float": lambda *a: (value(*a),), "codes": lambda *a: (codes(value(*a), a[-1]),),
           "both": lambda *a: (lambda v: (v, codes(v, a[-1])))(value(*a))}
    anchor = "scaled_conv" if kind == "qconv" else "convolution"
    out = {}
    for name, fn in fns.items():
        gm = make_fx(fn)(*inputs)
        propagate_fake(gm, inputs)
        canonical_names(gm.graph)
        gm.recompile()
        node = next(n for n in gm.graph.nodes if n.op == "call_function" and anchor in str(n.target))
        out[name] = KernelGroup("conv", gm, anchor=node.name)
    return inputs, out


def best(group, kind: str, ctx):
    from compile_backend.kernels.conv import conv_candidates
    from compile_backend.kernels.qconv import scaled_conv_candidates

    tuning = scaled_conv_candidates(group, ctx, vendor=False) if kind == "qconv" else conv_candidates(group, ctx)
    choice = ctx.tuner.choose(tuning.key, tuning.candidates, tuning.make_inputs)
    timed = {n: t for n, t in (choice.timings_ms or {}).items()
             if not any(c.reference and c.name == n for c in tuning.candidates)}
    return choice.candidate.name, timed.get(choice.candidate.name), len(timed), choice, tuning


def main(argv=None) -> int:
    from compile_backend.kernels.autotune import Tuner
    from compile_backend.kernels.timers import WallClockTimer
    from compile_backend.kernels.base import KernelContext
    from compile_backend.options import Options

    p = argparse.ArgumentParser(prog="python -m benchmarks.write_bench")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=200.0)
    p.add_argument("--precisions", nargs="*", default=["fp8", "int8"], choices=("int8", "fp8"))
    p.add_argument("--kinds", nargs="*", default=["qconv", "conv"], choices=("qconv", "conv"))
    p.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU (checks the script)")
    args = p.parse_args(argv)
    producers = list(PRODUCERS)
    if args.smoke:
        gemm_bench.SMOKE = True
        producers = [("tiny +res", 2, 16, 5, 24, 1, 0, 1, True, "relu")]
    elif not torch.cuda.is_available():
        print("write_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    rec = Recorder(args.out, args.deadline)
    rec.data["meta"]["commit"] = os.environ.get("COMMIT")
    with tempfile.TemporaryDirectory() as cache_dir:
        for name, nb, c, hw, oc, k, pad, stride, residual, activation in producers:
            for precision in args.precisions:
                for kind in args.kinds:
                    if rec.left() < 20:
                        return 0
                    try:
                        # fp8_accumulation="fast": the suite's FP8 engines (TMA convolutions included)
                        ctx = KernelContext(options=Options(autotune="fast", cache_dir=cache_dir, fp8_accumulation="fast"),
                                            device=device, interpret=args.smoke)
                        ctx.tuner = Tuner("fast", cache=None, device=device,
                                          timer=WallClockTimer() if args.smoke else None)
                        inputs, gs = groups(kind, precision, nb, c, hw, oc, k, pad, stride, residual, activation, device)
                        row = dict(producer=name, precision=precision, kind=kind, batch=nb)
                        for what, group in gs.items():
                            cand, ms, timed, choice, _ = best(group, kind, ctx)
                            if what == "both":  # the two outputs against the reference's
                                got, want = choice.runner(*inputs), group.reference(*inputs)
                                row["both_max_err"] = max((g.float() - r.float()).abs().max().item()
                                                          for g, r in zip(got, want))
                            row[what + "_ms"], row[what + "_choice"], row[what + "_timed"] = ms, cand, timed
                        if row.get("codes_ms") and row.get("float_ms"):
                            row["probe_charge_us"] = round(1e3 * max(0.0, row["codes_ms"] - row["float_ms"]), 2)
                        if row.get("both_ms") and row.get("float_ms"):
                            row["engine_charge_us"] = round(1e3 * (row["both_ms"] - row["float_ms"]), 2)
                        rec.add(**row)
                    except Exception as exc:  # recorded, the next one still runs
                        rec.error(f"{name} {precision} {kind}", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
