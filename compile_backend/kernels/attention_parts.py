"""Pieces both attention kernels use (the flash kernel, ``attention.py``, and flash-decoding,
``attention_decode.py``): the mask argument's kinds and layout, and the output quantize for the
next GEMM. Imports Triton (the fp8 conversion helpers are generated and loaded here)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .expr_casts import conversion_source
from .launch import load_source
from .weight_only_parts import round_to

# fp32 -> float8_e4m3fn for the fused FP8 output quantize under Triton's interpreter (whose own
# fp8 cast is wrong): the generated kernels' integer-arithmetic helper; on the GPU the native
# cast. The launch picks one (SOFT_FP8), so the import-time mode does not matter
_PRELUDE = "import triton\nimport triton.language as tl\n"
to_fp8_soft = load_source(_PRELUDE + conversion_source("cb_to_fp8(", interpret=True)).cb_to_fp8

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def quantize_output(out, quant_inv_scale, QMAX: tl.constexpr, ROUND_TO: tl.constexpr, QUANT_FP8: tl.constexpr,
                    SOFT: tl.constexpr):
    """The next GEMM's static input quantize (kernels/quant_ref.quantize_steps) of an attention
    output as the op would return it (rounded to q's dtype first): FP8 saturates to +-QMAX (NaN
    stays NaN) then rounds to the e4m3 grid; integer codes map NaN to 0, saturate and round
    half to even (|y| <= QMAX < 2^23). SOFT (under the interpreter, whose fp8 cast is wrong and
    whose bf16 cast truncates): both rounded in software (a truncated bf16 moved 5-8% of a bf16
    Llama's INT8 attention codes by a step, and validation rejected the kernel)."""
    y = round_to(out, ROUND_TO, SOFT).to(tl.float32) * quant_inv_scale
    if QUANT_FP8:
        # min/max that keep NaN: one instruction each; the value is then within +-QMAX (or
        # NaN), so the GPU's cast needs no overflow guard (kernels/expr_casts.fp8_saturates)
        y = tl.minimum(tl.maximum(y, -QMAX, propagate_nan=tl.PropagateNan.ALL), QMAX,
                       propagate_nan=tl.PropagateNan.ALL)
        if SOFT:
            res = to_fp8_soft(y)
        else:
            res = y.to(tl.float8e4nv)
    else:
        y = tl.where(y != y, 0.0, y)
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        r = (tl.abs(y) + 8388608.0) - 8388608.0
        res = tl.where(y < 0, -r, r)
    return res


def mask_argument(mask: Optional[torch.Tensor], q: torch.Tensor, seq_k: int):
    """(kind, tensor, strides) the kernels take for ``mask``: broadcast to [B, H, Sq, Sk] with
    stride 0 on broadcast dims (a [B,1,1,Sk] padding mask is read in place, never copied), a bool
    mask seen as uint8; no mask: kind MASK_NONE and q as a placeholder pointer."""
    if mask is None:
        return MASK_NONE, q, (0, 0, 0, 0)
    batch, heads, seq_q = q.shape[:3]
    arg = mask.expand(batch, heads, seq_q, seq_k)
    if mask.dtype == torch.bool:
        return MASK_BOOL, arg.view(torch.uint8), arg.stride()
    return MASK_ADDITIVE, arg, arg.stride()


__all__ = ["MASK_NONE", "MASK_BOOL", "MASK_ADDITIVE", "mask_argument", "quantize_output",
           "to_fp8_soft"]
