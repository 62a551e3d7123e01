"""SmoothQuant (Xiao et al. 2023): per-input-channel factors that move activation outliers into
the weights, and the graph steps that apply them.

A linear layer ``Y = X W^T`` equals ``(X / s) (W * s)^T`` for any positive ``s`` over the input
channels (K). A few activation channels with large magnitudes (LayerNorm outputs of
transformers) force a coarse per-tensor activation scale on every other channel; dividing them
by ``s`` flattens the activation and multiplying the weight's columns by ``s`` hands the range
to the weight, whose per-channel (or per-tensor) scale copes with it more easily.

Numerics (the one definition: calibration, the graph pass and the tests use these functions):

* ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``: ``max|X_j|`` is channel j's finite absolute
  maximum over the calibration data, ``max|W_j|`` the largest absolute value of weight column j
  (over every layer that reads the same activation, so they share one ``s``). Both are floored
  at ``FLOOR`` (a channel that is all zeros gets a small finite factor, not 0 or inf), computed
  in fp64, and ``s`` is clamped to ``[FLOOR, 1/FLOOR]`` and rounded to fp32 (what is stored).
* activation: ``x.float() * inv_s`` with ``inv_s = 1 / s`` computed once in fp32, then the usual
  quantize steps (``kernels/quant_ref.quantize_steps``) with the scale calibrated on this
  smoothed value (or the dynamic row scale of it).
* weight: ``W.float() * s`` per input column, then the usual weight quantization; it is ops on
  the constant weight, so constant folding computes it once and again on refit.

The steps are ATen ops through ``op(target, *args)`` (``kernels/quant_ref.eager`` runs them
eagerly), so the mul the pass emits before the quantize is the producer kernel's work, as the
quantize's own mul is.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..kernels.quant_ref import eager

aten = torch.ops.aten
#: smallest channel maximum and factor used (and 1/FLOOR the largest factor): as SmoothQuant's
#: reference code, so a dead channel or column cannot give a zero or infinite factor
FLOOR = 1e-5
#: ``smoothquant="auto"``: the alphas calibration tries per layer group (0.0: not smoothed). Below
#: 0.3 the factors mostly shrink weight columns, which no activation needs; above 0.9 the
#: weights take outliers whole. Steps of 0.1: the output SQNR changes slowly in between.
AUTO_ALPHAS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """fp32 [K] factors from the activation's per-channel abs max [K] and the weights' per-input-
    column abs max [K] (already the max over the layers sharing the activation)."""
    if act_amax.shape != weight_amax.shape or act_amax.dim() != 1:
        raise ValueError(f"smoothing factors need two [K] maxima, got {tuple(act_amax.shape)} "
                         f"and {tuple(weight_amax.shape)}")
    if not 0 < alpha <= 1:
        raise ValueError(f"smoothquant alpha must be in (0, 1], got {alpha!r}")
    a = act_amax.detach().double().nan_to_num(0.0, posinf=0.0).clamp(min=FLOOR)
    w = weight_amax.detach().double().nan_to_num(0.0, posinf=0.0).clamp(min=FLOOR)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(FLOOR, 1.0 / FLOOR).float()


def inverse_factors(s: torch.Tensor) -> torch.Tensor:
    """1 / s in fp32 (s is positive and finite: see smoothing_factors)."""
    return torch.reciprocal(torch.as_tensor(s, dtype=torch.float32))


def scale_columns_steps(op, x, x_dtype: torch.dtype, factors):
    """``x.float() * factors`` with ``factors`` [K] over the last dim: the activation's ``1/s``
    or the weight's ``s``."""
    if x_dtype != torch.float32:
        x = op(aten._to_copy.default, x, dtype=torch.float32)
    return op(aten.mul.Tensor, x, factors)


def smooth_activation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The activation the engine quantizes: ``x.float() * (1/s)`` (fp32)."""
    return scale_columns_steps(eager, x, x.dtype, inverse_factors(s).to(x.device))


def smooth_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] the engine quantizes: ``w.float() * s`` per input column (fp32)."""
    return scale_columns_steps(eager, w, w.dtype, torch.as_tensor(s, dtype=torch.float32).to(w.device))


def as_factors(values: Sequence[float], k: int) -> torch.Tensor:
    """A stored factor vector as an fp32 [k] tensor (values are fp32 numbers: exact)."""
    if len(values) != k:
        raise ValueError(f"{len(values)} smoothing factors for a layer with K={k} input channels")
    return torch.tensor(list(values), dtype=torch.float32)


__all__ = ["FLOOR", "AUTO_ALPHAS", "smoothing_factors", "inverse_factors", "scale_columns_steps", "smooth_activation",
           "smooth_weight", "as_factors"]
