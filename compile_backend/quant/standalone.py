"""Quantize kernels that run on their own, and why: for the report.

Quantizing an activation costs a full read and write of it when it runs as a kernel of its
own, often as much as the quantized GEMM saves (issue #18). The quantize pass writes each
quantize right after its producer, so the partitioner fuses it into the producer's kernel (a
norm, a GEMM epilogue, the attention kernel). Where that does not happen, the engine runs a
group that only quantizes. :func:`standalone_quantizes` finds those groups in the partitioned
graph and names the cause, from what produces the group's input:

* a graph input: no producer of ours to write it (the first layer's input);
* an op that runs in ATen (a fallback, an op we have no kernel for);
* one of our kernels: a case it cannot absorb (say, a dynamic per-row quantize of an attention
  output, whose row spans every head).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx

from ..kernels.base import is_view_op, op_name
from ..kernels.quant_ref import STORAGE

#: ops a quantize (static or dynamic; kernels/quant_ref) is made of, besides views
QUANTIZE_OPS = frozenset({
    "aten._to_copy", "aten.mul", "aten.div", "aten.round", "aten.clamp", "aten.nan_to_num", "aten.abs",
    "aten.amax", "aten.gt", "aten.where", "aten.reciprocal", "aten.maximum", "aten.reshape", "aten.view",
    "aten.clamp_min", "aten.lt", "aten.bitwise_and",  # the dynamic row scale's finite-amax test
})
QUANTIZED_DTYPES = frozenset(STORAGE.values())


def is_quantize_group(group: Any) -> bool:
    """A group whose ops only quantize and which writes 8-bit codes."""
    if group.kind not in ("pointwise", "reduction") or not set(group.ops) <= QUANTIZE_OPS:
        return False
    return any(isinstance(v, torch.Tensor) and v.dtype in QUANTIZED_DTYPES
               for v in (o.meta.get("val") for o in group.outputs if isinstance(o, fx.Node)))


def standalone_quantizes(graph: fx.Graph) -> List[Dict[str, Any]]:
    """[{"kernel": index among the graph's groups (the report's kernel table), "reason": ...}]
    for every group of ``graph`` (the engine graph, GroupCall targets) that only quantizes."""
    out: List[Dict[str, Any]] = []
    index = 0
    for node in graph.nodes:
        call = node.target
        if node.op != "call_function" or not hasattr(call, "group"):
            continue
        if is_quantize_group(call.group):
            # "cb_standalone_why": fx_passes.quant_sources.STANDALONE_WHY (a stored meta key, read literally)
            why = next((n.meta["cb_standalone_why"] for n in call.group.gm.graph.nodes if "cb_standalone_why" in n.meta), None)
            out.append({"kernel": index, "reason": why or _reason(_producer(node), "aten.amax" in call.group.ops)})
        index += 1
    return out


def _producer(node: fx.Node) -> Optional[fx.Node]:
    """What computes the group's first tensor input, looking through views."""
    src = next((a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                and a.op != "get_attr"), None)
    while src is not None and src.op == "call_function" and is_view_op(src.target):
        src = src.args[0] if isinstance(src.args[0], fx.Node) else None
    return src


#: why a dynamic (per-row scale) quantize cannot join a producer of this kind: the scale is the
#: row's amax, and the producer's programs each hold only part of a row
ROW_SPLIT = {
    "attention": "the row's scale needs its max over every head, and the attention kernel writes "
                 "each head from a program of its own",
    "gemm": "the row's scale needs its max over all N columns, which the GEMM's epilogue does not "
            "reduce (at transformer widths a row spans several column tiles, separate programs)",
    "conv": "the row's scale needs its max over all output channels, which the convolution's "
            "epilogue does not reduce (its channel tiles are separate programs)",
}


def _reason(src: Optional[fx.Node], dynamic: bool = False) -> str:
    if src is None or src.op == "placeholder":
        return "its input is a graph input: no producer of ours to write it quantized"
    target = src.target
    if hasattr(target, "group"):
        kind = target.group.kind
        why = f": {ROW_SPLIT[kind]}" if dynamic and kind in ROW_SPLIT else ""
        return (f"its producer, a {kind} kernel ({', '.join(dict.fromkeys(target.group.ops))}), "
                f"does not take this {'dynamic ' if dynamic else ''}quantize{why}")
    if src.op == "call_function" and getattr(target, "__name__", "") == "getitem":
        # an output of a group call (groups.getitem) or of a multi-output op (operator.getitem):
        # the producer is what it takes the item of (H200 BERT: "its producer getitem runs in
        # ATen" stood for our own kernels' outputs, groups.getitem not being operator's)
        return _reason(src.args[0] if isinstance(src.args[0], fx.Node) else None, dynamic)
    return f"its producer {op_name(target) if src.op == 'call_function' else src.op} runs in ATen"


__all__ = ["standalone_quantizes", "is_quantize_group", "QUANTIZE_OPS"]
