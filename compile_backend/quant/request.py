"""``options["quant"]`` (a Calibration or a dynamic QuantConfig) as the quantize pass's request."""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..errors import UserError
from ..fx_passes.quantize import QuantRequest
import torch

from .calibration import Calibration, weight_fingerprint
from .config import QuantConfig


def build_request(quant: Any) -> QuantRequest:
    calib = quant if isinstance(quant, Calibration) else None
    config: QuantConfig = calib.config if calib is not None else quant

    def amax(name: str) -> Optional[float]:
        return calib.amax(name) if calib is not None and name in calib else None

    def details(name: str) -> Dict[str, Any]:
        if calib is None or name not in calib:
            return {}
        record = calib.layer(name)
        return {"amax": record.amax, "sqnr_db": record.stats.get("sqnr_db"), "inf_count": record.inf_count}

    def check(name: str, params: Dict[str, torch.Tensor]) -> None:
        if calib is None or name not in calib:
            return
        try:
            calib.check_compatible(None, {name: layer_fingerprint(params)})
        except ValueError as exc:
            raise UserError(f"quant: {exc}") from None

    return QuantRequest(precision=config.precision, per_channel=config.weights == "per_channel",
                        dynamic=config.activations == "dynamic",
                        calibrator=None if config.activations == "dynamic" else config.calibrator,
                        decide=config.decide, amax=amax, details=details, check=check,
                        calibrated=calib is not None)


def layer_fingerprint(params: Dict[str, torch.Tensor]) -> str:
    """The fingerprint of a layer's weight: of its parameter, or of a merged layer's parts in name order."""
    tensors = list(params.values())
    if len(tensors) == 1:
        return weight_fingerprint(tensors[0])
    return weight_fingerprint(torch.cat([t.detach().reshape(-1) for t in tensors]))


__all__ = ["build_request", "layer_fingerprint"]
