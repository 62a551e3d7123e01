"""GPU probe (issue #20): is the M = 1 INT4 GEMV's gap to a copy of its bytes the short per-program
pipeline? The engine's tma loop gives each program one tile of BLOCK_N rows over K (merged gate/up
11264 x 2048 at step 512: four steps, so a ring of STAGES - 1 steps spends most of a program
filling and draining). Here a persistent grid (a few programs an SM) walks its tiles' (tile, step)
pairs as ONE flat loop that Triton pipelines, so each program's TMA ring stays full from its first
step to its last, and a tile's sums are stored as its last step lands.

    PYTHONPATH=. python3 benchmarks/notes/probes/persistent_gemv.py --out probe.json

Per shape: the engine's best tma / gemv config and a copy of the same bytes (weight_only_bench's
measure, same process), then the probe per (BLOCK_N, BLOCK_K, STAGES, programs an SM); every
variant checked against the engine's output (cosine). fp16 x, INT4 group 128, weights rotated
past the L2 cache, 20 calls in one CUDA graph (weight_only_bench.graph_time_ms)."""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
import triton.language as tl

from benchmarks.weight_only_bench import SHAPES, graph_time_ms, measure, weight_copies
from compile_backend.kernels import weight_only_ref as ref
from compile_backend.kernels.weight_only import weight_only_linear
from compile_backend.kernels.weight_only_parts import int4_step, words_math
from compile_backend.kernels.weight_only_tma import int4_descriptor


@triton.jit
def persistent_int4_gemv(w_desc, x_ptr, s_ptr, out_ptr, N, K, ssn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    k_steps = tl.cdiv(K, BLOCK_K)
    mine = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, programs)
    U: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    Q: tl.constexpr = (GROUP if BLOCK_K > GROUP else BLOCK_K) // 4
    part = tl.zeros([BLOCK_N, U, Q], tl.float32)
    for it in tl.range(0, mine * k_steps, num_stages=STAGES):
        kk = it % k_steps
        n0 = (pid + (it // k_steps) * programs) * BLOCK_N
        k0 = kk * BLOCK_K
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        words, scale = int4_step(w_desc, s_ptr, rn, n_ok, n0, k0, K, ssn, GROUP, BLOCK_K)
        x = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        part = words_math(part, words, scale, x, tl.float16, True)
        if kk == k_steps - 1:
            acc = tl.sum(tl.reshape(part, [BLOCK_N, U * Q]), 1)
            tl.store(out_ptr + rn, acc.to(tl.float16), mask=n_ok)
            part = tl.zeros([BLOCK_N, U, Q], tl.float32)


def probe(name: str, n: int, k: int, configs) -> dict:
    base = measure(name, n, k, 1, dtype=torch.float16)
    i4 = base["int4"]
    row = {"layer": name, "n": n, "k": k, "engine_int4_us": round(i4["ms"] * 1e3, 2), "engine_config": i4["config"],
           "engine_fastest_us": i4["fastest_us"], "copy_same_bytes_gb_per_s": i4["copy_same_bytes_gb_per_s"],
           "weight_bytes": i4["weight_bytes"], "fp16_us": round(base["fp16_ms"] * 1e3, 2), "probe": []}
    copy_us = i4["weight_bytes"] / i4["copy_same_bytes_gb_per_s"] / 1e3
    row["copy_same_bytes_us"] = round(copy_us, 2)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    codes, scales = ref.quantize_weight(w.float(), "int4", 128)
    scales = scales.to(torch.float16)
    want = weight_only_linear(x, codes, scales, precision="int4", group_size=128).float().reshape(-1)
    sets = [(codes.clone(), scales.clone()) for _ in range(weight_copies(i4["weight_bytes"]))]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(1, n, device="cuda", dtype=torch.float16)
    for bn, bk, stages, per_sm, warps in configs:
        tiles = triton.cdiv(n, bn)
        programs = min(tiles, sms * per_sm)
        try:
            descs = [int4_descriptor(c, k, 128, bn, bk) for c, _ in sets]

            def call(i):
                persistent_int4_gemv[(programs,)](descs[i], x, sets[i][1], out, n, k, sets[i][1].stride(0), GROUP=128,
                                                  BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=warps)
            call(0)
            cos = torch.nn.functional.cosine_similarity(out.float().reshape(-1), want, dim=0).item()
            ms = graph_time_ms(call, len(sets))
            row["probe"].append({"block_n": bn, "block_k": bk, "stages": stages, "per_sm": per_sm, "warps": warps,
                                 "programs": programs, "us": round(ms * 1e3, 2), "of_copy": round(copy_us / (ms * 1e3), 3),
                                 "cosine_vs_engine": round(cos, 6)})
        except Exception as exc:  # a config this Triton refuses: recorded
            row["probe"].append({"block_n": bn, "block_k": bk, "stages": stages, "per_sm": per_sm,
                                 "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        print(name, row["probe"][-1], flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", nargs="+", default=["gate_up_merged", "down", "qkv", "q_o"])
    args = p.parse_args(argv)
    configs = [c for c in itertools.product((16, 32), (256, 512), (4, 6), (1, 2, 4), (4,))]
    rows = []
    for name in args.layers:
        n, k = SHAPES[name]
        rows.append(probe(name, n, k, configs))
        best = min((r for r in rows[-1]["probe"] if "us" in r), key=lambda r: r["us"], default=None)
        print(f"[probe] {name}: engine {rows[-1]['engine_int4_us']} us, copy {rows[-1]['copy_same_bytes_us']} us, "
              f"persistent best {best}", flush=True)
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
