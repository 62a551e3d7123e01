"""Where a quantized GEMM's activation comes from, for the quantize pass and calibration.

The quantize pass writes an activation's quantize where its producer's kernel computes it: before
a row-major flatten (a LayerNorm's [B, S, H] output read as [B*S, H]), or inside the attention
kernel (its output read through the head flatten). SmoothQuant uses the same view: layers with
one source quantize one activation (one factor vector), and a layer whose input the attention
kernel quantizes (one scalar scale) is left unsmoothed with static scales.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx

from .rules import fake_value, is_attention, is_op, is_view, propagate_meta, shape, tensor_val

aten = torch.ops.aten
#: node meta key: why a quantize could not join its producer's kernel (read by the report)
STANDALONE_WHY = "cb_standalone_why"


def activation_source(layer) -> fx.Node:
    """The value the activation quantize of ``layer`` reads (the producer's output): layers with
    the same source quantize one activation, so SmoothQuant gives them one factor vector."""
    src = row_major_source(layer.x) if layer.kind == "linear" else None
    return src if src is not None else layer.x


def smoothing_reason(layer, dynamic: bool) -> Optional[str]:
    """Why SmoothQuant leaves ``layer`` unsmoothed (None: it smooths it). Linear layers only;
    with static scales not one whose input the attention kernel writes already quantized (it
    applies one scalar scale; smoothing there would cost a quantize kernel of its own)."""
    if layer.kind != "linear":
        return "convolution (SmoothQuant smooths linear layers)"
    if not dynamic and attention_source(layer.x, layer.node) is not None:
        return "input written quantized by the attention kernel"
    return None


def attention_source(x: fx.Node, reader: fx.Node) -> Optional[fx.Node]:
    """The attention op ``x`` is made from by views and copies alone, each read once (the head
    flatten ``transpose(1, 2).contiguous().view(B*S, H*D)``), when ``reader`` is the only
    reader: elementwise with one scale, the quantize commutes with all of them."""
    return attention_chain(x, reader)[0]


def attention_chain(x: fx.Node, reader: fx.Node) -> Tuple[Optional[fx.Node], Optional[str]]:
    """(:func:`attention_source`, None), or (None, why not) when an attention op lies upstream
    of ``x`` through views and copies but cannot write the quantized value (the report names
    it for the quantize left standalone), or (None, None) when no attention op is upstream."""
    node, user, refusal = x, reader, None
    for _ in range(8):
        if refusal is None and list(node.users) != [user]:
            refusal = f"{node.name} ({op_label(node)}) has {len(node.users)} readers"
        if is_attention(node):
            if refusal is not None:
                return None, refusal
            if len(node.args) > 8 or node.kwargs:
                return None, f"the attention op has extra arguments ({len(node.args)} args, kwargs {sorted(node.kwargs)})"
            dtype = tensor_val(node).dtype
            if dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return None, f"the attention output is {dtype}"
            return node, None
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None, None
        plain_copy = is_op(node, aten.clone) or (is_op(node, aten._to_copy) and set(node.kwargs) <= {"memory_format"})
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None:
            return None, None
        if refusal is None and not (plain_copy or is_view(node)):
            refusal = f"{node.name} ({op_label(node)}) lies between it and the attention"
        elif refusal is None and numel(shape(node)) != numel(shape(src)):
            refusal = f"{node.name} ({op_label(node)}) changes the element count"
        node, user = src, node
    return None, None


def op_label(node: fx.Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)) if node.op == "call_function" else node.op


def quantize_attention_output(graph: fx.Graph, attention: fx.Node, x: fx.Node, precision: str, inv: float) -> None:
    args = list(attention.args)
    args += [False, None][len(args) - 6:]  # dead_rows_nan, out_perm: their defaults where absent
    attention.args = tuple(args) + (precision, inv)
    attention.meta["val"] = fake_value(attention)
    propagate_meta(graph, [attention])


def row_major_source(x: fx.Node) -> Optional[fx.Node]:
    """The value ``x`` reshapes when ``x`` only merges its leading dims (rows stay rows: the last
    dim is kept and the source is contiguous), else None."""
    if not (is_op(x, aten.view) or is_op(x, aten._unsafe_view) or is_op(x, aten.reshape)):
        return None
    src = x.args[0]
    v, sv = tensor_val(x), tensor_val(src) if isinstance(src, fx.Node) else None
    if v is None or sv is None or sv.dim() < 2 or v.dim() != 2 or not sv.is_contiguous():
        return None
    return src if sv.shape[-1] == v.shape[-1] and sv.dtype == v.dtype else None


def producer_gemm(x: fx.Node, constant, quantized: bool = False
                  ) -> Tuple[Optional[fx.Node], Tuple[str, ...], Optional[Tuple[fx.Node, int]]]:
    """The float GEMM (``mm``/``addmm``) or convolution whose kernel computes ``x`` in its epilogue,
    the element-wise ops between (views aside), and the residual its epilogue adds with its
    operand position in the add (None: none):
    ``x`` followed back through views and element-wise ops with one operand that is not a
    constant (``constant``: ``Facts.constant``), and through one residual ``add`` of two
    activations where one is a GEMM / convolution's own output and the other is computed before
    it: the partition grows the first anchor's epilogue over such an add (a ResNet block's
    ``relu(conv3 + identity)``; with a downsample branch computed after conv3, its convolution
    takes the add). (None, (), None) when ``x`` comes from a norm, a pool, a graph input, another
    op of two activations or a GEMM already quantized. Writing ``x`` in 8 bits makes that
    producer's kernel our template or the vendor's plus a kernel of ours, instead of possibly
    cuBLAS/cuDNN with their own fused epilogue (ResNet-50's conv + add + ReLU in one cuDNN call).
    ``quantized``: a GEMM or convolution already quantized (``compile_backend.scaled_mm`` /
    ``scaled_conv``) is a producer too."""
    from .partition import classify  # (imports no kernel module)

    anchors = _ANCHORS + ((torch.ops.compile_backend.scaled_mm, torch.ops.compile_backend.scaled_conv)
                          if quantized else ())
    node, ops, residual = x, [], None
    for _ in range(32):
        if is_op(node, *anchors):
            return node, tuple(reversed(ops)), residual
        if not isinstance(node, fx.Node) or node.op != "call_function" or classify(node) not in (None, "pointwise"):
            return None, (), None
        live = [a for a in node.all_input_nodes if not constant(a)]
        if len(live) == 2 and residual is None and is_op(node, aten.add) and len(node.args) == 2 \
                and shape(live[0]) == shape(live[1]) == shape(node):
            anchor = _residual_anchor(live, anchors)
            if anchor is None:
                return None, (), None
            ops.append("add")
            other = live[1] if anchor is live[0] else live[0]
            residual = (other, list(node.args).index(other))
            node = anchor
            continue
        if len(live) != 1:
            return None, (), None
        if not is_view(node):
            ops.append(str(node.target.overloadpacket.__name__) if hasattr(node.target, "overloadpacket") else op_label(node))
        node = live[0]
    return None, (), None


def _residual_anchor(operands, kinds) -> Optional[fx.Node]:
    """Of a residual add's two operands, the GEMM / convolution output (of the ops ``kinds``)
    whose epilogue the partition gives the add: the first in graph order whose partner is
    computed before it."""
    order = {n: i for i, n in enumerate(operands[0].graph.nodes)}
    anchors = [a for a in operands if is_op(a, *kinds)]
    for a in sorted(anchors, key=order.__getitem__):
        other = operands[1] if a is operands[0] else operands[0]
        if order[other] < order[a]:
            return a
    return None


_ANCHORS = (aten.mm, aten.addmm, aten.convolution)


def numel(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


__all__ = ["STANDALONE_WHY", "attention_chain", "activation_source", "smoothing_reason", "attention_source", "quantize_attention_output",
           "row_major_source", "numel", "producer_gemm"]
