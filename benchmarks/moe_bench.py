"""Mixture-of-experts weight-only GEMMs (``weight_only_grouped_mm``, W8A16 / W4A16) against the
bf16 grouped GEMM transformers runs (``torch._grouped_mm``), at real MoE expert shapes, on the GPU.

    PYTHONPATH=. python3 -m benchmarks.moe_bench --out $OUT/moe_bench.json --commit <sha>

Per model shape (Mixtral-8x7B: 8 experts, top-2, hidden 4096, expert FFN 14336; Qwen1.5-MoE-A2.7B:
60 experts, top-4, hidden 2048, expert FFN 1408) and per token count (1 and 16: decode; 512:
prefill), for the experts' two grouped GEMMs (gate/up merged [E, 2F, H], down [E, H, F]): the
bf16 ``_grouped_mm``, then ours in INT8 and INT4 (group 128), each timed over tokens routed top-k
by random logits (the same routing for every peer). Beside the time: the weight bytes of the
experts the routing touches (each read at least once a call) and the bandwidth that makes.
Timing as ``weight_only_bench.graph_time_ms`` (20 calls in one CUDA graph, median of 5 replays),
the weights rotated over enough copies to exceed the L2 cache. ``--device cpu`` (tiny shapes,
TRITON_INTERPRET=1) only checks that every peer runs and agrees with the reference.
"""
from __future__ import annotations

import argparse
import json
import platform
from typing import Any, Dict, List

import torch

#: (experts, top-k, hidden, expert FFN)
MODELS = {"mixtral_8x7b": (8, 2, 4096, 14336), "qwen15_moe_a27b": (60, 4, 2048, 1408)}
TOKENS = (1, 16, 512)
L2_BYTES = 60 * 2**20


def routing(tokens: int, experts: int, top_k: int, device) -> torch.Tensor:
    """int32 offsets [E] of ``tokens`` rows routed top-k by random logits (rows sorted by expert)."""
    g = torch.Generator().manual_seed(tokens)
    chosen = torch.randn(tokens, experts, generator=g).topk(top_k, -1).indices.reshape(-1)
    return torch.bincount(chosen, minlength=experts).cumsum(0).to(torch.int32).to(device)


def layer_rows(model: str, device: str, tokens_list) -> List[Dict[str, Any]]:
    from compile_backend.kernels import weight_only_ref as ref
    from compile_backend.kernels.weight_only_grouped import (weight_only_grouped_mm,
                                                             weight_only_grouped_mm_reference)

    from .weight_only_bench import graph_time_ms

    experts, top_k, hidden, ffn = MODELS[model]
    if device == "cpu":  # the interpreter: tiny sizes, the same code
        hidden, ffn = 64, 96
    rows = []
    for layer, (n, k) in {"gate_up": (2 * ffn, hidden), "down": (hidden, ffn)}.items():
        g = torch.Generator().manual_seed(n + k)
        w = (torch.randn(experts, n, k, generator=g) / k**0.5).to(torch.bfloat16)
        quantized = {p: ref.quantize_weight(w.reshape(experts * n, k).float(), p, gs) for p, gs in
                     (("int8", None), ("int4", 128 if k % 128 == 0 else 32))}
        w = w.to(device)
        copies = max(1, -(-2 * L2_BYTES // (w.numel() * 2))) if device == "cuda" else 1
        ws = [w] + [w.clone() for _ in range(copies - 1)]
        wq = {p: [(c.to(device), s.to(device))] + [(c.to(device).clone(), s.to(device).clone())
                                                   for _ in range(copies - 1)] for p, (c, s) in quantized.items()}
        for tokens in tokens_list:
            m = tokens * top_k
            offs = routing(tokens, experts, top_k, device)
            x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
            touched = int((torch.diff(offs.cpu(), prepend=torch.zeros(1, dtype=torch.int32)) > 0).sum())
            row: Dict[str, Any] = {"model": model, "layer": layer, "tokens": tokens, "rows": m, "n": n, "k": k,
                                   "experts": experts, "experts_touched": touched, "peers": {}}
            peers = {"bf16_grouped_mm": (lambda i: torch._grouped_mm(x, ws[i].transpose(1, 2), offs), 2.0)}
            for p, gs in (("int8", None), ("int4", 128 if k % 128 == 0 else 32)):
                peers[p] = ((lambda i, p=p, gs=gs: weight_only_grouped_mm(
                    x, wq[p][i][0], wq[p][i][1], offs, precision=p, group_size=gs)), 1.0 if p == "int8" else 0.5)
                want = weight_only_grouped_mm_reference(x, wq[p][0][0], wq[p][0][1], offs, precision=p, group_size=gs)
                got = peers[p][0](0)
                used = slice(0, int(offs[-1]))
                row.setdefault("max_rel_err", {})[p] = float(((got[used].float() - want[used].float()).norm()
                                                              / want[used].float().norm().clamp_min(1e-12)))
            for name, (fn, bytes_a_weight) in peers.items():
                cell: Dict[str, Any] = {}
                if device == "cuda":
                    ms = graph_time_ms(fn, copies)
                    weight_bytes = touched * n * k * bytes_a_weight
                    cell = {"us": round(ms * 1e3, 2), "weight_gb_per_s": round(weight_bytes / ms / 1e6, 1)}
                else:
                    fn(0)
                    cell = {"ran": True}
                row["peers"][name] = cell
            if device == "cuda":
                base = row["peers"]["bf16_grouped_mm"]["us"]
                for p in ("int8", "int4"):
                    row["peers"][p]["speedup_vs_bf16"] = round(base / row["peers"][p]["us"], 3)
            rows.append(row)
            print(f"[moe_bench] {model} {layer} tokens={tokens}: " + ", ".join(
                f"{p} {c.get('us', '-')} us" for p, c in row["peers"].items()), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import triton

    rows = [r for model in args.models for r in layer_rows(model, args.device, args.tokens)]
    record = {"benchmark": "moe_bench", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "commit": args.commit, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
