"""LLM decode and prefill, side by side on the GPU (issue #20): tokens/s per peer.

    PYTHONPATH=. python3 -m benchmarks.decode_bench --out $OUT/decode_h200.json --commit <sha>
    PYTHONPATH=. python3 -m benchmarks.decode_bench --size tiny --device cpu --batches 1   (smoke)

The zoo's Llama-style decoder (``compile_backend/zoo_llama.py``; base: 1.1B parameters, GQA
32/4, a static KV cache passed in), fp16. Per batch (default 1 and 16), one decode step at
context 512 (position 511), for each peer: eager, Inductor reduce-overhead (CUDA graphs), our
FP16 engine, our weight-only engines W8A16 (per channel) and W4A16 (group 128; the ``-head``
variants quantize the LM head too, as torchao's and gpt-fast's recipes do; a ``-pdl`` suffix:
the same engine launching with Programmatic Dependent Launch, ``Options.pdl``), and our W8A8
engines with SmoothQuant (``int8-sq``, ``fp8-sq``: static, calibrated on the case's inputs,
alpha chosen per layer group; the prefill row's). With ``--prefill``, a 2048-token prefill at
batch 1 as well. Times: median of ``--iters`` calls
timed with CUDA events after warm-up, the same inputs every call (a decode step costs the same
at a fixed position), each call from an idle GPU (``ms``: the host's work before the GPU starts
counts, as in a loop that reads each token on the host) and, for decode, ``ms_pipelined``: steps
enqueued back to back, each one's argmax fed to the next on the GPU (how gpt-fast and torchao's
published tokens/s are timed: the host's work overlaps the GPU's; ``pipelined_host_bound``: the
host's enqueueing took most of the step, so the number is the host's). Accuracy beside speed:
cosine of the last-position logits against the
fp16 eager peer, for the weight-only engines each quantized layer's output SQNR (the reference
numerics on the inputs the float model gives it; ``layer_sqnr_db``) and ``cosine_vs_reference``:
the cosine against the same model in fp32, eager, with the weights of exactly the layers the
engine quantized round-tripped by the reference numerics (``decode_reference.py``; near 1: the
engine computes the reference's numbers, and ``cosine_vs_fp32`` is the quantization's own
effect), and each of our engines' report (layers quantized, fallbacks). ``--model hf``: the
decode step of transformers' ``LlamaForCausalLM`` at the same sizes with a ``StaticCache`` (written in place), in place of
the zoo decoder; ``--model zoo-inplace``: the zoo decoder's step into per-layer caches written
in place (``llama_decode_inplace``: a serving loop's step, no cache returned). ``--profile``: each peer's GPU kernels per call and its host time by function (cProfile)
(``kernel_profile.profile_kernels``, the CUDA graph replayed). Each record carries the device,
versions and commit.
"""
from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from compile_backend.bench.measure import clean_slate, prime_process

from .quant_suite import gemm_choices

PEERS = ("eager", "inductor-reduce-overhead", "compile_backend", "w8a16", "w4a16", "w8a16-head", "w4a16-head",
         "int8-sq", "fp8-sq", "compile_backend-pdl", "w8a16-pdl", "w4a16-pdl", "w8a16-head-pdl", "w4a16-head-pdl",
         "torchao-int8wo", "torchao-int4wo")
#: a peer of ours with this suffix: the same engine with ``Options.pdl`` (kernels launched with
#: Programmatic Dependent Launch: each may start while the one before it drains)
PDL_SUFFIX = "-pdl"
#: W8A8 with SmoothQuant (issue #20's prefill row): static activations calibrated on a batch like
#: the case's (random init is fine for speed), the smoothing alpha chosen per layer group
W8A8_SMOOTH = {"int8-sq": "int8", "fp8-sq": "fp8"}
#: torchao's weight-only recipes (the peer issue #20's published numbers come from), every Linear
#: quantized (the LM head too: compare with our ``-head`` peers), then Inductor reduce-overhead
#: (CUDA graphs) as gpt-fast times decode. INT4: group 128, tinygemm's packing
#: (``_weight_int4pack_mm``, bfloat16 only: run with ``--dtype bfloat16``); INT8: per channel.
#: Inductor's settings are torchao's (``set_inductor_config``): run these peers last.
TORCHAO_WEIGHT_ONLY = ("torchao-int8wo", "torchao-int4wo")


