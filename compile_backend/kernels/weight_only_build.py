"""The group builder for ``compile_backend.weight_only_linear`` (W8A16 / W4A16, issue #20).

``kernels/select.py`` tries it (``ANCHOR_BUILDERS``) for a group anchored on the op that
``fx_passes/weight_only.py`` leaves in the graph. The group may carry an epilogue the partitioner
grew onto the anchor (an activation, a residual add) and, for a GEMV (M <= ``GEMV_MAX_M``), a
prologue computing x (``partition_merge``: SwiGLU's ``silu(gate) * up``).

* gemv configs run :mod:`.gemv`: prologue, GEMV, split-K sum, bias and chain in one
  generated launch (:class:`_GemvRunner`).
* skinny and tiled kernels (:mod:`.weight_only`) have no epilogue, so the chain runs after the
  anchor as one generated kernel: the GEMM template's epilogue alone (MODE 2) over the anchor's
  output, the value the reference's chain reads. Where the template cannot express the chain
  (``Unsupported`` from ``plan_epilogue``; a prologue, for these paths), the group's other ops
  run through ATen, node by node in graph order: one launch per op, which at decode sizes costs
  more than the GEMV itself.

Candidates, heuristic first (the tuner's order: the first is what runs with tuning off, and on a
CPU under the interpreter, where nothing is timed): ``weight_only.heuristic(M)``, then the configs
of ``weight_only.CONFIGS`` for the paths that fit M (``weight_only.paths_for``: gemv and skinny
for M <= ``GEMV_MAX_M``, skinny for M <= ``SKINNY_MAX_M``, tiled and dequant beyond; a config of another
path would only fail or lose). On CUDA the float linear the layer
replaces is timed beside them as a reference candidate (never chosen), so the report says when the
weight-only kernel is slower than float, as for W8A8. The selector then checks the chosen kernel
once against the op's reference implementation (``weight_only_ref``) on the real inputs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from . import expr
from . import gemm_template as tpl
from . import gemv_build, weight_only, weight_only_parts, weight_only_tma
from .autotune import Candidate, TuningKey
from .base import Kernel, KernelContext, KernelGroup, Unsupported, meta_of
from .gemm_runner import epilogue_only
from .qgemm import scaled_anchor, scaled_arg
from .template import (FLOAT_DTYPES, Probe, TemplateTuning, anchor_only, choose_kernel_of, dtype_name,
                       float_linear_candidate, group_dtypes, group_shapes, group_strides, warmed)

_ARGS = ("x", "codes", "scales", "bias", "precision", "group_size", "out_dtype")


@dataclasses.dataclass(frozen=True)
class WeightOnlyProblem:
    anchor: fx.Node
    precision: str
    group_size: Any
    dtype: torch.dtype  # of x
    out_dtype: torch.dtype
    has_bias: bool
    m: int
    n: int
    k: int


def build_weight_only_linear(group: KernelGroup, ctx: KernelContext) -> Kernel:
    """Kernel for a group anchored on ``compile_backend.weight_only_linear`` (else Unsupported)."""
    return choose_kernel_of(group, ctx, weight_only_candidates(group, ctx))


def weight_only_problem(group: KernelGroup) -> WeightOnlyProblem:
    anchor = scaled_anchor(group, "weight_only_linear")
    x, codes, scales, bias, precision, group_size, out_dtype = (scaled_arg(anchor, a) for a in _ARGS)
    xv, cv, sv = meta_of(x), meta_of(codes), meta_of(scales)
    if not all(isinstance(v, torch.Tensor) for v in (xv, cv, sv)) or xv.dim() < 1 or cv.dim() != 2:
        raise Unsupported("weight_only_linear operands without tensor metadata")
    if xv.dtype not in FLOAT_DTYPES or (out_dtype is not None and out_dtype not in FLOAT_DTYPES):
        raise Unsupported(f"weight_only_linear activations {xv.dtype} -> {out_dtype}: the kernels take fp16/bf16/fp32")
    k, n = xv.shape[-1], cv.shape[0]
    m = xv.numel() // k if k else 0
    if min(m, n, k) == 0:
        raise Unsupported("empty GEMM")
    if max(xv.numel(), cv.numel(), m * n) >= weight_only.INT32_MAX:
        raise Unsupported("tensor too large for the kernels' 32-bit indexing")
    return WeightOnlyProblem(anchor, precision, group_size, xv.dtype, out_dtype or xv.dtype, bias is not None, m, n, k)


def weight_only_candidates(group: KernelGroup, ctx: KernelContext) -> TemplateTuning:
    """The tuning problem of a weight_only_linear group: heuristic first, then ``CONFIGS`` of its path."""
    p = weight_only_problem(group)
    probe = Probe(group, ctx.device)
    first = weight_only.heuristic(p.m)
    configs = [first] + [c for path in weight_only.paths_for(p.m) for c in weight_only.CONFIGS[path]
                         if c != first and weight_only.worth_timing(c, p.m, p.dtype)
                         and weight_only.fits_registers(c, p.precision)]
    configs += [c for c in weight_only.tma_candidates(p.precision, p.m, p.dtype, p.k, ctx.device) if c != first]
    epilogue = _epilogue(group, p, ctx)
    a = p.anchor
    spec = gemv_build.GemvSpec(a, scaled_arg(a, "x"), scaled_arg(a, "codes"), scaled_arg(a, "scales"),
                               scaled_arg(a, "bias"), p.precision, p.group_size or 1, p.dtype, p.out_dtype, p.m, p.n, p.k)
    fused = gemv_build.gemv_plan(group, spec) if p.m <= weight_only.SKINNY_MAX_M else None
    if fused is not None and p.m > weight_only.GEMV_MAX_M and fused.row_values:
        fused = None  # row values mean one row a program: past GEMV_MAX_M rows, the skinny path
    if fused is not None:  # an unrounded x (gemv_prologue): the elementwise loops only
        configs = [c for c in configs if c.path != "gemv" or fused.runs(c)]
    candidates: List[Candidate] = [
        gemv_build.gemv_candidate(group, spec, cfg, probe, fused, ctx.pdl)
        if cfg.path in ("gemv", "tma") and fused is not None
        else _candidate(group, p, cfg, probe, epilogue) for cfg in configs]
    if ctx.device.type == "cuda":  # first, so a tuning budget never skips it
        candidates.insert(0, float_linear_candidate(p.m, p.n, p.k, p.dtype, p.has_bias, ctx.device))
    digest = _kernels_digest()
    template = digest[:16] + (tpl.source_hash(epilogue[1][0]) if epilogue is not None else "") + (
        tpl.source_hash(fused.source[0]) if fused is not None else "")
    key = TuningKey(kind="gemm", template=template, shapes=group_shapes(group), strides=group_strides(group),
                    dtypes=group_dtypes(group), extra=f"weight_only {p.precision} g{p.group_size} {'|'.join(group.ops)}")
    # the kernels are not generated: the source stored per group (engine cache, report) names them
    source = (f"# compile_backend/kernels/weight_only*.py sha256 {digest}: weight_only_linear, then "
              + ("the epilogue kernel below\n" + epilogue[1][0] if epilogue is not None else "the epilogue through ATen\n")
              + ("# gemv configs: the fused kernel below\n" + fused.source[0] if fused is not None else ""))
    return TemplateTuning("gemm", key, candidates, probe.make, {"triton": source})


def _epilogue(group: KernelGroup, p: WeightOnlyProblem, ctx: KernelContext):
    """(plan, generated epilogue source) for the group's chain, or None: no chain, or one the
    template cannot express (then it runs through ATen)."""
    try:
        plan = tpl.plan_epilogue(group, p.anchor, "acc_v")
    except Unsupported:
        return None
    if anchor_only(plan):
        return None
    dot = tpl.dot_fields(dtype_name(p.dtype), False, ctx.device.type != "cuda", False)
    return plan, tpl.render_gemm(tpl.epilogue_spec(plan, ["acc_v = acc"]), dot)


def _candidate(group: KernelGroup, p: WeightOnlyProblem, cfg: weight_only.WeightOnlyConfig, probe: Probe,
               epilogue) -> Candidate:
    name = (f"triton weight-only {cfg.path}{' wf' if cfg.weights_first else ''} {cfg.block_m}x{cfg.block_n}x"
            f"{cfg.block_k} split{cfg.split_k} w{cfg.num_warps} s{cfg.num_stages}")
    config = {"impl": "triton", "weight_only": p.precision, **dataclasses.asdict(cfg)}

    def compile_():
        if epilogue is None:
            return warmed(_GroupRunner(group, p.anchor, cfg), probe)
        plan, source = epilogue
        return warmed(_FusedRunner(group, p.anchor, cfg, plan, tpl.load_kernel(*source)), probe)

    return Candidate(name + (" + triton epilogue" if epilogue is not None else ""), config, compile_, "triton")


class _FusedRunner:
    """The anchor through the Triton launcher, then the chain as one generated epilogue kernel
    over its output, in the template's (1, rows, N) index space."""

    def __init__(self, group: KernelGroup, anchor: fx.Node, cfg: weight_only.WeightOnlyConfig, plan, kernel) -> None:
        self.group, self.anchor, self.cfg, self.plan, self.kernel = group, anchor, cfg, plan, kernel

    def __call__(self, *inputs: Any) -> Tuple[Any, ...]:
        plan = self.plan
        env = tpl.bind_group(plan, self.group, inputs)
        args = fx.node.map_arg(self.anchor.args, env.__getitem__)
        kwargs = fx.node.map_arg(self.anchor.kwargs, env.__getitem__)
        y = _anchor_call(self.anchor, args, kwargs, self.cfg)
        n = y.shape[-1]

        def rows(t: torch.Tensor) -> torch.Tensor:  # [..., N] -> [1, rows, N]: a view for planned outputs
            return t.reshape(1, -1, n)

        loads = [rows(tpl.to_anchor_space(env[lp.source], lp, plan.anchor_shape)) for lp in plan.loads]
        outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, y.device)
        epilogue_only(self.kernel, rows(y), loads, [rows(v) for v in views])
        return tpl.group_outputs(plan, env, outs)


