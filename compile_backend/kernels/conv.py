"""2-D convolution as an implicit GEMM with a fused epilogue: launcher, reference, builder.

Layers:

* the @triton.jit kernel: :func:`gemm_template.render_conv` (rows = output pixels, columns =
  output channels of one group, reduction over (kh, kw, input channel) with the channel
  innermost, so channels-last activations are read along contiguous memory);
* :func:`conv2d` (direct launcher) and :class:`ConvRunner`;
* :func:`conv2d_reference`: ``torch.nn.functional.conv2d`` in fp64;
* :func:`build_conv`: a ``conv`` KernelGroup (aten.convolution + epilogue chain: folded-BN bias
  add, ReLU, residual add, ...) -> :class:`Kernel`, tuned among template configs and cuDNN
  followed by the same epilogue as one Triton kernel.

Stride, padding, dilation and groups are supported. On CUDA the untuned choice is cuDNN + the
fused epilogue kernel (it won most ResNet-50 shapes, see benchmarks/notes/gemm.md); tuning
times the template configs against it. Over few channels a group (an RGB stem, a depthwise
convolution: :func:`flat_k`) the reduction steps over the flattened taps x channels rather than
one tap at a time over a mostly masked channel block (speed not yet measured on a GPU). Transposed and non-2-D convolutions
go to ATen.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import torch

import torch.fx as fx

from . import gemm_template as tpl
from .autotune import Candidate, TuningKey
from .base import Kernel, KernelContext, KernelGroup, Unsupported, allows_tf32, meta_of
from .gemm_config import GemmConfig, candidate_configs, heuristic_config
from .conv_tma import configs_for, render_conv_tma, tma_conv_candidate
from .gemm_runner import epilogue_only
from .template import (FLOAT_DTYPES, Probe, TemplateTuning, aten_epilogue_candidate, anchor_only, choose_kernel_of,
                       device_limits, dtype_name, fit_pow2, group_dtypes, group_shapes, group_strides, index_strides,
                       triton_cdiv, warmed)


def flat_k(channels_per_group: int, block_k: int) -> bool:
    """Whether the convolution template steps over the flattened (kh, kw, channel) reduction:
    when a tap's channels would fill at most half of a K block (ResNet-50's RGB stem: 3 of 16,
    49 steps of mostly masked dot products where flat there are 10; a depthwise convolution's
    single channel: 9 steps where flat there is one)."""
    return 2 * channels_per_group <= block_k


class ConvRunner:
    """Launches a generated conv kernel; ``loads``/``outs`` are viewed in (n, c, h, w) space."""

    def __init__(self, kernel, config: GemmConfig, stride, padding, dilation, groups: int):
        if config.split_k != 1:
            raise ValueError("the convolution template has no split-K")
        self.kernel, self.config, self.groups = kernel, config, groups
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, loads: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        cfg = self.config
        nb, c, ih, iw = x.shape
        oc, cg, kh, kw = w.shape
        oh, ow = outs[0].shape[2], outs[0].shape[3]
        ocg = oc // self.groups
        m = nb * oh * ow
        io = list(loads) + list(outs)
        grid = (triton_cdiv(m, cfg.block_m) * triton_cdiv(ocg, cfg.block_n), self.groups)
        self.kernel[grid](
            x, w, *io, m, ih, iw, oh, ow, cg, ocg, *index_strides(x), *index_strides(w),
            *self.stride, *self.padding, *self.dilation, *[s for t in io for s in index_strides(t)],
            KH=kh, KW=kw, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            FLAT_K=cg if flat_k(cg, cfg.block_k) else 0,
            GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def conv_output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=(1, 1), padding=(0, 0),
           dilation=(1, 1), groups: int = 1, *, relu: bool = False, residual: Optional[torch.Tensor] = None,
           config: Optional[GemmConfig] = None, precision: str = "fp32") -> torch.Tensor:
    """``relu(conv2d(x, w) + bias) + residual`` in one kernel; output in x's memory format.

    The epilogue runs in fp32 and rounds once (ReLU before the residual add when both are set).
    """
    if x.dim() != 4 or w.dim() != 4 or x.dtype not in FLOAT_DTYPES or w.dtype != x.dtype:
        raise ValueError(f"conv2d takes 4-D fp32/fp16/bf16 x and w, got {tuple(x.shape)} {x.dtype}, {tuple(w.shape)} {w.dtype}")
    if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise ValueError(f"conv2d: channels {x.shape[1]} / weight {tuple(w.shape)} do not fit groups={groups}")
    oh = conv_output_size(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    shape = (x.shape[0], w.shape[0], oh, ow)
    fmt = torch.channels_last if x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format
    out = torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
    loads, lines = [], ["acc_v = acc"]
    if bias is not None:
        loads.append(bias.view(1, -1, 1, 1).expand(shape))
        lines.append("acc_v = acc_v + r0.to(tl.float32)")
    if relu:
        lines.append("acc_v = tl.maximum(acc_v, 0.0)")
    if residual is not None:
        loads.append(residual.expand(shape))
        lines.append(f"acc_v = acc_v + r{len(loads) - 1}.to(tl.float32)")
    spec = tpl.EpilogueSpec(loads=tuple(f"r{i}" for i in range(len(loads))), lines=tuple(lines), stores=("acc_v",))
    interpret = x.device.type == "cpu"
    source, name = tpl.render_conv(spec, tpl.dot_fields(dtype_name(x.dtype), allows_tf32(precision), interpret, False))
    cfg = config or conv_heuristic(shape[0] * oh * ow, w.shape[0] // groups, w.shape[1], x.dtype, interpret)
    ConvRunner(tpl.load_kernel(source, name), cfg, stride, padding, dilation, groups)(x, w, loads, [out])
    return out


def conv2d_reference(x, w, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, *,
                     relu=False, residual=None) -> torch.Tensor:
    out = torch.nn.functional.conv2d(x.double(), w.double(), None if bias is None else bias.double(),
                                     stride, padding, dilation, groups)
    if relu:
        out = out.relu()
    if residual is not None:
        out = out + residual.double()
    return out.to(x.dtype)


def conv_heuristic(m: int, ocg: int, cg: int, dtype: torch.dtype, interpret: bool,
                   sm_count: int = 132, smem_bytes: int = 227 * 1024) -> GemmConfig:
    """The template config used without tuning (on CUDA the untuned choice is cuDNN)."""
    if interpret:
        return GemmConfig(fit_pow2(m, 16, 64), fit_pow2(ocg, 16, 64), fit_pow2(cg, 16, 64), 8, 1, 4, 1)
    cfg = heuristic_config(m, ocg, cg, 1, dtype, sm_count=sm_count, smem_bytes=smem_bytes)
    if cfg.block_m * cfg.block_n > 128 * 128:
        cfg = dataclasses.replace(cfg, block_m=128, block_n=min(cfg.block_n, 128), num_warps=8, num_stages=4)
    return _clamp_k(cfg, cg)


def _clamp_k(cfg: GemmConfig, cg: int, taps: int = 1) -> GemmConfig:
    return dataclasses.replace(cfg, block_k=reduction_block(cfg.block_k, cg, taps, 16))


def reduction_block(block_k: int, cg: int, taps: int, lo: int) -> int:
    """A config's K block for a convolution over ``cg`` channels a group and ``taps`` = kh * kw:
    the reduction walks one tap at a time, so a block wider than the channels is waste; over
    few channels (:func:`flat_k`) it walks the flattened taps x channels, up to 64 wide (the
    per-element tap indices of a 128-wide block spill: sm_90, Triton 3.6). ``lo``: the dot's
    narrowest K (16 for 16-bit operands, 32 for 8-bit)."""
    if flat_k(cg, lo):
        return min(block_k, fit_pow2(cg * taps, lo, 64))
    return min(block_k, max(lo, fit_pow2(cg, lo, 128)))


# ------------------------------------------------------------------------------- group builder
def build_conv(group: KernelGroup, ctx: KernelContext) -> Kernel:
    """Kernel for a ``conv`` group: aten.convolution followed by its epilogue chain."""
    return choose_kernel_of(group, ctx, conv_candidates(group, ctx))


def conv_candidates(group: KernelGroup, ctx: KernelContext, *, vendor: Optional[bool] = None,
                    configs: Optional[Sequence[GemmConfig]] = None,
                    tma_configs: Optional[Sequence[Any]] = None) -> TemplateTuning:
    """Candidates for a conv group, heuristic first; ``vendor`` (default: on CUDA) adds cuDNN +
    a fused epilogue kernel; ``configs`` replaces the template configs (tests); on Hopper a
    convolution the TMA kernel takes (stride 1 or 2) gets its configs too (``conv_tma``; ``tma_configs``
    replaces them, and adds them anywhere: the interpreter runs them)."""
    problem = conv_problem(group)
    anchor_loads = []
    if problem.bias is not None:
        anchor_loads.append(tpl.LoadPlan(problem.bias, tuple(problem.out_val.shape), pre_view=(1, problem.oc, 1, 1)))
    plan = tpl.plan_epilogue(group, problem.anchor, "acc_v", anchor_loads)
    build = _ConvBuild(group, problem, plan, _render_sources(problem, plan, ctx), Probe(group, ctx.device))
    fused = [c for c in (_cudnn_fused_candidate(group, problem.anchor, build.probe, problem.geometry),
                         _cublas_rows_candidate(group, problem, build.probe)) if c is not None]
    if configs is None:
        configs = _template_configs(problem, ctx)
    candidates: List[Candidate] = [build.triton_candidate(c) for c in configs]
    candidates += [tma_conv_candidate(group, plan, problem.x, problem.w, problem.stride, problem.padding, build.sources.tma,
                                      build.probe, c, {})
                   for c in (tma_configs if tma_configs is not None else
                             configs_for(problem.x_val, meta_of(problem.w), problem.out_val.shape, *problem.geometry, ctx))]
    if ctx.device.type == "cuda" if vendor is None else vendor:
        candidates[0:0] = build.vendor_candidates(fused)
    # template kernels and cuDNN + epilogue kernel write through allocate_outputs, so take out=
    writes_out = frozenset(c.name for c in candidates if c.impl == "triton" or c.name == "cudnn + triton epilogue")
    return TemplateTuning("conv", _tuning_key(build, ctx), candidates, build.probe.make,
                          {"triton": build.sources.main[0], "cudnn": build.sources.vendor[0]},
                          plan.out_layouts, writes_out)


# ------------------------------------------------------------------------------- the problem
@dataclasses.dataclass(frozen=True)
class ConvProblem:
    """A group's anchor convolution: x [nb, c, ih, iw] * w [oc, cg, kh, kw] -> [nb, oc, oh, ow]
    in ``groups`` groups of ``ocg`` output channels; as a GEMM, ``m`` = nb * oh * ow rows."""

    anchor: fx.Node
    x: fx.Node
    w: fx.Node
    bias: Optional[fx.Node]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    x_val: torch.Tensor
    out_val: torch.Tensor
    oc: int
    cg: int
    kh: int
    kw: int

    @property
    def geometry(self):
        return self.stride, self.padding, self.dilation, self.groups

    @property
    def ocg(self) -> int:
        return self.oc // self.groups

    @property
    def m(self) -> int:
        nb, _, oh, ow = self.out_val.shape
        return nb * oh * ow


def conv_problem(group: KernelGroup) -> ConvProblem:
    """The anchor of a conv group, checked for what the template takes (else Unsupported)."""
    anchor = next((n for n in group.gm.graph.nodes if n.name == group.anchor), None)
    if anchor is None or getattr(anchor.target, "overloadpacket", None) is not torch.ops.aten.convolution:
        raise Unsupported(f"anchor {group.anchor!r} is not aten.convolution")
    x_node, w_node, b_node, stride, padding, dilation, transposed, _, groups = anchor.args[:9]
    x_val, w_val, out_val = meta_of(x_node), meta_of(w_node), meta_of(anchor)
    if transposed:
        raise Unsupported("transposed convolution")
    if x_val.dim() != 4:
        raise Unsupported(f"{x_val.dim() - 2}-D convolution; the template is 2-D")
    if x_val.dtype not in FLOAT_DTYPES or w_val.dtype != x_val.dtype:
        raise Unsupported(f"convolution dtypes {x_val.dtype}/{w_val.dtype}")
    if max(x_val.numel(), out_val.numel(), w_val.numel()) >= 2**31:
        raise Unsupported("tensor too large for the template's 32-bit indexing")
    return ConvProblem(anchor, x_node, w_node, b_node, _pair(stride), _pair(padding), _pair(dilation), groups,
                       x_val, out_val, *w_val.shape)


@dataclasses.dataclass(frozen=True)
class ConvSources:
    """The generated kernels of one group: (source, kernel name) each."""

    main: Tuple[str, str]  # the implicit-GEMM template
    tma: Tuple[str, str]  # the same with TMA loads (conv_tma: stride 1 or 2, Hopper)
    vendor: Tuple[str, str]  # the epilogue after cuDNN
    vendor_bias: bool  # the epilogue adds the bias (cuDNN convolves without it)
    vendor_skip: int  # anchor loads the vendor applies itself


def _render_sources(problem: ConvProblem, plan: tpl.EpiloguePlan, ctx: KernelContext) -> ConvSources:
    from . import expr

    has_bias = problem.bias is not None
    dtype = problem.out_val.dtype
    main_lines = [f"acc_v = {expr.round_to('(acc + x0)' if has_bias else 'acc', dtype)}"]
    dot = tpl.dot_fields(dtype_name(problem.x_val.dtype), ctx.allow_tf32, ctx.device.type != "cuda", False)
    # cuDNN + epilogue: cuDNN convolves without the bias and the epilogue kernel adds it (ATen's
    # cuDNN path adds a bias as a kernel of its own: one launch and one pass over the output
    # more, ~3 us a conv at ResNet-50 batch 1); the sum is rounded where eager rounds it
    vendor_bias = has_bias and not anchor_only(plan)
    vendor_lines = [f"acc_v = {expr.round_to('(acc + x0)', dtype)}"] if vendor_bias else ["acc_v = acc"]
    vendor_skip = 0 if vendor_bias else int(has_bias)
    main_spec = tpl.epilogue_spec(plan, main_lines, broadcast=True, column_dim=1)  # the bias as a row
    return ConvSources(main=tpl.render_conv(main_spec, dot), tma=render_conv_tma(main_spec, dot),
                       vendor=tpl.render_gemm(tpl.epilogue_spec(plan, vendor_lines, skip_loads=vendor_skip), dot),
                       vendor_bias=vendor_bias, vendor_skip=vendor_skip)


def _template_configs(problem: ConvProblem, ctx: KernelContext) -> List[GemmConfig]:
    """The template configs to time, heuristic first (one under the interpreter)."""
    p = problem
    if ctx.device.type != "cuda":
        return [conv_heuristic(p.m, p.ocg, p.cg, p.x_val.dtype, True)]
    level = ctx.tuning
    # tiles over 128x128 spill here (the per-row pixel indices cost registers): 5-10x slower
    # on H100 in run 1 (benchmarks/notes/gemm.md)
    pool = [_clamp_k(c, p.cg, p.kh * p.kw)
            for c in candidate_configs(p.m, p.ocg, p.cg * p.kh * p.kw, 1, p.x_val.dtype,
                                       {"off": "fast", "max": "max"}.get(level, "fast"), *device_limits(ctx.device))
            if c.split_k == 1 and c.block_m * c.block_n <= 128 * 128]
    return list(dict.fromkeys(pool))[: 8 if level != "max" else None]


def _tuning_key(build: "_ConvBuild", ctx: KernelContext) -> TuningKey:
    p, group = build.problem, build.group
    return TuningKey(
        kind="conv", template=tpl.source_hash(build.sources.main[0] + build.sources.tma[0] + build.sources.vendor[0]),
        shapes=group_shapes(group), strides=group_strides(group), dtypes=group_dtypes(group),
        extra=f"s={p.stride} p={p.padding} d={p.dilation} g={p.groups} {'|'.join(build.plan.chain_ops)} "
              f"precision={ctx.options.precision}",
    )


# ------------------------------------------------------------------------------- candidates
@dataclasses.dataclass
class _ConvBuild:
    """One group's candidates: what their runners share."""

    group: KernelGroup
    problem: ConvProblem
    plan: tpl.EpiloguePlan
    sources: ConvSources
    probe: Probe

    def loads_of(self, env, skip: int):
        return [tpl.to_anchor_space(env[lp.source], lp, self.plan.anchor_shape) for lp in self.plan.loads[skip:]]

    def triton_candidate(self, cfg: GemmConfig) -> Candidate:
        p, plan = self.problem, self.plan

        def compile_():
            runner = ConvRunner(tpl.load_kernel(*self.sources.main), cfg, p.stride, p.padding, p.dilation, p.groups)

            def run(*inputs, out=None):
                env = tpl.bind_group(plan, self.group, inputs)
                outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, env[p.x].device, out)
                runner(env[p.x], env[p.w], self.loads_of(env, 0), views)
                return tpl.group_outputs(plan, env, outs)

            return warmed(run, self.probe)

        return Candidate(f"triton {cfg.name}", {"impl": "triton", **cfg.as_dict()}, compile_, "triton")

    def vendor_candidates(self, fused: Sequence[Candidate]) -> List[Candidate]:
        """cuDNN first: untuned, it beat the template on 21 of 23 ResNet-50 shapes (run 1); its
        epilogue as one Triton kernel, the vendors' fused kernels (``fused``), or (timed too) the
        group's own ATen ops."""
        vendors = [self.cudnn_candidate()] + list(fused)
        if not anchor_only(self.plan):
            vendors.append(aten_epilogue_candidate("cudnn", self.group, self.probe))
        return vendors

    def cudnn_candidate(self) -> Candidate:
        trivial = anchor_only(self.plan)
        p, plan, group, anchor = self.problem, self.plan, self.group, self.problem.anchor
        vendor_bias, vendor_skip = self.sources.vendor_bias, self.sources.vendor_skip
        nb, _, oh, ow = p.out_val.shape

        def compile_():
            kernel = None if trivial else tpl.load_kernel(*self.sources.vendor)

            def run(*inputs, out=None):  # out= only without ``trivial`` (see writes_out)
                env = tpl.bind_group(plan, group, inputs)
                args = torch.fx.node.map_arg(anchor.args, lambda a: env[a])
                if vendor_bias:
                    args = (*args[:2], None, *args[3:])  # the epilogue adds it
                acc = anchor.target(*args)  # cuDNN
                if trivial:
                    return tpl.group_outputs(plan, env, [acc.reshape(shape) for _, shape, *_ in plan.stores])
                outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, acc.device, out)
                pix = [_pixels_by_channel(t, copy=True) for t in self.loads_of(env, vendor_skip)]
                targets = [_pixels_by_channel(v, copy=False) for v in views]
                dense = [t if t is not None else torch.empty((1, p.m, p.oc), dtype=v.dtype, device=v.device)
                         for t, v in zip(targets, views)]
                epilogue_only(kernel, _pixels_by_channel(acc, copy=True), pix, dense)
                for t, d, v in zip(targets, dense, views):
                    if t is None:  # an output layout that is no (pixel, channel) matrix
                        v.copy_(d.view(nb, oh, ow, p.oc).permute(0, 3, 1, 2))
                return tpl.group_outputs(plan, env, outs)

            return warmed(run, self.probe)

        return Candidate("cudnn" + ("" if trivial else " + triton epilogue"), {"impl": "cudnn"}, compile_, "cudnn")


