"""Accuracy of the LLM quantization modes on a decoder trained on real text (issue #20).

    PYTHONPATH=. python3 -m benchmarks.llm_accuracy --out benchmarks/results/llm_accuracy_cpu.json

A random-init decoder's logits are noise, so its cosine under quantization says little (the
base decoder: W4A16 0.59 at 17.6 dB a layer). Here the zoo's Llama-style decoder (small: 4
layers, hidden 192, GQA 6/2, SwiGLU, byte vocabulary) is first trained briefly, fixed seed, on
English text available offline (the standard library's docstrings, ``quant_data``: half the
sentences to train on, the other half held out), then each
mode compiles its prefill graph through the backend (on a CPU: the emulated path, the kernels'
numerics reference) and is compared with the FP32 model on held-out sentences:

* logits cosine at the last position, and agreement of the predicted next byte;
* next-byte accuracy against the text itself (the FP32 model's beside it);
* per linear layer, the output SQNR of weight-only modes (``decode_bench.layer_output_sqnr``).

``--dtype bfloat16`` (or float16) trains in FP32 as before, then casts the trained model to that
dtype and compiles every mode from it: most LLM checkpoints are bf16, and the weight-only kernels
dequantize to the activations' dtype. Each row then also carries its cosine against the unquantized
model in that dtype, and a first row gives that model's own cosine against FP32.

Modes: W8A16, W4A16 (group 128 minmax; group 32 with the MSE clip), W8A8 INT8 and FP8 static
with SmoothQuant (alpha per layer group), INT8 dynamic. Each record carries versions and commit.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from benchmarks import quant_data

MODES = {
    "w8a16": dict(precision="int8", activations=None),
    "w4a16-g128": dict(precision="int4", activations=None, group_size=128),
    "w4a16-g32-mse": dict(precision="int4", activations=None, group_size=32, clip="mse"),
    "int8-sq": dict(precision="int8", activations="static", smoothquant="auto"),
    "fp8-sq": dict(precision="fp8", activations="static", smoothquant="auto"),
    "int8-dynamic": dict(precision="int8", activations="dynamic"),
}


def config(args):
    from compile_backend import zoo_llama

    heads = max(1, args.hidden // 32)  # head dim 32; a K/V head per 3 query heads (GQA)
    return zoo_llama.LlamaConfig(vocab=256, hidden=args.hidden, layers=args.layers, heads=heads,
                                 kv_heads=max(1, heads // 3), intermediate=args.hidden * 8 // 3 // 64 * 64 or 64,
                                 max_context=args.seq)


def quantized_engine(model: torch.nn.Module, qcfg, calib: List[tuple]):
    """(the model compiled through the backend with ``qcfg``, its Report): static activations
    are calibrated on ``calib`` first (no progress, no cache); Dynamo is reset before."""
    from compile_backend import quant
    from compile_backend.backend import compile_backend as backend
    from compile_backend.report import Report

    q = quant.calibrate(model, calib, qcfg, progress=False, use_cache=False) if qcfg.activations == "static" else qcfg
    report = Report()
    torch._dynamo.reset()
    return torch.compile(model, backend=lambda gm, ex: backend(gm, ex, options={"quant": q}, report=report)), report


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def text_bytes(sentences: List[str]) -> torch.Tensor:
    return torch.tensor(list("\n".join(sentences).encode("utf-8")), dtype=torch.long)


def sequence_logits(decoder, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position (training): the prefill path without the cache."""
    seq = ids.shape[1]
    cos, sin = decoder.rope_cos[:seq], decoder.rope_sin[:seq]
    x = decoder.embed_tokens(ids)
    for layer in decoder.layers:
        q, k, v = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
        x = layer.finish(x, layer.self_attn.attend(q, k, v, causal=True))
    return decoder.lm_head(decoder.norm(x))


