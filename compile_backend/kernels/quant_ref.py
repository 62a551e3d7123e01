"""The quantization numerics, in plain PyTorch: the one reference of quantize, dequantize and the
scaled (quantized) GEMM and convolution.

Calibration, fake quantization (QAT), the INT8/FP8 kernels' tests and the engine on a machine
without generated kernels (the emulated path) all call these functions, so a quantized model
computes one function wherever it runs. The kernels implement the same steps in the same order;
``quant/README.md`` states the numerics for users. It lives at the bottom layer (``kernels/``)
because the engine's CPU path runs it and ``kernels/`` imports nothing above itself.

Symmetric quantization, no zero points:

* ``scale = amax / qmax`` with ``qmax`` 127 (INT8, narrow range [-127, 127]), 7 (INT4, [-7, 7],
  stored as int8) or 448 (FP8 e4m3fn). An amax at or below ``TINY_AMAX`` (2^-24), or not
  finite, gives scale 0.
* ``quantize(x) = convert(x * inv_scale)``, ``inv_scale = 1 / scale`` computed once in fp32 (0
  for scale 0, so a zero scale quantizes everything to exact zeros, never NaN or inf). INT8:
  round half to even, saturate to [-127, 127], NaN to 0 (what a saturating float-to-int
  conversion does on the GPU). FP8: saturate to [-448, 448] before the cast (the e4m3fn cast
  itself would turn overflow into NaN); NaN stays NaN.
* ``dequantize(q) = q * scale`` in fp32.
* Scaled GEMM ``y = (xq @ wq^T) * (x_scale * w_scale) + bias``: INT8 products accumulate
  exactly (int32 on the GPU; here in fp32 while K * 127^2 < 2^24, so every partial sum is an
  integer fp32 holds, else in fp64, exact for K < 2^25), FP8 products in fp32.
  The accumulator converts to fp32, is multiplied by the product of the row scale of x (a
  scalar for per-tensor activations) and the column scale of w, then the bias (fp32) is added;
  the result is cast to the output dtype last.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

PRECISIONS = ("int8", "fp8", "int4")
#: integer grids: round half to even, NaN to 0; INT4 values [-7, 7] are stored (and multiplied)
#: as int8, so the INT8 kernels run them exactly
INTEGER_PRECISIONS = ("int8", "int4")
QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.int8}
aten = torch.ops.aten
#: amax at or below this is treated as zero (no value of that size survives quantization)
TINY_AMAX = 2.0 ** -24


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"quantized precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def scale_from_amax(amax: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 scale(s) from absolute maxima; 0 where amax is tiny, zero or not finite."""
    check_precision(precision)
    amax = torch.as_tensor(amax, dtype=torch.float32)
    usable = torch.isfinite(amax) & (amax > TINY_AMAX)
    return torch.where(usable, amax / QMAX[precision], torch.zeros_like(amax))


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale in fp32, and 0 where the scale is 0 (so x * inv_scale is 0, not inf or NaN)."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    return inverse_scale_steps(eager, scale, *constants(scale.device))