def _cudnn_fused_candidate(group: KernelGroup, anchor, probe, geometry) -> Optional[Candidate]:
    """cuDNN's own fused convolution + bias + ReLU (``aten.cudnn_convolution_relu``) or
    + bias + residual add + ReLU (``aten.cudnn_convolution_add_relu``): one kernel where the
    other vendor candidates take two, for groups that are exactly that chain (fp16/bf16, the
    result the only output). cuDNN rounds once at the end where eager rounds after the
    convolution too: the difference is one fp16 rounding step, inside the validation tolerance.
    None when the group is another chain (or these ops do not exist in this torch)."""
    calls = [n for n in group.gm.graph.nodes if n.op == "call_function"]
    x_node, w_node, b_node = anchor.args[:3]
    out_val = meta_of(anchor)
    if out_val.dtype not in (torch.float16, torch.bfloat16) or len(group.outputs) != 1:
        return None
    relu = calls[-1]
    if group.outputs[0] is not relu or getattr(relu.target, "overloadpacket", None) is not torch.ops.aten.relu:
        return None
    residual = None
    if calls == [anchor, relu] and relu.args[0] is anchor:
        op = getattr(torch.ops.aten, "cudnn_convolution_relu", None)
    elif len(calls) == 3 and calls[0] is anchor and relu.args[0] is calls[1]:
        add = calls[1]
        if getattr(add.target, "overloadpacket", None) is not torch.ops.aten.add or add.kwargs.get("alpha", 1) != 1 \
                or len(add.args) != 2 or anchor not in add.args:
            return None
        residual = add.args[1] if add.args[0] is anchor else add.args[0]
        r_val = meta_of(residual)
        if residual not in group.placeholders or not isinstance(r_val, torch.Tensor) \
                or r_val.shape != out_val.shape or r_val.dtype != out_val.dtype:
            return None
        op = getattr(torch.ops.aten, "cudnn_convolution_add_relu", None)
    else:
        return None
    if op is None:
        return None
    # (the chains above have no other call: x, w and the bias are the group's own inputs)
    stride, padding, dilation, groups = geometry
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    places = {p: i for i, p in enumerate(group.placeholders)}
    ix, iw = places[x_node], places[w_node]
    ib = places[b_node] if b_node is not None else None
    ir = places[residual] if residual is not None else None
    want = tuple(meta_of(relu).stride())

    def compile_():
        def run(*inputs, out=None):
            x, w = inputs[ix], inputs[iw]
            b = inputs[ib] if ib is not None else None
            if ir is None:
                y = op(x, w, b, stride, padding, dilation, groups)
            else:
                y = op(x, w, inputs[ir], 1.0, b, stride, padding, dilation, groups)
            return (y,)

        if probe.device.type == "cuda":
            (y,) = run(*probe.first())
            if tuple(y.stride()) != want:  # the engine plans the group's output layout
                raise Unsupported(f"cuDNN fused conv wrote strides {tuple(y.stride())}, not {want}")
        return run

    name = "cudnn fused conv+bias+relu" if residual is None else "cudnn fused conv+bias+add+relu"
    return Candidate(name, {"impl": "cudnn", "fused": "add_relu" if residual is not None else "relu"},
                     compile_, "cudnn")


