"""Pointwise groups merged after the partitioner formed them (partition.py, policy step 5):
fewer launches where one kernel can compute what several did.

* Into their reader: a pointwise group whose values only one bigger pointwise group reads (no
  graph output, nothing else) joins it when its shape broadcasts to the reader's; it is then
  computed there at every element and never stored (a decode step's rotated keys, a cat inside,
  feed only the cache update that selects them into their slot).
* Siblings: pointwise groups of one shape that read a common input (seen through views) and
  reach each other through nothing computed in between become one kernel (a decode step's key
  and value cache updates select by the same position).

* Into a decode GEMV: a pointwise group computing the activation of a weight-only linear (or of
  a float ``mm`` / ``addmm`` with a constant weight) of at most ``GEMV_MAX_M`` rows (decode),
  read by nothing else (through reshapes), joins the linear's group as its prologue: the fused
  GEMV computes x where it loads it (SwiGLU's ``silu(gate) * up`` before the down projection;
  an RMS norm before the gate/up and Q/K/V projections: its mean of squares is a loop over the
  row in every program). Only ops the prologue can generate join (no cat, no gather). Not for
  more rows: the tiled kernels would run the prologue through ATen.

* Independent neighbours: small pointwise groups next to each other in group order that share
  no data path are one group of independent parts, run as one launch (a decode layer's query
  rotation beside its key rotation and cache updates).

All keep the partition contract: a merge happens only when every outside input of the merged
group precedes its first node (``partition_graph.safe``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import torch
import torch.fx as fx

from ..kernels import expr  # (none of these imports Triton)
from ..kernels.base import is_view_op
from ..kernels.gemv_prologue import reduces_rows
from ..kernels.weight_only_ref import GEMV_MAX_M
from .partition_graph import REDUCTIONS, broadcasts_to, indexed_operands, is_reshape, safe
from .rules import is_mutating, is_pure

aten = torch.ops.aten


def merge_pointwise_groups(groups: Sequence, index: Dict[fx.Node, int]) -> List:
    """``groups`` (GroupSpecs) after both merges; merged groups' nodes stay in graph order."""
    return _merge_siblings(_merge_into_readers(list(groups), index), index)


def _merge_into_readers(groups: List, index: Dict[fx.Node, int]) -> List:
    changed = True
    while changed:
        changed = False
        owner = {n: i for i, g in enumerate(groups) for n in g.nodes}
        for g in (g for g in groups if g.kind == "pointwise"):
            inside = set(g.nodes)
            readers = {owner.get(u) for n in g.nodes for u in n.users if u not in inside}
            if len(readers) != 1 or None in readers:
                continue
            target = groups[readers.pop()]
            if target.kind != "pointwise" or not broadcasts_to(_group_shape(g), _group_shape(target)):
                continue
            if _feeds_a_gather(g, target):
                continue
            if safe(index, set(target.nodes), g.nodes) or \
                    (_hoist_fences(index, target.nodes + g.nodes, groups) and safe(index, set(target.nodes), g.nodes)):
                target.nodes = sorted(target.nodes + g.nodes, key=index.__getitem__)
                groups = [x for x in groups if x is not g]
                changed = True
                break
    return groups


def _hoist_fences(index: Dict[fx.Node, float], nodes: Sequence[fx.Node], groups: Sequence) -> bool:
    """Move the outside inputs of ``nodes`` made after their first node up behind their own
    inputs, where each is a pure value of earlier ones (a view, or a whole pointwise group,
    with what it reads after that node): transformers 5's decode slot, ``arange(1) +
    cumulative_length`` made inside each layer's cache update after the key's rotation, fenced
    the rotation off the select reading it. Nothing moves above a write of what it reads.
    Returns whether it moved them (``index`` and the graph order updated)."""
    inside = set(nodes)
    first = min(index[n] for n in inside)
    group_of = {n: g for g in groups for n in g.nodes}
    moving: Set[fx.Node] = set()

    def movable(a: fx.Node) -> bool:
        if a in moving or index[a] < first:
            return True
        if a in inside or a.op != "call_function":
            return False
        members = list(group_of[a].nodes) if a in group_of else [a]
        if any(not _pure_value(m) or not m.all_input_nodes for m in members) or \
                (a in group_of and group_of[a].kind != "pointwise"):
            return False  # (a value of no input, a fill, has each reader compute it: fills_per_reader)
        moving.update(members)
        return all(movable(i) for m in members for i in m.all_input_nodes if i not in moving)

    fences = [a for n in inside for a in n.all_input_nodes if a not in inside and index[a] >= first]
    if not fences or not all(movable(a) for a in fences):
        return False
    ordered = sorted(moving, key=index.__getitem__)
    reads = {_root(i) for m in ordered for i in m.all_input_nodes if i not in moving}
    top = min(max((index[i] for i in m.all_input_nodes if i not in moving), default=-1) for m in ordered)
    if any(top < i < index[ordered[-1]] and is_mutating(n) and any(_root(x) in reads for x in n.all_input_nodes)
           for n, i in index.items()):
        return False
    behind: Dict[fx.Node, fx.Node] = {}
    for m in ordered:  # behind its last input (after the ones moved there before it), in order
        last = max(m.all_input_nodes, key=index.__getitem__)
        spot = behind.get(last, last)
        after = min((i for i in index.values() if i > index[spot]), default=index[spot] + 1)
        spot.append(m)
        index[m] = (index[spot] + after) / 2
        behind[last] = m
    for g in {id(group_of[m]): group_of[m] for m in ordered if m in group_of}.values():
        g.nodes.sort(key=index.__getitem__)  # a moved group's nodes stay in graph order
    return True


