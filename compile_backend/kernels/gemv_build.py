"""The fused decode GEMV (:mod:`.gemv`) as candidates of a group's builder: its plan (x's
prologue, the chain after the GEMM, the generated source), the tuner's candidates, the runner.

Two builders offer it for groups of at most ``GEMV_MAX_M`` rows: ``weight_only_build`` (INT8 /
INT4 codes) and ``gemm`` (``mm`` / ``addmm`` with float weights: the FP16 decode step). A group
the partitioner gave a prologue (``partition_merge.merge_gemv_prologues``) can only run here:
the other kernels take their operands from memory.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx

from . import expr
from . import gemm_template as tpl
from . import gemv, gemv_prologue, pdl
from .autotune import Candidate
from .base import KernelGroup, Unsupported
from .launch import Counters
from .template import Probe, warmed


@dataclasses.dataclass(frozen=True)
class GemvSpec:
    """What one launch binds: the anchor and its operand nodes (``x``; ``w``: codes [N, K], or a
    float ``mm``'s b [K, N] read transposed; ``scales``, ``bias``: nodes or None), the weights'
    kind (a key of ``gemv.WEIGHT_KINDS``), INT4's group size, dtypes and sizes."""

    anchor: fx.Node
    x: Any
    w: Any
    scales: Any
    bias: Any
    weights: str
    group_size: int
    dtype: torch.dtype
    out_dtype: torch.dtype
    m: int
    n: int
    k: int
    transposed: bool = False  # w is [K, N] (mm's b): the kernel reads w.t()


@dataclasses.dataclass(frozen=True)
class GemvPlan:
    """A group as one launch: x's prologue loads (in x's [M, K] space), the epilogue's plan, the
    generated source."""

    x_loads: Tuple[tpl.LoadPlan, ...]
    epilogue: tpl.EpiloguePlan
    source: Tuple[str, str]
    prologue_ops: int  # nodes x's prologue computes (0: x is loaded as it is)
    row_values: bool = False  # the prologue computes row values (one x row a program)
    deferred: bool = False  # its row values are one factor of x, applied to the sums (gemv_prologue)
    unrounded_x: bool = False  # x computed in fp32 past its dtype's range: no tensor-core loop

    def runs(self, cfg: Any) -> bool:
        """Whether a gemv config may run this plan: the tensor-core main loops take x in its
        dtype, which an unrounded x (``gemv_prologue.XPrologue.unrounded``) may exceed."""
        return not (self.unrounded_x and cfg.tensor_cores)


def gemv_plan(group: KernelGroup, spec: GemvSpec) -> Optional[GemvPlan]:
    """The fused GEMV of ``group``, or None where the generated kernel cannot express it."""
    try:
        x, x_loads, operands = gemv_prologue.plan_x(group, spec.anchor, spec.x, spec.m, spec.k)
        plan = tpl.plan_epilogue(group, spec.anchor, "acc_v", operands=operands)
    except Unsupported:
        return None
    source = gemv.render(x, tpl.epilogue_spec(plan, ["acc_v = acc"]), spec.dtype, spec.out_dtype,
                         expr.helper_source(plan.helpers | x.helpers))
    return GemvPlan(tuple(x_loads), plan, source, len(operands), x.row_values, x.deferred, x.unrounded)


def gemv_candidate(group: KernelGroup, spec: GemvSpec, cfg: Any, probe: Probe, plan: GemvPlan,
                   use_pdl: bool = False) -> Candidate:
    """A tuner candidate running ``plan`` with ``cfg`` (a gemv or tma ``weight_only.WeightOnlyConfig``);
    ``use_pdl``: launched with Programmatic Dependent Launch (kernels/pdl.py)."""
    name = (f"triton fused gemv {spec.weights}{' tc' if cfg.tensor_cores else ''}{' tma' if cfg.path == 'tma' else ''} "
            f"{cfg.block_n}x{cfg.block_k} "
            f"split{cfg.split_k} waves{cfg.waves} w{cfg.num_warps} s{cfg.num_stages}"
            f"{f' u{cfg.unroll}' if cfg.unroll > 1 else ''}")
    config = {"impl": "triton", "fused": True, "weights": spec.weights, **dataclasses.asdict(cfg)}

    def compile_():
        source, name = plan.source
        kernel = tpl.load_kernel(pdl.with_entry(source, name, after=gemv.PDL_AFTER) if use_pdl else source, name)
        return warmed(GemvRunner(group, spec, cfg, plan, kernel, use_pdl), probe)

    return Candidate(name, config, compile_, "triton")


class GemvRunner:
    """The group as one fused GEMV launch: binds the prologue's and the epilogue's tensors, views
    them in x's [M, K] and the output's [M, N] index spaces, allocates the outputs. ``counters``:
    the split-K arrival counters its launches share (the kernel resets them)."""

    def __init__(self, group: KernelGroup, spec: GemvSpec, cfg: Any, plan: GemvPlan, kernel, use_pdl: bool = False) -> None:
        self.group, self.spec, self.cfg, self.plan, self.kernel = group, spec, cfg, plan, kernel
        self.use_pdl = use_pdl
        self.counters = Counters()

    def __call__(self, *inputs: Any) -> Tuple[Any, ...]:
        s, plan = self.spec, self.plan.epilogue
        env = tpl.bind_group(plan, self.group, inputs)
        xs = [tpl.to_anchor_space(env[lp.source], lp, (s.m, s.k)) for lp in self.plan.x_loads]
        w, scales, bias = (env[v] if isinstance(v, fx.Node) else v for v in (s.w, s.scales, s.bias))
        loads = [tpl.to_anchor_space(env[lp.source], lp, plan.anchor_shape).reshape(s.m, s.n) for lp in plan.loads]
        outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, xs[0].device)
        gemv.launch(self.kernel, xs, w.t() if s.transposed else w, scales, bias, loads,
                    [v.view(s.m, s.n) for v in views], weights=s.weights, group=s.group_size, config=self.cfg,
                    x_dtype=s.dtype, row_values=self.plan.row_values, deferred=self.plan.deferred,
                    unrounded_x=self.plan.unrounded_x, counters=self.counters, use_pdl=self.use_pdl)
        return tpl.group_outputs(plan, env, outs)


__all__ = ["GemvSpec", "GemvPlan", "gemv_plan", "gemv_candidate", "GemvRunner"]
