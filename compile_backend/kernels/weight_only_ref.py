"""Weight-only quantization numerics (W8A16, W4A16; issue #20), in plain PyTorch: the one
reference the weight-only pass, its kernels' tests and the CPU path will share.

Symmetric, no zero points, on the grids of :mod:`quant_ref` (INT8 [-127, 127], INT4 [-7, 7];
round half to even, saturate, NaN to 0: ``quant_ref.quantize``):

* **Scales.** INT8: one per output channel (row of the [N, K] weight). INT4: one per group of
  ``group_size`` consecutive input channels of a row (32, 64 or 128; the last group of a row may
  be shorter when K is not a multiple). Scales are stored in fp16, and the codes are computed
  with the stored (fp16-rounded) scale, so dequantizing with it is exact to what was quantized.
  A group whose amax is at or below ``quant_ref.TINY_AMAX`` gets scale 0 and codes 0.
* **Clip.** ``minmax``: scale = amax / qmax. ``mse``: the amax is multiplied by the clip ratio
  in ``CLIP_RATIOS`` that gives the group the smallest squared error after quantize-dequantize
  (a group with one outlier gives up the outlier for resolution on the rest).
* **Packing (INT4).** Two codes per byte along K: code ``k`` of a row in the low nibble of byte
  ``k // 2`` when ``k`` is even, the high nibble when odd, as 4-bit two's complement; an odd K
  pads one zero nibble.
* **GEMM.** ``y = x @ dequantize(w)^T + bias`` with ``dequantize(w) = code * scale`` in fp32,
  rounded to x's dtype (the kernels feed 16-bit operands to the tensor cores), products summed
  in fp32, the bias added in fp32, the result cast to ``out_dtype`` last.
* **Grouped GEMM (mixture-of-experts).** E experts' [N, K] weights stacked as one [E * N, K]
  weight (each row quantized as above), and ``offs`` [E], the cumulative row counts of x's
  rows sorted by expert (``torch._grouped_mm``'s convention): rows ``[offs[e - 1], offs[e])``
  are multiplied by expert e's weight as in the GEMM above; rows from ``offs[E - 1]`` on belong
  to no expert and are 0 (``_grouped_mm`` leaves them unwritten; transformers masks them).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import quant_ref

GROUP_SIZES = (32, 64, 128)
#: rows of x up to which the GEMV kernel (one x row per program) serves a layer, and the
#: partitioner fuses x's producer into it (fx_passes/partition_merge.merge_gemv_prologues)
GEMV_MAX_M = 4
#: the clip ratios the ``mse`` method tries per group (1.0 first: ties keep the plain amax)
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))
BITS = {"int8": 8, "int4": 4}


def check(precision: str, group_size: Optional[int]) -> None:
    if precision not in BITS:
        raise ValueError(f"weight-only precision must be int8 or int4, got {precision!r}")
    if precision == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 weight-only group_size must be one of {GROUP_SIZES}, got {group_size!r}")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group_size] in fp32, the last group zero-padded."""
    n, k = w.shape
    pad = (-k) % group_size
    wf = torch.nn.functional.pad(w.float(), (0, pad))
    return wf.reshape(n, -1, group_size)


def scales(w: torch.Tensor, precision: str, group_size: Optional[int] = None, method: str = "minmax") -> torch.Tensor:
    """fp16 scales: [N] for int8 (per channel), [N, ceil(K / group_size)] for int4."""
    check(precision, group_size)
    if method not in ("minmax", "mse"):
        raise ValueError(f"weight-only clip method must be minmax or mse, got {method!r}")
    groups = _groups(w, group_size) if precision == "int4" else w.float().unsqueeze(1)
    amax = groups.abs().amax(-1)
    best = quant_ref.scale_from_amax(amax, precision).half()
    if method == "mse":
        best_err = _error(groups, best, precision)
        for ratio in CLIP_RATIOS[1:]:
            cand = quant_ref.scale_from_amax(amax * ratio, precision).half()
            err = _error(groups, cand, precision)
            better = err < best_err
            best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return best if precision == "int4" else best.squeeze(1)


