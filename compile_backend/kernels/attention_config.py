"""Launch configurations of the flash attention kernel (kernels/attention.py): the validated
:class:`AttentionConfig`, the untuned choice per problem (:func:`default_config`) and the list
the tuner times (:func:`candidate_configs`). Plain Python: no Triton import."""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch

_POW2_BLOCKS = (16, 32, 64, 128, 256)
_WARPS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tuning knobs of the kernel (an autotuner may try :func:`candidate_configs`).

    block_m: query rows per program; block_n: keys per inner step (both powers of two >= 16,
    tl.dot's smallest tile); num_warps / num_stages: Triton launch options. tma: load K and V
    tiles through TMA tensor descriptors (Hopper's bulk copy engine) where their layout allows
    it (fp16/bf16, 16-byte aligned strides; else plain loads run).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tma, bool):
            raise ValueError(f"AttentionConfig.tma must be True or False, got {self.tma!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in _POW2_BLOCKS:
                raise ValueError(f"AttentionConfig.{name} must be one of {_POW2_BLOCKS}, got {value!r}")
        if isinstance(self.num_warps, bool) or self.num_warps not in _WARPS:
            raise ValueError(f"AttentionConfig.num_warps must be one of {_WARPS}, got {self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"AttentionConfig.num_stages must be an integer in 1..8, got {self.num_stages!r}")

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


def pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, 1 << max(0, int(n) - 1).bit_length())


def default_config(
    head_dim: int, head_dim_v: int, seq_q: int, seq_k: int, dtype: torch.dtype, causal: bool = False
) -> AttentionConfig:
    """Heuristic config, from the H100 sweeps in benchmarks/notes/attention.md.

    fp16/bf16: (64, 64, 4 warps, 3 stages), except non-causal d <= 64 with long keys, where
    (128, 64, 4, 3) is faster (s2048: 472 vs 504 us). Short sequences are latency-bound: smaller
    programs keep more of them resident per SM. fp32: (128, 32, 8, 2), a narrow key block for
    registers. Blocks never exceed the sequence rounded up to a power of two (decode: Sq = 1
    gets 16 rows, not 64).
    """
    if dtype == torch.float32:
        block_m, block_n, num_stages = 128, 32, 2
    else:
        long_keys = seq_k > 1024 and max(head_dim, head_dim_v) <= 64 and not causal
        block_m, block_n, num_stages = (128 if long_keys else 64), 64, 3
    block_m = min(block_m, pow2_at_least(seq_q))
    block_n = min(block_n, pow2_at_least(seq_k))
    num_warps = 8 if dtype == torch.float32 and block_m >= 128 else 4
    return AttentionConfig(block_m, block_n, num_warps, num_stages)


#: (block_m, block_n, num_warps, num_stages) swept for fp16/bf16. Programs per SM on H100
#: (registers and shared memory of the sm_90 build, Triton 3.9 offline; d64 | d128):
#: (64,64,4,3) 3 | 2, (64,64,4,2) 4 | 2, (64,32,4,2) 5 | 4, (64,32,4,3) 5 | 3,
#: (128,64,8,2) 2 | 1, (128,32,8,2) 2 | 2. The latency-bound s512 loop (one warpgroup's wgmma,
#: softmax, wgmma in strict order) relies on other programs of the SM to hide its latencies.
_CANDIDATES_16BIT = (
    (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 2), (64, 32, 4, 3), (64, 128, 4, 2),
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2),
)
#: the same shapes with K/V through TMA descriptors (fp16/bf16 only)
_CANDIDATES_TMA = ((64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2),
                   (128, 64, 8, 3), (128, 32, 8, 2))
_CANDIDATES_FP32 = ((128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2),
                    (128, 32, 4, 2))


def candidate_configs(
    head_dim: int, head_dim_v: int, seq_q: int, seq_k: int, dtype: torch.dtype, causal: bool = False
) -> List[AttentionConfig]:
    """The search space for an autotuner or the GPU sweep (benchmarks/attention_bench.py): the
    heuristic default first, then a short list (about 20 for fp16/bf16). Blocks larger than the
    sequence (rounded up to a power of two) are left out.

    Some entries may not fit a GPU (shared memory); Triton raises at compile time and the tuner
    skips them.
    """
    space = [default_config(head_dim, head_dim_v, seq_q, seq_k, dtype, causal)]
    if dtype == torch.float32:
        shapes = [(cfg, False) for cfg in _CANDIDATES_FP32]
    else:
        shapes = [(cfg, False) for cfg in _CANDIDATES_16BIT] + [(cfg, True) for cfg in _CANDIDATES_TMA]
    for (block_m, block_n, num_warps, num_stages), tma in shapes:
        if block_m > pow2_at_least(seq_q) or block_n > pow2_at_least(seq_k):
            continue
        cfg = AttentionConfig(block_m, block_n, num_warps, num_stages, tma)
        if cfg not in space:
            space.append(cfg)
    return space


__all__ = ["AttentionConfig", "default_config", "candidate_configs", "pow2_at_least"]


#: query rows per (batch, kv head) up to which the decode kernel (kernels/attention_decode.py)
#: is a candidate: kv_group query heads x Sq rows share each K/V tile
DECODE_MAX_ROWS = 64
DECODE_MAX_Q = 4


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Knobs of the decode kernel: ``block_n`` keys per step; ``splits`` key ranges per (batch,
    kv head), 0 = enough for ``waves`` programs per SM (one under the interpreter); warps."""

    block_n: int = 64
    splits: int = 0
    waves: int = 4
    num_warps: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.block_n, bool) or self.block_n not in _POW2_BLOCKS:
            raise ValueError(f"DecodeConfig.block_n must be one of {_POW2_BLOCKS}, got {self.block_n!r}")
        for name, lo, hi in (("splits", 0, 256), ("waves", 1, 64)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"DecodeConfig.{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if isinstance(self.num_warps, bool) or self.num_warps not in _WARPS:
            raise ValueError(f"DecodeConfig.num_warps must be one of {_WARPS}, got {self.num_warps!r}")

    def as_dict(self) -> Dict[str, int]:
        return {"decode": True, **dataclasses.asdict(self)}


#: the decode kernel's configs for a tuner, the default first
DECODE_CONFIGS = (DecodeConfig(), DecodeConfig(block_n=32, waves=8), DecodeConfig(block_n=128, num_warps=8),
                  DecodeConfig(waves=2), DecodeConfig(waves=8), DecodeConfig(block_n=128, waves=8, num_warps=8))


def decode_applies(seq_q: int, heads: int, kv_heads: int) -> bool:
    """Whether the decode kernel serves this problem: few query rows per kv head."""
    return seq_q <= DECODE_MAX_Q and kv_heads > 0 and (heads // kv_heads) * seq_q <= DECODE_MAX_ROWS
