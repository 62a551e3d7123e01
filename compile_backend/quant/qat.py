"""Quantization-aware training: ``prepare_qat`` puts fake quantization on the layers PTQ would
quantize, ``convert`` turns the trained model into a :class:`Calibration` for the quantized
engine. See quant/README.md ("Quantization-aware training").

    qmodel = quant.prepare_qat(model, cfg, batches)     # in place; batches optional
    ... train qmodel (eager or torch.compile(qmodel, backend="compile_backend")) ...
    calib = quant.convert(qmodel)                       # in place: plain float layers again
    fast = torch.compile(qmodel.eval(), backend="compile_backend", options={"quant": calib})

Each selected ``nn.Linear`` / ``nn.Conv1d/2d/3d`` gets its class swapped for a subclass whose
forward fake-quantizes the input with a per-tensor step (a parameter ``qat_scale``: learned with
LSQ's gradient, or fixed: ``QuantConfig.qat_scales``) and the weight per output channel from its
absolute maximum, as the engine will; parameter names stay those of the model, so the engine's
layer names, the config's globs and ``state_dict`` keys (plus ``qat_scale``) are unchanged.
Fake quantization is ``fake_quant.fake_quantize``: the numerics reference forward, so the
converted engine computes what the fake-quantized model computes in eval mode, to rounding.

Selection: with calibration batches, ``calibrate`` runs the model through the backend's capture
and passes, so the layers are exactly those PTQ quantizes, and the parts of a GEMM the engine
merges (Q/K/V) share one input scale; it starts at the calibrated amax / qmax. Without batches,
the modules are walked and ``QuantConfig.decide`` applied to each (the same rules, on the
module's own K and N); each scale starts at the first forward's absolute input maximum / qmax
(compiled too: Dynamo runs that first-call branch eagerly, then recompiles); merged parts then keep separate scales and the
engine uses the largest (the report's ``amax_from_parts``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import quant_ref
from .calibration import Calibration, LayerCalibration
from .config import QuantConfig
from .fake_quant import MIN_SCALE, fake_quantize
from .request import layer_fingerprint

#: attribute of a prepared model: {"config": QuantConfig, "layers": {engine layer name: [module paths]}}
STATE = "_compile_backend_qat"
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_QAT_CLASSES: Dict[type, type] = {}


class QATLayer:
    """Mixin of the swapped classes: fake-quantized input and weight, then the float op."""

    def forward(self, x):
        config: QuantConfig = self._qat_config
        precision = config.precision
        qmax = quant_ref.QMAX[precision]
        step = self.qat_scale
        if not self._qat_ready:  # a Python flag: a compiled graph guards on it, no graph break
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"QAT layer {self._qat_name!r}: its activation scale is not initialised. Pass "
                    "calibration batches to quant.prepare_qat, or run one eager forward before compiling.")
            if torch.isnan(step).item():  # else loaded from a checkpoint: keep it
                with torch.no_grad():
                    step.copy_(x.detach().float().abs().amax().clamp_min(MIN_SCALE) / qmax)
            self._qat_ready = True
        # the parameter is the step (LSQ's s: its updates keep the weights' proportions); the
        # forward takes it through amax = s * qmax and back, the way the engine computes its
        # scale from the amax convert records, so both use the same fp32 scale
        scale = (step.float() * qmax) / qmax
        xq = fake_quantize(x, scale, precision, learn_scale=config.qat_scales == "learned",
                           lsq_elements=x[0].numel() if x.dim() > 1 else x.numel())
        w = self.weight
        w_scale = quant_ref.weight_scale(w.detach(), precision).reshape((-1,) + (1,) * (w.dim() - 1))
        wq = fake_quantize(w, w_scale, precision)
        if isinstance(self, nn.Linear):
            return F.linear(xq, wq, self.bias)
        return self._conv_forward(xq, wq, self.bias)


def _qat_class(cls: type) -> type:
    if cls not in _QAT_CLASSES:
        _QAT_CLASSES[cls] = type(f"QAT{cls.__name__}", (QATLayer, cls), {"_qat_original": cls})
    return _QAT_CLASSES[cls]


def prepare_qat(model: nn.Module, config: QuantConfig, batches: Optional[Iterable[Any]] = None, *,
                progress: bool = True, cache_dir: Optional[str] = None) -> nn.Module:
    """Put fake quantization on ``model``'s quantizable layers (in place; returns ``model``)."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"prepare_qat: config must be a quant.QuantConfig, got {type(config).__name__}")
    if config.activations != "static":
        raise ValueError("prepare_qat: QAT trains static activation scales; use "
                         "QuantConfig(activations='static') (dynamic scales need no training; a "
                         "weight-only config, activations=None, is applied directly: options={'quant': config})")
    if config.smoothquant is not None:
        # the fake-quant layers see x and W, not x/s and W*s: scales calibrated on the smoothed
        # activation would be trained against the wrong values, and convert has no factors to keep
        raise ValueError(f"prepare_qat: smoothquant={config.smoothquant!r} is a post-training transform; "
                         "QAT learns the activation scales instead: leave smoothquant unset (or calibrate "
                         "without QAT: quant.calibrate(model, batches, config))")
    if hasattr(model, STATE):
        raise ValueError("prepare_qat: the model is already prepared (call quant.convert first)")
    layers = _selected_by_calibration(model, config, batches, progress, cache_dir) if batches is not None \
        else _selected_by_modules(model, config)
    if not layers:
        raise ValueError("prepare_qat: no layer of the model is selected for quantization by this config")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name, (paths, amax) in layers.items():
        qmax = quant_ref.QMAX[config.precision]
        start = float("nan") if amax is None else float(torch.tensor(amax, dtype=torch.float32) / qmax)
        shared = nn.Parameter(torch.tensor(start, device=device), requires_grad=config.qat_scales == "learned")
        for path in paths:
            module = model.get_submodule(path)
            module.__class__ = _qat_class(type(module))
            module.register_parameter("qat_scale", shared)
            module._qat_config, module._qat_name, module._qat_ready = config, name, amax is not None
    setattr(model, STATE, {"config": config, "layers": {n: list(p) for n, (p, _) in layers.items()}})
    return model


