"""Quantization (INT8/FP8/INT4): configs, calibration, calibration files, quantization-aware training.

    from compile_backend import quant
    cfg = quant.QuantConfig(precision="fp8", calibrator="entropy")
    calib = quant.Calibration.load("calib.json")

Importing this package imports no Triton and initialises no CUDA: the torch-using parts (observers,
calibrators) load with their modules. See quant/README.md for the numerics and the file format.
"""
from __future__ import annotations

from .calibration import Calibration, LayerCalibration, weight_fingerprint
from .config import LayerType, QuantConfig

__all__ = ["QuantConfig", "LayerType", "Calibration", "LayerCalibration", "weight_fingerprint"]

from .calibrate import calibrate  # noqa: E402  (the graph side: runs the model through the backend)
from .qat import convert, prepare_qat  # noqa: E402  (quantization-aware training)

__all__ += ["calibrate", "prepare_qat", "convert"]
