"""GEMMs written in a form that costs more than it must, rewritten to the same values.

A bias added after a GEMM through a reshape is the GEMM's own bias: ``add(view(mm(a, b)),
bias)`` -> ``view(addmm(bias, a, b))``.

``F.linear`` on a non-contiguous 3-D input (nn.MultiheadAttention's projections, after its
batch-first transpose) decomposes into ``mm`` + ``_unsafe_view`` + ``add``: cuBLAS then wrote the
product and a second pass added the bias (torchvision ViT-B/16 on the H200: the QKV projection
with its bias add took 75 us as cuBLAS + ATen add where cuBLAS with the bias in its epilogue
takes ~34). As ``addmm`` every GEMM kernel applies the bias in its epilogue. Numerics: the bias is
added to the fp32 accumulator before the one rounding, as ``addmm`` (and ``F.linear`` on a
contiguous input) already does.

A matmul over K = 1 is an outer product: ``mm(a[M, 1], b[1, N])`` (``bmm`` with a batch) ->
``mul(a, b)``, element-wise, so it joins the pointwise kernel around it instead of launching a
GEMM (HF decoders' rotary frequencies, ``inv_freq[:, None] @ position[None, :]``, every step).
Numerics: one product rounded once, as the GEMM computes it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx

from .base import PassContext
from .rules import Facts, Rule, apply_rules, call, is_op, tensor_val

aten = torch.ops.aten


def fold_gemm_bias(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Apply :data:`BIAS_RULES`; returns {rule: matches}."""
    if ctx.training:
        return {}
    return apply_rules(gm, ctx, BIAS_RULES)


def _match_bias_after_view(node: fx.Node, facts: Facts) -> Optional[Tuple[fx.Node, fx.Node, Any]]:
    if not is_op(node, aten.add) or node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
        return None
    for view, bias in (node.args[:2], node.args[1::-1]):
        if not (isinstance(view, fx.Node) and isinstance(bias, fx.Node)):
            continue
        if not (is_op(view, aten.view) or is_op(view, aten._unsafe_view)) or len(view.users) != 1:
            continue
        mm = view.args[0]
        if not (isinstance(mm, fx.Node) and mm.target is aten.mm.default and len(mm.users) == 1):
            continue
        out, v, b, m = tensor_val(node), tensor_val(view), tensor_val(bias), tensor_val(mm)
        if None in (out, v, b, m) or any(x in facts.unsafe for x in (node, view, mm, bias)):
            continue
        n = m.shape[1]
        if v.shape[-1] != n or out.shape != v.shape or b.dtype != m.dtype or out.dtype != m.dtype:
            continue
        if b.numel() != n or (b.dim() and b.shape[-1] != n):
            continue  # the bias must be one value per output column, broadcast over rows
        return view, bias, mm
    return None


def _to_addmm(gm: fx.GraphModule, node: fx.Node, found) -> None:
    view, bias, mm = found
    graph = gm.graph
    with graph.inserting_before(node):
        b = bias if tensor_val(bias).dim() == 1 else call(graph, aten.view.default, (bias, [tensor_val(mm).shape[1]]))
        addmm = call(graph, aten.addmm.default, (b, *mm.args[:2]))
        out = call(graph, aten.view.default, (addmm, list(tensor_val(node).shape)))
    node.replace_all_uses_with(out)


def _match_outer_product(node: fx.Node, facts: Facts) -> Optional[Tuple[fx.Node, fx.Node]]:
    if node.target not in (aten.mm.default, aten.bmm.default) or node in facts.unsafe:
        return None
    a, b = node.args[:2]
    av, bv, out = tensor_val(a), tensor_val(b), tensor_val(node)
    if None in (av, bv, out) or av.shape[-1] != 1 or av.dtype != bv.dtype or out.dtype != av.dtype:
        return None
    if not (av.is_floating_point() and out.is_contiguous()):
        return None
    return a, b


def _to_mul(gm: fx.GraphModule, node: fx.Node, found) -> None:
    with gm.graph.inserting_before(node):
        product = call(gm.graph, aten.mul.Tensor, found)
    node.replace_all_uses_with(product)


BIAS_RULES = (
    Rule("bias_after_view", "add(view(mm(a, b)), bias[N]) -> view(addmm(bias, a, b)): the GEMM "
         "applies the bias in its epilogue", _match_bias_after_view, _to_addmm),
    Rule("outer_product", "mm / bmm over K = 1 -> mul(a, b): an element-wise product, fused with its "
         "neighbours instead of a GEMM launch", _match_outer_product, _to_mul),
)
