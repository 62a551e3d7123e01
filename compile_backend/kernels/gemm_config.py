"""Launch parameters of the GEMM templates and how they are picked.

:class:`GemmConfig` (validated tile sizes, warps, stages, split-K, TMA); :func:`heuristic_config`
(one good config without timing) and :func:`candidate_configs` (the configs the tuner times),
both from a rough efficiency score of a tile for a problem; :func:`tma_heuristic` (the persistent
TMA kernel's untuned config). Shared by the GEMM and convolution builders.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch

from .template import fit_pow2, triton_cdiv

_POW2 = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of the GEMM template (validated: powers of two, sane ranges)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # persistent kernel with TMA operand loads (2-D 16-bit GEMMs, sm_90+)
    epilogue_split: int = 1  # 2: the epilogue runs over each half of the tile's columns in turn

    def __post_init__(self) -> None:
        if self.tma and self.split_k != 1:
            raise ValueError("GemmConfig: the TMA kernel has no split-K")
        for name in ("block_m", "block_n", "block_k"):
            if getattr(self, name) not in _POW2:
                raise ValueError(f"GemmConfig.{name} must be one of {_POW2}, got {getattr(self, name)}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps must be a power of two <= 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"GemmConfig.num_stages must be in 1..8, got {self.num_stages}")
        if self.split_k not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.split_k must be 1, 2, 4, 8 or 16, got {self.split_k}")
        if self.group_m not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.group_m must be 1, 2, 4, 8 or 16, got {self.group_m}")
        if self.epilogue_split not in (1, 2) or (self.epilogue_split == 2 and (self.tma or self.block_n < 32)):
            raise ValueError(f"GemmConfig.epilogue_split must be 1, or 2 without TMA and with block_n >= 32, "
                             f"got {self.epilogue_split}")

    @property
    def name(self) -> str:
        sk = f" sk{self.split_k}" if self.split_k > 1 else ""
        tma = " tma" if self.tma else ""
        es = f" e{self.epilogue_split}" if self.epilogue_split > 1 else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages} g{self.group_m}{sk}{tma}{es}"

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


#: values of the accumulator per thread from which a chain's epilogue is also timed split in two
#: (session 5, H200: BERT FFN1's FP8 GEMM with GELU + quantize took 176 us in 128x256 tiles of 8
#: warps, 128 values a thread, against 42 in 64x64 tiles: the long epilogue spills)
SPLIT_EPILOGUE_VALUES = 128


#: chain ops whose epilogue keeps many temporaries live (transcendentals, a quantize's rounding):
#: only a chain holding one is worth timing split (a residual add or a scale is not)
LONG_CHAIN_OPS = frozenset({"aten.gelu", "aten.tanh", "aten.erf", "aten.exp", "aten.sigmoid", "aten.silu",
                            "aten.softplus", "aten.mish", "aten.round", "aten.pow", "aten.log"})


def long_chain(chain_ops: Sequence[str]) -> bool:
    return any(op in LONG_CHAIN_OPS for op in chain_ops)


def with_split_epilogues(configs: Sequence[GemmConfig]) -> List[GemmConfig]:
    """``configs`` with, after each non-TMA one holding >= SPLIT_EPILOGUE_VALUES accumulator
    values a thread, its variant whose epilogue runs over half the columns at a time (for a
    group with a chain: a plain store gains nothing from it)."""
    out: List[GemmConfig] = []
    for c in configs:
        out.append(c)
        if not c.tma and c.epilogue_split == 1 and c.block_n >= 32 and \
                c.block_m * c.block_n // (32 * c.num_warps) >= SPLIT_EPILOGUE_VALUES:
            out.append(dataclasses.replace(c, epilogue_split=2))
    return out


#: the tile shapes (block_m, block_n, num_warps, num_stages) of the ``fast`` set, best-known
#: first for large problems on Hopper-class GPUs; block_k comes from the operand width
_FAST_TILES = ((128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (64, 256, 4, 4),
               (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 64, 4, 4), (16, 64, 4, 4))
#: block_k choices per operand width in bytes (64 or 128 bytes of K per row of a tile)
_BLOCK_K = {1: (64, 128), 2: (32, 64), 4: (16, 32)}


def heuristic_config(m: int, n: int, k: int, batch: int, dtype: torch.dtype, interpret: bool = False,
                     sm_count: int = 132, smem_bytes: int = 227 * 1024) -> GemmConfig:
    """One good config without timing (what runs with autotune off): the ``fast`` tile that
    best fills the GPU's multiprocessors with the least wasted tile area."""
    if interpret:  # the interpreter pays per program: few, large tiles
        return GemmConfig(fit_pow2(m, 16, 64), fit_pow2(n, 16, 64), fit_pow2(k, 16, 64), group_m=8, num_warps=4, num_stages=1)
    pool = _fast_pool(m, n, k, _size(dtype), smem_bytes)
    return max(pool, key=lambda c: (round(_efficiency(c, m, n, batch, sm_count), 2), -pool.index(c)))


