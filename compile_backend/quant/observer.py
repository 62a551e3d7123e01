"""One pass over calibration data per layer: amax, counts and a histogram of |x|.

A :class:`HistogramObserver` keeps ``num_bins`` equal bins over ``[0, range]``. The range starts
at the first batch's finite amax (full resolution for it) and, when a later batch exceeds it,
doubles as often as needed; each doubling merges neighbouring bin pairs, which is exact because
the new bin edges are a subset of the old ones. So the bin count never grows and one pass serves
every calibrator (calibrators.py).

* NaN is an error naming the layer and the batch: a NaN activation has no meaningful scale.
* inf is counted (``inf_count``, reported) and left out of the histogram and of ``amax``: the
  calibrator picks a finite amax and the quantizer saturates inf to ±qmax.
* Values observed while no range exists yet (every |x| so far at or below quant_ref.TINY_AMAX,
  which quantizes to zero) count in the first bin.

* A bf16 or fp16 activation's |x| sits on its dtype's grid: near the top of the range bf16 has
  one value every 8 bins (2048 bins), fp16 one every 1-2. The calibrators model a smooth
  distribution (entropy flattens point masses to their neighbourhood's level, and a grid with
  empty bins between its values looks like nothing but point masses: in bf16 it clipped an RMS
  norm's output at a quarter of its range, 7 dB SQNR against 38 in fp32). So each value of such a
  dtype is spread over its own rounding interval, +-half a unit in the last place, by a
  deterministic low-discrepancy offset per element (no RNG): the histogram of the float values
  that round to it. Exact zeros stay zeros; ``amax`` is the real one.

The histogram is computed on the tensor's device in fp32 (chunked, so a large activation needs
no large temporary), the counts are kept in int64 there; one host sync per batch reads the amax.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..kernels.quant_ref import TINY_AMAX

#: elements per chunk: bounds the temporaries (index tensor) of one histogram step
_CHUNK = 1 << 22

#: significand bits (the implicit one included) of the dtypes whose values are spread over their
#: rounding interval before binning (module docstring)
_GRID_BITS = {torch.bfloat16: 8, torch.float16: 11}

#: Knuth's multiplicative hash, 2^32 / golden ratio: element i's offset is frac(i * this / 2^32)
_GOLDEN_32 = 2654435769


class HistogramObserver:
    """Statistics of one layer's activation over the calibration batches."""

    def __init__(self, name: str, num_bins: int = 2048):
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins!r}")
        self.name = name
        self.num_bins = num_bins
        self.count = 0          # values observed (finite and inf)
        self.inf_count = 0      # of those, +-inf (clipped by the calibrator)
        self.batches = 0        # observe() calls that brought data
        self.range = 0.0        # histogram upper edge; 0 until a value above TINY_AMAX arrived
        self._amax = 0.0        # largest finite |x|
        self._counts: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- collecting
    def observe(self, x: torch.Tensor, batch: Optional[int] = None) -> None:
        """Add ``x`` (any float dtype, any device). ``batch`` names the batch in a NaN error
        (default: this observer's own count of batches)."""
        x = x.detach()
        if x.numel() == 0:
            return
        flat = x.reshape(-1)
        batch_amax, infs = self._scan(flat, self.batches if batch is None else batch)
        device = flat.device
        if self._counts is None:
            self._counts = torch.zeros(self.num_bins, dtype=torch.int64, device=device)
        elif self._counts.device != device:
            self._counts = self._counts.to(device)
        if batch_amax > TINY_AMAX:
            if self.range == 0.0:
                self.range = batch_amax
            elif batch_amax > self.range:
                self._grow(batch_amax)
        finite = flat.numel() - infs
        if self.range == 0.0:
            self._counts[0] += finite
        else:
            per_unit = self.num_bins / self.range
            bits = _GRID_BITS.get(flat.dtype)
            for start in range(0, flat.numel(), _CHUNK):
                a = flat[start:start + _CHUNK].float().abs()
                a = a[torch.isfinite(a)] if infs else a
                if bits is not None:
                    a = spread_over_rounding_interval(a, bits)
                index = (a * per_unit).long().clamp_(0, self.num_bins - 1)
                self._counts += torch.bincount(index, minlength=self.num_bins)
        self._amax = max(self._amax, batch_amax)
        self.count += flat.numel()
        self.inf_count += infs
        self.batches += 1

    def _scan(self, flat: torch.Tensor, batch: int) -> Tuple[float, int]:
        """(finite amax, inf count) of a batch; raises on NaN before any state changes."""
        amax, infs = 0.0, 0
        for start in range(0, flat.numel(), _CHUNK):
            a = flat[start:start + _CHUNK].float().abs()
            if bool(torch.isnan(a).any()):
                raise ValueError(f"layer {self.name!r} got NaN in calibration batch {batch}: calibration "
                                 f"data must be finite (check the inputs and the model in float)")
            inf = torch.isinf(a)
            n_inf = int(inf.sum())
            if n_inf:
                a = a.masked_fill(inf, 0.0)
            amax = max(amax, float(a.max()))
            infs += n_inf
        return amax, infs

    def _grow(self, amax: float) -> None:
        """Double the range until it covers ``amax``, merging bins (exact: edges are shared)."""
        doublings = math.ceil(math.log2(amax / self.range))
        while self.range * 2.0 ** doublings < amax:  # log2 rounding
            doublings += 1
        factor = 2 ** doublings
        merged = torch.zeros_like(self._counts)
        if factor >= self.num_bins:
            merged[0] = self._counts.sum()
        else:
            kept = self.num_bins // factor
            merged[:kept] = self._counts.reshape(kept, factor).sum(dim=1)
        self._counts = merged
        self.range *= factor

    def merge(self, other: "HistogramObserver") -> None:
        """Add another observer's statistics (the same layer seen elsewhere, e.g. another process)."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge observers of {other.num_bins} and {self.num_bins} bins")
        if other._counts is None:
            return
        counts = other._counts.to(self._counts.device) if self._counts is not None else other._counts.clone()
        if self._counts is None:
            self._counts, self.range = counts, other.range
        else:
            if other.range > self.range:
                if self.range == 0.0:
                    self.range = other.range
                else:
                    self._grow(other.range)
            if other.range > 0.0 and other.range < self.range:
                counts = _rebin(counts, other.range, self.range)
            self._counts = self._counts + counts
        self._amax = max(self._amax, other._amax)
        self.count += other.count
        self.inf_count += other.inf_count
        self.batches += other.batches

    # ---------------------------------------------------------------- reading
    @property
    def empty(self) -> bool:
        return self.count == 0

    @property
    def amax(self) -> float:
        """The largest finite |x| seen."""
        self._require_data()
        return self._amax

    def histogram(self) -> Tuple[torch.Tensor, float]:
        """(counts as fp64 on the CPU [num_bins], range): bin i covers [i, i+1) * range / num_bins."""
        self._require_data()
        return self._counts.to("cpu", torch.float64), self.range

    def _require_data(self) -> None:
        if self.empty:
            raise ValueError(f"layer {self.name!r} saw no calibration data: the calibration set is empty "
                             f"or the layer never ran on it")

    def __repr__(self) -> str:
        return (f"HistogramObserver({self.name!r}, count={self.count}, amax={self._amax:g}, "
                f"inf_count={self.inf_count}, range={self.range:g})")


class ChannelAbsMax:
    """SmoothQuant's statistic: the largest finite |x| of each channel (the last dim) over the
    calibration batches. NaN is an error naming the layer and the batch, as for the histogram;
    inf is left out (the smoothed value saturates like any other)."""

    def __init__(self, name: str):
        self.name = name
        self.batches = 0
        self.count = 0          # values observed (finite and inf)
        self.inf_count = 0
        self._amax: Optional[torch.Tensor] = None
        self._first_batch: Optional[int] = None
        self._later: Optional[torch.Tensor] = None  # the maxima of every batch but the first

    def observe(self, x: torch.Tensor, batch: Optional[int] = None) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        a = x.reshape(-1, x.shape[-1]).float().abs()
        if bool(torch.isnan(a).any()):
            raise ValueError(f"layer {self.name!r} got NaN in calibration batch "
                             f"{self.batches if batch is None else batch}: calibration data must be finite "
                             f"(check the inputs and the model in float)")
        inf = torch.isinf(a)
        self.inf_count += int(inf.sum())
        self.count += a.numel()
        a = a.masked_fill(inf, 0.0).amax(dim=0)
        if self._amax is None:
            self._amax = a
        elif self._amax.shape != a.shape:
            raise ValueError(f"layer {self.name!r}: {a.shape[0]} input channels, earlier batches had "
                             f"{self._amax.shape[0]}")
        else:
            self._amax = torch.maximum(self._amax, a.to(self._amax.device))
        index = self.batches if batch is None else batch
        if self._first_batch is None:
            self._first_batch = index
        elif index != self._first_batch:
            self._later = a if self._later is None else torch.maximum(self._later, a.to(self._later.device))
        self.batches += 1

    @property
    def held_out_amax(self) -> Optional[torch.Tensor]:
        """fp32 [channels] on the CPU: the maxima of every batch but the first (None with one
        batch): ranges the first batch did not set, to judge smoothing on that batch as on data
        the calibration never saw (``smoothquant="auto"``)."""
        return None if self._later is None else self._later.cpu()

    @property
    def amax(self) -> torch.Tensor:
        """fp32 [channels] on the CPU."""
        if self._amax is None:
            raise ValueError(f"layer {self.name!r} saw no calibration data: the calibration set is empty "
                             f"or the layer never ran on it")
        return self._amax.cpu()


def spread_over_rounding_interval(a: torch.Tensor, bits: int) -> torch.Tensor:
    """|x| values of a dtype with ``bits`` significand bits, each moved by a deterministic offset
    in [-1/2, 1/2) of its unit in the last place (frac(i * golden ratio), i = its position):
    the values that round to one grid point come out evenly over its interval. Zeros stay zero;
    nothing goes below zero."""
    _, exponent = torch.frexp(a)                       # a = m * 2**exponent, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(a), exponent - bits)
    index = torch.arange(a.numel(), device=a.device, dtype=torch.int64)
    # the hash's top 24 bits: exact in fp32 (no fp64, which some devices lack)
    offset = (((index * _GOLDEN_32) & 0xFFFFFFFF) >> 8).to(torch.float32).div_(2.0 ** 24).sub_(0.5).to(a.dtype)
    return torch.where(a > 0, (a + offset * ulp).clamp_(min=0.0), a)


def _rebin(counts: torch.Tensor, old_range: float, new_range: float) -> torch.Tensor:
    """Counts over [0, old_range] re-binned onto [0, new_range] (new_range = old_range * 2^k, or
    old_range was never grown: then each old bin goes to the new bin holding its lower edge)."""
    n = counts.numel()
    ratio = new_range / old_range
    factor = round(ratio)
    if factor >= 1 and factor == ratio and factor & (factor - 1) == 0:
        if factor >= n:
            out = torch.zeros_like(counts)
            out[0] = counts.sum()
            return out
        out = torch.zeros_like(counts)
        out[: n // factor] = counts.reshape(n // factor, factor).sum(dim=1)
        return out
    # ranges from two different first batches: place each old bin by its lower edge (approximate
    # by at most one new bin width, as any histogram merge of unaligned bins is)
    lower = torch.arange(n, dtype=torch.float64, device=counts.device) * (old_range / n)
    index = (lower * (n / new_range)).long().clamp_(0, n - 1)
    return torch.zeros_like(counts).index_add_(0, index, counts)


__all__ = ["HistogramObserver", "ChannelAbsMax", "spread_over_rounding_interval"]
