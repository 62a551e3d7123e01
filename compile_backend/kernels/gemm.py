"""GEMM with a fused epilogue: the group builder.

:func:`build_gemm` turns a ``gemm`` KernelGroup (mm / addmm / bmm / baddbmm + epilogue chain)
into a :class:`Kernel`, auto-tuned among the candidates of :func:`gemm_candidates`: template
configs, cuBLAS + the epilogue as one Triton kernel, and cuBLAS + the group's own ATen epilogue
ops. The pieces live next door:

* the @triton.jit kernels, generated from fixed main loops and a per-group epilogue:
  :func:`gemm_template.render_gemm` (grouped-M tile order, any operand strides, batched,
  split-K) and :func:`gemm_template.render_gemm_tma` (persistent, TMA operand loads; 2-D 16-bit
  GEMMs on Hopper: 98-99 % of cuBLAS at 4096^3 fp16 on an H100, benchmarks/notes/gemm.md);
* :mod:`.gemm_config` (configs and heuristics), :mod:`.gemm_tma` (TMA operand loads),
  :mod:`.gemm_runner` (launching), :mod:`.gemm_direct` (the direct op :func:`gemm` and its
  plain-PyTorch reference :func:`gemm_reference`), :mod:`.template` (the shared tuning core).

Numerics: accumulation in fp32 (int32 for int8); fp32 operands use tf32 only when
``Options.precision`` allows it. In group kernels the anchor's result is rounded to its dtype
before the chain, and each chain op rounds as eager does (see ``expr``), so a fused chain equals
eager up to accumulation order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import gemm_template as tpl
from .autotune import Candidate, TuningKey
from .base import Kernel, KernelContext, KernelGroup, Unsupported, meta_of
from .gemm_config import GemmConfig, candidate_configs, heuristic_config, long_chain, with_split_epilogues, with_tma_configs
from .gemm_runner import EPILOGUE_ALTERNATIVES, MAX_BATCH, GemmRunner, epilogue_only, epilogue_tile_named
from .gemm_tma import tma_available, tma_layout_of
from .template import (FLOAT_DTYPES, Probe, TemplateTuning, aten_epilogue_candidate, anchor_only, as3d,
                       choose_kernel_of, device_limits, dtype_name, group_dtypes, group_shapes, group_strides,
                       warmed)

#: the anchor ops: positions of (a, b, bias) in their arguments
_GEMM_OPS = {"mm": (0, 1, None), "bmm": (0, 1, None), "addmm": (1, 2, 0), "baddbmm": (1, 2, 0)}


def build_gemm(group: KernelGroup, ctx: KernelContext) -> Kernel:
    """Kernel for a ``gemm`` group: mm/addmm/bmm/baddbmm followed by its epilogue chain."""
    tuning = gemm_candidates(group, ctx)
    return choose_kernel_of(group, ctx, tuning)


def gemm_candidates(group: KernelGroup, ctx: KernelContext, *, vendor: Optional[bool] = None,
                    configs: Optional[Sequence[GemmConfig]] = None, tma: Optional[bool] = None) -> TemplateTuning:
    """Candidates for a gemm group, heuristic first. ``vendor`` (default: on CUDA) adds cuBLAS +
    a fused epilogue kernel; ``tma`` (default: on Hopper when the operands allow it) adds the
    persistent TMA kernel's configs; ``configs`` replaces the template configs (tests)."""
    problem = gemm_problem(group)
    fused = _fused_gemv(group, problem)
    try:
        plan = tpl.plan_epilogue(group, problem.anchor, "acc_v", _anchor_loads(problem))
    except Unsupported:
        if fused is None:
            raise
        return _gemv_tuning(group, problem, fused, ctx)  # a prologue: only the fused GEMV computes it
    sources = _render_sources(problem, plan, ctx)
    fits_template = _fits_template(group, problem)
    vendor = ctx.device.type == "cuda" if vendor is None else vendor
    if not fits_template and not vendor:
        raise Unsupported(f"batch {problem.batch} or tensor size beyond the template's 32-bit indexing")
    build = _GemmBuild(group, problem, plan, sources, Probe(group, ctx.device), device_limits(ctx.device)[0])
    if tma is None:
        tma = problem.batch == 1 and tma_available(ctx.device) and _tma_layout(problem) is not None
    # untuned (autotune="off") on CUDA, from run 2 on an H100 (benchmarks/notes/gemm.md): cuBLAS
    # with the group's own ATen epilogue was fastest on the bert/gpt2/mlp shapes; where cuBLAS
    # is slow (a dimension not a multiple of 8, e.g. the 50257-wide LM head: 102 TFLOP/s) the
    # persistent TMA template was 5x faster
    tma_first = bool(tma and vendor and (problem.m % 8 or problem.n % 8 or problem.k % 8))
    candidates: List[Candidate] = []
    if fits_template:
        if configs is None:
            configs = _template_configs(problem, ctx, tma, tma_first)
            if ctx.device.type == "cuda" and long_chain(plan.chain_ops):
                configs = with_split_epilogues(configs)
        candidates += [build.triton_candidate(c) for c in configs]
    if vendor:
        at = 1 if tma_first and fits_template else 0
        candidates[at:at] = build.vendor_candidates()
    # template kernels and cuBLAS + epilogue kernel write through allocate_outputs, so take out=
    writes_out = frozenset(c.name for c in candidates if c.impl == "triton" or c.name.startswith("cublas + triton epilogue"))
    key, sources = _tuning_key(build, ctx), build.sources.by_impl()
    if fused is not None:  # timed beside the others (last: untuned, the template or cuBLAS runs)
        candidates += _gemv_tuning(group, problem, fused, ctx).candidates
        key = dataclasses.replace(key, template=key.template + tpl.source_hash(fused[1].source[0]))
        sources["gemv"] = fused[1].source[0]
    return TemplateTuning("gemm", key, candidates, build.probe.make, sources, plan.out_layouts, writes_out)