def _error(groups: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    s = scale.float().unsqueeze(-1)
    deq = quant_ref.quantize(groups, s, precision).float() * s
    return (deq - groups).pow(2).sum(-1)


def quantize(w: torch.Tensor, scale: torch.Tensor, precision: str, group_size: Optional[int] = None) -> torch.Tensor:
    """int8 codes [N, K] of ``w`` with the stored ``scale`` (from :func:`scales`)."""
    check(precision, group_size)
    n, k = w.shape
    if precision == "int8":
        return quant_ref.quantize(w.float(), scale.float().reshape(n, 1), "int8")
    codes = quant_ref.quantize(_groups(w, group_size), scale.float().unsqueeze(-1), "int4")
    return codes.reshape(n, -1)[:, :k]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, precision: str, group_size: Optional[int] = None) -> torch.Tensor:
    """fp32 [N, K] weight from int8 codes and the stored scales."""
    check(precision, group_size)
    n, k = codes.shape
    if precision == "int8":
        return codes.float() * scale.float().reshape(n, 1)
    per_col = scale.float().repeat_interleave(group_size, dim=1)[:, :k]
    return codes.float() * per_col


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [N, K] -> uint8 [N, ceil(K / 2)] (even k low nibble, odd k high)."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"pack_int4 takes a 2-D int8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nib.shape[1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    # row-major whatever the codes' layout: the kernels read a row's bytes (and INT4 words)
    # along K (a transposed weight, GPT-2's Conv1D [K, N], gave strides (1, N) here)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(k / 2)] -> int8 codes [N, k] (the inverse of :func:`pack_int4`)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: expected uint8 [N, {(k + 1) // 2}], got {packed.dtype} {tuple(packed.shape)}")
    lo, hi = (packed & 0xF).to(torch.int16), (packed >> 4).to(torch.int16)
    both = torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)[:, :k]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def weight_only_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, precision: str,
                   group_size: Optional[int] = None, bias: Optional[torch.Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reference W8A16 / W4A16 GEMM: x [M, K] (16-bit or fp32) times the dequantized [N, K]
    weight; ``codes`` int8 [N, K] (unpack INT4 first)."""
    w = dequantize(codes, scale, precision, group_size).to(x.dtype).float()
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def grouped_weight_only_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor,
                           precision: str, group_size: Optional[int] = None,
                           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reference grouped W8A16 / W4A16 GEMM: x [M, K] with rows sorted by expert, ``codes`` int8
    [E * N, K] (unpack INT4 first), ``offs`` [E] cumulative row ends -> [M, N]; each expert's
    rows through :func:`weight_only_mm` with its [N, K] slice, rows past ``offs[-1]`` 0."""
    experts = offs.shape[0]
    if experts == 0 or codes.shape[0] % experts:
        raise ValueError(f"grouped_weight_only_mm: {codes.shape[0]} weight rows do not split into {experts} experts")
    n = codes.shape[0] // experts
    # each row's expert from offs on the device: no host sync, so a CUDA graph can hold it
    rows = torch.arange(x.shape[0], device=x.device)
    expert = torch.searchsorted(offs.to(torch.int64).contiguous(), rows, right=True)
    out = torch.zeros(x.shape[0], n, dtype=out_dtype or x.dtype, device=x.device)
    for e in range(experts):
        part = slice(e * n, (e + 1) * n)
        y = weight_only_mm(x, codes[part], scale[part], precision, group_size, out_dtype=out_dtype)
        out = torch.where((expert == e)[:, None], y, out)
    return out


def quantize_weight(w: torch.Tensor, precision: str, group_size: Optional[int] = None,
                    method: str = "minmax") -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes — packed uint8 for int4, int8 for int8 — , fp16 scales) of a [N, K] weight."""
    s = scales(w, precision, group_size, method)
    codes = quantize(w, s, precision, group_size)
    return (pack_int4(codes) if precision == "int4" else codes), s


__all__ = ["GROUP_SIZES", "CLIP_RATIOS", "check", "scales", "quantize", "dequantize", "pack_int4", "unpack_int4",
           "weight_only_mm", "grouped_weight_only_mm", "quantize_weight"]
