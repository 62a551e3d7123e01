"""Rows picked after a row-wise op are picked before it: the op then runs on those rows only.

A classifier that reads one token normalises every token first (torchvision's ViT: the encoder's
final LayerNorm over [B, 197, 768], then ``x[:, 0]``): 196 of every 197 rows are computed and
thrown away, and in a quantized engine the head's input quantize cannot join the norm's kernel
(it reads a slice of the norm's output). A layer norm normalises each row on its own, so
selecting rows (``select`` / ``slice`` along a dim before the normalised ones) commutes with it.
"""
from __future__ import annotations

import operator
from typing import Dict, Optional

import torch
import torch.fx as fx

from .base import PassContext
from .rules import Facts, Rule, apply_rules, call, erase_if_dead, is_op, tensor_val

aten = torch.ops.aten


def select_rows_first(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Apply :data:`ROW_SELECT_RULES`; returns {rule: matches}."""
    return apply_rules(gm, ctx, ROW_SELECT_RULES)


def _match_select_of_norm(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    """``select`` / ``slice`` of a layer norm's output (its only reader; mean and rstd unread)
    along a dim the norm does not normalise: the norm node, else None."""
    if not is_op(node, aten.select, aten.slice) or node in facts.unsafe:
        return None
    item = node.args[0]
    if not (isinstance(item, fx.Node) and item.target is operator.getitem and item.args[1] == 0
            and list(item.users) == [node]):
        return None
    norm = item.args[0]
    if not is_op(norm, aten.native_layer_norm) or norm in facts.unsafe or list(norm.users) != [item]:
        return None
    x = tensor_val(norm.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if x is None or not isinstance(dim, int):
        return None
    return norm if dim % x.dim() < x.dim() - len(norm.args[1]) else None


def _norm_selected_rows(gm: fx.GraphModule, node: fx.Node, norm: fx.Node) -> None:
    with gm.graph.inserting_before(node):
        rows = call(gm.graph, node.target, (norm.args[0], *node.args[1:]), node.kwargs)
        new_norm = call(gm.graph, norm.target, (rows, *norm.args[1:]), norm.kwargs)
        out = call(gm.graph, operator.getitem, (new_norm, 0))
    node.replace_all_uses_with(out)
    erase_if_dead(gm.graph, [node, node.args[0], norm])


ROW_SELECT_RULES = (
    Rule("select_before_layer_norm", "select/slice of a layer norm's output along a row dim selects "
         "the norm's input first: the norm runs on the picked rows only (ViT's class token)",
         _match_select_of_norm, _norm_selected_rows),
)

__all__ = ["select_rows_first", "ROW_SELECT_RULES"]
