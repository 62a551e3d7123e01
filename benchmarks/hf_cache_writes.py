"""transformers decoders decoding one token into a StaticCache through the backend: does each
layer's cache update run in place in our kernels, and does the step equal eager? (issue #20:
models no one here wrote.)

    PYTHONPATH=. TRITON_INTERPRET=1 python3 -m benchmarks.hf_cache_writes --out benchmarks/results/hf_cache_writes_cpu.json

Per decoder family in the installed transformers: a 2-layer config (hidden 64, 4 heads, 2 KV
heads), random init, a StaticCache of 32 slots filled by an eager prefill of 3 tokens; the
compiled step at position 3 against eager: the report's ``input_writes`` (``kernel``: written in
place by the kernel making the value; ``aten in place``; ``copy_``), its fallbacks, and the
largest absolute difference of the logits.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

import torch

from .decode_bench import HFDecodeStep as Step  # sets transformers 5's token counts to the position

FAMILIES = ("Llama", "Qwen2", "Gemma", "Mistral", "Phi3", "Gemma2", "Qwen3", "Olmo", "Granite", "Cohere", "StableLm")


def check(family: str, cache_dir: str) -> Dict[str, Any]:
    import transformers

    import compile_backend

    torch.manual_seed(0)
    cfg = getattr(transformers, family + "Config")(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                                   max_position_embeddings=128, pad_token_id=0)
    if family == "Gemma":
        cfg.head_dim = 16
    model = getattr(transformers, family + "ForCausalLM")(cfg).eval()
    cache = transformers.StaticCache(config=cfg, max_batch_size=1, max_cache_len=32, device="cpu", dtype=torch.float32)
    token, position = torch.tensor([[5]]), torch.tensor([3])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), past_key_values=cache, cache_position=torch.arange(3), use_cache=True)
        want = Step(model, 3).eval()(token, position, cache)[0]
        report = compile_backend.explain(Step(model, 3).eval(), token, position, cache, cache_dir=cache_dir)
        torch._dynamo.reset()
        got = torch.compile(Step(model, 3).eval(), backend="compile_backend", options={"cache_dir": cache_dir})(
            token, position, cache)[0]
    torch._dynamo.reset()
    graphs = report.graphs
    return {"family": family, "graphs": [g.role for g in graphs],
            "input_writes": [w["by"] for g in graphs for w in g.input_writes],
            # transformers >= 5: each layer's token count, written in place beside its caches
            "token_counts": sum(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                                for layer in getattr(cache, "layers", ())),
            "fallbacks": sorted({f["op"] for g in graphs for f in g.fallbacks}),
            "max_abs_diff": float((got - want).abs().max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_cache_writes", description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--cache-dir", default=None, help="engine cache (default: a temporary directory)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import tempfile

    from compile_backend.bench.results import environment

    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            try:
                rows.append(check(family, args.cache_dir or tmp))
            except Exception as exc:  # recorded, never hidden
                rows.append({"family": family, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": environment("cpu"), "results": rows}, f, indent=1, default=str)
    return 0 if rows and not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