def _cublas_rows_candidate(group: KernelGroup, p: ConvProblem, probe) -> Optional[Candidate]:
    """A pointwise convolution with its bias and nothing after it (1x1, stride 1, no padding,
    one group, 16-bit): ``addmm(bias, x, w^T)`` over its channels-last rows, cuBLAS adding the
    bias in its own epilogue. cuDNN has no convolution + bias without a ReLU, so such a layer ran
    as our template or cuDNN plus a bias pass: ResNet-50's first conv3 of a stage (its residual add
    taken by the downsample's group), 64 -> 256 at 56x56, b32: our template 54.0 us where the bare
    convolution takes 28.0 (H100, session 20); MobileNet's linear bottlenecks are the same layer.
    None for any other group."""
    calls = [n for n in group.gm.graph.nodes if n.op == "call_function"]
    if calls != [p.anchor] or list(group.outputs) != [p.anchor] or p.bias is None:
        return None
    if (p.kh, p.kw) != (1, 1) or tuple(p.stride) != (1, 1) or tuple(p.padding) != (0, 0) or p.groups != 1 \
            or p.out_val.dtype not in (torch.float16, torch.bfloat16):
        return None
    places = {n: i for i, n in enumerate(group.placeholders)}
    if not all(n in places for n in (p.x, p.w, p.bias)):
        return None
    ix, iw, ib = places[p.x], places[p.w], places[p.bias]
    nb, oc, oh, ow = p.out_val.shape
    want = tuple(p.out_val.stride())

    def compile_():
        def run(*inputs, out=None):
            x = inputs[ix]
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view of channels-last x
            y = torch.addmm(inputs[ib], rows, inputs[iw].reshape(oc, -1).t())
            return (y.view(nb, oh, ow, oc).permute(0, 3, 1, 2),)

        if probe.device.type == "cuda":
            (y,) = run(*probe.first())
            if tuple(y.stride()) != want:  # the engine plans the group's output layout
                raise Unsupported(f"cuBLAS rows wrote strides {tuple(y.stride())}, not {want}")
        return run

    return Candidate("cublas rows conv+bias", {"impl": "cublas", "rows": True}, compile_, "cublas")


def _pair(v: Any) -> Tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


def _pixels_by_channel(t: torch.Tensor, copy: bool) -> Optional[torch.Tensor]:
    """[N, C, H, W] as a (1, N*H*W, C) matrix: a view for channels-last data; otherwise a copy
    (``copy``) or None."""
    p = t.permute(0, 2, 3, 1)
    shape = (1, p.shape[0] * p.shape[1] * p.shape[2], p.shape[3])
    try:
        return p.view(shape)
    except RuntimeError:
        return p.reshape(shape) if copy else None
