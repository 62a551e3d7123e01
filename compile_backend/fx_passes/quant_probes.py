"""Whether a layer pays in 8 bits: the speed probes the quantize pass asks, and its decision.

With ``options["quant_layers"] = "faster"`` the quantize pass keeps a layer float unless its
8-bit kernel, plus what writing its input in 8 bits costs where that input is made, beats the
float way of running it (``request.speed``: ``quant/speed.py``'s ``LayerSpeed`` on CUDA; tests
pass stand-ins). A layer whose float kernel is under ``speed.latency_floor_ms`` of ideal work
(batch-1 convolutions) is not measured: it stays float; nor is one 8 bits could speed up by less
than ``speed.min_ideal_gain`` at peak rates (its 16-bit output's bytes bound it). Otherwise three measurements, each asked
only where the one before leaves 8 bits ahead:

* the layer probe: the 8-bit ``scaled_mm`` / ``scaled_conv`` alone against cuBLAS's GEMM /
  cuDNN's convolution at its shape (``speed(...)``, ``speed.conv(...)``);
* the write probe: the float GEMM / convolution producing the layer's input, with the quantize in
  its epilogue and without (``speed.write_ms``; after no activation or a ReLU, estimated from the
  producer's float group alone, which the engine tunes anyway; for other producers an estimate,
  ``speed.quantize_ms``). With
  ``quant_residuals="quantized"`` the producer may write the codes instead of the float value,
  not beside it, so this overstates; charging nothing instead quantized ResNet-50 b32 layers that
  lost (INT8 1.180 ms against 1.144 measuring, H100 session 22): the measurement stays;
* for a convolution still ahead by less than :data:`FLOAT_RACE_MARGIN`, its own float group
  (``speed.float_ms``): the convolution with the bias,
  residual add and ReLU a float engine fuses into it, tuned over every candidate the engine has
  (cuDNN's fused kernels, our templates, cuBLAS over the rows). A bare cuDNN call is not what a
  float engine runs: at ResNet-50 batch 1 our templates ran 3x3 layers in 6-7 us where the bare
  convolution took 8-10, so 10 layers quantized on 0.5-2.8 us wins came out 8 us slower than the
  FP16 engine in all (H100, session 21).

:func:`prepare_probes` hands every probe the rules will ask for to the measurement before any is
asked, so their candidates compile in one pool.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .quant_sources import producer_gemm
from .rules import Facts, is_op, is_view, shape, tensor_val

if TYPE_CHECKING:  # (quantize imports this module)
    from .quantize import Layer, QuantRequest

aten = torch.ops.aten
#: ops a float engine's partition grows a convolution's epilogue over (with its bias)
_EPILOGUE_OPS = (aten.relu, aten.add)
#: a convolution whose 8-bit kernel plus its input's write beats the bare float convolution by
#: more than this fraction is not raced against its own float group. The race was for batch-1
#: layers (now under the latency floor); at ResNet-50 batch 32 it refused none of the 9 INT8 / 20
#: FP8 layers that won (H100, session 22), each race a float group tuned for nothing (the engine
#: runs that layer in 8 bits): half the 60 probes of a first call that took 2.4x FP16's
FLOAT_RACE_MARGIN = 0.15


def prepare_probes(layers: Sequence["Layer"], request: "QuantRequest", facts: Facts) -> None:
    """Hand the measurement every probe the rules will ask for before they ask for any, so their
    candidates compile in one pool (``LayerSpeed.prepare``): the layers' own; then, for the layers
    whose 8-bit kernel wins, the write probes of the float producers feeding them (static scales:
    their float forms start compiling asynchronously, ``LayerSpeed.prepare_groups_async``, while the
    layers are timed),
    and of those producers' 8-bit groups where the producer wins too, and the convolutions' own
    float groups (``LayerSpeed.prepare_groups``). Where the producer's own decision is known
    already (:func:`_known_decision`) only the probe of the form it will have; else whichever of
    its two write probes the rules do not ask for is compiled for nothing, in the pool."""
    probes = [(layer, probe) for layer in layers for probe in [speed_probe(layer)]
              if probe is not None and _too_small(probe, request) is None]
    request.speed.prepare([probe[:2] for _, probe in probes])
    prepare_groups = getattr(request.speed, "prepare_groups", None)
    if prepare_groups is None:
        return
    tanh = request.gelu == "tanh"
    meanwhile = getattr(request.speed, "prepare_groups_async", None)
    if meanwhile is not None and not request.dynamic:
        # before the layers are timed: their float producers' groups compile meanwhile (which
        # layers win is not known yet; a producer's float group serves its engine if they lose)
        problems = [group_problem(layer.x, facts, keep_float=_keeps_float(layer, request)) for layer, _ in probes]
        meanwhile([p[1:] + (tanh,) for p in problems if p is not None])
    winning = [(layer, times) for layer, (method, args, _) in probes
               for times in [_measure(request, method, args)] if times is not None and times[0] < times[1]]
    wins = {layer.node for layer, _ in winning}
    layer_of = {layer.node: layer for layer in layers}
    writes, floats = [], []
    for layer, times in winning:
        problem = None if request.dynamic else group_problem(layer.x, facts, keep_float=_keeps_float(layer, request))
        if problem is not None:
            quantized = _known_decision(layer_of[problem[0]], request, facts) if problem[0] in wins else False
            if quantized is not True:
                writes.append(problem[1:] + (tanh,))
            if quantized is not False and problem[1][0].startswith(("conv", "linear")):
                # the producer may be quantized first, and its 8-bit group is asked then
                # ("qconv" / "qlinear"): ResNet-50 b32 FP8 compiled 20 of these one problem at a
                # time, 2-3.5 s each (H100, session 23); compiled here unused if it stays float
                writes.append((_quantized_form(problem[1]),) + problem[2:] + (tanh,))
        own = own_group_problem(layer, facts) if _close_race(*times) else None
        if own is not None:
            floats.append(own)
    prepare_groups(writes, floats)


def speed_probe(layer: "Layer") -> Optional[Tuple[str, Tuple[Any, ...], str]]:
    """(method, arguments, what) of the ``request.speed`` probe that times ``layer`` (method
    "linear": ``speed(*arguments)``, "conv": ``speed.conv(*arguments)``), or None: not measured
    (fp32 layers, where 8 bits always pay; transposed or non-2-D convolutions)."""
    x = tensor_val(layer.x)
    if x is None or not x.is_floating_point() or x.dtype == torch.float32:
        return None
    if layer.kind == "linear":
        m = x.numel() // max(layer.k, 1)
        return "linear", (m, layer.n, layer.k, x.dtype, is_op(layer.node, aten.addmm)), \
            f"GEMM took {{q}} at {m}x{layer.n}x{layer.k}"
    _, w, bias, stride, padding, dilation, transposed, _, groups = layer.node.args
    if transposed or x.dim() != 4:
        return None
    return "conv", (tuple(x.shape), tuple(shape(w)), stride, padding, dilation, groups, x.dtype, bias is not None), \
        f"convolution took {{q}} at {tuple(x.shape)} * {tuple(shape(w))}"


def slower_than_float(layer: "Layer", request: "QuantRequest", facts: Facts) -> Optional[str]:
    """Why a layer stays float: its 8-bit GEMM or convolution measured, plus what writing its
    input in 8 bits costs where that input is made, no faster than its float one at its shape
    (``request.speed``), else None. That cost is measured when a float GEMM / convolution makes
    the input (``speed.write_ms``: the producer may lose cuBLAS/cuDNN's fused epilogue: ResNet-50's
    1x1 convolutions went from 12.5 to 17.8 us to feed FP8 3x3 ones that won 1.4 us, H100 session
    15), else estimated (``speed.codes_ms``: a norm or element-wise kernel of ours writes it, the
    quantize's instructions less the bytes its codes save where they replace the float value
    (GPT-2's tanh-GELU output, which FFN2 reads: 3.0 us charged without that saving left the 12
    FFN2s float, H100 session 27); ``speed.quantize_ms`` for dynamic scales, one row reduction per
    layer; ``speed.standalone_quantize_ms`` where the
    static quantize runs as a kernel of its own: a graph input, a max pool's output). A convolution still ahead is then timed
    against its own float group (``speed.float_ms``, see the module's docstring)."""
    probe = speed_probe(layer) if request.speed is not None else None
    if probe is None or (probe[0] == "conv" and not hasattr(request.speed, "conv")):
        return None
    too_small = _too_small(probe, request)
    if too_small is not None:
        return too_small
    method, args, what = probe
    times = _measure(request, method, args)
    if times is None:
        return None
    x = tensor_val(layer.x)
    # measured only where the 8-bit kernel wins on its own (each measurement tunes the producer twice)
    written, written_how = _producer_write_ms(layer, request, facts) if not request.dynamic and times[0] < times[1] \
        else (None, "")
    fused = getattr(request.speed, "quantize_ms", None)
    codes = getattr(request.speed, "codes_ms", None) if not request.dynamic else None
    alone = getattr(request.speed, "standalone_quantize_ms", None) if written is None and not request.dynamic \
        and _quantize_runs_alone(layer.x) else None
    if written is not None:
        extra = written
    elif alone is not None:
        extra = alone(x.numel(), x.element_size())
    elif codes is not None:  # a norm or element-wise kernel of ours writes the codes (static scales)
        extra = codes(x.numel(), _keeps_float(layer, request), x.element_size())
    else:
        extra = fused(x.numel()) if fused is not None else 0.0
    q_ms, f_ms = times
    against = f"{f_ms * 1e3:.1f} us"
    if q_ms + extra < f_ms:
        own = _own_float_ms(layer, request, facts) if _close_race(q_ms + extra, f_ms) else None
        if own is None or q_ms + extra < own:
            return None
        against = f"{own * 1e3:.1f} us (its float group, as a float engine runs it)"
    how = (written_how if written is not None
           else "estimated: a quantize kernel of its own" if alone is not None else "estimated")
    plus = f" + {extra * 1e3:.1f} us ({how}) to write its input in {request.precision}" if extra else ""
    return (f"faster in {str(x.dtype).replace('torch.', '')} on this GPU: the {request.precision} "
            + what.format(q=f"{q_ms * 1e3:.1f} us{plus} against {against}")
            + " (quant_layers='all' quantizes it)")


def _quantize_runs_alone(x: fx.Node) -> bool:
    """The layer's input comes from where no kernel of ours can write it quantized, so its static
    quantize runs as a kernel of its own (``quant/standalone.py`` names these in the report): a
    graph input, or a max pool's values (the pool kernel takes no epilogue)."""
    while is_view(x) and x.all_input_nodes:
        x = x.all_input_nodes[0]
    if x.op == "placeholder":
        return True
    return (x.op == "call_function" and getattr(x.target, "__name__", "") == "getitem"
            and is_op(x.args[0], aten.max_pool2d_with_indices))


def probe_seeds(layer: "Layer", request: "QuantRequest") -> Tuple[str, ...]:
    """The names of the 8-bit candidates the layer's probe timed fastest (``speed.seeds_of``),
    for its engine group to tune again (``kernels.template.seeded``); () where not measured."""
    seeds_of = getattr(request.speed, "seeds_of", None) if request.speed is not None else None
    probe = speed_probe(layer) if seeds_of is not None else None
    return tuple(seeds_of(*probe[:2])) if probe is not None else ()


def _close_race(q_ms: float, f_ms: float) -> bool:
    """The 8-bit side's lead over the bare float kernel is within :data:`FLOAT_RACE_MARGIN`."""
    return q_ms > (1.0 - FLOAT_RACE_MARGIN) * f_ms


def _too_small(probe: Tuple[str, Tuple[Any, ...], str], request: "QuantRequest") -> Optional[str]:
    """Why a layer is not measured: its float kernel's ideal time is under the measurement's
    latency floor (``speed.latency_floor_ms``, ``speed.ideal_ms``), or 8 bits could save less
    than ``speed.min_ideal_gain`` of it at peak rates (``speed.ideal_gain``: its 16-bit output's
    bytes bound it); else None."""
    floor = getattr(request.speed, "latency_floor_ms", 0.0)
    least = getattr(request.speed, "min_ideal_gain", 0.0)
    method, args, _ = probe
    kind = "GEMM" if method == "linear" else "convolution"
    ideal = request.speed.ideal_ms(method, args) if floor else None
    if ideal is not None and ideal < floor:
        return (f"too small for {request.precision} to pay: its float {kind} is {ideal * 1e3:.2f} us of work at "
                f"peak rates, under the {floor * 1e3:g} us a kernel's latency costs (quant_layers='all' quantizes it)")
    gain = request.speed.ideal_gain(method, args) if least else None
    if gain is not None and gain < least:
        return (f"{request.precision} could save only {gain:.0%} of its float {kind} at peak rates (its 16-bit "
                f"output's bytes bound it), under the {least:.0%} worth measuring (quant_layers='all' quantizes it)")
    return None


def _measure(request: "QuantRequest", method: str, args) -> Optional[Tuple[float, float]]:
    measure = request.speed if method == "linear" else getattr(request.speed, "conv", None)
    return measure(*args) if measure is not None else None


def _producer_write_ms(layer: "Layer", request: "QuantRequest", facts: Facts) -> Tuple[Optional[float], str]:
    """(``speed.write_ms`` for the GEMM / convolution whose epilogue would write the layer's input
    (static scales: the quantize joins that epilogue), or None: another producer, or not
    measured; how the report says it was found)."""
    write = getattr(request.speed, "write_ms", None)
    problem = group_problem(layer.x, facts, quantized=True, keep_float=_keeps_float(layer, request)) \
        if write is not None else None
    if problem is None:
        return None, ""
    estimated = getattr(request.speed, "write_estimated", lambda activation: False)(problem[2])
    how = ("estimated from its producer's float group: our kernel there, the quantize's cost" if estimated
           else "measured: its producer's kernel")
    return write(*problem[1:], request.gelu == "tanh"), how


def _keeps_float(layer: "Layer", request: "QuantRequest") -> bool:
    """Whether the kernel writing the layer's input in 8 bits must write it in float as well: a
    residual add reads it (ResNet's block output, read by the next block's skip connection
    besides its first convolution), unless residual adds read the codes
    (``quant_residuals="quantized"``). Writing both cost ResNet-50 b32's 8-bit producers 3-12 us
    over the float output where the codes alone cost 0-1.7 (H100, session 23, write_bench)."""
    if getattr(request, "residuals", "float") == "quantized":
        return False
    stack, seen = [layer.x], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if is_view(user):
                stack.append(user)
            elif is_op(user, aten.add):
                return True
    return False


def _own_float_ms(layer: "Layer", request: "QuantRequest", facts: Facts) -> Optional[float]:
    """``speed.float_ms`` of the layer's own float group, or None (a linear layer, whose
    reference, cuBLAS's GEMM, is what float engines run; or not measured)."""
    measure = getattr(request.speed, "float_ms", None)
    own = own_group_problem(layer, facts) if measure is not None else None
    return None if own is None else measure(*own)


def own_group_problem(layer: "Layer", facts: Facts) -> Optional[Tuple[Tuple[Any, ...], Optional[str]]]:
    """(producer, activation) describing the float group a convolution layer heads in a float
    engine (``speed.float_ms`` takes them): the convolution followed through its single readers
    while they are views, a ReLU or a residual add the partition gives it (the furthest such
    value whose producer is this convolution). None for linear layers."""
    if layer.kind != "conv":
        return None
    chain: List[fx.Node] = [layer.node]
    while len(chain) < 8:
        users = list(chain[-1].users)
        if len(users) != 1 or not (is_view(users[0]) or is_op(users[0], *_EPILOGUE_OPS)):
            break
        chain.append(users[0])
    for end in reversed(chain):
        found = group_problem(end, facts)
        if found is not None and found[0] is layer.node:
            return found[1:]
    return None


def group_problem(value: fx.Node, facts: Facts, quantized: bool = False, keep_float: bool = False
                  ) -> Optional[Tuple[fx.Node, Tuple[Any, ...], Optional[str]]]:
    """(producer node, producer, activation) of the float GEMM / convolution whose kernel computes
    ``value`` in its epilogue, ``producer`` and ``activation`` as ``speed.write_ms`` /
    ``speed.float_ms`` take them, or None (another kind of producer). ``quantized``: a
    convolution or GEMM the rules already made 8-bit is a producer too ("qconv" / "qlinear": its
    kernel would write the value in float and in 8 bits; ResNet-50 b32's FP8 conv + add + ReLU
    kernels then took 56 us against the float group's 28, where the estimate charged their
    quantize 1.5 us, H100 session 22; ViT-B/16's INT8 FFN2 was left float on an estimated 4.6 us
    for FFN1's quantize, which also turns FFN1's erf GELU, ~33 SASS instructions an element, into
    the tanh unit's form). ``keep_float``: the kernel writes the value in float besides its codes
    (the producer's kind marked ``+float``: ``speed.write_ms`` times the group with both outputs)."""
    producer, ops, residual = producer_gemm(value, facts.constant, quantized)
    if producer is None:
        return None
    activation = next((a for a in ops if a in ("relu", "gelu")), None)
    if activation is not None and residual is not None and ops.index(activation) < ops.index("add"):
        return None  # act(conv) + residual: not a form the probe traces (the estimate applies)
    val = tensor_val(producer)
    if is_op(producer, torch.ops.compile_backend.scaled_conv):
        xq, _, wq, _, bias, stride, padding, dilation, groups = producer.args[:9]
        problem = ("qconv", tuple(shape(xq)), tuple(shape(wq)), (list(stride), list(padding), list(dilation), groups),
                   val.dtype, bias is not None) + ((residual[1],) if residual is not None else ())
    elif is_op(producer, aten.convolution):
        x, w, bias, stride, padding, dilation, transposed, _, groups = producer.args
        if transposed or len(shape(x)) != 4:
            return None
        problem = ("conv", tuple(shape(x)), tuple(shape(w)), (list(stride), list(padding), list(dilation), groups),
                   val.dtype, bias is not None) + ((residual[1],) if residual is not None else ())
    elif residual is not None:
        return None  # a GEMM's residual epilogue: not a form the probe traces (the estimate applies)
    elif is_op(producer, torch.ops.compile_backend.scaled_mm):
        xq, _, wq, _, bias = producer.args[:5]
        if len(shape(xq)) != 2 or len(shape(wq)) != 2:
            return None  # the op takes [M, K] x [N, K]; anything else is not a form the probe traces
        (m, k), n = shape(xq), shape(wq)[0]
        # wq is [N, K] as the op takes it (no transposed form to tell apart)
        problem = ("qlinear", m, n, k, val.dtype, bias is not None, False, _frame(value, producer))
    else:
        a, b = (producer.args[1], producer.args[2]) if is_op(producer, aten.addmm) else producer.args[:2]
        (m, k), n = shape(a), shape(b)[1]
        # the probe traces the producer in the form the engine's group will have, so the engine
        # reuses its timings: b as the GEMM reads it ([K, N] rows or a transposed [N, K]), and the
        # shape the activation and the quantize run in
        b_val = tensor_val(b)
        b_transposed = b_val is not None and b_val.dim() == 2 and b_val.stride(0) == 1 and b_val.stride(1) != 1
        problem = ("linear", m, n, k, val.dtype, is_op(producer, aten.addmm), b_transposed, _frame(value, producer))
    if keep_float:
        problem = (problem[0] + "+float",) + problem[1:]
    return producer, problem, activation


def _known_decision(producer: "Layer", request: "QuantRequest", facts: Facts) -> Optional[bool]:
    """Whether the speed rule will quantize a winning producer layer, where that is known before
    the rules run: a linear layer whose own input no GEMM or convolution writes (a norm's output,
    BERT's and ViT's FFN1), so its write cost is an estimate and its probe already timed. None
    where a measurement to come decides (a convolution's float race, a measured write). Both of
    the consumer's write probes were prepared before; one was compiled for nothing (BERT INT8's
    first call: 13 s of probe compiling against 7, H100 session 24)."""
    if producer.kind != "linear" or group_problem(producer.x, facts, quantized=True) is not None:
        return None
    return slower_than_float(producer, request, facts) is None


def _quantized_form(problem: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """A float producer's problem as :func:`group_problem` gives it once the rules made that
    producer 8-bit: "qconv" / "qlinear" (whose [N, K] weights have no transposed form)."""
    kind = "q" + problem[0]
    return (kind,) + problem[1:6] + (False,) + problem[7:] if kind.startswith("qlinear") else (kind,) + problem[1:]


def _frame(value: fx.Node, producer: fx.Node) -> Tuple[int, ...]:
    """The shape a GEMM producer's activation and quantize run in: ``value`` followed back
    through views to the GEMM."""
    frame = value
    while isinstance(frame, fx.Node) and is_view(frame) and frame is not producer:
        frame = frame.all_input_nodes[0]
    return tuple(shape(frame))


__all__ = ["FLOAT_RACE_MARGIN", "group_problem", "own_group_problem", "prepare_probes", "probe_seeds", "slower_than_float", "speed_probe"]
