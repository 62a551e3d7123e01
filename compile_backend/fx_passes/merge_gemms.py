"""Horizontal merge: GEMMs (and 1x1 convolutions) that read the same input become one.

Q, K and V projections are three ``addmm(b_i, x, W_i^T)`` over one ``x``: one
``addmm(cat(b_i), x, cat(W_i)^T)`` followed by a split reads ``x`` once and launches one larger,
better-occupied GEMM. The concatenations are ATen ops over the constant weights, so
``constant_fold`` computes them once (and again on refit). The split pieces are column slices
of the merged result; consumers that cannot view such a slice get a contiguous copy
(``rules.propagate_meta``), which the QKV head-split views never need.

Rules (each group shares one input node and has constant weights):
* addmm with 1-D constant bias, default alpha/beta: merged with the other addmms;
* mm: merged with the other mms;
* 1x1 convolution (groups 1, same stride/padding/dilation, bias present in all or none):
  merged when it pays, i.e. when no branch loses a fused epilogue: a branch whose only
  consumer is a pointwise op would have fused it into its own conv kernel, and after the merge
  that op reads a strided slice in a kernel of its own, costing more than the one extra read of
  the input the merge saves (ResNet's downsample / conv1 pair is such a case).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from .base import PassContext
from .rules import (Facts, call, erase_if_dead, is_op, propagate_meta, shape, single_user, sort_topologically,
                    tensor_val)

aten = torch.ops.aten



@dataclasses.dataclass(frozen=True)
class MergeRule:
    name: str
    comment: str  # one line: what the rule does
    key: Callable[[fx.Node, fx.Node, Facts], Optional[Tuple]]  # merge group of a user of x, or None
    pays: Callable[[List[fx.Node]], bool]  # whether merging these members is worth it
    build: Callable[[fx.Graph, fx.Node, List[fx.Node]], Tuple[fx.Node, List[int]]]  # merged node, split sizes


def merge_parallel_gemms(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Merge GEMMs / 1x1 convs reading one input; returns the merged groups per rule."""
    graph = gm.graph
    facts = Facts(gm, ctx)
    counts = {rule.name: 0 for rule in MERGE_RULES}
    changed: List[fx.Node] = []
    for x in list(graph.nodes):
        if x in facts.unsafe:
            continue
        groups: Dict[Tuple, List[fx.Node]] = {}
        for user in x.users:
            if user in facts.unsafe or user in facts.outputs:
                continue
            for rule in MERGE_RULES:
                key = rule.key(user, x, facts)
                if key is not None:
                    groups.setdefault((rule, key), []).append(user)
                    break
        for (rule, _), members in groups.items():
            if len(members) < 2:
                continue
            order = {n: i for i, n in enumerate(graph.nodes)}
            members.sort(key=order.__getitem__)
            if not rule.pays(members):
                continue
            changed.extend(_merge(graph, rule, x, members))
            counts[rule.name] += 1
    if changed:
        sort_topologically(graph)
        propagate_meta(graph, changed)
    return counts


# ----------------------------------------------------------------------------- members
def _addmm_key(node: fx.Node, x: fx.Node, facts: Facts) -> Optional[Tuple]:
    if not (is_op(node, aten.addmm) and len(node.args) == 3 and not node.kwargs and node.args[1] is x):
        return None
    bias, _, w = node.args
    if not (facts.constant(w) and facts.constant(bias)) or len(shape(w)) != 2:
        return None
    if shape(bias) != (shape(w)[1],):
        return None  # a broadcast [M, N] bias cannot be concatenated along N
    return (tensor_val(w).dtype, tensor_val(bias).dtype)


def _mm_key(node: fx.Node, x: fx.Node, facts: Facts) -> Optional[Tuple]:
    if not (is_op(node, aten.mm) and node.args[0] is x and len(shape(node.args[1])) == 2):
        return None
    return (tensor_val(node.args[1]).dtype,) if facts.constant(node.args[1]) else None


