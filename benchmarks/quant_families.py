"""Every quantization mode on models no one here wrote: one tiny random-init model per
``transformers`` family (decoders with RoPE / GQA / ALiBi / parallel blocks, GPT-2's ``Conv1D``,
encoders), compiled through the backend in a dtype, against the same model in float.

    PYTHONPATH=. python3 -m benchmarks.quant_families --dtype bfloat16 --out benchmarks/results/quant_families_bf16_cpu.json

Random weights and random token ids say little about accuracy (there are no trained outliers);
the linear weights are redrawn at a variance-preserving scale (``layers_that_matter``) so that
every layer moves the output. What this checks is that each mode goes through each family's graphs without an error, quantizes
its linears, and stays close to float (output cosine). On a CPU the engine runs its emulated path
(the kernels' numerics reference). Found with it (session 35): SmoothQuant refused GPT-2's
``Conv1D`` weights (calibrate crashed), and bf16 calibration clipped RMS-norm outputs.
An error is recorded in the row (type and message), never raised: the table is the result.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import time
from typing import Any, Callable, Dict, List

import torch

MODES: Dict[str, Dict[str, Any]] = {
    "w8a16": dict(precision="int8", activations=None),
    "w4a16-g32": dict(precision="int4", activations=None, group_size=32),
    "int8-static": dict(precision="int8", activations="static"),
    "int8-sq": dict(precision="int8", activations="static", smoothquant="auto"),
    "fp8-static": dict(precision="fp8", activations="static"),
    "int8-dynamic": dict(precision="int8", activations="dynamic"),
}
VOCAB, HIDDEN, LAYERS, HEADS, FFN = 512, 128, 2, 4, 256


def families() -> Dict[str, Callable[[], torch.nn.Module]]:
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN)
    gqa = dict(common, num_key_value_heads=2)
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**gqa)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**gqa)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**gqa)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(head_dim=HIDDEN // HEADS, **gqa)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, **gqa)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=HIDDEN // HEADS, **gqa)),  # q/k RMS norms
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=HIDDEN // HEADS, **gqa)),  # logit soft-capping
        "olmo": lambda: T.OlmoForCausalLM(T.OlmoConfig(**gqa)),  # LayerNorm without parameters
        "stablelm": lambda: T.StableLmForCausalLM(T.StableLmConfig(**gqa)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                                        rotary_dim=16)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                     num_attention_heads=HEADS, ffn_dim=FFN, word_embed_proj_dim=HIDDEN)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                                                           n_head=HEADS)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                                              num_hidden_layers=LAYERS, num_attention_heads=HEADS)),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(partial_rotary_factor=0.5, **common)),  # parallel block
        "cohere": lambda: T.CohereForCausalLM(T.CohereConfig(**gqa)),  # parallel block, logit scale
        "granite": lambda: T.GraniteForCausalLM(T.GraniteConfig(  # embedding / residual / logit multipliers
            embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=8.0,
            **gqa)),
        "nemotron": lambda: T.NemotronForCausalLM(T.NemotronConfig(**gqa)),  # squared ReLU, LayerNorm1P
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=HIDDEN // HEADS, sliding_window=8, **gqa)),
        "starcoder2": lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**gqa)),
        "gpt_bigcode": lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(  # multi-query attention
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, multi_query=True)),
        # mixtures of experts (transformers 5: experts as one [E, N, K] parameter, torch._grouped_mm)
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **gqa)),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(  # plus a shared expert
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128, **gqa)),
        "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(  # latent attention, routed experts
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=HEADS, intermediate_size=FFN, moe_intermediate_size=64, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32,
            qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)),
        "bert": lambda: T.BertModel(T.BertConfig(**common)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**common)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                                                    n_heads=HEADS, hidden_dim=FFN)),
        "albert": lambda: T.AlbertModel(T.AlbertConfig(embedding_size=64, **common)),  # one layer's weights, shared
        "electra": lambda: T.ElectraModel(T.ElectraConfig(embedding_size=64, **common)),  # embedding projection
        "deberta_v2": lambda: T.DebertaV2Model(T.DebertaV2Config(**common)),  # disentangled relative attention
        "mpnet": lambda: T.MPNetModel(T.MPNetConfig(**common)),  # relative position bias buckets
        "modernbert": lambda: T.ModernBertModel(T.ModernBertConfig(  # rotary, GeGLU, local attention windows
            pad_token_id=0, local_attention=8, global_attn_every_n_layers=2, **dict(common, num_hidden_layers=3))),
        "t5_encoder": lambda: T.T5EncoderModel(T.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_ff=FFN, num_layers=LAYERS,
                                                           num_heads=HEADS, d_kv=HIDDEN // HEADS)),  # RMS norm, bias
    }


def layers_that_matter(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every linear weight (``nn.Linear``, GPT-2's ``Conv1D``) redrawn at a
    variance-preserving scale, N(0, 1 / fan_in), seeded. Why: at transformers' own init (std
    0.02) each block adds ~5% to the residual stream, and the output with every linear weight
    zeroed was still at cosine 0.998 to float (BERT, DeBERTa, MPNet, session 37): a broken
    quantized layer could not show. At 1 / fan_in each block moves the output as much as the
    embeddings do."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
                fan_in = w.shape[1] if isinstance(m, torch.nn.Linear) else w.shape[0]
                w.copy_(torch.randn(w.shape, generator=g) / fan_in ** 0.5)
    return model


def engine_row(out: torch.Tensor, ref: torch.Tensor, report, start: float) -> Dict[str, Any]:
    """One mode's cell: the output's cosine to float, the layers quantized, the graphs Dynamo
    made, the ops left in ATen, the kernels validation rejected, the seconds it took."""
    layers = [lay for g in report.graphs for lay in g.quant]
    return {"cosine": cosine(out, ref),
            "quantized": sum(lay["status"] == "quantized" for lay in layers), "layers": len(layers),
            "graphs": len(report.graphs), "aten": sorted({f["op"] for g in report.graphs for f in g.fallbacks}),
            "rejected": rejected_kernels(report), "seconds": round(time.perf_counter() - start, 2)}


def compiled_cell(model: torch.nn.Module, run: Callable[[Callable], torch.Tensor], ref: torch.Tensor,
                  options: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """One mode's cell of a families run: ``model`` compiled through the backend with
    ``options()`` (made inside: a calibration may fail too), ``run(compiled)`` called twice,
    its output compared with ``ref`` (``engine_row``) and with itself (``repeatable``). An error
    is recorded in the cell, never raised: the table is the result."""
    from compile_backend.backend import compile_backend as backend
    from compile_backend.report import Report

    start, report = time.perf_counter(), Report()
    try:
        chosen = options()
        torch._dynamo.reset()
        fn = torch.compile(model, backend=functools.partial(backend, options=chosen, report=report))
        with torch.no_grad():
            out, again = run(fn).float(), run(fn).float()
        return {**engine_row(out, ref, report, start), "repeatable": bool(torch.equal(out, again))}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        torch._dynamo.reset()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of two outputs in float64, with no floor under the norms (torch's
    ``cosine_similarity`` clamps each norm to 1e-8, which turns outputs of ~1e-12 into a
    cosine of ~0 however close they are). Both zero: 1; one zero: 0."""
    a, b = a.flatten().double(), b.flatten().double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float(na == nb)
    return (a @ b / (na * nb)).item()


