"""Triton 2-D average pooling: ``aten.avg_pool2d`` (DenseNet's transitions, Inception's branch
pools, ResNet-D's shortcuts), which otherwise runs as an ATen launch between fused kernels.

Layers: ``_avgpool2d_kernel`` (@triton.jit) computes a 2-D tile of outputs; ``AvgPoolLauncher``
checks the input, allocates the output in ATen's layout (or takes the engine's ``out=``) and
launches; ``build_avg_pool`` is the builder the engine tries for a "pool" group after the max
pool's; ``avgpool2d_reference`` is a plain-PyTorch version (zero padding + strided slices) the
tests hold against ATen and the kernel. The tiling is max pooling's (``pool.tiling``,
``pool.pool_heuristic``): rows x the output's fastest-moving dim, the input read through its
own strides.

Numerics, as ATen's CUDA kernels: the window's elements summed in fp32 row by row (positions
in the padding or past the input add nothing), then divided (a true division, not a multiply
by the reciprocal) by ``divisor_override`` if given, else by the window's extent clipped to the
padded input (``count_include_pad``, the default) or to the input alone; one rounding to the
output dtype, to nearest even (``round_to``: by hand on the bits under the interpreter, whose
fp32 -> bf16 conversion truncates). fp32 sums in ATen's order, so the kernel matches CUDA's NCHW kernel bit for bit;
ATen's CPU kernels sum in another order (tests: a few fp32 ulps).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
import triton
import triton.language as tl

from .base import Kernel, KernelContext, KernelGroup, OutLayout, Unsupported, meta_of, output_tensor, triton_interpret
from .launch import dense_order, strides_for
from .pool import FLOAT_DTYPES, INT32_MAX, PoolConfig, out_size, output_position, pair, pool_heuristic, reach, tiling
from .weight_only_parts import round_to

aten = torch.ops.aten


# ----------------------------------------------------------------------------- the kernel
@triton.jit
def _avgpool2d_kernel(
    x_ptr, out_ptr,
    ROWS, INNER, C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, COUNT_PAD: tl.constexpr, DIVISOR: tl.constexpr,
    CHANNELS_INNER: tl.constexpr, WIDE: tl.constexpr, SOFT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    n, c, oh, ow, mask = output_position(ROWS, INNER, C, OH, OW, CHANNELS_INNER, WIDE, BLOCK_R, BLOCK_I)
    x_base = x_ptr + n * sxn + c * sxc
    o_off = n * son + c * soc + oh * soh + ow * sow
    ih_first = oh * SH - PH
    iw_first = ow * SW - PW
    total = tl.zeros([BLOCK_R, BLOCK_I], tl.float32)
    for kh in tl.static_range(KH):  # row by row through the window, as ATen sums
        ih = ih_first + kh
        row_ok = mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw_first + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            total += tl.load(x_base + ih * sxh + iw * sxw, mask=ok, other=0.0).to(tl.float32)
    if DIVISOR > 0:
        count = tl.full([BLOCK_R, BLOCK_I], DIVISOR, tl.int32)
    elif COUNT_PAD:  # the window clipped to the padded input
        count = ((tl.minimum(ih_first + KH, H + PH) - ih_first)
                 * (tl.minimum(iw_first + KW, W + PW) - iw_first)).to(tl.int32)
    else:  # the window clipped to the input
        count = ((tl.minimum(ih_first + KH, H) - tl.maximum(ih_first, 0))
                 * (tl.minimum(iw_first + KW, W) - tl.maximum(iw_first, 0))).to(tl.int32)
    mean = round_to(total / count.to(tl.float32), out_ptr.dtype.element_ty, SOFT_BF16)
    tl.store(out_ptr + o_off, mean, mask=mask)


# ----------------------------------------------------------------------------- launch
@dataclasses.dataclass(frozen=True)
class AvgPoolPlan:
    """What the group computes: one average pooling and its parameters."""

    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    count_include_pad: bool
    divisor: int  # divisor_override, 0 when none
    in_shape: Tuple[int, ...]
    dtype: torch.dtype
    out_shape: Tuple[int, ...]
    out_stride: Tuple[int, ...]  # ATen's layout

    def out_layouts(self) -> Tuple[OutLayout, ...]:
        return ((self.out_shape, self.out_stride, self.dtype),)


class AvgPoolLauncher:
    """Checks the input, allocates (or takes) the output, launches the kernel."""

    def __init__(self, plan: AvgPoolPlan, config: PoolConfig):
        self.plan, self.config = plan, config

    def __call__(self, x: torch.Tensor, out: Optional[Sequence[Optional[torch.Tensor]]] = None) -> Tuple[torch.Tensor]:
        plan, cfg = self.plan, self.config
        if x.dtype != plan.dtype or tuple(x.shape) != plan.in_shape:
            raise ValueError(f"kernel built for {plan.dtype}{plan.in_shape}, got {x.dtype}{tuple(x.shape)}")
        y = output_tensor(out, 0, plan.out_layouts()[0], x.device)
        if y.numel() == 0:
            return (y,)
        x4, y4 = (t if t.dim() == 4 else t.unsqueeze(0) for t in (x, y))
        c, oh, ow = y4.shape[1:]
        channels_inner, rows, inner = tiling(y4.shape, y4.stride())
        wide = max(reach(x4), reach(y4), rows * inner) + cfg.block_r * cfg.block_i > INT32_MAX
        grid = (triton.cdiv(rows, cfg.block_r), triton.cdiv(inner, cfg.block_i))
        _avgpool2d_kernel[grid](
            x4, y4, rows, inner, c, x4.shape[2], x4.shape[3], oh, ow, *x4.stride(), *y4.stride(),
            KH=plan.kernel[0], KW=plan.kernel[1], SH=plan.stride[0], SW=plan.stride[1],
            PH=plan.padding[0], PW=plan.padding[1], COUNT_PAD=plan.count_include_pad, DIVISOR=plan.divisor,
            CHANNELS_INNER=channels_inner, WIDE=wide, SOFT_BF16=triton_interpret() and x.dtype == torch.bfloat16,
            BLOCK_R=cfg.block_r, BLOCK_I=cfg.block_i,
            num_warps=cfg.num_warps)
        return (y,)


# ----------------------------------------------------------------------------- the builder
def avg_pool_args(node: fx.Node):
    """(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) of an
    ``avg_pool2d`` node, the sizes as pairs."""
    names = ("self", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    defaults = (None, None, None, 0, False, True, None)
    args = [node.kwargs.get(name, node.args[i] if i < len(node.args) else defaults[i]) for i, name in enumerate(names)]
    kernel = pair(args[1], None)
    return (kernel, pair(args[2], kernel), pair(args[3], (0, 0)), bool(args[4]), bool(args[5]), args[6])


def analyze_avg(group: KernelGroup) -> AvgPoolPlan:
    """The pooling a "pool" group of one ``avg_pool2d`` computes; Unsupported otherwise."""
    pools = [n for n in group.gm.graph.nodes if n.op == "call_function"]
    if len(pools) != 1 or pools[0].target is not aten.avg_pool2d.default:
        raise Unsupported(f"expected one avg_pool2d, got {[str(n.target) for n in pools]}")
    pool = pools[0]
    xm = meta_of(pool.args[0]) if isinstance(pool.args[0], fx.Node) else None
    if not isinstance(xm, torch.Tensor) or xm.dim() not in (3, 4):
        raise Unsupported("input is not a 3-D or 4-D tensor")
    if xm.dtype not in FLOAT_DTYPES:
        raise Unsupported(f"dtype {xm.dtype} (only fp32, fp16, bf16)")
    if list(group.outputs) != [pool]:
        raise Unsupported("the group's output is not the pooling's")
    kernel, stride, padding, _ceil, count_pad, divisor = avg_pool_args(pool)
    if divisor is not None and int(divisor) <= 0:
        raise Unsupported(f"divisor_override {divisor}")
    out = meta_of(pool)
    shape = tuple(int(s) for s in out.shape)
    dense = dense_order(shape, tuple(out.stride())) is not None
    out_stride = tuple(int(s) for s in out.stride()) if dense else strides_for(shape, range(len(shape)))
    return AvgPoolPlan(kernel, stride, padding, count_pad, int(divisor or 0), tuple(int(s) for s in xm.shape),
                       xm.dtype, shape, out_stride)


def build_avg_pool(group: KernelGroup, ctx: KernelContext, config: Optional[PoolConfig] = None) -> Kernel:
    """Kernel for a "pool" group of one ``avg_pool2d``; ``config=None``: max pooling's heuristic."""
    plan = analyze_avg(group)
    _, rows, inner = tiling(plan.out_shape, plan.out_stride)
    config = config or pool_heuristic(rows, inner)
    described = {**dataclasses.asdict(config), "kernel": list(plan.kernel), "stride": list(plan.stride), "avg": True}
    return Kernel(kind="pool", impl="triton", ops=group.ops, fn=AvgPoolLauncher(plan, config), config=described,
                  supports_out=True, out_layouts=plan.out_layouts())