def _root(node: fx.Node) -> fx.Node:
    """The tensor a view chain starts from."""
    while node.op == "call_function" and is_view_op(node.target) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _pure_value(n: fx.Node) -> bool:
    """A node computing a value from its inputs alone: a view, or an element-wise ATen op."""
    t = n.target
    return is_pure(n) and isinstance(t, torch._ops.OpOverload) and (is_view_op(t) or torch.Tag.pointwise in t.tags)


def _merge_siblings(groups: List, index: Dict[fx.Node, int]) -> List:
    pointwise = sorted((g for g in groups if g.kind == "pointwise"), key=lambda g: index[g.nodes[0]])
    readers: Dict[fx.Node, List] = {}
    for g in pointwise:
        for x in _outside_inputs(g):
            readers.setdefault(x, []).append(g)
    gone: Set[int] = set()
    for g in pointwise:
        if id(g) in gone:
            continue
        shape = _group_shape(g)
        for x in _outside_inputs(g):
            for h in readers.get(x, ()):
                if h is g or id(h) in gone or _group_shape(h) != shape:
                    continue
                if safe(index, set(g.nodes), h.nodes) or \
                        (_hoist_fences(index, g.nodes + h.nodes, [x for x in groups if id(x) not in gone])
                         and safe(index, set(g.nodes), h.nodes)):
                    g.nodes = sorted(g.nodes + h.nodes, key=index.__getitem__)
                    gone.add(id(h))
    return [g for g in groups if id(g) not in gone]


def merge_gemv_prologues(groups: Sequence, index: Dict[fx.Node, int]) -> List:
    """``groups`` with each decode GEMV's exclusive producer (element-wise, or a norm) merged in."""
    owner = {n: g for g in groups for n in g.nodes}
    gone: Set[int] = set()
    for g in groups:
        x = _gemv_activation(g.anchor) if g.kind == "gemm" and g.anchor is not None else None
        if x is None:
            continue
        anchor, path = g.anchor, []
        while isinstance(x, fx.Node) and x not in owner and is_reshape(x):  # [1, 1, K] -> [1, K]
            path.append(x)
            x = x.args[0]
        producer = owner.get(x) if isinstance(x, fx.Node) else None
        val = _gemv_activation(anchor).meta.get("val")
        if producer is None or id(producer) in gone or not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        k = val.shape[-1]
        rows = val.numel() // k if isinstance(k, int) and k > 0 else None
        if not isinstance(rows, int) or rows > GEMV_MAX_M or not _prologue_kind(producer, val.numel(), k):
            continue
        inside = set(producer.nodes) | set(path) | set(g.nodes)
        if any(u not in inside for n in list(producer.nodes) + path for u in n.users):
            continue  # the value is also read elsewhere: it stays a kernel (and a stored tensor)
        if safe(index, set(g.nodes), list(producer.nodes) + path):
            g.nodes = sorted(list(g.nodes) + list(producer.nodes) + path, key=index.__getitem__)
            gone.add(id(producer))
    return [g for g in groups if id(g) not in gone]


#: iteration size up to which independent pointwise groups share one launch (launch-bound sizes)
COMBO_MAX_NUMEL = 1 << 20
COMBO_MAX_GROUPS = 4


