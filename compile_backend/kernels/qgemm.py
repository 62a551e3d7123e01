"""Scaled (INT8 / FP8) GEMM with a fused epilogue: the group builder for ``compile_backend.scaled_mm``.

A ``gemm`` group anchored on ``scaled_mm(xq [M, K], x_scale, wq [N, K], w_scale, bias, out_dtype)``
followed by its epilogue chain (activation, residual add, casts) becomes one kernel computing
``chain(((xq @ wq^T) * (x_scale * w_scale) + bias) -> out_dtype)``. Candidates, timed by the
tuner (heuristic order: the vendor first on CUDA, as for float GEMMs):

* the Triton GEMM template (:func:`gemm_template.render_gemm`, and on Hopper its persistent TMA
  variant :func:`gemm_template.render_gemm_tma`, both operands K-major): int8 operands accumulate in int32,
  fp8 in fp32; the epilogue converts the accumulator to fp32, multiplies it by the product of the
  row scale of x (a scalar for per-tensor activations) and the column scale of w, adds the bias,
  rounds to ``out_dtype`` and runs the chain (``expr``);
* ``torch._int_mm`` (INT8, cuBLASLt, int32 out; M > 16, K and N multiples of 8) then the same
  epilogue as one Triton kernel over its int32 result;
* ``torch._scaled_mm`` (FP8, cuBLASLt; A row-major, B = wq^T column-major, K and N multiples of
  16) with unit scales and fp32 output, then the same epilogue kernel. Unit scales keep one path
  for per-tensor and per-row/channel scales and every torch version (rowwise scaling exists
  only in newer ones and only with bf16 output, which would round before the bias add).

The ATen reference (``kernels/quant_ref`` through the op's CPU/CUDA implementation) is the
selector's last resort. Numerics equal ``quant_ref.scaled_mm`` up to fp32 rounding of the
epilogue (a GPU may contract the scale multiply and bias add into one fma) and, for FP8, the
order of the fp32 accumulation. Shared with :mod:`.qconv`: :func:`scaled_anchor`,
:func:`scaled_arg`, :func:`check_scaled_dtypes`, :func:`scale_lines`, :func:`eight_bit_configs`, :func:`scaled_dot_fields`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import gemm_template as tpl
from .autotune import Candidate, TuningKey
from .base import Kernel, KernelContext, KernelGroup, Unsupported, meta_of
from .gemm_config import GemmConfig, candidate_configs, heuristic_config, long_chain, with_split_epilogues, with_tma_configs
from .gemm_runner import EPILOGUE_ALTERNATIVES, GemmRunner, epilogue_only, epilogue_tile_named
from .gemm_tma import tma_available, tma_layout_of
from .template import (FLOAT_DTYPES, Probe, QUANT_DTYPES, TemplateTuning, anchor_only, choose_kernel_of,
                       device_limits, dtype_name, float_linear_candidate, group_dtypes, group_shapes, group_strides,
                       seeded, warmed)


def build_scaled_mm(group: KernelGroup, ctx: KernelContext) -> Kernel:
    """Kernel for a ``gemm`` group anchored on ``compile_backend.scaled_mm``."""
    return choose_kernel_of(group, ctx, scaled_mm_candidates(group, ctx))


# ------------------------------------------------------------------------------- shared with qconv
def scaled_anchor(group: KernelGroup, opname: str) -> fx.Node:
    """The group's anchor node, which must be ``compile_backend.<opname>`` (else Unsupported)."""
    anchor = next((n for n in group.gm.graph.nodes if n.name == group.anchor), None)
    target = getattr(anchor, "target", None)
    if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "compile_backend"
            and target._opname == opname):
        raise Unsupported(f"anchor {group.anchor!r} is not compile_backend.{opname}")
    return anchor


def scaled_arg(node: fx.Node, name: str) -> Any:
    """Argument ``name`` of a call of a custom op (positional or keyword, by its schema)."""
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name)
    raise KeyError(name)


def check_scaled_dtypes(xq: torch.Tensor, wq: torch.Tensor, out_dtype: Any, device: torch.device) -> None:
    """Quantized operands of one dtype, a float output, fp8 only where Triton has it."""
    if xq.dtype not in QUANT_DTYPES or wq.dtype != xq.dtype:
        raise Unsupported(f"scaled operands {xq.dtype}/{wq.dtype}: the template takes int8 or float8_e4m3fn")
    if out_dtype not in FLOAT_DTYPES:
        raise Unsupported(f"scaled op output dtype {out_dtype}")
    if xq.dtype != torch.int8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise Unsupported("float8_e4m3fn operands need an sm_89+ GPU")


