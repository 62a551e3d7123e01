"""How the fused weight-only GEMV (:mod:`.gemv`) computes its activation x.

A decode step's GEMV reads x (a few rows of K values) from L2 once per program, so computing x
where it is loaded costs little and saves the producer's launch and its store (issue #20). The
partitioner (``fx_passes/partition_merge.merge_gemv_prologues``) puts x's exclusive producer
into the GEMV's group; :func:`plan_x` turns the group's ops upstream of the anchor into code:

* **x elements** (x's M * K values): element-wise ops over loads at x's coordinates (SwiGLU's
  ``silu(gate) * up``; a norm's ``h * rstd * w``), in ``x_at(m, k)``; reshapes between them are
  free (row-major order kept); every intermediate is rounded to its dtype as eager stores it.
* **row values** (M values: ``keepdim`` or not): a ``mean`` / ``sum`` over x's last dim (an RMS
  norm's mean of squares) is a loop over the row before the main loop, in every program (M <= 4
  rows of K values, from L2, ``ROW_BLOCK`` = up to 4096 at a time); element-wise ops on row
  values (``+ eps``, ``rsqrt``) follow it.
  x_at takes the row values it reads as arguments.
* **deferred row factor.** Where the row values reach x only as one factor (Llama's RMS norm:
  x = round16(round16(h32 * rsqrt(mean(h32^2) + eps)) * g), so x[m, k] = E(m, k) * R(m)), the
  GEMV computes sum_k x[m, k] w[n, k] as R(m) * sum_k E(m, k) w[n, k]: x_at computes E (the
  factor's product dropped, the casts after it kept: round16(round16(h) * g)), the reduction's
  input (h32^2) is summed from the x values the main loop loads anyway (the renderer's
  ``x_row_terms``, next to each x_at), and the row values (the mean's division by K, ``+ eps``,
  ``rsqrt``, rounded as eager rounds them) are computed from that total after the loop, where
  the accumulator takes the factor (fp32, before the bias and the rounding to the output
  dtype). Why: the row loop is serial work before every program's first weight use (x's row
  read from L2, summed across the block, rsqrt). Measured (H100, session 24, HF Llama 1.1B
  decode): the 44 norm GEMVs of a step 395.4 -> 380.5 us (W4A16), 616.6 -> 598.6 us (FP16),
  -3 to -4%; the ~3 us a GEMV this was meant to recover was gate_up's size, not the row pass.
  Numerics: eager rounds h * R (and the products after it) to x's dtype; here those
  roundings are of E, not of E * R, and R is applied in fp32 to the fp32 sum, so results
  differ from eager's by about one rounding of the output (within the select module's
  validation bounds, as the fused kernel's other reorderings), accepted for the row pass's
  cost. E is not normalised: in fp16 |h * g| can exceed 65504 where eager's normalised x is
  finite. So fp16 values on E's path (fp16 models: HF Llama's ``g * x.to(fp16)``) are kept in
  fp32, not rounded (``XPrologue.unrounded``), and such a kernel runs the elementwise main
  loops only, where x stays fp32 (the tensor-core loops take x in its dtype:
  :meth:`gemv_build.GemvPlan.runs`); bf16 and fp32 (fp32's exponent range) round as eager.
  Any other use of row values keeps the row loop (:meth:`_Writer._deferred_factor`).

This module does not import Triton (the renderer does).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx

from . import expr
from .base import Unsupported, is_view_op, meta_of, op_name
from .expr_casts import round_to
from .gemm_template import LoadPlan, is_row_major_reshape

aten = torch.ops.aten
#: reductions a prologue computes over x's last dim, and whether the sum is divided by K
ROW_REDUCTIONS = {aten.mean.dim: True, aten.sum.dim_IntList: False}
#: the kernel variable a deferred factor's lines start from: the reduction's input summed over the row
ROW_TOTAL = "row_total"
#: dtypes a deferred factor's path to x may round to: fp32's exponent range. E is not normalised
#: (|h * g| where eager rounds h * rstd * g): in fp16 (max 65504) or fp8 it can overflow to inf
#: where eager's normalised x is finite (a residual stream's outlier of a few thousand times a
#: norm weight above ~20), a wrong result
_WIDE_RANGE = (torch.bfloat16, torch.float32, torch.float64)
#: dtypes of E's path computed in fp32 and not rounded (so E cannot overflow), the kernel then
#: running its elementwise loops only. fp8 (a quantize's cast) is no product: the row loop
_UNROUNDED = (torch.float16,)


def reduces_rows(n: fx.Node, numel: int, k: int) -> bool:
    """``n`` is a ``mean`` / ``sum`` over the last dim of a value of ``numel`` elements, rows of
    ``k`` (x's shape), in the input's dtype: a row value a prologue computes."""
    if n.target not in ROW_REDUCTIONS or n.kwargs.get("dtype") is not None:
        return False
    val = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or val.numel() != numel or val.shape[-1] != k:
        return False
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return isinstance(dims, (list, tuple)) and [d % val.dim() for d in dims] == [val.dim() - 1]


@dataclasses.dataclass(frozen=True)
class XPrologue:
    """How the kernel computes x[m, k]: ``loads`` tensors read at x's coordinates (raw values
    ``r0``, ``r1``, ...), ``lines`` computing from them, ``value`` the variable holding x in fp32;
    ``row_lines``: kernel statements before the main loop computing the row values ``row_args``
    that x_at takes; ``helpers`` the ``expr`` helper names the lines call.

    A deferred row factor (``factor`` set; no row lines or args): ``lines`` compute E, x without
    the factor; ``row_input_lines`` compute the row reduction's input at (m, kk) after their loads,
    into ``row_input``; ``factor_lines`` compute the row values from :data:`ROW_TOTAL` (that
    input summed over the row), the last of which, ``factor``, multiplies the GEMV's sums."""

    loads: int
    lines: Tuple[str, ...]
    value: str
    helpers: frozenset = frozenset()
    row_lines: Tuple[str, ...] = ()
    row_args: Tuple[str, ...] = ()
    row_input_lines: Tuple[str, ...] = ()
    row_input: str = ""
    factor_lines: Tuple[str, ...] = ()
    factor: str = ""
    #: x computed in fp32 past its dtype's range (a deferred factor's fp16 path, not rounded):
    #: the elementwise main loops only (``gemv_build.GemvPlan.runs``)
    unrounded: bool = False
    #: x's lines call a transcendental (SwiGLU's SiLU, a GELU): the tma loop then computes x once
    #: a step in a compact layout rather than in each thread row that shares a k (``COMPACT_X``)
    transcendental: bool = False

    def __post_init__(self) -> None:
        if self.loads < 1 or not self.value.isidentifier():
            raise ValueError(f"an x prologue reads at least one tensor and names its value: {self}")
        if self.factor:
            if not (self.row_input.isidentifier() and self.factor.isidentifier() and self.factor_lines):
                raise ValueError(f"a deferred row factor names its reduction's input and its lines: {self}")
            if self.row_lines or self.row_args:
                raise ValueError(f"a deferred row factor replaces the row loop, not both: {self}")
        elif self.row_input_lines or self.row_input or self.factor_lines or self.unrounded:
            raise ValueError(f"a row reduction's input, factor lines or unrounded x without a deferred factor: {self}")

    @property
    def deferred(self) -> bool:
        """The row values reach x as one factor, applied to the GEMV's sums after the loop."""
        return bool(self.factor)

    @property
    def row_values(self) -> bool:
        """The prologue computes row values (before the loop or deferred): one x row a program."""
        return bool(self.row_lines) or self.deferred


