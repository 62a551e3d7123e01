"""``quant.calibrate``: activation ranges of the layers the engine will quantize.

The model runs on each batch through the backend's own capture and graph passes (BatchNorm
folding, GEMM merging, attention fusion: everything before ``quantize``), so the layers observed
are exactly those the quantized engine rewrites, named the same way (by weight FQN), across graph
breaks. Each layer's input goes to a histogram observer (one pass serves every calibrator); the
first batch's operands are kept (bounded) to measure each layer's output SQNR against its float
version once the scales are known. The model itself is not changed and Dynamo's cache of other
compiled functions is left alone (the model runs through a private entry, as ``explain`` does).

SmoothQuant (``config.smoothquant``): a first pass collects each linear layer's per-channel input
abs max and its weight's per-column abs max; layers reading the same activation (Q/K/V left
unmerged) get one factor vector from their joint maxima (the activation is quantized once for
all of them); a second pass observes the smoothed input ``x / s`` for the static ranges. With
dynamic activations the first pass is all (the factors are what the engine needs). With
``smoothquant="auto"`` each group's alpha is the one of ``AUTO_ALPHAS`` (0: not smoothed) whose
smoothing gives the group's layers the best mean output SQNR on the kept first-batch operands,
quantized as the engine will, a stronger alpha winning only by ``AUTO_MARGIN_DB``. With more than
one batch the search's factors and static range come from the other batches (the first batch is
held out: judged on the data that set the ranges, a high alpha never pays for clipping); with one
batch, from the batch itself. The second pass then runs the configured calibrator.

A calibration cache (in the engine cache directory) keyed by the config, the model's weights and
structure, the data and the versions makes a second ``calibrate`` with the same inputs instant;
it needs ``batches`` to be re-iterable (a list, a DataLoader), not a one-shot generator.
"""
from __future__ import annotations

import hashlib
import sys
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .. import capture, fx_passes
from ..fx_passes.constant_fold import freeze
from ..fx_passes.quant_sources import activation_source, smoothing_reason
from ..fx_passes.quantize import Layer, find_layer, selection_reason, weight_params
from ..fx_passes.smooth import (AUTO_ALPHAS, inverse_factors, smooth_activation, smooth_weight,
                                 smoothing_factors)
from ..fx_passes.rules import Facts
from ..kernels import quant_ref
from .calibration import Calibration, LayerCalibration
from .calibrators import compute_amax
from .config import QuantConfig
from .observer import ChannelAbsMax, HistogramObserver
from .request import layer_fingerprint

#: elements of a layer's input kept from the first batch for its SQNR
SQNR_SAMPLE = 1 << 18