#: how an FP8 dot sums its products (Options.fp8_accumulation; see :func:`scaled_dot_fields`)
FP8_ACCUMULATION_MODES = ("tile", "instruction", "fast")


def fp8_accumulation_of(ctx: KernelContext) -> str:
    """The FP8 accumulation mode the context's options ask for: ``fast`` or ``tile`` (fp32)."""
    return "fast" if ctx.fp8_fast_accumulation else "tile"


def scaled_dot_fields(dtype: torch.dtype, interpret: bool, accumulation: str = "tile") -> dict:
    """Template fields of the main loop's dot for quantized operands: int32 accumulation for
    int8; for fp8 fp32 accumulation. The tensor cores sum fp8 products in a reduced-precision
    accumulator; Triton adds it into the fp32 one every ``max_num_imprecise_acc`` K elements.
    ``tile`` promotes once per K tile (BLOCK_K = 64 or 128: two or four wgmma instructions; the
    error of a partial sum stays near 2^-14 of it; DeepSeek-V3 trains with 128), as cuBLAS's
    non-fast-accumulation mode does; Triton then keeps a second accumulator of the tile's size
    in registers (128x256 tiles spill: 354 us where 128x128 took 116 at the MLP shape, H100,
    session 11). ``fast`` never promotes (Triton's own default on sm_90: one accumulator, the
    tensor cores' precision), as ``_scaled_mm(use_fast_accum=True)``. ``instruction`` promotes
    after every wgmma (the setting before session 5, which on the H200 made the FP8 template
    slower than cuBLAS's fp16 GEMM; kept for the kernel benchmark's comparison)."""
    if accumulation not in FP8_ACCUMULATION_MODES:
        raise ValueError(f"fp8 accumulation {accumulation!r}: one of {', '.join(FP8_ACCUMULATION_MODES)}")
    dot = tpl.dot_fields(dtype_name(dtype), False, interpret, dtype == torch.int8)
    if dtype != torch.int8 and accumulation != "fast":
        dot["dot_args"] += ", max_num_imprecise_acc=" + ("BLOCK_K" if accumulation == "tile" else "0")
    return dot


def scale_lines(int_acc: bool, bias: bool, out_dtype: torch.dtype) -> List[str]:
    """Epilogue lines from the accumulator ``acc`` to the anchor's value ``acc_v`` (its compute
    type): loads x0 = x_scale, x1 = w_scale, x2 = bias, broadcast to the output tile; the scale
    product first, then the bias, one rounding to ``out_dtype`` (as quant_ref)."""
    from . import expr

    value = "acc * (x0 * x1)" + (" + x2" if bias else "")
    return (["acc = acc.to(tl.float32)"] if int_acc else []) + [f"acc_v = {expr.round_to(f'({value})', out_dtype)}"]


# ------------------------------------------------------------------------------- the problem
@dataclasses.dataclass(frozen=True)
class ScaledMMProblem:
    anchor: fx.Node
    xq: fx.Node
    wq: fx.Node
    loads: Tuple[tpl.LoadPlan, ...]  # x_scale, w_scale[, bias] in the output's [M, N] space
    has_bias: bool
    out_dtype: torch.dtype
    dtype: torch.dtype  # of the operands
    m: int
    n: int
    k: int

    @property
    def int_acc(self) -> bool:
        return self.dtype == torch.int8


def scaled_mm_problem(group: KernelGroup, device: torch.device) -> ScaledMMProblem:
    anchor = scaled_anchor(group, "scaled_mm")
    xq, x_scale, wq, w_scale, bias = (scaled_arg(anchor, a) for a in ("xq", "x_scale", "wq", "w_scale", "bias"))
    out_dtype = scaled_arg(anchor, "out_dtype")
    xv, wv, xs, ws = meta_of(xq), meta_of(wq), meta_of(x_scale), meta_of(w_scale)
    check_scaled_dtypes(xv, wv, out_dtype, device)
    if xv.dim() != 2 or wv.dim() != 2 or xv.shape[1] != wv.shape[1]:
        raise Unsupported(f"scaled_mm operands {tuple(xv.shape)} x {tuple(wv.shape)}^T")
    (m, k), n = xv.shape, wv.shape[0]
    if min(m, n, k) == 0:
        raise Unsupported("empty GEMM")
    if xs.numel() not in (1, m) or ws.numel() not in (1, n) or xs.dim() > 2 or ws.dim() > 1:
        raise Unsupported(f"scales {tuple(xs.shape)} / {tuple(ws.shape)}: per tensor, per row of x, per column of w")
    if max(xv.numel(), wv.numel(), m * n) >= 2**31:
        raise Unsupported("tensor too large for the template's 32-bit indexing")
    shape = (m, n)
    loads = [tpl.LoadPlan(x_scale, shape, pre_view=(m, 1) if xs.numel() == m and m > 1 else None),
             tpl.LoadPlan(w_scale, shape)]
    if bias is not None:
        loads.append(tpl.LoadPlan(bias, shape))
    return ScaledMMProblem(anchor, xq, wq, tuple(loads), bias is not None, out_dtype, xv.dtype, m, n, k)