# ------------------------------------------------------------------------------- decode GEMV
def _fused_gemv(group: KernelGroup, p: "GemmProblem"):
    """(spec, plan) of the fused decode GEMV (kernels/gemv.py) for a float ``mm`` / ``addmm`` of at
    most GEMV_MAX_M rows (its b read as [N, K]; a bias of N values), or None."""
    from . import gemv_build, weight_only_ref

    if p.op not in ("mm", "addmm") or p.m > weight_only_ref.GEMV_MAX_M or p.alpha != 1 or p.beta != 1:
        return None
    if p.bias is not None and tuple(meta_of(p.bias).shape) != (p.n,):
        return None
    spec = gemv_build.GemvSpec(p.anchor, p.a, p.b, None, p.bias, "float", 1, p.dtype, p.out_val.dtype,
                               p.m, p.n, p.k, transposed=True)
    plan = gemv_build.gemv_plan(group, spec)
    return None if plan is None else (spec, plan)


def _gemv_tuning(group: KernelGroup, p: "GemmProblem", fused, ctx: KernelContext) -> TemplateTuning:
    """The fused GEMV's candidates alone: its gemv configs, heuristic first; with a prologue, on
    CUDA, also the group's own ATen ops around cuBLAS (timed, so a slow fused GEMV never wins)."""
    from . import gemv_build, weight_only

    spec, plan = fused
    probe = Probe(group, ctx.device)
    configs = [c for c in [weight_only.heuristic(p.m)] + [c for c in weight_only.CONFIGS["gemv"]
                                                           if c != weight_only.heuristic(p.m)
                                                           and weight_only.fits_registers(c, "float")]
               if plan.runs(c)]  # an unrounded x (gemv_prologue): the elementwise loops only
    key = TuningKey(kind="gemm", template=tpl.source_hash(plan.source[0]), shapes=group_shapes(group),
                    strides=group_strides(group), dtypes=group_dtypes(group),
                    extra=f"fused gemv {p.op} {'|'.join(group.ops)}")
    candidates = [gemv_build.gemv_candidate(group, spec, c, probe, plan, ctx.pdl) for c in configs]
    if plan.prologue_ops and ctx.device.type == "cuda":
        # the safety net the tuner times too: the group as it was, its prologue and chain as ATen
        # ops around cuBLAS (no fused candidate takes a prologue otherwise)
        candidates.append(Candidate("cublas + aten prologue and epilogue", {"impl": "cublas", "epilogue": "aten"},
                                    lambda: warmed(group.reference, probe), "cublas"))
    return TemplateTuning("gemm", key, candidates, probe.make, {"triton": plan.source[0]})


# ------------------------------------------------------------------------------- the problem
@dataclasses.dataclass(frozen=True)
class GemmProblem:
    """A group's anchor GEMM: ``alpha * a @ b + beta * bias`` with a [(batch,) m, k], b [(batch,) k, n]."""

    anchor: fx.Node
    op: str  # mm, addmm, bmm or baddbmm
    a: fx.Node
    b: fx.Node
    bias: Optional[fx.Node]  # None without one, and when beta == 0 ignores it (NaNs included, as ATen)
    alpha: float
    beta: float
    a_val: torch.Tensor
    b_val: torch.Tensor
    out_val: torch.Tensor
    batch: int
    m: int
    n: int
    k: int

    @property
    def dtype(self) -> torch.dtype:
        return self.a_val.dtype


