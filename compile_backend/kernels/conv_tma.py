"""Implicit-GEMM 2-D convolution with TMA operand loads (Hopper and later; Triton's interpreter
too): stride 1 or 2, no dilation, one group, channels-last tensors, any kernel size, padding <= 4.

A program computes BLOCK_H x BLOCK_W output pixels of one image by BLOCK_N output channels. For
each tap (kh, kw) and block of BLOCK_K input channels, its input tile is ONE 4-D load of
``x[n, h0 + kh - pad_h : +BLOCK_H, w0 + kw - pad_w : +BLOCK_W, c0 : +BLOCK_K]`` (NHWC): the
padding is the load's out-of-bounds zero fill, so the loop has no address arithmetic and no
masks, and Triton pipelines the loads into shared memory; the weight tile is one load of the
weight viewed ``[OC, KH * KW, C]`` (channels beyond C read as zeros on both sides). Why: the
pointer template (``gemm_template.render_conv``) gathers every row's address and masks it per
tap, and ResNet-50's 8-bit 3x3 convolutions ran ~2x cuDNN fp16's time with it (H100, session 20's
report); the TMA GEMM over the 1x1 layers' rows reached 2.1 TB/s (session 21, run 2).

Stride 2: a strided patch's input pixels are not one box (TMA's element strides are not in
Triton's descriptors), but they are in x viewed ``[N, H/2, 2, W/2, 2C]`` (an even map): each tap
reads one parity of the row and column pairs, a 5-D box. The epilogue is the convolution template's
(``gemm_template.epilogue_body``), addressed in the output's (n, c, h, w) index space.

Layers: the template and :func:`render_conv_tma`, the configs (:class:`ConvTmaConfig`,
:func:`conv_tma_configs`, :func:`configs_for`), :func:`conv_tma_supported` (which problems),
:class:`ConvTmaRunner` (descriptors and launch), :func:`tma_conv_candidate` (a group's candidate:
``conv`` for 16-bit convolutions, ``qconv`` for 8-bit ones). The op and its reference are the
convolution group's. Imports Triton only when a runner launches.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch

from . import gemm_template as tpl
from .autotune import Candidate
from .template import index_strides, triton_cdiv, warmed

_CONV_TMA = '''\
import triton
import triton.language as tl
from compile_backend.kernels.tile_order import grouped_tile
{helpers}

@triton.jit
def {name}(
    X_DESC, W_DESC, {ptrs},
    NB, OH, OW, C, OC, pad_h, pad_w,
    {strides},
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # rows = a BLOCK_H x BLOCK_W patch of output pixels of image n, columns = output channels,
    # reduction = (kh, kw, input channel); grouped ordering of the (patch, channel) tiles
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    tiles_h = tl.cdiv(OH, BLOCK_H)
    tiles_w = tl.cdiv(OW, BLOCK_W)
    grid_m = NB * tiles_h * tiles_w
    grid_n = tl.cdiv(OC, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, grid_m, grid_n, GROUP_M)
    tw = pid_m % tiles_w
    th = (pid_m // tiles_w) % tiles_h
    n = pid_m // (tiles_w * tiles_h)
    h0 = th * BLOCK_H
    w0 = tw * BLOCK_W
    n0 = pid_n * BLOCK_N
    c_blocks = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_type})
    for it in range(0, KH * KW * c_blocks):
        tap = it // c_blocks
        c0 = (it % c_blocks) * BLOCK_K
        dh = tap // KW - pad_h
        dw = tap % KW - pad_w
        if STRIDE == 1:
            a = X_DESC.load([n, h0 + dh, w0 + dw, c0]).reshape(BLOCK_M, BLOCK_K)
        else:
            # stride 2 over x viewed [N, H/2, 2, W/2, 2C]: input row 2*oh + dh is row pair
            # oh + floor(dh / 2), parity dh mod 2 (floor division spelled for dh >= -4: Triton's
            # // truncates); column likewise, its parity selecting a half of the 2C channels
            fh = (dh + 4) // 2 - 2
            fw = (dw + 4) // 2 - 2
            a = X_DESC.load([n, h0 + fh, dh - 2 * fh, w0 + fw, (dw - 2 * fw) * C + c0]).reshape(BLOCK_M, BLOCK_K)
        b = tl.trans(W_DESC.load([n0, tap, c0]).reshape(BLOCK_N, BLOCK_K))
        acc = tl.dot({dot_a}, {dot_b}, acc{dot_args})
    r = tl.arange(0, BLOCK_M)
    oh = h0 + r // BLOCK_W
    ow = w0 + r % BLOCK_W
    nb = n.to(tl.int64)
    rn = n0 + tl.arange(0, BLOCK_N)
    oc_out = rn
    row_ok = (oh < OH) & (ow < OW)
    col_ok = rn < OC
    mask = row_ok[:, None] & col_ok[None, :]
{epilogue}
'''


def render_conv_tma(spec: tpl.EpilogueSpec, dot: Dict[str, str]) -> Tuple[str, str]:
    """Source of the TMA convolution kernel with ``spec``'s epilogue and ``dot``'s main-loop dot
    (``gemm_template.dot_fields`` / ``qgemm.scaled_dot_fields``). A spec made with
    ``epilogue_spec(..., broadcast=True, column_dim=1)`` loads its broadcast operands as such."""

    ptrs, strides = tpl.io_params(spec, 4)
    body = "\n".join(tpl.epilogue_body(spec, tpl.conv_offset, "mask", " " * 4, tpl.conv_broadcast_load))
    return tpl.finish(_CONV_TMA, "conv_tma", helpers=spec.helpers, ptrs=ptrs, strides=strides, epilogue=body, **dot)


@dataclasses.dataclass(frozen=True)
class ConvTmaConfig:
    block_h: int   # output rows of a patch
    block_w: int   # output columns of a patch (BLOCK_H * BLOCK_W rows of the GEMM)
    block_n: int   # output channels
    block_k: int   # input channels a step
    num_warps: int
    num_stages: int
    group_m: int = 8

    @property
    def name(self) -> str:
        return (f"{self.block_h}x{self.block_w}x{self.block_n}x{self.block_k} w{self.num_warps} "
                f"s{self.num_stages} g{self.group_m} tma")

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


#: (BLOCK_H, BLOCK_W, BLOCK_N, warps, stages), tried in this order at "fast" (not yet timed on a
#: GPU: 128-pixel patches as the GEMM templates' best 128-row tiles, 64-pixel ones for the 7x7
#: and 14x14 maps of ResNet's last stages, where a 8x16 patch wastes half its rows). Row patches
#: (BLOCK_H 1) for wide maps: their input tile folds only unit dimensions into the GEMM's rows,
#: so Triton keeps it in shared memory for the tensor cores (wgmma's SS form, sm_90 TTGIR:
#: ``memdesc_reshape``), where a 2-D patch's tile goes through registers (``local_load`` +
#: ``reshape``: the RS form); which is faster is the tuner's to say
_FAST = ((8, 16, 128, 8, 4), (1, 64, 128, 4, 4), (1, 128, 128, 8, 4), (8, 8, 128, 4, 4), (16, 8, 128, 8, 4),
         (8, 16, 64, 4, 4), (8, 8, 64, 4, 3))
_MAX = tuple((bh, bw, bn, w, s) for bh, bw in ((1, 64), (1, 128), (8, 8), (8, 16), (16, 8), (16, 16))
             for bn in (64, 128, 256) for w in (4, 8) for s in (3, 4, 5)
             if bh * bw * bn <= 128 * 256 and not (bh * bw * bn >= 128 * 128 and w == 4))


def conv_tma_configs(c: int, oh: int, ow: int, dtype: torch.dtype, level: str, stride: int = 1) -> List[ConvTmaConfig]:
    """Configs for ``c`` input channels of ``dtype`` over an ``oh`` x ``ow`` output map: BLOCK_K
    128 bytes of channels where they divide evenly, else 64 bytes with the tail read as zeros
    (stride 2: the widest of 128, 64, 32, 16 bytes that divides them: a tile must not reach the
    other parity's channels); patches no larger than twice the map, row patches over 3/4 of a
    row at least ("fast": up to seven, "max": every combination; "off": the first)."""
    size = torch.empty((), dtype=dtype).element_size()
    widths = (128, 64, 32, 16) if stride == 2 else (128,)
    bk = next((b // size for b in widths if c % (b // size) == 0), 64 // size)
    pool = _MAX if level == "max" else _FAST
    out = []
    for bh, bw, bn, warps, stages in pool:
        if bh > max(8, 2 * oh) or bw > max(8, 2 * ow) or (bh == 1 and 4 * ow < 3 * bw):
            continue  # a patch past twice the map, or a row patch over less than 3/4 of a row
        cfg = ConvTmaConfig(bh, bw, bn, bk, warps, stages)
        if cfg not in out:
            out.append(cfg)
    return out[:1] if level == "off" else out


def conv_tma_supported(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether the TMA kernel computes this convolution: stride 1 (a kernel larger than 1x1: a
    1x1 one is a GEMM over its rows) or stride 2 over an even map (any kernel), dilation 1, one
    group, 4-D channels-last input and weight of one 8- or 16-bit dtype, channels a multiple of
    16 bytes (TMA's stride alignment), padding at most 4."""
    if tuple(dilation) != (1, 1) or groups != 1 or x.dim() != 4 or w.dim() != 4:
        return False
    if tuple(stride) == (1, 1):
        if w.shape[2] * w.shape[3] == 1:
            return False
    elif tuple(stride) != (2, 2) or x.shape[2] % 2 or x.shape[3] % 2:
        return False
    if x.dtype != w.dtype or x.element_size() not in (1, 2) or not all(0 <= p <= 4 for p in padding):
        return False
    cl = torch.channels_last
    if not (x.is_contiguous(memory_format=cl) and w.is_contiguous(memory_format=cl)):
        return False
    return x.shape[1] * x.element_size() % 16 == 0


def configs_for(x, w, out_shape, stride, padding, dilation, groups: int, ctx) -> List[ConvTmaConfig]:
    """The configs to time for a convolution group on ``ctx``'s device (``x`` / ``w``: the
    operands' meta values): none off Hopper, without Triton's descriptors, or for a convolution
    the kernel does not take (:func:`conv_tma_supported`)."""
    from .gemm_tma import tma_available

    if ctx.device.type != "cuda" or not tma_available(ctx.device):
        return []
    if not conv_tma_supported(x, w, stride, padding, dilation, groups):
        return []
    level = {"off": "off", "max": "max"}.get(ctx.tuning, "fast")
    configs = conv_tma_configs(x.shape[1], out_shape[2], out_shape[3], x.dtype, level, stride[0])
    if x.dtype == torch.float8_e4m3fn and not ctx.fp8_fast_accumulation:
        # FP8 summed in fp32 gets none: Triton 3.6 splits a dot whose A operand comes through
        # registers (a 2-D patch's tile) and drops its max_num_imprecise_acc (sm_90 TTGIR:
        # 2^30; H100 session 22: 2 fp16 ulps off at 4% of outputs), and the row patches, whose
        # TTGIR keeps the promotion, were still up to 4 ulps off at 0.9% of outputs (H100,
        # session 23). The pointer template promotes per K tile; fp8_accumulation="fast" asks
        # for the tensor cores' own accumulator, which every TMA config then uses.
        return []
    return configs


def tma_conv_candidate(group, plan: tpl.EpiloguePlan, x_node, w_node, stride, padding, source: Tuple[str, str],
                       probe, cfg: ConvTmaConfig, config: Dict[str, object]) -> Candidate:
    """A convolution group's candidate running the TMA kernel on ``cfg``: its epilogue's loads
    in the output's space, outputs allocated as the template's (``out=`` taken); ``config`` adds
    the fields of the caller's kind (``{"scaled": True}``)."""
    def compile_():
        runner = ConvTmaRunner(tpl.load_kernel(*source), cfg, padding, stride[0])

        def run(*inputs, out=None):
            env = tpl.bind_group(plan, group, inputs)
            loads = [tpl.to_anchor_space(env[lp.source], lp, plan.anchor_shape) for lp in plan.loads]
            outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, env[x_node].device, out)
            runner(env[x_node], env[w_node], loads, views)
            return tpl.group_outputs(plan, env, outs)

        return warmed(run, probe)

    return Candidate(f"triton conv {cfg.name}", {"impl": "triton", "conv_tma": True, **config, **cfg.as_dict()},
                     compile_, "triton")