def convert(model: nn.Module) -> Calibration:
    """The trained model's :class:`Calibration` (its amaxes and trained weights); the model's
    layers become plain float layers again (in place), ready for ``options={"quant": calib}``."""
    state = getattr(model, STATE, None)
    if state is None:
        raise ValueError("convert: the model was not prepared with quant.prepare_qat")
    config: QuantConfig = state["config"]
    floor = MIN_SCALE * quant_ref.QMAX[config.precision]  # what the fake-quant forward used
    records = []
    for name, paths in state["layers"].items():
        modules = [model.get_submodule(p) for p in paths]
        step = modules[0].qat_scale.detach().float()
        if torch.isnan(step).item():
            raise ValueError(f"convert: layer {name!r} never ran (its activation scale is not initialised)")
        amax = max(float(step * quant_ref.QMAX[config.precision]), floor)  # as the forward computes it
        weights = {f"{p}.weight": m.weight for p, m in zip(paths, modules)}
        records.append(LayerCalibration(name, amax, "qat", layer_fingerprint(weights)))
    for paths in state["layers"].values():
        for p in paths:
            module = model.get_submodule(p)
            if isinstance(module, QATLayer):
                del module._parameters["qat_scale"]
                module.__class__ = module._qat_original
                del module._qat_config, module._qat_name, module._qat_ready
    delattr(model, STATE)
    return Calibration(config, records, {"source": "qat"})


# ------------------------------------------------------------------------------- selection
def _selected_by_calibration(model, config, batches, progress, cache_dir) -> Dict[str, Tuple[List[str], float]]:
    from .calibrate import calibrate

    calib = calibrate(model, batches, config, progress=progress, cache_dir=cache_dir, use_cache=False)
    out = {}
    for name, record in calib.layers.items():
        paths = [part.rsplit(".", 1)[0] for part in name.split("+")]
        if all(isinstance(_get(model, p), _LAYER_TYPES) for p in paths):
            out[name] = (paths, record.amax)
    return out


def _selected_by_modules(model, config) -> Dict[str, Tuple[List[str], None]]:
    out = {}
    for path, module in model.named_modules():
        if not isinstance(module, _LAYER_TYPES) or not isinstance(module.weight, nn.Parameter):
            continue
        w = module.weight
        k, n = int(w[0].numel()), int(w.shape[0])
        if config.decide(path, type(module), k, n) is None:
            out[f"{path}.weight"] = ([path], None)
    return out


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


__all__ = ["prepare_qat", "convert", "QATLayer"]