def gemm_problem(group: KernelGroup) -> GemmProblem:
    """The anchor of a gemm group, checked for what the template takes (else Unsupported)."""
    anchor = _anchor_node(group)
    op = getattr(getattr(anchor.target, "overloadpacket", None), "__name__", "")
    if op not in _GEMM_OPS:
        raise Unsupported(f"anchor {anchor.target} is not mm/addmm/bmm/baddbmm")
    ia, ib, ibias = _GEMM_OPS[op]
    a_val, b_val = meta_of(anchor.args[ia]), meta_of(anchor.args[ib])
    if a_val.dtype not in FLOAT_DTYPES or b_val.dtype != a_val.dtype:
        raise Unsupported(f"GEMM operands {a_val.dtype}/{b_val.dtype}: the template takes fp32/fp16/bf16")
    m, k, n = a_val.shape[-2], a_val.shape[-1], b_val.shape[-1]
    if min(m, n, k) == 0:
        raise Unsupported("empty GEMM")
    beta = float(anchor.kwargs.get("beta", 1))
    bias = anchor.args[ibias] if ibias is not None and beta != 0 else None
    return GemmProblem(anchor, op, anchor.args[ia], anchor.args[ib], bias, float(anchor.kwargs.get("alpha", 1)), beta,
                       a_val, b_val, meta_of(anchor), a_val.shape[0] if a_val.dim() == 3 else 1, m, n, k)


def _anchor_node(group: KernelGroup):
    for n in group.gm.graph.nodes:
        if n.name == group.anchor:
            return n
    raise Unsupported(f"anchor {group.anchor!r} not in the group graph")


def _anchor_loads(problem: GemmProblem) -> List[tpl.LoadPlan]:
    return [] if problem.bias is None else [tpl.LoadPlan(problem.bias, tuple(problem.out_val.shape))]


def _fits_template(group: KernelGroup, problem: GemmProblem) -> bool:
    """Within the launch grid's batch limit and the template's 32-bit indexing."""
    return problem.batch <= MAX_BATCH and max(_numel(meta_of(x)) for x in group.placeholders
                                              if hasattr(meta_of(x), "numel")) < 2**31


def _numel(val: Any) -> int:
    return val.numel() if isinstance(val, torch.Tensor) else 0


def _tma_layout(problem: GemmProblem):
    a, b = problem.a_val, problem.b_val
    return tma_layout_of(tuple(a.shape[-2:]), a.stride()[-2:], tuple(b.shape[-2:]), b.stride()[-2:], a.dtype, b.dtype)


# ------------------------------------------------------------------------------- sources
@dataclasses.dataclass(frozen=True)
class GemmSources:
    """The generated kernels of one group: (source, kernel name) each."""

    main: Tuple[str, str]  # the template kernel (grouped-M, split-K)
    tma: Tuple[str, str]  # the persistent TMA template kernel
    vendor: Tuple[str, str]  # the epilogue after cuBLAS
    vendor_skip: int  # anchor loads the vendor applies itself (cuBLAS: alpha, beta and the bias)

    def by_impl(self) -> Dict[str, str]:
        return {"triton": self.main[0], "cublas": self.vendor[0], "tma": self.tma[0]}

    def hash(self) -> str:
        return tpl.source_hash(self.main[0] + self.vendor[0] + self.tma[0])


def _render_sources(problem: GemmProblem, plan: tpl.EpiloguePlan, ctx: KernelContext) -> GemmSources:
    from . import expr

    value = "acc" + (f" * {problem.alpha!r}" if problem.alpha != 1 else "")
    if problem.bias is not None:
        value += f" + x0 * {problem.beta!r}" if problem.beta != 1 else " + x0"
    main_lines = [f"acc_v = {expr.round_to(f'({value})', problem.out_val.dtype)}"]
    interpret = ctx.device.type != "cuda"
    dot = tpl.dot_fields(dtype_name(problem.dtype), ctx.allow_tf32, interpret, int_acc=False)
    vendor_skip = len(_anchor_loads(problem))
    spec = tpl.epilogue_spec(plan, main_lines, broadcast=True)
    return GemmSources(main=tpl.render_gemm(spec, dot), tma=tpl.render_gemm_tma(spec, dot),
                       vendor=tpl.render_gemm(tpl.epilogue_spec(plan, ["acc_v = acc"], skip_loads=vendor_skip,
                                                                broadcast=True), dot),
                       vendor_skip=vendor_skip)


