"""Triton 2-D max pooling: ``aten.max_pool2d_with_indices`` (values, and indices when used).

Layers: ``_maxpool2d_kernel`` (@triton.jit) computes a 2-D tile of outputs; ``MaxPoolLauncher``
checks the input, allocates the outputs in ATen's layout (or takes ``out=`` tensors from the
engine's memory plan) and launches; ``build_pool`` is the builder the engine calls for a "pool"
group; ``maxpool2d_reference`` is a plain-PyTorch version (padding + strided slices +
``torch.maximum``) the tests hold against ATen and the kernel.

Tiling: the output is walked as [rows, inner], where *inner* is the output's fastest-moving
dim, so loads and stores of a tile row are coalesced: channels for a channels-last output
(rows enumerate n, oh, ow), else the output width (rows enumerate n, c, oh). The input is read
through its own strides, whatever its layout. Every window element is one masked load per tile
(kernel, stride, padding, dilation are constexpr: the window loop is unrolled); positions in
the padding or past the input (ceil_mode) read as -inf.

Numerics, as ATen (CPU and CUDA kernels alike): scanning the window row by row, an element
replaces the running max when it is greater or NaN, so a NaN anywhere in the window gives NaN
(index of the last NaN), ties keep the first element (index and sign of zero), and a window of
-inf gives -inf with the index of its first element inside the input. Values are compared in
fp32 (exact for fp16/bf16/fp32), so outputs are bit-identical to ATen. Not matched: a window
with no element inside the input at all (ATen's shape checks practically rule it out) gets
index 0 where ATen reports the position its loop starts at.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
import triton
import triton.language as tl

from .base import Kernel, KernelContext, KernelGroup, OutLayout, Unsupported, meta_of, output_tensor
from .launch import dense_order, next_pow2, strides_for

aten = torch.ops.aten
INT32_MAX = 2**31 - 1
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- the kernel
@triton.jit
def output_position(ROWS, INNER, C, OH, OW, CHANNELS_INNER: tl.constexpr, WIDE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """(n, c, oh, ow, mask) of this program's [BLOCK_R, BLOCK_I] tile of outputs, each index
    [BLOCK_R, 1] or [1, BLOCK_I]: rows enumerate (n, oh, ow) and inner c for a channels-last
    output, else rows (n, c, oh) and inner ow (the pooling kernels' tiling; int64 when WIDE)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    inner = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    if WIDE:
        rows = rows.to(tl.int64)
        inner = inner.to(tl.int64)
    mask = (rows < ROWS)[:, None] & (inner < INNER)[None, :]
    if CHANNELS_INNER:
        ow = (rows % OW)[:, None]
        oh = ((rows // OW) % OH)[:, None]
        n = (rows // (OW * OH))[:, None]
        c = inner[None, :]
    else:
        oh = (rows % OH)[:, None]
        c = ((rows // OH) % C)[:, None]
        n = (rows // (OH * C))[:, None]
        ow = inner[None, :]
    return n, c, oh, ow, mask


@triton.jit
def _maxpool2d_kernel(
    x_ptr, out_ptr, idx_ptr,
    ROWS, INNER, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    CHANNELS_INNER: tl.constexpr, UNIT_INNER: tl.constexpr, WITH_INDICES: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    n, c, oh, ow, mask = output_position(ROWS, INNER, C, OH, OW, CHANNELS_INNER, WIDE, BLOCK_R, BLOCK_I)
    if CHANNELS_INNER:
        if UNIT_INNER:  # x and out are contiguous along c: the compiler sees it, vectorises
            x_base = x_ptr + n * sxn + c
            o_off = n * son + c + oh * soh + ow * sow
        else:
            x_base = x_ptr + n * sxn + c * sxc
            o_off = n * son + c * soc + oh * soh + ow * sow
    else:
        x_base = x_ptr + n * sxn + c * sxc
        if UNIT_INNER:
            o_off = n * son + c * soc + oh * soh + ow
        else:
            o_off = n * son + c * soc + oh * soh + ow * sow
    iw_first = ow * SW - PW
    ih_first = oh * SH - PH
    best = tl.full([BLOCK_R, BLOCK_I], float("-inf"), tl.float32)
    if WITH_INDICES:
        best_idx = tl.zeros([BLOCK_R, BLOCK_I], tl.int64)
        found = tl.zeros([BLOCK_R, BLOCK_I], tl.int1)
    # row by row through the window, like ATen: greater or NaN replaces, ties keep the first
    for kh in tl.static_range(KH):
        ih = ih_first + kh * DH
        row_ok = mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw_first + kw * DW
            ok = row_ok & (iw >= 0) & (iw < W)
            if CHANNELS_INNER or not UNIT_INNER:
                v = tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=float("-inf"))
            else:  # x contiguous along w
                v = tl.load(x_base + ih * sxh + iw, mask=ok, other=float("-inf"))
            v = v.to(tl.float32)
            take = (v > best) | (v != v)
            if WITH_INDICES:
                # the first element inside the input starts the scan (an all -inf window
                # reports it); masked-off positions never take
                take = ok & (take | (found == 0))
                found = found | ok
                best_idx = tl.where(take, (ih * W + iw).to(tl.int64), best_idx)
            best = tl.where(take, v, best)
    tl.store(out_ptr + o_off, best.to(out_ptr.dtype.element_ty), mask=mask)
    if WITH_INDICES:
        tl.store(idx_ptr + o_off, best_idx, mask=mask)


# ----------------------------------------------------------------------------- launch
@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Launch parameters: a tile of block_r output rows x block_i inner elements per program."""

    block_r: int = 8
    block_i: int = 64
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name, value, hi in (("block_r", self.block_r, 1024), ("block_i", self.block_i, 1024),
                                ("num_warps", self.num_warps, 32)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1) or value > hi:
                raise ValueError(f"{name} must be a power of two in [1, {hi}], got {value!r}")
        if self.block_r * self.block_i > 8192:
            raise ValueError(f"block_r * block_i must be at most 8192, got {self.block_r * self.block_i}")


def pool_heuristic(rows: int, inner: int) -> PoolConfig:
    """Tiles of 256 outputs, 4 per thread: block_i spans the inner dim (up to 128), block_r
    rows make up the rest. Measured on H100 (3x3/2 pooling of 64x112x112, fp16/bf16/fp32,
    batch 1 and 32, NCHW and channels-last): 256-output tiles in 2 warps were within 5% of the
    best of 12 tilings everywhere, while 16-byte vectors per thread (1024-output tiles) were up
    to 1.8x slower on NCHW inputs, whose stride-2 window reads want more loads in flight."""
    block_i = max(1, min(128, next_pow2(inner)))
    block_r = max(1, min(next_pow2(rows), 256 // block_i))
    warps = min(8, max(1, block_r * block_i // 128))
    return PoolConfig(block_r=block_r, block_i=block_i, num_warps=warps)


def tiling(shape: Sequence[int], stride: Sequence[int]) -> Tuple[bool, int, int]:
    """(channels inner, rows, inner extent) of the tile grid over an output of ``shape`` and
    ``stride`` (3-D or 4-D): channels are the inner dim when the output is contiguous along
    them (channels-last), else the output width."""
    shape, stride = tuple(shape), tuple(stride)
    if len(shape) == 3:
        shape, stride = (1, *shape), (0, *stride)
    n, c, oh, ow = shape
    if stride[1] == 1 and c > 1:
        return True, n * oh * ow, c
    return False, n * c * oh, ow


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """What the group computes: one max pooling, its parameters, and which outputs it returns."""

    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    in_shape: Tuple[int, ...]
    dtype: torch.dtype
    out_shape: Tuple[int, ...]
    out_stride: Tuple[int, ...]  # ATen's layout of the values (indices share it)
    returns: Tuple[int, ...]  # per group output: 0 (values) or 1 (indices)

    @property
    def with_indices(self) -> bool:
        return 1 in self.returns

    def out_layouts(self) -> Tuple[OutLayout, ...]:
        dtypes = (self.dtype, torch.int64)
        return tuple((self.out_shape, self.out_stride, dtypes[r]) for r in self.returns)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


class MaxPoolLauncher:
    """Checks the input, allocates (or takes) the outputs, launches the kernel."""

    def __init__(self, plan: PoolPlan, config: PoolConfig):
        self.plan, self.config = plan, config

    def __call__(self, x: torch.Tensor,
                 out: Optional[Sequence[Optional[torch.Tensor]]] = None) -> Tuple[torch.Tensor, ...]:
        plan = self.plan
        if x.dtype != plan.dtype or tuple(x.shape) != plan.in_shape:
            raise ValueError(f"kernel built for {plan.dtype}{plan.in_shape}, got {x.dtype}{tuple(x.shape)}")
        outs = [output_tensor(out, i, layout, x.device) for i, layout in enumerate(plan.out_layouts())]
        values = next((o for o, r in zip(outs, plan.returns) if r == 0), None)
        indices = next((o for o, r in zip(outs, plan.returns) if r == 1), None)
        if values is None:  # only the indices are used: the values still need somewhere to go
            values = torch.empty_strided(plan.out_shape, plan.out_stride, dtype=plan.dtype, device=x.device)
        if values.numel() > 0:
            self._launch(_as_4d(x), _as_4d(values), _as_4d(indices) if indices is not None else None)
        return tuple(outs)

    def _launch(self, x: torch.Tensor, values: torch.Tensor, indices: Optional[torch.Tensor]) -> None:
        plan, cfg = self.plan, self.config
        c, oh, ow = values.shape[1:]
        channels_inner, rows, inner = tiling(values.shape, values.stride())
        x_inner = x.stride(1) if channels_inner else x.stride(3)
        o_inner = values.stride(1) if channels_inner else values.stride(3)
        extent = max(reach(x), reach(values), rows * inner) + cfg.block_r * cfg.block_i
        grid = (triton.cdiv(rows, cfg.block_r), triton.cdiv(inner, cfg.block_i))
        _maxpool2d_kernel[grid](
            x, values, indices if indices is not None else values,
            rows, inner, c, x.shape[2], x.shape[3], oh, ow,
            *x.stride(), *values.stride(),
            KH=plan.kernel[0], KW=plan.kernel[1], SH=plan.stride[0], SW=plan.stride[1],
            PH=plan.padding[0], PW=plan.padding[1], DH=plan.dilation[0], DW=plan.dilation[1],
            CHANNELS_INNER=channels_inner, UNIT_INNER=x_inner == 1 and o_inner == 1,
            WITH_INDICES=indices is not None, WIDE=extent > INT32_MAX,
            BLOCK_R=cfg.block_r, BLOCK_I=cfg.block_i, num_warps=cfg.num_warps)


def reach(t: torch.Tensor) -> int:
    """One past the largest element offset ``t`` addresses."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1


# ----------------------------------------------------------------------------- the builder
def analyze(group: KernelGroup) -> PoolPlan:
    """The pooling a "pool" group computes; Unsupported when the kernel cannot serve it."""
    pools = [n for n in group.gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    if len(pools) != 1 or pools[0].target is not aten.max_pool2d_with_indices.default:
        raise Unsupported(f"expected one max_pool2d_with_indices, got {[str(n.target) for n in pools]}")
    pool = pools[0]
    x = pool.args[0]
    xm = meta_of(x) if isinstance(x, fx.Node) else None
    if not isinstance(xm, torch.Tensor) or xm.dim() not in (3, 4):
        raise Unsupported("input is not a 3-D or 4-D tensor")
    if xm.dtype not in FLOAT_DTYPES:
        raise Unsupported(f"dtype {xm.dtype} (only fp32, fp16, bf16)")
    kernel, stride, padding, dilation, _ceil = _pool_args(pool)
    values = meta_of(pool)[0]
    returns = []
    for o in group.outputs:
        if not (isinstance(o, fx.Node) and o.target is operator.getitem and o.args[0] is pool):
            raise Unsupported("a group output is not an element of the pooling's result")
        returns.append(int(o.args[1]))
    shape = tuple(int(s) for s in values.shape)
    # ATen's strides exactly (size-1 dims included) when dense, else row-major
    dense = dense_order(shape, tuple(values.stride())) is not None
    out_stride = tuple(int(s) for s in values.stride()) if dense else strides_for(shape, range(len(shape)))
    return PoolPlan(kernel, stride, padding, dilation, tuple(int(s) for s in xm.shape), xm.dtype,
                    shape, out_stride, tuple(returns))


def _pool_args(node: fx.Node):
    """(kernel, stride, padding, dilation, ceil_mode) of a max_pool2d_with_indices node, as pairs."""
    args = list(node.args) + [None] * (6 - len(node.args))
    for i, name in enumerate(("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode")):
        if name in node.kwargs:
            args[i] = node.kwargs[name]
    kernel = pair(args[1], None)
    stride = pair(args[2], kernel)  # empty stride: the kernel size, as in ATen
    return kernel, stride, pair(args[3], (0, 0)), pair(args[4], (1, 1)), bool(args[5])


def pair(value, default) -> Tuple[int, int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return default
    if isinstance(value, int):
        return (value, value)
    value = [int(v) for v in value]
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def build_pool(group: KernelGroup, ctx: KernelContext, config: Optional[PoolConfig] = None) -> Kernel:
    """Kernel for a "pool" group; ``config=None`` picks the heuristic launch parameters."""
    plan = analyze(group)
    _, rows, inner = tiling(plan.out_shape, plan.out_stride)
    config = config or pool_heuristic(rows, inner)
    described = {**dataclasses.asdict(config), "kernel": list(plan.kernel), "stride": list(plan.stride),
                 "indices": plan.with_indices}
    return Kernel(kind="pool", impl="triton", ops=group.ops, fn=MaxPoolLauncher(plan, config), config=described,
                  supports_out=True, out_layouts=plan.out_layouts())


# ----------------------------------------------------------------------------- reference
def maxpool2d_reference(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode: bool = False) -> torch.Tensor:
    """Max pooling in plain PyTorch: -inf padding, one strided slice per window element,
    ``torch.maximum`` (which propagates NaN); the result in ATen's layout for ``x``."""
    kh, kw = pair(kernel_size, None)
    sh, sw = pair(stride, (kh, kw))
    ph, pw = pair(padding, (0, 0))
    dh, dw = pair(dilation, (1, 1))
    h, w = x.shape[-2:]
    oh, ow = out_size(h, kh, sh, ph, dh, ceil_mode), out_size(w, kw, sw, pw, dw, ceil_mode)
    # pad past the right edge too, so every (ceil_mode) window slice stays in bounds
    extra_h = max(0, (oh - 1) * sh + (kh - 1) * dh + 1 - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + (kw - 1) * dw + 1 - (w + 2 * pw))
    xp = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=float("-inf"))
    result = None
    for i in range(kh):
        for j in range(kw):
            window = xp[..., i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            result = window if result is None else torch.maximum(result, window)
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
    return result.contiguous(memory_format=fmt)


def out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """ATen's pooling output size (a ceil_mode window must start inside the input or left pad)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


__all__ = ["build_pool", "maxpool2d_reference", "MaxPoolLauncher", "PoolConfig", "PoolPlan", "pool_heuristic",
           "analyze", "tiling", "pair", "out_size", "reach", "output_position"]
