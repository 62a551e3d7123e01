"""Indexing and stacking in the forms the generated kernels take.

Rotary embeddings written by model authors reach ATen in several spellings of "the position's row
of a table" and "interleave two halves": GPT-J's ``gather`` of a repeated table by a repeated
position and ``stack((-x2, x1), -1)``, Falcon's ``cos[..., position, :]`` (an ``index`` with
leading ``None``). The pointwise generator has a row gather (a 2-D table's rows by integer index,
``partition.fusable_gather``) and a cat of a few pieces (``partition.fusable_cat``); anything else
is an ATen launch a step, and it splits the fused rotary chain around it. These rules rewrite the
other spellings into those two, value for value (no arithmetic changes; views and one copy
fewer):

* ``stack`` of at most four pieces along a dim other than 0 is ``cat`` of the pieces unsqueezed
  there (a stack along dim 0 stays: ``stack_outputs`` writes each piece into its slice in place).
* ``repeat`` whose repeated dims all have size 1 (after the leading dims it adds) is an
  ``expand`` of the reshaped input (a view: no copy).
* ``gather(x, d, index)`` whose index is one value along every dim but ``d`` (an expand of a
  tensor with size 1 there) and whose output keeps ``x``'s other sizes is ``x`` indexed along
  ``d`` by that tensor's values (an ``index`` with ``None`` before ``d``).
* ``index_select(x, d, i)`` is ``index(x, [None] * d + [i])`` (XGLM's sinusoidal positions:
  the rules below and the row gather take that form).
* ``index(x, [None] * d + [i])`` with a constant 1-D ``i`` whose values step evenly upwards is a
  ``slice`` of ``x`` along ``d`` (a view: Falcon's ``qkv[..., [-2], :]`` at any batch).
* ``index(x, [None] * d + [i])`` with a 1-D ``i`` and ``x``'s dims before ``d`` all of size 1 is
  a row gather of ``x`` viewed as [x.shape[d], rest], viewed back.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.fx as fx

from .base import PassContext
from .rules import Facts, Rule, apply_rules, call, erase_if_dead, evaluate_constant, is_op, shape, tensor_val

aten = torch.ops.aten

#: pieces a stack may have to become a cat the pointwise generator takes (partition's cat limit)
MAX_STACK_PIECES = 4


def canonical_gathers(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Apply :data:`GATHER_RULES`; returns {rule: matches}."""
    return apply_rules(gm, ctx, GATHER_RULES)


