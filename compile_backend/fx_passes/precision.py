"""Reduced-precision lowering: fp32 GEMMs, convolutions and attention run in fp16/bf16.

With ``precision="fp16"`` or ``"bf16"`` (inference only) each fp32 anchor op gets its float
inputs cast down and its output cast back to fp32, so the rest of the graph keeps the model's
dtype. Casts of frozen weights are then folded by ``constant_fold`` (computed once, refitted
with the weights). Element-wise and normalisation ops stay in fp32, as TensorRT keeps them
unless told otherwise.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .base import PassContext

aten = torch.ops.aten

# ops whose fp32 inputs are cast down (tensor arguments only), one line each: why they qualify
LOW_PRECISION_OPS = {
    aten.mm.default: "matrix product: tensor cores",
    aten.addmm.default: "linear with bias: tensor cores",
    aten.bmm.default: "batched matrix product: tensor cores",
    aten.baddbmm.default: "batched product with add: tensor cores",
    aten.convolution.default: "convolution: tensor cores",
}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def lower_precision(gm: fx.GraphModule, ctx: PassContext) -> int:
    dtype = _DTYPES.get(ctx.precision)
    if dtype is None or ctx.training:
        return 0
    targets = set(LOW_PRECISION_OPS)
    attention = getattr(torch.ops, "compile_backend", None)
    if attention is not None and hasattr(attention, "attention"):
        targets.add(torch.ops.compile_backend.attention.default)
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
            continue
        with graph.inserting_before(node):
            node.args = tuple(_cast(graph, a, dtype) for a in node.args)
        with graph.inserting_after(node):
            back = graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        back.meta["val"] = val
        node.meta["val"] = val.to(dtype)
        for user in list(back.users):  # back up to fp32 and down again: the value itself
            if _is_cast(user, dtype):
                user.replace_all_uses_with(node)
                graph.erase_node(user)
        if not back.users:
            graph.erase_node(back)
        count += 1
    return count


def _cast(graph: fx.Graph, arg, dtype):
    if not isinstance(arg, fx.Node):
        return arg
    val = arg.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return arg
    # fp32 made from a ``dtype`` tensor (SDPA's math path upcasts 16-bit q, k, v; HF models
    # upcast for a softmax) casts back to exactly that tensor: take it, no copy kernel
    if _is_cast(arg, torch.float32) and _val_dtype(arg.args[0]) == dtype:
        return arg.args[0]
    cast = graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
    cast.meta["val"] = val.to(dtype)
    return cast


def _is_cast(node, dtype) -> bool:
    """``node`` is a plain dtype conversion (``_to_copy`` with only ``dtype``) to ``dtype``."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten._to_copy.default
            and set(node.kwargs) == {"dtype"} and node.kwargs["dtype"] == dtype and len(node.args) == 1)


def _val_dtype(node) -> torch.dtype:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None