def _vendor_fits(p: ScaledMMProblem) -> Optional[str]:
    """Why the vendor GEMM cannot take the problem, or None."""
    if p.int_acc:
        return None if p.m > 16 and p.k % 8 == 0 and p.n % 8 == 0 else "torch._int_mm needs M > 16, K, N % 8 == 0"
    if not hasattr(torch, "_scaled_mm"):
        return "no torch._scaled_mm"
    return None if p.k % 16 == 0 and p.n % 16 == 0 else "torch._scaled_mm needs K, N % 16 == 0"


# ------------------------------------------------------------------------------- candidates
def scaled_mm_candidates(group: KernelGroup, ctx: KernelContext, *, vendor: Optional[bool] = None,
                         configs: Optional[Sequence[GemmConfig]] = None,
                         accumulation: Optional[str] = None) -> TemplateTuning:
    """Candidates for a scaled_mm group, heuristic first. ``vendor`` (default: on CUDA, when the
    shape suits it) adds ``torch._int_mm`` / ``torch._scaled_mm`` + the epilogue kernel;
    ``configs`` replaces the template configs (tests, benchmarks); ``accumulation`` (FP8; default
    from the options): see :func:`scaled_dot_fields` (the kernel benchmark compares them)."""
    p = scaled_mm_problem(group, ctx.device)
    plan = tpl.plan_epilogue(group, p.anchor, "acc_v", p.loads)
    accumulation = accumulation or fp8_accumulation_of(ctx)
    dot = scaled_dot_fields(p.dtype, ctx.device.type != "cuda", accumulation)
    spec = tpl.epilogue_spec(plan, scale_lines(p.int_acc, p.has_bias, p.out_dtype), p.int_acc, broadcast=True)
    # one source serves the template (MODE 0) and the epilogue after the vendor GEMM (MODE 2);
    # the persistent TMA kernel has the same epilogue
    source, tma_source = tpl.render_gemm(spec, dot), tpl.render_gemm_tma(spec, dot)
    # the chain alone, over the product cuBLAS wrote with the scales and the bias applied
    scaled_source = tpl.render_gemm(tpl.epilogue_spec(plan, ["acc_v = acc"], p.int_acc, skip_loads=len(p.loads),
                                                      broadcast=True), dot)
    build = _Build(group, p, plan, source, Probe(group, ctx.device), tma_source, device_limits(ctx.device)[0],
                   scaled_source, accumulation == "fast")
    if configs is None:
        configs = _template_configs(p, ctx)
        if ctx.device.type == "cuda" and long_chain(plan.chain_ops):
            configs = with_split_epilogues(configs)
    candidates: List[Candidate] = [build.triton_candidate(c) for c in configs]
    vendor = (ctx.device.type == "cuda") if vendor is None else vendor
    if vendor and _vendor_fits(p) is None:
        # with a long chain, each vendor GEMM is timed with every epilogue tile: the default tile's
        # epilogue took 20-30 us after ``_scaled_mm`` at BERT FFN1 (GELU + quantize, H100,
        # session 9) where the GEMM alone takes ~12
        tiles = [None, *EPILOGUE_ALTERNATIVES] if long_chain(plan.chain_ops) else [None]
        # FP8, first: on the H200 the fastest FP8 GEMM at every measured shape. Only with a bias
        # of the output dtype (an fp16 model's): cuBLAS then adds it in fp32 and rounds once, as
        # the reference; another dtype would round twice. The fp32 product's epilogue reads
        # twice the bytes, so beside it that one is timed in the default tile only
        if not p.int_acc and (not p.has_bias or meta_of(p.loads[2].source).dtype == p.out_dtype):
            vendors = [build.vendor_scaled_candidate(t) for t in tiles] + [build.vendor_candidate()]
        else:
            vendors = [build.vendor_candidate(t) for t in tiles]
        candidates[:0] = vendors
    if ctx.device.type == "cuda":  # first, so a tuning budget never skips it
        candidates.insert(0, float_linear_candidate(p.m, p.n, p.k, p.out_dtype, p.has_bias, ctx.device))
    key = TuningKey(kind="gemm", template=tpl.source_hash(source[0] + tma_source[0]), shapes=group_shapes(group),
                    strides=group_strides(group), dtypes=group_dtypes(group),
                    extra=f"scaled_mm {'|'.join(plan.chain_ops)}")
    # every candidate writes into planned outputs (out=) except the vendor's own result returned as is
    return seeded(TemplateTuning("gemm", key, candidates, build.probe.make,
                                 {"triton": source[0], "cublas": source[0], "tma": tma_source[0]}, plan.out_layouts,
                                 frozenset(c.name for c in candidates if c.name != "torch._scaled_mm scaled")), group)


