"""The graph-level steps around the partitioner's policy (partition.py): before grouping, put
constants first, views right behind their input and a copy of each fill at each reader; after,
make each group's nodes adjacent; and check the partition contract (``validate``).
"""
from __future__ import annotations

import operator
from typing import Dict, Sequence, Set, Tuple

import torch
import torch.fx as fx

from ..kernels.base import KINDS, axis_index_parts, is_fill, is_view_op, pad_parts, roll_parts  # (imports neither Triton nor any kernel module)

aten = torch.ops.aten
#: reshapes that keep row-major order when their input is contiguous (``is_reshape``)
RESHAPES = (aten.view, aten._unsafe_view, aten.reshape)
#: the ops reduction groups are anchored on (partition.py)
REDUCTIONS = (aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.var_mean,
              aten._softmax, aten._log_softmax, aten.native_layer_norm, aten.logsumexp)


def hoist_constants(graph: fx.Graph) -> None:
    """Put every get_attr right after the placeholders: constants are available from the start
    (constant folding leaves them next to their first user, which would fence groups)."""
    anchor = None
    for n in graph.nodes:
        if n.op == "placeholder":
            anchor = n
    consts = [n for n in graph.nodes if n.op == "get_attr"]
    for n in consts:
        if anchor is None:
            first = next(iter(graph.nodes))
            if first is not n:
                first.prepend(n)
        elif n.prev is not anchor:
            anchor.append(n)
        anchor = n


def hoist_views(graph: fx.Graph) -> None:
    """Move each view (and getitem, reshape) right behind its last input. Passes leave them next
    to their first user; there, a view read by a group but made after the group's first node
    fences the group (its outside inputs must precede it): Llama's SwiGLU, ``silu(gate) * up``
    with gate and up two views of one merged GEMM's output, became two kernels."""
    behind: Dict[fx.Node, fx.Node] = {}  # input -> the last node moved behind it (keeps their order)
    for n in list(graph.nodes):
        if n.op != "call_function" or not (n.target is operator.getitem or is_reshape(n) or is_view_op(n.target)):
            continue
        inputs = n.all_input_nodes
        if not inputs:
            continue
        last = max(inputs, key=lambda a: _order(graph, a))
        spot = behind.get(last, last)
        if n.prev is not spot and n is not spot:
            spot.append(n)
        behind[last] = n


def fills_per_reader(graph: fx.Graph) -> None:
    """Give each reader of a contiguous fill (``zeros``, ``ones_like(x)``, ``scalar_tensor``...)
    its own ``aten.full`` right before it, reading no tensor: every kernel can then compute the
    constant itself (a fused group's value, not a launch; a fill shared by five groups fenced
    each of them, as it ran between their producers and them)."""
    for n in list(graph.nodes):
        val = n.meta.get("val")
        if not is_fill(n) or not isinstance(val, torch.Tensor) or not val.is_contiguous():
            continue
        value = _fill_value(n)
        if value is None:
            continue
        for i, u in enumerate(list(n.users)):
            if u.op == "output":
                continue
            with graph.inserting_before(u):
                c = graph.call_function(aten.full.default, (list(val.shape), value),
                                        {"dtype": val.dtype, "layout": torch.strided, "device": val.device,
                                         "pin_memory": False})
            c.meta.update(n.meta)
            u.replace_input_with(n, c)
        if not n.users:
            graph.erase_node(n)


def _fill_value(n: fx.Node):
    packet = n.target.overloadpacket
    if packet in (aten.zeros, aten.zeros_like, aten.new_zeros):
        return 0
    if packet in (aten.ones, aten.ones_like, aten.new_ones):
        return 1
    position = {aten.full: 1, aten.full_like: 1, aten.new_full: 2, aten.scalar_tensor: 0}.get(packet)
    value = n.args[position] if position is not None and len(n.args) > position else n.kwargs.get("fill_value")
    return value if isinstance(value, (bool, int, float)) else None


