"""Whether a layer's 8-bit GEMM (or convolution) is faster than its float one on this GPU, measured.

With ``options["quant_layers"] = "faster"`` (the default) an INT8/FP8 engine quantizes a linear
layer only where that pays: TensorRT's precision flags are a permission, and so is ours. On the
H100/H200 cuBLAS's INT8 GEMM is slower than its fp16 GEMM at BERT's shapes, and FP8 with
per-channel weight scales (rowwise) at some; a layer quantized there made the whole engine slower
than the FP16 one (session 9, run 1: BERT INT8 1.29 ms, FP16 1.04).

:class:`GemmSpeed` times, per distinct (M, N, K, dtype, bias), the layer's ``scaled_mm`` alone
(the vendor GEMMs and the template's heuristic config, through the tuner and its timing cache:
a warm process measures nothing) beside the float linear the tuner times as its reference. The
quantize pass asks it (``QuantRequest.speed``); the report gives both times for a layer left float.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional, Tuple

import torch

from ..kernels import quant_ref

Key = Tuple[int, int, int, torch.dtype, bool]
log = logging.getLogger("compile_backend")


class GemmSpeed:
    """``speed(m, n, k, dtype, bias) -> (8-bit ms, float ms)`` or None when not measurable."""

    def __init__(self, ctx, precision: str, per_channel: bool, dynamic: bool):
        self.ctx, self.precision = ctx, precision  # ctx: a KernelContext on the CUDA device
        self.per_channel, self.dynamic = per_channel, dynamic
        self.seen: Dict[Key, Optional[Tuple[float, float]]] = {}

    def __call__(self, m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> Optional[Tuple[float, float]]:
        key = (m, n, k, dtype, bias)
        if key not in self.seen:
            try:
                self.seen[key] = self._measure(m, n, k, dtype, bias)
            except Exception as exc:  # noqa: BLE001  (a failed measurement never fails the compile)
                log.warning("compile_backend: could not time the %s GEMM %dx%dx%d against float (%s: %s); "
                            "the layer is quantized", self.precision, m, n, k, type(exc).__name__, exc)
                self.seen[key] = None
        return self.seen[key]

    def _measure(self, m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> Optional[Tuple[float, float]]:
        from ..kernels.autotune import tuner_for
        from ..kernels.gemm_config import heuristic_config
        from ..kernels.qgemm import eight_bit_configs, scaled_mm_candidates
        from ..kernels.template import traced_group

        dev, storage = self.ctx.device, quant_ref.STORAGE[self.precision]
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, generator=gen)
        w = torch.randn(n, k, device=dev, generator=gen) / k ** 0.5
        xs = quant_ref.row_scale(x, self.precision) if self.dynamic else \
            quant_ref.scale_from_amax(x.abs().amax(), self.precision)
        wq, ws = quant_ref.quantize_weight(w, self.precision, self.per_channel)
        b = torch.randn(n, device=dev, generator=gen).to(dtype) if bias else None
        inputs = (quant_ref.quantize(x, xs, self.precision).to(storage), xs, wq, ws, b)
        group = traced_group(lambda xq, xs, wq, ws, b: torch.ops.compile_backend.scaled_mm(xq, xs, wq, ws, b, dtype),
                             inputs, "gemm", "scaled_mm")
        # the vendor GEMMs and one template config: cheap to compile, and where they lose to the
        # float GEMM a tuned template config rarely wins (H200, session 5: INT8 Triton at best
        # fp16's speed at BERT's shapes); the layer's own build then tunes every config
        configs = eight_bit_configs([heuristic_config(m, n, k, 1, storage)])
        tuning = scaled_mm_candidates(group, self.ctx, configs=configs)
        # a key of its own: the layer's real group (same shapes, no chain) tunes every config
        key = dataclasses.replace(tuning.key, extra=tuning.key.extra + " | layer speed probe")
        choice = tuner_for(self.ctx).choose(key, tuning.candidates, tuning.make_inputs)
        timed = choice.timings_ms or {}
        floats = [timed[c.name] for c in tuning.candidates if c.reference and c.name in timed]
        quants = [timed[c.name] for c in tuning.candidates if not c.reference and c.name in timed]
        if not floats or not quants:
            return None
        return min(quants), floats[0]


class ConvSpeed(GemmSpeed):
    """The same for a 2-D convolution: ``speed.conv(x_shape, w_shape, stride, padding, dilation,
    groups, dtype, bias)``, operands channels-last as the engine runs them on CUDA."""

    def conv(self, x_shape, w_shape, stride, padding, dilation, groups: int, dtype: torch.dtype,
             bias: bool) -> Optional[Tuple[float, float]]:
        key = ("conv", tuple(x_shape), tuple(w_shape), tuple(stride), tuple(padding), tuple(dilation), groups, dtype, bias)
        if key not in self.seen:
            try:
                self.seen[key] = self._measure_conv(x_shape, w_shape, stride, padding, dilation, groups, dtype, bias)
            except Exception as exc:  # noqa: BLE001  (a failed measurement never fails the compile)
                log.warning("compile_backend: could not time the %s convolution %s * %s against float (%s: %s); "
                            "the layer is quantized", self.precision, tuple(x_shape), tuple(w_shape),
                            type(exc).__name__, exc)
                self.seen[key] = None
        return self.seen[key]

    def _measure_conv(self, x_shape, w_shape, stride, padding, dilation, groups, dtype, bias):
        from ..kernels.autotune import tuner_for
        from ..kernels.conv import conv_heuristic
        from ..kernels.qconv import scaled_conv_candidates
        from ..kernels.qgemm import eight_bit_configs
        from ..kernels.template import device_limits, traced_group

        dev, storage, cl = self.ctx.device, quant_ref.STORAGE[self.precision], torch.channels_last
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(tuple(x_shape), device=dev, generator=gen)
        w = torch.randn(tuple(w_shape), device=dev, generator=gen) / max(1, w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5
        xs = quant_ref.scale_from_amax(x.abs().amax(), self.precision)
        wq, ws = quant_ref.quantize_weight(w, self.precision, self.per_channel)
        b = torch.randn(w_shape[0], device=dev, generator=gen).to(dtype) if bias else None
        inputs = (quant_ref.quantize(x, xs, self.precision).to(storage).contiguous(memory_format=cl), xs,
                  wq.contiguous(memory_format=cl), ws, b)
        geometry = (list(stride), list(padding), list(dilation), groups)
        group = traced_group(lambda xq, xs, wq, ws, b: torch.ops.compile_backend.scaled_conv(xq, xs, wq, ws, b, *geometry, dtype),
                             inputs, "conv", "scaled_conv")
        out = group.gm.graph.find_nodes(op="output")[0].args[0][0].meta["val"]
        m = out.shape[0] * out.shape[2] * out.shape[3]
        cg = x_shape[1] // groups
        configs = eight_bit_configs([conv_heuristic(m, w_shape[0] // groups, cg, storage, False, *device_limits(dev))])
        tuning = scaled_conv_candidates(group, self.ctx, vendor=False, configs=configs)
        key = dataclasses.replace(tuning.key, extra=tuning.key.extra + " | layer speed probe")
        choice = tuner_for(self.ctx).choose(key, tuning.candidates, tuning.make_inputs)
        timed = choice.timings_ms or {}
        floats = [timed[c.name] for c in tuning.candidates if c.reference and c.name in timed]
        quants = [timed[c.name] for c in tuning.candidates if not c.reference and c.name in timed]
        return (min(quants), floats[0]) if floats and quants else None


__all__ = ["GemmSpeed", "ConvSpeed"]
