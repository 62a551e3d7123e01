"""Custom ops the passes introduce into ATen graphs; each has a plain-PyTorch implementation.

``compile_backend::attention(q, k, v, mask, scale, causal)`` is what ``fuse_attention`` leaves
in the graph: q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, Dv] (any strides);
``mask`` None, a bool tensor (True = attend) or an additive float tensor, broadcastable to
[B, H, Sq, Sk]; ``causal`` masks key j > query i (top-left aligned, as SDPA's ``is_causal``).
Output [B, H, Sq, Dv], contiguous, or with ``out_perm`` laid out so that
``out.permute(out_perm)`` is contiguous (the layout its reader permutes it to); with ``quant``
(a precision) the output is quantized by ``quant_inv_scale`` as ``quant_ref.quantize_steps``
does: the static input quantize of the GEMM that reads it. Dropout is never part of it (only eval-mode graphs fuse).
A query row whose every key is masked gives zeros, as SDPA's safe softmax does; with
``dead_rows_nan`` it gives NaN, as ``softmax(scores) @ v`` does (the explicit chain with
``aten._softmax``: exp(-inf - -inf) is NaN), so the fused op equals what it replaced.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .kernels import quant_ref


@torch.library.custom_op("compile_backend::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    dead_rows_nan: bool = False,
    out_perm: Optional[List[int]] = None,
    quant: Optional[str] = None,
    quant_inv_scale: float = 0.0,
) -> torch.Tensor:
    out = _attention(q, k, v, mask, scale, causal, dead_rows_nan)
    if quant is not None:  # the next GEMM's static input quantize, fused (fx_passes/quantize.py)
        out = quant_ref.quantize_steps(quant_ref.eager, out, out.dtype, quant_inv_scale, quant)
    return out if out_perm is None else laid_out(out, out_perm)



def laid_out(t: torch.Tensor, perm: List[int]) -> torch.Tensor:
    """``t``'s values in memory whose dims lie in ``perm`` order (outer first): ``t.permute(perm)``
    is contiguous. The attention output in the order its reader permutes it to (HF models
    ``transpose(1, 2)`` it to [B, Sq, H, Dv] and flatten the heads), so that no copy is needed."""
    inverse = [perm.index(d) for d in range(len(perm))]
    return t.permute(perm).contiguous().permute(inverse)


def _attention(q, k, v, mask, scale, causal, dead_rows_nan):
    if causal and mask is not None:
        sq, sk = q.shape[-2], k.shape[-2]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        if mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
        causal = False
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal).contiguous()
    if dead_rows_nan and mask is not None:  # causal alone never masks a whole row
        dead = (~mask if mask.dtype == torch.bool else torch.isneginf(mask)).all(-1, keepdim=True)
        out = out.masked_fill(dead, float("nan"))
    return out


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, causal, dead_rows_nan=False, out_perm=None, quant=None,
                    quant_inv_scale=0.0):
    dtype = q.dtype if quant is None else quant_ref.STORAGE[quant]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=dtype)
    return out if out_perm is None else laid_out(out, out_perm)


# ----------------------------------------------------------------------------- quantized ops
# What ``fx_passes/quantize.py`` leaves in the graph for a quantized GEMM / convolution. The
# operands are already quantized (int8 or float8_e4m3fn); the activation's quantize is plain ATen
# ops before it (so the producer's generated kernel writes it), the weight's is constant-folded.
# Numerics: kernels/quant_ref.py (the one reference; this is also the CPU path).
@torch.library.custom_op("compile_backend::scaled_mm", mutates_args=())
def scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(xq @ wq^T) * (x_scale * w_scale) + bias`` in ``out_dtype``: xq [M, K], x_scale fp32 0-d
    (per tensor) or [M, 1] (per row); wq [N, K] (K-major), w_scale fp32 [N] or 0-d; bias [N]."""
    return quant_ref.scaled_mm(xq, x_scale, wq, w_scale, bias, out_dtype)


@scaled_mm.register_fake
def _scaled_mm_fake(xq, x_scale, wq, w_scale, bias, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


@torch.library.custom_op("compile_backend::scaled_conv", mutates_args=())
def scaled_conv(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """A convolution (not transposed) of quantized operands: x_scale fp32 0-d, w_scale fp32 [out]
    or 0-d; output ``conv(xq, wq) * (x_scale * w_scale[c]) + bias[c]`` in ``out_dtype``."""
    out = quant_ref.scaled_conv(xq, x_scale, wq, w_scale, bias, stride, padding, dilation, groups, out_dtype)
    return out.contiguous(memory_format=_conv_out_format(xq))


@scaled_conv.register_fake
def _scaled_conv_fake(xq, x_scale, wq, w_scale, bias, stride, padding, dilation, groups, out_dtype):
    meta = torch.ops.aten.convolution(xq.new_empty(xq.shape, dtype=torch.float32, device="meta"),
                                      wq.new_empty(wq.shape, dtype=torch.float32, device="meta"),
                                      None, stride, padding, dilation, False, [0] * len(stride), groups)
    return xq.new_empty(meta.shape, dtype=out_dtype).contiguous(memory_format=_conv_out_format(xq))


def _conv_out_format(xq: torch.Tensor) -> torch.memory_format:
    """The output's memory format, the same for the fake and every device: channels-last for a
    channels-last 4-D input (ATen's own choice depends on the backend it picks)."""
    channels_last = xq.dim() == 4 and xq.shape[1] > 1 and xq.is_contiguous(memory_format=torch.channels_last) \
        and not xq.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