def _template_configs(p: ScaledMMProblem, ctx: KernelContext) -> List[GemmConfig]:
    """Heuristic first; at ``max`` on Hopper also persistent TMA variants (operands K-major:
    activations [M, K] and nn.Linear weights [N, K] are)."""
    if ctx.device.type != "cuda":
        return eight_bit_configs([heuristic_config(p.m, p.n, p.k, 1, p.dtype, interpret=True)])
    level = {"off": "off", "max": "max"}.get(ctx.tuning, "fast")
    configs = candidate_configs(p.m, p.n, p.k, 1, p.dtype, level, *device_limits(ctx.device))
    # TMA variants only at "max": on the H200 (session 5, run 3) they beat the pointer kernel at
    # one shape of ten, by 4%, and each adds a compile and a timing per GEMM
    if level == "max" and tma_available(ctx.device) and \
            tma_layout_of((p.m, p.k), (p.k, 1), (p.k, p.n), (1, p.k), p.dtype, p.dtype) is not None:
        configs = with_tma_configs(configs, level, False, p.m, p.n)
    return eight_bit_configs(configs)


def eight_bit_configs(configs: Sequence[GemmConfig]) -> List[GemmConfig]:
    """``configs`` with block_k >= 32: Triton's dot of 8-bit operands needs K tiles of 32 on
    NVIDIA GPUs (order kept, duplicates dropped)."""
    return list(dict.fromkeys(dataclasses.replace(c, block_k=max(32, c.block_k)) for c in configs))


