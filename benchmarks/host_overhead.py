"""Host time of our per-call layers (runtime -> engine -> CUDA graph runner) on a decode step.

    PYTHONPATH=. python -m benchmarks.host_overhead [--layers 30] [--calls 2000] [--device cpu|cuda]

A decode step of transformers' ``LlamaForCausalLM`` (tiny widths, ``--layers`` layers: 9 frozen
weights each, two KV caches written in place, a token and a position), compiled with
``torch.compile(..., backend="compile_backend")`` under ``torch.no_grad()``: the shape of call
whose host time limits HF Llama 1.1B decoding on an H100 (hundreds of frozen weights, a few
small inputs, one CUDA-graph replay). On the CPU (the default) the CUDA graph runner runs over
stand-ins for ``torch.cuda``'s graph and stream calls (a "replay" does nothing): its own
bookkeeping runs as on a GPU, the replay and the runner's CUDA calls are left out.
``--device cuda`` runs it on real CUDA graphs.

Prints, per layer, the median microseconds a call spends inside it (inclusive, by
``decode_bench.host_layers``: ``call`` the whole compiled call, ``runtime``, ``engine``,
``runner``, ``replay``), ``ours``: runtime minus replay, the host time of our three layers
together, and ``weights``: the model's parameters and buffers (the engine's frozen weights).
Measured on the 2-core CPU machine this was written on, 30 layers (274 weights; runs of the
code before and after alternating): ``ours`` 148-153 us before the per-call fast paths (runtime
55, engine 65, runner 32 of their own) and 94-101 after (runtime 14, engine 59, runner 26). The
engine's share is its staleness check, three reads a weight (identity, version, storage), each
~25-60 ns in a C-level pass: what is left of it is those reads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from typing import Dict

import torch

from benchmarks.decode_bench import HFDecodeStep, host_layers


class _FakeGraph:
    """A CUDA graph stand-in: recording keeps nothing, a replay does nothing (the real replay's
    host time is measured separately on the GPU: ``decode_bench.host_layers``)."""

    def replay(self) -> None:
        pass


class _FakeStream:
    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def fake_cuda_graphs():
    """Engines on the CPU get a CUDA graph runner whose graph and stream calls are stand-ins."""
    from compile_backend import pipeline

    stream = _FakeStream()
    saved = {name: getattr(torch.cuda, name) for name in ("current_stream", "Stream", "stream", "graph", "CUDAGraph")}
    saved_wants = pipeline.wants_cuda_graph
    torch.cuda.current_stream = lambda *a: stream
    torch.cuda.Stream = _FakeStream
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    torch.cuda.graph = lambda g, capture_error_mode=None: contextlib.nullcontext()
    torch.cuda.CUDAGraph = _FakeGraph
    saved_fork = torch.random.fork_rng
    torch.random.fork_rng = lambda devices=None: contextlib.nullcontext()
    pipeline.wants_cuda_graph = lambda options, role, device: options.cuda_graphs != "off"
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
        torch.random.fork_rng = saved_fork
        pipeline.wants_cuda_graph = saved_wants


def hf_decode_step(layers: int, device: str):
    """(step function, number of frozen weights): one token through a LlamaForCausalLM of tiny
    widths and ``layers`` layers, its StaticCache filled by an eager prompt (as
    ``decode_bench.hf_decode_case``, whose step module this is)."""
    import transformers

    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    cache = transformers.StaticCache(config=cfg, max_batch_size=1, max_cache_len=32, device=device, dtype=dtype)
    prompt = torch.arange(1, 16, device=device)[None]
    with torch.no_grad():
        model(prompt, past_key_values=cache, cache_position=torch.arange(15, device=device), use_cache=True)
    compiled = torch.compile(HFDecodeStep(model, 15).eval(), backend="compile_backend")
    token, position = torch.tensor([[5]], device=device), torch.tensor([15], device=device)
    n_weights = len([*model.parameters(), *model.buffers()])
    return (lambda: compiled(token, position, cache)), n_weights


def measure(layers: int, calls: int, repeats: int, device: str) -> Dict[str, float]:
    with (fake_cuda_graphs() if device == "cpu" else contextlib.nullcontext()), torch.no_grad():
        step, n_weights = hf_decode_step(layers, device)
        for _ in range(20):  # build, record, and the weight watch's early checks
            step()
        runs = [host_layers(step, calls) for _ in range(repeats)]
    result = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
    result["ours"] = round(result["runtime"] - result["replay"], 1)
    result["weights"] = n_weights
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the CUDA graph runner over stand-ins; cuda: real CUDA graphs")
    args = parser.parse_args()
    print(json.dumps(measure(args.layers, args.calls, args.repeats, args.device)))


if __name__ == "__main__":
    main()
