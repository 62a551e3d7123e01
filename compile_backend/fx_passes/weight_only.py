"""Weight-only quantization (W8A16 / W4A16, issue #20): linear layers with a frozen weight become
``compile_backend.weight_only_linear`` over quantized constants; activations stay float.

Runs in the quantize pass's slot: ``fx_passes/__init__.py`` registers ``with_weight_only(quantize)``
under the name ``quantize``, which runs these rules when ``options["quant"]`` is a weight-only
``QuantConfig`` (``activations=None``; ``quant.request`` makes it a :class:`WeightOnlyRequest`)
and the W8A8 pass otherwise. So, like W8A8, it sees the GEMMs the engine runs (after BatchNorm
folding, GEMM merging and attention fusion: merged Q/K/V included, attention's matmuls never)
and comes before layout, precision and constant folding.

A layer is what the W8A8 pass calls one (``quantize.find_layer``): an ``mm`` / ``addmm`` whose
weight is a frozen parameter, named by the parameter's FQN (a merged GEMM joins its parts with
``+``). ``QuantConfig.decide`` selects it (``quantize.selection_reason``: include / exclude, the
default exclusions such as ``lm_head`` and embeddings, ``min_features``). Rewrite (numerics:
``kernels/weight_only_ref.py``):

* weight: ``scales = weight_only_scales(W)``, ``codes = weight_only_codes(W, scales)`` as ops on
  the constant [N, K] weight, which ``constant_fold`` evaluates once at compile time and again on
  refit (no precomputed tensor is stored: fx_passes/README.md, "Constants stay live");
* the anchor becomes ``weight_only_linear(x, codes, scales, bias, precision, group_size,
  out_dtype)`` with the anchor's dtype; a bias of shape [N] goes into the op (added in fp32
  before the one rounding, as addmm does), any other addmm bias is added after it;
* with ``precision="fp16"`` / ``"bf16"`` an fp32 activation is cast down first: the A16 of
  W4A16, which ``lower_precision`` does for the float GEMMs but does not know this op for.

A mixture-of-experts layer's experts (transformers 5's Mixtral, Qwen-MoE, DeepSeek-V3: one
[E, N, K] parameter per projection, run as ``torch._grouped_mm(x, w.transpose(1, 2), offs)``, or
as transformers' ``grouped_mm_fallback`` op where ``_grouped_mm`` is not traced, e.g. fp16;
Llama 4: ``bmm`` of x [E, T, K] by a frozen [E, K, N] weight, offsets T, 2T, ..., E T) are
one layer named by the parameter: the E weights stacked as [E * N, K] are quantized row by row
like a linear's, and the anchor becomes ``weight_only_grouped_mm(x, codes, scales, offs, ...)``
(``kernels/weight_only_grouped.py``; the experts' launch, the routing stays as it is).

Convolutions stay float (the weight-only kernels are GEMMs). Every layer's decision goes to
``WeightOnlyRequest.records`` (the report's quantization table), a quantized layer's with the
SQNR of its weight: the dequantized weight against the float one, in dB.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Optional

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.compile_backend.weight_only_*)
from ..kernels import quant_ref, weight_only_ref
from .base import PassContext, PassFn
from .quantize import Layer, find_experts_layer, find_layer, selection_reason
from .rules import Facts, Rule, apply_rules, call, evaluate_constant, is_op, shape, tensor_val

aten = torch.ops.aten
#: activation dtype of the weight-only GEMM per Options.precision (others: the model's dtype)
_LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class WeightOnlyRequest:
    """What a weight-only compile asks for (from ``QuantConfig``), and what the pass decided."""

    precision: str                                     # int8 | int4
    group_size: Optional[int]                          # int4: inputs per scale; int8: None
    clip: str                                          # minmax | mse
    decide: Callable[[str, Optional[type], int, int], Optional[str]]  # None or why not quantized
    records: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def weights(self) -> str:
        """The report's weight granularity."""
        return "per_channel" if self.precision == "int8" else f"per_group_{self.group_size}"