def _replace(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> None:
    node.replace_all_uses_with(new)
    erase_if_dead(gm.graph, [node])


# ----------------------------------------------------------------------------- stack -> cat
def _match_stack(node: fx.Node, facts: Facts) -> Optional[int]:
    if not is_op(node, aten.stack) or node in facts.unsafe:
        return None
    pieces = node.args[0]
    out = tensor_val(node)
    if out is None or not isinstance(pieces, (list, tuple)) or not 1 <= len(pieces) <= MAX_STACK_PIECES:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = dim % out.dim()
    return dim if dim != 0 else None


def _stack_as_cat(gm: fx.GraphModule, node: fx.Node, dim: int) -> None:
    with gm.graph.inserting_before(node):
        pieces = [call(gm.graph, aten.unsqueeze.default, (p, dim)) for p in node.args[0]]
        cat = call(gm.graph, aten.cat.default, (pieces, dim))
    _replace(gm, node, cat)


# ----------------------------------------------------------------------------- repeat -> expand
def _match_repeat(node: fx.Node, facts: Facts) -> Optional[list]:
    """The input's shape padded with leading 1s to the repeat's rank, when every repeated dim
    has size 1 there (and the result is not returned: a view must not become an output)."""
    if not is_op(node, aten.repeat) or node in facts.unsafe or node in facts.outputs:
        return None
    x, reps = tensor_val(node.args[0]), node.args[1]
    if x is None or not all(isinstance(r, int) for r in reps) or len(reps) < x.dim():
        return None
    padded = [1] * (len(reps) - x.dim()) + list(x.shape)
    return padded if all(r == 1 or s == 1 for s, r in zip(padded, reps)) else None


def _repeat_as_expand(gm: fx.GraphModule, node: fx.Node, padded: list) -> None:
    with gm.graph.inserting_before(node):
        x = call(gm.graph, aten.reshape.default, (node.args[0], padded))
        out = call(gm.graph, aten.expand.default, (x, list(shape(node))))
    _replace(gm, node, out)


# ----------------------------------------------------------------------------- gather -> index
def _match_gather(node: fx.Node, facts: Facts) -> Optional[tuple]:
    """(x, d, the index's source) of a gather whose index is an expand of a tensor with size 1
    on every dim but ``d``, keeping ``x``'s sizes off ``d``."""
    if not is_op(node, aten.gather) or node in facts.unsafe or node.kwargs.get("sparse_grad"):
        return None
    x, d, index = node.args[0], node.args[1], node.args[2]
    xv, out = tensor_val(x), tensor_val(node)
    if xv is None or out is None or not isinstance(index, fx.Node) or not is_op(index, aten.expand):
        return None
    d = d % xv.dim()
    src = tensor_val(index.args[0])
    if src is None or src.dim() != xv.dim():
        return None
    if any(src.shape[j] != 1 or out.shape[j] != xv.shape[j] for j in range(xv.dim()) if j != d):
        return None
    return x, d, index.args[0]


def _gather_as_index(gm: fx.GraphModule, node: fx.Node, found: tuple) -> None:
    x, d, src = found
    with gm.graph.inserting_before(node):
        flat = call(gm.graph, aten.reshape.default, (src, [-1]))
        picked = call(gm.graph, aten.index.Tensor, (x, [None] * d + [flat]))
        # index puts the picked positions at d (x's other dims around them): the gather's shape
        out = call(gm.graph, aten.reshape.default, (picked, list(shape(node))))
    _replace(gm, node, out)


# ----------------------------------------------------------------------------- index_select -> index
def _match_index_select(node: fx.Node, facts: Facts) -> Optional[int]:
    """The dim of ``index_select(x, d, i)`` with a 1-D integer ``i``."""
    if not is_op(node, aten.index_select) or node in facts.unsafe or len(node.args) != 3:
        return None
    xv, iv = tensor_val(node.args[0]), tensor_val(node.args[2])
    if xv is None or iv is None or iv.dim() != 1 or iv.dtype not in (torch.int32, torch.int64) or xv.dim() == 0:
        return None
    return node.args[1] % xv.dim()


def _index_select_as_index(gm: fx.GraphModule, node: fx.Node, d: int) -> None:
    with gm.graph.inserting_before(node):
        out = call(gm.graph, aten.index.Tensor, (node.args[0], [None] * d + [node.args[2]]))
    _replace(gm, node, out)


# ----------------------------------------------------------------------------- index -> slice
def _match_constant_range(node: fx.Node, facts: Facts) -> Optional[tuple]:
    """(d, start, stop, step) of ``index(x, [None] * d + [i])`` whose ``i`` is a constant 1-D
    integer tensor of evenly rising in-range positions (negative ones counted from the end)."""
    if node.target is not aten.index.Tensor or node in facts.unsafe:
        return None
    x, indices = tensor_val(node.args[0]), node.args[1]
    if x is None or not isinstance(indices, (list, tuple)) or not indices or \
            any(t is not None for t in indices[:-1]) or not isinstance(indices[-1], fx.Node):
        return None
    d, i = len(indices) - 1, indices[-1]
    iv = tensor_val(i)
    if d >= x.dim() or iv is None or iv.dim() != 1 or iv.numel() == 0 or iv.dtype not in (torch.int32, torch.int64) \
            or not facts.constant(i):
        return None
    values = evaluate_constant(facts.gm, i)
    size = x.shape[d]
    if not isinstance(values, torch.Tensor) or not bool(((values >= -size) & (values < size)).all()):
        return None
    at = [int(v) % size for v in values.tolist()]
    step = at[1] - at[0] if len(at) > 1 else 1
    if step < 1 or any(b - a != step for a, b in zip(at, at[1:])):
        return None
    return d, at[0], at[-1] + 1, step


def _index_as_slice(gm: fx.GraphModule, node: fx.Node, found: tuple) -> None:
    d, start, stop, step = found
    with gm.graph.inserting_before(node):
        out = call(gm.graph, aten.slice.Tensor, (node.args[0], d, start, stop, step))
    _replace(gm, node, out)


# ----------------------------------------------------------------------------- index -> row gather
def _match_index(node: fx.Node, facts: Facts) -> Optional[tuple]:
    """(d, i) of ``index(x, [None] * d + [i])``, d > 0, i 1-D integer, x's dims before d of
    size 1 (so the result is rows of x viewed [x.shape[d], rest])."""
    if node.target is not aten.index.Tensor or node in facts.unsafe:
        return None
    x, indices = tensor_val(node.args[0]), node.args[1]
    if x is None or not isinstance(indices, (list, tuple)) or len(indices) < 2:
        return None
    d = len(indices) - 1
    i = indices[-1]
    iv = tensor_val(i)
    if any(t is not None for t in indices[:-1]) or iv is None or iv.dim() != 1 \
            or iv.dtype not in (torch.int32, torch.int64):
        return None
    if d >= x.dim() or any(s != 1 for s in x.shape[:d]):
        return None
    return d, i


def _index_as_row_gather(gm: fx.GraphModule, node: fx.Node, found: tuple) -> None:
    d, i = found
    x = node.args[0]
    rows = shape(x)[d]
    with gm.graph.inserting_before(node):
        table = call(gm.graph, aten.reshape.default, (x, [rows, math.prod(shape(x)[d + 1:])]))
        picked = call(gm.graph, aten.index.Tensor, (table, [i]))
        out = call(gm.graph, aten.reshape.default, (picked, list(shape(node))))
    _replace(gm, node, out)


GATHER_RULES = (
    Rule("index_select_as_index", "index_select(x, d, i) is index(x, [None]*d + [i]): the form the rules "
         "below and the generated row gather take (XGLM's sinusoidal positions)", _match_index_select,
         _index_select_as_index),
    Rule("stack_as_cat", "stack of <= 4 pieces along a dim other than 0 is cat of the pieces unsqueezed "
         "there (rotary interleaves; dim 0 stays for stack_outputs)", _match_stack, _stack_as_cat),
    Rule("repeat_as_expand", "repeat whose repeated dims have size 1 is an expand of the input reshaped "
         "(a view, no copy)", _match_repeat, _repeat_as_expand),
    Rule("gather_as_index", "gather by an index constant off its dim (an expand) is index along that dim "
         "(GPT-J's position row)", _match_gather, _gather_as_index),
    Rule("index_as_slice", "index(x, [None]*d + [i]) by constant evenly rising positions is a slice along d "
         "(a view: Falcon's qkv[..., [-2], :])", _match_constant_range, _index_as_slice),
    Rule("index_as_row_gather", "index(x, [None]*d + [i]) with x's dims before d of size 1 is a row gather "
         "of x viewed [rows, rest] (Falcon's cos[..., pos, :])", _match_index, _index_as_row_gather),
)

__all__ = ["canonical_gathers", "GATHER_RULES", "MAX_STACK_PIECES"]