def _time_ms(fn: Callable[[], Any], iters: int, cuda: bool) -> Tuple[float, float]:
    """(median ms a call, median ms the host spends in a call): on CUDA a call is timed from an
    idle GPU (each step's output is waited for, as a decode loop reading its token does), so the
    host's work before the GPU starts counts; the host time says how much of a step that is."""
    for _ in range(5):
        fn()
    samples, host = [], []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t) * 1e3)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
            host.append(samples[-1])
    return statistics.median(samples), statistics.median(host)


#: a pipelined step whose host work (enqueueing it) takes this fraction of the step or more is the
#: host's time, not the GPU's: the record says so (``pipelined_host_bound``). Session 33 run 3
#: (an H100 whose host took 0.93 ms a step): W4A16 "1.008 ms" against 0.761 on another host
HOST_BOUND_FRACTION = 0.9


def _loop_ms(fn: Callable[[], Any], token: torch.Tensor, steps: int, host: Optional[List[float]] = None) -> float:
    """Median ms a step of a decode loop whose steps are enqueued back to back: each
    step's argmax is written into ``token`` on the GPU, the next step reads it, and the host
    waits only at the loop's end, so the host's work on a step overlaps the GPU's on the one
    before (how gpt-fast and torchao's generate.py time tokens/s); the argmax and the copy count
    in every peer's step. Five loops of ``steps``, the median. ``host``: gets each loop's host
    ms a step (enqueueing alone), which bounds the step from below."""
    def step():
        token.copy_(fn()[0].argmax(-1).view(token.shape))

    for _ in range(3):
        step()
    samples = []
    for _ in range(5):
        if token.is_cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if host is not None:
            host.append((time.perf_counter() - t) * 1e3 / steps)
        if token.is_cuda:
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / steps)
        else:
            samples.append((time.perf_counter() - t) * 1e3 / steps)
    return statistics.median(samples)


def host_profile(fn, calls: int, top: int = 30) -> str:
    """cProfile of ``calls`` calls (no synchronisation): the functions by their own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def host_layers(fn, calls: int = 200) -> Dict[str, float]:
    """Median microseconds per call spent inside each layer of a call (inclusive), timed by
    wrapping them: the whole call, our runtime (``CompiledGraph.__call__``), the engine (weight
    checks, then the runner), the CUDA graph runner and ``CUDAGraph.replay`` itself. What a
    cProfile cannot say without inflating every small call: where a call's host time goes."""
    from compile_backend import cuda_graph, engine, runtime

    layers = {"runtime": (runtime.CompiledGraph, "__call__"), "engine": (engine.Engine, "_call"),
              "runner": (cuda_graph.CudaGraphRunner, "__call__"), "replay": (torch.cuda.CUDAGraph, "replay")}
    spent: Dict[str, List[float]] = {k: [] for k in ["call", *layers]}
    saved = {k: getattr(cls, attr) for k, (cls, attr) in layers.items()}

    def timed(key, original):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key][-1] += time.perf_counter() - t0
        return wrapper

    try:
        for key, (cls, attr) in layers.items():
            setattr(cls, attr, timed(key, saved[key]))
        with torch.no_grad():
            for _ in range(calls):
                for v in spent.values():
                    v.append(0.0)
                t0 = time.perf_counter()
                fn()
                spent["call"][-1] = time.perf_counter() - t0
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
    finally:
        for key, (cls, attr) in layers.items():
            setattr(cls, attr, saved[key])
    return {k: round(statistics.median(v) * 1e6, 1) for k, v in spent.items()}


def _peer(name: str, model: torch.nn.Module, inputs=()):
    """(callable, report or None) for one peer (``inputs``: the case's, for calibration)."""
    from compile_backend import quant
    from compile_backend.backend import compile_backend as backend
    from compile_backend.report import Report

    torch._dynamo.reset()
    if name == "eager":
        return model, None
    if name == "inductor-reduce-overhead":
        return torch.compile(model, mode="reduce-overhead"), None
    if name in TORCHAO_WEIGHT_ONLY:
        return torch.compile(torchao_weight_only(model, name), mode="reduce-overhead"), None
    use_pdl = name.endswith(PDL_SUFFIX)
    name = name[:-len(PDL_SUFFIX)] if use_pdl else name
    options = {"compile_backend": {}}
    options.update({n: {"quant": quant.QuantConfig(precision=p, activations=None, group_size=g,
                                                   default_exclusions=not head)}
                    for n, (p, g, head) in WEIGHT_ONLY.items()})
    if name in W8A8_SMOOTH:
        cfg = quant.QuantConfig(precision=W8A8_SMOOTH[name], activations="static", smoothquant="auto")
        options[name] = {"quant": quant.calibrate(model, [tuple(inputs)], cfg, progress=False, use_cache=False)}
    options = {**options[name], "pdl": use_pdl}
    report = Report()
    return torch.compile(model, backend=functools.partial(backend, options=options, report=report)), report