def train(decoder, data: torch.Tensor, steps: int, seq: int, batch: int, seed: int) -> List[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    losses = []
    decoder.train()
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        logits = sequence_logits(decoder, chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    decoder.eval()
    return losses


def prompts(data: torch.Tensor, seq: int, count: int) -> List[torch.Tensor]:
    """``count`` windows of ``seq`` bytes (+ the next byte) spread over held-out text."""
    stride = max(1, (data.numel() - seq - 1) // count)
    return [data[i * stride:i * stride + seq + 1] for i in range(count)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--eval", type=int, default=48, help="held-out windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the dtype the trained model is cast to before each mode compiles it")
    args = p.parse_args(argv)

    from compile_backend import quant, zoo_llama

    from benchmarks.decode_bench import layer_output_sqnr

    torch.manual_seed(args.seed)
    split = quant_data.english_sentences(1092)  # even positions / odd positions
    train_data, eval_data = text_bytes(split.calibration), text_bytes(split.evaluation)
    cfg = config(args)
    model = zoo_llama.prefill_model(cfg)
    t0 = time.perf_counter()
    losses = train(model.decoder, train_data, args.steps, args.seq, 16, args.seed)
    train_s = time.perf_counter() - t0
    model.eval()
    windows = prompts(eval_data, args.seq, args.eval)
    ids = torch.stack([w[:-1] for w in windows])
    target = torch.stack([w[-1] for w in windows])
    caches = (torch.zeros(cfg.cache_shape(ids.shape[0])), torch.zeros(cfg.cache_shape(ids.shape[0])))
    with torch.no_grad():
        ref = model(ids, *caches)[0]
    results: List[Dict[str, Any]] = [{"mode": "fp32", "next_byte_top1": (ref.argmax(-1) == target).float().mean().item()}]
    dtype = getattr(torch, args.dtype)
    float_ref = ref
    if dtype != torch.float32:  # every mode below compiles the model cast to this dtype
        model = copy.deepcopy(model).to(dtype)
        caches = tuple(c.to(dtype) for c in caches)
        with torch.no_grad():
            float_ref = model(ids, *caches)[0]
        results.append({"mode": args.dtype, "logits_cosine": cosine(float_ref, ref),
                        "top1_agreement": (float_ref.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                        "next_byte_top1": (float_ref.argmax(-1) == target).float().mean().item()})
        print(json.dumps(results[-1]), flush=True)
    inputs = (ids, *caches)
    calib_ids = torch.stack([w[:-1] for w in prompts(train_data, args.seq, 16)])
    calib = [(calib_ids, *(torch.zeros(cfg.cache_shape(16), dtype=dtype) for _ in range(2)))]
    for mode in args.modes:
        qcfg = quant.QuantConfig(min_features=16, **MODES[mode])
        fast, report = quantized_engine(model, qcfg, calib)
        with torch.no_grad():
            out = fast(*inputs)[0]
        torch._dynamo.reset()
        row: Dict[str, Any] = {
            "mode": mode, "config": {k: v for k, v in MODES[mode].items()},
            "logits_cosine": cosine(out, ref),
            "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "next_byte_top1": (out.argmax(-1) == target).float().mean().item(),
            "quantized": sum(lay["status"] == "quantized" for g in report.graphs for lay in g.quant),
            "fallbacks": sorted({f["op"] for g in report.graphs for f in g.fallbacks}),
        }
        if dtype != torch.float32:
            row["logits_cosine_vs_" + args.dtype] = cosine(out, float_ref)
        if qcfg.activations is None:
            sqnr = layer_output_sqnr(model, inputs, qcfg.precision, qcfg.group_size, qcfg.clip)
            row["layer_sqnr_db"] = {k: round(v, 2) for k, v in sqnr.items()}
            row["layer_sqnr_db_min"] = round(min(sqnr.values()), 2)
        else:
            layers = [lay for g in report.graphs for lay in g.quant if lay.get("sqnr_db") is not None]
            row["layer_sqnr_db_min"] = min((lay["sqnr_db"] for lay in layers), default=None)
        print(json.dumps({k: v for k, v in row.items() if k != "layer_sqnr_db"}), flush=True)
        results.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": "llm_accuracy", "model": {"hidden": cfg.hidden, "layers": cfg.layers, "heads": cfg.heads,
                                               "kv_heads": cfg.kv_heads, "intermediate": cfg.intermediate,
                                               "vocab": "bytes (256)", "seq": args.seq},
        "training": {"steps": args.steps, "batch": 16, "seed": args.seed, "seconds": round(train_s, 1),
                     "loss": losses, "text": "stdlib docstrings, the even sentences (quant_data.english_sentences)",
                     "fingerprint": quant_data.fingerprint(split.calibration)},
        "evaluation": {"windows": args.eval, "text": "the odd sentences",
                       "fingerprint": quant_data.fingerprint(split.evaluation)},
        "dtype": args.dtype, "device": f"cpu ({platform.machine()}), emulated path: the kernels' numerics reference",
        "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