@dataclasses.dataclass
class _Found:
    layer: Layer
    request: WeightOnlyRequest
    act_dtype: Optional[torch.dtype]  # cast the activation to this first (None: as it is)


def weight_only(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Rewrite the selected linear layers to ``weight_only_linear``; {rule: layers quantized}."""
    if ctx.training or not isinstance(ctx.quant, WeightOnlyRequest):
        return {}
    return apply_rules(gm, ctx, WEIGHT_ONLY_RULES)


def with_weight_only(quantize_pass: PassFn) -> PassFn:
    """The quantize pass's slot, shared: a weight-only request runs :func:`weight_only`, any other
    ``quantize_pass`` (one registered pass, so both run at the same place in the order and
    calibration's ``run_passes(until="quantize")`` is unchanged)."""
    def quantize_or_weight_only(gm: fx.GraphModule, ctx: PassContext):
        if isinstance(ctx.quant, WeightOnlyRequest):
            return weight_only(gm, ctx)
        return quantize_pass(gm, ctx)

    quantize_or_weight_only.__doc__ = quantize_pass.__doc__
    return quantize_or_weight_only


def _match(node: fx.Node, facts: Facts) -> Optional[_Found]:
    layer = find_layer(node, facts)
    if layer is None:
        return None
    if layer.reason is None and layer.kind != "linear":
        layer.reason = "weight-only quantization covers linear layers (mm / addmm); convolutions stay float"
    return _decided(layer, facts)


def _match_experts(node: fx.Node, facts: Facts) -> Optional[_Found]:
    layer = find_experts_layer(node, facts)
    return None if layer is None else _decided(layer, facts, experts=shape(layer.weight)[0])


def _decided(layer: Layer, facts: Facts, **extra: Any) -> Optional[_Found]:
    """The layer's record (float with the reason, or quantized with its weight SQNR), and what the
    rewrite needs when it is quantized: x cast to the precision option's 16 bits when fp32."""
    request: WeightOnlyRequest = facts.ctx.quant
    reason = layer.reason or selection_reason(layer, request.decide)
    record = request.records.setdefault(layer.name, _record(layer, request))
    record.update(extra)
    if reason is not None:
        record.update(status="float", reason=reason)
        return None
    record.update(status="quantized", reason="", sqnr_db=_weight_sqnr(facts.gm, layer, request))
    x = tensor_val(layer.x)
    low = _LOW_PRECISION.get(facts.ctx.precision)
    return _Found(layer, request, low if x is not None and x.dtype == torch.float32 else None)


def _record(layer: Layer, request: WeightOnlyRequest) -> Dict[str, Any]:
    return {"name": layer.name, "kind": layer.kind, "k": layer.k, "n": layer.n,
            "module": getattr(layer.module_type, "__name__", None), "precision": request.precision,
            "weights": request.weights, "activations": "float (weight-only)", "calibrator": None,
            "clip": request.clip, "group_size": request.group_size, "sqnr_of": "weight"}


def _weight_sqnr(gm: fx.GraphModule, layer: Layer, request: WeightOnlyRequest) -> float:
    """SQNR of the dequantized weight against the float one, in dB (quant_ref.sqnr_db: inf when
    exact). Read from the constant (a pass may inspect constants); the graph keeps the ops."""
    w = evaluate_constant(gm, layer.weight).detach().float()  # the anchor reads [K, N] (experts: [E, K, N])
    w = w.transpose(-1, -2).reshape(-1, layer.k)
    g = request.group_size
    s = weight_only_ref.scales(w, request.precision, g, request.clip)
    deq = weight_only_ref.dequantize(weight_only_ref.quantize(w, s, request.precision, g), s, request.precision, g)
    return quant_ref.sqnr_db(w, deq)


def _rewrite(gm: fx.GraphModule, node: fx.Node, found: _Found) -> None:
    layer, request, graph = found.layer, found.request, gm.graph
    wo = torch.ops.compile_backend
    precision, g = request.precision, request.group_size
    with graph.inserting_before(node):
        w = call(graph, aten.permute.default, (layer.weight, [1, 0]))  # [N, K]: rows are output channels
        scales = call(graph, wo.weight_only_scales.default, (w, precision, g, request.clip))
        codes = call(graph, wo.weight_only_codes.default, (w, scales, precision, g))
        x = layer.x
        if found.act_dtype is not None:
            x = call(graph, aten._to_copy.default, (x,), {"dtype": found.act_dtype})
        bias = node.args[0] if is_op(node, aten.addmm) else None
        per_column = bias is not None and shape(bias) == (layer.n,)
        y = call(graph, wo.weight_only_linear.default,
                 (x, codes, scales, bias if per_column else None, precision, g, tensor_val(node).dtype))
        if bias is not None and not per_column:
            y = call(graph, aten.add.Tensor, (y, bias))
    node.replace_all_uses_with(y)


def _rewrite_experts(gm: fx.GraphModule, node: fx.Node, found: _Found) -> None:
    layer, request, graph = found.layer, found.request, gm.graph
    wo = torch.ops.compile_backend
    precision, g = request.precision, request.group_size
    experts = shape(layer.weight)[0]
    with graph.inserting_before(node):
        w = call(graph, aten.permute.default, (layer.weight, [0, 2, 1]))  # [E, N, K]: rows are output channels
        w = call(graph, aten.clone.default, (w,), {"memory_format": torch.contiguous_format})
        w = call(graph, aten.view.default, (w, [experts * layer.n, layer.k]))
        scales = call(graph, wo.weight_only_scales.default, (w, precision, g, request.clip))
        codes = call(graph, wo.weight_only_codes.default, (w, scales, precision, g))
        x, offs = layer.x, node.args[2] if len(node.args) > 2 else None
        if found.act_dtype is not None:  # the A16 of W4A16 with precision fp16 / bf16, as for a linear
            x = call(graph, aten._to_copy.default, (x,), {"dtype": found.act_dtype})
        if is_op(node, aten.bmm):  # x [E, T, K]: expert e's rows are slots [e T, (e + 1) T) of [E T, K]
            slots = shape(x)[1]
            x = call(graph, aten.reshape.default, (x, [experts * slots, layer.k]))
            offs = graph.call_function(aten.arange.start_step, (slots, experts * slots + 1, slots),
                                       {"dtype": torch.int32, "device": tensor_val(x).device})
            with torch._guards.detect_fake_mode([tensor_val(x)]) or contextlib.nullcontext():  # x's fake mode
                offs.meta["val"] = torch.arange(slots, experts * slots + 1, slots, dtype=torch.int32,
                                                device=tensor_val(x).device)
        y = call(graph, wo.weight_only_grouped_mm.default,
                 (x, codes, scales, offs, precision, g, tensor_val(node).dtype))
        if is_op(node, aten.bmm):
            y = call(graph, aten.reshape.default, (y, list(shape(node))))
    node.replace_all_uses_with(y)


# Rules: which anchors become the weight-only op (the request in ctx decides which layers).
WEIGHT_ONLY_RULES = (
    Rule("weight_only_linear", "mm / addmm with a frozen weight -> weight_only_linear over the weight's "
         "codes and scales (computed from the constant by constant_fold)", _match, _rewrite),
    Rule("weight_only_experts", "a mixture-of-experts grouped GEMM (_grouped_mm, transformers' grouped_mm_fallback; "
         "a bmm by a frozen [E, K, N] weight, Llama 4) -> weight_only_grouped_mm over the stacked experts' codes "
         "and scales",
         _match_experts, _rewrite_experts),
)

__all__ = ["WeightOnlyRequest", "weight_only", "with_weight_only", "WEIGHT_ONLY_RULES"]
