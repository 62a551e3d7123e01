"""``options["quant"]`` (a Calibration, a dynamic or a weight-only QuantConfig) as the quantize
pass's request: a ``QuantRequest`` (W8A8) or a ``WeightOnlyRequest`` (W8A16 / W4A16)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from ..errors import UserError
from ..fx_passes.quantize import QuantRequest
from ..fx_passes.weight_only import WeightOnlyRequest
import torch

from .calibration import Calibration, weight_fingerprint
from .config import QuantConfig


def build_request(quant: Any) -> Union[QuantRequest, WeightOnlyRequest]:
    calib = quant if isinstance(quant, Calibration) else None
    config: QuantConfig = calib.config if calib is not None else quant
    if config.weight_only:
        if calib is not None:  # Options refuses it first; kept for callers that build requests directly
            raise UserError("quant: a calibration of a weight-only config (activations=None) has nothing to "
                            "apply: weight-only needs no calibration, pass the QuantConfig itself")
        # no calibration: the weight's scales come from the weight itself, at compile time
        return WeightOnlyRequest(precision=config.precision, group_size=config.group_size, clip=config.clip,
                                 decide=config.decide)
    if calib is None and config.smoothquant is not None:
        raise UserError(f"quant: smoothquant={config.smoothquant!r} needs per-channel smoothing factors from "
                        "calibration data, also with dynamic activations: call quant.calibrate(model, batches, "
                        "config) first and pass the Calibration as options={'quant': calib}")

    def parts(name: str) -> List[str]:
        """The calibration's records for layer ``name``: its own, or for a merged GEMM
        (``a.weight+b.weight``) calibrated part by part (QAT without calibration batches), its
        parts' (the largest amax serves the merged input)."""
        if calib is None:
            return []
        if name in calib:
            return [name]
        split = name.split("+")
        return split if len(split) > 1 and all(p in calib for p in split) else []

    def amax(name: str) -> Optional[float]:
        found = parts(name)
        return max(calib.amax(p) for p in found) if found else None

    def details(name: str) -> Dict[str, Any]:
        found = parts(name)
        if not found:
            return {}
        records = [calib.layer(p) for p in found]
        out = {"amax": max(r.amax for r in records), "sqnr_db": records[0].stats.get("sqnr_db"),
               "inf_count": sum(r.inf_count for r in records)}
        if len(found) > 1:
            out["amax_from_parts"] = len(found)
        return out

    def smooth(name: str):
        return calib.layer(name).smooth if calib is not None and name in calib else None

    def smooth_alpha(name: str) -> Optional[float]:
        """The alpha the layer's factors were made with (``"auto"`` chose it per layer)."""
        return calib.layer(name).alpha if calib is not None and name in calib else None

    def check(name: str, params: Dict[str, torch.Tensor]) -> None:
        found = parts(name)
        if not found:
            return
        layers = {name: layer_fingerprint(params)} if found == [name] else \
            {p: layer_fingerprint({p: params[p]}) for p in found if p in params}
        try:
            calib.check_compatible(None, layers)
        except ValueError as exc:
            raise UserError(f"quant: {exc}") from None

    return QuantRequest(precision=config.precision, per_channel=config.weights == "per_channel",
                        dynamic=config.activations == "dynamic",
                        calibrator=None if config.activations == "dynamic" else config.calibrator,
                        decide=config.decide, amax=amax, details=details, check=check,
                        calibrated=calib is not None, smoothquant=config.smoothquant, smooth=smooth,
                        smooth_alpha=smooth_alpha)


def layer_fingerprint(params: Dict[str, torch.Tensor]) -> str:
    """The fingerprint of a layer's weight: of its parameter, or of a merged layer's parts in name order."""
    tensors = list(params.values())
    if len(tensors) == 1:
        return weight_fingerprint(tensors[0])
    return weight_fingerprint(torch.cat([t.detach().reshape(-1) for t in tensors]))


__all__ = ["build_request", "layer_fingerprint"]
