"""Triton grouped W8A16 / W4A16 GEMM: a mixture-of-experts layer's experts in one launch
(``compile_backend.weight_only_grouped_mm``, which ``fx_passes/weight_only.py`` makes of
``torch._grouped_mm`` over a frozen [E, K, N] expert weight: transformers' Mixtral, Qwen-MoE,
DeepSeek-V3 experts).

Layers, as every kernel here: ``_grouped_kernel`` and ``_grouped_gemv_kernel`` (@triton.jit);
:func:`weight_only_grouped_mm` checks the operands, picks one by M, allocates and launches; :func:`weight_only_grouped_mm_reference` is the
plain-PyTorch version (``weight_only_ref.grouped_weight_only_mm`` on the unpacked codes);
:func:`build_weight_only_grouped_mm` is the builder the engine tries for a "grouped_gemm" group.

Operands: x [M, K] with its rows sorted by expert; the experts' weights stacked as one [E * N, K]
weight, quantized row by row as ``weight_only_ref.quantize_weight`` makes them (INT8 codes with a
scale a row, INT4 packed two a byte with a scale a group of K); ``offs`` [E], the cumulative row
ends per expert (int32, non-decreasing, as ``torch._grouped_mm`` takes them; their values are not
checked, which would cost a host sync: out-of-range ends are clamped to [0, M], so no access leaves x). Numerics are the tiled weight-only
GEMM's: each weight tile dequantized (code * scale in fp32, rounded to x's dtype), products
summed in fp32, one rounding to the output dtype; rows past ``offs[-1]`` are written 0.

Which rows a program takes: the row tiles of every expert, in expert order, then the tiles of
the rows past the last expert. Each program loads all E offsets (one vector load), counts each
expert's tiles and finds its own tile by a prefix sum, so the grid is static (a CUDA graph
holds it) and no program is spent on an expert without rows: at most ceil(M / BLOCK_M) + E + 1
row tiles (each expert's last tile may be partial), times the N tiles. A decode step at batch 1
(M = top-k rows) thus runs top-k row tiles of real work and exits the rest at once.

Up to ``GEMV_MAX_ROWS`` rows (a decode step: batch x top-k) the GEMV kernel runs instead: a
program per (16 outputs, row), the row's expert counted from the offsets, products summed
elementwise in fp32 and across K once. Offline for sm_90 (Triton 3.6, Mixtral's gate/up shape)
its loop takes 5.2 (INT8, fp16) / 8.1 (INT8, bf16) / 9.8-10.3 (INT4) SASS instructions a
weight against ~15 for the 16-row tensor-core tile; the decode engine's tuned GEMV (kernels/gemv.py)
reaches 3.3-6.4. Not yet timed on a GPU.

This module imports Triton at the top: only the builder loader and tests import it.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
import triton
import triton.language as tl

from . import weight_only_ref
from .base import Kernel, KernelContext, KernelGroup, Unsupported, meta_of, triton_enabled, triton_interpret
from .launch import next_pow2
from .weight_only_parts import dequant_tile, dequant_tile16, int8_weights, packed_bytes_ok, round_to

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT32_MAX = 2**31 - 1
#: experts one launch takes (the offsets are one vector in registers)
MAX_EXPERTS = 1024
#: rows up to which the GEMV kernel serves (a decode step at batch 1-8 with top-2 routing):
#: each row reads its expert's weights once, where a 16-row tensor-core tile would pad it
GEMV_MAX_ROWS = 16


@triton.jit
def _grouped_kernel(x_ptr, w_ptr, s_ptr, offs_ptr, out_ptr, M, N, K, E, sxm, swn, ssn,
                    INT4: tl.constexpr, GROUP: tl.constexpr, SOFT_BF16: tl.constexpr, UPCAST: tl.constexpr,
                    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, tile = tl.program_id(0), tl.program_id(1)
    ids = tl.arange(0, E_POW2)
    real = ids < E
    # each expert's rows [start, end), clamped to x: a probe's random offsets stay in bounds
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + ids, mask=real, other=0).to(tl.int32), 0), M)
    starts = tl.minimum(tl.load(offs_ptr + ids - 1, mask=real & (ids > 0), other=0).to(tl.int32), M)
    starts = tl.maximum(starts, 0)
    tiles = tl.where(real & (ends > starts), (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    after = tl.cumsum(tiles, 0)  # tiles of experts 0..e
    expert = tl.sum((after <= tile).to(tl.int32), 0)  # the expert whose tiles hold this one
    if expert < E:
        first = tl.sum(tl.where(ids == expert, after - tiles, 0), 0)
        row0 = tl.sum(tl.where(ids == expert, starts, 0), 0) + (tile - first) * BLOCK_M
        end = tl.sum(tl.where(ids == expert, ends, 0), 0)
    else:  # the rows past the last expert's: zeros
        last = tl.load(offs_ptr + E - 1).to(tl.int32)
        row0 = tl.minimum(tl.maximum(last, 0), M) + (tile - tl.sum(tiles, 0)) * BLOCK_M
        end = M
    if row0 < end:
        rm = row0 + tl.arange(0, BLOCK_M)
        rows_ok = rm < end
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if expert < E:
            wn = expert * N + rn  # the expert's rows of the stacked weight
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=rows_ok[:, None] & (rk < K)[None, :],
                            other=0.0)
                if not INT4 and x_ptr.dtype.element_ty != tl.float32:  # INT8, 16-bit x: no conversion a weight
                    w = dequant_tile16(w_ptr, s_ptr, wn, k0, expert * N + N, K, swn, ssn, INT4, GROUP, BLOCK_K,
                                       x_ptr.dtype.element_ty, not SOFT_BF16)
                else:
                    w = dequant_tile(w_ptr, s_ptr, wn, k0, expert * N + N, K, swn, ssn, INT4, GROUP, BLOCK_N,
                                     BLOCK_K, x_ptr.dtype.element_ty, SOFT_BF16)
                if UPCAST:  # the interpreter multiplies bf16 dot operands as raw integers
                    x, w = x.to(tl.float32), w.to(tl.float32)
                # ieee: fp32 activations keep the reference's fp32 products (no TF32)
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        mask = rows_ok[:, None] & (rn < N)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16),
                 mask=mask)


@triton.jit
def _grouped_gemv_kernel(x_ptr, w_ptr, s_ptr, offs_ptr, out_ptr, M, N, K, E, sxm, swn, ssn,
                         INT4: tl.constexpr, GROUP: tl.constexpr, SOFT_BF16: tl.constexpr, E_POW2: tl.constexpr,
                         ODD_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode rows (M <= GEMV_MAX_ROWS): one program per (BLOCK_N outputs, row); the row's expert
    is the count of experts whose rows end at or before it (past the last: zeros). Products
    accumulate elementwise in fp32 and are summed over K once, at the end (no tensor-core tile
    padding one row to 16, no cross-lane sum a K step). INT4: each byte's two codes multiply x
    at even and odd k (x loaded as two strided halves), so the codes are never interleaved."""
    pid_n, row = tl.program_id(0), tl.program_id(1)
    ids = tl.arange(0, E_POW2)
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + ids, mask=ids < E, other=0).to(tl.int32), 0), M)
    expert = tl.sum(((ends <= row) & (ids < E)).to(tl.int32), 0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = BLOCK_K // 2
    acc = tl.zeros([BLOCK_N, HALF], tl.float32)
    acc_odd = tl.zeros([BLOCK_N, HALF], tl.float32)
    if expert < E:
        wn = expert * N + rn
        n_ok = rn < N
        for k0 in range(0, K, BLOCK_K):
            if INT4:
                rb = k0 // 2 + tl.arange(0, HALF)
                # codes * scale in fp32 rounded to x's dtype (int4_weights' 16-bit route costs ~2x the
                # SASS a weight here in bf16: sm_90, Triton 3.6)
                ok = n_ok[:, None] & packed_bytes_ok(rb, K, ODD_K)[None, :]
                packed = tl.load(w_ptr + wn[:, None] * swn + rb[None, :], mask=ok, other=0).to(tl.int32)
                scale = tl.load(s_ptr + wn * ssn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                lo = round_to((((packed & 15) ^ 8) - 8).to(tl.float32) * scale, x_ptr.dtype.element_ty,
                              SOFT_BF16).to(tl.float32)
                hi = round_to(((((packed >> 4) & 15) ^ 8) - 8).to(tl.float32) * scale, x_ptr.dtype.element_ty,
                              SOFT_BF16).to(tl.float32)
                even = tl.load(x_ptr + row * sxm + 2 * rb, mask=2 * rb < K, other=0.0).to(tl.float32)
                odd = tl.load(x_ptr + row * sxm + 2 * rb + 1, mask=2 * rb + 1 < K, other=0.0).to(tl.float32)
                acc += lo * even[None, :]
                acc_odd += hi * odd[None, :]
            else:
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + row * sxm + rk, mask=rk < K, other=0.0).to(tl.float32)
                w = int8_weights(w_ptr, wn, rk, n_ok, K, swn, tl.load(s_ptr + wn * ssn, mask=n_ok, other=0.0)
                                 .to(tl.float32)[:, None], x_ptr.dtype.element_ty, SOFT_BF16)
                products = tl.reshape(w * x[None, :], [BLOCK_N, HALF, 2])
                first, second = tl.split(products)
                acc += first
                acc_odd += second
    y = tl.sum(acc + acc_odd, 1)
    tl.store(out_ptr + row * N + rn, round_to(y, out_ptr.dtype.element_ty, SOFT_BF16), mask=rn < N)


# ----------------------------------------------------------------------------- the launcher
def _fail(what: str, fix: str) -> None:
    raise ValueError(f"weight_only_grouped_mm: {what}; {fix}")


def _check(x, codes, scales, offs, precision, group_size, out_dtype) -> None:
    weight_only_ref.check(precision, group_size)
    if precision == "int8" and group_size is not None:
        _fail(f"int8 weights have one scale per output channel, got group_size={group_size!r}", "pass group_size=None")
    for name, t in (("x", x), ("codes", codes), ("scales", scales), ("offs", offs)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} is a {type(t).__name__}", "pass a torch.Tensor")
    if x.dtype not in FLOAT_DTYPES or x.dim() != 2:
        _fail(f"x is {x.dtype} with {x.dim()} dims", "pass float16, bfloat16 or float32 rows [M, K]")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        _fail(f"out_dtype {out_dtype}", "choose float16, bfloat16 or float32 (or None: x's dtype)")
    if offs.dim() != 1 or offs.dtype not in (torch.int32, torch.int64) or not 1 <= offs.shape[0] <= MAX_EXPERTS:
        _fail(f"offs is {offs.dtype} {tuple(offs.shape)}",
              f"pass the cumulative rows per expert, int32 [E] with 1 <= E <= {MAX_EXPERTS}")
    k, experts = x.shape[1], offs.shape[0]
    want, width = (torch.int8, k) if precision == "int8" else (torch.uint8, (k + 1) // 2)
    if codes.dtype != want or codes.dim() != 2 or codes.shape[1] != width or codes.shape[0] % experts:
        _fail(f"codes are {codes.dtype} {tuple(codes.shape)} for K={k} and {experts} experts",
              f"pass the experts' {precision} codes stacked as [E * N, {width}] (weight_only_ref.quantize_weight)")
    rows = codes.shape[0]
    want_scales = (rows,) if precision == "int8" else (rows, -(-k // group_size))
    if scales.dtype != torch.float16 or tuple(scales.shape) != want_scales:
        _fail(f"scales are {scales.dtype} {tuple(scales.shape)}", f"pass float16 scales of shape {want_scales}")
    devices = {t.device for t in (x, codes, scales, offs)}
    if len(devices) != 1:
        _fail(f"operands on several devices {sorted(map(str, devices))}", "move them to one device")
    if not triton_enabled(x.device):
        _fail(f"tensors on {x.device}", "use CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
              "weight_only_grouped_mm_reference is the plain PyTorch version")


def tiles_for(m: int, n: int, k: int, experts: int, group: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K). BLOCK_M 1: the GEMV kernel, one row a program (up to
    GEMV_MAX_ROWS rows: a decode step's top-k rows); else tensor-core tiles of 16 rows when each
    expert gets a few rows, 64 beyond. INT4 tiles within one scale group."""
    if m <= GEMV_MAX_ROWS:  # 16 x 128 at 2 warps: the fewest SASS a weight offline (sm_90: see the notes)
        return 1, 16, max(16, min(128, next_pow2(k), group))
    bm = 16 if m <= 16 * experts else 64
    bn = max(16, min(64, next_pow2(n)))
    bk = max(16, min(64, next_pow2(k), group))
    return bm, bn, bk


def weight_only_grouped_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor, *,
                           precision: str, group_size: Optional[int] = None,
                           out_dtype: Optional[torch.dtype] = None,
                           tiles: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """x [M, K] (rows sorted by expert) times each expert's dequantized [N, K] weight -> [M, N]
    in ``out_dtype`` (default x's dtype); see the module docstring. ``tiles`` forces
    (BLOCK_M, BLOCK_N, BLOCK_K) (powers of two, BLOCK_N and BLOCK_K at least 16; BLOCK_M 1 is
    the GEMV kernel, else at least 16); None: :func:`tiles_for`."""
    _check(x, codes, scales, offs, precision, group_size, out_dtype)
    (m, k), experts = x.shape, offs.shape[0]
    n = codes.shape[0] // experts
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    if max(x.stride(0) * m, codes.numel(), out.numel()) > INT32_MAX:
        _fail("an operand has 2**31 elements or more", "split the call (the kernel indexes in 32 bits)")
    x = x if x.stride(1) == 1 else x.contiguous()
    codes, scales, offs = codes.contiguous(), scales.contiguous(), offs.contiguous()
    int4, group = precision == "int4", group_size or 1
    bm, bn, bk = tiles or tiles_for(m, n, k, experts, group if int4 else 1 << 30)
    interpret = triton_interpret()
    common = dict(INT4=int4, GROUP=group, SOFT_BF16=interpret, E_POW2=max(2, next_pow2(experts)), BLOCK_N=bn,
                  BLOCK_K=bk, num_warps=2 if bm == 1 else 4)
    args = (x, codes, scales, offs, out, m, n, k, experts, x.stride(0), codes.stride(0), scales.stride(0))
    if bm == 1:
        _grouped_gemv_kernel[(triton.cdiv(n, bn), m)](*args, ODD_K=k % 2 == 1, **common)
        return out
    _grouped_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm) + experts + 1)](
        *args, UPCAST=interpret and x.dtype == torch.bfloat16, BLOCK_M=bm, **common)
    return out


# ----------------------------------------------------------------------------- the builder
def build_weight_only_grouped_mm(group: KernelGroup, ctx: KernelContext) -> Kernel:
    """Kernel for a "grouped_gemm" group: the one ``weight_only_grouped_mm`` node (else Unsupported)."""
    nodes = [n for n in group.gm.graph.nodes if n.op == "call_function"]
    if len(nodes) != 1 or getattr(nodes[0].target, "_opname", None) != "weight_only_grouped_mm":
        raise Unsupported("a grouped_gemm group is one weight_only_grouped_mm node")
    anchor = nodes[0]
    x, codes = (meta_of(a) for a in anchor.args[:2])
    if not isinstance(x, torch.Tensor) or not isinstance(codes, torch.Tensor) or x.dim() != 2:
        raise Unsupported("weight_only_grouped_mm operands without tensor metadata")
    experts = meta_of(anchor.args[3]).shape[0]
    precision, group_size = anchor.args[4], anchor.args[5]
    int4 = precision == "int4"
    tiles = tiles_for(x.shape[0], codes.shape[0] // experts, x.shape[1], experts, group_size if int4 else 1 << 30)
    return Kernel(kind=group.kind, impl="triton", ops=group.ops, fn=_GroupedRunner(group.gm, anchor, tiles),
                  config={"weight_only": precision, "group_size": group_size, "experts": experts,
                          "block_m": tiles[0], "block_n": tiles[1], "block_k": tiles[2]})


class _GroupedRunner:
    """Calls the launcher with the group's inputs in the anchor's argument places."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, tiles: Tuple[int, int, int]) -> None:
        self.gm, self.anchor, self.tiles = gm, anchor, tiles
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def __call__(self, *inputs: Any) -> Tuple[torch.Tensor]:
        env = dict(zip(self.placeholders, inputs))
        args = fx.node.map_arg(self.anchor.args, lambda n: env[n] if n in env else getattr(self.gm, n.target))
        x, codes, scales, offs, precision, group_size = args[:6]
        out_dtype = args[6] if len(args) > 6 else self.anchor.kwargs.get("out_dtype")
        return (weight_only_grouped_mm(x, codes, scales, offs, precision=precision, group_size=group_size,
                                       out_dtype=out_dtype, tiles=self.tiles),)


# ----------------------------------------------------------------------------- reference
def weight_only_grouped_mm_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor,
                                     *, precision: str, group_size: Optional[int] = None,
                                     out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`weight_only_grouped_mm` in plain PyTorch (any device): unpacks INT4 codes and runs
    ``weight_only_ref.grouped_weight_only_mm``."""
    unpacked = weight_only_ref.unpack_int4(codes, x.shape[1]) if precision == "int4" else codes
    return weight_only_ref.grouped_weight_only_mm(x, unpacked, scales, offs, precision, group_size, out_dtype)


__all__ = ["weight_only_grouped_mm", "weight_only_grouped_mm_reference", "build_weight_only_grouped_mm", "tiles_for",
           "MAX_EXPERTS", "GEMV_MAX_ROWS"]
