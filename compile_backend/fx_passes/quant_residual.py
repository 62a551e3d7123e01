"""Residual adds that read a value's 8-bit codes (``options["quant_residuals"] = "quantized"``).

A ResNet block's input feeds its first convolution and its skip connection. Once the quantize
pass has rewritten that convolution, the value is written twice by its producer: in float for
the skip connection's add, and in 8 bits for the convolution. Here the add reads the 8-bit codes
instead, dequantized in the add's own kernel (the next convolution's epilogue), when every other
reader of the value is a quantize with that scale or another such add: the float copy then has
no reader, and the producer writes 8 bits alone. Per block that is one float write and one float
read of the residual stream fewer (ResNet-50 batch 32, layer1: 2 x 51 MB). Static scales only
(a dynamic scale is computed from the float value, which must then exist anyway).

The numerics are :func:`kernels.quant_ref.dequantize_steps`: codes times the scale in fp32,
converted to the value's dtype; the skip connection then carries the quantize's error.
"""
from __future__ import annotations

from typing import Optional, Set, Tuple

import torch
import torch.fx as fx

from ..kernels import quant_ref
from .rules import Facts, Rule, call, is_op, tensor_val

aten = torch.ops.aten


def _quantize_readers(value: fx.Node, codes: fx.Node) -> Set[fx.Node]:
    """The nodes between ``value`` and its ``codes`` (the quantize steps reading ``value``)."""
    path: Set[fx.Node] = set()
    stack = [codes]
    while stack:
        node = stack.pop()
        if node in path or node is value:
            continue
        path.add(node)
        stack.extend(n for n in node.all_input_nodes if n is not value and _reaches(n, value))
    return {u for u in value.users if u in path}


def _reaches(node: fx.Node, value: fx.Node, depth: int = 8) -> bool:
    """``node`` is computed from ``value`` within ``depth`` steps (a quantize is a few ops)."""
    frontier = [node]
    for _ in range(depth):
        if any(n is value for n in frontier):
            return True
        frontier = [i for n in frontier for i in n.all_input_nodes]
        if not frontier:
            return False
    return any(n is value for n in frontier)


def _before(a: fx.Node, b: fx.Node) -> bool:
    """``a`` comes before ``b`` in the graph's order."""
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def _plain_add(node: fx.Node) -> bool:
    """``a + b`` of two float tensors of the add's own shape and dtype (no broadcast, alpha 1)."""
    if not is_op(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return False
    out = tensor_val(node)
    vals = [tensor_val(a) if isinstance(a, fx.Node) else None for a in node.args]
    return out is not None and all(v is not None and v.shape == out.shape and v.dtype == out.dtype
                                   and v.is_floating_point() for v in vals)


def _codes_for_add(node: fx.Node, facts: Facts) -> Optional[Tuple[int, fx.Node, fx.Node]]:
    """(operand index, codes, scale) when the add may read an operand's 8-bit codes."""
    request = facts.ctx.quant
    if request is None or not _plain_add(node):
        return None
    for i, value in enumerate(node.args):
        found = next(((q, s) for (base, _), (q, s) in request.written.items() if base is value), None)
        if found is None or value in facts.outputs or value in facts.unsafe:
            continue
        codes, scale = found
        if not _before(codes, node):
            continue  # the codes are made after the add (a later layer's quantize)
        if tensor_val(codes) is None or tensor_val(codes).shape != tensor_val(value).shape:
            continue  # codes of a view of the value (a GEMM's rows): not the add's layout
        quantizes = _quantize_readers(value, codes)
        if quantizes and all(u in quantizes or _plain_add(u) for u in value.users):
            return i, codes, scale
    return None


def _read_codes(gm: fx.GraphModule, node: fx.Node, found: Tuple[int, fx.Node, fx.Node]) -> None:
    index, codes, scale = found
    value = node.args[index]
    with gm.graph.inserting_before(node):
        dequantized = quant_ref.dequantize_steps(lambda target, *a, **k: call(gm.graph, target, a, k),
                                                 codes, scale, tensor_val(value).dtype)
    node.replace_input_with(value, dequantized)


RESIDUAL_RULES = (
    Rule("residual_reads_codes", "x + r, r also quantized by a static-scale layer -> x + dequantize(r's codes)",
         _codes_for_add, _read_codes),
)

__all__ = ["RESIDUAL_RULES"]
