"""Row-reduction groups analysed into a plan: the IR the reduction code generator emits from.

``analyze(group)`` checks that every reduction of the group reduces the same dims of one
iteration shape, splits that shape into kept dims (rows) and reduced dims, orders the reductions
into stages (a reduction that needs an earlier one's result runs a stage later) and lists the
loads and stores with their strides. ``reduction.py`` turns the plan into a Triton kernel, its
launcher and the builder; its docstring states the numerics.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.fx as fx

from . import expr
from .base import KernelGroup, Unsupported, is_view_op, meta_of, op_name

aten = torch.ops.aten
SEMANTIC = {aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.var_mean,
            aten._softmax, aten._log_softmax, aten.native_layer_norm, aten.logsumexp}


# --------------------------------------------------------------------------------- values (IR)
@dataclasses.dataclass(eq=False)
class Val:
    """A value inside the kernel. level 'row' varies along the reduced dims (lives in a loop
    chunk), 'perrow' does not (computed once per row block). render(name_of) -> expression."""

    base: str
    level: str
    deps: Tuple["Val", ...]
    render: Callable[[Callable[["Val"], str]], str]
    dtype: torch.dtype  # storage dtype: the variable holds expr.compute_dtype(dtype)
    reduce: Optional[str] = None  # sum | max | min for reductions
    load: Optional[int] = None  # index into the plan's loads
    online: Optional["OnlineSum"] = None  # set on softmax-family sums (see OnlineSum)


@dataclasses.dataclass(eq=False)
class OnlineSum:
    """Marks a sum reduction ``s = sum(exp(x - ref))`` where ``ref`` is the row maximum
    ``max`` (``safe_ref``: that maximum with +-inf replaced by 0, as logsumexp uses). A looped
    kernel then computes ``max`` and ``s`` in one pass over the row (online softmax: a running
    max, and a running sum rescaled whenever the max grows) instead of one pass each; the
    persistent kernel ignores it (the row is in registers anyway)."""

    x: Val
    max: Val
    safe_ref: bool


@dataclasses.dataclass
class Load:
    source: fx.Node  # placeholder or host view
    xmap: Tuple[Tuple[int, int], ...]  # (tensor dim, X dim) for the dims it moves along
    level: str


@dataclasses.dataclass
class Store:
    node: fx.Node
    val: Val
    xmap: Tuple[Tuple[int, int], ...]  # (output dim, X dim)
    level: str  # 'row' when the output varies along the reduced dims


@dataclasses.dataclass
class ReductionPlan:
    placeholders: List[fx.Node]
    host_views: List[fx.Node]
    outputs: List[fx.Node]
    x_shape: Tuple[int, ...]
    rdims: Tuple[int, ...]
    loads: List[Load]
    stores: List[Store]
    scalars: List[fx.Node]
    vals: List[Val]  # every value, in creation (topological) order
    scalar_vals: Dict[fx.Node, Val]

    @property
    def kdims(self) -> Tuple[int, ...]:
        return tuple(d for d in range(len(self.x_shape)) if d not in self.rdims)

    @property
    def rnumel(self) -> int:
        return math.prod(self.x_shape[d] for d in self.rdims)

    @property
    def xnumel(self) -> int:
        return math.prod(self.x_shape[d] for d in self.kdims)


def _reduction_args(node: fx.Node) -> Tuple[fx.Node, Tuple[int, ...], bool]:
    """(input, reduced dims normalised, keepdim) of a semantic reduction node."""
    x = node.args[0]
    rank = meta_of(x).dim()
    packet = node.target.overloadpacket
    args, kw = node.args, node.kwargs

    def norm(dims):
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return tuple(range(rank))
        dims = [dims] if isinstance(dims, int) else dims
        return tuple(sorted({d % max(rank, 1) for d in dims}))

    if packet in (aten._softmax, aten._log_softmax):
        return x, norm(args[1]), True
    if packet is aten.native_layer_norm:
        return x, tuple(range(rank - len(args[1]), rank)), True
    overload = node.target._overloadname
    if overload == "default" and packet in (aten.sum, aten.mean):
        return x, tuple(range(rank)), False
    dims = args[1] if len(args) > 1 else kw.get("dim")
    keep = args[2] if len(args) > 2 and isinstance(args[2], bool) else kw.get("keepdim", False)
    if packet in (aten.var, aten.std, aten.var_mean) and overload != "correction":
        raise Unsupported(f"{op_name(node.target)}.{overload}")
    return x, norm(dims), bool(keep)


class _Analysis:
    """Walks the group once: frames (which X dim each logical dim of a value is), loads, Vals."""

    def __init__(self, group: KernelGroup):
        nodes = list(group.gm.graph.nodes)
        first = next((n for n in nodes if n.op == "call_function"
                      and getattr(n.target, "overloadpacket", None) in SEMANTIC), None)
        if first is None:
            raise Unsupported("no reduction in the group")
        x, self.rdims, _ = _reduction_args(first)
        self.x_shape = tuple(meta_of(x).shape)
        self.frames: Dict[fx.Node, Tuple[Optional[int], ...]] = {}
        self.vals: Dict[fx.Node, Any] = {}  # node -> Val (or tuple of Vals for multi-output ops)
        self.all_vals: List[Val] = []
        self.loads: List[Load] = []
        self.load_vals: Dict[Tuple, Val] = {}
        self.sources: set = set()
        self.placeholders, self.host_views, self.scalars = [], [], []
        self.scalar_vals: Dict[fx.Node, Val] = {}
        self.helpers: set = set()
        for n in nodes:
            self._visit(n)

    # ---- helpers
    def _val(self, base, level, deps, render, dtype, reduce=None, load=None) -> Val:
        deps = tuple(deps)
        if reduce is None and load is None:  # computed values vary along the row iff an input does
            level = "row" if any(d.level == "row" for d in deps) else "perrow"
        v = Val(base, level, deps, render, dtype, reduce, load)
        self.all_vals.append(v)
        return v

    def _rd_frame(self, frame, shape) -> bool:
        return any(f is not None and f in self.rdims and s > 1 for f, s in zip(frame, shape))

    @property
    def rnumel(self) -> int:
        return math.prod(self.x_shape[d] for d in self.rdims)

    def _identity(self) -> Tuple[Optional[int], ...]:
        return tuple(d if s > 1 else None for d, s in enumerate(self.x_shape))

    def operand(self, a: fx.Node, frame, out_shape) -> Val:
        """The Val of node ``a`` used by a consumer with ``frame``/``out_shape`` (loads sources)."""
        if a in self.scalar_vals:
            return self.scalar_vals[a]
        if a in self.sources:
            shape = tuple(meta_of(a).shape)
            off = len(out_shape) - len(shape)
            if off < 0:
                raise Unsupported(f"{a.name} has more dims than its consumer")
            xmap = tuple((i, frame[i + off]) for i, s in enumerate(shape) if s > 1)
            if any(d is None for _, d in xmap):
                raise Unsupported(f"{a.name} does not fit the reduction's iteration space")
            key = (a, xmap)
            if key not in self.load_vals:
                level = "row" if any(d in self.rdims for _, d in xmap) else "perrow"
                self.loads.append(Load(a, xmap, level))
                idx = len(self.loads) - 1
                self.load_vals[key] = self._val(f"l{idx}_{a.name}", level, (), None, meta_of(a).dtype, load=idx)
            return self.load_vals[key]
        v = self.vals.get(a)
        if not isinstance(v, Val):
            raise Unsupported(f"{a.name} is not a single tensor value")
        return v

    def _frame_of_pointwise(self, node: fx.Node) -> Tuple[Optional[int], ...]:
        out = tuple(meta_of(node).shape)
        r, rank_x = len(out), len(self.x_shape)
        cand: List[Optional[int]] = [None] * r
        for u in node.all_input_nodes:
            if u not in self.frames:
                continue
            su, fu = tuple(meta_of(u).shape), self.frames[u]
            off = r - len(su)
            for i, s in enumerate(su):
                j = i + off
                if s > 1 and s == out[j] and fu[i] is not None:  # None: a constant's dim
                    if cand[j] is not None and cand[j] != fu[i]:
                        raise Unsupported(f"{node.name} combines values laid over different dims")
                    cand[j] = fu[i]
        for j, s in enumerate(out):
            if s > 1 and cand[j] is None:
                d = j + rank_x - r  # inputs only: right-aligned in X like broadcasting
                if d < 0 or self.x_shape[d] != s:
                    raise Unsupported(f"{node.name} of shape {out} does not fit the iteration shape {self.x_shape}")
                cand[j] = d
        return self._checked(node, tuple(cand), out)

    def _checked(self, node, frame, shape):
        used = [f for f in frame if f is not None]
        if used != sorted(set(used)) or any(f is not None and self.x_shape[f] != s for f, s in zip(frame, shape)):
            raise Unsupported(f"{node.name} of shape {tuple(shape)} does not fit the iteration shape {self.x_shape}")
        return frame

    # ---- visiting nodes
    def _visit(self, n: fx.Node) -> None:
        val = meta_of(n)
        if n.op == "placeholder":
            self.placeholders.append(n)
            if isinstance(val, torch.Tensor):
                self.sources.add(n)
            elif isinstance(val, (bool, int, float)) and not isinstance(val, torch.SymInt):
                self.scalars.append(n)
                self.scalar_vals[n] = self._val(f"s_{n.name}", "perrow", (), None, expr.scalar_dtype(val))
            else:
                raise Unsupported(f"input {n.name} is neither a tensor nor a Python scalar")
            return
        if n.op == "output":
            return
        if n.op != "call_function":
            raise Unsupported(f"{n.op} node {n.name} in a reduction group")
        if n.target is operator.getitem:
            parent, idx = n.args
            self.vals[n] = self.vals[parent][idx]
            self.frames[n] = self.frames[parent][idx]
            return
        if is_view_op(n.target):
            if all(a in self.sources for a in n.all_input_nodes):
                self.host_views.append(n)
                self.sources.add(n)
                return
            (u,) = [a for a in n.all_input_nodes]
            su, so = tuple(meta_of(u).shape), tuple(val.shape)
            if [s for s in su if s != 1] != [s for s in so if s != 1]:
                raise Unsupported(f"{op_name(n.target)} of a computed value that moves data")
            big = iter(f for f, s in zip(self.frames[u], su) if s != 1)
            self.frames[n] = tuple(next(big) if s != 1 else None for s in so)
            self.vals[n] = self.vals[u]
            return
        packet = getattr(n.target, "overloadpacket", None)
        if packet in SEMANTIC:
            self._reduction(n, packet)
            return
        reason = expr.unsupported_reason(n)
        if reason is not None:
            raise Unsupported(f"{op_name(n.target)}: {reason}")
        constant = n.target.overloadpacket in expr.CONSTANT_OPS and not n.all_input_nodes
        # a constant (a fill of its reader) is the same along every dim: laid over none
        frame = (None,) * val.dim() if constant else self._frame_of_pointwise(n)
        out_shape = tuple(val.shape)
        deps = {a: self.operand(a, frame, out_shape) for a in n.all_input_nodes}
        level = "row" if any(d.level == "row" for d in deps.values()) else "perrow"
        self.frames[n] = frame
        self.vals[n] = self._val(f"v_{n.name}", level, deps.values(), self._pointwise_render(n, deps), val.dtype)

    def _pointwise_render(self, n: fx.Node, deps: Dict[fx.Node, Val]):
        dtype = meta_of(n).dtype
        helpers = self.helpers

        def render(name_of):
            def sub(a):
                if isinstance(a, fx.Node):
                    v, m = deps[a], meta_of(a)
                    if not isinstance(m, torch.Tensor):
                        return expr.Var(name_of(v), v.dtype, 0, scalar=True)
                    return expr.Var(name_of(v), m.dtype, m.dim())
                return a
            args = [sub(a) for a in n.args]
            kwargs = {k: sub(v) for k, v in n.kwargs.items()}
            text = expr.lower(n.target, args, kwargs, dtype, helpers)
            return expr.round_to(f"({text})", dtype)
        return render

    def _reduction(self, n: fx.Node, packet) -> None:
        x, dims, keep = _reduction_args(n)
        xm = meta_of(x)
        if tuple(xm.shape) != self.x_shape or dims != self.rdims:
            raise Unsupported("reductions over different shapes or dims in one group")
        ident = self._identity()
        if x in self.frames and self.frames[x] != ident:
            raise Unsupported(f"{n.name} reduces a value laid out differently from the iteration shape")
        xv = self.operand(x, ident, self.x_shape)
        if xv.level != "row" and self.rnumel > 1:
            raise Unsupported(f"{n.name} reduces a value that does not vary along the reduced dims")
        keep_frame = tuple(None if d in self.rdims else f for d, f in enumerate(ident))
        red_frame = keep_frame if keep else tuple(f for d, f in enumerate(ident) if d not in self.rdims)
        outs = self._expand(n, packet, x, xv, ident)
        if packet is aten.native_layer_norm:
            self.frames[n] = (ident, keep_frame, keep_frame)
        elif packet is aten.var_mean:
            self.frames[n] = (red_frame, red_frame)
        elif packet in (aten._softmax, aten._log_softmax):
            self.frames[n] = ident
        else:
            self.frames[n] = red_frame
        self.vals[n] = outs

    def _expand(self, n, packet, x, xv, ident):
        """Lower one semantic reduction to Vals: primitive reductions plus expressions."""
        metas = meta_of(n)
        out_dtypes = [m.dtype for m in metas] if isinstance(metas, (tuple, list)) else [metas.dtype]
        acc = _accumulator_dtype(n, packet, meta_of(x).dtype, out_dtypes[0])
        low = _Lowering(self, n, acc, out_dtypes)
        xf = low.ex("in", xv.level, (xv,), lambda nm: expr.convert(nm(xv), xv.dtype, acc)) \
            if expr.compute_dtype(xv.dtype) != acc else xv
        if packet in (aten.amax, aten.amin):
            return low.out(low.red("nanmax" if packet is aten.amax else "nanmin", xv, "red"), out_dtypes[0])
        if packet in (aten.sum, aten.mean):
            return low.sum_or_mean(packet, xf)
        if packet in (aten.var, aten.std, aten.var_mean, aten.native_layer_norm):
            moments = low.moments(xf)
            if packet is aten.native_layer_norm:
                return low.layer_norm(moments, ident)
            return low.variance(packet, moments)
        return low.softmax_family(packet, xf)


def _accumulator_dtype(n: fx.Node, packet, in_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype a semantic reduction accumulates in: its output's compute dtype (its input's
    for amax/amin); integers only for sums."""
    acc = expr.compute_dtype(out_dtype)
    if packet in (aten.amax, aten.amin):
        acc = expr.compute_dtype(in_dtype)
    elif not acc.is_floating_point and packet is not aten.sum:
        raise Unsupported(f"{op_name(n.target)} on integers")
    if acc == torch.bool:
        raise Unsupported(f"{op_name(n.target)} of bool")
    return acc