def _tuning_key(build: "_GemmBuild", ctx: KernelContext) -> TuningKey:
    p, group = build.problem, build.group
    return TuningKey(
        kind="gemm", template=build.sources.hash(),
        shapes=group_shapes(group), strides=group_strides(group), dtypes=group_dtypes(group),
        extra=f"{p.op} a={p.alpha} b={p.beta} {'|'.join(build.plan.chain_ops)} precision={ctx.options.precision}",
    )


# ------------------------------------------------------------------------------- configs
def _template_configs(problem: GemmProblem, ctx: KernelContext, tma: bool, tma_first: bool) -> List[GemmConfig]:
    """The template configs to time, heuristic first (one under the interpreter)."""
    p = problem
    if ctx.device.type != "cuda":
        return [heuristic_config(p.m, p.n, p.k, p.batch, p.dtype, interpret=True)]
    level = ctx.tuning
    lvl = "max" if level == "max" else ("off" if level == "off" else "fast")
    configs = candidate_configs(p.m, p.n, p.k, p.batch, p.dtype, lvl, *device_limits(ctx.device))
    return with_tma_configs(configs, lvl, tma_first, p.m, p.n) if tma else configs


# ------------------------------------------------------------------------------- candidates
@dataclasses.dataclass
class _GemmBuild:
    """One group's candidates: what their runners share."""

    group: KernelGroup
    problem: GemmProblem
    plan: tpl.EpiloguePlan
    sources: GemmSources
    probe: Probe
    num_sms: int

    def operands(self, env):
        return as3d(env[self.problem.a]), as3d(env[self.problem.b])

    def io(self, env, skip: int, device, out):
        plan = self.plan
        loads = [as3d(tpl.to_anchor_space(env[lp.source], lp, plan.anchor_shape)) for lp in plan.loads[skip:]]
        outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, device, out)
        return loads, outs, [as3d(v) for v in views]

    def triton_candidate(self, cfg: GemmConfig) -> Candidate:
        def compile_():
            tma_kernel = tpl.load_kernel(*self.sources.tma) if cfg.tma else None
            runner = GemmRunner(tpl.load_kernel(*self.sources.main), cfg, False, tma_kernel, self.num_sms)

            def run(*inputs, out=None):
                env = tpl.bind_group(self.plan, self.group, inputs)
                a3, b3 = self.operands(env)
                loads, outs, views = self.io(env, 0, a3.device, out)
                runner(a3, b3, loads, views)
                return tpl.group_outputs(self.plan, env, outs)

            return warmed(run, self.probe)

        return Candidate(f"triton {cfg.name}", {"impl": "triton", **cfg.as_dict()}, compile_, "triton")

    def vendor_candidates(self) -> List[Candidate]:
        """cuBLAS + the chain as ATen ops (the group's reference itself; only with a chain),
        then cuBLAS + the epilogue as one Triton kernel."""
        if anchor_only(self.plan):
            return [self.cublas_candidate()]
        return ([aten_epilogue_candidate("cublas", self.group, self.probe), self.cublas_candidate()]
                + [self.cublas_candidate(c) for c in EPILOGUE_ALTERNATIVES])

    def cublas_candidate(self, epilogue: Optional[GemmConfig] = None) -> Candidate:
        """cuBLAS, then (with a chain) the epilogue as one Triton kernel of tile ``epilogue``
        (default ``EPILOGUE_CONFIG``; the name says when it is another)."""
        trivial = anchor_only(self.plan)
        plan, group, anchor = self.plan, self.group, self.problem.anchor

        def compile_():
            kernel = None if trivial else tpl.load_kernel(*self.sources.vendor)

            def run(*inputs, out=None):  # out= only without ``trivial`` (see writes_out)
                env = tpl.bind_group(plan, group, inputs)
                args = torch.fx.node.map_arg(anchor.args, lambda x: env[x])
                kwargs = torch.fx.node.map_arg(anchor.kwargs, lambda x: env[x])
                acc = anchor.target(*args, **kwargs)  # cuBLAS
                if trivial:
                    return tpl.group_outputs(plan, env, [acc.reshape(shape) for _, shape, *_ in plan.stores])
                loads, outs, views = self.io(env, self.sources.vendor_skip, acc.device, out)
                epilogue_only(kernel, as3d(acc), loads, views, epilogue)
                return tpl.group_outputs(plan, env, outs)

            return warmed(run, self.probe)

        suffix, fields = epilogue_tile_named(epilogue)
        name = "cublas" + ("" if trivial else " + triton epilogue") + suffix
        return Candidate(name, {"impl": "cublas", **fields}, compile_, "cublas")