# ----------------------------------------------------------------------------- reference
def avgpool2d_reference(x: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                        count_include_pad: bool = True, divisor_override=None) -> torch.Tensor:
    """Average pooling in plain PyTorch: zero padding, the window summed in fp32 by strided
    slices, divided by ATen's count (see the module docstring); ATen's layout for ``x``."""
    kh, kw = pair(kernel_size, None)
    sh, sw = pair(stride, (kh, kw))
    ph, pw = pair(padding, (0, 0))
    h, w = x.shape[-2:]
    oh, ow = out_size(h, kh, sh, ph, 1, ceil_mode), out_size(w, kw, sw, pw, 1, ceil_mode)
    extra_h = max(0, (oh - 1) * sh + kh - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + kw - (w + 2 * pw))
    xp = F.pad(x.float(), (pw, pw + extra_w, ph, ph + extra_h))
    total = None
    for i in range(kh):
        for j in range(kw):
            window = xp[..., i: i + (oh - 1) * sh + 1: sh, j: j + (ow - 1) * sw + 1: sw]
            total = window if total is None else total + window
    if divisor_override:
        count = torch.full((oh, ow), float(divisor_override))
    else:
        hs, ws = torch.arange(oh) * sh - ph, torch.arange(ow) * sw - pw
        if count_include_pad:
            rows = torch.clamp(hs + kh, max=h + ph) - hs
            cols = torch.clamp(ws + kw, max=w + pw) - ws
        else:
            rows = torch.clamp(hs + kh, max=h) - torch.clamp(hs, min=0)
            cols = torch.clamp(ws + kw, max=w) - torch.clamp(ws, min=0)
        count = (rows[:, None] * cols[None, :]).float()
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
    return (total / count.to(x.device)).to(x.dtype).contiguous(memory_format=fmt)


__all__ = ["AvgPoolLauncher", "AvgPoolPlan", "analyze_avg", "avg_pool_args", "avgpool2d_reference", "build_avg_pool"]
