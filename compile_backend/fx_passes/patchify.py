"""A patch embedding's convolution as a GEMM over its patches.

A convolution whose stride is its kernel (no padding, dilation 1, one group) reads every input
pixel once: each output pixel is one patch's dot product with each filter. Over few input
channels (RGB: a ViT's, Swin's or ConvNeXt's patch embedding) the vendor's convolutions do this
badly: torchvision ViT-B/16 at batch 32 (3 -> 768 channels, 16x16 patches, a 6272 x 768 x 768
GEMM's work) took 350 us in cuDNN's fastest kernel, and Inductor's engine 320 us with cuDNN's
layout transforms (H100 session 23, H200 session 4's kernel profile): ~10% of the whole model.
Written as ``patches(x) @ w.view(N, -1).T`` the GEMM's work is ~15 us and the patches are one
copy of the input (~10 us; estimates from bytes and FLOPs, not yet measured). A cast of the
patches (an fp32 model run in fp16) or their static quantize (8-bit engines) joins the copy's
kernel: ``sink_views`` moves them in front of the rows' view.

Rule ``conv1d_as_conv2d`` first: a 1-D convolution (Whisper's and wav2vec2's feature convs,
Mamba's depthwise causal conv) becomes a 2-D one over a height of 1, the form the conv templates,
their tuning and the 8-bit convolutions take (1-D ones ran in ATen: "the template is 2-D").

Rule ``patch_conv_as_gemm``: ``convolution(x, w, b, stride=kernel, padding=0)`` with at most
:data:`MAX_CHANNELS` input channels -> ``x`` viewed as ``[B, C, h, kh, w, kw]``, permuted to
``[B, h, w, C, kh, kw]`` and copied to ``[B*h*w, C*kh*kw]``; ``addmm(b, patches, w.view(N,
C*kh*kw).T)`` (``mm`` without a bias); the ``[B*h*w, N]`` result viewed as ``[B, h, w, N]`` and
permuted to ``[B, N, h, w]``: the convolution's values with channels-last strides (downstream
views that cannot take them get a copy, ``rules.propagate_meta``). Pixels past the last whole
patch, which the convolution ignores, are sliced off first. Numerics: the same dot products over
``C*kh*kw`` in fp32 accumulation, summed in another order.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx

from .base import PassContext
from .rules import Facts, Rule, apply_rules, call, is_op, propagate_meta, shape, tensor_val

aten = torch.ops.aten
#: input channels up to which a patch convolution becomes a GEMM (RGB stems; over more channels
#: the vendor's implicit GEMM reads the input in place, where the patches here are a copy)
MAX_CHANNELS = 4


def patchify_convolutions(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Apply :data:`PATCH_RULES`; returns {rule: matches}."""
    if ctx.training:
        return {}
    return apply_rules(gm, ctx, PATCH_RULES)


def _match_patch_conv(node: fx.Node, facts: Facts) -> Optional[Tuple[Any, ...]]:
    if not is_op(node, aten.convolution) or node in facts.unsafe or node in facts.outputs:
        return None
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
    xv, wv, out = tensor_val(x), tensor_val(w), tensor_val(node)
    if None in (xv, wv, out) or transposed or groups != 1 or xv.dim() != 4 or not xv.is_floating_point():
        return None
    if not all(isinstance(d, int) for d in tuple(xv.shape) + tuple(out.shape)):
        return None  # symbolic sizes: the views below need concrete ones
    n, c, kh, kw = wv.shape
    if list(stride) != [kh, kw] or any(padding) or any(d != 1 for d in dilation) or c > MAX_CHANNELS:
        return None
    if not wv.is_contiguous() or (kh, kw) == (1, 1):  # a 1x1 convolution is a GEMM already
        return None
    return x, w, bias, (kh, kw), tuple(out.shape)


