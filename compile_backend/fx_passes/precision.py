"""Reduced-precision lowering: fp32 GEMMs, convolutions and attention run in fp16/bf16 (and an
attention made of exact upcasts of 16-bit tensors runs in 16 bits at any precision).

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
from .rules import tensor_val

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


def lower_upcast_attention(gm: fx.GraphModule, ctx: PassContext) -> int:
    """At any precision, run in 16 bits an attention whose fp32 q, k, v are exact upcasts of
    16-bit tensors and whose every use casts the result back: SDPA's math path on CUDA upcasts
    16-bit inputs (torch >= 2.5), where eager runs a fused 16-bit kernel (fp32 softmax inside)
    that our 16-bit attention equals. Runs before ``quantize``: the attention's output is then
    16-bit, read through views alone, and the attention kernel can write it quantized (run after
    it, the cast back hid the attention from the quantize: the H200's BERT had a standalone
    quantize per layer that the CPU, whose SDPA stays 16-bit, never showed)."""
    if ctx.training:
        return 0
    attention = getattr(getattr(torch.ops, "compile_backend", None), "attention", None)
    if attention is None:
        return 0
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or node.target != attention.default or \
                not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
            continue
        low = _upcast_attention_dtype(node)
        if low is not None:
            count += _lower(graph, node, val, low)
    return count


def lower_precision(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Cast fp32 anchors down (``precision`` fp16/bf16): GEMMs, convolutions, attention."""
    if ctx.training:
        return 0
    dtype = _DTYPES.get(ctx.precision)
    if dtype is None:
        return 0
    attention = getattr(getattr(torch.ops, "compile_backend", None), "attention", None)
    targets = set(LOW_PRECISION_OPS) | ({attention.default} if attention is not None else set())
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype == torch.float32:
            count += _lower(graph, node, val, dtype)
    return count


def _upcast_attention_dtype(node: fx.Node):
    """The 16-bit dtype when q, k, v are exact fp32 upcasts of it and every user casts back."""
    sources = [a.args[0] if _is_cast(a, torch.float32) else None for a in node.args[:3]]
    dtypes = {_val_dtype(s) for s in sources}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    if dtype not in (torch.float16, torch.bfloat16) or not node.users \
            or not all(_is_cast(u, dtype) for u in node.users):
        return None
    return dtype


def _lower(graph: fx.Graph, node: fx.Node, val: torch.Tensor, dtype) -> int:
    """Run ``node`` in ``dtype``: its fp32 float inputs cast down, its result cast back up."""
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
    return 1


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
    val = tensor_val(node)
    return val.dtype if val is not None else None
