"""Session 4 (benchmarks/notes/attention.md): our Triton attention kernel against each SDPA backend
(default dispatch, cuDNN, FlashAttention-2, memory-efficient), CUDA-graph timing, one process.

    PYTHONPATH=. python3 benchmarks/notes/attention_sdpa_backends.py [out.json]
"""
import json
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.timing import graph_median_ms
from compile_backend.kernels.attention import AttentionConfig, flash_attention

SHAPES = [("s512-d64-fp16", 16, 12, 512, 64, torch.float16), ("s512-d64-bf16", 16, 12, 512, 64, torch.bfloat16),
          ("s2048-d64-fp16", 16, 12, 2048, 64, torch.float16), ("s512-d128-fp16", 16, 12, 512, 128, torch.float16)]
rows = []
for name, b, h, s, d, dt in SHAPES:
    sets = [[torch.randn(b, h, s, d, device="cuda", dtype=dt) for _ in range(3)] for _ in range(4)]
    cfg = AttentionConfig(128, 64, 4, 3) if s > 1024 else AttentionConfig(64, 64, 4, 3, tma=d == 128)
    for rep in range(2):
        res = {"shape": name, "rep": rep, "ours_config": cfg.as_dict()}
        res["ours_triton"] = graph_median_ms([lambda x=x: flash_attention(*x, None, None, False, cfg) for x in sets])
        res["sdpa_default"] = graph_median_ms([lambda x=x: F.scaled_dot_product_attention(*x) for x in sets])
        for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    ms = graph_median_ms([lambda x=x: F.scaled_dot_product_attention(*x) for x in sets])
                res["sdpa_" + backend.lower()] = ms
            except Exception as exc:  # a backend this build or shape does not have
                res["sdpa_" + backend.lower()] = f"{type(exc).__name__}: {exc}"[:120]
        rows.append(res)
        print({k: (round(v * 1000, 1) if isinstance(v, float) else v) for k, v in res.items() if k != "ours_config"})
result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, unit="ms",
              rows=rows)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
