"""Generated Triton kernels for row reductions with fused pointwise prologue and epilogue.

A group qualifies when all its reductions reduce the same dims of one iteration shape ``X``
(softmax, log-softmax, native_layer_norm, sum/mean/amax/amin/var/std/var_mean/logsumexp over
any dims, and decomposed chains such as RMS norm), with any pointwise ops (``expr``) around
them. ``X`` splits into kept dims (rows: one program handles XBLOCK rows) and reduced dims
(a row: RBLOCK elements per step); both sides are walked through each tensor's strides, so
reducing a non-last dim needs no transpose: with the kept dim contiguous, tiles are read
coalesced along rows.

The plan (IR, analysis) is in ``reduction_plan``. Layers here: ``_emit`` writes the @triton.jit kernel; ``ReductionLauncher`` checks inputs,
evaluates host views, allocates outputs, launches; ``build_reduction`` is the builder.

Two shapes of kernel (``ReductionConfig.persistent``):
* persistent: the row (rblock >= row length) lives in registers, read once; every reduction
  and epilogue op works on it in place.
* looped: each reduction *stage* (reductions that need results of earlier ones run a stage
  later) loops over the row in RBLOCK chunks, recomputing the prologue from loads; a final loop
  writes row-shaped outputs. The softmax family's sum of exponentials runs in its max's pass
  (online softmax, ``OnlineSum``): softmax reads the row twice, logsumexp once; layer norm
  3 times. Loads carry L2 eviction hints: keep a row for a later pass, drop it after its last.
Full tiles (row length a multiple of RBLOCK, rows a multiple of XBLOCK) are emitted without
masks.

Numerics: reductions accumulate in fp32 (fp64 for fp64, int64 for integer sums); softmax
subtracts the row max; variance is corrected two-pass (mean first, then the sums of the
deviations and of their squares in one pass: exact to fp32 rounding even for a mean far larger
than the spread, where a plain two-pass loses (rounding of the mean / std)**2);
max/min propagate NaN like torch. Semantic ops round only their outputs (eager computes them
in fp32 internally); pointwise ops round like eager (see ``expr``). An fp16/bf16 softmax
multiplies by the reciprocal of the sum instead of dividing (at most one ulp of the output,
rarely).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import expr
from .base import Kernel, KernelContext, KernelGroup, Unsupported, output_tensor
from .launch import ReductionConfig, load_source, map_nodes, output_order, reduction_heuristic, strides_for
from .pointwise import INT32_MAX, collapse
from .reduction_plan import ReductionPlan, Store, Val, emit_exp, analyze


# ------------------------------------------------------------------------------------ codegen
def _needed(plan: ReductionPlan) -> set:
    seen, stack = set(), [s.val for s in plan.stores]
    while stack:
        v = stack.pop()
        if v not in seen:
            seen.add(v)
            stack.extend(v.deps)
    return seen


def _emit(plan: ReductionPlan, patterns: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...]]],
          ksizes: Sequence[int], rsizes: Sequence[int], persistent: bool, wide: bool,
          even_x: bool = False, even_r: bool = False) -> str:
    """The Triton module for one layout pattern. patterns: per tensor (loads, then stores), the
    merged kept dims and merged reduced dims it moves along. even_x: the row count is a multiple
    of XBLOCK; even_r: the row length is a multiple of RBLOCK (persistent: equal to it). Masks
    are emitted only for a side that can run past its end: a full tile loads, reduces and
    stores without ``where``s (two instructions per element less in a softmax)."""
    n_in = len(plan.loads)
    tensors = [f"in{i}" for i in range(n_in)] + [f"out{j}" for j in range(len(plan.stores))]
    params = [f"{t}_ptr" for t in tensors] + [f"s_{n.name}" for n in plan.scalars]
    for t, (kt, rt) in zip(tensors, patterns):
        params += [f"{t}_xs{j}" for j in kt] + [f"{t}_rs{j}" for j in rt]
    lines: List[str] = []
    ind = "    "
    xm = None if even_x else "xmask"
    rm = None if even_r else "rmask"
    tile_mask = "mask" if xm and rm else xm or rm  # mask of an [XBLOCK, RBLOCK] tile, or None
    hints: Dict[int, str] = {}  # load index -> eviction policy, in the loop being emitted

    def out(line: str) -> None:
        lines.append(ind + line)

    def decompose(prefix: str, index: str, sizes: Sequence[int]) -> None:
        # sizes are literals: div/mod by a constant is cheap, by a runtime value it is not
        rest, n = index, len(sizes)
        for j in range(n - 1, 0, -1):
            out(f"{prefix}{j} = {rest} % {sizes[j]}")
            out(f"{prefix}q{j} = {rest} // {sizes[j]}")
            rest = f"{prefix}q{j}"
        if n:
            out(f"{prefix}0 = {rest}")

    def address(t: str, pattern) -> Tuple[str, Optional[str]]:
        kt, rt = pattern
        terms = [f"xi{j} * {t}_xs{j}" for j in kt] + [f"ri{j} * {t}_rs{j}" for j in rt]
        mask = tile_mask if kt and rt else xm if kt else rm if rt else None
        return (" + ".join(terms) or "0"), mask

    out("pid = tl.program_id(0)")
    out(f"xindex = {'pid.to(tl.int64)' if wide else 'pid'} * XBLOCK + tl.arange(0, XBLOCK)[:, None]")
    if xm:
        out(f"xmask = xindex < {plan.xnumel}")
    decompose("xi", "xindex", ksizes)
    out(f"rbase = tl.arange(0, RBLOCK)[None, :]{'.to(tl.int64)' if wide else ''}")

    def r_prelude(start: str) -> None:
        out(f"rindex = {start}rbase")
        if rm:
            out(f"rmask = rindex < {plan.rnumel}")
        decompose("ri", "rindex", rsizes)
        if xm and rm:
            out("mask = xmask & rmask")

    needed = _needed(plan)
    names: Dict[Val, str] = {n_val: f"s_{n.name}" for n, n_val in plan.scalar_vals.items()}

    def render(v: Val, name_of) -> str:
        if v.load is not None:
            addr, mask = address(f"in{v.load}", patterns[v.load])
            args = [f"in{v.load}_ptr + {addr}"] + ([f"mask={mask}", "other=0"] if mask else [])
            if v.load in hints:
                args.append(f'eviction_policy="{hints[v.load]}"')
            return expr.to_compute(f"tl.load({', '.join(args)})", plan.loads[v.load].source.meta["val"].dtype)
        return v.render(name_of)

    def masked(v: Val, value: str) -> str:
        # past the row's end a reduction sees its neutral element; rows past the last one
        # (xmask) compute values that are never stored, so they need no mask here
        return f"tl.where(rmask, {value}, {expr.reduce_neutral(v.reduce, v.dtype)})" if rm else value

    def reduce_expr(v: Val, value: str) -> str:
        # a reduction sums/maxes a full [XBLOCK, RBLOCK] tile: the value's own shape may be
        # narrower although it varies along the row logically. A row of one element, a
        # constant (ones_like), or an input broadcast along the reduced dims (expand: stride 0
        # there, so its load has no r index and is [XBLOCK, 1]) would otherwise be reduced as
        # one element instead of RBLOCK copies. Broadcasting a full tile is free.
        value = f"tl.broadcast_to({value}, [XBLOCK, RBLOCK])"
        return expr.REDUCE_OPS[v.reduce][0].format(x=masked(v, value)) + "[:, None]"

    def emit_global(v: Val) -> None:
        if v in names:
            return
        assert v.level == "perrow" and v.reduce is None, v.base
        for d in v.deps:
            emit_global(d)
        out(f"{v.base} = {render(v, names.__getitem__)}")
        names[v] = v.base

    def row_closure(targets: Sequence[Val]) -> set:
        """Row values (computed in a loop chunk) the targets need."""
        closure, stack = set(), list(targets)
        while stack:
            v = stack.pop()
            if v in closure or v in names or v.level != "row":
                continue
            closure.add(v)
            stack.extend(v.deps)
        return closure

    def emit_chunk(targets: Sequence[Val], suffix: str) -> Dict[Val, str]:
        """Row values the targets need, computed in the current chunk (perrow ones are global)."""
        local: Dict[Val, str] = {}
        closure = row_closure(targets)
        lookup = lambda v: local.get(v) or names[v]  # noqa: E731
        for v in plan.vals:
            if v in closure:
                local[v] = v.base + suffix
                out(f"{local[v]} = {render(v, lookup)}")
        return local

    def store(j: int, s: Store, value: str) -> None:
        addr, _ = address(f"out{j}", patterns[n_in + j])
        shape = "[XBLOCK, RBLOCK]" if s.level == "row" else "[XBLOCK, 1]"
        if addr == "0":  # a single element: the pointer must still be a block
            addr = f"tl.zeros({shape}, tl.int32)"
        mask = tile_mask if s.level == "row" else xm
        value = expr.to_storage(f"tl.broadcast_to({value}, {shape})", s.node.meta["val"].dtype)
        out(f"tl.store(out{j}_ptr + {addr}, {value}" + (f", mask={mask})" if mask else ")"))

    def perrow_deps(vals: Sequence[Val]) -> List[Val]:
        found, stack, seen = [], list(vals), set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if v.level == "row":
                stack.extend(v.deps)
            elif v.reduce is None:
                found.append(v)
        return sorted(found, key=plan.vals.index)

    row_stores = [(j, s) for j, s in enumerate(plan.stores) if s.level == "row"]
    if persistent:
        r_prelude("")
        for v in plan.vals:
            if v in needed and v not in names:
                if v.reduce is not None:
                    src = names[v.deps[0]]
                    out(f"{v.base} = {reduce_expr(v, src)}")
                else:
                    out(f"{v.base} = {render(v, names.__getitem__)}")
                names[v] = v.base
        for j, s in enumerate(plan.stores):
            store(j, s, names[s.val])
    else:
        reductions = [v for v in plan.vals if v.reduce is not None and v in needed]
        # online softmax: a sum of exp(x - max) runs in the same pass as its max, rescaled
        # whenever the running max grows (2 reads of the row for softmax instead of 3)
        online = [v for v in reductions if v.online is not None]
        running = {v.online.max for v in online}
        stage: Dict[Val, int] = {}
        for v in plan.vals:  # stage of a value: how many reduction passes it waits for
            if v in online:
                stage[v] = stage[v.online.max]
                continue
            deps_stage = max([stage[d] for d in v.deps], default=0)
            stage[v] = deps_stage + 1 if v.reduce is not None else deps_stage

        def source(v: Val) -> Val:  # the row value a reduction consumes in its pass
            return v.online.x if v in online else v.deps[0]

        n_stages = max([stage[v] for v in reductions], default=0)
        groups = [[v for v in reductions if stage[v] == k] for k in range(1, n_stages + 1)]
        passes = [[source(v) for v in group] for group in groups]
        if row_stores:
            passes.append([s.val for _, s in row_stores])

        def set_hints(k: int) -> None:
            # a row tensor stays in L2 for a later pass and leaves it after its last one;
            # tensors broadcast over rows (a norm's weight) stay for the other rows
            reads = [{v.load for v in row_closure(p) if v.load is not None} for p in passes]
            hints.clear()
            for i in reads[k]:
                later = any(i in r for r in reads[k + 1:])
                hints[i] = "evict_last" if later or not patterns[i][0] else "evict_first"

        for k, group in enumerate(groups):
            for d in perrow_deps(passes[k]):
                emit_global(d)
            for v in group:
                t, neutral = expr.tl_type(v.dtype), expr.reduce_neutral(v.reduce, v.dtype)
                if v in running:
                    out(f"run_{v.base} = tl.full([XBLOCK, 1], {neutral}, {t})")
                elif v in online:
                    out(f"acc_{v.base} = tl.zeros([XBLOCK, RBLOCK], {t})")
                    out(f"ref_{v.base} = tl.zeros([XBLOCK, 1], {t})")
                else:
                    out(f"acc_{v.base} = tl.full([XBLOCK, RBLOCK], {neutral}, {t})")
            set_hints(k)
            out(f"for roffset in range(0, {plan.rnumel}, RBLOCK):")
            ind = "        "
            r_prelude("roffset + ")
            local = emit_chunk(passes[k], f"_p{k + 1}")
            value_of = lambda v: local.get(v) or names[v]  # noqa: E731
            for v in group:  # running maxima first: the sums rescale against them
                if v in running:
                    out(f"run_{v.base} = tl.maximum(run_{v.base}, {reduce_expr(v, value_of(v.deps[0]))})")
            for v in group:
                if v in online:
                    # the sum is kept relative to ref = the running max, or 0 while the max is
                    # +-inf. The clamp: ref drops only from the 0 of an all -inf prefix (the sum
                    # is 0 there and must stay 0, not 0 * inf) or when the max becomes +inf
                    # (the sum is inf from then on either way)
                    acc, ref, m = f"acc_{v.base}", f"ref_{v.base}", f"run_{v.online.max.base}"
                    out(f'{ref}_new = tl.where(tl.abs({m}) == float("inf"), 0.0, {m})')
                    term = masked(v, emit_exp(f"{value_of(v.online.x)} - {ref}_new", v.dtype))
                    out(f"{acc} = {acc} * {emit_exp(f'tl.minimum({ref} - {ref}_new, 0.0)', v.dtype)} + {term}")
                    out(f"{ref} = {ref}_new")
                elif v not in running:
                    acc = f"acc_{v.base}"
                    out(f"{acc} = " + expr.REDUCE_OPS[v.reduce][1].format(acc=acc, x=masked(v, value_of(v.deps[0]))))
            ind = "    "
            for v in group:
                if v in running:
                    out(f"{v.base} = run_{v.base}")
                elif v in online:
                    total = f"tl.sum(acc_{v.base}, 1)[:, None]"
                    if not v.online.safe_ref:  # relative to an infinite max itself: inf - inf
                        m = f"run_{v.online.max.base}"
                        total = f'tl.where(tl.abs({m}) == float("inf"), float("nan"), {total})'
                    out(f"{v.base} = {total}")
                else:
                    out(f"{v.base} = " + expr.REDUCE_OPS[v.reduce][0].format(x=f"acc_{v.base}") + "[:, None]")
                names[v] = v.base
        if row_stores:
            for d in perrow_deps(passes[-1]):
                emit_global(d)
            set_hints(len(passes) - 1)
            out(f"for roffset in range(0, {plan.rnumel}, RBLOCK):")
            ind = "        "
            r_prelude("roffset + ")
            local = emit_chunk(passes[-1], "_out")
            for j, s in row_stores:
                store(j, s, local.get(s.val) or names[s.val])
            ind = "    "
        hints.clear()
        for j, s in enumerate(plan.stores):
            if s.level != "row":
                emit_global(s.val) if s.val.reduce is None else None
                store(j, s, names[s.val])
    body = "\n".join(lines)
    header = ["import triton", "import triton.language as tl", "",
              f"# reduction over dims {plan.rdims} of {plan.x_shape}; {'persistent' if persistent else 'looped'}"]
    kernel = "\n\n@triton.jit\ndef reduction_kernel(" + ", ".join(params + ["XBLOCK: tl.constexpr", "RBLOCK: tl.constexpr"]) + \
        "):\n" + body + "\n"
    return "\n".join(header) + expr.REDUCE_HELPERS + expr.helper_source(kernel) + kernel


# ----------------------------------------------------------------------------------- launcher
@dataclasses.dataclass
class _Launch:
    kernel: Any
    source: str
    int_args: Tuple[int, ...]
    out_strides: List[Tuple[int, ...]]


class ReductionLauncher:
    """Checks inputs, evaluates host views, allocates outputs and launches the kernel."""

    def __init__(self, plan: ReductionPlan, config: ReductionConfig, device: torch.device):
        self.plan, self.config, self.device = plan, config, device
        self._launches: Dict[Tuple, _Launch] = {}
        self.last_compiled: Any = None

    def _xstrides(self, strides, xmap) -> List[int]:
        xs = [0] * len(self.plan.x_shape)
        for i, d in xmap:
            xs[d] = strides[i]
        return xs

    def _layout(self, tensors: Sequence[torch.Tensor]) -> _Launch:
        plan = self.plan
        for load, t in zip(plan.loads, tensors):
            want = load.source.meta["val"]
            if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"input {load.source.name}: kernel built for {want.dtype}{tuple(want.shape)}, "
                                 f"got {t.dtype}{tuple(t.shape)}")
        out_strides = [strides_for(tuple(s.node.meta["val"].shape), output_order(s.node.meta["val"]))
                       for s in plan.stores]
        xs = [self._xstrides(t.stride(), ld.xmap) for ld, t in zip(plan.loads, tensors)]
        xs += [self._xstrides(st, s.xmap) for s, st in zip(plan.stores, out_strides)]
        ksizes, kst = collapse(plan.x_shape, plan.kdims, xs)
        rsizes, rst = collapse(plan.x_shape, plan.rdims, xs)
        patterns = [(tuple(j for j, s in enumerate(k) if s), tuple(j for j, s in enumerate(r) if s))
                    for k, r in zip(kst, rst)]
        reach = max([plan.xnumel * plan.rnumel] + [
            sum((n - 1) * abs(x) for n, x in zip(t.shape, t.stride())) + 1 for t in tensors])
        cfg = self.config
        wide = reach + cfg.xblock * cfg.rblock > INT32_MAX
        even_x = plan.xnumel % cfg.xblock == 0
        even_r = plan.rnumel == cfg.rblock if cfg.persistent else plan.rnumel % cfg.rblock == 0
        source = _emit(plan, patterns, ksizes, rsizes, cfg.persistent, wide, even_x, even_r)
        int_args: Tuple[int, ...] = ()
        for (kt, rt), k, r in zip(patterns, kst, rst):
            int_args += tuple(k[j] for j in kt) + tuple(r[j] for j in rt)
        return _Launch(load_source(source).reduction_kernel, source, int_args, out_strides)

    def launch_for(self, tensors: Sequence[torch.Tensor]) -> _Launch:
        key = tuple((t.dtype, tuple(t.shape), t.stride()) for t in tensors)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = self._layout(tensors)
        return launch

    def out_layouts(self) -> Tuple[Any, ...]:
        """Per group output, the layout this launcher allocates (None: an input or a view of one)."""
        stored = {s.node: (tuple(s.node.meta["val"].shape), strides_for(tuple(s.node.meta["val"].shape),
                           output_order(s.node.meta["val"])), s.node.meta["val"].dtype) for s in self.plan.stores}
        return tuple(stored.get(o) for o in self.plan.outputs)

    def __call__(self, *inputs: Any, out: Optional[Sequence[Any]] = None) -> Tuple[Any, ...]:
        plan, cfg = self.plan, self.config
        if len(inputs) != len(plan.placeholders):
            raise ValueError(f"expected {len(plan.placeholders)} inputs, got {len(inputs)}")
        env: Dict[fx.Node, Any] = dict(zip(plan.placeholders, inputs))
        for v in plan.host_views:
            env[v] = v.target(*map_nodes(v.args, env), **map_nodes(v.kwargs, env))
        tensors = [env[ld.source] for ld in plan.loads]
        device = tensors[0].device if tensors else self.device
        launch = self.launch_for(tensors)
        outs = [output_tensor(out, plan.outputs.index(s.node), (tuple(s.node.meta["val"].shape), st,
                              s.node.meta["val"].dtype), device) for s, st in zip(plan.stores, launch.out_strides)]
        if plan.xnumel > 0:
            grid = (-(-plan.xnumel // cfg.xblock),)
            self.last_compiled = launch.kernel[grid](  # None under the interpreter
                *tensors, *outs, *[env[n] for n in plan.scalars], *launch.int_args, XBLOCK=cfg.xblock, RBLOCK=cfg.rblock, num_warps=cfg.num_warps)
        env.update((s.node, o) for s, o in zip(plan.stores, outs))
        return tuple(env[o] for o in plan.outputs)


def _row_contiguous(plan: ReductionPlan) -> bool:
    """Whether the main row-shaped input is contiguous along the innermost reduced dim."""
    inner = max(plan.rdims) if plan.rdims else None
    for ld in plan.loads:
        if ld.level != "row":
            continue
        for i, d in ld.xmap:
            if d == inner:
                return ld.source.meta["val"].stride(i) == 1
    return True


def build_reduction(group: KernelGroup, ctx: KernelContext,
                    config: Optional[ReductionConfig] = None) -> Kernel:
    """Kernel for a row-reduction group; ``config=None`` picks the heuristic launch parameters."""
    plan = analyze(group)
    if plan.rnumel == 0:
        raise Unsupported("reduction over an empty dim")
    row_inputs = sum(ld.level == "row" for ld in plan.loads)
    config = config or reduction_heuristic(plan.xnumel, plan.rnumel, _row_contiguous(plan), row_inputs)
    if config.persistent and config.rblock < plan.rnumel:
        raise Unsupported(f"persistent config with rblock {config.rblock} < row length {plan.rnumel}")
    launcher = ReductionLauncher(plan, config, ctx.device)
    source = launcher.launch_for([ld.source.meta["val"] for ld in plan.loads]).source
    return Kernel(kind="reduction", impl="triton", ops=group.ops, fn=launcher,
                  config=dataclasses.asdict(config), source=source,
                  supports_out=bool(plan.stores), out_layouts=launcher.out_layouts())
