"""Layout: run convolution stacks in channels-last (NHWC) on the GPU.

Why: cuDNN's tensor-core convolutions and our implicit-GEMM conv template (reduction over
(kh, kw, input channel) with the channel innermost) read NHWC contiguously; NCHW inputs cost a
transpose per convolution, inside the library or in our loads.

How, with the fewest conversions: a convolution's output follows its input's layout, and so do
the element-wise ops, BatchNorm and pooling after it. So one ``clone(memory_format=
channels_last)`` goes in front of each convolution whose input is not already channels-last
(in a ResNet only the image input), constant 4-D weights get the same clone (folded once by
``constant_fold``), and the new layout then flows through the graph by itself (metadata is
re-propagated). A copy back to contiguous is added only where something needs it: a ``view``
that cannot view the channels-last strides (``rules.propagate_meta`` inserts it) and graph
outputs that were contiguous before.

Policy (``choose_layout``): inference on CUDA with at least ``MIN_CONVS`` 2-D convolutions, ATen's
or the quantized ``compile_backend.scaled_conv`` (``quantize`` runs first).
On CPU it does nothing; ``to_channels_last`` is the rewrite itself, testable on CPU.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from .base import PassContext
from .rules import Constness, call, is_op, propagate_meta, shape, tensor_val

aten = torch.ops.aten

MIN_CONVS = 2  # a lone conv (a ViT patch embedding) is not worth a conversion in and out


def choose_layout(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Switch conv stacks to channels-last where it pays; returns the number of convs switched."""
    if ctx.training or ctx.device.type != "cuda":
        return 0
    return to_channels_last(gm, min_convs=MIN_CONVS)


def _conv2d_operands(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(input, weight) of a 2-D convolution, ATen's or the quantized ``compile_backend.scaled_conv``
    (``quantize`` runs first: a quantized ResNet had no ATen convolution left, so no layout pass)."""
    if is_op(node, aten.convolution):
        x, w = node.args[0], node.args[1]
    elif node.op == "call_function" and node.target is _scaled_conv():
        x, w = node.args[0], node.args[2]
    else:
        return None
    return (x, w) if len(shape(x)) == 4 and len(shape(w)) == 4 else None


def _scaled_conv():
    op = getattr(torch.ops.compile_backend, "scaled_conv", None)  # registered by compile_backend.ops
    return op.default if op is not None else None


def _channels_last(node: fx.Node) -> bool:
    v = tensor_val(node)
    return v is not None and v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last)


def to_channels_last(gm: fx.GraphModule, min_convs: int = 1) -> int:
    """Make every 2-D convolution read and write channels-last; returns how many convs."""
    graph = gm.graph
    convs = [n for n in graph.nodes if _conv2d_operands(n) is not None]
    if len(convs) < min_convs:
        return 0
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    before = {n: tensor_val(n) for n in output.all_input_nodes}
    constant = Constness()
    converted: Dict[fx.Node, fx.Node] = {}
    switched = 0
    for conv in convs:
        x, w = _conv2d_operands(conv)
        changed: List[fx.Node] = []
        if not _channels_last(x):
            changed.append(_convert(graph, conv, x, converted, torch.channels_last))
        if constant(w) and not _channels_last(w):
            changed.append(_convert(graph, conv, w, converted, torch.channels_last))
        if changed:
            propagate_meta(graph, changed)
        if _channels_last(conv):
            switched += 1
    for node, old in before.items():
        new = tensor_val(node)
        if old is None or new is None or new.stride() == old.stride():
            continue
        if old.is_contiguous():
            with graph.inserting_before(output):
                back = call(graph, aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
            output.replace_input_with(node, back)
    return switched


def _convert(graph: fx.Graph, user: fx.Node, value: fx.Node, cache: Dict[fx.Node, fx.Node], fmt) -> fx.Node:
    """One layout copy of ``value`` shared by every user that asks for it."""
    copy = cache.get(value)
    if copy is None:
        with graph.inserting_after(value):
            copy = call(graph, aten.clone.default, (value,), {"memory_format": fmt})
        cache[value] = copy
    user.replace_input_with(value, copy)
    return copy
