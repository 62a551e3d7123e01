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

from .kernels import quant_ref, weight_only_ref


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
    gqa = k.shape[1] != q.shape[1]  # grouped-query attention: fewer k/v heads, each serving a group
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                         **({"enable_gqa": True} if gqa else {})).contiguous()
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


# ----------------------------------------------------------------------------- weight-only ops
# What ``fx_passes/weight_only.py`` leaves in the graph for a weight-only quantized linear
# (W8A16 / W4A16, issue #20). The weight's quantization is two ops on the frozen weight, which
# ``constant_fold`` evaluates once at compile time and again on refit (the pass never stores a
# precomputed tensor); the GEMM reads the codes and scales. Numerics: kernels/weight_only_ref.py,
# the one reference, which is also what these run on every device (the Triton kernels of
# kernels/weight_only.py come in through the selector, kernels/weight_only_build.py).
@torch.library.custom_op("compile_backend::weight_only_scales", mutates_args=())
def weight_only_scales(w: torch.Tensor, precision: str, group_size: Optional[int], clip: str) -> torch.Tensor:
    """fp16 scales of a [N, K] weight: [N] (int8, per output channel) or [N, ceil(K / group_size)]
    (int4); ``clip`` minmax or mse (``weight_only_ref.scales``)."""
    return weight_only_ref.scales(w, precision, group_size, clip).contiguous()


@weight_only_scales.register_fake
def _weight_only_scales_fake(w, precision, group_size, clip):
    n, k = w.shape
    shape = (n,) if precision == "int8" else (n, -(-k // group_size))
    return w.new_empty(shape, dtype=torch.float16)


@torch.library.custom_op("compile_backend::weight_only_codes", mutates_args=())
def weight_only_codes(w: torch.Tensor, scales: torch.Tensor, precision: str, group_size: Optional[int]) -> torch.Tensor:
    """Codes of a [N, K] weight with its stored scales: int8 [N, K], or for int4 packed two per
    byte, uint8 [N, ceil(K / 2)] (``weight_only_ref.quantize`` then ``pack_int4``). Contiguous: the
    kernels read rows of codes (a transposed weight would otherwise be copied at every call)."""
    codes = weight_only_ref.quantize(w, scales, precision, group_size)
    return weight_only_ref.pack_int4(codes) if precision == "int4" else codes.contiguous()


@weight_only_codes.register_fake
def _weight_only_codes_fake(w, scales, precision, group_size):
    n, k = w.shape
    if precision == "int4":
        return w.new_empty((n, (k + 1) // 2), dtype=torch.uint8)
    return w.new_empty((n, k), dtype=torch.int8)


@torch.library.custom_op("compile_backend::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    precision: str,
    group_size: Optional[int],
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x [..., K] @ dequantize(codes, scales)^T + bias`` -> [..., N] in ``out_dtype`` (None: x's
    dtype): the dequantized weight rounded to x's dtype, fp32 sums, fp32 bias, one rounding last.
    codes/scales as :func:`weight_only_codes` / :func:`weight_only_scales` make them."""
    k = x.shape[-1]
    unpacked = weight_only_ref.unpack_int4(codes, k) if precision == "int4" else codes
    x2 = x.reshape(x.shape[:-1].numel(), k)  # not (-1, k): ambiguous when K is 0
    y = weight_only_ref.weight_only_mm(x2, unpacked, scales, precision, group_size, bias, out_dtype)
    return y.reshape(*x.shape[:-1], codes.shape[0])


@weight_only_linear.register_fake
def _weight_only_linear_fake(x, codes, scales, bias, precision, group_size, out_dtype=None):
    return x.new_empty((*x.shape[:-1], codes.shape[0]), dtype=out_dtype or x.dtype)


@torch.library.custom_op("compile_backend::weight_only_grouped_mm", mutates_args=())
def weight_only_grouped_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offs: torch.Tensor,
    precision: str,
    group_size: Optional[int],
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """A mixture-of-experts layer's ``torch._grouped_mm(x, w, offs)`` over weight-only codes:
    x [M, K] (rows sorted by expert), the E experts' [N, K] weights stacked as [E * N, K] codes
    with their scales (:func:`weight_only_codes` / :func:`weight_only_scales` of the stacked
    weight), ``offs`` [E] the cumulative rows per expert (non-decreasing, as ``_grouped_mm`` takes them:
    not checked, which would sync the host) -> [M, N]; rows past ``offs[-1]`` 0
    (``weight_only_ref.grouped_weight_only_mm``: no host sync, so a CUDA graph may hold it)."""
    k = x.shape[-1]
    unpacked = weight_only_ref.unpack_int4(codes, k) if precision == "int4" else codes
    return weight_only_ref.grouped_weight_only_mm(x, unpacked, scales, offs, precision, group_size, out_dtype)


@weight_only_grouped_mm.register_fake
def _weight_only_grouped_mm_fake(x, codes, scales, offs, precision, group_size, out_dtype=None):
    return x.new_empty((x.shape[0], codes.shape[0] // offs.shape[0]), dtype=out_dtype or x.dtype)
