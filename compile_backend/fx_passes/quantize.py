"""Quantize: GEMMs and convolutions with constant weights become scaled INT8/FP8 ops.

Runs after BatchNorm folding, GEMM merging and attention fusion (so it quantizes the GEMMs the
engine runs, merged Q/K/V included, and never attention's batched matmuls), before layout and
precision. It only acts when the compile asks for quantization (``PassContext.quant``, built by
``quant.request`` from ``options["quant"]``).

A quantizable *layer* is an ``mm``/``addmm`` (a linear layer: ``x [M, K] @ W^T``) or a
non-transposed ``convolution`` whose weight is a frozen constant. Its name is the fully
qualified name of the weight parameter (``encoder.layer.0.attention.self.query.weight``; a
merged GEMM joins its parts' names with ``+``), which the calibration is keyed by.

Rewrite (numerics: ``kernels/quant_ref.py``, the same steps emitted as ATen nodes):
* weight: ``quantize(W, per-channel or per-tensor scale)`` as ops on the constant, which
  ``constant_fold`` evaluates once (and again on refit);
* activation: ``quantize(x, x_scale)`` as plain ATen ops the producer's generated kernel
  computes: ``x_scale`` a constant from calibration (static), or per row computed in the graph
  (dynamic; per tensor for convolutions);
* SmoothQuant (a calibration with smoothing factors ``s``; numerics in ``smooth.py``): the
  weight becomes ``W * s`` before its quantization (folded with it), the activation
  ``x * (1/s)`` right before its quantize steps, in the same producer kernel;
* the anchor becomes ``compile_backend.scaled_mm`` / ``scaled_conv`` with the same output dtype;
  what followed it (bias, activation, residual) is its epilogue as before.
Layers the config excludes, or that cannot be quantized, stay float; every decision is recorded
in ``QuantRequest.records`` (the report lists them, layer by layer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.compile_backend.scaled_mm / scaled_conv)
from ..errors import UserError
from ..kernels import quant_ref
from ..kernels.template import PROBE_SEEDS
from .base import PassContext
from .quant_math import QUANT_MATH_RULES, approximate_before_quantize
from .quant_probes import prepare_probes, probe_seeds, slower_than_float
from .quant_residual import RESIDUAL_RULES
from .quant_sources import (STANDALONE_WHY, attention_chain, numel, quantize_attention_output,
                            row_major_source)
from .rules import Facts, Rule, apply_rules, call, is_op, propagate_meta, shape, tensor_val
from .smooth import as_factors, inverse_factors, scale_columns_steps

aten = torch.ops.aten
log = logging.getLogger("compile_backend")
#: meta key of a frozen weight's get_attr node: the parameter's fully qualified name
PARAM_NAME = "param_name"


@dataclasses.dataclass
class QuantRequest:
    """What the compile was asked to quantize, and what the pass decided (``records``)."""

    precision: str                                     # int8 | fp8 | int4
    per_channel: bool                                  # weight scales per output channel
    dynamic: bool                                      # activation scales computed at run time
    calibrator: Optional[str]                          # name, for the report (static only)
    decide: Callable[[str, Optional[type], int, int], Optional[str]]  # None or why not quantized
    amax: Callable[[str], Optional[float]]             # calibrated activation amax of a layer
    details: Callable[[str], Dict[str, Any]] = lambda name: {}  # report extras (amax, sqnr_db)
    # refuses a calibration of other weights: check(layer name, {param FQN: tensor}) raises
    check: Callable[[str, Dict[str, torch.Tensor]], None] = lambda name, params: None
    calibrated: bool = False
    smoothquant: Union[float, str, None] = None        # SmoothQuant alpha of the config, "auto" or None (off)
    # the layer's calibrated smoothing factors [K] (None: not smoothed) and their alpha
    smooth: Callable[[str], Optional[Sequence[float]]] = lambda name: None
    smooth_alpha: Callable[[str], Optional[float]] = lambda name: None
    # on CUDA with options quant_layers="faster": speed(m, n, k, dtype, bias) and speed.conv(x
    # shape, w shape, stride, padding, dilation, groups, dtype, bias) -> (8-bit ms, float ms) of
    # the layer at its shape, measured (quant/speed.py), or None (not measured); and
    # speed.quantize_ms(numel): the estimated cost of writing the layer's input in 8 bits
    speed: Optional[Callable[[int, int, int, torch.dtype, bool], Optional[Tuple[float, float]]]] = None
    records: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    # static quantizes already written, by (value, inverse scale): layers reading one activation
    # with one scale (a ResNet stage's first block and its downsample) share its codes
    written: Dict[Tuple[fx.Node, float], Tuple[fx.Node, fx.Node]] = dataclasses.field(default_factory=dict)
    gelu: str = "tanh"  # options["quant_gelu"]: an activation only a quantize reads may take its tanh form
    residuals: str = "float"  # options["quant_residuals"]: what a residual add reads of a quantized value

    def check_coverage(self) -> None:
        """A calibration that names none of a graph's eligible layers was made for another model
        (or another wrapper of it, so names differ): refuse it rather than run all in float."""
        uncalibrated = [r["name"] for r in self.records.values() if r.get("uncalibrated")]
        quantized = [r for r in self.records.values() if r["status"] == "quantized"]
        if self.calibrated and uncalibrated and not quantized:
            raise UserError(
                f"quant: the calibration names none of this graph's layers (e.g. {uncalibrated[0]!r}); "
                "it was made for another model, or for a wrapper of this one: calibrate the module you compile")


@dataclasses.dataclass
class Layer:
    node: fx.Node                 # the anchor: mm | addmm | convolution
    kind: str                     # linear | conv
    name: str                     # weight FQN(s)
    x: fx.Node                    # the activation operand
    weight: fx.Node               # the weight as the anchor reads it
    module_type: Optional[type]
    modules: List[str]            # the owning modules' FQNs (of each weight part, and of the call)
    k: int
    n: int
    reason: Optional[str] = None  # why it cannot be quantized (None: it can)
    request: Optional[QuantRequest] = None  # set when the pass rewrites it
    seeds: Tuple[str, ...] = ()   # its speed probe's fastest 8-bit candidates (the engine tunes those)


def find_layer(node: fx.Node, facts: Facts) -> Optional[Layer]:
    """The quantizable-layer view of ``node`` (with a reason when it cannot be), or None when
    ``node`` is not a GEMM/convolution at all."""
    if is_op(node, aten.mm) or (is_op(node, aten.addmm) and _plain_addmm(node)):
        x, w = (node.args[0], node.args[1]) if is_op(node, aten.mm) else (node.args[1], node.args[2])
        k, n = shape(w)[0], shape(w)[1]
        kind = "linear"
    elif is_op(node, aten.convolution):
        x, w = node.args[0], node.args[1]
        k, n = numel(shape(w)[1:]), shape(w)[0]
        kind = "conv"
    else:
        return None
    names = weight_names(w)
    modules = sorted({name.rsplit(".", 1)[0] for name in names} | set(filter(None, [module_path(node)])))
    layer = Layer(node, kind, "+".join(names) or node.name, x, w, module_type(node), modules, k, n)
    xv, wv = tensor_val(x), tensor_val(w)
    if not facts.constant(w) or not names:
        layer.reason = "weight is not a frozen parameter (compile with freeze=True, the default)"
    elif xv is None or wv is None or xv.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or wv.dtype != xv.dtype:
        layer.reason = f"operands are not one float dtype ({getattr(xv, 'dtype', None)}, {getattr(wv, 'dtype', None)})"
    elif kind == "conv" and node.args[6]:
        layer.reason = "transposed convolution"
    elif node in facts.unsafe:
        layer.reason = "its value is written in place"
    return layer


def is_grouped_mm(node: fx.Node) -> bool:
    """``aten._grouped_mm`` or transformers' stand-in for it (``transformers::grouped_mm_fallback``,
    the same (x, w, offs) contract, which it registers where ``_grouped_mm`` cannot be traced)."""
    t = node.target if node.op == "call_function" else None
    return is_op(node, aten._grouped_mm) or (
        isinstance(t, torch._ops.OpOverload) and t.namespace == "transformers" and t._opname == "grouped_mm_fallback")


def find_experts_layer(node: fx.Node, facts: Facts) -> Optional[Layer]:
    """The experts' layer of a grouped GEMM x [M, K] by a [E, K, N] weight with offsets, or of a
    ``bmm`` of x [E, T, K] by a frozen [E, K, N] weight (Llama 4's experts: every expert over its
    T slots), with a reason when it cannot be quantized; None when ``node`` is neither (a ``bmm``
    of two activations, attention's, is not a layer)."""
    if is_op(node, aten.bmm):
        x, w = node.args[0], node.args[1]
        xs, ws = shape(x) or (), shape(w) or ()
        if len(xs) != 3 or len(ws) != 3 or xs[0] != ws[0] or not facts.constant(w) or not weight_names(w):
            return None
    elif not is_grouped_mm(node) or len(node.args) < 3 or not isinstance(node.args[2], fx.Node):
        return None
    x, w = node.args[0], node.args[1]
    if len(shape(x) or ()) != (3 if is_op(node, aten.bmm) else 2) or len(shape(w) or ()) != 3:
        return None
    names = weight_names(w)
    name = "+".join(names) or node.name
    layer = Layer(node, "experts", name, x, w, module_type(node), [name], shape(w)[1], shape(w)[2])
    xv, wv = tensor_val(x), tensor_val(w)
    extra = [a for a in node.args[3:] if a is not None] + [v for v in node.kwargs.values() if v is not None]
    if not facts.constant(w) or not names:
        layer.reason = "weight is not a frozen parameter (compile with freeze=True, the default)"
    elif xv is None or wv is None or xv.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or wv.dtype != xv.dtype:
        layer.reason = f"operands are not one float dtype ({getattr(xv, 'dtype', None)}, {getattr(wv, 'dtype', None)})"
    elif extra:
        layer.reason = "grouped GEMM with a bias or an out_dtype"
    elif node in facts.unsafe:
        layer.reason = "its value is written in place"
    return layer


def weight_names(w: fx.Node) -> List[str]:
    """FQNs of the frozen parameters a weight is computed from that are matrices or more (the
    weight itself, the parts of a merged weight, the filters a patch GEMM views; BatchNorm
    vectors are left out)."""
    return sorted({n.meta[PARAM_NAME] for n in _weight_params(w)})


def weight_params(gm: fx.GraphModule, w: fx.Node) -> Dict[str, torch.Tensor]:
    """{FQN: tensor} of the parameters of :func:`weight_names` (what a calibration is checked against)."""
    return dict(sorted((n.meta[PARAM_NAME], getattr(gm, n.target)) for n in _weight_params(w)))


def _weight_params(w: fx.Node) -> List[fx.Node]:
    rank, seen, found, stack = len(shape(w)), set(), [], [w]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        # rank >= 2 where the weight is: a convolution's 4-D filters under a patch GEMM's 2-D
        # view (fx_passes/patchify.py) name the layer; BatchNorm's folded vectors do not
        if n.op == "get_attr" and PARAM_NAME in n.meta and len(shape(n)) >= min(rank, 2):
            found.append(n)
        stack.extend(n.all_input_nodes)
    return found


def module_path(node: fx.Node) -> Optional[str]:
    """The FQN of the module whose call produced ``node`` (Dynamo's ``nn_module_stack``): a tied
    weight (GPT-2's ``lm_head`` is the embedding matrix) is named after its parameter, but the
    call still says ``lm_head``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    last = list(stack.values())[-1]
    path = last[0] if isinstance(last, tuple) and last else None
    if not isinstance(path, str):
        return None
    path = re.sub(r"^[LG]\['[^']*'\]\.?", "", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", "." + path).lstrip(".")
    return re.sub(r"\[(\d+)\]", r".\1", path) or None


def selection_reason(layer: Layer, decide) -> Optional[str]:
    """Why the config leaves ``layer`` in float (None: quantize it): every module it belongs to
    must be selected (a merged GEMM is quantized only when all its parts are)."""
    for module in layer.modules or [layer.name]:
        reason = decide(module, layer.module_type, layer.k, layer.n)
        if reason is not None:
            return reason if len(layer.modules) < 2 else f"{module}: {reason}"
    return None


def module_type(node: fx.Node) -> Optional[type]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    last = list(stack.values())[-1]
    kind = last[1] if isinstance(last, tuple) and len(last) > 1 else None
    return kind if isinstance(kind, type) else None


def quantize(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Rewrite the selected layers to scaled INT8/FP8 ops; {rule: layers quantized}."""
    if ctx.training or ctx.quant is None:
        return {}
    if hasattr(ctx.quant.speed, "prepare"):
        try:
            facts = Facts(gm, ctx)
            layers = [layer for node in gm.graph.nodes if node.op == "call_function"
                      for layer in [find_layer(node, facts)]
                      if layer is not None and _config_reason(layer, ctx.quant) is None]
            prepare_probes(layers, ctx.quant, facts)
        except Exception as exc:  # noqa: BLE001  (only a speed-up: the rules then time the probes one by one)
            log.warning("compile_backend: could not prepare the layer speed probes (%s: %s); timing them one by one",
                        type(exc).__name__, exc)
    counts = apply_rules(gm, ctx, QUANT_RULES)
    ctx.quant.check_coverage()
    # after every layer's quantize exists: a skip connection may read the codes instead
    counts.update(apply_rules(gm, ctx, RESIDUAL_RULES) if ctx.quant.residuals == "quantized" and not ctx.quant.dynamic
                  else {rule.name: 0 for rule in RESIDUAL_RULES})
    # after the quantize steps exist: activations only they read (every rule listed, as apply_rules does)
    counts.update(approximate_before_quantize(gm, ctx) if ctx.quant.gelu == "tanh"
                  else {rule.name: 0 for rule in QUANT_MATH_RULES})
    return counts


def _match(kind: str):
    def match(node: fx.Node, facts: Facts) -> Optional[Layer]:
        layer = find_layer(node, facts)
        if layer is None or layer.kind != kind:
            return None
        request: QuantRequest = facts.ctx.quant
        if layer.reason is None:
            request.check(layer.name, weight_params(facts.gm, layer.weight))
        reason = _config_reason(layer, request)
        uncalibrated = reason == UNCALIBRATED
        record = request.records.setdefault(layer.name, _record(layer, request))
        record["uncalibrated"] = uncalibrated
        if reason is not None:
            record.update(status="float", reason=reason)
            return None
        slower = slower_than_float(layer, request, facts)
        if slower is not None:
            record.update(status="float", reason=slower)
            return None
        record.update(status="quantized", reason="")
        layer.seeds = probe_seeds(layer, request)
        factors = request.smooth(layer.name)
        if factors is not None:
            if len(factors) != layer.k:
                raise UserError(f"quant: layer {layer.name!r} has {len(factors)} smoothing factors in the "
                                f"calibration but K={layer.k} input channels: recalibrate this model")
            alpha = request.smooth_alpha(layer.name)
            alpha = alpha if alpha is not None else request.smoothquant  # files without per-layer alphas
            auto = " (auto)" if request.smoothquant == "auto" else ""
            shown = f"{alpha:g}" if isinstance(alpha, float) else str(alpha)
            record.update(smoothquant=alpha,
                          activations=f"{_activations(layer, request)}, smoothquant alpha {shown}{auto}")
        layer.request = request
        return layer
    return match


UNCALIBRATED = "no calibration data for this layer (the calibration never saw it run)"


def _config_reason(layer: Layer, request: QuantRequest) -> Optional[str]:
    """Why the config and its calibration leave ``layer`` float, before any speed is measured
    (None: quantize it where it pays)."""
    reason = layer.reason or selection_reason(layer, request.decide)
    # a dynamic config is calibrated only for SmoothQuant's factors; then every layer needs its record
    needs_record = not request.dynamic or request.calibrated
    if reason is None and needs_record and request.amax(layer.name) is None:
        return UNCALIBRATED
    return reason


def _record(layer: Layer, request: QuantRequest) -> Dict[str, Any]:
    return {"name": layer.name, "kind": layer.kind, "k": layer.k, "n": layer.n,
            "module": getattr(layer.module_type, "__name__", None), "precision": request.precision,
            "weights": "per_channel" if request.per_channel else "per_tensor",
            "activations": _activations(layer, request),
            "calibrator": None if request.dynamic else request.calibrator, "smoothquant": None,
            **request.details(layer.name)}


def _activations(layer: Layer, request: QuantRequest) -> str:
    if not request.dynamic:
        return "static per tensor"
    return "dynamic per row" if layer.kind == "linear" else "dynamic per tensor"


def _rewrite_linear(gm: fx.GraphModule, node: fx.Node, layer: Layer) -> None:
    request, graph, op = layer.request, gm.graph, _emitter(gm.graph)
    # read before _activation: writing the attention's output quantized re-derives the metadata
    # downstream of it, this float node's included (which then reads the quantized codes)
    out_dtype = tensor_val(node).dtype
    factors = request.smooth(layer.name)
    with graph.inserting_before(node):
        w = call(graph, aten.permute.default, (layer.weight, [1, 0]))
        smooth = None
        if factors is not None:  # W * s, per input column, on the constant (folded with its quantize)
            s = as_factors(factors, layer.k)
            w = scale_columns_steps(op, w, tensor_val(w).dtype, _smooth_constant(gm, "s", s, w))
            smooth = _smooth_constant(gm, "inv_s", inverse_factors(s), w)
        wq, w_scale = _weight(graph, op, w, request)
        if not tensor_val(wq).is_contiguous():
            # HF Conv1D keeps its weight [K, N]: its codes came out N-major. Store them K-major
            # ([N, K] contiguous, folded once): cuBLAS's 8-bit GEMMs take nothing else, and the
            # template reads N-major 8-bit tiles 4x slower (issue #18's table)
            wq = call(graph, aten.clone.default, (wq,), {"memory_format": torch.contiguous_format})
        xq, x_scale = _activation(gm, op, layer, request, rows=True, smooth=smooth)
        bias = node.args[0] if is_op(node, aten.addmm) else None
        per_column = bias is not None and shape(bias) == (layer.n,)
        y = call(graph, torch.ops.compile_backend.scaled_mm.default,
                 (xq, x_scale, wq, w_scale, bias if per_column else None, out_dtype))
        _seed(y, layer)
        if bias is not None and not per_column:
            y = call(graph, aten.add.Tensor, (y, bias))
    node.replace_all_uses_with(y)
    # the attention's quantized output re-derived the metadata past this float node too (its
    # users read "fp8": the residual add, the next norm, the next layers' inputs, which were then
    # refused as "float operands are not one float dtype"): derive it again from y
    propagate_meta(graph, [y])


def _rewrite_conv(gm: fx.GraphModule, node: fx.Node, layer: Layer) -> None:
    request, graph, op = layer.request, gm.graph, _emitter(gm.graph)
    _, _, bias, stride, padding, dilation, _, _, groups = node.args
    before = tensor_val(node)  # before _activation may re-derive it (see _rewrite_linear)
    with graph.inserting_before(node):
        wq, w_scale = _weight(graph, op, layer.weight, request)
        xq, x_scale = _activation(gm, op, layer, request, rows=False)
        y = call(graph, torch.ops.compile_backend.scaled_conv.default,
                 (xq, x_scale, wq, w_scale, bias, list(stride), list(padding), list(dilation), groups,
                  before.dtype))
        _seed(y, layer)
    node.replace_all_uses_with(y)
    if tensor_val(y).stride() != before.stride():
        propagate_meta(graph, [y])


def _seed(node: fx.Node, layer: Layer) -> None:
    """Hand the layer's probe winners to the kernel build of its group (``template.seeded``)."""
    if layer.seeds:
        node.meta[PROBE_SEEDS] = layer.seeds


def _emitter(graph: fx.Graph):
    def op(target, *args, **kwargs):
        return call(graph, target, args, kwargs)
    return op


def _weight(graph: fx.Graph, op, w: fx.Node, request: QuantRequest):
    """(quantized weight, fp32 scale [out] or 0-d) as ops on the constant weight (folded later)."""
    out = shape(w)[0]
    rows = op(aten.reshape.default, op(aten._to_copy.default, w, dtype=torch.float32),
              [out, -1] if request.per_channel else [1, -1])
    scale, inv = quant_ref.row_scale_steps(op, rows, request.precision, *_zero_one(graph, tensor_val(w).device))
    inv = op(aten.reshape.default, inv, [out] + [1] * (len(shape(w)) - 1) if request.per_channel else [])
    wq = quant_ref.quantize_steps(op, w, tensor_val(w).dtype, inv, request.precision)
    return wq, op(aten.reshape.default, scale, [out] if request.per_channel else [])


def _smooth_constant(gm: fx.GraphModule, kind: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    """A [K] fp32 constant named by its content: layers sharing an activation share one node, so
    their identical activation quantizes stay identical (and CSE can merge them)."""
    digest = hashlib.sha256(value.numpy().tobytes()).hexdigest()[:16]
    return _constant(gm, f"_cb_smooth_{kind}_{digest}", value.to(tensor_val(like).device))


def _activation(gm: fx.GraphModule, op, layer: Layer, request: QuantRequest, rows: bool,
                smooth: Optional[fx.Node] = None):
    """(quantized activation, fp32 scale: 0-d static or [M, 1] dynamic per row). A GEMM input
    that is a row-major reshape of a value (a LayerNorm's [B, S, H] output flattened to
    [B*S, H]) is quantized before the reshape: the quantize then has its producer's shape and
    joins the producer's kernel (the norm, the GEMM epilogue) instead of running alone.
    ``smooth``: SmoothQuant's ``1/s`` [K], multiplied in right before the quantize steps."""
    x = layer.x
    src = row_major_source(x) if rows else None
    base = src if src is not None else x
    dtype = tensor_val(base).dtype
    if smooth is not None:
        base, dtype = scale_columns_steps(op, base, dtype, smooth), torch.float32
    if not request.dynamic:
        scale = quant_ref.scale_from_amax(torch.tensor(request.amax(layer.name)), request.precision)
        inv = float(quant_ref.inverse_scale(scale))
        name = _free_name(gm, "_cb_act_scale_" + re.sub(r"\W", "_", layer.name)[:80])
        x_scale = _constant(gm, name, scale.reshape(()).to(tensor_val(x).device))
        # the attention kernel takes one scalar inverse scale, not SmoothQuant's per-channel 1/s
        attention, refusal = attention_chain(x, layer.node) if smooth is None else (None, None)
        if attention is not None:  # the attention kernel writes its output quantized
            quantize_attention_output(gm.graph, attention, x, request.precision, inv)
            return x, x_scale
        shared = request.written.get((base, inv)) if smooth is None else None
        if shared is not None:  # another layer already quantized this value with this scale
            xq, x_scale = shared
        else:
            # the inverse scale as a 0-d constant, not a Python float: a float is a literal in the
            # producer's generated kernel, so every layer had its own kernel source (BERT: 12 FFN1
            # GEMM kernels, each tuned and compiled on its own); a constant is loaded at run time
            inv_t = _constant(gm, _free_name(gm, name.replace("_cb_act_scale_", "_cb_act_inv_scale_", 1)),
                              torch.tensor(inv, dtype=torch.float32, device=tensor_val(x).device))
            xq = quant_ref.quantize_steps(op, base, dtype, inv_t, request.precision)
            if refusal is not None:  # the report's reason if this quantize is left standalone
                xq.meta[STANDALONE_WHY] = f"the attention kernel cannot write it: {refusal}"
            if smooth is None:
                request.written[(base, inv)] = (xq, x_scale)
        return (xq if src is None else op(aten.view.default, xq, list(shape(x)))), x_scale
    # no fp32 copy of x: the row amax runs in x's dtype (exact) and the quantize converts as it
    # reads, so a producer's kernel writes x once, in its own dtype, for the row reduction
    flat = base if rows else op(aten.reshape.default, base, [1, -1])
    scale, inv = quant_ref.row_scale_steps(op, flat, request.precision, *_zero_one(gm.graph, tensor_val(x).device),
                                           x_dtype=dtype)
    if not rows:
        scale, inv = op(aten.reshape.default, scale, []), op(aten.reshape.default, inv, [])
    xq = quant_ref.quantize_steps(op, base, dtype, inv, request.precision)
    if src is not None:
        xq = op(aten.view.default, xq, list(shape(x)))
        scale = op(aten.view.default, scale, [shape(x)[0], 1])
    return xq, scale


def _zero_one(graph: fx.Graph, device: torch.device):
    """0-d fp32 constants 0 and 1 for the scale steps (one pair per graph)."""
    gm = graph.owning_module
    return [_constant(gm, name, torch.tensor(value, device=device))
            for name, value in (("_cb_quant_zero", 0.0), ("_cb_quant_one", 1.0))]


def _constant(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """A get_attr of buffer ``name`` (registered with ``value`` if new)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == name:
            return node  # one node per constant (constant folding takes each as one input)
    if not hasattr(gm, name):
        gm.register_buffer(name, value)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        node = gm.graph.get_attr(name)
    node.meta["val"] = getattr(gm, name)
    return node


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _plain_addmm(node: fx.Node) -> bool:
    return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1


# Rules: which anchors become which scaled op (the request in ctx decides which layers).
def _match_experts(node: fx.Node, facts: Facts) -> None:
    """Records a mixture-of-experts grouped GEMM as a float layer (its weights are most of such a
    model's: the report must say they stay float); W8A8 has no grouped kernel, so nothing matches."""
    layer = find_experts_layer(node, facts)
    if layer is not None:
        request: QuantRequest = facts.ctx.quant
        record = request.records.setdefault(layer.name, _record(layer, request))
        record.update(status="float", experts=shape(layer.weight)[0], uncalibrated=False,
                      reason=layer.reason or "W8A8 quantizes linear layers and convolutions; experts' grouped GEMMs "
                                             "take weight-only modes (activations=None)")
    return None


QUANT_RULES = (
    Rule("linear", "mm / addmm with a frozen weight -> quantize(x) and scaled_mm over the quantized weight",
         _match("linear"), _rewrite_linear),
    Rule("conv", "convolution with a frozen weight -> quantize(x) and scaled_conv over the quantized weight",
         _match("conv"), _rewrite_conv),
    Rule("experts", "a mixture-of-experts grouped GEMM stays float (recorded in the report, never rewritten)",
         _match_experts, lambda gm, node, found: None),
)

__all__ = ["QuantRequest", "Layer", "find_layer", "find_experts_layer", "is_grouped_mm", "selection_reason", "module_path", "module_type", "weight_names", "weight_params", "quantize", "QUANT_RULES", "PARAM_NAME"]
