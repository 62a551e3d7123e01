"""Activations whose output only an 8-bit quantize reads: their cheaper form (``quant_gelu``).

After ``quantize`` wrote each quantized layer's input as quantize steps in its producer, a GELU
whose every use ends in such a quantize (BERT's FFN1 output, written in FP8/INT8 for FFN2) is
computed once per element in a GEMM epilogue where its erf costs ~25 instructions, more than the
quantize itself: on BERT-base's FP8 FFN1 the epilogue took as long as the main loop. The
quantize then rounds the value to 8 bits, an error (FP8: 2^-4 relative; INT8: amax / 254
absolute) hundreds of times larger than the tanh form's deviation from erf GELU (<= 4.8e-4
absolute) and the GPU tanh unit's (relative 2^-10.99). So, unless ``options["quant_gelu"]`` is
``"exact"``:

* ``gelu(x)`` (erf) whose output only reaches 8-bit quantizes becomes ``gelu(x,
  approximate="tanh")``: the graph itself says which formula runs, so the ATen reference, the CPU
  path and the generated kernel agree on it;
* that GELU, and any ``tanh`` whose output only reaches 8-bit quantizes (GPT-2's ``gelu_new``,
  written out with ``tanh``), carry :data:`kernels.expr.APPROXIMATE_TANH`: the kernel evaluates
  the tanh on the GPU's tanh unit (one instruction; the interpreter keeps ``cb_tanh``).

"Only reaches quantizes": following the value's users through element-wise arithmetic, views
and float conversions, every path ends in a conversion to int8/fp8 or in a row/tensor ``amax``
(a dynamic scale's reduction, whose result only sets the scale). A value the graph returns, a
GEMM reads in float or a float tensor is stored from is never approximated. Measured effect
(quant/README.md, "GELU before a quantize"): SQNR of the quantized activation unchanged within
0.05 dB (tests, CPU and GPU); real MiniLM embedding cosine within 2e-4 of erf GELU's.
"""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch
import torch.fx as fx

from ..kernels.expr import APPROXIMATE_TANH
from .base import PassContext
from .rules import Facts, Rule, apply_rules, call, is_op, tensor_val

aten = torch.ops.aten
prims = torch.ops.prims

EIGHT_BIT = tuple(d for d in (torch.int8, getattr(torch, "float8_e4m3fn", None)) if d is not None)
#: what a quantize chain passes through between the activation and its 8-bit conversion
_PASS_THROUGH = (aten.view, aten.reshape, aten._unsafe_view, aten.mul, aten.div, aten.add, aten.sub,
                 aten.neg, aten.abs, aten.clamp, aten.clamp_min, aten.clamp_max, aten.nan_to_num,
                 aten.round, aten.maximum, aten.minimum, aten._to_copy, prims.convert_element_type)
_CONVERSIONS = (aten._to_copy, prims.convert_element_type)
_SCALE_REDUCTIONS = (aten.amax,)


def only_quantized(node: fx.Node) -> bool:
    """Whether every use of ``node``'s value ends in an 8-bit conversion or a scale's amax."""
    seen: Set[fx.Node] = set()
    stack = list(node.users)
    if not stack:
        return False
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        val = tensor_val(user)
        if user.op != "call_function" or val is None:
            return False
        if is_op(user, *_CONVERSIONS) and val.dtype in EIGHT_BIT:
            continue  # the quantize's cast: the end of this path
        if is_op(user, *_SCALE_REDUCTIONS):
            continue  # a dynamic scale's amax
        if not is_op(user, *_PASS_THROUGH) or not val.is_floating_point():
            return False
        stack.extend(user.users)
        if not user.users:
            return False
    return True


def _float_value(node: fx.Node) -> bool:
    val = tensor_val(node)
    return val is not None and val.is_floating_point() and val.dtype != torch.float64


def _erf_gelu(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    if is_op(node, aten.gelu) and approximate == "none" and _float_value(node) and only_quantized(node):
        return node
    return None


def _to_tanh_form(gm: fx.GraphModule, node: fx.Node, _: fx.Node) -> None:
    with gm.graph.inserting_before(node):
        new = call(gm.graph, aten.gelu.default, (node.args[0],), {"approximate": "tanh"})
    new.meta[APPROXIMATE_TANH] = True
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _unflagged_tanh(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    if node.meta.get(APPROXIMATE_TANH) or not _float_value(node):
        return None
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    tanh = is_op(node, aten.tanh) or (is_op(node, aten.gelu) and approximate == "tanh")
    return node if tanh and only_quantized(node) else None


def _flag(gm: fx.GraphModule, node: fx.Node, _: fx.Node) -> None:
    node.meta[APPROXIMATE_TANH] = True


# Rules: which activation before an 8-bit quantize takes its cheaper form.
QUANT_MATH_RULES = (
    Rule("gelu_before_quantize", "erf GELU read only by 8-bit quantizes -> tanh-form GELU on the GPU's tanh unit",
         _erf_gelu, _to_tanh_form),
    Rule("tanh_before_quantize", "tanh (or tanh-form GELU) read only by 8-bit quantizes -> the GPU's tanh unit",
         _unflagged_tanh, _flag),
)


def approximate_before_quantize(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Apply :data:`QUANT_MATH_RULES` (after ``quantize`` wrote the quantize steps); {rule: count}."""
    return apply_rules(gm, ctx, QUANT_MATH_RULES)


__all__ = ["QUANT_MATH_RULES", "approximate_before_quantize", "only_quantized"]
