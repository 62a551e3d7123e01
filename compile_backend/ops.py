"""Custom ops the passes introduce into ATen graphs; each has a plain-PyTorch implementation.

``compile_backend::attention(q, k, v, mask, scale, causal)`` is what ``fuse_attention`` leaves
in the graph: q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, Dv] (any strides);
``mask`` None, a bool tensor (True = attend) or an additive float tensor, broadcastable to
[B, H, Sq, Sk]; ``causal`` masks key j > query i (top-left aligned, as SDPA's ``is_causal``).
Output [B, H, Sq, Dv], contiguous. Dropout is never part of it (only eval-mode graphs fuse).
A query row whose every key is masked gives zeros, as SDPA's safe softmax does; with
``dead_rows_nan`` it gives NaN, as ``softmax(scores) @ v`` does (the explicit chain with
``aten._softmax``: exp(-inf - -inf) is NaN), so the fused op equals what it replaced.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.library.custom_op("compile_backend::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    dead_rows_nan: bool = False,
) -> torch.Tensor:
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
def _attention_fake(q, k, v, mask, scale, causal, dead_rows_nan=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