#: register-light tiles (at most 64 fp32 accumulators a thread) for GEMMs with few K steps
_SHORT_K_TILES = ((128, 128, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4))


def short_k_steps(k: int, dtype: torch.dtype) -> int:
    """How many block_k steps the ``fast`` tiles take over K (1-2: a short-K GEMM)."""
    bk = _BLOCK_K.get(_size(dtype), (32,))[-1]
    return triton_cdiv(k, bk)


def short_k_configs(m: int, n: int, k: int, dtype: torch.dtype, sm_count: int = 132) -> List[GemmConfig]:
    """Configs for a GEMM whose K takes one or two block_k steps (a 1x1 convolution over 64-256
    channels, the rows of ResNet-50's expanding layers): with nothing to pipeline along K each
    program is a chain (load, multiply, store its tile), hidden only behind the other programs
    resident on its SM. So tiles light on registers (several programs an SM, where 128x256 tiles
    of 8 warps fit one), and no more stages than K steps (more only take shared memory). Ranked
    as :func:`candidate_configs` ranks."""
    size = _size(dtype)
    bk = _BLOCK_K.get(size, (32,))[-1]
    bk = bk if k >= bk else max(16, fit_pow2(k, 16, bk))
    steps = triton_cdiv(k, bk)
    pool = [GemmConfig(bm, bn, bk, 8, 1, w, max(1, min(2, steps))) for bm, bn, w in _SHORT_K_TILES
            if bm <= max(16, fit_pow2(m, 16, 256)) and bn <= max(64, fit_pow2(n, 32, 256))]
    return sorted(pool, key=lambda c: -round(_efficiency(c, m, n, 1, sm_count), 2))


#: 8-bit tiles for GEMMs of one or two K steps, from ``qgemm_bench`` at "max" (H100, session 21,
#: ResNet-50 b32's expanding 1x1 layers as rows, INT8 / FP8 us): the persistent TMA tiles, whose
#: loop loads the next tile while this one's epilogue stores (64 -> 256: 256x128x64 w8 s4 27.7 /
#: 28.3; 128 -> 512: 256x128x128 w8 s4 17.6 / 18.4; 256 -> 1024: 128x128x128 w4 s3 12.9 / 14.1),
#: and the best pointer tile (128x64x64 w4 s4: 29.8 / 30.8 at 64 -> 256), where the one-stage
#: register-light tiles the convolution's rows took ran ~58 us (session 20)
SHORT_K_8BIT_TILES = (GemmConfig(128, 64, 64, 8, 1, 4, 4), GemmConfig(256, 128, 64, 8, 1, 8, 4, tma=True),
                      GemmConfig(256, 128, 128, 8, 1, 8, 4, tma=True), GemmConfig(128, 128, 128, 8, 1, 4, 3, tma=True))


def short_k_8bit_configs(k: int, tma: bool) -> List[GemmConfig]:
    """:data:`SHORT_K_8BIT_TILES` for a K of one or two steps: block_k no wider than K (one step of
    64 channels reads no padding), the TMA tiles only where ``tma`` (Hopper, TMA-loadable rows)."""
    return [c for c in SHORT_K_8BIT_TILES if (tma or not c.tma) and c.block_k <= max(64, k)]


def tma_heuristic(m: int, n: int) -> GemmConfig:
    """The TMA config used untuned: the best at 4096^3 and on the LM head in run 2 (H100)."""
    if m >= 1024 and n >= 1024:
        return GemmConfig(128, 256, 64, 8, 1, 8, 3, tma=True)
    return GemmConfig(128, 128, 64, 8, 1, 8, 4, tma=True)


def with_tma_configs(configs: List[GemmConfig], level: str, tma_first: bool, m: int, n: int) -> List[GemmConfig]:
    """``configs`` plus persistent TMA variants of their large tiles (six at ``fast``); the
    untuned TMA config first when it should run untuned (``tma_first``), else last."""
    big = [c for c in configs if c.split_k == 1 and c.block_m >= 64 and c.block_n >= 64]
    tma_configs = [dataclasses.replace(c, tma=True) for c in big[:6 if level == "fast" else None]]
    if tma_first or level == "off":
        tma_configs.insert(0, tma_heuristic(m, n))
    return list(dict.fromkeys(([] if not tma_first else tma_configs[:1]) + configs + tma_configs))