def _feeds_a_gather(g, target) -> bool:
    """Whether a value of ``g`` is a table or the indices of a row gather in ``target``, or a
    roll's input: the code generator loads those from group inputs (OPT's positions,
    cumsum(mask) + 2, merged into its embedding's group took the whole group to ATen)."""
    inside = set(g.nodes)
    return any(a in inside for n in target.nodes for a in (indexed_operands(n) or ()))


def merge_independent_pointwise(groups: Sequence, index: Dict[fx.Node, int]) -> List:
    """Neighbouring small pointwise groups (in group order) that share no data path become one
    group of independent parts, one launch (``kernels/pointwise_combo``): a decode layer's query
    rotation beside its key rotation and cache updates; a step's table gathers and masks."""
    ordered = sorted(groups, key=lambda g: index[g.nodes[0]])
    out: List = []
    size: Dict[int, int] = {}
    for g in ordered:
        prev = out[-1] if out else None
        if (prev is not None and prev.kind == "pointwise" and g.kind == "pointwise"
                and size.get(id(prev), 1) < COMBO_MAX_GROUPS
                and _group_numel(prev) <= COMBO_MAX_NUMEL and _group_numel(g) <= COMBO_MAX_NUMEL
                and not _reads(g, prev) and not _reads(prev, g) and safe(index, set(prev.nodes), g.nodes)):
            prev.nodes = sorted(list(prev.nodes) + list(g.nodes), key=index.__getitem__)
            size[id(prev)] = size.get(id(prev), 1) + 1
            continue
        out.append(g)
    return out


def _reads(g, h) -> bool:
    """Whether a node of ``g`` reads a value of ``h`` (directly or through views outside groups)."""
    inside = set(h.nodes)
    for a in (a for n in g.nodes for a in n.all_input_nodes):
        while a not in inside and a.op == "call_function" and is_view_op(a.target) and a.args \
                and isinstance(a.args[0], fx.Node):
            a = a.args[0]
        if a in inside:
            return True
    return False


def _group_numel(group) -> int:
    v = max((n.meta.get("val") for n in group.nodes), key=lambda v: v.numel() if isinstance(v, torch.Tensor) else -1)
    n = v.numel() if isinstance(v, torch.Tensor) else 0
    return n if isinstance(n, int) else COMBO_MAX_NUMEL + 1


def _gemv_activation(anchor: fx.Node):
    """The activation of a GEMM the fused decode GEMV serves: a weight-only linear's x, or a
    float ``mm`` / ``addmm``'s a when b is a constant (a frozen weight, through views); else None."""
    name = getattr(anchor.target, "_opname", None)
    if name == "weight_only_linear":
        return anchor.args[0] if isinstance(anchor.args[0], fx.Node) else None
    packet = getattr(anchor.target, "overloadpacket", None)
    if packet not in (aten.mm, aten.addmm):
        return None
    a, b = anchor.args[-2:] if packet is aten.addmm else anchor.args[:2]
    while isinstance(b, fx.Node) and b.op == "call_function" and is_view_op(b.target):
        b = b.args[0]
    return a if isinstance(a, fx.Node) and isinstance(b, fx.Node) and b.op == "get_attr" else None


def _prologue_kind(group, numel: int, k: int) -> bool:
    """A group a GEMV prologue computes: element-wise ops, and for a norm, reductions over x's
    rows (``gemv_prologue``'s row values)."""
    reductions = [n for n in group.nodes if getattr(n.target, "overloadpacket", None) in REDUCTIONS]
    if group.kind not in ("pointwise", "reduction") or (group.kind == "reduction") != bool(reductions):
        return False
    if not all(reduces_rows(n, numel, k) for n in reductions):
        return False
    # every other op one generated line (expr): no cat, no gather (pointwise kernels' own code)
    return all(n in reductions or is_view_op(n.target) or expr.unsupported_reason(n) is None for n in group.nodes)


def _outside_inputs(group) -> List[fx.Node]:
    """The tensors a group reads from outside, each seen through its views (two updates
    reading one position through views of their own share it)."""
    inside = set(group.nodes)
    out = []
    for a in (a for n in group.nodes for a in n.all_input_nodes):
        if a in inside or not isinstance(a.meta.get("val"), torch.Tensor):
            continue
        out.append(_root(a))
    return list(dict.fromkeys(out))


def _group_shape(group) -> Tuple[int, ...]:
    """The group's iteration shape: its largest value's."""
    v = max((n.meta.get("val") for n in group.nodes), key=lambda v: v.numel() if isinstance(v, torch.Tensor) else -1)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


__all__ = ["merge_pointwise_groups", "merge_gemv_prologues", "merge_independent_pointwise"]