def _order(graph: fx.Graph, node: fx.Node) -> int:
    """A node's position (fx keeps a topological sort key per node in recent torch versions)."""
    return node._sort_key if hasattr(node, "_sort_key") else list(graph.nodes).index(node)


def make_adjacent(graph: fx.Graph, groups: Sequence) -> None:
    """Move each group's later nodes right behind its first one (valid: their outside inputs
    all precede the first node, and their users all follow their old position)."""
    for g in groups:
        prev = g.nodes[0]
        for n in g.nodes[1:]:
            if n.prev is not prev:
                prev.append(n)
            prev = n


def validate(gm: fx.GraphModule, groups: Sequence) -> None:
    """Raise AssertionError when ``groups`` break the partition contract."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    owner: Dict[fx.Node, int] = {}
    for gi, g in enumerate(groups):
        assert g.kind in KINDS, g.kind
        assert g.nodes == sorted(g.nodes, key=index.__getitem__), f"group {gi} not in graph order"
        for n in g.nodes:
            assert n not in owner, f"{n.name} is in groups {owner[n]} and {gi}"
            owner[n] = gi
            assert not (isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable), \
                f"mutating {n.name} in group {gi}"
    for gi, g in enumerate(groups):
        inside = set(g.nodes)
        last = index[g.nodes[-1]]
        for n in g.nodes:
            for u in n.users:
                # an outside user of a group value must come after the whole group
                assert u in inside or index[u] > last, f"{u.name} reads group {gi} before it completes"
            for a in n.all_input_nodes:
                assert a in inside or index[a] < index[g.nodes[0]], \
                    f"group {gi} reads {a.name}, which is computed inside its span"


def is_op(node: fx.Node, packets) -> bool:
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.overloadpacket in packets


def is_reshape(node: fx.Node) -> bool:
    """A reshape that keeps row-major element order (input contiguous)."""
    if not is_op(node, RESHAPES):
        return False
    src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return isinstance(src, torch.Tensor) and src.is_contiguous()


def safe(index: Dict[fx.Node, int], members: Set[fx.Node], extra: Sequence[fx.Node] = ()) -> bool:
    """Every outside input of ``members | extra`` precedes their first node (graph order
    ``index``): the contract that lets a group run as one unit."""
    nodes = members.union(extra)
    first = min(index[n] for n in nodes)
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in nodes and index[a] >= first:
                return False
    return True


def broadcasts_to(shape: Tuple[int, ...], frame: Tuple[int, ...]) -> bool:
    """``shape`` broadcasts (right-aligned) to ``frame``: a row value, a per-row value, a constant."""
    if len(shape) > len(frame):
        return False
    return all(s in (1, f) for s, f in zip(reversed(shape), reversed(frame)))


def gather_operands(node: fx.Node):
    """(table, indices) of a row gather: ``aten.embedding(weight, indices)`` or
    ``aten.index.Tensor(table, [indices])`` (``table[indices]``: a rotary table by position);
    None for anything else."""
    if node.op != "call_function" or len(node.args) < 2:
        return None
    if node.target is aten.embedding.default:
        return node.args[0], node.args[1]
    if node.target is aten.index.Tensor and isinstance(node.args[1], (list, tuple)) and len(node.args[1]) == 1:
        return node.args[0], node.args[1][0]
    return None


def indexed_operands(node: fx.Node):
    """The tensors a generated pointwise kernel loads at computed indices rather than the
    element's own, which must be inputs of its group (their producers never join it): a row
    gather's table and indices, a roll's or a pad's input, an interpolation's input and index tables; None for
    other nodes."""
    parts = roll_parts(node) or pad_parts(node)
    if parts is not None:
        return (parts[0],)
    indexed = axis_index_parts(node)
    if indexed is not None:
        return (indexed[0], *(t for _, t in indexed[1]))
    return gather_operands(node)


__all__ = ["gather_operands", "indexed_operands", "RESHAPES", "safe", "broadcasts_to", "hoist_constants", "hoist_views", "fills_per_reader", "make_adjacent", "validate", "is_op", "is_reshape"]