def _conv1x1_key(node: fx.Node, x: fx.Node, facts: Facts) -> Optional[Tuple]:
    if not (is_op(node, aten.convolution) and node.args[0] is x and not node.kwargs):
        return None
    _, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args
    if transposed or groups != 1 or len(shape(w)) != 4 or tuple(shape(w)[2:]) != (1, 1):
        return None
    if not facts.constant(w) or (b is not None and not facts.constant(b)):
        return None
    return (tuple(stride), tuple(padding), tuple(dilation), b is None, tensor_val(w).dtype)


def _always(members: List[fx.Node]) -> bool:
    return True


def _no_epilogue_lost(members: List[fx.Node]) -> bool:
    for m in members:
        user = single_user(m)
        target = getattr(user, "target", None)
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
            return False
    return True


# ----------------------------------------------------------------------------- builders
def _transposed_source(w: fx.Node) -> Optional[fx.Node]:
    """``A`` when ``w`` is ``A.t()`` (a Linear weight as addmm/mm reads it)."""
    if is_op(w, aten.t) or (is_op(w, aten.transpose) and sorted(a % 2 for a in w.args[1:3]) == [0, 1]) \
            or (is_op(w, aten.permute) and list(w.args[1]) == [1, 0]):
        src = w.args[0]
        return src if len(shape(src)) == 2 else None
    return None


def _cat_weights(graph: fx.Graph, weights: List[fx.Node]) -> fx.Node:
    sources = [_transposed_source(w) for w in weights]
    if all(s is not None for s in sources):
        # concatenate the [N_i, K] weights and transpose once: the layout the GEMMs had
        return call(graph, aten.t.default, (call(graph, aten.cat.default, (sources, 0)),))
    return call(graph, aten.cat.default, (weights, 1))


def _build_addmm(graph: fx.Graph, x: fx.Node, members: List[fx.Node]):
    weights = [m.args[2] for m in members]
    bias = call(graph, aten.cat.default, ([m.args[0] for m in members], 0))
    return call(graph, aten.addmm.default, (bias, x, _cat_weights(graph, weights))), [shape(w)[1] for w in weights]


def _build_mm(graph: fx.Graph, x: fx.Node, members: List[fx.Node]):
    weights = [m.args[1] for m in members]
    return call(graph, aten.mm.default, (x, _cat_weights(graph, weights))), [shape(w)[1] for w in weights]


def _build_conv1x1(graph: fx.Graph, x: fx.Node, members: List[fx.Node]):
    weights = [m.args[1] for m in members]
    w = call(graph, aten.cat.default, (weights, 0))
    b = members[0].args[2]
    if b is not None:
        b = call(graph, aten.cat.default, ([m.args[2] for m in members], 0))
    return call(graph, aten.convolution.default, (x, w, b, *members[0].args[3:])), [shape(w)[0] for w in weights]


def _merge(graph: fx.Graph, rule: MergeRule, x: fx.Node, members: List[fx.Node]) -> List[fx.Node]:
    with graph.inserting_before(members[0]):
        merged, sizes = rule.build(graph, x, members)
        parts = call(graph, aten.split_with_sizes.default, (merged, sizes, 1))
        pieces = [call(graph, operator.getitem, (parts, i)) for i in range(len(members))]
    for member, piece in zip(members, pieces):
        member.replace_all_uses_with(piece)
    erase_if_dead(graph, members)
    return pieces


MERGE_RULES = (
    MergeRule("addmm", "addmm(b_i, x, W_i) over one x -> addmm(cat(b_i), x, cat(W_i)) + split",
              _addmm_key, _always, _build_addmm),
    MergeRule("mm", "mm(x, W_i) over one x -> mm(x, cat(W_i)) + split", _mm_key, _always, _build_mm),
    MergeRule("conv1x1", "1x1 conv(x, W_i, b_i) over one x -> one conv over cat(W_i) + split, "
              "when no branch loses a fused epilogue", _conv1x1_key, _no_epilogue_lost, _build_conv1x1),
)

__all__ = ["merge_parallel_gemms", "MERGE_RULES"]