def rejected_kernels(report) -> List[str]:
    """A Report's kernels that validation caught computing something else (or whose builder
    failed): bugs of ours, run in ATen instead (seen only under TRITON_INTERPRET=1 or on a GPU)."""
    return sorted({f"{f['op']}: {f['reason']}"[:240] for g in report.graphs for f in g.fallbacks
                   if "rejected" in f["reason"] or "builder error" in f["reason"]})


def families_parser(description: str, modes) -> argparse.ArgumentParser:
    """The options every families run takes (dtype, device, families, modes, out)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--families", nargs="*", default=None, help="default: every family")
    p.add_argument("--modes", nargs="+", default=list(modes), choices=list(modes))
    p.add_argument("--out", default=None)
    return p


def chosen_families(p: argparse.ArgumentParser, asked, known: Dict[str, Any]) -> List[str]:
    """The families asked for (all when none), refusing unknown names through ``p``."""
    names = asked or list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(known)}")
    return names


def write_record(path, benchmark: str, note: str, rows: List[dict], errors: int, **fields: Any) -> None:
    """The results file of a families run (``path`` None: nothing written): what ran where."""
    import transformers

    record = {"benchmark": benchmark, **fields, "note": note, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "errors": errors, "results": rows}
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")


class Output(torch.nn.Module):
    """The tensor a user reads: ``logits`` of a causal LM (no KV cache), else ``last_hidden_state``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.causal = hasattr(model, "lm_head") or "CausalLM" in type(model).__name__

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, use_cache=False) if self.causal else self.model(input_ids=input_ids)
        return (out.logits if self.causal else out.last_hidden_state,)


def run_family(name: str, factory: Callable[[], torch.nn.Module], modes: List[str], dtype: torch.dtype,
               device: str, seq: int = 24) -> Dict[str, Any]:
    from compile_backend import quant

    from benchmarks.llm_accuracy import quantized_engine

    torch.manual_seed(0)
    model = Output(layers_that_matter(factory())).eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g).to(device)
    calib = [(torch.randint(0, VOCAB, (4, seq), generator=g).to(device),) for _ in range(2)]
    with torch.no_grad():
        ref = model(ids)[0].float()
    row: Dict[str, Any] = {"family": name, "model": type(model.model).__name__, "modes": {}}
    for mode in modes:
        start = time.perf_counter()
        try:
            fast, report = quantized_engine(model, quant.QuantConfig(min_features=16, **MODES[mode]), calib)
            with torch.no_grad():
                out = fast(ids)[0].float()
            row["modes"][mode] = engine_row(out, ref, report, start)
        except Exception as e:  # the row records it: the table is the result
            row["modes"][mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            torch._dynamo.reset()
    return row


def main(argv=None) -> int:
    p = families_parser(__doc__.split("\n")[0], MODES)
    args = p.parse_args(argv)
    known = families()
    names = chosen_families(p, args.families, known)
    rows = []
    for name in names:
        rows.append(run_family(name, known[name], args.modes, getattr(torch, args.dtype), args.device))
        cells = [f"{m}:{r['cosine']:.4f}/{r['quantized']}q" + (f" REJECTED {len(r['rejected'])}" if r["rejected"] else "")
                 if "cosine" in r else f"{m}:ERROR {r['error'][:80]}"
                 for m, r in rows[-1]["modes"].items()]
        print(f"[quant_families] {name}: " + " ".join(cells), flush=True)
    errors = sum("error" in r for row in rows for r in row["modes"].values())
    write_record(args.out, "quant_families", "random init, random ids: a does-it-run-and-stay-close check, not an "
                 "accuracy claim", rows, errors, dtype=args.dtype, device=args.device)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
