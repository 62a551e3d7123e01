"""Scaled (INT8 / FP8) 2-D convolution with a fused epilogue: the group builder for
``compile_backend.scaled_conv``.

A ``conv`` group anchored on ``scaled_conv(xq, x_scale, wq, w_scale, bias, stride, padding,
dilation, groups, out_dtype)`` followed by its epilogue chain becomes one kernel computing
``chain((conv(xq, wq) * (x_scale * w_scale[c]) + bias[c]) -> out_dtype)``. Candidates:

* the implicit-GEMM Triton template (:func:`gemm_template.render_conv`, the float convolution's
  main loop) with int8 operands accumulating in int32 or fp8 operands in fp32, and the epilogue
  of :func:`qgemm.scale_lines` (x_scale per tensor, w_scale per output channel or per tensor);
* on CUDA, timed beside it: cuDNN on the operands converted to fp32 (exact: int8 and e4m3
  values fit TF32's mantissa, products accumulate in fp32; there is no int8 cuDNN convolution
  in torch) followed by the scales, bias and chain as ATen ops. It reads 4x the bytes, so it
  mostly wins where the template is weak (depthwise and other thin-group convolutions).

Stride, padding, dilation and groups are supported; 1-D/3-D convolutions and per-row
activation scales go to ATen (``quant_ref``), which is also the last resort. Numerics equal
``quant_ref.scaled_conv`` up to fp32 rounding of the epilogue and, for fp8 (and the cuDNN
candidate), the order of the fp32 accumulation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import gemm_template as tpl
from .autotune import Candidate, TuningKey
from .base import Kernel, KernelContext, KernelGroup, Unsupported, meta_of
from .conv import ConvRunner, conv_heuristic, reduction_block
from .conv_tma import ConvTmaConfig, configs_for, render_conv_tma, tma_conv_candidate
from .gemm_config import (GemmConfig, candidate_configs, heuristic_config, short_k_8bit_configs, short_k_configs,
                          short_k_steps)
from .gemm_tma import tma_available
from .gemm_runner import GemmRunner
from .qgemm import (check_scaled_dtypes, eight_bit_configs, scale_lines, scaled_anchor, scaled_arg,
                    scaled_dot_fields, fp8_accumulation_of)
from .template import (Probe, TemplateTuning, choose_kernel_of, device_limits, dtype_name,
                       float_reference_candidate, group_dtypes, group_shapes, group_strides, seeded, warmed)


def build_scaled_conv(group: KernelGroup, ctx: KernelContext) -> Kernel:
    """Kernel for a ``conv`` group anchored on ``compile_backend.scaled_conv``."""
    return choose_kernel_of(group, ctx, scaled_conv_candidates(group, ctx))


@dataclasses.dataclass(frozen=True)
class ScaledConvProblem:
    anchor: fx.Node
    xq: fx.Node
    wq: fx.Node
    x_scale: fx.Node
    w_scale: fx.Node
    bias: Optional[fx.Node]
    loads: Tuple[tpl.LoadPlan, ...]  # x_scale, w_scale[, bias] in the output's (n, c, h, w) space
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    out_dtype: torch.dtype
    dtype: torch.dtype  # of the operands
    out_val: torch.Tensor
    oc: int
    cg: int
    kh: int
    kw: int

    @property
    def int_acc(self) -> bool:
        return self.dtype == torch.int8

    @property
    def m(self) -> int:
        nb, _, oh, ow = self.out_val.shape
        return nb * oh * ow


def scaled_conv_problem(group: KernelGroup, device: torch.device) -> ScaledConvProblem:
    anchor = scaled_anchor(group, "scaled_conv")
    xq, x_scale, wq, w_scale, bias = (scaled_arg(anchor, a) for a in ("xq", "x_scale", "wq", "w_scale", "bias"))
    geometry = [scaled_arg(anchor, a) for a in ("stride", "padding", "dilation")]
    groups, out_dtype = scaled_arg(anchor, "groups"), scaled_arg(anchor, "out_dtype")
    xv, wv, xs, ws, out = meta_of(xq), meta_of(wq), meta_of(x_scale), meta_of(w_scale), meta_of(anchor)
    check_scaled_dtypes(xv, wv, out_dtype, device)
    if xv.dim() != 4 or wv.dim() != 4:
        raise Unsupported(f"{xv.dim() - 2}-D scaled convolution; the template is 2-D")
    oc = wv.shape[0]
    if xs.numel() != 1 or ws.numel() not in (1, oc) or ws.dim() > 1:
        raise Unsupported(f"scales {tuple(xs.shape)} / {tuple(ws.shape)}: per tensor x, per output channel w")
    if min(out.shape) == 0 or min(wv.shape) == 0:
        raise Unsupported("empty convolution")
    if max(xv.numel(), out.numel(), wv.numel()) >= 2**31:
        raise Unsupported("tensor too large for the template's 32-bit indexing")
    shape, channels = tuple(out.shape), (1, oc, 1, 1)
    loads = [tpl.LoadPlan(x_scale, shape), tpl.LoadPlan(w_scale, shape, pre_view=channels if ws.numel() > 1 else None)]
    if bias is not None:
        loads.append(tpl.LoadPlan(bias, shape, pre_view=channels))
    stride, padding, dilation = (_pair(v) for v in geometry)
    return ScaledConvProblem(anchor, xq, wq, x_scale, w_scale, bias, tuple(loads), stride, padding, dilation,
                             int(groups), out_dtype, xv.dtype, out, *wv.shape)


def scaled_conv_candidates(group: KernelGroup, ctx: KernelContext, *, vendor: Optional[bool] = None,
                           configs: Optional[Sequence[GemmConfig]] = None,
                           gemm_configs: Optional[Sequence[GemmConfig]] = None,
                           tma_configs: Optional[Sequence[ConvTmaConfig]] = None) -> TemplateTuning:
    """Candidates for a scaled_conv group, template heuristic first; ``vendor`` (default: on
    CUDA) adds cuDNN on fp32-converted operands + ATen epilogue; ``configs`` replaces the
    template configs (tests); a pointwise convolution (:func:`is_pointwise`) also gets the
    scaled GEMM template's configs over its channels-last rows (``gemm_configs`` replaces them);
    one the TMA convolution computes (``conv_tma``: stride 1 or 2), on Hopper, its configs
    (``tma_configs`` replaces them, and adds them anywhere: the interpreter runs them too)."""
    p = scaled_conv_problem(group, ctx.device)
    plan = tpl.plan_epilogue(group, p.anchor, "acc_v", p.loads)
    dot = scaled_dot_fields(p.dtype, ctx.device.type != "cuda", fp8_accumulation_of(ctx))
    # broadcast operands (x_scale, w_scale, bias) load as rows and scalars: the channels are the
    # columns of the (n, c, h, w) space, and of the rows GEMM's (1, n*h*w, c) view of it
    spec = tpl.epilogue_spec(plan, scale_lines(p.int_acc, p.bias is not None, p.out_dtype), p.int_acc,
                             broadcast=True, column_dim=1)
    source = tpl.render_conv(spec, dot)
    probe = Probe(group, ctx.device)
    if configs is None:
        configs = _template_configs(p, ctx)
    candidates = [_triton_candidate(group, p, plan, source, probe, c) for c in configs]
    hashed = source[0]
    if is_pointwise(p):
        if gemm_configs is None:
            gemm_configs = _gemm_configs(p, ctx)
        gemm_sources = (tpl.render_gemm(spec, dot), tpl.render_gemm_tma(spec, dot))
        sms = device_limits(ctx.device)[0]
        candidates += [_rows_gemm_candidate(group, p, plan, gemm_sources, probe, c, sms) for c in gemm_configs]
        hashed += gemm_sources[0][0] + gemm_sources[1][0]
    if tma_configs is None:
        tma_configs = configs_for(meta_of(p.xq), meta_of(p.wq), p.out_val.shape, p.stride, p.padding, p.dilation,
                                  p.groups, ctx)
    if tma_configs:
        tma_source = render_conv_tma(spec, dot)
        candidates += [tma_conv_candidate(group, plan, p.xq, p.wq, p.stride, p.padding, tma_source, probe, c, {"scaled": True})
                       for c in tma_configs]
        hashed += tma_source[0]
    if (ctx.device.type == "cuda") if vendor is None else vendor:
        candidates.append(_cudnn_candidate(group, p, probe))
    if ctx.device.type == "cuda":  # first, so a tuning budget never skips it
        candidates.insert(0, float_conv_candidate(p, ctx.device))
    key = TuningKey(kind="conv", template=tpl.source_hash(hashed), shapes=group_shapes(group),
                    strides=group_strides(group), dtypes=group_dtypes(group),
                    extra=f"scaled_conv s={p.stride} p={p.padding} d={p.dilation} g={p.groups} "
                          f"{'|'.join(plan.chain_ops)}")
    return seeded(TemplateTuning("conv", key, candidates, probe.make, {"triton": source[0]}, plan.out_layouts,
                                 frozenset(c.name for c in candidates if c.impl == "triton")), group)


def float_conv_candidate(p: ScaledConvProblem, device: torch.device) -> Candidate:
    """The float convolution (cuDNN, channels-last as the engine's float convs) the layer
    replaces, in the output dtype: the report compares the chosen kernel with it, and
    ``quant_layers="faster"`` decides by it. Without its bias: a float engine adds the bias in
    the convolution's fused epilogue, where ``F.conv2d`` adds it in a second pass over the output
    (ResNet-50's stage-1 convolutions, H100 session 15: 103 us against the FP16 engine's 42-52 us
    for the same layers, so FP8 convolutions of 84-107 us passed for as fast as float and the FP8
    engine ran 1.27x slower than the FP16 one)."""
    xshape = tuple(meta_of(p.xq).shape)

    def operands():
        cl = torch.channels_last
        x = torch.randn(xshape, dtype=p.out_dtype, device=device).to(memory_format=cl)
        w = torch.randn(p.oc, p.cg, p.kh, p.kw, dtype=p.out_dtype, device=device).to(memory_format=cl)
        return x, w, None, p.stride, p.padding, p.dilation, p.groups

    return float_reference_candidate(f"float conv {dtype_name(p.out_dtype)}", operands, torch.nn.functional.conv2d)


def _template_configs(p: ScaledConvProblem, ctx: KernelContext) -> List[GemmConfig]:
    ocg = p.oc // p.groups
    if ctx.device.type != "cuda":
        return eight_bit_configs([conv_heuristic(p.m, ocg, p.cg, p.dtype, True)])
    level = {"max": "max"}.get(ctx.tuning, "fast")
    first = conv_heuristic(p.m, ocg, p.cg, p.dtype, False, *device_limits(ctx.device))
    # as the float template: no split-K, tiles up to 128x128 (larger ones spill), block_k no
    # wider than the channels, or the taps x channels over few channels (conv.reduction_block)
    pool = [dataclasses.replace(c, block_k=reduction_block(c.block_k, p.cg, p.kh * p.kw, 32))
            for c in candidate_configs(p.m, ocg, p.cg * p.kh * p.kw, 1, p.dtype, level, *device_limits(ctx.device))
            if c.split_k == 1 and c.block_m * c.block_n <= 128 * 128]
    configs = eight_bit_configs([first] + pool)
    return configs if ctx.tuning != "off" else configs[:1]


def is_pointwise(p: ScaledConvProblem) -> bool:
    """A 1x1 convolution of stride 1, no padding, one group: on channels-last tensors the GEMM
    ``[N*H*W, C] @ [C, OC]`` of its rows, nothing to gather."""
    return (p.kh, p.kw, p.stride, p.padding, p.groups) == (1, 1, (1, 1), (0, 0), 1)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor in the output's (n, c, h, w) space as the GEMM template's (1, N*H*W, C) rows: a
    view for channels-last data and for loads broadcast over n, h, w (RuntimeError otherwise)."""
    return t.permute(0, 2, 3, 1).view(1, -1, t.shape[1])


def _gemm_configs(p: ScaledConvProblem, ctx: KernelContext) -> List[GemmConfig]:
    if ctx.device.type != "cuda":
        return eight_bit_configs([heuristic_config(p.m, p.oc, p.cg, 1, p.dtype, interpret=True)])
    level = {"off": "off", "max": "max"}.get(ctx.tuning, "fast")
    sms, smem = device_limits(ctx.device)
    configs = [c for c in eight_bit_configs(candidate_configs(p.m, p.oc, p.cg, 1, p.dtype, level, sms, smem))
               if c.split_k == 1]
    if short_k_steps(p.cg, p.dtype) <= 2:
        # few channels in (ResNet-50's expanding 1x1 layers, 64-256): the big tiles ranked first
        # ran 2-3x slower than cuDNN fp16 (H100, session 18: 64 -> 256 at 56x56 62.3 us against
        # 27.3), a chain a program with one program an SM; after the heuristic, the tiles timed
        # best there (persistent TMA ones on Hopper: rows of a channels-last input are K-major,
        # and a layout they cannot load runs the tile's pointer kernel), then register-light ones
        tma = tma_available(ctx.device)
        best = eight_bit_configs(short_k_8bit_configs(p.cg, tma))
        light = eight_bit_configs(short_k_configs(p.m, p.oc, p.cg, p.dtype, sms))
        configs = list(dict.fromkeys(configs[:1] + best + light + configs[1:]))
        # at "fast" the heuristic, those tiles and one light one: each config is a compile per
        # layer shape (the layer-speed probe tunes them too); cold compiles should stay within
        # 1.5x FP16's
        return configs if level == "max" else configs[:2 + len(best)]
    # at "fast" the heuristic and the three best ranked (as above)
    return configs if level == "max" else configs[:4]


def _rows_gemm_candidate(group, p: ScaledConvProblem, plan, sources, probe, cfg: GemmConfig, sms: int) -> Candidate:
    """The scaled GEMM template over a pointwise convolution's rows (:func:`as_rows`), its
    epilogue addressed in the same rows. Why: the convolution template's 1x1 FP8 kernels took
    12.9-74.9 us at ResNet-50 b32's shapes where cuDNN fp16 took 11.2-28.2 (H100, session 16),
    while the GEMM template reaches 0.56x fp16 on the MLP. A layout the rows cannot view (not
    channels-last) fails this candidate on its probe run, and the tuner skips it."""
    def compile_():
        main, tma = sources  # the grouped-M kernel, the persistent TMA one (a TMA config's)
        runner = GemmRunner(tpl.load_kernel(*main), cfg, p.int_acc, tpl.load_kernel(*tma) if cfg.tma else None, sms)

        def run(*inputs, out=None):
            env = tpl.bind_group(plan, group, inputs)
            xq, wq = env[p.xq], env[p.wq]
            loads = [as_rows(tpl.to_anchor_space(env[lp.source], lp, plan.anchor_shape)) for lp in plan.loads]
            outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, xq.device, out)
            runner(as_rows(xq), wq.reshape(p.oc, p.cg).t().unsqueeze(0), loads, [as_rows(v) for v in views])
            return tpl.group_outputs(plan, env, outs)

        return warmed(run, probe)

    return Candidate(f"triton gemm rows {cfg.name}", {"impl": "triton", "scaled": True, "rows_gemm": True,
                                                      **cfg.as_dict()}, compile_, "triton")


