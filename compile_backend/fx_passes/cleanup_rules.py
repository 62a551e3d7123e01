"""Clean-up rewrites: common-subexpression elimination and no-op removal.

``eliminate_common_subexpressions`` merges pure nodes that compute the same thing from the same
inputs (AOTAutograd emits one ``view(x, [M, K])`` per Linear that reads ``x``; after CSE the
Q/K/V projections visibly share their input, which ``merge_parallel_gemms`` needs).
``remove_noops`` applies :data:`NOOP_RULES`: each one replaces a node by a value that is already
in the graph and is bit-for-bit what the node would produce, with the same shape, strides,
storage offset and dtype, so no consumer (or its ``meta['val']``) can tell the difference.

Neither pass touches a node whose storage a mutating op writes (``rules.unsafe_aliases``), and
no-op removal leaves values the graph returns alone, so an output never becomes the very tensor
object of an input or a weight.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Dict, Optional, Set

import torch
import torch.fx as fx

from .base import PassContext
from .rules import Facts, Rule, apply_rules, is_op, is_pure, is_view, scalar, tensor_val, unsafe_aliases

aten = torch.ops.aten
prims = torch.ops.prims


# ----------------------------------------------------------------------------- CSE
def eliminate_common_subexpressions(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Merge pure nodes with equal targets and arguments; returns how many were removed."""
    graph = gm.graph
    unsafe = unsafe_aliases(graph)
    seen: Dict[Any, fx.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        key = _cse_key(node, unsafe)
        if key is None:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(first)
        graph.erase_node(node)
        removed += 1
    return removed


def _cse_key(node: fx.Node, unsafe: Set[fx.Node]) -> Optional[Any]:
    if node.op == "get_attr":
        return ("get_attr", node.target)
    if node.op != "call_function" or not is_pure(node) or node in unsafe:
        return None
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags:
        return None  # two random draws are two different values
    if any(a in unsafe for a in node.all_input_nodes):
        return None  # a read of something written in place depends on where it sits
    try:
        key = (t, _freeze(node.args), _freeze(node.kwargs))
        hash(key)
    except TypeError:
        return None
    return key


def _freeze(x: Any) -> Any:
    """A hashable stand-in for an argument; Python numbers keep their type (1 vs 1.0 vs True)."""
    if isinstance(x, fx.Node):
        return x
    if isinstance(x, bool):
        return ("bool", x)
    if isinstance(x, int):
        return ("int", x)
    if isinstance(x, float):
        return ("float", x.hex() if math.isfinite(x) else repr(x))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_freeze(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in x.items())))
    if x is None or isinstance(x, (str, torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return (type(x).__name__, x)
    raise TypeError(f"unhashable argument {type(x).__name__}")


# ----------------------------------------------------------------------------- no-ops
def remove_noops(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Replace nodes that reproduce one of their inputs exactly; returns how many."""
    return apply_rules(gm, ctx, NOOP_RULES)


def _replaceable(node: fx.Node, by: Any, facts: Facts) -> bool:
    """``by`` can stand for ``node``: same shape, strides, offset, dtype and device, and
    neither is written in place nor is ``node`` returned by the graph."""
    if not isinstance(by, fx.Node) or by is node:
        return False
    if node in facts.unsafe or by in facts.unsafe or node in facts.outputs:
        return False
    a, b = tensor_val(node), tensor_val(by)
    if a is None or b is None:
        return False
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device and a.storage_offset() == b.storage_offset()
            and a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg())


def _redirect(gm: fx.GraphModule, node: fx.Node, by: fx.Node) -> None:
    node.replace_all_uses_with(by)


def _match_view(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    """A view equal to its input, or to an earlier value of the same view chain."""
    if not is_view(node) or node.target is operator.getitem:
        return None
    src = node.args[0]
    for _ in range(8):
        if not isinstance(src, fx.Node):
            return None
        if _replaceable(node, src, facts):
            return src
        if not (is_view(src) and src.target is not operator.getitem and is_pure(src)):
            return None
        src = src.args[0]
    return None


def _match_arith_identity(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    """x * 1, 1 * x, x - 0, x / 1, and x + (-0.0) (Python-number operands only).

    IEEE 754: ``x + 0.0`` is not ``x`` for ``x = -0.0`` (it gives +0.0, and ``1 / x`` or
    ``atan2`` tell them apart), so a float ``x + 0`` stays; ``x + (-0.0)`` and ``x - 0.0`` are
    exact for every x. On integer and bool tensors every one of these is exact. On complex
    tensors only ``x - 0`` is: ``z * 1`` is ``(a - b*0) + (a*0 + b)i`` (b = -0.0 turns a = -0.0
    into +0.0, an infinite b makes the real part NaN), and -0.0 is ``-0.0 + 0j``."""
    if len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    v = tensor_val(node)
    if v is not None and v.is_complex() and not is_op(node, aten.sub):
        return None
    exact_zero = (lambda z: z == 0) if v is not None and not v.is_floating_point() and not v.is_complex() \
        else _is_negative_zero
    if is_op(node, aten.mul):
        x = a if scalar(b) == 1 else b if scalar(a) == 1 else None
    elif is_op(node, aten.add):
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            return None
        x = a if _zero_term(b, exact_zero) else b if _zero_term(a, exact_zero) else None
    elif is_op(node, aten.sub):
        alpha = node.kwargs.get("alpha", 1)
        x = a if alpha == 1 and scalar(b) == 0 and not _is_negative_zero(b) else None
    elif node.target in (aten.div.Tensor, aten.div.Scalar):
        x = a if scalar(b) == 1 else None
    else:
        return None
    return x if _replaceable(node, x, facts) else None


def _zero_term(x: Any, exact_zero) -> bool:
    return scalar(x) is not None and exact_zero(scalar(x))


def _is_negative_zero(x: Any) -> bool:
    return isinstance(x, float) and x == 0 and math.copysign(1.0, x) < 0


def _match_eval_dropout(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    """dropout(x, p, train=False) and native_dropout(x, p, False)[0] (or p == 0) are x."""
    if is_op(node, aten.dropout):
        x, p, train = node.args[:3]
    elif node.target is operator.getitem and node.args[1] == 0 and is_op(node.args[0], aten.native_dropout):
        x, p, train = (list(node.args[0].args) + [node.args[0].kwargs.get("train")])[:3]
    else:
        return None
    if train and p != 0:
        return None
    return x if _replaceable(node, x, facts) else None


_CAST_KEEPS = {"dtype", "memory_format", "layout", "device", "non_blocking"}


def _match_same_dtype_cast(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    """_to_copy / convert_element_type to the dtype the value already has."""
    if node.target is prims.convert_element_type.default:
        x = node.args[0]
    elif is_op(node, aten._to_copy) and set(node.kwargs) <= _CAST_KEEPS:
        x = node.args[0]
        fmt = node.kwargs.get("memory_format")
        if fmt not in (None, torch.preserve_format):
            return None  # an explicit layout change is the point of the copy
    else:
        return None
    return x if _replaceable(node, x, facts) else None


def _match_clone(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    """A clone laid out exactly like its input, when nothing mutates either."""
    if not is_op(node, aten.clone):
        return None
    x = node.args[0]
    return x if _replaceable(node, x, facts) else None


def _match_functional_copy(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    """``aten.copy(x, src)`` (functionalization's form of ``x.copy_(src)``, before the write back
    into ``x``) takes ``x``'s layout and ``src``'s values: when the layouts agree, it is ``src``."""
    if not is_op(node, aten.copy) or len(node.args) < 2 or node.kwargs.get("non_blocking", False):
        return None
    x, src = node.args[:2]
    xv, sv = tensor_val(x), tensor_val(src)
    if xv is None or sv is None or xv.shape != sv.shape or xv.dtype != sv.dtype:
        return None  # a broadcast or a cast: not the source as it is
    return src if _replaceable(node, src, facts) else None


def _match_zero_pad(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    """``constant_pad_nd(x, [0, 0, ...])`` (Swin pads each block to whole windows, by zero where
    the size is already whole) laid out like ``x``."""
    if not is_op(node, aten.constant_pad_nd) or len(node.args) < 2:
        return None
    pad = node.args[1]
    if not isinstance(pad, (list, tuple)) or any(not isinstance(p, int) or p != 0 for p in pad):
        return None
    x = node.args[0]
    return x if _replaceable(node, x, facts) else None


NOOP_RULES = (
    Rule("identity_view", "a view (reshape, expand, slice, alias, transpose pair...) that "
         "reproduces its input or an earlier value of its view chain is that value",
         _match_view, _redirect),
    Rule("arith_identity", "x*1, x-0, x/1 and x+(-0.0) (x+0 on integers) with dtype and layout "
         "unchanged are x; float x+0 is not (-0.0 + 0 is +0.0)",
         _match_arith_identity, _redirect),
    Rule("eval_dropout", "dropout outside training (or with p=0) is the identity",
         _match_eval_dropout, _redirect),
    Rule("same_dtype_cast", "a cast to the dtype and layout the value already has is the value",
         _match_same_dtype_cast, _redirect),
    Rule("redundant_clone", "a clone with its input's layout, of a value nobody mutates, is the input",
         _match_clone, _redirect),
    Rule("functional_copy", "copy(x, src) with src of x's shape, dtype and layout is src (the value "
         "an in-place copy_ into x writes back)", _match_functional_copy, _redirect),
    Rule("zero_pad", "a constant pad of zero on every side, laid out like its input, is the input",
         _match_zero_pad, _redirect),
)

__all__ = ["eliminate_common_subexpressions", "remove_noops", "NOOP_RULES"]
