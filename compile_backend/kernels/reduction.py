"""Generated Triton kernels for row reductions with fused pointwise prologue and epilogue.

A group qualifies when all its reductions reduce the same dims of one iteration shape ``X``
(softmax, log-softmax, native_layer_norm, sum/mean/amax/amin/var/std/var_mean/logsumexp over
any dims, and decomposed chains such as RMS norm), with any pointwise ops (``expr``) around
them. ``X`` splits into kept dims (rows: one program handles XBLOCK rows) and reduced dims
(a row: RBLOCK elements per step); both sides are walked through each tensor's strides, so
reducing a non-last dim needs no transpose: with the kept dim contiguous, tiles are read
coalesced along rows.

The plan (IR, analysis) is in ``reduction_plan``. Layers here: ``_emit`` writes the @triton.jit
kernel (``_Body`` holds the building blocks: indices, loads, masked reductions, stores;
``_persistent`` and ``_looped`` are the two kernel shapes, the latter in steps per pass:
accumulators, accumulate a chunk, finish); ``ReductionLauncher`` checks inputs, evaluates host
views, allocates outputs, launches; ``build_reduction`` is the builder.

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

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import expr, pdl
from .base import Kernel, KernelContext, KernelGroup, Unsupported, output_tensor
from .launch import (Counters, ReductionConfig, load_source, map_nodes, output_order, reduction_heuristic,
                     reduction_split, strides_for)
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
          even_x: bool = False, even_r: bool = False, split: Optional["_Split"] = None) -> str:
    """The Triton module for one layout pattern. patterns: per tensor (loads, then stores), the
    merged kept dims and merged reduced dims it moves along. even_x: the row count is a multiple
    of XBLOCK; even_r: the row length is a multiple of RBLOCK (persistent: equal to it), or with
    ``split`` of its part of the row. Masks are emitted only for a side that can run past its
    end: a full tile loads, reduces and stores without ``where``s (two instructions per element
    less in a softmax)."""
    body = _Body(plan, patterns, rsizes, wide, even_x, even_r)
    body.row_block(ksizes)
    if persistent:
        _persistent(body)
    elif split is not None:
        _split_looped(body, _schedule(plan), split)
    else:
        _looped(body, _schedule(plan))
    return _module(plan, patterns, persistent, body.lines, split)


def _module(plan: ReductionPlan, patterns, persistent: bool, lines: List[str],
            split: Optional["_Split"] = None) -> str:
    """The module around a kernel body: imports, helpers the body calls, the signature."""
    tensors = [f"in{i}" for i in range(len(plan.loads))] + [f"out{j}" for j in range(len(plan.stores))]
    params = [f"{t}_ptr" for t in tensors]
    if split is not None:  # the partial results' workspaces and the arrival counters
        params += [f"ws{i}_ptr" for i in range(len(split.reductions))] + ["cnt_ptr"]
    params += [f"s_{n.name}" for n in plan.scalars]
    for t, (kt, rt) in zip(tensors, patterns):
        params += [f"{t}_xs{j}" for j in kt] + [f"{t}_rs{j}" for j in rt]
    header = ["import triton", "import triton.language as tl", "",
              f"# reduction over dims {plan.rdims} of {plan.x_shape}; {'persistent' if persistent else 'looped'}"
              + (f", the row split in {split.parts}" if split is not None else "")]
    kernel = "\n\n@triton.jit\ndef reduction_kernel(" + ", ".join(params + ["XBLOCK: tl.constexpr", "RBLOCK: tl.constexpr"]) + \
        "):\n" + "\n".join(lines) + "\n"
    return "\n".join(header) + expr.REDUCE_HELPERS + expr.helper_source(kernel) + kernel


class _Body:
    """The kernel body being written: its lines, the names of the values defined so far (kernel
    scope; a loop chunk's values are local to it), and the building blocks every kernel shape
    uses: index decomposition, addresses, loads, masked reductions, stores."""

    def __init__(self, plan: ReductionPlan, patterns, rsizes: Sequence[int], wide: bool,
                 even_x: bool, even_r: bool):
        self.plan, self.patterns, self.rsizes, self.wide = plan, patterns, rsizes, wide
        self.lines: List[str] = []
        self.depth = 1
        self.xm = None if even_x else "xmask"
        self.rm = None if even_r else "rmask"
        self.tile_mask = "mask" if self.xm and self.rm else self.xm or self.rm  # of an [XBLOCK, RBLOCK] tile
        self.hints: Dict[int, str] = {}  # load index -> eviction policy, in the loop being emitted
        self.names: Dict[Val, str] = {v: f"s_{n.name}" for n, v in plan.scalar_vals.items()}

    def out(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    # ---- indices
    def decompose(self, prefix: str, index: str, sizes: Sequence[int]) -> None:
        # sizes are literals: div/mod by a constant is cheap, by a runtime value it is not
        rest, n = index, len(sizes)
        for j in range(n - 1, 0, -1):
            self.out(f"{prefix}{j} = {rest} % {sizes[j]}")
            self.out(f"{prefix}q{j} = {rest} // {sizes[j]}")
            rest = f"{prefix}q{j}"
        if n:
            self.out(f"{prefix}0 = {rest}")

    def row_block(self, ksizes: Sequence[int]) -> None:
        """The XBLOCK rows of this program, split into kept dims; the row offsets of a chunk."""
        self.out("pid = tl.program_id(0)")
        self.out(f"xindex = {'pid.to(tl.int64)' if self.wide else 'pid'} * XBLOCK + tl.arange(0, XBLOCK)[:, None]")
        if self.xm:
            self.out(f"xmask = xindex < {self.plan.xnumel}")
        self.decompose("xi", "xindex", ksizes)
        self.out(f"rbase = tl.arange(0, RBLOCK)[None, :]{'.to(tl.int64)' if self.wide else ''}")

    def chunk(self, start: str) -> None:
        """The RBLOCK elements of a row starting at ``start``, split into reduced dims."""
        self.out(f"rindex = {start}rbase")
        if self.rm:
            self.out(f"rmask = rindex < {self.plan.rnumel}")
        self.decompose("ri", "rindex", self.rsizes)
        if self.xm and self.rm:
            self.out("mask = xmask & rmask")

    @contextlib.contextmanager
    def row_loop(self, start: str = "0", stop: Optional[str] = None) -> Iterator[None]:
        """A loop over the row (or its part from ``start`` to ``stop``) in RBLOCK chunks; the
        body is emitted inside the ``with``."""
        self.out(f"for roffset in range({start}, {stop or self.plan.rnumel}, RBLOCK):")
        self.depth += 1
        self.chunk("roffset + ")
        yield
        self.depth -= 1

    def address(self, t: str, pattern) -> Tuple[str, Optional[str]]:
        kt, rt = pattern
        terms = [f"xi{j} * {t}_xs{j}" for j in kt] + [f"ri{j} * {t}_rs{j}" for j in rt]
        mask = self.tile_mask if kt and rt else self.xm if kt else self.rm if rt else None
        return (" + ".join(terms) or "0"), mask

    # ---- values
    def render(self, v: Val, name_of) -> str:
        if v.load is not None:
            addr, mask = self.address(f"in{v.load}", self.patterns[v.load])
            args = [f"in{v.load}_ptr + {addr}"] + ([f"mask={mask}", "other=0"] if mask else [])
            if v.load in self.hints:
                args.append(f'eviction_policy="{self.hints[v.load]}"')
            return expr.to_compute(f"tl.load({', '.join(args)})", self.plan.loads[v.load].source.meta["val"].dtype)
        return v.render(name_of)

    def masked(self, v: Val, value: str) -> str:
        # past the row's end a reduction sees its neutral element; rows past the last one
        # (xmask) compute values that are never stored, so they need no mask here
        return f"tl.where(rmask, {value}, {expr.reduce_neutral(v.reduce, v.dtype)})" if self.rm else value

    def reduce_expr(self, v: Val, value: str) -> str:
        # a reduction sums/maxes a full [XBLOCK, RBLOCK] tile: the value's own shape may be
        # narrower although it varies along the row logically. A row of one element, a
        # constant (ones_like), or an input broadcast along the reduced dims (expand: stride 0
        # there, so its load has no r index and is [XBLOCK, 1]) would otherwise be reduced as
        # one element instead of RBLOCK copies. Broadcasting a full tile is free.
        value = f"tl.broadcast_to({value}, [XBLOCK, RBLOCK])"
        return expr.REDUCE_OPS[v.reduce][0].format(x=self.masked(v, value)) + "[:, None]"

    def define(self, v: Val, value: str) -> None:
        """A kernel-scope value."""
        self.out(f"{v.base} = {value}")
        self.names[v] = v.base

    def emit_global(self, v: Val) -> None:
        """A per-row value and the per-row values it needs, once, at kernel scope."""
        if v in self.names:
            return
        assert v.level == "perrow" and v.reduce is None, v.base
        for d in v.deps:
            self.emit_global(d)
        self.define(v, self.render(v, self.names.__getitem__))

    def emit_perrow_deps(self, vals: Sequence[Val]) -> None:
        """The per-row values (not reductions) a loop over the row for ``vals`` reads."""
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
        for d in sorted(found, key=self.plan.vals.index):
            self.emit_global(d)

    def row_closure(self, targets: Sequence[Val]) -> set:
        """Row values (computed in a loop chunk) the targets need."""
        closure, stack = set(), list(targets)
        while stack:
            v = stack.pop()
            if v in closure or v in self.names or v.level != "row":
                continue
            closure.add(v)
            stack.extend(v.deps)
        return closure

    def emit_chunk(self, targets: Sequence[Val], suffix: str) -> Callable[[Val], str]:
        """Row values the targets need, computed in the current chunk (perrow ones are global);
        returns the name of a value in the chunk."""
        local: Dict[Val, str] = {}
        closure = self.row_closure(targets)
        lookup = lambda v: local.get(v) or self.names[v]  # noqa: E731
        for v in self.plan.vals:
            if v in closure:
                local[v] = v.base + suffix
                self.out(f"{local[v]} = {self.render(v, lookup)}")
        return lookup

    def store(self, j: int, s: Store, value: str) -> None:
        addr, _ = self.address(f"out{j}", self.patterns[len(self.plan.loads) + j])
        shape = "[XBLOCK, RBLOCK]" if s.level == "row" else "[XBLOCK, 1]"
        if addr == "0":  # a single element: the pointer must still be a block
            addr = f"tl.zeros({shape}, tl.int32)"
        mask = self.tile_mask if s.level == "row" else self.xm
        value = expr.to_storage(f"tl.broadcast_to({value}, {shape})", s.node.meta["val"].dtype)
        self.out(f"tl.store(out{j}_ptr + {addr}, {value}" + (f", mask={mask})" if mask else ")"))


# ---- persistent kernel: the whole row is one chunk
def _persistent(b: _Body) -> None:
    """Every needed value in creation order on the row in registers, then every store."""
    b.chunk("")
    needed = _needed(b.plan)
    for v in b.plan.vals:
        if v in needed and v not in b.names:
            if v.reduce is not None:
                b.define(v, b.reduce_expr(v, b.names[v.deps[0]]))
            else:
                b.define(v, b.render(v, b.names.__getitem__))
    for j, s in enumerate(b.plan.stores):
        b.store(j, s, b.names[s.val])


# ---- looped kernel: one loop over the row per reduction stage, one for row-shaped outputs
@dataclasses.dataclass
class _Schedule:
    """The passes of a looped kernel over the row. stages[k]: the reductions of pass k (those
    waiting for k earlier reductions); passes[k]: the row values pass k consumes (one more pass
    for the row-shaped stores, if any). online: softmax-family sums computed in their max's
    pass; running: those maxima (kept as running maxima the sums rescale against)."""

    stages: List[List[Val]]
    passes: List[List[Val]]
    row_stores: List[Tuple[int, Store]]
    online: set
    running: set


def _schedule(plan: ReductionPlan) -> _Schedule:
    needed = _needed(plan)
    reductions = [v for v in plan.vals if v.reduce is not None and v in needed]
    # online softmax: a sum of exp(x - max) runs in the same pass as its max, rescaled
    # whenever the running max grows (2 reads of the row for softmax instead of 3)
    online = {v for v in reductions if v.online is not None}
    stage: Dict[Val, int] = {}
    for v in plan.vals:  # stage of a value: how many reduction passes it waits for
        if v in online:
            stage[v] = stage[v.online.max]
            continue
        deps_stage = max([stage[d] for d in v.deps], default=0)
        stage[v] = deps_stage + 1 if v.reduce is not None else deps_stage
    n_stages = max([stage[v] for v in reductions], default=0)
    stages = [[v for v in reductions if stage[v] == k] for k in range(1, n_stages + 1)]
    # the row value a reduction consumes in its pass
    passes = [[v.online.x if v in online else v.deps[0] for v in group] for group in stages]
    row_stores = [(j, s) for j, s in enumerate(plan.stores) if s.level == "row"]
    if row_stores:
        passes.append([s.val for _, s in row_stores])
    return _Schedule(stages, passes, row_stores, online, {v.online.max for v in online})


def _looped(b: _Body, sched: _Schedule) -> None:
    for k in range(len(sched.stages)):
        _reduction_pass(b, sched, k)
    if sched.row_stores:
        _row_store_pass(b, sched)
    b.hints.clear()
    for j, s in enumerate(b.plan.stores):
        if s.level != "row":
            if s.val.reduce is None:
                b.emit_global(s.val)
            b.store(j, s, b.names[s.val])


@dataclasses.dataclass(frozen=True)
class _Split:
    """A one-stage looped reduction whose row is cut in ``parts`` (``chunk`` elements each, a
    multiple of RBLOCK): program (x, p) reduces part p of its rows and stores its partial results
    (``reductions``, in order) to a workspace [parts, rows] per reduction; the last of a row
    block's programs to arrive (an atomic counter per block, acquire/release) reduces the partials
    in part order, so the result does not depend on the order the programs ran in, computes the
    per-row outputs and stores them, and sets the counter back to 0 for the next launch."""

    parts: int
    chunk: int
    rows: int  # workspace rows: the row blocks times XBLOCK
    reductions: Tuple[Val, ...]


def splittable(plan: ReductionPlan) -> bool:
    """Whether the plan's kernel can run split: one reduction stage (each reduction reads the
    row alone, not another reduction's result), no online softmax sums, no row-shaped outputs."""
    sched = _schedule(plan)
    return len(sched.stages) == 1 and not sched.row_stores and not sched.online and not sched.running


def _split_looped(b: _Body, sched: _Schedule, split: _Split) -> None:
    group = sched.stages[0]
    assert tuple(group) == split.reductions and not sched.row_stores and not sched.online
    b.out("pid_s = tl.program_id(1)")
    b.emit_perrow_deps(sched.passes[0])
    _init_accumulators(b, sched, group)
    _set_hints(b, sched, 0)
    with b.row_loop(f"pid_s * {split.chunk}", f"pid_s * {split.chunk} + {split.chunk}"):
        value_of = b.emit_chunk(sched.passes[0], "_p1")
        _accumulate(b, sched, group, value_of)
    _finish_reductions(b, sched, group)
    for i, v in enumerate(group):  # this part's results, rows past the end included (never read)
        b.out(f"tl.store(ws{i}_ptr + pid_s * {split.rows} + xindex, {b.names[v]})")
    b.out("tl.debug_barrier()  # every thread's partials are written before the release below")
    b.out('arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")')
    b.out(f"if arrived == {split.parts - 1}:")
    b.depth += 1
    b.out("tl.store(cnt_ptr + pid, 0)  # every part has arrived: the counter is free for the next launch")
    b.out(f"parts = tl.arange(0, {split.parts})[None, :] * {split.rows}")
    for i, v in enumerate(group):
        tile = f'tl.load(ws{i}_ptr + parts + xindex, cache_modifier=".cg")'
        b.out(f"{v.base} = " + expr.REDUCE_OPS[v.reduce][0].format(x=tile) + "[:, None]")
    b.hints.clear()
    for j, s in enumerate(b.plan.stores):
        if s.val.reduce is None:
            b.emit_global(s.val)
        b.store(j, s, b.names[s.val])
    b.depth -= 1


def _set_hints(b: _Body, sched: _Schedule, k: int) -> None:
    # a row tensor stays in L2 for a later pass and leaves it after its last one;
    # tensors broadcast over rows (a norm's weight) stay for the other rows
    reads = [{v.load for v in b.row_closure(p) if v.load is not None} for p in sched.passes]
    b.hints.clear()
    for i in reads[k]:
        later = any(i in r for r in reads[k + 1:])
        b.hints[i] = "evict_last" if later or not b.patterns[i][0] else "evict_first"


def _reduction_pass(b: _Body, sched: _Schedule, k: int) -> None:
    """Pass k: accumulators, a loop over the row accumulating chunks, the reduced values."""
    group = sched.stages[k]
    b.emit_perrow_deps(sched.passes[k])
    _init_accumulators(b, sched, group)
    _set_hints(b, sched, k)
    with b.row_loop():
        value_of = b.emit_chunk(sched.passes[k], f"_p{k + 1}")
        _accumulate(b, sched, group, value_of)
    _finish_reductions(b, sched, group)


def _init_accumulators(b: _Body, sched: _Schedule, group: Sequence[Val]) -> None:
    for v in group:
        t, neutral = expr.tl_type(v.dtype), expr.reduce_neutral(v.reduce, v.dtype)
        if v in sched.running:
            b.out(f"run_{v.base} = tl.full([XBLOCK, 1], {neutral}, {t})")
        elif v in sched.online:
            b.out(f"acc_{v.base} = tl.zeros([XBLOCK, RBLOCK], {t})")
            b.out(f"ref_{v.base} = tl.zeros([XBLOCK, 1], {t})")
        else:
            b.out(f"acc_{v.base} = tl.full([XBLOCK, RBLOCK], {neutral}, {t})")


def _accumulate(b: _Body, sched: _Schedule, group: Sequence[Val], value_of: Callable[[Val], str]) -> None:
    """One chunk into every accumulator of the pass."""
    for v in group:  # running maxima first: the sums rescale against them
        if v in sched.running:
            b.out(f"run_{v.base} = tl.maximum(run_{v.base}, {b.reduce_expr(v, value_of(v.deps[0]))})")
    for v in group:
        if v in sched.online:
            _accumulate_online(b, v, value_of)
        elif v not in sched.running:
            acc = f"acc_{v.base}"
            b.out(f"{acc} = " + expr.REDUCE_OPS[v.reduce][1].format(acc=acc, x=b.masked(v, value_of(v.deps[0]))))


def _accumulate_online(b: _Body, v: Val, value_of: Callable[[Val], str]) -> None:
    # the sum is kept relative to ref = the running max, or 0 while the max is
    # +-inf. The clamp: ref drops only from the 0 of an all -inf prefix (the sum
    # is 0 there and must stay 0, not 0 * inf) or when the max becomes +inf
    # (the sum is inf from then on either way)
    acc, ref, m = f"acc_{v.base}", f"ref_{v.base}", f"run_{v.online.max.base}"
    b.out(f'{ref}_new = tl.where(tl.abs({m}) == float("inf"), 0.0, {m})')
    term = b.masked(v, emit_exp(f"{value_of(v.online.x)} - {ref}_new", v.dtype))
    b.out(f"{acc} = {acc} * {emit_exp(f'tl.minimum({ref} - {ref}_new, 0.0)', v.dtype)} + {term}")
    b.out(f"{ref} = {ref}_new")


def _finish_reductions(b: _Body, sched: _Schedule, group: Sequence[Val]) -> None:
    """After the loop: each reduction's [XBLOCK, 1] value from its accumulator."""
    for v in group:
        if v in sched.running:
            b.define(v, f"run_{v.base}")
        elif v in sched.online:
            total = f"tl.sum(acc_{v.base}, 1)[:, None]"
            if not v.online.safe_ref:  # relative to an infinite max itself: inf - inf
                m = f"run_{v.online.max.base}"
                total = f'tl.where(tl.abs({m}) == float("inf"), float("nan"), {total})'
            b.define(v, total)
        else:
            b.define(v, expr.REDUCE_OPS[v.reduce][0].format(x=f"acc_{v.base}") + "[:, None]")


def _row_store_pass(b: _Body, sched: _Schedule) -> None:
    """The last loop over the row: computes and stores the row-shaped outputs."""
    b.emit_perrow_deps(sched.passes[-1])
    _set_hints(b, sched, len(sched.passes) - 1)
    with b.row_loop():
        value_of = b.emit_chunk(sched.passes[-1], "_out")
        for j, s in sched.row_stores:
            b.store(j, s, value_of(s.val))


# ----------------------------------------------------------------------------------- launcher
@dataclasses.dataclass
class _Launch:
    kernel: Any
    source: str
    int_args: Tuple[int, ...]
    out_strides: List[Tuple[int, ...]]


class ReductionLauncher:
    """Checks inputs, evaluates host views, allocates outputs and launches the kernel."""

    def __init__(self, plan: ReductionPlan, config: ReductionConfig, device: torch.device, pdl: bool = False):
        self.plan, self.config, self.device, self.pdl = plan, config, device, pdl
        self._launches: Dict[Tuple, _Launch] = {}
        self.last_compiled: Any = None
        self.split: Optional[_Split] = None
        self.counters: Optional[Counters] = None
        if config.split > 1:
            if config.persistent or not splittable(plan):
                raise Unsupported("a split reduction needs a looped kernel of one stage without row outputs")
            blocks = -(-plan.xnumel // config.xblock)
            per_part = -(-plan.rnumel // config.split)
            chunk = -(-per_part // config.rblock) * config.rblock
            self.split = _Split(config.split, chunk, blocks * config.xblock, tuple(_schedule(plan).stages[0]))
            self.counters = Counters()

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
        split = self.split
        if split is not None:  # every part full: a chunk dividing the row is not enough, as the
            # parts' count is a power of two (the last parts may start past the row's end)
            even_r = split.parts * split.chunk == plan.rnumel
        source = _emit(plan, patterns, ksizes, rsizes, cfg.persistent, wide, even_x, even_r, split)
        if self.pdl:
            source = pdl.with_entry(source, "reduction_kernel")
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
            blocks = -(-plan.xnumel // cfg.xblock)
            grid, split_args = (blocks,), []
            if self.split is not None:  # a workspace per reduction for the partials, the counters
                grid = (blocks, self.split.parts)
                split_args = [torch.empty(self.split.parts * self.split.rows, device=device,
                                          dtype=expr.compute_dtype(v.dtype)) for v in self.split.reductions]
                split_args.append(self.counters.get(blocks, device))
            self.last_compiled = launch.kernel[grid](  # None under the interpreter
                *tensors, *outs, *split_args, *[env[n] for n in plan.scalars], *launch.int_args,
                XBLOCK=cfg.xblock, RBLOCK=cfg.rblock, num_warps=cfg.num_warps, **pdl.launch_kwargs(self.pdl))
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
    if config is None:
        config = reduction_heuristic(plan.xnumel, plan.rnumel, _row_contiguous(plan), row_inputs)
        if not config.persistent and ctx.device.type == "cuda" and splittable(plan):
            # a long row over few rows (a whole-tensor sum: QAT's scale gradients, an amax):
            # one program per row would leave all but a few SMs idle
            sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count
            parts = reduction_split(-(-plan.xnumel // config.xblock), plan.rnumel, config.rblock, sms)
            if parts > 1:
                config = dataclasses.replace(config, split=parts)
    if config.persistent and config.rblock < plan.rnumel:
        raise Unsupported(f"persistent config with rblock {config.rblock} < row length {plan.rnumel}")
    launcher = ReductionLauncher(plan, config, ctx.device, ctx.pdl)
    source = launcher.launch_for([ld.source.meta["val"] for ld in plan.loads]).source
    return Kernel(kind="reduction", impl="triton", ops=group.ops, fn=launcher,
                  config=dataclasses.asdict(config), source=source,
                  supports_out=bool(plan.stores), out_layouts=launcher.out_layouts())
