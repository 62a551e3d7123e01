"""Element-wise work after a reshape moved in front of it, so it joins the kernel before.

Views stay out of kernel groups (the partition contract), so ``E(view(P))``, with ``P`` and ``E``
element-wise, ran as two kernels: ``P`` writing its whole output, ``E`` reading it back. When
``E``'s other operands are scalars or 0-d tensors (a cast, a static per-tensor quantize's
multiply / round / clamp / cast) the values are the same with the reshape after it:
``view(E(P))``, and ``P`` and ``E`` are one kernel. The case that asked for it: a patch
embedding's copy of its patches (``fx_passes/patchify.py``) viewed as GEMM rows, then cast to
fp16 or quantized to 8 bits for the GEMM: one pass over the patches instead of two.

Rule ``elementwise_before_view``: ``E(view(P), scalars...) -> view(E(P, scalars...))`` where
``P`` is element-wise, the view is a row-major reshape of a contiguous value read only by ``E``.
Numerics: the same element-wise operations on the same elements.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx

from .base import PassContext
from .partition import fusable_pointwise
from .rules import Facts, Rule, apply_rules, call, tensor_val

aten = torch.ops.aten
#: row-major reshapes (the values keep their order)
_RESHAPES = (aten.view.default, aten._unsafe_view.default)


def sink_views(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Apply :data:`SINK_RULES`; returns {rule: matches}."""
    if ctx.training:
        return {}
    return apply_rules(gm, ctx, SINK_RULES)


def _match(node: fx.Node, facts: Facts) -> Optional[Tuple[fx.Node, fx.Node]]:
    if not node.args or not isinstance(node.args[0], fx.Node) or node in facts.unsafe:
        return None
    view = node.args[0]
    if view.target not in _RESHAPES or len(view.users) != 1 or view in facts.unsafe or view in facts.outputs:
        return None
    src = view.args[0]
    if not isinstance(src, fx.Node) or not fusable_pointwise(src) or not fusable_pointwise(node):
        return None
    src_val, view_val, out = tensor_val(src), tensor_val(view), tensor_val(node)
    if None in (src_val, view_val, out) or not (src_val.is_contiguous() and out.is_contiguous()):
        return None
    if out.shape != view_val.shape or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    for arg in list(node.args[1:]) + list(node.kwargs.values()):  # scalars and 0-d tensors only
        if isinstance(arg, fx.Node) and (tensor_val(arg) is None or tensor_val(arg).dim() != 0):
            return None
    return view, src


def _rewrite(gm: fx.GraphModule, node: fx.Node, found) -> None:
    view, src = found
    with gm.graph.inserting_before(node):
        moved = call(gm.graph, node.target, (src,) + tuple(node.args[1:]), dict(node.kwargs))
        out = call(gm.graph, view.target, (moved,) + tuple(view.args[1:]))
    node.replace_all_uses_with(out)


SINK_RULES = (
    Rule("elementwise_before_view", "E(view(P), scalars) -> view(E(P), ...) for element-wise P and E: "
         "one kernel instead of two", _match, _rewrite),
)

__all__ = ["SINK_RULES", "sink_views"]
