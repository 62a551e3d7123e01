"""Issue #20's decode step on models no one here wrote: one tiny random-init causal LM per
``transformers`` family, its one-token step over a ``StaticCache`` (as ``generate`` runs it;
``decode_bench.HFDecodeStep``) compiled through the backend in float and the weight-only modes,
against the same step in eager.

    PYTHONPATH=. python3 -m benchmarks.decode_families --dtype bfloat16 --out benchmarks/results/decode_families_bf16_cpu.json

Per family and mode: the logits' cosine to eager, the graphs Dynamo made (a break splits the
step: more launches, no CUDA graph across it), the ops left in ATen (each a launch our kernels do
not fuse), the layers quantized, and whether a second call gives the same logits. Every run starts
from its own copy of the prefilled cache: some families (OPT) read the step's position from the
cache's filled slots, so a step run twice on one cache would be a step further. On a CPU the
engine runs its emulated path (the kernels' numerics reference). Found with it (session 36):
Mistral's step, recompiled after its sliding-window layers advanced their Python-int counters,
left its attention in ATen (a dead read of SDPA's logsumexp; fixed in fx_passes/attention.py).
An error is recorded in the row, never raised: the table is the result.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

import torch

from .decode_bench import HFDecodeStep
from .quant_families import (VOCAB, chosen_families, compiled_cell, families, families_parser, layers_that_matter,
                             write_record)

MODES: Dict[str, Dict[str, Any]] = {
    "float": {},
    "w8a16": dict(precision="int8", activations=None),
    "w4a16-g32": dict(precision="int4", activations=None, group_size=32),
}
#: the prefill's length and the cache's (the step decodes position PREFILL)
PREFILL, CACHE = 15, 32


#: quant_families' encoder-only families (no decode step)
ENCODERS = ("bert", "roberta", "distilbert", "albert", "electra", "deberta_v2", "mpnet", "t5_encoder", "modernbert")


def decoder_families() -> Dict[str, Callable[[], torch.nn.Module]]:
    """quant_families' causal LMs (BLOOM left out: transformers' own prefill into a StaticCache
    fails for it, eager included)."""
    return {name: make for name, make in families().items()
            if name not in ENCODERS + ("bloom",)}


def prefilled(make: Callable[[], torch.nn.Module], dtype: torch.dtype, device: str, batch: int = 1):
    """(step module, token, prefilled cache) for one family, seeded."""
    import transformers

    torch.manual_seed(0)
    model = layers_that_matter(make()).to(device=device, dtype=dtype).eval()
    cache = transformers.StaticCache(config=model.config, max_batch_size=batch, max_cache_len=CACHE, device=device,
                                     dtype=dtype)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (batch, PREFILL), generator=g).to(device)
    with torch.no_grad():
        model(prompt, past_key_values=cache, cache_position=torch.arange(PREFILL, device=device), use_cache=True)
    token = torch.randint(0, VOCAB, (batch, 1), generator=g).to(device)
    return HFDecodeStep(model, PREFILL).eval(), token, cache


def run_family(name: str, make: Callable[[], torch.nn.Module], modes: List[str], dtype: torch.dtype,
               device: str, batch: int = 1) -> Dict[str, Any]:
    from compile_backend import quant

    row: Dict[str, Any] = {"family": name, "modes": {}}
    try:
        step, token, cache = prefilled(make, dtype, device, batch)
        position = torch.tensor([PREFILL], device=device)
        with torch.no_grad():
            ref = step(token, position, copy.deepcopy(cache))[0].float()
    except Exception as e:  # transformers' own step failed: nothing to compare with
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    row["model"] = type(step.model).__name__
    for mode in modes:
        config = {"quant": quant.QuantConfig(min_features=16, **MODES[mode])} if MODES[mode] else {}
        row["modes"][mode] = compiled_cell(step, lambda fn: fn(token, position, copy.deepcopy(cache))[0], ref,
                                           lambda: config)
    return row


def main(argv=None) -> int:
    p = families_parser(__doc__.split("\n")[0], MODES)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    known = decoder_families()
    names = chosen_families(p, args.families, known)
    rows = []
    for name in names:
        rows.append(run_family(name, known[name], args.modes, getattr(torch, args.dtype), args.device, args.batch))
        cells = [f"{m}:{r['cosine']:.4f} {r['graphs']}g {r['quantized']}q aten={','.join(r['aten']) or '-'}"
                 + (f" REJECTED {len(r['rejected'])}" if r["rejected"] else "")
                 if "cosine" in r else f"{m}:ERROR {r['error'][:80]}" for m, r in rows[-1]["modes"].items()]
        print(f"[decode_families] {name}: " + (" | ".join(cells) or f"ERROR {rows[-1].get('error', '')[:120]}"),
              flush=True)
    errors = sum("error" in r for row in rows for r in [row, *row["modes"].values()])
    write_record(args.out, "decode_families", "random init, one decode step over a prefilled StaticCache: does the "
                 "step compile whole, fused and close to eager; not an accuracy claim", rows, errors,
                 dtype=args.dtype, device=args.device, batch=args.batch)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