class ConvTmaRunner:
    """Launches the TMA convolution kernel: ``x`` [N, C, H, W] and ``w`` [OC, C, KH, KW]
    channels-last, ``loads`` / ``outs`` viewed in (n, c, h, w) space."""

    def __init__(self, kernel, config: ConvTmaConfig, padding: Sequence[int], stride: int = 1):
        self.kernel, self.config, self.padding, self.stride = kernel, config, tuple(padding), stride

    def __call__(self, x: torch.Tensor, w: torch.Tensor, loads: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        stride = (self.stride,) * 2
        if not conv_tma_supported(x, w, stride, self.padding, (1, 1), 1) or x.shape[1] % self.config.block_k and \
                self.stride == 2:
            raise RuntimeError("the TMA convolution needs channels-last 8/16-bit x and w of 16-byte channel rows")
        cfg = self.config
        nb, c, ih, iw = x.shape
        oc, _, kh, kw = w.shape
        oh, ow = outs[0].shape[2], outs[0].shape[3]
        # a TMA descriptor's base address is 16-byte aligned: a view at another offset (a slice of a
        # graph input) is copied rather than refused at launch, where no other candidate is left
        x, w = (t if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.channels_last) for t in (x, w))
        xv = x.permute(0, 2, 3, 1)  # NHWC, contiguous
        if self.stride == 1:
            box = [1, cfg.block_h, cfg.block_w, cfg.block_k]
        else:  # [N, H/2, 2, W/2, 2C]: a stride-2 patch's pixels are one box of a parity
            xv, box = xv.reshape(nb, ih // 2, 2, iw // 2, 2 * c), [1, cfg.block_h, 1, cfg.block_w, cfg.block_k]
        wv = w.permute(0, 2, 3, 1).reshape(oc, kh * kw, c)  # a view of the channels-last weight
        x_desc = TensorDescriptor(xv, list(xv.shape), list(xv.stride()), box)
        w_desc = TensorDescriptor(wv, list(wv.shape), list(wv.stride()), [cfg.block_n, 1, cfg.block_k])
        io = list(loads) + list(outs)
        tiles = nb * triton_cdiv(oh, cfg.block_h) * triton_cdiv(ow, cfg.block_w) * triton_cdiv(oc, cfg.block_n)
        self.kernel[(tiles,)](
            x_desc, w_desc, *io, nb, oh, ow, c, oc, *self.padding, *[s for t in io for s in index_strides(t)],
            KH=kh, KW=kw, STRIDE=self.stride, BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


__all__ = ["ConvTmaConfig", "ConvTmaRunner", "configs_for", "conv_tma_configs", "conv_tma_supported", "render_conv_tma",
           "tma_conv_candidate"]
