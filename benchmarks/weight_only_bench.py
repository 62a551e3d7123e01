"""Weight-only GEMM kernels (W8A16, W4A16; issue #20) at the base decoder's shapes, on the GPU.

    PYTHONPATH=. python3 -m benchmarks.weight_only_bench --out $OUT/weight_only_bench.json --commit <sha>

Per layer shape of the issue's ~1.1B decoder (hidden 2048, intermediate 5632, 4 KV heads of
64: q/o 2048x2048, k/v 256x2048, gate/up 5632x2048, down 2048x5632) and per M (1 and 16:
decode; 2048: prefill): fp16 ``F.linear``, then every candidate config of
``weight_only_linear`` for INT8 and INT4 (group 128), the best kept. Beside the time: the
weight bytes each call must read and the bandwidth that makes, against two device copies: of the
fp16 weight (``copy_gb_per_s``: the bandwidth of a large copy), and one moving the same bytes as
the kernel reads (``copy_same_bytes_gb_per_s``: half the weight bytes read, half written, in the
same graph timing: what a kernel of that size can reach, fixed costs included; ``of_copy``: the
kernel's bandwidth as a fraction of it, the issue's ">= 80% of the measured copy bandwidth on
the weight bytes"); and torch's own
weight-only GEMMs (``_weight_int8pack_mm``, tinygemm's ``_weight_int4pack_mm``) where this build
has them for CUDA, as peers.
Timing: 20 calls captured in one CUDA graph (decode runs under graphs: the host's launch cost
is not the kernel's), CUDA events around a replay, median of 5 replays; the weights rotate over
enough copies to exceed the L2 cache, so every call reads from memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

SHAPES = {"q_o": (2048, 2048), "k_v": (256, 2048), "gate_up": (5632, 2048), "down": (2048, 5632),
          # the engine's merged layers (fx_passes/merge_gemms: q/k/v as one, gate/up as one)
          "qkv": (2560, 2048), "gate_up_merged": (11264, 2048),
          # Llama-3-8B's merged layers (decode_bench --size 8b)
          "qkv_8b": (6144, 4096), "o_8b": (4096, 4096), "gate_up_merged_8b": (28672, 4096), "down_8b": (4096, 14336)}
DEFAULT_LAYERS = ("q_o", "k_v", "gate_up", "down")
MS = (1, 16, 2048)
L2_BYTES = 60 * 2**20


def graph_time_ms(fn: Callable[[int], Any], copies: int, calls: int = 20) -> float:
    for i in range(3):  # compile, autotune-free warm-up
        fn(i % copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    blocks = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        blocks.append(start.elapsed_time(end) / calls)
    return statistics.median(blocks)


def weight_copies(nbytes: int) -> int:
    return max(2, -(-2 * L2_BYTES // max(nbytes, 1)))


def measure(name: str, n: int, k: int, m: int, anatomy: Optional[int] = None,
            dtype: torch.dtype = torch.float16) -> Dict[str, Any]:
    from compile_backend.kernels import weight_only_ref as ref
    from compile_backend.kernels.weight_only import CONFIGS, GEMV_MAX_M, fits_registers, paths_for, weight_only_linear

    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=dtype)  # the activations' dtype ("fp16_ms": the float GEMM's, in it)
    w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
    row: Dict[str, Any] = {"layer": name, "n": n, "k": k, "m": m, "dtype": str(dtype).replace("torch.", "")}
    ws = [w.clone() for _ in range(weight_copies(w.numel() * 2))]
    row["fp16_ms"] = graph_time_ms(lambda i: F.linear(x, ws[i]), len(ws))
    flat = w.reshape(-1)
    bufs = [flat.clone() for _ in range(len(ws))]
    out = torch.empty_like(flat)
    row["copy_fp16_ms"] = graph_time_ms(lambda i: out.copy_(bufs[i]), len(bufs))  # reads and writes 2 B per weight
    for precision, group in (("int8", None), ("int4", 128)):
        codes, scales = ref.quantize_weight(w.float(), precision, group)
        nbytes = codes.numel() * codes.element_size() + scales.numel() * 2
        sets = [(codes.clone(), scales.clone()) for _ in range(weight_copies(nbytes))]
        best, best_cfg, failures, times, timed_gemv = float("inf"), None, [], [], []
        # tiled at skinny M, tma (not yet in paths_for) at GEMV M: measured here first
        paths = paths_for(m) + (("tiled",) if m <= 16 else ()) + (("tma",) if m <= GEMV_MAX_M else ())
        for cfg in [None] + [c for path in paths for c in CONFIGS[path] if fits_registers(c, precision)]:
            try:
                ms = graph_time_ms(lambda i: weight_only_linear(x, *sets[i], precision=precision, group_size=group,
                                                           config=cfg), len(sets))
            except Exception as exc:  # a config the shape refuses: recorded
                failures.append(f"{cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            times.append((ms, "heuristic" if cfg is None else _short(cfg)))
            if cfg is not None and cfg.path == "gemv":
                timed_gemv.append((ms, cfg))
            if ms < best:
                best, best_cfg = ms, ("heuristic" if cfg is None else repr(cfg))
        got = weight_only_linear(x, codes, scales, precision=precision, group_size=group)
        want = F.linear(x.float(), ref.dequantize(ref.unpack_int4(codes, k) if precision == "int4" else codes,
                                                  scales, precision, group).to(dtype).float())
        cos = F.cosine_similarity(got.float().reshape(-1), want.reshape(-1), dim=0).item()
        half = [torch.empty(max(nbytes // 4, 1), dtype=torch.float16, device=dev) for _ in range(weight_copies(nbytes))]
        sink = torch.empty_like(half[0])
        copy_ms = graph_time_ms(lambda i: sink.copy_(half[i]), len(half))  # reads nbytes / 2, writes nbytes / 2
        row[precision] = {"ms": best, "config": best_cfg, "weight_bytes": nbytes,
                          "gb_per_s": nbytes / (best * 1e-3) / 1e9, "speedup_vs_fp16": row["fp16_ms"] / best,
                          "copy_same_bytes_gb_per_s": nbytes / (copy_ms * 1e-3) / 1e9, "of_copy": copy_ms / best,
                          "cosine_vs_reference": cos, "failures": failures[:5],
                          "fastest_us": [[round(t * 1e3, 2), c] for t, c in sorted(times)[:6]],
                          # the tma path's own (not yet in paths_for: measured here first)
                          "tma_us": [[round(t * 1e3, 2), c] for t, c in sorted(times) if c.startswith("tma")]}
        if anatomy is not None and timed_gemv:
            row[precision]["copy_same_bytes_us"] = round(copy_ms * 1e3, 2)
            fastest = sorted(timed_gemv, key=lambda t: t[0])
            row[precision]["math_only_us"] = math_only(x, codes, scales, precision, group,
                                                       fastest[:anatomy] if anatomy else fastest)
    # a copy reads and writes the fp16 weight: bytes moved per second, the roofline of a weight read
    row["copy_gb_per_s"] = (w.numel() * 2) / (row["copy_fp16_ms"] * 1e-3) / 1e9 * 2
    row.update(torch_peers(x, m, n, k))
    return row


def math_only(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, precision: str, group, timed) -> List[list]:
    """Where a GEMV's time goes (``--anatomy``): each of the ``timed`` [(ms, gemv config)] again
    with every row of codes and scales the first one's (stride 0 along N: the same math and
    launch, the weights from L1 instead of memory): [[us with its weights, us without, config]].
    Beside ``copy_same_bytes_us`` (the bytes alone): near their sum, the loop does its math
    after its bytes land; near the larger, the two overlap."""
    from compile_backend.kernels import gemv

    n = codes.shape[0]
    one_codes, one_scales = codes[:1].expand(n, -1), scales[:1].expand(n, *scales.shape[1:])
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    rows = []
    for ms, cfg in timed:
        alone = graph_time_ms(lambda i: gemv.gemv(x, one_codes, one_scales, None, out, int4=precision == "int4",
                                             group=group or 1, config=cfg), 1)
        rows.append([round(ms * 1e3, 2), round(alone * 1e3, 2), _short(cfg)])
    return rows


def torch_peers(x: torch.Tensor, m: int, n: int, k: int) -> Dict[str, Any]:
    """torch's own weight-only GEMMs where this build has them for CUDA (timing peers, random
    operands of the right formats): ``_weight_int8pack_mm`` (int8 [N, K], a scale per row) and
    tinygemm's ``_weight_int4pack_mm`` (bf16 activations, groups of 128, packed by
    ``_convert_weight_to_int4pack``). Unavailable ones are recorded with the reason."""
    dev, out = x.device, {}
    try:
        w8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev) for _ in range(weight_copies(n * k))]
        s8 = torch.rand(n, device=dev, dtype=x.dtype)
        out["torch_int8pack_ms"] = graph_time_ms(lambda i: torch._weight_int8pack_mm(x, w8[i], s8), len(w8))
    except Exception as exc:  # not in this build for CUDA, or another signature
        out["torch_int8pack_ms"] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
    try:
        xb = x.to(torch.bfloat16)
        packed = [torch._convert_weight_to_int4pack(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev), 8)
                  for _ in range(weight_copies(n * k // 2))]
        zeros = torch.rand(k // 128, n, 2, dtype=torch.bfloat16, device=dev)
        out["torch_int4pack_ms"] = graph_time_ms(lambda i: torch._weight_int4pack_mm(xb, packed[i], 128, zeros),
                                                 len(packed))
    except Exception as exc:
        out["torch_int4pack_ms"] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
    return out


def _short(cfg) -> str:
    """A config in a few characters: path, tile, split, warps, stages, unroll, tensor cores, x by TMA."""
    return (f"{cfg.path} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} split{cfg.split_k} w{cfg.num_warps} "
            f"s{cfg.num_stages} u{cfg.unroll}{' tc' if cfg.tensor_cores else ''}{' x' if cfg.tma_x else ''}")


def _us(ms: Any) -> str:
    return f"{ms * 1e3:.1f} us" if isinstance(ms, float) else str(ms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.weight_only_bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default=None)
    p.add_argument("--ms", type=int, nargs="+", default=list(MS), help="rows of x (default: 1 16 2048)")
    p.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), choices=list(SHAPES))
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="the activations' dtype")
    p.add_argument("--anatomy", nargs="?", type=int, const=3, default=None, metavar="CONFIGS",
                   help="also time the fastest gemv configs (default 3; 0: all) with their weights from L1 (math_only)")
    args = p.parse_args(argv)
    from compile_backend.bench.results import environment

    rows: List[Dict[str, Any]] = []
    env = environment("cuda", commit=args.commit)
    for m in args.ms:
        for name in args.layers:
            n, k = SHAPES[name]
            row = {**measure(name, n, k, m, args.anatomy, getattr(torch, args.dtype)), **env}
            rows.append(row)
            i8, i4 = row["int8"], row["int4"]
            print(f"M={m:5d} {name:8s} {n}x{k}: {'fp16' if args.dtype == 'float16' else 'bf16'} "
                  f"{row['fp16_ms'] * 1e3:7.1f} us | int8 {i8['ms'] * 1e3:7.1f} us "
                  f"({i8['speedup_vs_fp16']:.2f}x, {i8['gb_per_s']:.0f} GB/s) | int4 {i4['ms'] * 1e3:7.1f} us "
                  f"({i4['speedup_vs_fp16']:.2f}x, {i4['gb_per_s']:.0f} GB/s, {i4['of_copy']:.0%} of a copy of its "
                  f"bytes) | copy {row['copy_gb_per_s']:.0f} GB/s | cos {i8['cosine_vs_reference']:.5f} "
                  f"{i4['cosine_vs_reference']:.5f} | torch int8pack {_us(row['torch_int8pack_ms'])} "
                  f"int4pack {_us(row['torch_int4pack_ms'])}", flush=True)
            print(f"    int4 fastest: {i4['fastest_us']}", flush=True)
            for precision in ("int8", "int4"):
                if "math_only_us" in row[precision]:
                    print(f"    {precision} anatomy (us with weights, from L1, config; a copy of the bytes "
                          f"{row[precision]['copy_same_bytes_us']}): {row[precision]['math_only_us']}", flush=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