def _triton_candidate(group, p: ScaledConvProblem, plan, source, probe, cfg: GemmConfig) -> Candidate:
    def compile_():
        runner = ConvRunner(tpl.load_kernel(*source), cfg, p.stride, p.padding, p.dilation, p.groups)

        def run(*inputs, out=None):
            env = tpl.bind_group(plan, group, inputs)
            loads = [tpl.to_anchor_space(env[lp.source], lp, plan.anchor_shape) for lp in plan.loads]
            outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, env[p.xq].device, out)
            runner(env[p.xq], env[p.wq], loads, views)
            return tpl.group_outputs(plan, env, outs)

        return warmed(run, probe)

    return Candidate(f"triton {cfg.name}", {"impl": "triton", "scaled": True, **cfg.as_dict()}, compile_, "triton")


def _cudnn_candidate(group: KernelGroup, p: ScaledConvProblem, probe) -> Candidate:
    """cuDNN on fp32 copies of the quantized operands, then the group's other ops through ATen
    (the anchor's value computed as quant_ref does from the fp32 accumulator)."""
    nodes = [n for n in group.gm.graph.nodes if n.op == "call_function"]
    channels = (1, -1, 1, 1)

    def anchor_value(env) -> torch.Tensor:
        acc = torch.ops.aten.convolution(env[p.xq].float(), env[p.wq].float(), None, list(p.stride), list(p.padding),
                                         list(p.dilation), False, [0, 0], p.groups)
        ws = env[p.w_scale].float()
        y = acc * (env[p.x_scale].float() * (ws.reshape(channels) if ws.dim() else ws))
        if p.bias is not None:
            y = y + env[p.bias].float().reshape(channels)
        return y.to(p.out_dtype)

    def compile_():
        def run(*inputs):
            env = dict(zip(group.placeholders, inputs))
            for n in nodes:
                if n is p.anchor:
                    env[n] = anchor_value(env)
                else:
                    env[n] = n.target(*fx.node.map_arg(n.args, env.__getitem__),
                                      **fx.node.map_arg(n.kwargs, env.__getitem__))
            return tuple(env[o] if isinstance(o, fx.Node) else o for o in group.outputs)

        return warmed(run, probe)

    return Candidate("cudnn (fp32 operands) + aten epilogue", {"impl": "cudnn", "epilogue": "aten", "scaled": True},
                     compile_, "cudnn")


def _pair(v: Any) -> Tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


__all__ = ["build_scaled_conv", "scaled_conv_candidates", "scaled_conv_problem", "ScaledConvProblem", "float_conv_candidate"]