class _Moments(NamedTuple):
    """The corrected two-pass statistics of a row (see ``_Lowering.moments``)."""

    dev: Val  # x - mean (row)
    shift: Val  # sum(dev) / n: how far the rounded mean is off
    m2: Val  # sum of squared deviations from the exact mean
    mean: Val  # the corrected mean


class _Lowering:
    """The Vals of one semantic reduction node ``n``, named ``{n}_{tag}``, computed in the
    accumulator dtype ``acc``; one method per family of semantic reductions. The order in which
    Vals are created is the order the kernel computes them in."""

    def __init__(self, analysis: "_Analysis", n: fx.Node, acc: torch.dtype, out_dtypes: List[torch.dtype]):
        self.analysis, self.n, self.acc, self.out_dtypes = analysis, n, acc, out_dtypes
        self.count = float(analysis.rnumel)

    # ---- building blocks
    def red(self, kind: str, src: Val, tag: str) -> Val:
        return self.analysis._val(f"{self.n.name}_{tag}", "perrow", (src,), None, self.acc, reduce=kind)

    def ex(self, tag: str, level: str, deps, fn, dtype: Optional[torch.dtype] = None) -> Val:
        return self.analysis._val(f"{self.n.name}_{tag}", level, deps, fn, dtype or self.acc)

    def out(self, v: Val, dtype: torch.dtype, tag: str = "out") -> Val:
        """The semantic op's output, rounded to its storage dtype."""
        acc = self.acc
        if dtype in expr.REDUCED_FLOATS or expr.compute_dtype(dtype) != acc:
            return self.ex(tag, v.level, (v,), lambda nm: expr.convert(nm(v), acc, dtype), dtype)
        return v

    def div(self, a: str, b: str) -> str:
        return f"tl.div_rn({a}, {b})" if self.acc == torch.float32 else f"{a} / {b}"

    def lit(self, c) -> str:
        return expr.literal(c, self.acc)

    # ---- families
    def sum_or_mean(self, packet, xf: Val) -> Val:
        s = self.red("sum", xf, "sum")
        if packet is aten.sum:
            return self.out(s, self.out_dtypes[0])
        mean = self.ex("mean", "perrow", (s,), lambda nm: self.div(nm(s), self.lit(self.count)))
        return self.out(mean, self.out_dtypes[0])

    def moments(self, xf: Val) -> _Moments:
        # corrected two-pass variance (Chan, Golub & LeVeque): the rounded mean is off by
        # some delta (half an ulp of the mean at best), and sum(d*d) over d = x - mean then
        # carries n*delta**2 too much: relative error (delta/std)**2, 5e-5 for fp32 data of
        # mean 1e4 and std 0.1. The sum of the deviations measures -n*delta in the same
        # pass, so m2 = sum(d*d) - sum(d)**2/n and mean + sum(d)/n remove it (eager
        # accumulates var in double on the CPU and Welford on the GPU). The clamp keeps
        # the rounding of that difference from going below 0 on constant rows (NaN stays).
        ex, red, div, lit, count = self.ex, self.red, self.div, self.lit, self.count
        s = red("sum", xf, "sum")
        mean = ex("mean", "perrow", (s,), lambda nm: div(nm(s), lit(count)))
        d = ex("dev", "row", (xf, mean), lambda nm: f"{nm(xf)} - {nm(mean)}")
        ss = red("sum", ex("sq", "row", (d,), lambda nm: f"{nm(d)} * {nm(d)}"), "sqsum")
        sd = red("sum", d, "devsum")
        shift = ex("shift", "perrow", (sd,), lambda nm: div(nm(sd), lit(count)))
        m2 = ex("m2", "perrow", (ss, sd, shift), lambda nm: f"tl.maximum({nm(ss)} - {nm(sd)} * {nm(shift)}, "
                f"{lit(0.0)}, propagate_nan=tl.PropagateNan.ALL)")
        mean_c = ex("meanc", "perrow", (mean, shift), lambda nm: f"{nm(mean)} + {nm(shift)}")
        return _Moments(d, shift, m2, mean_c)

    def variance(self, packet, mo: _Moments):
        """var, std or var_mean from the moments, with the op's correction."""
        corr = self.n.kwargs.get("correction", 1)
        corr = 1 if corr is None else corr
        var = self.ex("var", "perrow", (mo.m2,), lambda nm: self.div(nm(mo.m2), self.lit(max(self.count - corr, 0.0))))
        if packet is aten.std:
            return self.out(self.ex("std", "perrow", (var,), lambda nm: f"tl.sqrt_rn({nm(var)})"), self.out_dtypes[0])
        if packet is aten.var_mean:
            return (self.out(var, self.out_dtypes[0]), self.out(mo.mean, self.out_dtypes[1], "mean_out"))
        return self.out(var, self.out_dtypes[0])

    def layer_norm(self, mo: _Moments, ident) -> Tuple[Val, Val, Val]:
        """native_layer_norm's (normalised row with weight and bias, mean, rstd)."""
        ex, div, lit, acc = self.ex, self.div, self.lit, self.acc
        w, b, eps = (list(self.n.args) + [None] * 5)[2:5]
        var = ex("var", "perrow", (mo.m2,), lambda nm: div(nm(mo.m2), lit(self.count)))
        rstd = ex("rstd", "perrow", (var,), lambda nm: f"tl.rsqrt({nm(var)} + {lit(eps)})")
        y = ex("norm", "row", (mo.dev, mo.shift, rstd), lambda nm: f"({nm(mo.dev)} - {nm(mo.shift)}) * {nm(rstd)}")
        for tag, param, op in (("w", w, "*"), ("b", b, "+")):
            if param is not None:
                pv = self.analysis.operand(param, ident, self.analysis.x_shape)
                prev = y
                y = ex(f"aff{tag}", "row", (prev, pv),
                       lambda nm, prev=prev, pv=pv, op=op: f"{nm(prev)} {op} {expr.convert(nm(pv), pv.dtype, acc)}")
        dt = self.out_dtypes
        return (self.out(y, dt[0]), self.out(mo.mean, dt[1], "mean_out"), self.out(rstd, dt[2], "rstd_out"))

    def softmax_family(self, packet, xf: Val) -> Val:
        """softmax, log_softmax, logsumexp: subtract the row max before exp."""
        ex, acc, dt = self.ex, self.acc, self.out_dtypes[0]
        m = self.red("max", xf, "max")  # a NaN in the row makes the sum NaN anyway: plain max suffices
        ms = ex("maxsafe", "perrow", (m,), lambda nm: f"tl.where(tl.abs({nm(m)}) == float(\"inf\"), 0.0, {nm(m)})") \
            if packet is aten.logsumexp else m
        e = ex("exp", "row", (xf, ms), lambda nm: emit_exp(f"{nm(xf)} - {nm(ms)}", acc))
        s = self.red("sum", e, "sum")
        s.online = OnlineSum(xf, m, safe_ref=packet is aten.logsumexp)
        if packet is aten._softmax:
            if dt in expr.REDUCED_FLOATS and acc == torch.float32:
                # e * (1/s) is within 2 fp32 ulp of e / s (2**-12 of an fp16 ulp): the rounded
                # output differs by one ulp at most, and rarely. It saves a correctly rounded
                # division per element: ~10 instructions with a MUFU op on the GPU. (With this,
                # no masks on full rows and emit_exp, the sm_90 build of a 32768-long fp16 row went
                # from 28 to 11 instructions per element.)
                inv = ex("inv", "perrow", (s,), lambda nm: f"tl.div_rn(tl.full([XBLOCK, 1], 1.0, tl.float32), {nm(s)})")
                return self.out(ex("softmax", "row", (e, inv), lambda nm: f"{nm(e)} * {nm(inv)}"), dt)
            return self.out(ex("softmax", "row", (e, s), lambda nm: self.div(nm(e), nm(s))), dt)
        if packet is aten._log_softmax:
            return self.out(ex("logsoftmax", "row", (xf, m, s), lambda nm: f"{nm(xf)} - {nm(m)} - tl.log({nm(s)})"), dt)
        return self.out(ex("lse", "perrow", (ms, s), lambda nm: f"{nm(ms)} + tl.log({nm(s)})"), dt)