def _to_patch_gemm(gm: fx.GraphModule, node: fx.Node, found) -> None:
    x, w, bias, (kh, kw), (b, n, h, wo) = found
    graph = gm.graph
    c = tensor_val(x).shape[1]
    made = []

    def op(target, *args, **kwargs) -> fx.Node:
        made.append(call(graph, target, args, kwargs))
        return made[-1]

    with graph.inserting_before(node):
        xs = x
        if tensor_val(x).shape[2:] != (h * kh, wo * kw):  # pixels past the last whole patch
            xs = op(aten.slice.Tensor, op(aten.slice.Tensor, xs, 2, 0, h * kh), 3, 0, wo * kw)
        grid = op(aten.view.default, xs, [b, c, h, kh, wo, kw])  # splits: any strides view
        patches = op(aten.clone.default, op(aten.permute.default, grid, [0, 2, 4, 1, 3, 5]),
                     memory_format=torch.contiguous_format)
        rows = op(aten.view.default, patches, [b * h * wo, c * kh * kw])
        filters = op(aten.permute.default, op(aten.view.default, w, [n, c * kh * kw]), [1, 0])
        gemm = op(aten.addmm.default, bias, rows, filters) if bias is not None else op(aten.mm.default, rows, filters)
        out = op(aten.permute.default, op(aten.view.default, gemm, [b, h, wo, n]), [0, 3, 1, 2])
    for new in made:  # the module the convolution came from names the GEMM (quantize's layers)
        new.meta.update({key: node.meta[key] for key in PROVENANCE if key in node.meta})
    node.replace_all_uses_with(out)
    propagate_meta(graph, [out])


#: node meta telling which module a node came from (the quantize pass's layer names and types)
PROVENANCE = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _match_conv1d(node: fx.Node, facts: Facts) -> Optional[Tuple[Any, ...]]:
    """The arguments of a 1-D convolution (not transposed) over concrete sizes."""
    if not is_op(node, aten.convolution) or node in facts.unsafe or len(node.args) != 9:
        return None
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
    xv, wv = tensor_val(x), tensor_val(w)
    if xv is None or wv is None or transposed or xv.dim() != 3 or wv.dim() != 3 or not xv.is_floating_point():
        return None
    if not all(isinstance(v, int) for v in (*xv.shape, *wv.shape, *stride, *padding, *dilation)):
        return None
    return node.args


def _conv1d_as_conv2d(gm: fx.GraphModule, node: fx.Node, args) -> None:
    # [N, C, L] as [N, C, 1, L] and the filters [O, C/g, K] as [O, C/g, 1, K]: the same sums
    x, w, bias, stride, padding, dilation, _, _, groups = args
    graph = gm.graph
    with graph.inserting_before(node):
        # views (a size-1 dim fits any strides), the form a conv's epilogue grows through
        x4 = call(graph, aten.view.default, (x, [*shape(x)[:2], 1, shape(x)[2]]))
        w4 = call(graph, aten.view.default, (w, [*shape(w)[:2], 1, shape(w)[2]]))
        conv = call(graph, aten.convolution.default, (x4, w4, bias, [1, stride[0]], [0, padding[0]],
                                                      [1, dilation[0]], False, [0, 0], groups))
        out = call(graph, aten.view.default, (conv, list(shape(node))))
    for new in (x4, w4, conv, out):  # the module the convolution came from names the layer
        new.meta.update({key: node.meta[key] for key in PROVENANCE if key in node.meta})
    node.replace_all_uses_with(out)
    propagate_meta(graph, [out])


PATCH_RULES = (
    Rule("conv1d_as_conv2d", "a 1-D convolution is a 2-D one over a height of 1 (the conv templates and the "
         "8-bit convolutions are 2-D: audio encoders' feature convs, Mamba's depthwise conv)",
         _match_conv1d, _conv1d_as_conv2d),
    Rule("patch_conv_as_gemm", "convolution with stride = kernel over <= 4 channels -> a GEMM of its "
         "patches (one copy of the input) by the flattened filters", _match_patch_conv, _to_patch_gemm),
)

__all__ = ["MAX_CHANNELS", "PATCH_RULES", "PROVENANCE", "patchify_convolutions"]