def calibrate(model: Callable, batches: Iterable[Any], config: QuantConfig, *, progress: bool = True,
              cache_dir: Optional[str] = None, use_cache: bool = True) -> Calibration:
    """Run ``model`` on every batch (a tuple of positional inputs, or one tensor) and return the
    per-layer activation ranges for ``config`` (static activations), and with
    ``config.smoothquant`` the layers' smoothing factors (static or dynamic activations)."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"calibrate: config must be a quant.QuantConfig, got {type(config).__name__}")
    if config.weight_only:
        raise ValueError("calibrate: a weight-only config (activations=None) has no activation ranges to "
                         "calibrate; pass it directly: options={'quant': config}")
    if isinstance(model, torch.nn.Module) and model.training:
        warnings.warn("calibrate: the model is in training mode (BatchNorm and dropout behave as in "
                      "training); call model.eval() first for the ranges inference will see", stacklevel=2)
    reiterable = iter(batches) is not batches
    smoothing = config.smoothquant is not None
    if smoothing and not reiterable and config.activations == "static":
        batches, reiterable = list(batches), True  # SmoothQuant reads the data twice (see the module doc)
    key = _cache_key(model, batches, config) if use_cache and reiterable else None
    cached = _cache_get(key, cache_dir) if key is not None else None
    if cached is not None:
        _say(progress, f"calibration: cache hit ({len(cached.layers)} layers)")
        return cached
    collector = Collector(config)
    runner = _observing_model(model, collector)
    if smoothing:
        collector.phase = "channels"
        passes = "1 of 2" if config.activations == "static" else "1 of 1"
        count = _run(runner, batches, collector, progress, f"SmoothQuant pass {passes} (per-channel maxima)")
        collector.smooth()
        _say(progress, f"calibration: SmoothQuant alpha {collector.alpha_summary()}: {len(collector.factors)} "
                       f"layers smoothed, {len(collector.unsmoothed)} not (convolutions, attention-fed)")
    if config.activations == "static" or not smoothing:
        collector.phase = "ranges"
        label = "SmoothQuant pass 2 of 2 (ranges of the smoothed inputs x/s)" if smoothing else "batch"
        count = _run(runner, batches, collector, progress, label)
    calib = collector.finish(count)
    if key is not None:
        _cache_put(key, calib, cache_dir)
    return calib


def _run(runner: Callable, batches: Iterable[Any], collector: "Collector", progress: bool, label: str) -> int:
    count = 0
    with torch.no_grad():
        for count, batch in enumerate(batches, 1):
            collector.batch = count
            runner(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
            _say(progress, f"calibration: {label} {count}, {collector.layers_seen()} layers observed", end="\r")
    if count == 0:
        raise ValueError("calibrate: the calibration set is empty: pass an iterable of input tuples "
                         "(e.g. a few hundred representative samples in batches)")
    _say(progress, f"calibration: {label}: {count} batches, {collector.layers_seen()} layers" + " " * 20)
    return count


#: ``smoothquant="auto"``: dB of mean output SQNR by which an alpha must beat the milder one
#: chosen so far (no smoothing first): a sample of one batch cannot tell 0.05 dB apart, and the
#: milder change is the safer one on data the calibration never saw
AUTO_MARGIN_DB = 0.1


class Collector:
    """Observers per layer name, and the first batch's operands of each layer for its SQNR.
    ``phase``: ``"ranges"`` (histograms, of ``x / s`` where a layer has factors) or
    ``"channels"`` (SmoothQuant's per-channel maxima, before the factors exist)."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.phase = "ranges"
        self.observers: Dict[str, HistogramObserver] = {}
        self.channels: Dict[str, ChannelAbsMax] = {}
        self.weight_amax: Dict[str, torch.Tensor] = {}   # smoothable layers: per-input-column |W| max
        self.shared: Dict[str, frozenset] = {}            # layer -> the layers reading its activation
        self.unsmoothed: Dict[str, str] = {}              # layer -> why SmoothQuant leaves it
        self.factors: Dict[str, torch.Tensor] = {}        # layer -> s [K]
        self.alphas: Dict[str, float] = {}                # smoothable layer -> its alpha (0.0: auto chose none)
        self.samples: Dict[str, Tuple[Layer, List[Any]]] = {}
        self.fingerprints: Dict[str, Any] = {}
        self.skipped: Dict[str, str] = {}
        self.batch = 0

    def watch(self, layer: Layer) -> bool:
        """Whether ``layer`` is one the config quantizes (records why not otherwise)."""
        reason = layer.reason or selection_reason(layer, self.config.decide)
        if reason is not None:
            self.skipped[layer.name] = reason
        return reason is None

    def layers_seen(self) -> int:
        return len(self.channels if self.phase == "channels" else self.observers)

    def link(self, names: Sequence[str]) -> None:
        """``names`` read one activation (in some graph): they get one smoothing vector."""
        merged = frozenset().union(*(self.shared.get(n, frozenset([n])) for n in names))
        for n in merged:
            self.shared[n] = merged

    def observe(self, layer: Layer, args: Sequence[Any]) -> None:
        x = args[_x_index(layer)]
        if self.phase == "channels":
            self._observe_channels(layer, x, args[_x_index(layer) + 1])
        else:
            observer = self.observers.get(layer.name)
            if observer is None:
                observer = self.observers[layer.name] = HistogramObserver(layer.name, self.config.num_bins)
            s = self.factors.get(layer.name)
            observer.observe(x if s is None else smooth_activation(x, s), batch=self.batch)
        if layer.name not in self.samples:
            self.samples[layer.name] = (layer, [_sample(a) if i == _x_index(layer) else a
                                                for i, a in enumerate(args)])

    def _observe_channels(self, layer: Layer, x: torch.Tensor, w: torch.Tensor) -> None:
        observer = self.channels.get(layer.name)
        if observer is None:
            observer = self.channels[layer.name] = ChannelAbsMax(layer.name)
        smoothable = layer.name not in self.unsmoothed
        # an unsmoothed layer (a convolution) needs only its overall max: one "channel"
        observer.observe(x if smoothable else x.reshape(-1, 1), batch=self.batch)
        if smoothable and layer.name not in self.weight_amax:
            # the mm reads W^T [K, N]: input column j of W is row j here
            self.weight_amax[layer.name] = w.detach().float().abs().amax(dim=1).cpu()

    def smooth(self) -> None:
        """The factors of every smoothable layer that ran, one vector per shared activation."""
        for name in sorted(self.weight_amax):
            if name in self.alphas:
                continue
            group = sorted(n for n in self.shared.get(name, (name,)) if n in self.weight_amax)
            shapes = {tuple(self.weight_amax[n].shape) for n in group}
            if len(shapes) != 1:
                raise ValueError(f"calibrate: layers {', '.join(group)} read one activation but have "
                                 f"different input sizes {sorted(shapes)}")
            act = torch.stack([self.channels[n].amax for n in group]).amax(dim=0)
            weight = torch.stack([self.weight_amax[n] for n in group]).amax(dim=0)
            alpha = self.config.smoothquant
            if isinstance(alpha, str):  # "auto"
                alpha = self._choose_alpha(group, act, weight)
            s = smoothing_factors(act, weight, alpha) if alpha else None
            for n in group:
                self.alphas[n] = alpha
                if s is not None:
                    self.factors[n] = s

    def _choose_alpha(self, group: List[str], act: torch.Tensor, weight: torch.Tensor) -> float:
        """The AUTO_ALPHAS entry with the best mean output SQNR of ``group``'s layers on their kept
        sample (ties: the smaller alpha, the milder change). With more than one batch the factors
        and the static range of the search come from the other batches (held out): judged on the
        data that set them, a high alpha flattens every channel to exactly its own calibration
        maximum and never pays for the channels that exceed it on new inputs (clipped), so it
        always looked best; on random-init transformers families it chose 0.9 everywhere and
        lost to no smoothing end to end (granite INT8 cosine 0.9974 against 0.9996)."""
        held = [self.channels[n].held_out_amax for n in group]
        ranges = torch.stack(held).amax(dim=0) if all(h is not None for h in held) else None
        best, best_db = AUTO_ALPHAS[0], -float("inf")
        references = {n: layer_output(*self.samples[n]) for n in group}  # the same float output for every alpha
        for alpha in AUTO_ALPHAS:  # rising: a stronger migration must win by AUTO_MARGIN_DB
            s = smoothing_factors(act if ranges is None else ranges, weight, alpha) if alpha else None
            db = sum(self._sample_sqnr(n, s, references[n], ranges) for n in group) / len(group)
            if db > best_db + (AUTO_MARGIN_DB if best_db > -float("inf") else 0.0):
                best, best_db = alpha, db
        return best

    def _sample_sqnr(self, name: str, s: Optional[torch.Tensor], reference: torch.Tensor,
                     ranges: Optional[torch.Tensor]) -> float:
        layer, args = self.samples[name]
        x = args[_x_index(layer)].float()
        x = x if s is None else smooth_activation(x, s)
        if ranges is not None:  # the largest x/s the other batches gave: a max calibrator's range
            held = ranges if s is None else smooth_activation(ranges, s)
            amax = float(held.amax()) if held.numel() else 0.0
        else:
            # the sample's finite max of x/s: the calibrator's own range would need the histogram of
            # every batch per candidate alpha (entropy takes seconds a layer); pass 2 computes it once
            amax = float(x.abs().nan_to_num(0.0, posinf=0.0).amax()) if x.numel() else 0.0
        return layer_sqnr(layer, args, amax, self.config, s, reference=reference)

    def alpha_summary(self) -> str:
        """``0.8`` for a fixed alpha; ``auto (0.5: 6 layers, 0.8: 12 layers)`` for auto."""
        if not isinstance(self.config.smoothquant, str):
            return f"{self.config.smoothquant:g}"
        counts: Dict[float, int] = {}
        for alpha in self.alphas.values():
            counts[alpha] = counts.get(alpha, 0) + 1
        return "auto (" + ", ".join(f"{a:g}: {c} layers" for a, c in sorted(counts.items())) + ")"

    def finish(self, batches: int) -> Calibration:
        records = []
        static = self.phase == "ranges"  # else dynamic SmoothQuant: the per-channel pass was all
        for name in (self.observers if static else self.channels):
            s = self.factors.get(name)
            if static:
                obs = self.observers[name]
                amax, calibrator = compute_amax(obs, self.config), self.config.calibrator
            else:  # dynamic: the scales come at run time; the record keeps max|x/s| for the report
                obs = self.channels[name]
                amax = float((obs.amax if s is None else obs.amax * inverse_factors(s)).max())
                calibrator = "max"
            layer, args = self.samples[name]
            records.append(LayerCalibration(
                name, amax=amax, calibrator=calibrator, fingerprint=self.fingerprints[name],
                samples=obs.count, batches=obs.batches, inf_count=obs.inf_count,
                stats={"sqnr_db": layer_sqnr(layer, args, amax, self.config, s)},
                smooth=None if s is None else tuple(s.tolist()), alpha=self.alphas.get(name)))
        meta = {"batches": batches}
        if self.config.smoothquant is not None:
            meta.update(smoothed_layers=len(self.factors), passes=2 if static else 1)
        return Calibration(self.config, records, meta)


def layer_output(layer: Layer, args: List[Any]) -> torch.Tensor:
    """The layer's float (fp32) output on ``args``: the reference of :func:`layer_sqnr`."""
    return layer.node.target(*_float_args(args))


def _float_args(args: List[Any]) -> List[Any]:
    return [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def layer_sqnr(layer: Layer, args: List[Any], amax: float, config: QuantConfig,
               smooth: Optional[torch.Tensor] = None, reference: Optional[torch.Tensor] = None) -> float:
    """Output SQNR (dB) of one layer quantized as the engine will (smoothed by ``smooth``, and
    with dynamic activations per row at run time), against its float output (``reference``:
    that output already computed, :func:`layer_output`)."""
    xi, wi = _x_index(layer), 1 if layer.kind == "conv" else (_x_index(layer) + 1)
    x, w = args[xi].float(), args[wi].float()
    rows = w if layer.kind == "conv" else w.t()  # output channels first
    if smooth is not None:
        x, rows = smooth_activation(x, smooth), smooth_weight(rows, smooth)
    if config.activations == "dynamic":
        x_scale = quant_ref.row_scale(x, config.precision) if layer.kind == "linear" else \
            quant_ref.scale_from_amax(x.abs().amax(), config.precision)
    else:
        x_scale = quant_ref.scale_from_amax(torch.tensor(amax), config.precision)
    per_channel = config.weights == "per_channel"
    w_scale = quant_ref.weight_scale(rows, config.precision, per_channel)
    shape = (-1,) + (1,) * (rows.dim() - 1)
    wq = quant_ref.fake_quantize(rows, w_scale.reshape(shape) if per_channel else w_scale, config.precision)
    fq = _float_args(args)
    reference = layer.node.target(*fq) if reference is None else reference
    fq[xi] = quant_ref.fake_quantize(x, x_scale, config.precision)
    fq[wi] = wq if layer.kind == "conv" else wq.t()
    return quant_ref.sqnr_db(reference, layer.node.target(*fq))


def _x_index(layer: Layer) -> int:
    return 1 if layer.node.target == torch.ops.aten.addmm.default else 0


def _sample(x: torch.Tensor) -> torch.Tensor:
    if x.numel() <= SQNR_SAMPLE:
        return x.detach().clone()
    rows = max(1, SQNR_SAMPLE // max(1, x[0].numel()))
    return x[:rows].detach().clone()


# ----------------------------------------------------------------------------- the observing run
def _observing_model(model: Callable, collector: Collector) -> Callable:
    from ..explainer import isolated_compile

    def backend(gm: fx.GraphModule, example_inputs):
        return capture.lower(gm, example_inputs, lambda aten_gm, **kw: ObservingGraph(aten_gm, collector, **kw))

    return isolated_compile(model, backend)


class ObservingGraph:
    """Stands where an engine would: runs the pass-rewritten graph, observing each layer's input."""

    def __init__(self, aten_gm: fx.GraphModule, collector: Collector, *, role: str, name: str,
                 frozen: Optional[Sequence[bool]]) -> None:
        self.aten_gm, self.collector, self.role, self.frozen = aten_gm, collector, role, frozen
        self.graphs: Dict[Tuple, Tuple[fx.GraphModule, Dict[fx.Node, Layer], Dict[int, str]]] = {}

    def __call__(self, *args: Any) -> Any:
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._prepare(args)
        gm, layers, bound = self.graphs[key]
        collector = self.collector

        class Observe(fx.Interpreter):
            def run_node(self, n):
                layer = layers.get(n)
                if layer is not None:
                    collector.observe(layer, [self.env[a] if isinstance(a, fx.Node) else a for a in n.args])
                return super().run_node(n)

        return Observe(gm).run(*(a for i, a in enumerate(args) if i not in bound))

    def _prepare(self, args):
        gm = capture.specialize(self.aten_gm, args)
        bound = {}
        if self.role == "inference" and self.frozen:
            bound = freeze(gm, self.frozen, args, self.aten_gm.meta.get(capture.PARAM_NAMES_META))
        ctx = fx_passes.PassContext(training=self.role != "inference", device=_device(args))
        fx_passes.run_passes(gm, ctx, until="quantize")  # the graph the quantize pass will see
        facts = Facts(gm, ctx)
        layers, readers = {}, {}
        dynamic = self.collector.config.activations == "dynamic"
        for node in gm.graph.nodes:
            layer = find_layer(node, facts) if node.op == "call_function" else None
            if layer is not None and self.collector.watch(layer):
                layers[node] = layer
                self.collector.fingerprints[layer.name] = layer_fingerprint(weight_params(gm, layer.weight))
                reason = smoothing_reason(layer, dynamic)
                if reason is not None:
                    self.collector.unsmoothed[layer.name] = reason
                else:
                    readers.setdefault(activation_source(layer), []).append(layer.name)
        for names in readers.values():
            self.collector.link(names)
        return gm, layers, bound


def _device(args) -> torch.device:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


# ----------------------------------------------------------------------------- the cache
def _cache_key(model: Any, batches: Iterable[Any], config: QuantConfig) -> str:
    """sha256 of the config, the model's parameters and buffers (names, shapes, values), the data
    and the versions: a later calibrate with the same of each gives the same ranges."""
    h = hashlib.sha256()
    # v3: bf16 / fp16 activations binned over their rounding intervals (observer.py): a cached
    # calibration of a 16-bit model from before had the grid's clipped ranges
    h.update(f"calib-v3 torch {torch.__version__} config {config.digest()}".encode())
    state = model.state_dict() if isinstance(model, torch.nn.Module) else {}
    for name, t in sorted(state.items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    if isinstance(model, torch.nn.Module):
        h.update(repr(model).encode())  # structure; forward's code is not hashed (same class, same code)
        h.update(type(model).__qualname__.encode())
    for batch in batches:
        for t in (batch if isinstance(batch, (tuple, list)) else (batch,)):
            h.update(_tensor_bytes(t) if isinstance(t, torch.Tensor) else repr(t).encode())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return f"{tuple(t.shape)}{t.dtype}".encode() + (t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _cache_path(key: str, cache_dir: Optional[str]):
    from ..cache.location import resolve_root

    return resolve_root(cache_dir) / "calibration" / f"{key[:32]}.json"


def _cache_get(key: str, cache_dir: Optional[str]) -> Optional[Calibration]:
    path = _cache_path(key, cache_dir)
    if not path.exists():
        return None
    try:
        return Calibration.load(path)
    except (OSError, ValueError) as exc:
        warnings.warn(f"calibrate: ignoring the cached calibration {path} ({exc})", stacklevel=3)
        return None


def _cache_put(key: str, calib: Calibration, cache_dir: Optional[str]) -> None:
    path = _cache_path(key, cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        calib.save(path)
    except OSError as exc:
        warnings.warn(f"calibrate: could not cache the calibration in {path} ({exc})", stacklevel=3)


def _say(progress: bool, message: str, end: str = "\n") -> None:
    if progress:
        print(f"compile_backend: {message}", file=sys.stderr, end=end, flush=True)


__all__ = ["calibrate", "Collector", "ObservingGraph", "layer_sqnr", "layer_output"]