@dataclasses.dataclass
class _Build:
    group: KernelGroup
    problem: ScaledMMProblem
    plan: tpl.EpiloguePlan
    source: Tuple[str, str]
    probe: Probe
    tma_source: Tuple[str, str]
    num_sms: int
    scaled_source: Tuple[str, str]  # the chain after ``_scaled_mm`` applied scales and bias
    fast_accumulation: bool = False  # FP8: ``_scaled_mm(use_fast_accum=True)``, as the template's dot

    def io(self, env, device, out, skip: int = 0):
        """Epilogue loads (past the first ``skip``) and output views in the template's (1, M, N)
        space; outputs."""
        plan = self.plan
        loads = [tpl.to_anchor_space(env[lp.source], lp, plan.anchor_shape).unsqueeze(0) for lp in plan.loads[skip:]]
        outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, device, out)
        return loads, outs, [v.unsqueeze(0) for v in views]

    def accumulation_field(self) -> dict:
        """``{"accumulation": "fast"}`` for a report of a fast-accumulating FP8 candidate."""
        return {"accumulation": "fast"} if self.fast_accumulation and not self.problem.int_acc else {}

    def triton_candidate(self, cfg: GemmConfig) -> Candidate:
        p, plan, group = self.problem, self.plan, self.group

        def compile_():
            tma_kernel = tpl.load_kernel(*self.tma_source) if cfg.tma else None
            runner = GemmRunner(tpl.load_kernel(*self.source), cfg, p.int_acc, tma_kernel, self.num_sms)

            def run(*inputs, out=None):
                env = tpl.bind_group(plan, group, inputs)
                xq, wq = env[p.xq], env[p.wq]
                loads, outs, views = self.io(env, xq.device, out)
                runner(xq.unsqueeze(0), wq.t().unsqueeze(0), loads, views)
                return tpl.group_outputs(plan, env, outs)

            return warmed(run, self.probe)

        return Candidate(f"triton {cfg.name}", {"impl": "triton", "scaled": True, **cfg.as_dict(),
                                                **self.accumulation_field()}, compile_, "triton")

    def vendor_candidate(self, tile: Optional[GemmConfig] = None) -> Candidate:
        """The vendor's raw product (int32 / fp32) then the whole epilogue (scales, bias, chain)
        as one Triton kernel of tile ``tile`` (default ``EPILOGUE_CONFIG``)."""
        p, plan, group = self.problem, self.plan, self.group
        name = "torch._int_mm" if p.int_acc else "torch._scaled_mm"

        def compile_():
            kernel = tpl.load_kernel(*self.source)
            units = {}

            def product(xq, wq):
                if p.int_acc:
                    return torch._int_mm(xq, wq.t())  # int32
                one = units.get(xq.device)
                if one is None:
                    one = units[xq.device] = torch.ones((), dtype=torch.float32, device=xq.device)
                return torch._scaled_mm(xq.contiguous(), wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                        use_fast_accum=self.fast_accumulation)

            def run(*inputs, out=None):
                env = tpl.bind_group(plan, group, inputs)
                acc = product(env[p.xq], env[p.wq])
                loads, outs, views = self.io(env, acc.device, out)
                epilogue_only(kernel, acc.unsqueeze(0), loads, views, tile)
                return tpl.group_outputs(plan, env, outs)

            return warmed(run, self.probe)

        suffix, fields = epilogue_tile_named(tile)
        return Candidate(f"{name} + triton epilogue{suffix}", {"impl": "cublas", "vendor": name, **fields,
                                                               **self.accumulation_field()}, compile_, "cublas")

    def vendor_scaled_candidate(self, tile: Optional[GemmConfig] = None) -> Candidate:
        """FP8: ``torch._scaled_mm`` with the scales (per tensor, or per row of x and column of
        w) and the bias applied by cuBLAS, written in the op's output dtype; then, with a chain,
        the chain as one Triton kernel (of tile ``tile``) over that value, the value the
        reference's chain reads. The raw product takes no fp32 round trip through memory (run 3
        on the H200: BERT QKV 25.1 us with the fp32 product + epilogue vs 17.2 us for
        ``_scaled_mm`` alone). Torch versions whose ``_scaled_mm`` refuses a scale layout or
        output dtype fail this candidate at compile (its probe run), and the tuner skips it."""
        p, plan, group = self.problem, self.plan, self.group
        trivial = anchor_only(plan)
        x_source = p.loads[0].source
        x_const = x_source.op == "get_attr" or x_source.name in group.constants

        def compile_():
            kernel = None if trivial else tpl.load_kernel(*self.scaled_source)
            # rowwise scaling wants x's scale as [M, 1]: a per-tensor one is spread once per
            # (tensor, version) when it is a graph constant (static activations; the layers
            # sharing this kernel each have their own), so a replay runs no fill kernel for it;
            # a computed scale is spread on each call
            spread: dict = {}

            def row_scales(xs):
                if not x_const:
                    return xs.to(torch.float32).reshape(-1, 1).expand(p.m, 1).contiguous()
                key = (xs.data_ptr(), xs._version, xs.device)
                if key not in spread:
                    if len(spread) >= 1024:  # refits that replaced the constants: drop the old ones
                        spread.clear()
                    spread[key] = xs.to(torch.float32).reshape(-1, 1).expand(p.m, 1).contiguous()
                return spread[key]

            def run(*inputs, out=None):
                env = tpl.bind_group(plan, group, inputs)
                xq, wq = env[p.xq], env[p.wq]
                xs, ws = (env[lp.source] for lp in p.loads[:2])
                if xs.numel() == 1 and ws.numel() == 1:
                    sa, sb = xs.to(torch.float32).reshape(()), ws.to(torch.float32).reshape(())
                else:  # "rowwise": [M, 1] and [1, N]
                    sa = row_scales(xs)
                    sb = ws.to(torch.float32).reshape(1, -1).expand(1, p.n).contiguous()
                bias = env[p.loads[2].source] if p.has_bias else None
                y = torch._scaled_mm(xq.contiguous(), wq.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=p.out_dtype,
                                     use_fast_accum=self.fast_accumulation)
                if trivial:
                    return tpl.group_outputs(plan, env, [y.reshape(shape) for _, shape, *_ in plan.stores])
                loads, outs, views = self.io(env, y.device, out, skip=len(p.loads))
                epilogue_only(kernel, y.unsqueeze(0), loads, views, tile)
                return tpl.group_outputs(plan, env, outs)

            return warmed(run, self.probe)

        suffix, fields = epilogue_tile_named(tile)
        name = "torch._scaled_mm scaled" + ("" if trivial else " + triton epilogue" + suffix)
        return Candidate(name, {"impl": "cublas", "vendor": "torch._scaled_mm", "scaled": True, **fields,
                                **self.accumulation_field()}, compile_, "cublas")


__all__ = ["build_scaled_mm", "scaled_mm_candidates", "scaled_mm_problem", "ScaledMMProblem", "scaled_anchor",
           "scaled_arg", "check_scaled_dtypes", "scale_lines", "eight_bit_configs", "scaled_dot_fields",
           "fp8_accumulation_of"]
