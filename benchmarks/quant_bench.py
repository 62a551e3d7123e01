"""PTQ measured on real data and on models nobody here wrote (issue #16), one JSON per part.

    python -m benchmarks.quant_bench mnist  --out results.json   # digit CNN, MNIST test top-1
    python -m benchmarks.quant_bench minilm --out results.json   # MiniLM embedding cosine
    python -m benchmarks.quant_bench models --out results.json   # HF / torchvision models

Every quantized engine is compared with the float one in the same process: top-1 on the 10k
MNIST test images (calibrated on 512 training images), mean embedding cosine on held-out English
sentences (calibrated on others), output cosine vs the FP16 engine for the random-init models
(calibrated on random inputs). Latencies are CUDA-event medians over repeated calls (the next
issue makes quantized engines fast; here they are recorded). Accuracy runs use
``autotune="off"`` (heuristic kernels) to save device time: tuning picks among kernels that compute
the same numerics, checked against the reference at build time (``validate``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List

import torch

from compile_backend import quant
from compile_backend.bench.results import environment

PRECISIONS = ("int8", "fp8")
CALIBRATORS = ("max", "percentile", "entropy", "mse")


def _compiled(model, options: Dict[str, Any]):
    """(compiled model, the Report its compiles fill in): one compile gives both."""
    from compile_backend.backend import compile_backend as backend
    from compile_backend.report import Report

    torch._dynamo.reset()
    report = Report()
    return torch.compile(model, backend=functools.partial(backend, options=options, report=report)), report


def _latency_ms(fn: Callable, *args, reps: int = 30) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _quant_summary(report) -> Dict[str, Any]:
    layers = [q for g in report.graphs for q in g.quant]
    done = [q for q in layers if q["status"] == "quantized"]
    sqnr = [q["sqnr_db"] for q in done if q.get("sqnr_db") is not None]
    kernels = [k for g in report.graphs for k in g.kernels if "scaled" in " ".join(k.get("ops", ()))]
    return {"layers": len(layers), "quantized": len(done),
            "float": {q["name"]: q["reason"] for q in layers if q["status"] != "quantized"},
            "min_sqnr_db": min(sqnr) if sqnr else None,
            "scaled_kernels": sorted({k["impl"] for k in kernels}),
            # tuned kernels slower than the float GEMM/conv they replace (empty with autotune off)
            "slower_than_float": [r for g in report.graphs for r in g.slower_than_reference()],
            # quantize kernels left on their own (issue #18 wants none without a reason)
            "standalone_quantizes": [q["reason"] for g in report.graphs for q in g.standalone_quantizes],
            "fallbacks": [f for g in report.graphs for f in g.fallbacks]}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ----------------------------------------------------------------------------- MNIST
def run_mnist(device: torch.device, options: Dict[str, Any]) -> Dict[str, Any]:
    from benchmarks import quant_data as data

    images, labels = data.load_mnist("test")
    train, _ = data.load_mnist("train")
    model = data.load_digit_cnn().to(device).eval()
    calib_batches = [(train[i:i + 128].to(device),) for i in range(0, 512, 128)]
    out: Dict[str, Any] = {"fp32_eager": data.top1(model, images, labels, device=device)}
    out["fp32_engine"] = data.top1(_compiled(model, options)[0], images, labels, device=device)
    rows = []
    for precision in PRECISIONS:
        for calibrator in CALIBRATORS:
            cfg = quant.QuantConfig(precision=precision, calibrator=calibrator)
            t0 = time.perf_counter()
            calib = quant.calibrate(model, calib_batches, cfg, progress=False)
            seconds = time.perf_counter() - t0
            fast, report = _compiled(model, {**options, "quant": calib})
            acc = data.top1(fast, images, labels, device=device)
            rows.append({"precision": precision, "calibrator": calibrator, "top1": acc,
                         "delta_vs_fp32": acc - out["fp32_eager"], "calibrate_s": seconds,
                         **_quant_summary(report)})
            print(json.dumps(rows[-1]), flush=True)
    out["ptq"] = rows
    return out


# ----------------------------------------------------------------------------- MiniLM
def run_minilm(device: torch.device, options: Dict[str, Any]) -> Dict[str, Any]:
    from benchmarks import quant_data as data

    model, tokenizer = data.load_minilm()
    model = model.float().to(device).eval()  # the carried weights are stored fp16 (64 MiB limit)
    split = data.english_sentences()
    length = 64  # one input shape for every batch: one engine
    reference = data.mean_pooled_embeddings(model, tokenizer, split.evaluation, length=length, device=device)
    calib_batches = []
    for i in range(0, len(split.calibration), 64):
        tokens = data.tokenize(tokenizer, split.calibration[i:i + 64], length)
        calib_batches.append((tokens["input_ids"].to(device), tokens["attention_mask"].to(device)))

    class Encoder(torch.nn.Module):  # positional tensors in (as calibrate feeds them), (hidden,) out
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            return (self.bert(input_ids=input_ids, attention_mask=attention_mask)[0],)

    wrapped = Encoder(model).eval()
    variants = {
        "fp8_static": quant.QuantConfig(precision="fp8", activations="static", calibrator="max"),
        # TensorRT's FP8 recipe (the quantized suite's cb-fp8-static-tensor): one weight scale a tensor
        "fp8_static_per_tensor": quant.QuantConfig(precision="fp8", activations="static", calibrator="max",
                                                   weights="per_tensor"),
        "int8_dynamic": quant.QuantConfig(precision="int8", activations="dynamic"),
        "int8_static_per_tensor": quant.QuantConfig(precision="int8", activations="static", calibrator="entropy",
                                                    weights="per_tensor"),
        "int8_static": quant.QuantConfig(precision="int8", activations="static", calibrator="percentile"),
        "int8_static_per_tensor_smoothquant": quant.QuantConfig(precision="int8", activations="static",
                                                                calibrator="entropy", weights="per_tensor",
                                                                smoothquant=0.5),
        "int8_static_smoothquant": quant.QuantConfig(precision="int8", activations="static", calibrator="max",
                                                     smoothquant=0.8),
        "int8_static_smoothquant_auto": quant.QuantConfig(precision="int8", activations="static", calibrator="max",
                                                          smoothquant="auto"),
    }
    out: Dict[str, Any] = {"sentences": {"calibration": len(split.calibration), "evaluation": len(split.evaluation)},
                           "length": length}
    engine, _ = _compiled(wrapped, options)
    out["fp32_engine_cosine"] = data.mean_cosine(
        data.mean_pooled_embeddings(engine, tokenizer, split.evaluation, length=length, device=device), reference)
    for name, cfg in variants.items():
        q = quant.calibrate(wrapped, calib_batches, cfg, progress=False) if cfg.activations == "static" else cfg
        fast, report = _compiled(wrapped, {**options, "quant": q})
        emb = data.mean_pooled_embeddings(fast, tokenizer, split.evaluation, length=length, device=device)
        out[name] = {"mean_cosine": data.mean_cosine(emb, reference), **_quant_summary(report)}
        print(name, json.dumps(out[name]), flush=True)
    return out


# ----------------------------------------------------------------------------- models
def _models(device: torch.device):
    from . import real_models as real

    def made(factory, **kw):
        model, inputs = factory(device=device, **kw)
        # each call a fresh batch like the factory's (calibration takes several)
        fresh = lambda t: (torch.randint_like(t, int(t.max()) + 1) if not t.is_floating_point()  # noqa: E731
                           else torch.randn_like(t))
        return model, lambda: tuple(fresh(t) for t in inputs)

    return {
        # the shapes of issue #18
        "bert_base": made(real.hf_bert, batch=16),
        "gpt2": made(real.hf_gpt2, batch=8, seq=512),
        "resnet50": made(real.tv_resnet50, batch=32),
        "vit_b_16": made(real.tv_vit_b_16, batch=32),
    }


def _kernels(model, options: Dict[str, Any], inputs) -> Dict[str, Any]:
    """Where the engine's GPU time goes: the same engine without CUDA graphs (the profiler sees
    kernels only outside a graph; their durations do not depend on how they were launched)."""
    from .kernel_profile import profile_kernels

    fn, report = _compiled(model, {**options, "cuda_graphs": "off"})
    kernels = profile_kernels(lambda: fn(*inputs), calls=10, warmup=3, top=25)
    return {"report": str(report), **kernels}  # the report after the calls: compiles are lazy


def run_models(device: torch.device, options: Dict[str, Any], names: List[str],
               partial: str = "", profile: bool = False, variants: List[str] = ()) -> Dict[str, Any]:
    out = {}
    for name, (model, make) in _models(device).items():
        if names and name not in names:
            continue
        model = model.to(device).half().eval()
        inputs = make()
        if inputs[0].is_floating_point():
            inputs = tuple(t.half() for t in inputs)
        calib = [make() for _ in range(4)]
        calib = [tuple(t.half() if t.is_floating_point() else t for t in b) for b in calib]
        engine, _ = _compiled(model, options)
        with torch.no_grad():
            ref = engine(*inputs).float()
        row: Dict[str, Any] = {"fp16_engine_ms": _latency_ms(engine, *inputs)}
        if profile:
            row["fp16_kernels"] = _kernels(model, options, inputs)
        for precision in PRECISIONS:
            for acts in ("static", "dynamic"):
                if variants and f"{precision}_{acts}" not in variants:
                    continue
                try:
                    cfg = quant.QuantConfig(precision=precision, activations=acts)
                    q = quant.calibrate(model, calib, cfg, progress=False) if acts == "static" else cfg
                    fast, report = _compiled(model, {**options, "quant": q})
                    with torch.no_grad():
                        y = fast(*inputs).float()
                    row[f"{precision}_{acts}"] = {"cosine_vs_fp16_engine": _cosine(y, ref),
                                                  "ms": _latency_ms(fast, *inputs), **_quant_summary(report)}
                    if profile:
                        row[f"{precision}_{acts}"]["kernels"] = _kernels(model, {**options, "quant": q}, inputs)
                except Exception as exc:  # recorded, never hidden: the result file says what failed
                    row[f"{precision}_{acts}"] = {"error": f"{type(exc).__name__}: {exc}"}
                print(name, precision, acts, json.dumps(row[f"{precision}_{acts}"])[:600], flush=True)
        out[name] = row
        if partial:  # a long run stopped at its time limit keeps the models it finished
            with open(partial, "w") as f:
                json.dump(out, f, indent=1, default=str)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quant_bench")
    parser.add_argument("part", choices=("mnist", "minilm", "models"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--autotune", default="off")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="models: only these of int8_static, int8_dynamic, fp8_static, fp8_dynamic")
    parser.add_argument("--profile", action="store_true",
                        help="models: also profile each engine's kernels (compiled again without CUDA graphs)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("quant_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    options = {"autotune": args.autotune}
    t0 = time.perf_counter()
    if args.part == "mnist":
        results = run_mnist(device, options)
    elif args.part == "minilm":
        results = run_minilm(device, options)
    else:
        results = run_models(device, options, args.models, partial=args.out + ".partial", profile=args.profile,
                             variants=args.variants)
    doc = {"part": args.part, "options": options, "seconds": time.perf_counter() - t0,
           "environment": environment("cuda", commit=os.environ.get("COMMIT")), "results": results}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