def quantize(x: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """x (any float dtype) to int8 or float8_e4m3fn; ``scale`` broadcasts against x."""
    check_precision(precision)
    return quantize_steps(eager, x, x.dtype, inverse_scale(scale).to(x.device), precision)


# The steps as ATen ops through ``op(target, *args, **kwargs)``: ``eager`` runs them here, the
# graph pass (fx_passes/quantize.py) emits the same ops as nodes, which the producer's generated
# kernel then computes. One definition, so the reference and the engine cannot drift apart.
def eager(target, *args, **kwargs):
    return target(*args, **kwargs)


def quantize_steps(op, x, x_dtype: torch.dtype, inv_scale, precision: str):
    """convert(x * inv_scale): int8 rounds half to even, saturates, NaN -> 0; fp8 saturates to
    +-448 before the cast (the e4m3fn cast would turn overflow into NaN)."""
    if x_dtype != torch.float32:
        x = op(aten._to_copy.default, x, dtype=torch.float32)
    x = op(aten.mul.Tensor, x, inv_scale)
    qmax = QMAX[precision]
    if precision in INTEGER_PRECISIONS:
        x = op(aten.round.default, op(aten.nan_to_num.default, x, 0.0))
    x = op(aten.clamp.default, x, -qmax, qmax)
    return op(aten._to_copy.default, x, dtype=STORAGE[precision])


def inverse_scale_steps(op, scale, zero, one):
    """1 / scale, 0 where scale is 0. ``zero``/``one`` are 0-d fp32 tensors (graph constants in
    the pass: a Python scalar in ``where`` would trace to its own ATen op and split the kernel)."""
    positive = op(aten.gt.Scalar, scale, 0.0)
    safe = op(aten.where.self, positive, scale, one)
    return op(aten.where.self, positive, op(aten.reciprocal.default, safe), zero)


def row_scale_steps(op, x, precision: str, zero, one, x_dtype: torch.dtype = torch.float32):
    """Dynamic per-row scale of a float value of dtype ``x_dtype``: (scale [.., 1], inv_scale
    [.., 1]), fp32. A 16-bit ``x``'s row amax is taken in its own dtype, then cast: abs and max are exact in any float
    format, so the scale equals fp32's bit for bit, and no fp32 copy of ``x`` is made (in an
    engine that copy was a tensor of its own, written by one kernel and read by the next)."""
    amax = op(aten.amax.default, op(aten.abs.default, x), [-1], True)
    if x_dtype != torch.float32:
        amax = op(aten._to_copy.default, amax, dtype=torch.float32)
    usable = op(aten.bitwise_and.Tensor, op(aten.gt.Scalar, amax, TINY_AMAX),
                op(aten.lt.Scalar, amax, float("inf")))
    scale = op(aten.where.self, usable, op(aten.div.Tensor, amax, QMAX[precision]), zero)
    return scale, inverse_scale_steps(op, scale, zero, one)


def constants(device=None):
    """The (zero, one) 0-d fp32 tensors the steps take, for eager use."""
    return torch.zeros((), device=device), torch.ones((), device=device)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * torch.as_tensor(scale, dtype=torch.float32).to(q.device)


def dequantize_steps(op, q, scale, out_dtype: torch.dtype):
    """:func:`dequantize` as ops (``op(target, *args)``), converted to ``out_dtype``."""
    x = op(aten.mul.Tensor, op(aten._to_copy.default, q, dtype=torch.float32), scale)
    return x if out_dtype == torch.float32 else op(aten._to_copy.default, x, dtype=out_dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    """quantize then dequantize, in x's dtype: the value a quantized engine sees."""
    return dequantize(quantize(x, scale, precision), scale).to(x.dtype)


def channel_amax(w: torch.Tensor) -> torch.Tensor:
    """Per output channel (dim 0) absolute maximum of a weight, fp32 [out]."""
    if w.dim() < 2:
        return w.detach().float().abs()
    # over the weight's own dims, not a reshape of them: in a QAT training graph the reduction
    # kernel then also computes the scale and the fake-quantized weight (one frame for all)
    return w.detach().float().abs().amax(dim=tuple(range(1, w.dim())))


def weight_scale(w: torch.Tensor, precision: str, per_channel: bool = True) -> torch.Tensor:
    """Scale of a weight: [out] per channel, or a 0-d tensor per tensor."""
    amax = channel_amax(w)
    return scale_from_amax(amax if per_channel else amax.max(), precision)


def quantize_weight(w: torch.Tensor, precision: str, per_channel: bool = True):
    """(quantized weight, scale): the weight as the engine stores it (same layout as w)."""
    scale = weight_scale(w, precision, per_channel)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return quantize(w, scale.reshape(shape) if scale.dim() else scale, precision), scale


def row_scale(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Dynamic activation scale: one per row (all dims but the last), shape x.shape[:-1] + (1,)."""
    check_precision(precision)
    return row_scale_steps(eager, x.detach().float(), precision, *constants(x.device))[0]


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference scaled GEMM. xq [M, K], x_scale 0-d or [M, 1]; wq [N, K], w_scale 0-d or [N]."""
    acc = _accumulate(xq, wq, lambda a, b: a @ b.t())
    y = acc * (_rows(x_scale, acc) * _cols(w_scale, acc))
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def scaled_conv(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference scaled convolution (1-3 spatial dims, not transposed); x_scale is per tensor."""
    conv = lambda a, b: torch.ops.aten.convolution(a, b, None, list(stride), list(padding),
                                                   list(dilation), False, [0] * len(stride), groups)
    acc = _accumulate(xq, wq, conv)
    channels = (1, -1) + (1,) * (acc.dim() - 2)
    w_scale = torch.as_tensor(w_scale, dtype=torch.float32).to(acc.device)
    x_scale = torch.as_tensor(x_scale, dtype=torch.float32).to(acc.device)
    y = acc * (x_scale * (w_scale.reshape(channels) if w_scale.dim() else w_scale))
    if bias is not None:
        y = y + bias.float().reshape(channels)
    return y.to(out_dtype)


def _accumulate(xq: torch.Tensor, wq: torch.Tensor, product) -> torch.Tensor:
    if xq.dtype == torch.int8:
        # integer products summed exactly (as int32 accumulation, without its overflow at huge K):
        # in fp32 while every partial sum stays below 2^24, else fp64
        exact = torch.float32 if int_sums_fit_fp32(xq, wq) else torch.float64
        return product(xq.to(exact), wq.to(exact)).float()
    return product(xq.float(), wq.float())


def int_sums_fit_fp32(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """Whether every partial sum of ``xq``'s codes times a row of ``wq``'s (wq [N, ...]: one
    output's weights a row) stays below 2^24, where fp32 holds integers exactly: max |x| times
    the largest row's sum of |w| bounds them in any order. K * 127^2, the bound used before,
    sent the MNIST CNN's 1152-deep convolutions to fp64 (a third of its CPU engine's time) where
    real codes stay a few times below it."""
    k = wq[0].numel()
    if k * 127 * 127 < 2 ** 24 or xq.numel() == 0 or wq.numel() == 0:
        return True
    x_max = int(xq.to(torch.int16).abs().max())  # int16: |-128| does not fit int8
    w_rows = wq.reshape(wq.shape[0], -1).to(torch.int64).abs().sum(dim=1).max()
    return x_max * int(w_rows) < 2 ** 24


def _rows(x_scale: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(x_scale, dtype=torch.float32).to(acc.device)
    return s.reshape(-1, 1) if s.dim() else s


def _cols(w_scale: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(w_scale, dtype=torch.float32).to(acc.device)
    return s.reshape(1, -1) if s.dim() else s


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref = reference.detach().double()
    noise = (approx.detach().double() - ref).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10 * torch.log10(signal / noise))


__all__ = [
    "PRECISIONS", "INTEGER_PRECISIONS", "QMAX", "STORAGE", "TINY_AMAX", "check_precision", "scale_from_amax", "inverse_scale",
    "quantize", "dequantize", "fake_quantize", "channel_amax", "weight_scale", "quantize_weight",
    "row_scale", "scaled_mm", "scaled_conv", "int_sums_fit_fp32", "sqnr_db", "eager", "quantize_steps", "inverse_scale_steps",
    "row_scale_steps", "constants",
]
