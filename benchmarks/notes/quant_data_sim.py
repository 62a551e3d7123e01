"""Simulated (fake) quantization of the real-data models: the accuracy the PTQ pipeline should reach.

    python -m benchmarks.notes.quant_data_sim [--json out.json]

Not the pipeline (``compile_backend.quant`` builds that): forward hooks on a copy of the model
quantize-dequantize, with ``compile_backend.kernels.quant_ref`` (the one numerics reference),
the weights of each selected Conv2d/Linear per output channel and its input activation per
tensor (static: amax from a calibration pass) or per row (dynamic: ``quant_ref.row_scale``).
Calibrators here: max, percentile (of |x| over the calibration data, from a 4096-bin histogram
per layer) and mse (the clipping amax minimising the fake-quant squared error of the histogram).

Digit CNN: calibration on the first 512 MNIST train images, top-1 on the 10k test set, all five
layers and the default selection (K or N below 16 excluded: the first conv, K = 9, and the
output layer, N = 10). MiniLM: calibration on the 256 calibration sentences, mean cosine of the
embeddings of the 256 evaluation sentences against FP32, every Linear of the encoder (36).
Results go to benchmarks/notes/quant_data.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

from benchmarks import quant_data as qd
from compile_backend.kernels import quant_ref

BINS = 4096


def quantizable(model: nn.Module, prefix: str = "", skip_small: bool = False):
    """{name: module} of the Conv2d/Linear layers under ``prefix``; ``skip_small`` drops GEMMs
    whose K or N is below 16 (the issue's default exclusion)."""
    out = {}
    for name, mod in model.named_modules():
        if not name.startswith(prefix) or not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        n, k = mod.weight.shape[0], mod.weight[0].numel()
        if skip_small and (n < 16 or k < 16):
            continue
        out[name] = mod
    return out


@torch.no_grad()
def calibrate(model, layers, run_batches):
    """Per layer input statistics: amax, and a histogram of |x| over [0, amax] (two passes)."""
    stats = {name: {"amax": 0.0} for name in layers}

    def pass_(record):
        hooks = [mod.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0]))
                 for name, mod in layers.items()]
        try:
            run_batches(model)
        finally:
            for h in hooks:
                h.remove()

    def record_max(name, x):
        stats[name]["amax"] = max(stats[name]["amax"], float(x.detach().abs().max()))

    def record_hist(name, x):
        s = stats[name]
        hist = torch.histc(x.detach().float().abs().flatten(), bins=BINS, min=0.0, max=s["amax"])
        s["hist"] = hist if "hist" not in s else s["hist"] + hist

    pass_(record_max)
    pass_(record_hist)
    return stats


