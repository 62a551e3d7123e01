"""``quant.calibrate``: activation ranges of the layers the engine will quantize.

The model runs on each batch through the backend's own capture and graph passes (BatchNorm
folding, GEMM merging, attention fusion: everything before ``quantize``), so the layers observed
are exactly those the quantized engine rewrites, named the same way (by weight FQN), across graph
breaks. Each layer's input goes to a histogram observer (one pass serves every calibrator); the
first batch's operands are kept (bounded) to measure each layer's output SQNR against its float
version once the scales are known. The model itself is not changed and Dynamo's cache of other
compiled functions is left alone (the model runs through a private entry, as ``explain`` does).

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
from ..fx_passes.quantize import Layer, find_layer, selection_reason, weight_params
from ..fx_passes.rules import Facts
from ..kernels import quant_ref
from .calibration import Calibration, LayerCalibration
from .calibrators import compute_amax
from .config import QuantConfig
from .observer import HistogramObserver
from .request import layer_fingerprint

#: elements of a layer's input kept from the first batch for its SQNR
SQNR_SAMPLE = 1 << 18


def calibrate(model: Callable, batches: Iterable[Any], config: QuantConfig, *, progress: bool = True,
              cache_dir: Optional[str] = None, use_cache: bool = True) -> Calibration:
    """Run ``model`` on every batch (a tuple of positional inputs, or one tensor) and return the
    per-layer activation ranges for ``config`` (static activations)."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"calibrate: config must be a quant.QuantConfig, got {type(config).__name__}")
    if config.weight_only:
        raise ValueError("calibrate: a weight-only config (activations=None) has no activation ranges to "
                         "calibrate; pass it directly: options={'quant': config}")
    if isinstance(model, torch.nn.Module) and model.training:
        warnings.warn("calibrate: the model is in training mode (BatchNorm and dropout behave as in "
                      "training); call model.eval() first for the ranges inference will see", stacklevel=2)
    reiterable = iter(batches) is not batches
    key = _cache_key(model, batches, config) if use_cache and reiterable else None
    cached = _cache_get(key, cache_dir) if key is not None else None
    if cached is not None:
        _say(progress, f"calibration: cache hit ({len(cached.layers)} layers)")
        return cached
    collector = Collector(config)
    runner = _observing_model(model, collector)
    count = 0
    with torch.no_grad():
        for count, batch in enumerate(batches, 1):
            collector.batch = count
            runner(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
            _say(progress, f"calibration: batch {count}, {len(collector.observers)} layers observed", end="\r")
    if count == 0:
        raise ValueError("calibrate: the calibration set is empty: pass an iterable of input tuples "
                         "(e.g. a few hundred representative samples in batches)")
    _say(progress, f"calibration: {count} batches, {len(collector.observers)} layers" + " " * 20)
    calib = collector.finish(count)
    if key is not None:
        _cache_put(key, calib, cache_dir)
    return calib


class Collector:
    """Observers per layer name, and the first batch's operands of each layer for its SQNR."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.observers: Dict[str, HistogramObserver] = {}
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

    def observe(self, layer: Layer, args: Sequence[Any]) -> None:
        x = args[_x_index(layer)]
        observer = self.observers.get(layer.name)
        if observer is None:
            observer = self.observers[layer.name] = HistogramObserver(layer.name, self.config.num_bins)
        observer.observe(x, batch=self.batch)
        if layer.name not in self.samples:
            self.samples[layer.name] = (layer, [_sample(a) if i == _x_index(layer) else a
                                                for i, a in enumerate(args)])

    def finish(self, batches: int) -> Calibration:
        records = []
        for name, obs in self.observers.items():
            amax = compute_amax(obs, self.config)
            layer, args = self.samples[name]
            records.append(LayerCalibration(
                name, amax=amax, calibrator=self.config.calibrator, fingerprint=self.fingerprints[name],
                samples=obs.count, batches=obs.batches, inf_count=obs.inf_count,
                stats={"sqnr_db": layer_sqnr(layer, args, amax, self.config)}))
        return Calibration(self.config, records, {"batches": batches})


def layer_sqnr(layer: Layer, args: List[Any], amax: float, config: QuantConfig) -> float:
    """Output SQNR (dB) of one layer quantized as the engine will, against its float output."""
    xi, wi = _x_index(layer), 1 if layer.kind == "conv" else (_x_index(layer) + 1)
    x, w = args[xi].float(), args[wi].float()
    x_scale = quant_ref.scale_from_amax(torch.tensor(amax), config.precision)
    rows = w if layer.kind == "conv" else w.t()  # output channels first
    per_channel = config.weights == "per_channel"
    w_scale = quant_ref.weight_scale(rows, config.precision, per_channel)
    shape = (-1,) + (1,) * (rows.dim() - 1)
    wq = quant_ref.fake_quantize(rows, w_scale.reshape(shape) if per_channel else w_scale, config.precision)
    fq = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    reference = layer.node.target(*fq)
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
        layers = {}
        for node in gm.graph.nodes:
            layer = find_layer(node, facts) if node.op == "call_function" else None
            if layer is not None and self.collector.watch(layer):
                layers[node] = layer
                self.collector.fingerprints[layer.name] = layer_fingerprint(weight_params(gm, layer.weight))
        return gm, layers, bound


def _device(args) -> torch.device:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


# ----------------------------------------------------------------------------- the cache
def _cache_key(model: Any, batches: Iterable[Any], config: QuantConfig) -> str:
    """sha256 of the config, the model's parameters and buffers (names, shapes, values), the data
    and the versions: a later calibrate with the same of each gives the same ranges."""
    h = hashlib.sha256()
    h.update(f"calib-v1 torch {torch.__version__} config {config.digest()}".encode())
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


__all__ = ["calibrate", "Collector", "ObservingGraph", "layer_sqnr"]
