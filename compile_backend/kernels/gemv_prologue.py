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

This module does not import Triton (the renderer does).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Set, Tuple

import torch
import torch.fx as fx

from . import expr
from .base import Unsupported, is_view_op, meta_of, op_name
from .expr_casts import round_to
from .gemm_template import LoadPlan, is_row_major_reshape

aten = torch.ops.aten
#: reductions a prologue computes over x's last dim, and whether the sum is divided by K
ROW_REDUCTIONS = {aten.mean.dim: True, aten.sum.dim_IntList: False}


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
    that x_at takes; ``helpers`` the ``expr`` helper names the lines call."""

    loads: int
    lines: Tuple[str, ...]
    value: str
    helpers: frozenset = frozenset()
    row_lines: Tuple[str, ...] = ()
    row_args: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.loads < 1 or not self.value.isidentifier():
            raise ValueError(f"an x prologue reads at least one tensor and names its value: {self}")


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
        row_lines: List[str] = []
        row_names: Dict[fx.Node, str] = {}
        for n in sorted(self.row, key=self.order.__getitem__):
            if n.target in ROW_REDUCTIONS:
                row_lines += self._reduction(n, row_names)
            elif is_view_op(n.target):
                row_names[n] = row_names[n.args[0]]  # unsqueeze of a mean without keepdim
            else:
                self._check_row_op(n)
                row_lines += expr.emit_pointwise([n], row_names, self.helpers)
        names: Dict[fx.Node, str] = {}
        x_lines = self._elements(self._upstream([self.x], stop_at_rows=True), names, row_names)
        read = {a for n in operands - self.row for a in n.all_input_nodes if a in self.row}
        row_args = tuple(dict.fromkeys(row_names[r] for r in sorted(read, key=self.order.__getitem__)))
        prologue = XPrologue(len(self.loads), tuple(x_lines), names[self.x], frozenset(self.helpers),
                             tuple(row_lines), row_args)
        return prologue, list(self.loads), frozenset(operands)

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
                  leaf: Any = None) -> List[str]:
        """Lines computing ``nodes`` (element values) at the index vector ``kk`` of row ``m``,
        after their loads (and ``leaf``'s: a tensor the caller reads as it is)."""
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
            lines.extend(expr.emit_pointwise([n], names, self.helpers))
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
        total = f"tl.sum({acc}, 0)" + (f" / {float(self.k)!r}" if ROW_REDUCTIONS[n.target] else "")
        out = expr.var_name(n)
        row_names[n] = out
        # ROW_BLOCK: the whole row in one or a few steps (each program waits for this loop
        # before its first weight load: one L2 round trip, not K / BLOCK_K of them)
        return ([f"{acc} = tl.zeros([ROW_BLOCK], tl.float32)",
                 "for k0 in range(0, K, ROW_BLOCK):",
                 "    kk = k0 + tl.arange(0, ROW_BLOCK)",
                 "    ok = kk < K"]
                + ["    " + line for line in body]
                + [f"    {acc} += tl.where(ok, {value}, 0.0)",
                   f"{out} = {round_to(f'({total})', meta_of(n).dtype)}"])


__all__ = ["XPrologue", "PLAIN_X", "plan_x", "reduces_rows", "ROW_REDUCTIONS"]
