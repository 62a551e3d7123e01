"""Activation amax from an observer's histogram: max, percentile, entropy (KL) and MSE.

Every calibrator returns a float in [0, observer.amax]: 0 for all-zero data (scale 0, exact
zeros), the observed finite max when it is at or below quant_ref.TINY_AMAX (it quantizes to zero
anyway), otherwise a clipping threshold. The candidates of the searching calibrators are bin
edges ``i * range / num_bins``; they are evaluated with the reference quantizer
(kernels/quant_ref), so "the quantized distribution" is the one the engine computes.

* ``max``: the largest finite |x|. No clipping; right when outliers matter (FP8's default).
* ``percentile``: the upper edge of the bin where the cumulative count reaches ``p`` percent.
* ``entropy``: TensorRT's KL-divergence calibration. For each candidate of i bins (i >= 128):
  P = the first i bins with everything beyond added to the last (clipping); Q = the first i
  bins grouped by the quantization level their centre rounds to at scale ``candidate / qmax``,
  each group's total spread evenly over its non-zero bins; amax = the candidate minimising
  KL(P || Q). For INT8 the groups are TensorRT's 128 merged bins (rounding to nearest instead
  of TensorRT's floor); for FP8 they are the e4m3 levels, which are narrow near zero and wide
  near the top, so the same search weighs FP8's own rounding error.
* ``mse``: the candidate minimising the histogram's expected squared error
  ``sum(count * (centre - fake_quantize(centre))^2)``, clipped values included.

Searches evaluate all candidates at once in blocks (a [candidates, bins] matrix), so a layer
takes about 0.1 s on a CPU core; at most ~512 candidates are tried (a stride above that:
an amax resolution of 4 bins, 0.2% of the range, at the default 2048 bins).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..kernels import quant_ref
from .config import CALIBRATORS, QuantConfig
from .observer import HistogramObserver

#: TensorRT's smallest entropy candidate: as many bins as magnitude levels (INT8 0..127: 128;
#: FP8 keeps 128; INT4 0..7: 8)
ENTROPY_START_BINS = {"int8": 128, "fp8": 128, "int4": 8}
_MAX_CANDIDATES = 512
_BLOCK_ELEMENTS = 1 << 22


def max_amax(observer: HistogramObserver) -> float:
    return observer.amax


def percentile_amax(observer: HistogramObserver, percentile: float) -> float:
    """|x| at ``percentile`` (0, 100] of the finite values (upper edge of its bin)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    amax = observer.amax
    if amax <= quant_ref.TINY_AMAX or percentile == 100:
        return amax
    counts, width = _used_histogram(observer)
    cdf = torch.cumsum(counts, 0)
    target = cdf[-1] * (percentile / 100.0)
    i = int(torch.searchsorted(cdf, target))
    return _clip(min(i + 1, counts.numel()) * width, amax)


def entropy_amax(observer: HistogramObserver, precision: str) -> float:
    """TensorRT-style KL-divergence threshold (see the module docstring)."""
    quant_ref.check_precision(precision)
    amax = observer.amax
    if amax <= quant_ref.TINY_AMAX:
        return amax
    counts, width = _used_histogram(observer)
    bins, start = counts.numel(), ENTROPY_START_BINS[precision]
    if bins <= start:
        return amax  # the data spans fewer bins than there are levels: nothing to trade
    counts = _without_point_masses(counts)
    best_i = _best_candidate(_candidates(start, bins), bins,
                             lambda block: _kl_divergence(counts, block, width, precision))
    return _clip(best_i * width, amax)


def mse_amax(observer: HistogramObserver, precision: str) -> float:
    """The candidate amax with the smallest expected quantization MSE over the histogram."""
    quant_ref.check_precision(precision)
    amax = observer.amax
    if amax <= quant_ref.TINY_AMAX:
        return amax
    counts, width = _used_histogram(observer)
    bins = counts.numel()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * width

    def squared_error(block: torch.Tensor) -> torch.Tensor:
        scale = quant_ref.scale_from_amax(block.double() * width, precision).reshape(-1, 1)
        approx = quant_ref.fake_quantize(centres.float().reshape(1, -1), scale, precision).double()
        return ((approx - centres) ** 2 * counts).sum(dim=1)

    return _clip(_best_candidate(_candidates(1, bins), bins, squared_error) * width, amax)


def compute_amax(observer: HistogramObserver, config: QuantConfig) -> float:
    """The activation amax of one layer under ``config.calibrator``."""
    method = config.calibrator
    if method == "max":
        return max_amax(observer)
    if method == "percentile":
        return percentile_amax(observer, config.percentile)
    if method == "entropy":
        return entropy_amax(observer, config.precision)
    if method == "mse":
        return mse_amax(observer, config.precision)
    raise ValueError(f"calibrator must be one of {', '.join(CALIBRATORS)}, got {method!r}")