def torchao_weight_only(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of ``model`` with every Linear quantized by torchao's weight-only config for
    ``name`` (``TORCHAO_WEIGHT_ONLY``); an ImportError or torchao's own error says why not."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if name == "torchao-int4wo":
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtypes != {torch.bfloat16}:
            raise ValueError(f"torchao-int4wo packs for tinygemm, which takes bfloat16 only (the model is "
                             f"{sorted(map(str, dtypes))}): run decode_bench with --dtype bfloat16")
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    else:
        config = Int8WeightOnlyConfig()
    twin = copy.deepcopy(model)
    quantize_(twin, config)
    return twin


def _summary(report) -> Dict[str, Any]:
    if report is None:
        return {}
    layers = [q for g in report.graphs for q in g.quant]
    return {"graphs": len(report.graphs), "quantized": sum(q["status"] == "quantized" for q in layers),
            "float_layers": {q["name"]: q["reason"] for q in layers if q["status"] != "quantized"},
            "fallbacks": sorted({f["op"] for g in report.graphs for f in g.fallbacks}),
            # why each was left in ATen (session 16's HF runs left a rotary group there, reason unrecorded)
            "fallback_reasons": sorted({f"{f['op']}: {f.get('reason', '?')}"[:400] for g in report.graphs for f in g.fallbacks}),
            "kernels": {k: v for g in report.graphs for k, v in _impls(g).items()},
            # the tuner's pick per distinct GEMV group (path: gemv / tma / skinny ..., tile, tuned ms)
            "gemm_choices": gemm_choices(report),
            # inputs written in place (the KV caches, HF's per-layer token counts): by our kernel,
            # or by an ATen call (each one a launch a step)
            "input_writes": {by: sum(w.get("by") == by for g in report.graphs for w in g.input_writes)
                             for by in sorted({w.get("by") for g in report.graphs for w in g.input_writes})}}


def _impls(graph_report) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for k in graph_report.kernels:
        key = f"{k['kind']}:{k.get('impl')}"
        counts[key] = counts.get(key, 0) + 1
    return counts


#: weight-only peers: (precision, INT4 group size, the LM head quantized too). By default the LM
#: head stays fp16 (``default_exclusions``, as TensorRT Model Optimizer does); the ``-head``
#: peers quantize it as well (torchao's and gpt-fast's weight-only recipes do: 131 MB of the
#: 1.1B decoder's 2.2 GB of fp16 weights), with its SQNR reported beside the others
WEIGHT_ONLY = {"w8a16": ("int8", None, False), "w4a16": ("int4", 128, False),
               "w8a16-head": ("int8", None, True), "w4a16-head": ("int4", 128, True)}


def layer_output_sqnr(model: torch.nn.Module, inputs, precision: str, group_size, clip: str = "minmax",
                      quantized=None) -> Dict[str, float]:
    """Per ``nn.Linear`` (those named in ``quantized``, when given), the SQNR in dB of its output
    with the weight-only quantized weight against its float output, on the inputs the float
    model feeds it here: the engine's kernels equal this reference (kernels/weight_only_ref.py,
    tested), so it is the engine's per-layer error without reading inside a fused graph. The
    weight is quantized as the engine does, as [N, K] (rows = output channels: INT4 groups run
    along K); until session 15 this quantized its transpose (groups along N, INT8 scales per
    input channel), which gives about the same SQNR on Gaussian weights but not the engine's."""
    from compile_backend.kernels import quant_ref

    from .decode_reference import round_trip

    captured: Dict[str, Any] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=n: captured.__setitem__(name, args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and (quantized is None or f"{n}.weight" in quantized)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, x in captured.items():
        layer = model.get_submodule(name)
        w = layer.weight.detach().float()  # [N, K]: what fx_passes/weight_only quantizes
        deq = round_trip(w, precision, group_size, clip)
        x = x.float().reshape(-1, w.shape[1])
        out[name] = round(quant_ref.sqnr_db(x @ w.t(), x @ deq.t()), 2)
    return out


def _quantized_weights(report) -> set:
    """Weight names the engine quantized (merged layers list their parts joined by '+')."""
    return {part for g in report.graphs for q in g.quant if q["status"] == "quantized" for part in q["name"].split("+")}


class HFDecodeStep(torch.nn.Module):
    """One decode step of transformers' LlamaForCausalLM with a StaticCache (a model no one here
    wrote): ``(token [B, 1], position [1], cache)`` -> (last logits,); the cache is written in
    place, as HF's generate loop does."""

    def __init__(self, model: torch.nn.Module, position: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        self.position = position  # the step's position as a Python int (sliding-window layers)

    def forward(self, token, position, cache):
        # transformers >= 5 ignores cache_position: each cache layer counts the tokens it has
        # written (``cumulative_length``, advanced in place by every call) and places the next
        # one there; so the step sets the count to the step's position first, or every timed
        # call would decode one slot further (the H100 runs of sessions 11-13: cosine 0.04-0.36).
        # Sliding-window layers also keep the count as a Python int (``cumulative_length_int``;
        # transformers 4.57: ``cumulative_length`` itself, so each call advanced it and recompiled).
        for layer in getattr(cache, "layers", ()):
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                layer.cumulative_length.copy_(position.reshape(()))
            elif self.position is not None and isinstance(getattr(layer, "cumulative_length", None), int):
                layer.cumulative_length = self.position
            if self.position is not None and isinstance(getattr(layer, "cumulative_length_int", None), int):
                layer.cumulative_length_int = self.position
        return (self.model(token, past_key_values=cache, cache_position=position, use_cache=True).logits[:, -1],)


#: the zoo base decoder's sizes (TinyLlama-1.1B's shape), and a tiny one for CPU smoke runs
HF_LLAMA_DIMS = {"base": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                              num_key_value_heads=4, vocab_size=32000),
                 # Llama-3-8B's shape (the model torchao's published decode numbers are for)
                 "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256),
                 "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=1000)}


#: ``--model hf-moe``: transformers' Mixtral. base: Mixtral-8x7B's layer shape (8 experts, top-2,
#: hidden 4096, expert FFN 14336, 8 KV heads) with 4 of its 32 layers (5.6 B parameters: a
#: decode step's per-layer time, on one GPU); tiny: CPU smoke runs
HF_MIXTRAL_DIMS = {"base": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2),
                   "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=1000, num_local_experts=4, num_experts_per_tok=2)}


def hf_decode_case(size: str, batch: int, device: str, dtype: torch.dtype, context: int = 512, moe: bool = False):
    """(HFDecodeStep, inputs): random init, a StaticCache of 2048 slots (32 for tiny) whose first
    ``context - 1`` slots a prefill filled; the step decodes the token at ``context - 1``.
    ``moe``: transformers' Mixtral of :data:`HF_MIXTRAL_DIMS` (its experts run as
    ``torch._grouped_mm`` in bf16), else Llama of :data:`HF_LLAMA_DIMS`."""
    import transformers

    full = size != "tiny"
    context = context if full else 16
    torch.manual_seed(0)
    if moe:
        cfg = transformers.MixtralConfig(max_position_embeddings=2048, **HF_MIXTRAL_DIMS[size])
        model_class = transformers.MixtralForCausalLM
    else:
        cfg = transformers.LlamaConfig(max_position_embeddings=2048, **HF_LLAMA_DIMS[size])
        model_class = transformers.LlamaForCausalLM
    if size == "8b" or (moe and full):  # initialised on the device: billions of fp32 parameters on the host take minutes
        with torch.device(device):
            model = model_class(cfg)
        model = model.to(dtype=dtype).eval()
    else:  # the base model's weights as every session since 11 drew them (host RNG)
        model = model_class(cfg).to(device=device, dtype=dtype).eval()
    cache = transformers.StaticCache(config=cfg, max_batch_size=batch, max_cache_len=2048 if full else 32,
                                     device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (batch, context - 1), generator=gen).to(device)
    with torch.no_grad():
        model(prompt, past_key_values=cache, cache_position=torch.arange(context - 1, device=device), use_cache=True)
    token = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen).to(device)
    return HFDecodeStep(model, context - 1).eval(), (token, torch.tensor([context - 1], device=device), cache)


def hf_fp32_logits(model: torch.nn.Module, inputs, size: str,
                   prepare: Optional[Callable[[torch.nn.Module], Any]] = None) -> torch.Tensor:
    """The step's last logits from an fp32 copy of ``model`` over an fp32 copy of its cache: the
    reference every peer's fp16 logits are compared with besides eager fp16's (the H100 runs of
    sessions 11-12 had both compiled peers at cosine 0.30-0.36 against eager fp16: which one is
    off?). The copy's cache is exactly as long as the context (the prefill's slots and the
    step's): no empty slot for a mask to hide, so the reference does not depend on how a peer
    masks the static cache's unused slots. ``prepare``: called on the fp32 copy before it runs
    (``decode_reference``: the quantized layers' weights round-tripped)."""
    import transformers

    token, position, cache = inputs
    twin = copy.deepcopy(model).float()
    if prepare is not None:
        prepare(twin)
    cfg = twin.model.config
    length = int(position.max()) + 1
    cache32 = transformers.StaticCache(config=cfg, max_batch_size=token.shape[0], max_cache_len=length,
                                       device=token.device, dtype=torch.float32)
    if hasattr(cache, "layers"):  # transformers >= 4.56: a cache layer per decoder layer
        for src, dst in zip(cache.layers, cache32.layers):  # the prefill's entries, widened
            keys, values = src.keys[:, :, :length].float(), src.values[:, :, :length].float()
            if getattr(dst, "keys", None) is None:  # layers allocate on first use: (keys) or (keys, values)
                takes = len(inspect.signature(dst.lazy_initialization).parameters)
                dst.lazy_initialization(*(keys, values)[:takes])
            dst.keys.copy_(keys)
            dst.values.copy_(values)
    else:  # earlier releases: lists of key and value tensors
        for src, dst in zip(cache.key_cache + cache.value_cache, cache32.key_cache + cache32.value_cache):
            dst.copy_(src[:, :, :length])
    with torch.no_grad():
        out = twin(token, position, cache32)[0].float()
    del twin, cache32
    return out


def run_case(kind: str, size: str, batch: int, device: str, peers: List[str], iters: int, env: dict,
             profile: bool = False, model_kind: str = "zoo", dtype: Optional[torch.dtype] = None) -> List[dict]:
    from compile_backend import zoo

    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    if size == "8b" and model_kind != "hf":
        raise ValueError("--size 8b is transformers' Llama (--model hf)")
    if model_kind in ("hf", "hf-moe"):
        if kind != "decode":
            raise ValueError(f"--model {model_kind} times the decode step (the prefill is the zoo decoder's)")
        model, inputs = hf_decode_case(size, batch, device, dtype, moe=model_kind == "hf-moe")
    elif model_kind == "zoo-inplace":
        if kind != "decode":
            raise ValueError("--model zoo-inplace times the decode step (the prefill is the zoo decoder's)")
        model, inputs = zoo.get("llama_decode_inplace", size, batch=batch, dtype=dtype, device=device)
        for cache in inputs[2:]:  # as HF's StaticCache does: Inductor's CUDA graphs skip mutated inputs otherwise
            torch._dynamo.mark_static_address(cache)
    else:
        model, inputs = zoo.get(f"llama_{kind}", size, batch=batch, dtype=dtype, device=device)
    model.eval()
    rows, ref = [], None
    ref32 = None
    seen: Dict[str, torch.Tensor] = {}  # each peer's logits: which peers agree with which
    short = fp32_copy_short(model) if model_kind == "hf" else None
    if model_kind == "hf-moe":  # eager experts in fp32 run torch._grouped_mm, which takes bf16 only
        short = "an MoE's experts (torch._grouped_mm takes bf16): no fp32 reference, cosines are to the bf16 eager step"
    if short:
        print(f"no fp32 reference: {short}", flush=True)
    elif model_kind == "hf":
        try:
            ref32 = hf_fp32_logits(model, inputs, size)
        except Exception as exc:  # transformers' cache layout varies by release: recorded, not fatal
            print(f"no fp32 reference: {type(exc).__name__}: {exc}", flush=True)
    for name in peers:
        row: Dict[str, Any] = {"case": kind, "model": model_kind, "size": size, "batch": batch, "peer": name,
                               "dtype": str(dtype).replace("torch.", ""), **env}
        clean_slate(device)  # its first call compiles every kernel it needs, as in a fresh process
        torch._dynamo.utils.counters.clear()
        try:
            fn, report = _peer(name, model, inputs)
            with torch.no_grad():
                t0 = time.perf_counter()
                logits = fn(*inputs)[0].float()
                if device == "cuda":
                    torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - t0, 2)
                ms, row["host_ms"] = _time_ms(lambda: fn(*inputs), iters, device == "cuda")
                if kind == "decode":  # the same step, host and GPU overlapped
                    token = inputs[0].clone()  # the loop's tokens: the case's own stay as they were
                    rest = inputs[1:]
                    host: List[float] = []
                    row["ms_pipelined"] = _loop_ms(lambda: fn(token, *rest), token, iters, host)
                    row["tokens_per_s_pipelined"] = batch / (row["ms_pipelined"] * 1e-3)
                    row["host_ms_pipelined"] = statistics.median(host)
                    row["pipelined_host_bound"] = row["host_ms_pipelined"] >= HOST_BOUND_FRACTION * row["ms_pipelined"]
                    if row["pipelined_host_bound"]:
                        print(f"[decode_bench] {name}: the host took {row['host_ms_pipelined']:.3f} ms a step of "
                              f"{row['ms_pipelined']:.3f}: ms_pipelined is the host's time, not the GPU's", flush=True)
            row["compile_counters"] = compile_counters()
            if profile and device == "cuda":  # where the step's time goes, kernel by kernel (graphs replayed)
                from .kernel_profile import format_profile, profile_kernels

                row["profile"] = profile_kernels(lambda: fn(*inputs), calls=5, warmup=2, top=25)
                print(format_profile({"peer": name, **row["profile"]}), flush=True)
            if profile and device == "cuda":  # host time per call, layer by layer (inclusive, us)
                row["host_layers_us"] = host_layers(lambda: fn(*inputs))
                print(f"host layers, {name}: {row['host_layers_us']}", flush=True)
            if profile:  # where the host's time per call goes (ours was 0.55 ms a call, Inductor's 0.30)
                row["host_profile"] = host_profile(lambda: fn(*inputs), calls=50)
                print(f"host profile, {name}:\n{row['host_profile']}", flush=True)
            if ref is None:
                ref = logits
            row.update(ms=ms, tokens_per_s=batch * (1 if kind == "decode" else inputs[0].shape[1]) / (ms * 1e-3),
                       cosine_vs_eager=torch.nn.functional.cosine_similarity(
                           logits.reshape(-1), ref.reshape(-1), dim=0).item(), **_summary(report))
            row["logits_std"] = logits.std().item()  # the signal a cosine compares (tiny logits: rounding)
            row["cosine_vs_peers"] = {other: torch.nn.functional.cosine_similarity(
                logits.reshape(-1), theirs.reshape(-1), dim=0).item() for other, theirs in seen.items()}
            seen[name] = logits
            if ref32 is not None:
                row["cosine_vs_fp32"] = torch.nn.functional.cosine_similarity(
                    logits.reshape(-1), ref32.reshape(-1), dim=0).item()
            base = name[:-len(PDL_SUFFIX)] if name.endswith(PDL_SUFFIX) else name
            if base in WEIGHT_ONLY and report is not None:  # issue #20: per-layer output SQNR
                sqnr = layer_output_sqnr(model, inputs, *WEIGHT_ONLY[base][:2], quantized=_quantized_weights(report))
                row.update(_reference_cosine(logits, model, inputs, model_kind, size, report))
            elif base in W8A8_SMOOTH and report is not None:  # measured by calibration, per engine layer
                sqnr = {q["name"]: q.get("sqnr_db") for g in report.graphs for q in g.quant if q["status"] == "quantized"}
            else:
                sqnr = None
            if sqnr is not None:
                row["layer_sqnr_db"] = sqnr
                finite = [v for v in sqnr.values() if isinstance(v, (int, float))]
                row["layer_sqnr_db_min"] = min(finite) if finite else None
        except Exception as exc:  # recorded, never hidden
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("case", "batch", "peer", "ms", "host_ms", "tokens_per_s", "ms_pipelined", "pipelined_host_bound", "compile_counters", "cosine_vs_eager", "cosine_vs_fp32", "cosine_vs_reference", "cosine_vs_peers", "logits_std",
                                                  "layer_sqnr_db_min", "quantized", "fallbacks", "fallback_reasons", "error")}), flush=True)
    return rows


