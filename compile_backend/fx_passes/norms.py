"""Norms in the forms the generated kernels take.

The reduction generator has ``native_layer_norm`` and the plain reductions (``sum``, ``mean``,
``var_mean``...); two norms other models use reach ATen as ops of their own and ran there, an
ATen launch each between fused kernels (benchmarks/vision_families.py, session 37):

* ``native_group_norm`` (GroupNorm: PoolFormer, ConvNeXt-style blocks, wav2vec2's feature
  encoder, diffusion UNets) whose mean / rstd go unread is a layer norm over the input viewed
  as [N, groups, C / groups * spatial], without weights, then the per-channel affine. All of it
  in fp32 (a 16-bit input is widened first, the result rounded once), as ATen computes it:
  mean, biased variance, ``rsqrt(var + eps)``, ``(x - mean) * rstd * w + b``.
* ``linalg_vector_norm`` of order 2 (ConvNeXt V2's global response norm, ``F.normalize`` in
  CLIP / sentence-embedding heads) is ``sqrt(sum(x * x))`` over its dims, in fp32, rounded once
  to the result's dtype (ATen accumulates a 16-bit input in fp32 too).
"""
from __future__ import annotations

import math
import operator
from typing import Dict, NamedTuple, Optional

import torch
import torch.fx as fx

from .base import PassContext
from .rules import Facts, Rule, apply_rules, call, is_op, shape, tensor_val, to_dtype, to_float

aten = torch.ops.aten


def canonical_norms(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Rewrite group norms and 2-norms into layer norms and sums; returns the count per rule."""
    return apply_rules(gm, ctx, NORM_RULES)


class _GroupNorm(NamedTuple):
    out: fx.Node  # getitem(group_norm, 0)
    x: fx.Node
    weight: Optional[fx.Node]
    bias: Optional[fx.Node]
    groups: int
    eps: float


def _match_group_norm(node: fx.Node, facts: Facts) -> Optional[_GroupNorm]:
    """Output 0 of ``native_group_norm`` over a float input, its mean and rstd unread."""
    if node.target is not operator.getitem or node.args[1] != 0 or not is_op(node.args[0], aten.native_group_norm):
        return None
    gn = node.args[0]
    if any(u is not node for u in gn.users) or gn in facts.unsafe:
        return None
    x, weight, bias, n, c, hw, groups, eps = gn.args[:8]
    xv = tensor_val(x)
    if xv is None or not xv.is_floating_point() or xv.dim() < 2 or not all(isinstance(v, int) for v in (n, c, hw, groups)):
        return None
    if groups < 1 or c % groups or tuple(xv.shape[:2]) != (n, c) or math.prod(xv.shape[2:]) != hw:
        return None
    return _GroupNorm(node, x, weight, bias, int(groups), float(eps))


def _group_norm_as_layer_norm(gm: fx.GraphModule, node: fx.Node, m: _GroupNorm) -> None:
    graph = gm.graph
    xv = tensor_val(m.x)
    n, c = xv.shape[:2]
    per_group = (c // m.groups) * math.prod(xv.shape[2:])
    with graph.inserting_before(m.out.args[0]):
        rows = call(graph, aten.reshape.default, (to_float(graph, m.x), [n, m.groups, per_group]))
        ln = call(graph, aten.native_layer_norm.default, (rows, [per_group], None, None, m.eps))
        y = call(graph, aten.reshape.default, (call(graph, operator.getitem, (ln, 0)), list(xv.shape)))
        channel = [-1] + [1] * (xv.dim() - 2)
        if m.weight is not None:
            y = call(graph, aten.mul.Tensor, (y, call(graph, aten.view.default, (to_float(graph, m.weight), channel))))
        if m.bias is not None:
            y = call(graph, aten.add.Tensor, (y, call(graph, aten.view.default, (to_float(graph, m.bias), channel))))
        y = to_dtype(graph, y, tensor_val(m.out).dtype)
    gn = m.out.args[0]
    m.out.replace_all_uses_with(y)
    graph.erase_node(m.out)
    graph.erase_node(gn)


class _VectorNorm(NamedTuple):
    x: fx.Node
    dims: Optional[list]
    keepdim: bool


def _match_vector_norm(node: fx.Node, facts: Facts) -> Optional[_VectorNorm]:
    """``linalg_vector_norm(x, 2, dims, keepdim)`` of a real float input, no dtype argument."""
    if not is_op(node, aten.linalg_vector_norm) or node in facts.unsafe:
        return None
    names = ("self", "ord", "dim", "keepdim")
    defaults = (None, 2, None, False)
    x, order, dims, keepdim = (node.kwargs.get(k, node.args[i] if i < len(node.args) else defaults[i])
                               for i, k in enumerate(names))
    xv, out = tensor_val(x), tensor_val(node)
    if node.kwargs.get("dtype") is not None or xv is None or out is None or xv.is_complex():
        return None
    if not xv.is_floating_point() or order != 2 or xv.numel() == 0:
        return None
    if isinstance(dims, int):
        dims = [dims]
    return _VectorNorm(x, list(dims) if dims else None, bool(keepdim))


def _vector_norm_as_sum(gm: fx.GraphModule, node: fx.Node, m: _VectorNorm) -> None:
    graph = gm.graph
    with graph.inserting_before(node):
        x = to_float(graph, m.x)
        square = call(graph, aten.mul.Tensor, (x, x))
        dims = m.dims if m.dims is not None else list(range(len(shape(m.x))))
        total = call(graph, aten.sum.dim_IntList, (square, dims, m.keepdim))
        norm = to_dtype(graph, call(graph, aten.sqrt.default, (total,)), tensor_val(node).dtype)
    node.replace_all_uses_with(norm)
    graph.erase_node(node)


NORM_RULES = (
    Rule("group_norm_as_layer_norm", "GroupNorm -> a layer norm over [N, groups, rest] and the per-channel affine, fp32",
         _match_group_norm, _group_norm_as_layer_norm),
    Rule("vector_norm_as_sum", "2-norm -> sqrt(sum(x * x)) over its dims in fp32, rounded once",
         _match_vector_norm, _vector_norm_as_sum),
)

__all__ = ["canonical_norms", "NORM_RULES"]
