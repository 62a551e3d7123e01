"""BatchNorm folding: an inference BatchNorm after a convolution or a linear layer disappears
into that layer's weight and bias; any other inference BatchNorm becomes a per-channel
multiply-add (``x * s + t`` in fp32) that joins the element-wise kernels around it.

For per-channel ``s = gamma / sqrt(running_var + eps)``::

    conv(x, w, b) -> BN   ==   conv(x, w * s[:, None, None, None], (b - mean) * s + beta)
    x @ W^T + b   -> BN   ==   x @ (W^T * s[None, :]) + (b - mean) * s + beta

The new weight and bias are written as ATen ops on the constant (``get_attr``) weights, computed
in fp32 and cast back to the layer's dtype; ``constant_fold`` then evaluates them once and
re-evaluates them when the weights are refitted. Nothing is precomputed here, and nothing fires
in training graphs or when a BN parameter or the layer's weight is not a frozen constant.
"""
from __future__ import annotations

import operator
from typing import Dict, NamedTuple, Optional

import torch
import torch.fx as fx

from .base import PassContext
from .rules import Facts, Rule, apply_rules, call, erase_if_dead, is_op, shape, single_user, tensor_val, to_dtype, to_float

aten = torch.ops.aten


class _BN(NamedTuple):
    out: fx.Node  # getitem(bn, 0): the value to replace
    bn: fx.Node
    layer: fx.Node  # the convolution / addmm / mm feeding the BN
    gamma: Optional[fx.Node]
    beta: Optional[fx.Node]
    mean: fx.Node
    var: fx.Node
    eps: float