#: GPU bytes a parameter takes while an fp32 reference copy is built (its 16-bit deep copy, then
#: the fp32 one) and run: session 34's 8B reference ran out of memory beside the engines
FP32_COPY_BYTES_A_PARAMETER = 6.5


def fp32_copy_short(model: torch.nn.Module) -> Optional[str]:
    """Why an fp32 reference copy of ``model`` would not fit in the GPU's free memory now (None:
    it fits, or the model is on the CPU): measured rows keep their other numbers."""
    params = list(model.parameters())
    if not params or not params[0].is_cuda:
        return None
    free, _ = torch.cuda.mem_get_info(params[0].device)
    need = FP32_COPY_BYTES_A_PARAMETER * sum(p.numel() for p in params)
    if need <= free:
        return None
    return (f"skipped: an fp32 copy of the model needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
            f"(a smaller --size, or a GPU with more memory)")


def compile_counters() -> Dict[str, Any]:
    """What Dynamo and Inductor did for the peer just timed (their counters, cleared before each
    peer): graphs captured, graph breaks, and how often Inductor's reduce-overhead skipped its
    CUDA graphs (then every kernel is launched from Python: session 34's torchao peers spent
    5.8-8.7 ms of host time a step)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}


def _reference_cosine(logits, model, inputs, model_kind: str, size: str, report) -> Dict[str, Any]:
    """``cosine_vs_reference`` of a weight-only engine's logits: against an fp32 copy of
    ``model`` (built once, freed before returning) whose weights of exactly the layers the
    report says were quantized are round-tripped by the reference numerics
    (``decode_reference``); ``reference_layers``: how many weights that is. A failure is
    recorded as ``reference_error`` and leaves the row's other measurements."""
    from . import decode_reference

    short = fp32_copy_short(model)
    if short:
        return {"reference_error": short}
    try:
        spec = decode_reference.spec_from_report(report)
        ref = decode_reference.fp32_logits(model, inputs, model_kind, size, spec)
        out = {"cosine_vs_reference": torch.nn.functional.cosine_similarity(
            logits.reshape(-1).float(), ref.reshape(-1).to(logits.device).float(), dim=0).item(),
            "reference_layers": len(spec)}
        del ref
    except Exception as exc:  # recorded, never hidden
        out = {"reference_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the fp32 copy's blocks (4.4 GB at base size) back before the next peer
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--commit", default=None)
    p.add_argument("--size", choices=("tiny", "base", "8b"), default="base",
                   help="8b: Llama-3-8B's shape, transformers' model only (--model hf)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default=None,
                   help="the model's dtype (default float16 on CUDA, float32 on the CPU); torchao-int4wo needs bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="decode batches (none: prefill only)")
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--prefill", action="store_true", help="also a prefill at batch 1")
    p.add_argument("--profile", action="store_true", help="each peer's GPU kernels per call (torch.profiler)")
    p.add_argument("--model", choices=("zoo", "zoo-inplace", "hf", "hf-moe"), default="zoo",
                   help="zoo: our Llama-style decoder (caches in, new caches out); zoo-inplace: the same step "
                        "writing per-layer caches in place (decode only); hf: transformers' LlamaForCausalLM of "
                        "the same sizes with a StaticCache (decode only); hf-moe: transformers' Mixtral "
                        "(base: 4 layers of Mixtral-8x7B's shape; bfloat16, decode only)")
    args = p.parse_args(argv)
    from compile_backend.bench.results import environment

    env = environment(args.device, commit=args.commit)
    with tempfile.TemporaryDirectory() as root:  # so the first peer's first call carries no process start-up
        env["primed_s"] = round(prime_process(args.device, root), 2)
    rows: List[dict] = []
    cases = [("decode", b) for b in args.batches] + ([("prefill", 1)] if args.prefill else [])
    for kind, batch in cases:
        rows += run_case(kind, args.size, batch, args.device, args.peers, args.iters, env, args.profile, args.model,
                         getattr(torch, args.dtype) if args.dtype else None)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1, default=str)
    return 0 if rows and not all("error" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
