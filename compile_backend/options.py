"""Backend options: one frozen dataclass, validated at construction.

Every option a user can pass through ``torch.compile(..., options={...})`` or
``compile_backend.compile(model, **options)`` is a field here. Unknown names and bad values
raise ``ValueError`` naming the option and the valid choices, so a typo such as
``precison="fp16"`` is never silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Tuple, Union

from .fields import check_names
from .profiles import Profile, parse_profiles

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
FALLBACKS = ("eager", "error")
AUTOTUNE_MODES = ("off", "fast", "max")
CUDA_GRAPH_MODES = ("auto", "on", "off")
QUANT_LAYER_MODES = ("faster", "all")
FP8_ACCUMULATIONS = ("fp32", "fast")
QUANT_GELU_MODES = ("tanh", "exact")
QUANT_RESIDUAL_MODES = ("float", "quantized")

#: documented environment variable for the cache location (see README)
CACHE_DIR_ENV = "COMPILE_BACKEND_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class Options:
    """What the backend may do with a model.

    precision: lowest float precision GEMM/conv/attention may run in. ``fp32`` keeps eager
        numerics, ``tf32`` allows TF32 tensor cores for fp32 matmuls, ``fp16``/``bf16`` run
        fp32 GEMMs, convolutions and attention in that dtype (outputs keep the model's dtype).
    fallback: what happens when compiling a graph fails: ``eager`` warns and runs the graph
        eagerly, ``error`` raises.
    cache_dir: where compiled engines and tuning results live (None: the default location).
    autotune: ``off`` (heuristic configs), ``fast`` (small pruned set), ``max`` (full set) or a
        number of seconds: a tuning budget for the whole graph.
    cuda_graphs: ``auto`` records CUDA graphs for static-shape graphs on CUDA, training included.
    validate: check every generated kernel once against ATen on the real inputs and fall back
        to ATen (with a report entry) when it disagrees.
    freeze: in inference, treat parameters and buffers as constants (fold BatchNorm, merged
        Q/K/V weights, casts once; refit when they change in place). ``False`` keeps them live
        inputs, read at every call: for code that writes weights through ``.data`` without
        calling ``compile_backend.refit(model)`` (see compile_backend.weights).
    max_engines: engines kept per graph for distinct input shapes before falling back to ATen.
    cache_max_bytes: size cap of the engine cache (all architectures); least recently used
        entries are evicted past it. Not part of the cache key.
    profiles: declared dynamic dimensions, TensorRT-style: a list of
        ``{"input": 0, "dim": 0, "min": 1, "opt": 8, "max": 64}`` (or :class:`Profile`). A call
        whose size lies in [min, max] runs the engine of its size bucket (min, opt, max and the
        powers of two between), its inputs zero-padded and outputs sliced back, once a check
        showed the outputs do not depend on the padded rows (else one warning, one engine per
        shape). Pass ``dynamic=True`` to torch.compile or ``torch._dynamo.mark_dynamic(x, dim,
        min=..., max=...)`` so Dynamo gives one graph for the range. See compile_backend.profiles.
    speed_check: on CUDA inference, time the built engine on its first call against itself
        without its CUDA graph and against the plain ATen graph, and run the fastest for that
        input shape (the report gives the times; see compile_backend.speed_check).
    quant: INT8/FP8 quantization of GEMMs and convolutions (inference): a
        ``quant.Calibration`` from ``quant.calibrate`` (static activation scales), or a
        ``quant.QuantConfig`` with ``activations="dynamic"`` or ``activations=None`` (weight-only
        W8A16/W4A16; no calibration either). See quant/README.md.
    pdl: launch the generated pointwise, reduction, GEMV and flash-decoding kernels with
        Programmatic Dependent Launch on Hopper and later GPUs: each may start launching while
        the kernel before it runs, and waits for it before touching memory (kernels/pdl.py; for
        launch-bound work such as an LLM decode step: W4A16 decode -12%, H100). Off by default:
        BERT-base b16's FP16 engine ran 8% slower with it (H100, session 25); ignored where the
        GPU or Triton lacks it.
    quant_layers: which selected layers an INT8/FP8 (W8A8) engine quantizes on CUDA: ``faster``
        (default) only those whose 8-bit GEMM or convolution, measured, plus the estimated cost of
        writing the layer's input in 8 bits, beats the float one at the layer's shape on this GPU
        (TensorRT's precision as a permission, not an order: the rest stay float, the report gives
        the times); ``all`` every selected layer.
    fp8_accumulation: how FP8 GEMMs and convolutions sum their products. ``fp32`` (default): the
        tensor cores' partial sums are added into an fp32 accumulator every K tile (Triton) or
        as cuBLAS's default mode does. ``fast``: the Hopper tensor cores' own accumulator (about
        14 mantissa bits) holds the whole sum, as ``torch._scaled_mm(use_fast_accum=True)`` and
        torchao's FP8 inference do: no second accumulator, so larger tiles fit in registers and
        the GEMM runs faster; the error it adds is below FP8's quantization error (measured in
        quant/README.md). Ignored by INT8 (exact int32 sums) and on GPUs without it.
    quant_gelu: how an INT8/FP8 engine computes a GELU (or tanh) whose output only an 8-bit
        quantize reads (BERT's FFN1 output, quantized for FFN2). ``tanh`` (default): the tanh
        form of GELU on the GPU's tanh unit, ~6 instructions an element where erf takes ~25
        (at most 4.8e-4 from erf GELU, far below the quantize's rounding: the quantized
        activation's SQNR is unchanged; quant/README.md). ``exact``: erf, as in the model.
    quant_residuals: what a residual add reads of a value a static-scale INT8/FP8 layer also
        reads quantized (a ResNet block's input: its first convolution's and the skip
        connection's). ``float`` (default): the float value, so its producer writes it twice,
        float and 8-bit. ``quantized``: the 8-bit codes, dequantized in the add's kernel, as
        TensorRT's INT8 residual adds: where every other reader is quantized too the float copy
        is never written (half the bytes of the residual stream), and the skip connection then
        carries the quantization error. Off by default: measured on ResNet-50 b32 (H100) it
        saved 0.08 ms of an all-8-bit engine, but made the ``faster`` one slower (quant/README.md).
    compile_processes: worker processes that compile the tuner's Triton candidates on CUDA
        (``kernels/compile_pool.py``: more compiles at once than the tuner's threads, which
        share the GIL; ResNet-50 b32's INT8 first call 26.2 -> 20.8 s on a 16-core H100 host).
        None (default): one a core but one, at most 16, none on 2 cores or fewer; 0: every
        compile in this process. The workers live until the process exits; each is a Python
        process with Triton and torch imported (97 MB resident on the CPU test machine).
    """

    precision: str = "fp32"
    fallback: str = "eager"
    cache_dir: Optional[str] = None
    autotune: Union[str, float] = "fast"
    cuda_graphs: str = "auto"
    validate: bool = True
    freeze: bool = True
    max_engines: int = 8
    cache_max_bytes: int = 2 * 1024 ** 3
    profiles: Tuple[Profile, ...] = ()
    speed_check: bool = True
    quant: Any = None
    quant_layers: str = "faster"
    pdl: bool = False
    fp8_accumulation: str = "fp32"
    quant_gelu: str = "tanh"
    quant_residuals: str = "float"
    compile_processes: Optional[int] = None

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("quant_layers", self.quant_layers, QUANT_LAYER_MODES)
        _choice("fp8_accumulation", self.fp8_accumulation, FP8_ACCUMULATIONS)
        _choice("quant_gelu", self.quant_gelu, QUANT_GELU_MODES)
        _choice("quant_residuals", self.quant_residuals, QUANT_RESIDUAL_MODES)
        _choice("fallback", self.fallback, FALLBACKS)
        _choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"option 'cache_dir' must be a path string or None, got {self.cache_dir!r}")
        if isinstance(self.autotune, bool) or not (
            self.autotune in AUTOTUNE_MODES
            or (isinstance(self.autotune, (int, float)) and self.autotune > 0)
        ):
            raise ValueError(
                f"option 'autotune' must be one of {', '.join(AUTOTUNE_MODES)} or a positive "
                f"number of seconds, got {self.autotune!r}"
            )
        for name in ("validate", "freeze", "speed_check", "pdl"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"option {name!r} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.cache_max_bytes, bool) or not isinstance(self.cache_max_bytes, int) or self.cache_max_bytes < 0:
            raise ValueError(f"option 'cache_max_bytes' must be a non-negative integer, got {self.cache_max_bytes!r}")
        if self.compile_processes is not None and (isinstance(self.compile_processes, bool) or not isinstance(
                self.compile_processes, int) or self.compile_processes < 0):
            raise ValueError(f"option 'compile_processes' must be None or a non-negative integer, "
                             f"got {self.compile_processes!r}")
        if isinstance(self.max_engines, bool) or not isinstance(self.max_engines, int) or self.max_engines < 1:
            raise ValueError(f"option 'max_engines' must be a positive integer, got {self.max_engines!r}")
        _check_quant(self.quant)
        # users give dicts; the dataclass holds Profiles (asdict turns them back into dicts)
        object.__setattr__(self, "profiles", parse_profiles(self.profiles))

    @classmethod
    def from_mapping(cls, options: Optional[Mapping[str, Any]]) -> "Options":
        """Build from a user dict, rejecting unknown names with a did-you-mean hint."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict of option names to values, got {type(options).__name__}")
        check_names(Options, options)
        return cls(**dict(options))

    def replace(self, **changes: Any) -> "Options":
        check_names(Options, changes)
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The options as plain data (``quant`` as its kind and digest)."""
        out = dataclasses.asdict(dataclasses.replace(self, quant=None))
        out["quant"] = None if self.quant is None else f"{type(self.quant).__name__}:{self.quant.digest()}"
        return out


def _check_quant(value: Any) -> None:
    if value is None:
        return
    from .quant.calibration import Calibration
    from .quant.config import QuantConfig

    if isinstance(value, Calibration):
        if value.config.weight_only:
            raise ValueError("option 'quant': this calibration was made under a weight-only config "
                             "(activations=None), which needs no calibration: pass the quant.QuantConfig itself")
        return
    if not isinstance(value, QuantConfig):
        raise ValueError("option 'quant' must be a quant.Calibration (from quant.calibrate) or a "
                         "quant.QuantConfig with activations='dynamic' or activations=None (weight-only), "
                         f"got {type(value).__name__}")
    if value.activations == "static":
        raise ValueError("option 'quant': static activation scales come from calibration: pass "
                         "quant.calibrate(model, batches, config) instead of the config, or use "
                         "QuantConfig(activations='dynamic') or QuantConfig(activations=None) (weight-only)")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"option {name!r} must be one of {', '.join(choices)}, got {value!r}")
