"""Pointwise groups merged after the partitioner formed them (partition.py, policy step 5):
fewer launches where one kernel can compute what several did.

* Into their reader: a pointwise group whose values only one bigger pointwise group reads (no
  graph output, nothing else) joins it when its shape broadcasts to the reader's; it is then
  computed there at every element and never stored (a decode step's rotated keys, a cat inside,
  feed only the cache update that selects them into their slot).
* Siblings: pointwise groups of one shape that read a common input (seen through views) and
  reach each other through nothing computed in between become one kernel (a decode step's key
  and value cache updates select by the same position).

Both keep the partition contract: a merge happens only when every outside input of the merged
group precedes its first node (``partition_graph.safe``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import torch
import torch.fx as fx

from ..kernels.base import is_view_op  # (imports neither Triton nor any kernel module)
from .partition_graph import broadcasts_to, safe


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
            if safe(index, set(target.nodes), g.nodes):
                target.nodes = sorted(target.nodes + g.nodes, key=index.__getitem__)
                groups = [x for x in groups if x is not g]
                changed = True
                break
    return groups


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
                if safe(index, set(g.nodes), h.nodes):
                    g.nodes = sorted(g.nodes + h.nodes, key=index.__getitem__)
                    gone.add(id(h))
    return [g for g in groups if id(g) not in gone]


def _outside_inputs(group) -> List[fx.Node]:
    """The tensors a group reads from outside, each seen through its views (two updates
    reading one position through views of their own share it)."""
    inside = set(group.nodes)
    out = []
    for a in (a for n in group.nodes for a in n.all_input_nodes):
        if a in inside or not isinstance(a.meta.get("val"), torch.Tensor):
            continue
        while a.op == "call_function" and is_view_op(a.target) and a.args and isinstance(a.args[0], fx.Node):
            a = a.args[0]
        out.append(a)
    return list(dict.fromkeys(out))


def _group_shape(group) -> Tuple[int, ...]:
    """The group's iteration shape: its largest value's."""
    v = max((n.meta.get("val") for n in group.nodes), key=lambda v: v.numel() if isinstance(v, torch.Tensor) else -1)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


__all__ = ["merge_pointwise_groups"]