# ------------------------------------------------------------------------------------- helpers
def _used_histogram(observer: HistogramObserver) -> Tuple[torch.Tensor, float]:
    """The bins up to the one holding the finite amax (candidates beyond it are pointless), and
    the bin width."""
    counts, rng = observer.histogram()
    width = rng / counts.numel()
    used = min(counts.numel(), max(1, int(-(-observer.amax // width))))
    return counts[:used], width


def _candidates(start: int, bins: int) -> torch.Tensor:
    """Candidate bin counts i in [start, bins], at most ~_MAX_CANDIDATES, always including bins."""
    start = min(start, bins)
    stride = max(1, -(-(bins - start) // _MAX_CANDIDATES))
    cands = torch.arange(start, bins + 1, stride, dtype=torch.int64)
    if int(cands[-1]) != bins:
        cands = torch.cat([cands, torch.tensor([bins])])
    return cands


def _best_candidate(candidates: torch.Tensor, bins: int, score) -> int:
    """The candidate bin count with the lowest ``score`` (evaluated a block of candidates at a time)."""
    best_score, best_i = float("inf"), bins
    for block in _blocks(candidates, bins):
        values = score(block)
        j = int(torch.argmin(values))
        if float(values[j]) < best_score:
            best_score, best_i = float(values[j]), int(block[j])
    return best_i


def _blocks(candidates: torch.Tensor, bins: int):
    rows = max(1, _BLOCK_ELEMENTS // bins)
    return candidates.split(rows)


def _kl_divergence(counts: torch.Tensor, cands: torch.Tensor, width: float, precision: str) -> torch.Tensor:
    """KL(P || Q) for each candidate bin count in ``cands`` ([C] -> [C], inf where Q misses P)."""
    bins = counts.numel()
    j = torch.arange(bins)
    inside = j.reshape(1, -1) < cands.reshape(-1, 1)                       # [C, B]
    hist = torch.where(inside, counts.reshape(1, -1), torch.zeros(()).double())
    outliers = counts.sum() - hist.sum(dim=1)                              # beyond each candidate
    p = hist.clone()
    p[torch.arange(cands.numel()), cands - 1] += outliers                  # clipped into the top bin
    # level of each bin centre at the candidate's scale: INT8 0..127, FP8 the e4m3 code 0..126
    scale = quant_ref.scale_from_amax(cands.double() * width, precision).reshape(-1, 1)
    centres = ((j.double() + 0.5) * width).float().reshape(1, -1)
    q_codes = quant_ref.quantize(centres.expand(cands.numel(), -1), scale, precision)
    levels = (q_codes.view(torch.uint8) if precision == "fp8" else q_codes).long().clamp_(0, 127)
    levels = torch.where(inside, levels, torch.zeros_like(levels))
    nonzero = (p != 0).double()
    group_total = torch.zeros(cands.numel(), 128, dtype=torch.float64).scatter_add_(1, levels, hist)
    group_nonzero = torch.zeros(cands.numel(), 128, dtype=torch.float64).scatter_add_(1, levels, nonzero)
    spread = group_total / group_nonzero.clamp(min=1.0)
    q = torch.gather(spread, 1, levels) * nonzero
    p = p / p.sum(dim=1, keepdim=True)
    q_sum = q.sum(dim=1, keepdim=True)
    q = q / torch.where(q_sum > 0, q_sum, torch.ones_like(q_sum))
    ratio = torch.where(p > 0, p / q, torch.ones_like(p))                  # inf where q = 0 < p
    return (p * torch.log(ratio)).sum(dim=1)


def _without_point_masses(counts: torch.Tensor, window: int = 9, factor: float = 4.0) -> torch.Tensor:
    """The histogram with its point masses flattened to their neighbourhood's level.

    KL calibration models a smooth distribution: Q spreads each merged group's total evenly over
    its bins, so a point mass (a value repeated many times: the exact zeros after a ReLU, a
    constant image background through a conv) costs as if it were smeared, and the search
    clips the real tail instead. Measured on the MNIST CNN: 58% zeros plus ~2% spikes per
    channel made entropy clip 16% of a conv's input (4.5 dB SQNR, -1.8 points top-1). A point
    mass's own rounding error is the same at any threshold, so it carries no information for
    the choice: NVIDIA's reference calibrator gives the zero bin its neighbour's count; this
    does that for every bin above ``factor`` times its running median (and the zero bin)."""
    counts = counts.clone()
    padded = torch.nn.functional.pad(counts.reshape(1, 1, -1), (window // 2, window // 2), mode="replicate")
    median = padded.unfold(2, window, 1).median(dim=-1).values.reshape(-1)
    spikes = counts > factor * median.clamp(min=1.0)
    counts[spikes] = median[spikes]
    if counts.numel() > 1:
        counts[0] = min(float(counts[0]), float(counts[1]))
    return counts


def _clip(candidate: float, amax: float) -> float:
    return float(min(candidate, amax))


__all__ = ["max_amax", "percentile_amax", "entropy_amax", "mse_amax", "compute_amax", "ENTROPY_START_BINS"]
