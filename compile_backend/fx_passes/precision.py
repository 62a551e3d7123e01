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
        count += 1
    return count


def _cast(graph: fx.Graph, arg, dtype):
    if not isinstance(arg, fx.Node):
        return arg
    val = arg.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return arg
    cast = graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
    cast.meta["val"] = val.to(dtype)
    return cast