def _anchor_call(anchor: fx.Node, args: tuple, kwargs: dict, cfg: weight_only.WeightOnlyConfig) -> torch.Tensor:
    bound = _bind(anchor, args, kwargs)
    return weight_only.weight_only_linear(
        bound["x"], bound["codes"], bound["scales"], bound["bias"], precision=bound["precision"],
        group_size=bound["group_size"], out_dtype=bound["out_dtype"], config=cfg)


class _GroupRunner:
    """Runs the group's graph: the anchor through the Triton launcher with ``cfg``, the epilogue
    (if any) through ATen. A plain loop over the nodes, resolved once (no fx.Interpreter)."""

    def __init__(self, group: KernelGroup, anchor: fx.Node, cfg: weight_only.WeightOnlyConfig) -> None:
        self.gm, self.anchor, self.cfg = group.gm, anchor, cfg
        self.nodes = [n for n in group.gm.graph.nodes if n.op not in ("placeholder", "output")]
        self.placeholders = group.placeholders
        self.output = next(n for n in group.gm.graph.nodes if n.op == "output")

    def __call__(self, *inputs: Any) -> Tuple[Any, ...]:
        env: Dict[fx.Node, Any] = dict(zip(self.placeholders, inputs))
        for node in self.nodes:
            if node.op == "get_attr":
                env[node] = getattr(self.gm, node.target)
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node is self.anchor:
                env[node] = _anchor_call(node, args, kwargs, self.cfg)
            else:
                env[node] = node.target(*args, **kwargs)
        return tuple(fx.node.map_arg(self.output.args[0], env.__getitem__))


def _bind(node: fx.Node, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The anchor's arguments by name (positional or keyword, defaults from its schema)."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        out[arg.name] = args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
    return out


@functools.lru_cache(maxsize=1)
def _kernels_digest() -> str:
    """sha256 of the kernels' modules: it keys tuning records and cached plans (a changed kernel
    is tuned and validated again)."""
    digest = hashlib.sha256()
    for module in (weight_only, weight_only_parts, weight_only_tma, gemv_build.gemv, gemv_build.gemv_prologue):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


__all__ = ["build_weight_only_linear", "weight_only_candidates", "weight_only_problem", "WeightOnlyProblem"]