def fold_batchnorm(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Fold inference BatchNorms into the conv / linear before them; returns how many."""
    if ctx.training:
        return {}
    return apply_rules(gm, ctx, BATCHNORM_RULES)


def _inference_bn(node: fx.Node, facts: Facts, sole_reader: bool = True) -> Optional[_BN]:
    """``node`` is output 0 of an inference BN whose statistics and affine are constants (and,
    with ``sole_reader``, the BN is its input's only reader: a fold rewrites that input's layer)."""
    if node.target is not operator.getitem or node.args[1] != 0:
        return None
    bn = node.args[0]
    if is_op(bn, aten._native_batch_norm_legit_no_training):
        x, gamma, beta, mean, var, _momentum, eps = _bn_args(bn, ["input", "weight", "bias",
                                                                  "running_mean", "running_var",
                                                                  "momentum", "eps"])
    elif is_op(bn, aten._native_batch_norm_legit, aten.native_batch_norm):
        x, gamma, beta, mean, var, training, _momentum, eps = _bn_args(
            bn, ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"])
        if training or not isinstance(mean, fx.Node):  # training mode uses batch statistics
            return None
    else:
        return None
    if any(u is not node for u in bn.users):
        return None  # saved mean / invstd are used (a backward pass): keep the BN
    for p in (gamma, beta, mean, var):
        if p is not None and not (isinstance(p, fx.Node) and facts.constant(p)):
            return None
    if not isinstance(x, fx.Node) or (sole_reader and single_user(x) is not bn):
        return None
    return _BN(node, bn, x, gamma, beta, mean, var, float(eps))


def _match_bn_affine(node: fx.Node, facts: Facts) -> Optional[_BN]:
    """An inference BN no layer takes (after a cat, a pool, an add: DenseNet's pre-activation
    BNs), over a float input with channels at dim 1; that input may have other readers (a
    pre-activation residual block's skip)."""
    bn = _inference_bn(node, facts, sole_reader=False)
    if bn is None:
        return None
    x = tensor_val(bn.layer)
    if x is None or not x.is_floating_point() or x.dim() < 2 or shape(bn.mean) != (x.shape[1],):
        return None
    return bn


def _bn_args(bn: fx.Node, names):
    schema = bn.target._schema
    values = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(bn.args):
            values[arg.name] = bn.args[i]
        elif arg.name in bn.kwargs:
            values[arg.name] = bn.kwargs[arg.name]
        else:
            values[arg.name] = arg.default_value
    return [values[n] for n in names]


def _match_conv_bn(node: fx.Node, facts: Facts) -> Optional[_BN]:
    """convolution (constant weight/bias, not transposed) -> inference BN."""
    bn = _inference_bn(node, facts)
    if bn is None or not is_op(bn.layer, aten.convolution):
        return None
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = bn.layer.args[:9]
    if transposed or not facts.constant(w) or (b is not None and not facts.constant(b)):
        return None
    if shape(bn.mean) != (shape(w)[0],):
        return None
    return bn


def _match_linear_bn(node: fx.Node, facts: Facts) -> Optional[_BN]:
    """mm / addmm over a constant weight -> BatchNorm1d on its [N, C] output."""
    bn = _inference_bn(node, facts)
    if bn is None:
        return None
    layer = bn.layer
    if is_op(layer, aten.addmm):
        if layer.kwargs.get("beta", 1) != 1 or layer.kwargs.get("alpha", 1) != 1:
            return None
        bias, _x, w = layer.args[:3]
        if not facts.constant(bias) or len(shape(bias)) != 1:
            return None
    elif is_op(layer, aten.mm):
        _x, w = layer.args[:2]
    else:
        return None
    if not facts.constant(w) or len(shape(layer)) != 2 or shape(bn.mean) != (shape(layer)[1],):
        return None
    return bn


def _scale_and_shift(graph: fx.Graph, bn: _BN, bias: Optional[fx.Node], dtype: torch.dtype):
    """fp32 s = gamma * rsqrt(var + eps) and the folded bias (bias - mean) * s + beta in ``dtype``."""
    var = to_float(graph, bn.var)
    s = call(graph, aten.rsqrt.default, (call(graph, aten.add.Tensor, (var, bn.eps)),))
    if bn.gamma is not None:
        s = call(graph, aten.mul.Tensor, (to_float(graph, bn.gamma), s))
    mean = to_float(graph, bn.mean)
    centred = call(graph, aten.sub.Tensor, (to_float(graph, bias), mean)) if bias is not None \
        else call(graph, aten.neg.default, (mean,))
    shift = call(graph, aten.mul.Tensor, (centred, s))
    if bn.beta is not None:
        shift = call(graph, aten.add.Tensor, (shift, to_float(graph, bn.beta)))
    return s, to_dtype(graph, shift, dtype)


def _fold_conv(gm: fx.GraphModule, node: fx.Node, bn: _BN) -> None:
    graph, conv = gm.graph, bn.layer
    x, w, b = conv.args[:3]
    dtype = tensor_val(w).dtype
    with graph.inserting_before(conv):
        s, new_b = _scale_and_shift(graph, bn, b, dtype)
        ones = [1] * (len(shape(w)) - 1)
        s_col = call(graph, aten.view.default, (s, [-1, *ones]))
        new_w = to_dtype(graph, call(graph, aten.mul.Tensor, (to_float(graph, w), s_col)), dtype)
        folded = call(graph, aten.convolution.default, (x, new_w, new_b, *conv.args[3:]), conv.kwargs)
    _replace_bn(graph, bn, folded)


def _fold_linear(gm: fx.GraphModule, node: fx.Node, bn: _BN) -> None:
    graph, layer = gm.graph, bn.layer
    if is_op(layer, aten.addmm):
        bias, x, w = layer.args[:3]
    else:
        bias, (x, w) = None, layer.args[:2]
    dtype = tensor_val(w).dtype
    with graph.inserting_before(layer):
        s, new_b = _scale_and_shift(graph, bn, bias, dtype)
        s_row = call(graph, aten.view.default, (s, [1, -1]))
        new_w = to_dtype(graph, call(graph, aten.mul.Tensor, (to_float(graph, w), s_row)), dtype)
        folded = call(graph, aten.addmm.default, (new_b, x, new_w))
    _replace_bn(graph, bn, folded)


def _as_affine(gm: fx.GraphModule, node: fx.Node, bn: _BN) -> None:
    graph, x = gm.graph, bn.layer
    dtype = tensor_val(x).dtype
    with graph.inserting_before(bn.bn):
        s, shift = _scale_and_shift(graph, bn, None, torch.float32)
        ones = [1] * (len(shape(x)) - 2)
        s, shift = (call(graph, aten.view.default, (v, [-1, *ones])) for v in (s, shift))
        y = call(graph, aten.add.Tensor, (call(graph, aten.mul.Tensor, (to_float(graph, x), s)), shift))
        affine = to_dtype(graph, y, dtype)
    _replace_bn(graph, bn, affine)


def _replace_bn(graph: fx.Graph, bn: _BN, folded: fx.Node) -> None:
    # the BN node is erased explicitly: some BN overloads carry a mutable schema (running
    # statistics) although inference never writes them, so dead-code removal would keep them
    bn.out.replace_all_uses_with(folded)
    graph.erase_node(bn.out)
    graph.erase_node(bn.bn)
    erase_if_dead(graph, [bn.layer])


BATCHNORM_RULES = (
    Rule("conv_bn", "conv -> inference BN becomes one conv with BN-scaled weight and shifted bias",
         _match_conv_bn, _fold_conv),
    Rule("linear_bn", "mm/addmm -> inference BatchNorm1d becomes one addmm with scaled weight columns",
         _match_linear_bn, _fold_linear),
    # after the folds (tried first on each BN): what is left is element-wise work, not an ATen launch
    Rule("bn_affine", "any other inference BN becomes x * s + t in fp32 (s, t from the constants)",
         _match_bn_affine, _as_affine),
)

__all__ = ["fold_batchnorm", "BATCHNORM_RULES"]
