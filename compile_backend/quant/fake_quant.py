"""Fake quantization with gradients: the forward is ``kernels/quant_ref.fake_quantize`` (the one
numerics reference: the quantized engine computes exactly this), the backward a
straight-through estimator with clipping, and optionally the scale's LSQ gradient.

``fake_quantize(x, scale, precision, learn_scale=False)``:

* forward: ``dequantize(quantize(x, s), s)`` in x's dtype, with ``s = scale`` clamped to at
  least ``MIN_SCALE`` (a learned scale driven to zero or below by its optimizer keeps working:
  a scale of exactly 0 would quantize everything to 0 and stop every gradient).
* gradient to x: ``dy`` where ``|x / s| <= qmax`` (representable: the rounding counts as the
  identity), 0 where x was clipped (it saturates, so it does not move the output). NaN in x
  quantizes as the reference does (INT: 0, FP8: NaN) and passes no gradient.
* gradient to the scale (``learn_scale``; LSQ, Esser et al. 2020): ``dy/ds = q - x/s`` inside
  the range, ``q = ±qmax`` outside (q the quantized code as a float), summed over the elements
  each scale covers and multiplied by ``1 / sqrt(n * qmax)`` (n: ``lsq_elements``, by default
  the elements per scale), the paper's step-size gradient scale that keeps the scale's updates in proportion to the
  weights'. The clamp at ``MIN_SCALE`` is straight-through for the scale too, so an optimizer
  can move a clamped scale back up. NaN in the incoming gradient stays NaN in both gradients
  (as eager; an AMP ``GradScaler`` then skips the step).

``scale`` broadcasts against x: a 0-d tensor (per tensor) or one with x's dims and size 1
except along the channel dim (per channel).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels import quant_ref

#: smallest scale the forward uses (see module doc); far below any useful step
MIN_SCALE = 1e-12


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, precision: str, learn_scale: bool, lsq_elements: Optional[int]):
        s = scale.detach().float().clamp_min(MIN_SCALE)
        q = quant_ref.quantize(x, s, precision).float()
        ctx.save_for_backward(x, s, q)
        ctx.precision, ctx.learn_scale, ctx.lsq_elements = precision, learn_scale, lsq_elements
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        out = q * s
        # never ``out.to(x.dtype)`` with the dtypes equal: that returns ``out`` itself, and
        # torch 2.11's Dynamo then drops this Function's backward (zero gradients; 2.13 not)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, s, q = ctx.saved_tensors
        qmax = quant_ref.QMAX[ctx.precision]
        v = x.detach().float() / s
        inside = v.abs() <= qmax  # False for NaN x too
        dx = torch.where(inside, dy, 0.0) if ctx.needs_input_grad[0] else None  # a scalar: no zeros kernel
        ds = None
        if ctx.learn_scale and ctx.needs_input_grad[1]:
            dyds = torch.where(inside, q - v, q)  # outside: q is the saturated +-qmax code
            per_element = dy.float() * dyds
            # summed over the elements each scale covers (its broadcast dims)
            summed = per_element.sum_to_size(ctx.scale_shape) if len(ctx.scale_shape) else per_element.sum()
            n = ctx.lsq_elements or per_element.numel() // max(1, math.prod(ctx.scale_shape))
            ds = (summed / math.sqrt(max(1, n) * qmax)).to(ctx.scale_dtype)
        return dx, ds, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, precision: str, learn_scale: bool = False,
                  lsq_elements: Optional[int] = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``scale`` (see the module doc for the gradients).
    ``lsq_elements``: the N of LSQ's gradient scale 1/sqrt(N qmax) (default: the elements each
    scale covers; for an activation the paper takes the features of one sample)."""
    quant_ref.check_precision(precision)
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    if scale.dim() > x.dim() or any(s not in (1, t) for s, t in zip(reversed(scale.shape), reversed(x.shape))):
        raise ValueError(f"fake_quantize: scale of shape {tuple(scale.shape)} does not broadcast to x {tuple(x.shape)}")
    return _FakeQuantize.apply(x, scale, precision, bool(learn_scale), lsq_elements)


__all__ = ["fake_quantize", "MIN_SCALE"]