#: ops whose values take the special-function unit (exp, reciprocal, ...) and a dozen more
#: instructions an element: computed by each thread row sharing a k, SwiGLU's x cost the INT8 tma
#: loop 16 x 512 9.25 SASS a weight against 5.47 for x loaded as it is (sm_90, Triton 3.6, down
#: 2048 x 5632); once a step, compact, 7.39 (session 33)
TRANSCENDENTAL = frozenset({aten.silu, aten.sigmoid, aten.exp, aten.exp2, aten.expm1, aten.tanh, aten.gelu, aten.erf,
                            aten.log, aten.log1p, aten.log2, aten.sin, aten.cos, aten.softplus, aten.mish, aten.elu})

#: x loaded as it is
PLAIN_X = XPrologue(1, ("x0 = r0.to(tl.float32)",), "x0")


def plan_x(group: Any, anchor: fx.Node, x: Any, m: int, k: int) -> Tuple[XPrologue, List[LoadPlan], frozenset]:
    """(prologue, its loads in x's [M, K] space, the nodes it computes) for the anchor's x."""
    members = {n for n in group.gm.graph.nodes if n.op == "call_function"}

    def computed(n: Any) -> bool:  # a value of the group's own ops (views of inputs are bound in ATen)
        return isinstance(n, fx.Node) and n in members and (
            not is_view_op(n.target) or any(computed(a) for a in n.all_input_nodes))

    if not computed(x):
        return PLAIN_X, [LoadPlan(x, tuple(meta_of(x).shape))], frozenset()
    return _Writer(group, x, m, k, computed).plan()