def candidate_configs(m: int, n: int, k: int, batch: int, dtype: torch.dtype, level: str,
                      sm_count: int = 132, smem_bytes: int = 227 * 1024) -> List[GemmConfig]:
    """Configs to try, heuristic first: ``fast`` at most 8 (the curated tiles that fill the GPU
    best, plus split-K for long-K problems with few output tiles), ``max`` every plausible
    combination of tiles, block_k, warps and stages (a few dozen)."""
    size = _size(dtype)
    first = heuristic_config(m, n, k, batch, dtype, sm_count=sm_count, smem_bytes=smem_bytes)
    if level == "off":
        return [first]
    pool = _fast_pool(m, n, k, size, smem_bytes) if level == "fast" else _max_pool(m, n, size, smem_bytes)
    split = _split_k_configs(m, n, k, batch, size, sm_count)
    ranked = sorted(pool + split, key=lambda c: -round(_efficiency(c, m, n, batch, sm_count), 2))
    out = list(dict.fromkeys([first] + ranked))
    return out[:8] if level == "fast" else out


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


#: K steps up to which 8-bit tiles of the ``fast`` set take at most 3 stages (see _fast_pool)
SHORT_K_STEPS_8BIT = 8


def _fast_pool(m: int, n: int, k: int, size: int, smem_bytes: int) -> List[GemmConfig]:
    bk = _BLOCK_K.get(size, (32,))[-1]
    if k < bk:
        bk = max(16, fit_pow2(k, 16, bk))
    # 8-bit operands over a short K (a transformer's K = 768: 6 steps of 128): a 4-stage 128x128
    # tile takes 128 KB of shared memory, so one program an SM, whose prologue and epilogue
    # nothing hides with so few steps; at 3 stages (96 KB) two fit. Timed on the H200/H100 at
    # "max": INT8 and FP8 at BERT, GPT-2 and ViT's K = 768 the 3-stage tiles won every time
    # (ViT qkv INT8: 128x128x128 w4 s3 36.7 us, s4 46.8), at K >= 3072 4 stages as often as 3
    cap = 3 if size == 1 and triton_cdiv(k, bk) <= SHORT_K_STEPS_8BIT else 8
    pool = [GemmConfig(bm, bn, bk, 8, 1, w, min(st, cap)) for bm, bn, w, st in _FAST_TILES
            if bm <= max(16, fit_pow2(m, 16, 256)) and bn <= max(64, fit_pow2(n, 32, 256))]
    return [c for c in pool if _smem(c, size) <= smem_bytes] or [GemmConfig(16, 64, 16, 8, 1, 4, 2)]


def _max_pool(m: int, n: int, size: int, smem_bytes: int) -> List[GemmConfig]:
    """Every plausible tile, block_k, warps and stages combination (the ``max`` level)."""
    pool = []
    big_k = _BLOCK_K.get(size, (32,))[-1]
    for bm in (16, 32, 64, 128, 256):
        for bn in (32, 64, 128, 256):
            if not (bn <= 4 * bm and bm <= 4 * bn and bm * bn <= 128 * 256):
                continue  # thin or register-hungry tiles never win
            if bm > max(16, fit_pow2(m, 16, 256)) or bn > max(32, fit_pow2(n, 32, 256)):
                continue
            warps = (8,) if bm * bn >= 128 * 256 else (4, 8) if bm * bn == 128 * 128 else (4,)
            for bk in _BLOCK_K.get(size, (32,)):
                for st in ((3, 4) if bk == big_k else (4, 5)):
                    pool += [GemmConfig(bm, bn, bk, 8, 1, w, st) for w in warps]
    return [c for c in pool if _smem(c, size) <= smem_bytes]


def _split_k_configs(m: int, n: int, k: int, batch: int, size: int, sm_count: int) -> List[GemmConfig]:
    """Split-K configs when there are too few output tiles to fill the GPU and K is long."""
    tiles = batch * triton_cdiv(m, 64) * triton_cdiv(n, 64)
    if not (tiles < sm_count and k >= 1024):
        return []
    bk = _BLOCK_K.get(size, (32,))[-1]
    return [GemmConfig(fit_pow2(m, 16, 64), fit_pow2(n, 32, 64), bk, 8, sk, 4, 4) for sk in (2, 4, 8) if k // sk >= 256]


def _efficiency(cfg: GemmConfig, m: int, n: int, batch: int, sm_count: int) -> float:
    """A rough score of a tile for a problem, in [0, 1]: the fraction of tile area inside the
    problem, times how full the last wave of programs keeps the multiprocessors (one program
    per SM assumed), times the tile's operand reuse (bm*bn/(bm+bn), relative to 128x256)."""
    tm, tn = triton_cdiv(m, cfg.block_m), triton_cdiv(n, cfg.block_n)
    inside = m * n / (tm * cfg.block_m * tn * cfg.block_n)
    tiles = batch * tm * tn * cfg.split_k
    fill = tiles / (triton_cdiv(tiles, sm_count) * sm_count)
    reuse = min(1.0, cfg.block_m * cfg.block_n / (cfg.block_m + cfg.block_n) / (128 * 256 / 384))
    return inside * fill * reuse


def _smem(cfg: GemmConfig, size: int) -> int:
    return (cfg.block_m + cfg.block_n) * cfg.block_k * size * cfg.num_stages