def emit_exp(arg: str, dtype: torch.dtype) -> str:
    """exp(arg) in compute dtype ``dtype``. fp32: exp2 of the argument times log2(e), the same
    arithmetic as tl.exp, but Triton lowers it to ex2.approx.ftz (one MUFU op) where tl.exp's
    ex2.approx.f32 adds a subnormal fix-up (3 more instructions per element); results below
    2**-126 (1.2e-38) flush to 0. The softmax family's row sums hold exp(0) = 1, so only a
    softmax's own outputs that small change, by less than 1.2e-38."""
    if dtype == torch.float32:
        return f"tl.math.exp2(({arg}) * 1.4426950408889634)"
    return f"tl.exp({arg})"


def analyze(group: KernelGroup) -> ReductionPlan:
    a = _Analysis(group)
    stores, seen = [], {}
    for o in group.outputs:
        if not isinstance(o, fx.Node) or not isinstance(meta_of(o), torch.Tensor):
            raise Unsupported("a group output is not a tensor node")
        if o in a.sources or o in seen:
            continue
        v, frame = a.vals.get(o), a.frames.get(o)
        if not isinstance(v, Val):
            raise Unsupported(f"output {o.name} is not a single tensor value")
        shape = tuple(meta_of(o).shape)
        xmap = tuple((i, f) for i, (f, s) in enumerate(zip(frame, shape)) if s > 1)
        level = "row" if any(f in a.rdims for _, f in xmap) else "perrow"
        seen[o] = True
        stores.append(Store(o, v, xmap, level))
    return ReductionPlan(a.placeholders, a.host_views, group.outputs, a.x_shape, a.rdims, a.loads, stores,
                         a.scalars, a.all_vals, a.scalar_vals)
