"""Triton W8A16 / W4A16 GEMMs (weight-only quantization, issue #20): ``y = x @ dequantize(w)^T + bias``.

Layers, as every kernel here: the @triton.jit kernels (``_skinny_kernel``, ``_tiled_kernel`` and
``weight_only_parts.split_sum``); :func:`weight_only_linear` checks the operands, picks a path, allocates
and launches; :func:`weight_only_linear_reference` is the plain-PyTorch version
(``weight_only_ref.weight_only_mm`` on the unpacked codes) the tests hold the kernels to.

Weights exactly as ``weight_only_ref.quantize_weight`` makes them: INT8 codes [N, K] with fp16
scales [N] (per output channel); INT4 codes packed uint8 [N, ceil(K / 2)] (even k in the low
nibble, 4-bit two's complement, odd K padded) with fp16 scales [N, ceil(K / group_size)].

Numerics are the reference's: each weight tile is dequantized in the prologue (code * scale in
fp32, exact: an 8-bit code times an 11-bit fp16 significand, then rounded to x's dtype: the
operand type the tensor cores take), products are summed in fp32, the bias is added in fp32 and
the result rounded to ``out_dtype`` once, at the end. Only the order of the fp32 sums differs.

Paths, by M (the rows of x once its leading dims are flattened):

* gemv (M <= 4, decode at batch 1): one generated launch, :mod:`.gemv` (one x row
  per program, products accumulated elementwise and summed over K once, split-K finished by the
  last program of each tile; the same kernel takes a fused group's prologue and epilogue). The
  session-4 skinny kernel reached 6-24% of the copy bandwidth on the H200 (a cross-lane sum every
  K step, the interleave); this path is the rework, to be measured.
* skinny (M <= 16, decode): one program per (block_n rows of W, K slice, block_m rows of x). The
  product is a broadcast multiply and a sum over K, so no tensor-core tile pads 1 row to 16, and
  each program loads block_k consecutive codes per weight row (128 int8 = 128 bytes). Decode has
  too few N blocks to fill a GPU, so K is cut into split_k slices: each writes fp32 partial sums
  to a [split, M, N] workspace and ``weight_only_parts.split_sum`` adds them in a fixed order, adds the bias
  and casts. Chosen over an fp32 atomic add: as many launches (atomics need a zeroed buffer, and
  a cast pass unless the output is fp32 without bias) and a result that does not depend on the
  order the programs run in, i.e. bitwise reproducible.
* tiled (prefill): ``tl.dot`` tiles, program ids grouped along M so consecutive programs reuse the
  same weight tiles from L2; ``weights_first`` computes out^T = W x^T, so the dequantized tile
  is the dot's first operand (the one Hopper's wgmma can read from registers; on the H200 in
  session 8 it was not faster, so the tuner times both).
* dequant (prefill): the weights dequantized to x's dtype into a scratch [N, K] (one
  memory-bound kernel, ``_dequant_kernel``), then cuBLAS (``torch.mm`` / ``addmm``). The
  weights rest quantized between calls; a 2048-token prefill of the 1.1B decoder took 1.08-1.09x
  the FP16 engine's time on the H200 (session 8).

The gemv path's ``tensor_cores`` configs (16-bit x) make each weight from its code's bits and
one fp16 multiply (``weight_only_parts.offset_codes_to``: no conversion instruction) and sum
the products on the tensor cores; without row values in x's prologue, 16 rows of x a program.

This module imports Triton at the top: only a builder loader and tests import it, never
``import compile_backend``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import gemv, weight_only_ref
from .base import triton_enabled, triton_interpret
from .launch import next_pow2
from .weight_only_tma import tma_gemv
from .weight_only_parts import (auto_split, dequant_tile, dequant_tile16, dot16, k_slices, round_to, split_sum,
                                words_to)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT32_MAX = 2**31 - 1
SKINNY_MAX_M = 16
#: the skinny path holds block_m * block_n * block_k fp32 products per step in registers
SKINNY_MAX_PRODUCTS = 16384
#: the gemv path's fp32 accumulator tile, block_n * block_k (64 registers a thread at 4 warps)
GEMV_MAX_ACC = 8192
#: M up to which the gemv path (one x row per program) is a candidate: beyond, each weight tile
#: would be read once per row
GEMV_MAX_M = weight_only_ref.GEMV_MAX_M
PATHS = ("gemv", "skinny", "tiled", "dequant", "tma")
#: tiled launches (kernel, x dtype, tiles, warps, stages) whose INT4 words variant the installed
#: Triton failed to compile: a cache of compiler failures, so each is tried once a process
_WORDS_UNCOMPILABLE: set = set()


# ----------------------------------------------------------------------------- the kernels
@triton.jit
def _store_out(acc, b_ptr, out_ptr, rm, rn, M, N, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Bias in fp32, then the one rounding to the output dtype (out is contiguous [M, N])."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, K_SLICE, sxm, swn, ssn,
                   INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr,
                   PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # K_SLICE is a multiple of BLOCK_K: no tile crosses into the next slice (or scale group)
    k_lo = pid_k * K_SLICE
    for k0 in range(k_lo, tl.minimum(k_lo + K_SLICE, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        w = dequant_tile(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, INT4, GROUP, BLOCK_N, BLOCK_K,
                          x_ptr.dtype.element_ty, SOFT_BF16)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if PARTIAL:  # fp32 partial sums of this K slice: [split, M, N]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        _store_out(acc, b_ptr, out_ptr, rm, rn, M, N, HAS_BIAS, SOFT_BF16)


@triton.jit
def _load_words(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """INT4 weight rows ``rn``, columns [k0, k0 + BLOCK_K), as 16-bit words of four codes (K a
    multiple of 4, even row stride: the launcher's ``WORDS``), with each row's scale
    [BLOCK_N, 1]; zeros (no access) from K on, so a loop may load one step past its last."""
    n_ok = rn < N
    rq = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    words = tl.load(w_ptr.to(tl.pointer_type(tl.uint16)) + rn[:, None] * (swn // 2) + rq[None, :],
                    mask=n_ok[:, None] & (rq < K // 4)[None, :], other=0)
    # rn * 0 + k0: a vector (the interpreter refuses a mask term without a shape)
    scale = tl.load(s_ptr + rn * ssn + k0 // GROUP, mask=n_ok & (rn * 0 + k0 < K), other=0.0)[:, None]
    return words, scale


@triton.jit
def _words_tile(words, scale, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """Words from :func:`_load_words` dequantized by ``words_to`` (NATIVE: 13 PTX instructions
    for 8 weights; the byte loads' loop took ~9 SASS instructions a weight in the prefill
    tiles, 3x the tensor cores' time at 128x128x64) and joined back into k order in registers:
    [BLOCK_N, BLOCK_K] as DTYPE (16-bit)."""
    w0, w1, w2, w3 = words_to(words, scale, DTYPE, NATIVE)
    # [n, j, b, a] = w(2b + a): k = 4j + 2b + a, the word's nibbles in order
    w = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(w, [w0.shape[0], BLOCK_K])


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (rows, columns) of the output, program ids grouped along M so consecutive
    programs reuse the same weight tiles from L2."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, swn, ssn, INT4: tl.constexpr, GROUP: tl.constexpr,
                    SOFT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weights [N, K] in out's dtype, rounded as the reference rounds them."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    if out_ptr.dtype.element_ty == tl.float32:
        w = dequant_tile(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, INT4, GROUP, BLOCK_N, BLOCK_K, tl.float32, SOFT_BF16)
    else:
        w = dequant_tile16(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, INT4, GROUP, BLOCK_K, out_ptr.dtype.element_ty,
                            not SOFT_BF16)
    rk = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn < N)[:, None] & (rk < K)[None, :])


@triton.jit
def _tiled_wa_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, sxm, swn, ssn,
                     INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr,
                     UPCAST: tl.constexpr, WORDS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The tiled GEMM as out^T = W x^T (16-bit x): the dequantized weight tile is the dot's
    first operand, which Hopper's wgmma reads from registers; as the second (``_tiled_kernel``)
    it is stored to shared memory every K step. Programs grouped along M as there."""
    rm, rn = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if WORDS:  # the next step's words in flight during this step's math: see _tiled_kernel
        words, scale = _load_words(w_ptr, s_ptr, rn, 0, N, K, swn, ssn, GROUP, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rm[None, :] * sxm + rk[:, None], mask=(rm < M)[None, :] & (rk < K)[:, None], other=0.0)
        if WORDS:
            words_k, scale_k = words, scale
            words, scale = _load_words(w_ptr, s_ptr, rn, k0 + BLOCK_K, N, K, swn, ssn, GROUP, BLOCK_K)
            w = _words_tile(words_k, scale_k, BLOCK_K, x_ptr.dtype.element_ty, not SOFT_BF16)
        else:
            w = dequant_tile16(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, INT4, GROUP, BLOCK_K, x_ptr.dtype.element_ty,
                                not SOFT_BF16)
        acc = dot16(w, xt, acc, UPCAST)
    _store_out(tl.trans(acc), b_ptr, out_ptr, rm, rn, M, N, HAS_BIAS, SOFT_BF16)


@triton.jit
def _tiled_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, sxm, swn, ssn,
                  INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr,
                  UPCAST: tl.constexpr, WORDS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # WORDS: the next step's words load before this step's dequantize and dot, so their latency
    # hides behind them (Triton pipelines only the loads that feed tl.dot as they are, i.e. x);
    # H100, session 30: 128x128x64 words tiles 2.2x cuBLAS fp16 at M = 2048 without this
    if WORDS:
        words, scale = _load_words(w_ptr, s_ptr, rn, 0, N, K, swn, ssn, GROUP, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        if WORDS:
            words_k, scale_k = words, scale
            words, scale = _load_words(w_ptr, s_ptr, rn, k0 + BLOCK_K, N, K, swn, ssn, GROUP, BLOCK_K)
            w = _words_tile(words_k, scale_k, BLOCK_K, x_ptr.dtype.element_ty, not SOFT_BF16)
        elif not INT4 and x_ptr.dtype.element_ty != tl.float32:  # INT8, 16-bit x: no conversion a weight
            w = dequant_tile16(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, INT4, GROUP, BLOCK_K, x_ptr.dtype.element_ty,
                                not SOFT_BF16)
        else:
            w = dequant_tile(w_ptr, s_ptr, rn, k0, N, K, swn, ssn, INT4, GROUP, BLOCK_N, BLOCK_K,
                              x_ptr.dtype.element_ty, SOFT_BF16)
        if UPCAST:  # the interpreter multiplies bf16 dot operands as raw integers (Triton 3.9)
            x, w = x.to(tl.float32), w.to(tl.float32)
        # ieee: fp32 activations keep the reference's fp32 products (no TF32); 16-bit ignore it
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    _store_out(acc, b_ptr, out_ptr, rm, rn, M, N, HAS_BIAS, SOFT_BF16)


# ----------------------------------------------------------------------------- configs
def _check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value & (value - 1) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
    """Launch parameters of one path. Tiles shrink at launch to the problem (block_m to M, block_n
    to N, block_k to K, and for INT4 block_k to the group size). split_k: K slices of the gemv
    and skinny paths, 0 = enough slices for ``waves`` programs per SM (one slice under the
    interpreter); the tiled path takes 0 or 1.

    Why waves: a decode GEMV streams weights, and a program has one K tile of loads in flight
    (its FMAs wait for them before the next tile's loads issue). To keep the H200's ~4.8 TB/s
    busy at ~0.7 us memory latency, ~3.4 MB must be in flight (Little's law): ~25 KB per SM,
    i.e. several programs per SM at 2-4 KB a tile. Session 4's 2 programs per SM measured 6-24%
    of the copy bandwidth."""

    path: str  # "gemv" | "skinny" | "tiled" | "dequant" | "tma"
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 0
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 2
    tensor_cores: bool = False  # gemv: products on the tensor cores for 16-bit x (gemv.uses_tensor_cores)
    unroll: int = 1  # gemv: K tiles a loop step, their loads issued together (more bytes in flight)
    weights_first: bool = False  # tiled, 16-bit x: the weight tile as the dot's first operand
    tma_x: bool = False  # tma: x through a descriptor too (pipelined; else pointer loads in the products' layout)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))}, got {self.path!r}")
        tiled = self.path == "tiled"
        _check_pow2("block_m", self.block_m, 16 if tiled else 1,
                    256 if tiled else 1 if self.path in ("gemv", "dequant", "tma") else SKINNY_MAX_M)
        _check_pow2("block_n", self.block_n, 16, 256)
        _check_pow2("block_k", self.block_k, 16, 1024 if self.path == "tma" else 512)
        _check_pow2("num_warps", self.num_warps, 1, 32)
        for name, value, lo, hi in (("split_k", self.split_k, 0, 256), ("group_m", self.group_m, 1, 64),
                                    ("num_stages", self.num_stages, 1, 16 if self.path == "tma" else 8), ("waves", self.waves, 1, 64)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if isinstance(self.unroll, bool) or self.unroll not in (1, 2, 4, 8, 16) or (self.unroll > 1 and self.path != "gemv"):
            raise ValueError(f"unroll is a gemv-path setting (1, 2, 4, 8 or 16), got {self.unroll!r} for path {self.path!r}")
        if not isinstance(self.tensor_cores, bool) or (self.tensor_cores and self.path != "gemv"):
            raise ValueError(f"tensor_cores is a gemv-path setting (True or False), got {self.tensor_cores!r} "
                             f"for path {self.path!r}")
        if not isinstance(self.weights_first, bool) or (self.weights_first and not tiled):
            raise ValueError(f"weights_first is a tiled-path setting (True or False), got {self.weights_first!r} "
                             f"for path {self.path!r}")
        if not isinstance(self.tma_x, bool) or (self.tma_x and self.path != "tma"):
            raise ValueError(f"tma_x is a tma-path setting (True or False), got {self.tma_x!r} for path {self.path!r}")
        if self.path == "tma" and (self.num_stages < 2 or self.block_n * self.block_k > 2 * GEMV_MAX_ACC):
            raise ValueError("the tma path pipelines 2 or more stages and holds block_n * block_k <= "
                             f"{2 * GEMV_MAX_ACC} products, got {self.num_stages} stages, {self.block_n * self.block_k}")
        if tiled and self.split_k > 1:
            raise ValueError("split_k is a skinny-path setting: the tiled path takes split_k 0 or 1")
        if self.path == "skinny" and self.block_m * self.block_n * self.block_k > SKINNY_MAX_PRODUCTS:
            raise ValueError(f"skinny block_m * block_n * block_k must be at most {SKINNY_MAX_PRODUCTS} "
                             f"(products held in registers), got {self.block_m * self.block_n * self.block_k}")
        # elementwise: an fp32 accumulator tile; tensor cores: a 16-bit weight tile (and [block_n, 16] sums)
        tile_max = GEMV_MAX_ACC * (2 if self.tensor_cores else 1)
        if self.path == "gemv" and self.block_n * self.block_k > tile_max:
            raise ValueError(f"gemv block_n * block_k must be at most {tile_max} (the tile in registers), "
                             f"got {self.block_n * self.block_k}")


def _skinny(block_m: int, block_n: int, block_k: int, split_k: int = 0) -> WeightOnlyConfig:
    return WeightOnlyConfig("skinny", block_m, block_n, block_k, split_k, num_warps=4, num_stages=1)


def _gemv(block_n: int, block_k: int, warps: int = 4, split_k: int = 0, waves: int = 8,
          stages: int = 1, tc: bool = False, unroll: int = 1) -> WeightOnlyConfig:
    return WeightOnlyConfig("gemv", 1, block_n, block_k, split_k, num_warps=warps, num_stages=stages, waves=waves,
                            tensor_cores=tc, unroll=unroll)


def _dequantize(block_n: int, block_k: int) -> WeightOnlyConfig:
    return WeightOnlyConfig("dequant", 1, block_n, block_k, num_warps=4, num_stages=1)


def _tma(block_n: int, block_k: int, warps: int, stages: int, split_k: int = 0, x: bool = False,
         waves: int = 8) -> WeightOnlyConfig:
    return WeightOnlyConfig("tma", 1, block_n, block_k, split_k, num_warps=warps, num_stages=stages, waves=waves, tma_x=x)


def _tiled(block_m: int, block_n: int, block_k: int, warps: int, stages: int, wf: bool = False) -> WeightOnlyConfig:
    return WeightOnlyConfig("tiled", block_m, block_n, block_k, num_warps=warps, num_stages=stages, weights_first=wf)


#: candidates per path for a tuner to time (not yet measured on a GPU): skinny tiles of at most
#: 8192 products, wider in K for fewer rows; tiled ones the usual fp16 GEMM tiles
CONFIGS: Dict[str, Tuple[WeightOnlyConfig, ...]] = {
    # 128-byte weight rows per step for INT8 (INT4: 64, block_k capped at the group size).
    # Session 8 on the H200: INT8 and fp16 GEMVs moved the same weights per second (not bytes):
    # bound by the loads in flight, not by conversions (the tensor-core loop, free of them, was
    # no faster). So: unrolled steps (2-4 K tiles' loads issued together), then the configs
    # the tuner chose there (elementwise 32 x 128, waves 8 / 2; tensor cores 64 x 128 / 256).
    "gemv": (_gemv(64, 128, tc=True), _gemv(32, 128, unroll=2), _gemv(32, 128, unroll=4), _gemv(64, 128, 8, unroll=2),
             _gemv(32, 128, waves=2, unroll=2), _gemv(64, 128, tc=True, unroll=2), _gemv(64, 256, tc=True),
             _gemv(128, 64, 4, waves=4, tc=True), _gemv(32, 128), _gemv(32, 128, waves=2),
             _gemv(32, 128, stages=3), _gemv(32, 128, 4, split_k=1),
             # INT4 words: a step's tiles in one load (gemv.py); fewer rows, more tiles a step
             _gemv(16, 128, unroll=4), _gemv(32, 128, 8, unroll=4),
             # 4 rows a thread (64 rows, 4 warps): x's staging through shared memory shared by
             # 4x the weights; INT4 words 4.64 SASS instructions a weight in the loop against
             # 16 x 128 u8's 6.41 (sm_90, Triton 3.6, gate_up 5632 x 2048; `python -m
             # benchmarks.kernel_sass --gemv-int4 5632 2048`); at 2 warps 4.32. Measured (H100,
             # session 30): 16 x 128 u8 split1 still won (gate_up 6.43 us; 64 x 128 w2 8.20, down
             # 8.28 against 8.37): one wave without split-K beats the shorter loop
             _gemv(64, 128, unroll=2), _gemv(64, 128, 2),
             # INT4 in one wave, no split-K: 16 KB of a program's rows in flight at once, no
             # partial sums' round trip (store, counter, reload) before the output; a 2048 x 2048
             # layer is 128 programs, each reading its rows in one step (``fits_registers``:
             # INT4 only). H100, M = 1: q_o 5.9 -> 4.3 us, k_v 3.9 -> 3.1, gate_up 8.3 -> 6.6
             # (session 19; the split-K candidates' best in session 18); in the decode step they
             # lose where an RMS norm prologue takes the registers to 211 (one CTA an SM)
             _gemv(16, 128, 8, split_k=1, unroll=16), _gemv(16, 128, 4, split_k=1, unroll=8),
             _gemv(16, 128, 8, split_k=2, unroll=16),
             # (2 rows a thread at the same bytes a step, 32 x 128 u4 / u8 split1, 5.22 SASS a weight
             # against 16 x 128 u8's 6.41: lost on every layer, H100 sessions 31: gate_up 7.7-8.0
             # us against 6.4; removed)
             # tensor cores, 3-4 stages, fewer K slices: Triton pipelines the weight loads that
             # feed tl.dot into shared memory (cp.async, 15-40 in sm_90 SASS with Triton 3.6), so
             # 2-3 steps are in flight a program without their registers; the elementwise loops'
             # loads never are (no async copy at any num_stages), nor the tensor-core ones at 1
             # (tried, session 30: tensor cores at 1-2 warps, mma.sync with the weights from
             # registers, INT4 64x128 w2 3.27 SASS a weight against 4.32 elementwise: never in the
             # top 6 of any M = 1 layer on an H100; fewer instructions lose to split-K's round trip)
             _gemv(64, 128, waves=2, stages=4, tc=True), _gemv(128, 128, 8, waves=2, stages=3, tc=True)),
    "skinny": (_skinny(1, 64, 128), _skinny(1, 32, 256), _skinny(1, 128, 64), _skinny(2, 32, 128),
               _skinny(4, 16, 128), _skinny(8, 16, 64), _skinny(16, 16, 32)),
    # prefill (M ~ 2048, compute-bound): also the big tiles fp16 GEMMs win with on Hopper
    # on the H200 (session 8) every tiled kernel, weights-first ones included, took 2-4.6x cuBLAS
    # fp16 at M = 2048, and the dequant path below won every prefill layer. Why: the bytes'
    # dequantize cost ~9 SASS instructions a weight, 3x the tensor cores' time a K step; INT4
    # words (``_words_tile``, session 30) cut the loop's issue clocks 2.4-2.9x (sm_90:
    # 128x128x64 w8 186 -> 77 a warp, 128x256x64 354 -> 120), at or under the wgmma time
    "tiled": (_tiled(16, 64, 128, 4, 3), _tiled(32, 64, 64, 4, 3), _tiled(64, 64, 64, 4, 3),
              _tiled(64, 128, 32, 4, 4), _tiled(128, 128, 32, 8, 3), _tiled(128, 64, 64, 4, 3),
              _tiled(128, 256, 64, 8, 3), _tiled(128, 128, 64, 8, 4), _tiled(256, 128, 64, 8, 3),
              _tiled(128, 128, 64, 8, 3, True), _tiled(64, 128, 64, 4, 3, True), _tiled(128, 256, 64, 8, 3, True),
              _tiled(64, 128, 128, 4, 3, True), _tiled(16, 128, 128, 4, 3, True)),
    # prefill: the weights dequantized to x's dtype (a scratch [N, K], one memory-bound kernel),
    # then cuBLAS
    "dequant": (_dequantize(64, 128), _dequantize(32, 256)),
    # the decode GEMV with its weights streamed through a shared-memory ring by TMA
    # (weight_only_tma: each step's math overlaps the next steps' transfers), Hopper and later;
    # not in paths_for until measured. At these sizes the bytes in flight must be about all of
    # a program's slice at once (Little's law: ~3 MB in flight GPU-wide against a 5.8 MB INT4
    # gate/up layer), so stages >= steps a program + 1: the whole slice issued up front as the
    # one-wave loops do, each step's math starting as its bytes land. H100, session 31 run 3:
    # 64 x 128 rings of 3 steps (12 KB an SM in flight) and 8-wave split-K never reached the top
    # 6 of any layer. INT8 steps shrink to 256 (TMA's box)
    "tma": (_tma(16, 512, 4, 5, split_k=1), _tma(32, 512, 4, 5, split_k=1), _tma(16, 256, 4, 9, split_k=1),
            _tma(16, 1024, 4, 3, split_k=1), _tma(16, 512, 4, 5, split_k=1, x=True), _tma(32, 256, 4, 9, split_k=1),
            _tma(16, 512, 4, 5, split_k=4), _tma(32, 128, 4, 9, split_k=1), _tma(16, 256, 4, 5, split_k=2),
            _tma(64, 128, 4, 4, split_k=1), _tma(16, 512, 8, 5, split_k=1), _tma(64, 256, 4, 3, waves=1),
            _tma(32, 512, 4, 3, waves=1)),
}


#: the tma configs the engine's tuner times for INT8 codes with 16-bit x at M <= GEMV_MAX_M (in
#: the fused GEMV's tma loop, ``gemv.py``). 16 x 512 s5: the plain kernel's winner (H100, session
#: 32 run 1, M = 1: down 7.30 us against fp16's 11.9, gate/up 7.62, q_o 4.76). The others are
#: steps of 4 096 weights a warp: a step's fixed cost (ring waits, x's loads, the next TMA issue,
#: ~130 SASS a thread) over 32 weights a thread (16 x 256) made the loop 0.12 SM clocks a weight
#: under an RMS-norm prologue and 0.20 under SwiGLU (x redone by the 8 thread rows sharing a k),
#: against the one-load loop's 0.052 / 0.067 (sm_90, Triton 3.6, ``kernel_sass``), and the tuner
#: took none (H100, session 31 run 6). 64 x 256: 0.046 / 0.071 since the first step is peeled
#: (x then carried compact), 32 x 512 and 16 x 1024 (3-D boxes) close by. 32- and 64-row tiles
#: split K for about one program an SM (down: 2048 rows)
ENGINE_TMA_INT8 = (_tma(16, 512, 4, 5, split_k=1), _tma(16, 1024, 4, 3, split_k=1), _tma(32, 512, 4, 3, waves=1),
                   _tma(64, 256, 4, 3, waves=1))


#: the tma configs the engine's tuner times for INT4 (16-bit words through 3-D boxes of whole
#: groups, the first step before a PDL wait). Main-loop issue under an RMS-norm prologue (sm_90,
#: Triton 3.6, merged gate/up, group 128): 32 x 512 0.048 SM clocks a weight, 16 x 1024 0.051,
#: 64 x 256 0.056, 16 x 512 0.061, against the one-load loops' 0.043-0.055; the one-load loops do
#: a slice's math after its bytes land (the merged INT4 gate/up: 12.24 us for 11.9 MB, a third of
#: a copy; H100, session 32 run 1), the ring overlaps them. Not yet measured on a GPU
ENGINE_TMA_INT4 = (_tma(32, 512, 4, 3, waves=1), _tma(16, 1024, 4, 3, split_k=1), _tma(64, 256, 4, 3, waves=1),
                   _tma(16, 512, 4, 5, split_k=1))


def tma_candidates(precision: str, m: int, dtype: torch.dtype, k: int,
                   device: torch.device) -> Tuple[WeightOnlyConfig, ...]:
    """The tma configs worth timing for a weight-only problem: 16-bit x, M <= GEMV_MAX_M, K a
    multiple of 16 (INT8) or 32 (INT4), on a device with TMA (compute capability 9.0+; the
    interpreter runs them too)."""
    if m > GEMV_MAX_M or dtype not in (torch.float16, torch.bfloat16) or k % (32 if precision == "int4" else 16):
        return ()
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return ()
    return {"int8": ENGINE_TMA_INT8, "int4": ENGINE_TMA_INT4}.get(precision, ())


def paths_for(m: int) -> Tuple[str, ...]:
    """The paths worth timing for M rows, the heuristic's first (past GEMV_MAX_M rows, only
    the gemv configs :func:`worth_timing` keeps)."""
    if m <= GEMV_MAX_M:
        return ("gemv", "skinny")
    return ("skinny", "gemv") if m <= SKINNY_MAX_M else ("tiled", "dequant")


def worth_timing(cfg: WeightOnlyConfig, m: int, dtype: torch.dtype) -> bool:
    """Whether a config of ``paths_for(m)`` can be fast for M rows of ``dtype``: past GEMV_MAX_M
    rows a gemv config only on the tensor cores with 16-bit x, which take 16 rows a program
    (else one row a program reads every weight M times)."""
    return (cfg.path != "gemv" or m <= GEMV_MAX_M
            or (cfg.tensor_cores and dtype in (torch.float16, torch.bfloat16)))


#: weights one gemv step loads per program (block_n x block_k x unroll) for INT8 and float
#: weights; INT4's take half the bytes, so twice as many
GEMV_STEP_WEIGHTS = 16384


def fits_registers(cfg: WeightOnlyConfig, weights: str) -> bool:
    """Whether a gemv config's step (its loaded weights and products live in registers) is small
    enough for ``weights`` ("int8", "int4" or "float"): at most ``GEMV_STEP_WEIGHTS`` weights, twice
    that for INT4. Other paths: always."""
    if cfg.path != "gemv":
        return True
    return cfg.block_n * cfg.block_k * cfg.unroll <= GEMV_STEP_WEIGHTS * (2 if weights == "int4" else 1)


def heuristic(m: int) -> WeightOnlyConfig:
    """gemv for M <= GEMV_MAX_M (64 weight rows x 128 K a program on the tensor cores, split-K to fill the GPU);
    skinny for M <= 16: one block of next_pow2(M) rows and a tile of 8192 products, as wide in
    K as the rows allow; tiled 64x64x64 tiles beyond (the tuner times ``CONFIGS``)."""
    if m <= GEMV_MAX_M:
        return CONFIGS["gemv"][0]
    if m > SKINNY_MAX_M:
        return _tiled(64, 64, 64, 4, 3)
    bm = next_pow2(m)
    bn = max(16, 64 // bm)
    return _skinny(bm, bn, min(128, 8192 // (bm * bn)))


# ----------------------------------------------------------------------------- the launcher
def _fail(what: str, fix: str) -> None:
    raise ValueError(f"weight_only_linear: {what}; {fix}")


def _check(x, codes, scales, bias, precision, group_size, out_dtype) -> None:
    weight_only_ref.check(precision, group_size)
    if precision == "int8" and group_size is not None:
        _fail(f"int8 weights have one scale per output channel, got group_size={group_size!r}", "pass group_size=None")
    for name, t in (("x", x), ("codes", codes), ("scales", scales), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(f"{name} is a {type(t).__name__}", "pass a torch.Tensor")
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        _fail(f"x is {x.dtype} with {x.dim()} dims", "pass float16, bfloat16 or float32 activations [..., K]")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        _fail(f"out_dtype {out_dtype}", "choose float16, bfloat16 or float32 (or None: x's dtype)")
    k = x.shape[-1]
    if precision == "int8":
        want, width = torch.int8, k
        hint = "int8 codes [N, K] (weight_only_ref.quantize_weight)"
    else:
        want, width = torch.uint8, (k + 1) // 2
        hint = "int4 codes packed two per byte, uint8 [N, ceil(K / 2)] (weight_only_ref.pack_int4)"
    if codes.dtype != want or codes.dim() != 2 or codes.shape[1] != width:
        _fail(f"codes are {codes.dtype} {tuple(codes.shape)} for K={k}", f"pass {hint}")
    n = codes.shape[0]
    want_scales = (n,) if precision == "int8" else (n, -(-k // group_size))
    if scales.dtype != torch.float16 or tuple(scales.shape) != want_scales:
        _fail(f"scales are {scales.dtype} {tuple(scales.shape)}",
              f"pass float16 scales of shape {want_scales} (weight_only_ref.scales)")
    if bias is not None and (bias.dtype not in FLOAT_DTYPES or tuple(bias.shape) != (n,)):
        _fail(f"bias is {bias.dtype} {tuple(bias.shape)}", f"pass a float bias of shape ({n},) or None")
    devices = {t.device for t in (x, codes, scales, bias) if t is not None}
    if len(devices) != 1:
        _fail(f"operands on several devices {sorted(map(str, devices))}", "move them to one device")
    if not triton_enabled(x.device):
        _fail(f"tensors on {x.device}", "use CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
              "weight_only_linear_reference is the plain PyTorch version")


def _tiles(cfg: WeightOnlyConfig, m: int, n: int, k: int, group: int) -> Tuple[int, int, int]:
    """The config's tiles shrunk to the problem (never below 16 where tl.dot needs it)."""
    lo = 16 if cfg.path == "tiled" else 1
    bm = max(lo, min(cfg.block_m, next_pow2(m)))
    bn = max(16, min(cfg.block_n, next_pow2(n)))
    bk = max(16, min(cfg.block_k, next_pow2(k), group))
    return bm, bn, bk


def weight_only_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, precision: str, group_size: Optional[int] = None,
                       out_dtype: Optional[torch.dtype] = None,
                       config: Optional[WeightOnlyConfig] = None) -> torch.Tensor:
    """``x [..., K] @ dequantize(codes, scales)^T + bias`` -> [..., N] in ``out_dtype`` (default
    x's dtype). ``config`` forces a path and its tiles; None: :func:`heuristic` by M."""
    _check(x, codes, scales, bias, precision, group_size, out_dtype)
    k, n = x.shape[-1], codes.shape[0]
    out_dtype = out_dtype or x.dtype
    m = x.shape[:-1].numel()
    x2 = x.reshape(m, k)  # not (-1, k): ambiguous when K is 0
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m and n and k == 0:  # nothing to sum: the bias (or 0) rounded to out_dtype
        if bias is not None:
            out.copy_(bias.float().expand(m, n))
        else:
            out.zero_()
    elif m and n:
        # unit stride along K for wide loads (views from the pass already are: no copies)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        _launch(x2, codes.contiguous(), scales.contiguous(), bias.contiguous() if bias is not None else None,
                out, precision == "int4", group_size or 1, config or heuristic(m))
    return out.reshape(*x.shape[:-1], n)


def _launch(x, codes, scales, bias, out, int4: bool, group: int, cfg: WeightOnlyConfig) -> None:
    (m, k), n = x.shape, codes.shape[0]
    bm, bn, bk = _tiles(cfg, m, n, k, group if int4 else 1 << 30)
    interpret = triton_interpret()
    common = dict(INT4=int4, GROUP=group, HAS_BIAS=bias is not None, SOFT_BF16=interpret,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    b = bias if bias is not None else out  # never read without HAS_BIAS
    if cfg.path == "tiled":
        if max(x.stride(0) * m, codes.numel(), out.numel()) > INT32_MAX:
            _fail("an operand has 2**31 elements or more", "split the call (the kernels index in 32 bits)")
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        upcast = interpret and x.dtype == torch.bfloat16
        kernel = _tiled_wa_kernel if cfg.weights_first and x.dtype in (torch.float16, torch.bfloat16) else _tiled_kernel
        # INT4 read as 16-bit words of four codes: 16-bit x, K a multiple of 4, even row stride
        words = (int4 and x.dtype in (torch.float16, torch.bfloat16) and k % 4 == 0 and codes.stride(0) % 2 == 0
                 and codes.data_ptr() % 2 == 0)
        args = (x, codes, scales, b, out, m, n, k, x.stride(0), codes.stride(0), scales.stride(0))
        key = (kernel.__name__, x.dtype, bm, bn, bk, cfg.num_warps, cfg.num_stages)
        if words and key not in _WORDS_UNCOMPILABLE:
            try:
                kernel[grid](*args, UPCAST=upcast, WORDS=True, GROUP_M=cfg.group_m, **common)
                return
            except (RuntimeError, triton.CompilationError, triton.runtime.OutOfResources):
                # Triton 3.6 fails some of these layouts in its passes ("Illegal shared layout":
                # 64x128x32 at 4 warps, not at 8; sm_90), or a variant may need more resources:
                # the bytes' tile does the same math
                _WORDS_UNCOMPILABLE.add(key)
        kernel[grid](*args, UPCAST=upcast, WORDS=False, GROUP_M=cfg.group_m, **common)
        return
    if cfg.path == "gemv":
        gemv.gemv(x, codes, scales, bias, out, int4=int4, group=group, config=cfg)
        return
    if cfg.path == "tma":
        tma_gemv(x, codes, scales, bias, out, int4=int4, group=group, block_n=cfg.block_n, block_k=cfg.block_k,
                 stages=cfg.num_stages, warps=cfg.num_warps, split_k=cfg.split_k, waves=cfg.waves, x_tma=cfg.tma_x)
        return
    if cfg.path == "dequant":
        _dequantized_mm(x, codes, scales, bias, out, int4, group, bn, bk, interpret)
        return
    split = cfg.split_k or auto_split(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk), x.device,
                                      cfg.waves, min_tiles=2)
    k_slice, split = k_slices(k, bk, split)
    if max(x.stride(0) * m, codes.numel(), split * out.numel()) > INT32_MAX:
        _fail("an operand (or the split-K workspace) has 2**31 elements or more",
              "split the call or lower split_k (the kernels index in 32 bits)")
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    _skinny_kernel[(triton.cdiv(n, bn), split, triton.cdiv(m, bm))](
        x, codes, scales, b, part, m, n, k, k_slice, x.stride(0), codes.stride(0), scales.stride(0),
        PARTIAL=split > 1, **common)
    if split > 1:
        block = 1024
        split_sum[(triton.cdiv(m * n, block),)](part, b, out, m * n, n, split,
                                                HAS_BIAS=bias is not None, SOFT_BF16=interpret, BLOCK=block)


def _dequantized_mm(x, codes, scales, bias, out, int4: bool, group: int, bn: int, bk: int, interpret: bool) -> None:
    """The dequant path: the weights [N, K] in x's dtype (the reference's operand, exactly),
    then cuBLAS with fp32 sums; bias added in fp32 and one rounding (addmm's epilogue), or, for
    another out dtype, the product in fp32 and one rounding to it."""
    (m, k), n = x.shape, codes.shape[0]
    if max(n * k, out.numel()) > INT32_MAX:
        _fail("an operand has 2**31 elements or more", "split the call (the kernels index in 32 bits)")
    w = torch.empty(n, k, dtype=x.dtype, device=x.device)
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        codes, scales, w, n, k, codes.stride(0), scales.stride(0), INT4=int4, GROUP=group, SOFT_BF16=interpret,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    if out.dtype == x.dtype:
        if bias is not None:
            torch.addmm(bias.to(x.dtype), x, w.t(), out=out)
        else:
            torch.mm(x, w.t(), out=out)
    else:
        y = x.float() @ w.float().t()
        out.copy_(y + bias.float() if bias is not None else y)


# ----------------------------------------------------------------------------- reference
def weight_only_linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                                 bias: Optional[torch.Tensor] = None, *, precision: str,
                                 group_size: Optional[int] = None,
                                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`weight_only_linear` in plain PyTorch (any device): unpacks INT4 codes, flattens
    x's leading dims and runs ``weight_only_ref.weight_only_mm``."""
    k = x.shape[-1]
    unpacked = weight_only_ref.unpack_int4(codes, k) if precision == "int4" else codes
    x2 = x.reshape(x.shape[:-1].numel(), k)
    y = weight_only_ref.weight_only_mm(x2, unpacked, scales, precision, group_size, bias, out_dtype)
    return y.reshape(*x.shape[:-1], codes.shape[0])


__all__ = ["weight_only_linear", "weight_only_linear_reference", "WeightOnlyConfig", "CONFIGS", "heuristic",
           "paths_for", "worth_timing", "fits_registers", "tma_candidates", "ENGINE_TMA_INT8", "ENGINE_TMA_INT4",
           "GEMV_STEP_WEIGHTS", "SKINNY_MAX_M", "GEMV_MAX_M", "PATHS"]