def calibrated_amax(stat, calibrator: str, precision: str) -> float:
    amax = stat["amax"]
    if calibrator == "max" or amax == 0.0:
        return amax
    hist = stat["hist"].double()
    edges = torch.linspace(0, amax, BINS + 1, dtype=torch.float64)
    if calibrator.startswith("percentile"):
        pct = float(calibrator.split(":")[1])
        cdf = hist.cumsum(0) / hist.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(pct / 100.0, dtype=torch.float64)))
        return float(edges[min(idx + 1, BINS)])
    if calibrator == "mse":
        centers = (edges[:-1] + edges[1:]) / 2
        best, best_err = amax, None
        for i in range(BINS // 32, BINS + 1, 16):  # candidate clipping points
            clip = float(edges[i])
            scale = quant_ref.scale_from_amax(torch.tensor(clip), precision)
            err = ((quant_ref.fake_quantize(centers.float(), scale, precision).double() - centers)
                   .pow(2) * hist).sum()
            if best_err is None or err < best_err:
                best, best_err = clip, err
        return best
    raise ValueError(f"unknown calibrator {calibrator!r}")


def fake_quantized(model, layers, precision, activations, stats=None, calibrator="max"):
    """A copy of ``model`` whose selected layers see fake-quantized weights and inputs."""
    q = copy.deepcopy(model)
    modules = dict(q.named_modules())
    for name in layers:
        mod = modules[name]
        wq, ws = quant_ref.quantize_weight(mod.weight.data, precision, per_channel=True)
        shape = (-1,) + (1,) * (mod.weight.dim() - 1)
        mod.weight.data = quant_ref.dequantize(wq, ws.reshape(shape)).to(mod.weight.dtype)
        if activations == "static":
            scale = quant_ref.scale_from_amax(
                torch.tensor(calibrated_amax(stats[name], calibrator, precision)), precision)
            hook = lambda m, args, scale=scale: (quant_ref.fake_quantize(args[0], scale, precision),) + args[1:]
        else:  # dynamic, per row of the GEMM (per token)
            hook = lambda m, args: (quant_ref.fake_quantize(
                args[0], quant_ref.row_scale(args[0], precision), precision),) + args[1:]
        mod.register_forward_pre_hook(hook)
    return q


def check_against_reference_gemm():
    """Fake quant on a Linear equals quant_ref.scaled_mm (what the engine computes) to fp32 rounding."""
    torch.manual_seed(0)
    lin = nn.Linear(67, 29)
    x = torch.randn(13, 67)
    for precision in quant_ref.PRECISIONS:
        sx = quant_ref.scale_from_amax(x.abs().max(), precision)
        wq, ws = quant_ref.quantize_weight(lin.weight.data, precision)
        ref = quant_ref.scaled_mm(quant_ref.quantize(x, sx, precision), sx, wq, ws, lin.bias.data)
        fake = fake_quantized(lin, {"": lin}, precision, "static",
                              {"": {"amax": float(x.abs().max())}})(x)
        assert torch.allclose(ref, fake, rtol=1e-5, atol=1e-5), (precision, (ref - fake).abs().max())


def digit_cnn(report):
    model = qd.load_digit_cnn()
    images, labels = qd.load_mnist("test")
    calib = qd.load_mnist("train")[0][:512]
    t = time.perf_counter()
    fp32 = qd.top1(model, images, labels)
    report["cnn_fp32"] = {"top1": fp32, "seconds": round(time.perf_counter() - t, 2)}
    for selection, skip_small in (("all", False), ("default", True)):
        layers = quantizable(model, skip_small=skip_small)
        stats = calibrate(model, layers, lambda m: m(calib))
        for precision in quant_ref.PRECISIONS:
            for calibrator in ("max", "percentile:99.99", "mse"):
                t = time.perf_counter()
                q = fake_quantized(model, layers, precision, "static", stats, calibrator)
                acc = qd.top1(q, images, labels)
                report[f"cnn_{selection}_{precision}_static_{calibrator}"] = {
                    "layers": len(layers), "top1": acc, "delta": round(acc - fp32, 2),
                    "seconds": round(time.perf_counter() - t, 2)}
                print(selection, precision, calibrator, acc, file=sys.stderr)


def minilm(report):
    model, tokenizer = qd.load_minilm()
    calib, evaluation = qd.english_sentences()
    report["sentences"] = {"calibration": len(calib), "evaluation": len(evaluation),
                           "fingerprint_calibration": qd.fingerprint(calib),
                           "fingerprint_evaluation": qd.fingerprint(evaluation)}
    t = time.perf_counter()
    ref = qd.mean_pooled_embeddings(model, tokenizer, evaluation)
    report["minilm_fp32"] = {"seconds": round(time.perf_counter() - t, 2),
                             "self_cosine": qd.mean_cosine(ref, qd.mean_pooled_embeddings(model, tokenizer, evaluation))}
    layers = quantizable(model, prefix="encoder.")
    stats = calibrate(model, layers, lambda m: qd.mean_pooled_embeddings(m, tokenizer, calib))
    cases = [("fp8", "static", c) for c in ("max", "percentile:99.99", "mse")]
    cases += [("fp8", "dynamic", None), ("int8", "dynamic", None)]
    cases += [("int8", "static", c) for c in ("max", "percentile:99.9", "percentile:99.99", "mse")]
    for precision, activations, calibrator in cases:
        t = time.perf_counter()
        q = fake_quantized(model, layers, precision, activations, stats, calibrator or "max")
        emb = qd.mean_pooled_embeddings(q, tokenizer, evaluation)
        key = f"minilm_{precision}_{activations}" + (f"_{calibrator}" if calibrator else "")
        report[key] = {"layers": len(layers), "mean_cosine": round(qd.mean_cosine(ref, emb), 6),
                       "min_cosine": round(float(torch.cosine_similarity(ref, emb).min()), 6),
                       "seconds": round(time.perf_counter() - t, 2)}
        print(key, report[key], file=sys.stderr)
    # which layers cost INT8 static its accuracy: one kind of Linear quantized at a time
    kinds = {"qkv": ("query", "key", "value"), "attn_out": ("attention.output.dense",),
             "ffn_up": ("intermediate.dense",), "ffn_down": ("output.dense",)}
    for kind, suffixes in kinds.items():
        some = {n: m for n, m in layers.items() if n.endswith(suffixes)
                and not (kind == "ffn_down" and "attention" in n)}
        emb = qd.mean_pooled_embeddings(fake_quantized(model, some, "int8", "static", stats),
                                        tokenizer, evaluation)
        report[f"minilm_int8_static_max_only_{kind}"] = {
            "layers": len(some), "mean_cosine": round(qd.mean_cosine(ref, emb), 6)}
        print(kind, report[f"minilm_int8_static_max_only_{kind}"], file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--models", default="cnn,minilm", help="comma list of cnn, minilm")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    check_against_reference_gemm()
    report = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if "cnn" in args.models.split(","):
        digit_cnn(report)
    if "minilm" in args.models.split(","):
        minilm(report)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
