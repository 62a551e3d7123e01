"""The weight-only reference of ``decode_bench`` (issue #20): is a W4A16 engine's logits cosine
against FP32 the quantization's own effect, or the engine's error?

    OMP_NUM_THREADS=2 PYTHONPATH=. python -m benchmarks.decode_reference --model hf --size base \\
        --dtypes fp16 fp32 --threads 2 --out /tmp/decode_reference_base.json

The reference of a weight-only engine is the same model in fp32, eager, with the weights of
exactly the layers the engine quantized replaced by their quantize-then-dequantize round trip,
computed with the project's one numerics reference (``kernels/weight_only_ref.py``: the scales,
codes and dequantized values the weight-only pass's ops compute; the pass quantizes a linear
layer's [N, K] weight, rows = output channels, fx_passes/weight_only.py). Against it the engine's
logits should agree to the engine's float rounding (``decode_bench``'s ``cosine_vs_reference``);
the reference against the plain fp32 model is what the quantization itself costs.

Run as a module (no GPU, no Triton, no engine): the case as ``decode_bench`` builds it (same
seed, context, batch), its fp32 logits, and per weight-only mode the reference's logits with
the layers a weight-only ``QuantConfig`` with default exclusions quantizes in these decoders
(every linear layer but ``lm_head``; a test checks this against an engine's report): cosine,
relative error, top-1 agreement with fp32. ``--dtypes fp16`` builds the case in fp16 as the GPU
bench does (fp16 weights, an fp16 prefill's cache), the references then in fp32 from it.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

#: per parameter FQN: (precision, group_size, clip), what the engine quantized it with
Spec = Dict[str, Tuple[str, Optional[int], str]]

#: weight-only modes of the CLI: (precision, group size), as decode_bench's peers
MODES = {"w8a16": ("int8", None), "w4a16": ("int4", 128)}


def round_trip(weight: torch.Tensor, precision: str, group_size: Optional[int] = None,
               clip: str = "minmax") -> torch.Tensor:
    """fp32 ``dequantize(quantize(W))`` of a linear layer's [N, K] weight (rows are output
    channels: INT8 one scale per row, INT4 one per ``group_size`` inputs of a row), or of an MoE's
    experts [E, N, K] (transformers' layout: each expert's rows, as the pass stacks them), by
    ``kernels/weight_only_ref.py``: the values the engine's weight-only GEMM multiplies by
    (before it rounds them to the activations' dtype)."""
    from compile_backend.kernels import weight_only_ref

    if weight.dim() == 3:
        return round_trip(weight.reshape(-1, weight.shape[-1]), precision, group_size, clip).reshape(weight.shape)
    if weight.dim() != 2:
        raise ValueError(f"round_trip takes a 2-D [N, K] weight (or [E, N, K] experts), got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    s = weight_only_ref.scales(w, precision, group_size, clip)
    return weight_only_ref.dequantize(weight_only_ref.quantize(w, s, precision, group_size), s, precision, group_size)


def spec_from_report(report) -> Spec:
    """{parameter FQN: (precision, group_size, clip)} of every layer the report says was
    quantized (a merged layer's record names its parts joined by '+'); the same names as
    ``decode_bench._quantized_weights``."""
    spec: Spec = {}
    for g in report.graphs:
        for q in g.quant:
            if q["status"] != "quantized":
                continue
            if q.get("activations") != "float (weight-only)":
                raise ValueError(f"layer {q['name']} is not weight-only quantized ({q.get('activations')})")
            for part in q["name"].split("+"):
                spec[part] = (q["precision"], q.get("group_size"), q.get("clip") or "minmax")
    return spec


def default_spec(model: torch.nn.Module, precision: str, group_size: Optional[int], clip: str = "minmax",
                 exclude: Iterable[str] = ("lm_head",)) -> Spec:
    """Every ``nn.Linear`` weight of ``model`` but those of modules named in ``exclude``: what a
    weight-only ``QuantConfig`` with its default exclusions quantizes in the zoo's and
    transformers' Llama decoders (no embeddings or convolutions to leave out besides)."""
    exclude = set(exclude)
    return {f"{n}.weight": (precision, group_size, clip) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in exclude}


def round_trip_weights(model: torch.nn.Module, spec: Mapping[str, Tuple[str, Optional[int], str]]) -> List[str]:
    """In place: each weight of ``spec`` (a parameter FQN of ``model``) replaced by a new
    parameter holding its :func:`round_trip`, in the weight's dtype. A new parameter, not a
    copy into the old one: a weight shared with another module (a tied embedding) keeps its
    float values there, as the engine's float layers do. Returns the names replaced; a name
    that is not a 2-D parameter of ``model`` raises (the reference must cover every layer)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    done = []
    for name in sorted(spec):
        if name not in params:
            raise KeyError(f"quantized weight {name!r} is not a parameter of {type(model).__name__}")
        owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
        module = model.get_submodule(owner)
        w = getattr(module, attr)
        precision, group_size, clip = spec[name]
        deq = round_trip(w, precision, group_size, clip).to(w.dtype)
        setattr(module, attr, torch.nn.Parameter(deq, requires_grad=False))
        done.append(name)
    return done


def reference_model(model: torch.nn.Module, spec: Optional[Mapping] = None) -> torch.nn.Module:
    """An fp32 copy of ``model`` with the weights of ``spec`` round-tripped (None: float)."""
    twin = copy.deepcopy(model).float()
    if spec:
        round_trip_weights(twin, spec)
    return twin


def fp32_logits(model: torch.nn.Module, inputs, model_kind: str = "hf", size: str = "tiny",
                spec: Optional[Mapping] = None) -> torch.Tensor:
    """The first output (logits) of the fp32 reference of ``model`` (with ``spec`` round-tripped)
    on ``inputs``, eager. ``hf``: ``decode_bench.hf_fp32_logits`` (an fp32 copy of the static
    cache, as long as the context); other models: floating inputs widened to fp32 and every
    tensor input copied (a cache the step writes in place stays the caller's). The copy is freed
    before returning: at most one fp32 copy of the model lives at a time."""
    from . import decode_bench

    prepare = (lambda twin: round_trip_weights(twin, spec)) if spec else None
    if model_kind in ("hf", "hf-moe"):
        return decode_bench.hf_fp32_logits(model, inputs, size, prepare=prepare)
    twin = reference_model(model, spec)
    args = [x.to(torch.float32 if x.is_floating_point() else x.dtype, copy=True) if isinstance(x, torch.Tensor) else x
            for x in inputs]
    with torch.no_grad():
        out = twin(*args)[0].float()
    del twin, args
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.reshape(-1).double(), b.reshape(-1).double(), dim=0).item()


def compare(logits: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """cosine, relative L2 error and top-1 agreement (per row) of ``logits`` against ``ref``."""
    a, b = logits.float().reshape(-1, logits.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    return {"cosine": cosine(a, b), "rel_l2": ((a - b).norm() / b.norm()).item(),
            "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def measure(model_kind: str, size: str, dtype: torch.dtype, modes: Iterable[str], batch: int = 1) -> Dict[str, Any]:
    """The case as decode_bench builds it (decode, ``batch``, on the CPU), its fp32 logits and
    each mode's round-tripped reference against them."""
    from compile_backend import zoo

    from . import decode_bench

    t0 = time.perf_counter()
    if model_kind == "hf":
        model, inputs = decode_bench.hf_decode_case(size, batch, "cpu", dtype)
    else:
        model, inputs = zoo.get("llama_decode", size, batch=batch, dtype=dtype, device="cpu")
    model.eval()
    out: Dict[str, Any] = {"model": model_kind, "size": size, "batch": batch, "case_dtype": str(dtype).replace("torch.", ""),
                           "parameters": sum(p.numel() for p in model.parameters()),
                           "build_s": round(time.perf_counter() - t0, 1)}
    ref = fp32_logits(model, inputs, model_kind, size)
    out["fp32_logits_std"] = ref.std().item()
    for mode in modes:
        precision, group = MODES[mode]
        spec = default_spec(model, precision, group)
        t0 = time.perf_counter()
        q = fp32_logits(model, inputs, model_kind, size, spec)
        out[mode] = {"precision": precision, "group_size": group, "layers": len(spec), **compare(q, ref),
                     "weight_sqnr_db_mean": _mean_weight_sqnr(model, spec), "s": round(time.perf_counter() - t0, 1)}
    del model, inputs
    return out


def _mean_weight_sqnr(model: torch.nn.Module, spec: Mapping) -> float:
    """Mean over the round-tripped weights of their SQNR in dB (quant_ref.sqnr_db)."""
    from compile_backend.kernels import quant_ref

    params = dict(model.named_parameters())
    vals = [quant_ref.sqnr_db(params[n].detach().float(), round_trip(params[n], *spec[n])) for n in sorted(spec)]
    return round(sum(vals) / len(vals), 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_reference", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("hf", "zoo"), default="hf")
    p.add_argument("--size", choices=("tiny", "base"), default="base")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "fp16"), default=["fp16", "fp32"],
                   help="the dtype the case is built in (fp16: weights and prefill as on the GPU)")
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.dtypes:
        row = measure(args.model, args.size, {"fp32": torch.float32, "fp16": torch.float16}[name], args.modes)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