def _broadcasts(shape, frame) -> bool:
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(frame))) == tuple(frame)
    except RuntimeError:
        return False


class _Writer:
    """Sorts x's upstream nodes into row values and element values, then writes their code."""

    def __init__(self, group: Any, x: fx.Node, m: int, k: int, computed) -> None:
        self.order = {n: i for i, n in enumerate(group.gm.graph.nodes)}
        self.x, self.m, self.k, self.computed = x, m, k, computed
        self.loads: List[LoadPlan] = []
        self.load_index: Dict[Tuple[fx.Node, tuple], int] = {}
        self.helpers: Set[str] = set()
        self.row: Set[fx.Node] = set()  # one value per row of x
        self.frame: Dict[fx.Node, Tuple[int, ...]] = {}  # element values: the x-sized shape they broadcast to
        self.used: Set[int] = set()

    def plan(self) -> Tuple[XPrologue, List[LoadPlan], frozenset]:
        operands = self._upstream([self.x])
        for n in sorted(operands, key=self.order.__getitem__):
            self._classify_row(n)
        for n in sorted(operands - self.row, key=self.order.__getitem__, reverse=True):
            self._frame(n)
        deferred = self._deferred_factor(operands)
        prologue = self._deferred_plan(*deferred) if deferred is not None else self._row_loop_plan(operands)
        return prologue, list(self.loads), frozenset(operands)

    def _row_loop_plan(self, operands: Set[fx.Node]) -> XPrologue:
        """Row values computed before the main loop (a loop over the row each), read by x_at."""
        row_lines, row_names = self._row_values(self._reduction)
        names: Dict[fx.Node, str] = {}
        x_lines = self._elements(self._upstream([self.x], stop_at_rows=True), names, row_names)
        read = {a for n in operands - self.row for a in n.all_input_nodes if a in self.row}
        row_args = tuple(dict.fromkeys(row_names[r] for r in sorted(read, key=self.order.__getitem__)))
        return XPrologue(len(self.loads), tuple(x_lines), names[self.x], frozenset(self.helpers),
                         tuple(row_lines), row_args, transcendental=self._transcendental())

    def _deferred_plan(self, reduction: fx.Node, mul: fx.Node, element: fx.Node, factor: fx.Node,
                       unrounded: Set[fx.Node]) -> XPrologue:
        """x without ``mul``'s row factor (``unrounded``: nodes of its path computed in fp32, not
        rounded); the reduction's input summed by the main loop, the row values computed from
        its total after it."""
        src = reduction.args[0]
        input_names: Dict[fx.Node, str] = {}
        input_lines = self._elements(self._upstream([src], stop_at_rows=True), input_names, {},
                                     leaf=None if self.computed(src) else src)
        factor_lines, row_names = self._row_values(
            lambda n, names: [self._reduced_value(n, ROW_TOTAL, names)])
        names: Dict[fx.Node, str] = {}
        # no row values in x's lines: the factor's product is its element operand there
        x_lines = self._elements(self._upstream([self.x], stop_at_rows=True), names, {}, skip={mul: element},
                                 unrounded=unrounded)
        return XPrologue(len(self.loads), tuple(x_lines), names[self.x], frozenset(self.helpers),
                         row_input_lines=tuple(input_lines), row_input=input_names[src],
                         factor_lines=tuple(factor_lines), factor=row_names[factor], unrounded=bool(unrounded),
                         transcendental=self._transcendental())

    def _transcendental(self) -> bool:
        """Whether x's element values call a transcendental (:data:`TRANSCENDENTAL`)."""
        return any(getattr(n.target, "overloadpacket", None) in TRANSCENDENTAL
                   for n in self._upstream([self.x], stop_at_rows=True))

    def _row_values(self, reduce) -> Tuple[List[str], Dict[fx.Node, str]]:
        """Lines computing the row values in graph order (``reduce(node, row_names)``: a
        reduction's), and the variables holding them."""
        lines: List[str] = []
        row_names: Dict[fx.Node, str] = {}
        for n in sorted(self.row, key=self.order.__getitem__):
            if n.target in ROW_REDUCTIONS:
                lines += reduce(n, row_names)
            elif is_view_op(n.target):
                row_names[n] = row_names[n.args[0]]  # unsqueeze of a mean without keepdim
            else:
                self._check_row_op(n)
                lines += expr.emit_pointwise([n], row_names, self.helpers)
        return lines, row_names

    def _deferred_factor(self, operands: Set[fx.Node]
                         ) -> Optional[Tuple[fx.Node, fx.Node, fx.Node, fx.Node, Set[fx.Node]]]:
        """(the reduction, the product, its element operand, its row operand, the nodes after it
        computed unrounded) where x's row values reach x only as one factor: one row reduction
        (every row value is then a function of its total); one element node reading row values,
        ``element * factor`` (either order); from it to x only products with values the factor
        does not scale, floating casts and row-major reshapes (x = E * factor, E free of row
        values), of fp32's range or of :data:`_UNROUNDED` dtypes (those unrounded). Else None."""
        reductions = [n for n in self.row if n.target in ROW_REDUCTIONS]
        readers = [n for n in operands - self.row if any(a in self.row for a in n.all_input_nodes)]
        if len(reductions) != 1 or len(readers) != 1:
            return None
        mul = readers[0]
        if mul.target != aten.mul.Tensor or len(mul.args) != 2 or mul.kwargs or not _wide(mul):
            return None
        factor, element = mul.args if mul.args[0] in self.row else mul.args[::-1]
        if not isinstance(element, fx.Node) or element in self.row or factor not in self.row:
            return None
        node, unrounded = mul, set()
        while node is not self.x:
            users = [u for u in node.users if u in operands]
            if len(users) != 1 or not _keeps_factor(users[0], node):
                return None
            node = users[0]
            if not _wide(node):
                unrounded.add(node)
        return reductions[0], mul, element, factor, unrounded

    # ------------------------------------------------------------------ what is computed
    def _upstream(self, roots: List[fx.Node], stop_at_rows: bool = False) -> Set[fx.Node]:
        """The computed nodes ``roots`` depend on (through computed nodes only; with
        ``stop_at_rows``, not into or through row values)."""
        seen: Set[fx.Node] = set()
        stack = [r for r in roots if self.computed(r)]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if stop_at_rows and n in self.row:
                continue
            stack.extend(a for a in n.all_input_nodes if self.computed(a))
        return {n for n in seen if not (stop_at_rows and n in self.row)}

    def _classify_row(self, n: fx.Node) -> None:
        """Row values: a reduction over x's rows, and ops of row values only (+ eps, rsqrt)."""
        if n.target in ROW_REDUCTIONS:
            if not reduces_rows(n, self.m * self.k, self.k):
                raise Unsupported(f"{op_name(n.target)} in x's prologue does not reduce over x's rows")
            self.row.add(n)
            return
        inputs = [a for a in n.all_input_nodes if self.computed(a)]
        numel = meta_of(n).numel()
        if inputs and all(a in self.row for a in inputs) and numel in (1, self.m) and numel != self.m * self.k:
            self.row.add(n)

    def _frame(self, n: fx.Node) -> None:
        """An element value has x's M * K elements, or broadcasts to the x-sized shape its
        readers compute at (a norm weight's cast, [K]); views between them are reshapes."""
        shape = tuple(meta_of(n).shape)
        if meta_of(n).numel() == self.m * self.k:
            self.frame[n] = shape
        else:
            frames = [self.frame[u] for u in n.users if u in self.frame]
            if not frames or not all(_broadcasts(shape, f) for f in frames) or len(set(frames)) != 1:
                raise Unsupported(f"{n.name} ({op_name(n.target)}) in x's prologue is neither one value per "
                                  "element of x, nor one per row, nor broadcast to x")
            self.frame[n] = frames[0]
        if is_view_op(n.target) and not (is_row_major_reshape(n) and meta_of(n).numel() == self.m * self.k):
            raise Unsupported(f"x's prologue views {n.name} ({op_name(n.target)}) other than by a reshape")

    def _check_row_op(self, n: fx.Node) -> None:
        self._check_op(n)
        if any(not self.computed(a) and isinstance(meta_of(a), torch.Tensor) for a in n.all_input_nodes):
            raise Unsupported(f"{n.name} reads a tensor at one value per row: not loaded by the prologue")

    @staticmethod
    def _check_op(n: fx.Node) -> None:
        reason = expr.unsupported_reason(n)
        if reason is not None:
            raise Unsupported(f"x's prologue op {op_name(n.target)}: {reason}")

    # ------------------------------------------------------------------ code
    def _load(self, a: fx.Node, frame: Tuple[int, ...], names: Dict[fx.Node, str], lines: List[str]) -> None:
        """``a`` read at x's coordinates, broadcast to ``frame`` (an x-sized shape)."""
        val = meta_of(a)
        if not isinstance(val, torch.Tensor) or not _broadcasts(val.shape, frame):
            raise Unsupported(f"x's prologue reads {a.name}, which does not broadcast to x")
        key = (a, tuple(frame))
        if key not in self.load_index:
            self.load_index[key] = len(self.loads)
            self.loads.append(LoadPlan(a, key[1]))
        i = self.load_index[key]
        names[a] = f"a{i}"
        lines.append(f"a{i} = {expr.to_compute(f'r{i}', val.dtype)}")
        self.used.add(i)

    def _elements(self, nodes: Set[fx.Node], names: Dict[fx.Node, str], row_names: Dict[fx.Node, str],
                  leaf: Any = None, skip: Optional[Dict[fx.Node, fx.Node]] = None,
                  unrounded: Set[fx.Node] = frozenset()) -> List[str]:
        """Lines computing ``nodes`` (element values) at the index vector ``kk`` of row ``m``,
        after their loads (and ``leaf``'s: a tensor the caller reads as it is); a node of
        ``skip`` takes the value of the operand it maps to (a deferred factor's product); one of
        ``unrounded`` is computed in fp32 and not rounded to its dtype (a cast: its operand)."""
        skip = skip or {}
        names.update(row_names)
        self.used = set()
        lines: List[str] = []
        if leaf is not None:
            self._load(leaf, tuple(meta_of(leaf).shape), names, lines)
        for n in sorted(nodes, key=self.order.__getitem__):
            if is_view_op(n.target):
                names[n] = names[n.args[0]]
                continue
            self._check_op(n)
            for a in n.all_input_nodes:
                if a not in names and not self.computed(a):
                    self._load(a, self.frame[n], names, lines)
            if n in skip:
                names[n] = names[skip[n]]
                continue
            if n in unrounded and n.target in expr.ROUNDS_ITSELF:
                names[n] = names[n.args[0]]  # a float cast (_keeps_factor): its operand, in fp32
                continue
            lines.extend(expr.emit_pointwise([n], names, self.helpers, round_intermediates=n not in unrounded))
        loads = [f"r{i} = tl.load(P{i} + m * p{i}_s0 + kk * p{i}_s1, mask=ok, other=0)" for i in sorted(self.used)]
        return loads + lines

    def _reduction(self, n: fx.Node, row_names: Dict[fx.Node, str]) -> List[str]:
        """A loop over the row summing the reduction's input, then its value (rounded as eager)."""
        src = n.args[0]
        names: Dict[fx.Node, str] = {}
        # the input is computed here, or read as computed elsewhere (a GEMM epilogue's square)
        body = self._elements(self._upstream([src], stop_at_rows=True), names, row_names,
                              leaf=None if self.computed(src) else src)
        value = names[src]
        acc = f"acc_{n.name}"
        # ROW_BLOCK: the whole row in one or a few steps (each program waits for this loop
        # before its first weight load: one L2 round trip, not K / BLOCK_K of them)
        return ([f"{acc} = tl.zeros([ROW_BLOCK], tl.float32)",
                 "for k0 in range(0, K, ROW_BLOCK):",
                 "    kk = k0 + tl.arange(0, ROW_BLOCK)",
                 "    ok = kk < K"]
                + ["    " + line for line in body]
                + [f"    {acc} += tl.where(ok, {value}, 0.0)",
                   self._reduced_value(n, f"tl.sum({acc}, 0)", row_names)])

    def _reduced_value(self, n: fx.Node, total: str, row_names: Dict[fx.Node, str]) -> str:
        """The line computing reduction ``n``'s value from the sum ``total`` of its input over
        the row (a mean's division by K), rounded to its dtype as eager stores it."""
        if ROW_REDUCTIONS[n.target]:
            total += f" / {float(self.k)!r}"
        row_names[n] = expr.var_name(n)
        return f"{row_names[n]} = {round_to(f'({total})', meta_of(n).dtype)}"


def _wide(n: fx.Node) -> bool:
    """A float value of fp32's exponent range (:data:`_WIDE_RANGE`)."""
    val = meta_of(n)
    return isinstance(val, torch.Tensor) and val.dtype in _WIDE_RANGE


def _keeps_factor(user: fx.Node, node: fx.Node) -> bool:
    """``user`` of ``node`` (a value a row factor scales) is that factor times a value free of
    it, in fp32's range (:data:`_WIDE_RANGE`) or computed unrounded (:data:`_UNROUNDED`): a
    product with another value (the factor's own value read twice would square it), a cast, a
    row-major reshape."""
    val = meta_of(user)
    if not (isinstance(val, torch.Tensor) and val.dtype in _WIDE_RANGE + _UNROUNDED):
        return False
    if user.target == aten.mul.Tensor:
        return len(user.args) == 2 and not user.kwargs and sum(a is node for a in user.args) == 1
    if user.target in expr.ROUNDS_ITSELF:
        return user.args[0] is node
    return is_view_op(user.target) and is_row_major_reshape(user)


__all__ = ["XPrologue", "PLAIN_X", "plan_x", "reduces_rows", "ROW_REDUCTIONS", "ROW_TOTAL"]
