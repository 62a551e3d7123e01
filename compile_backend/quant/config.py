"""What to quantize and how: :class:`QuantConfig`, a frozen dataclass validated at construction.

Like :class:`compile_backend.options.Options`, unknown names and bad values raise ``ValueError``
naming the field and the valid choices (``from_mapping`` adds a did-you-mean hint). The module
imports no torch: ``Options`` may import it while ``import compile_backend`` stays cheap.

Layer selection (:meth:`QuantConfig.decide`) works on the weight's fully-qualified name without
``.weight`` (``"encoder.layer.0.attention.self.query"``) and on the type of the module owning
the weight. Module types are kept as :class:`LayerType` (the class's qualified name) and matched
against the module type's MRO: a subclass matches, nothing is imported to match, and a config
read from a calibration file compares equal to the one the user built.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
from typing import Any, Mapping, Optional, Tuple, Union

from ..fields import check_names

#: the same precisions as kernels/quant_ref.PRECISIONS (a test checks they agree; that module
#: imports torch, this one must not)
PRECISIONS = ("int8", "fp8", "int4")
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACTIVATION_MODES = ("static", "dynamic")
#: weight-only quantization (``activations=None``: W8A16, W4A16): its precisions, the INT4 group
#: sizes (the same as kernels/weight_only_ref.GROUP_SIZES; a test checks) and clip methods
WEIGHT_ONLY_PRECISIONS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
CLIP_METHODS = ("minmax", "mse")
CALIBRATORS = ("max", "percentile", "entropy", "mse")
#: quantization-aware training: activation amaxes learned (LSQ) or fixed at their initial value
QAT_SCALES = ("learned", "fixed")
#: per precision, the calibrator used when none is given (see README "Calibrators")
DEFAULT_CALIBRATOR = {"int8": "entropy", "fp8": "max", "int4": "mse"}
#: ``smoothquant="auto"``: calibration picks alpha per layer group from fx_passes/smooth.AUTO_ALPHAS
SMOOTHQUANT_AUTO = "auto"

#: default exclusions (``default_exclusions=True``), as TensorRT Model Optimizer does
OUTPUT_LAYER_PATTERNS = ("lm_head", "*.lm_head", "output_layer", "*.output_layer")
EMBEDDING_TYPES = ("torch.nn.modules.sparse.Embedding", "torch.nn.modules.sparse.EmbeddingBag")
BATCHNORM_TYPES = ("torch.nn.modules.batchnorm._BatchNorm",)  # BatchNorm1d/2d/3d, SyncBatchNorm

_QUALNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_<>][A-Za-z0-9_<>]*)*\Z")
_MAX_SELECTORS = 256
_MAX_TEXT = 512


@dataclasses.dataclass(frozen=True)
class LayerType:
    """A module type in ``include``/``exclude``, by qualified name (``torch.nn.modules.linear.Linear``)."""

    qualname: str

    def __post_init__(self) -> None:
        if not isinstance(self.qualname, str) or len(self.qualname) > _MAX_TEXT or not _QUALNAME.match(self.qualname):
            raise ValueError(f"a module type must be a class or a dotted qualified name, got {self.qualname!r}")

    @classmethod
    def of(cls, module_type: type) -> "LayerType":
        return cls(f"{module_type.__module__}.{module_type.__qualname__}")

    def matches(self, module_type: Optional[type]) -> bool:
        """True when ``module_type`` is this type or a subclass of it."""
        return module_type is not None and self.qualname in _mro_names(module_type)

    @property
    def short(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]


Selector = Union[str, LayerType]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization of weights and activations (W8A8), or of weights alone
    (``activations=None``: W8A16 / W4A16). See quant/README.md.

    precision: ``int8`` (symmetric, [-127, 127]), ``fp8`` (e4m3fn, saturating at ±448) or
        ``int4`` (symmetric, [-7, 7]; weights per channel, activations static per tensor; the
        values run through the INT8 kernels, exactly). Default ``int8``: INT8 GEMMs run on every
        tensor-core GPU (Turing on), FP8 needs Ada/Hopper.
    weights: ``per_channel`` (one scale per output channel, default) or ``per_tensor``. Weight
        scales always come from the weight's absolute maximum (no calibrator needed).
    activations: ``static`` (one scale per tensor, from calibration, default), ``dynamic`` (one
        scale per row/token computed at run time; no calibration) or None: weight-only
        quantization (activations stay float; no calibration), with precision ``int8`` (one fp16
        scale per output channel) or ``int4`` (one fp16 scale per ``group_size`` input channels).
    calibrator: how a static activation's amax is chosen from its histogram: ``max``,
        ``percentile``, ``entropy`` (KL divergence, as TensorRT) or ``mse``. Default per
        precision: ``entropy`` for int8 (127 uniform levels: clipping rare outliers buys
        resolution for the bulk, TensorRT's default), ``max`` for fp8 (a floating-point grid has
        constant relative precision, so outliers cost the bulk little; ModelOpt's FP8 default),
        ``mse`` for int4 (with 7 levels per sign the clipping point matters most; the squared
        error of the quantized histogram chooses it).
    percentile: for ``calibrator="percentile"``: the percentile of |x| taken as amax, in (0, 100].
    include: module-name globs and module types to quantize; empty means every eligible layer.
    exclude: module-name globs and module types never quantized (wins over ``include``).
        Globs are ``fnmatch`` patterns over the whole weight name without ``.weight``
        (``"encoder.layer.*.attention.*"``; ``"lm_head"`` matches only a top-level lm_head).
        Types are classes (``torch.nn.Linear``); subclasses match.
    default_exclusions: also skip embeddings, BatchNorm and the output layer (names
        ``lm_head``/``output_layer``, at any depth), as TensorRT Model Optimizer does.
    min_features: GEMMs/convolutions with K or N below this stay in float (too small to gain).
    num_bins: histogram bins per layer for calibration, a power of two in [128, 65536].
    qat_scales: in quantization-aware training (``quant.prepare_qat``), the activation amaxes are
        ``learned`` (LSQ's gradient, default) or ``fixed`` at their calibrated / first values.
    group_size: weight-only ``int4``: input channels per scale, 32, 64 or 128 (default 128; the
        last group of a row is shorter when K is not a multiple). Only for int4 weight-only:
        stored resolved there, None everywhere else.
    clip: weight-only: how each scale's range is chosen, ``minmax`` (the abs max, default) or
        ``mse`` (the abs max times the ratio in 1.0, 0.95, ..., 0.5 with the smallest squared
        error: an outlier gives way to resolution for the rest). None unless weight-only.
    smoothquant: SmoothQuant's migration strength alpha in (0, 1] (typical 0.5), ``"auto"``, or
        None (off, default). Calibration computes per input channel ``s = max|X|^alpha /
        max|W|^(1-alpha)``; the engine quantizes ``X / s`` and ``W * s`` (the same product),
        moving activation outliers into the weights. ``"auto"``: calibration chooses alpha per
        group of layers reading one activation, from a small grid (0 = not smoothed), by the
        quantized output's SQNR on the first batch. int8 and fp8 with static or dynamic
        activations (dynamic then needs ``quant.calibrate`` too, for the factors); not int4 or
        weight-only.
    """

    precision: str = "int8"
    weights: str = "per_channel"
    activations: str = "static"
    calibrator: Optional[str] = None
    percentile: float = 99.99
    include: Tuple[Selector, ...] = ()
    exclude: Tuple[Selector, ...] = ()
    default_exclusions: bool = True
    min_features: int = 16
    num_bins: int = 2048
    qat_scales: str = "learned"
    group_size: Optional[int] = None
    clip: Optional[str] = None
    smoothquant: Union[float, str, None] = None

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("weights", self.weights, WEIGHT_GRANULARITIES)
        if self.activations is not None and self.activations not in ACTIVATION_MODES:
            raise ValueError(f"quant option 'activations' must be one of {', '.join(ACTIVATION_MODES)} or None "
                             f"(weight-only quantization), got {self.activations!r}")
        self._check_weight_only()
        if self.calibrator is None:
            # stored resolved, so the digest and the calibration file name the calibrator used
            object.__setattr__(self, "calibrator", DEFAULT_CALIBRATOR[self.precision])
        _choice("calibrator", self.calibrator, CALIBRATORS)
        if self.precision == "int4" and not self.weight_only and (self.weights, self.activations) != \
                ("per_channel", "static"):
            raise ValueError(
                "quant precision 'int4' takes weights='per_channel' and activations='static' (one "
                "activation scale per tensor, from calibration or quantization-aware training), or "
                "activations=None (weight-only W4A16, grouped weight scales); got "
                f"weights={self.weights!r}, activations={self.activations!r}")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 100):
            raise ValueError(f"quant option 'percentile' must be a number in (0, 100], got {p!r}")
        object.__setattr__(self, "percentile", float(p))
        for name in ("include", "exclude"):
            object.__setattr__(self, name, _selectors(name, getattr(self, name)))
        if not isinstance(self.default_exclusions, bool):
            raise ValueError(f"quant option 'default_exclusions' must be True or False, got {self.default_exclusions!r}")
        m = self.min_features
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"quant option 'min_features' must be a positive integer, got {m!r}")
        _choice("qat_scales", self.qat_scales, QAT_SCALES)
        self._check_smoothquant()
        b = self.num_bins
        if isinstance(b, bool) or not isinstance(b, int) or not (128 <= b <= 65536) or b & (b - 1):
            raise ValueError(f"quant option 'num_bins' must be a power of two in [128, 65536], got {b!r}")

    @property
    def weight_only(self) -> bool:
        """Weights alone are quantized (W8A16 / W4A16): ``activations`` is None."""
        return self.activations is None

    def _check_weight_only(self) -> None:
        """The weight-only fields: resolved (group_size 128 for int4, clip minmax) in weight-only
        mode, where they apply; refused elsewhere, so a value given never goes unused."""
        if not self.weight_only:
            given = {n: getattr(self, n) for n in ("group_size", "clip") if getattr(self, n) is not None}
            if given:
                raise ValueError(
                    f"quant option {next(iter(given))!r} applies to weight-only quantization "
                    f"(activations=None), got {', '.join(f'{k}={v!r}' for k, v in given.items())} with "
                    f"activations={self.activations!r}: leave it unset or pass activations=None")
            return
        if self.precision not in WEIGHT_ONLY_PRECISIONS:
            raise ValueError(f"quant option 'precision' must be one of {', '.join(WEIGHT_ONLY_PRECISIONS)} for "
                             f"weight-only quantization (activations=None), got {self.precision!r}")
        if self.weights != "per_channel":
            raise ValueError("weight-only quantization (activations=None) takes weights='per_channel' (int8: a "
                             "scale per output channel; int4: per group_size inputs of each channel), got "
                             f"weights={self.weights!r}")
        g = self.group_size
        if self.precision == "int8":
            if g is not None:
                raise ValueError(f"quant option 'group_size' applies to precision 'int4' (int8 weight-only scales "
                                 f"are per output channel), got group_size={g!r}: leave it unset")
        elif g is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)  # stored resolved, as the calibrator
        elif isinstance(g, bool) or g not in GROUP_SIZES:
            raise ValueError(f"quant option 'group_size' must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {g!r}")
        if self.clip is None:
            object.__setattr__(self, "clip", CLIP_METHODS[0])
        _choice("clip", self.clip, CLIP_METHODS)

    def _check_smoothquant(self) -> None:
        alpha = self.smoothquant
        if alpha is None:
            return
        auto = isinstance(alpha, str) and alpha == SMOOTHQUANT_AUTO
        if not auto and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1):
            raise ValueError(f"quant option 'smoothquant' must be None (off), a migration strength alpha "
                             f"in (0, 1] (typical 0.5) or {SMOOTHQUANT_AUTO!r} (per layer, chosen at "
                             f"calibration), got {alpha!r}")
        if self.weight_only:
            # the factors move activation outliers into the weights; weight-only leaves the
            # activations in float, so there is nothing to move them out of
            raise ValueError("quant option 'smoothquant' applies to quantized activations (activations="
                             "'static' or 'dynamic'); weight-only quantization (activations=None) keeps them "
                             "float: leave smoothquant unset")
        if self.precision == "int4":
            # 7 levels per sign: the weights cannot absorb the activation outliers SmoothQuant moves
            raise ValueError("quant option 'smoothquant' takes precision 'int8' or 'fp8', got precision "
                             "'int4' (its 7 weight levels per sign cannot absorb the migrated outliers)")
        object.__setattr__(self, "smoothquant", SMOOTHQUANT_AUTO if auto else float(alpha))

    @classmethod
    def from_mapping(cls, config: Optional[Mapping[str, Any]]) -> "QuantConfig":
        """Build from a user dict (or :meth:`as_dict` output), rejecting unknown names with a hint."""
        if config is None:
            return cls()
        if isinstance(config, QuantConfig):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"a quant config must be a QuantConfig or a dict of field names to values, "
                             f"got {type(config).__name__}")
        check_names(cls, config, "quant option")
        return cls(**dict(config))

    def replace(self, **changes: Any) -> "QuantConfig":
        """A copy with ``changes``; the calibrator is kept unless given (it is stored resolved).
        The weight-only fields are kept while the new mode takes them (group_size: int4
        weight-only; clip: weight-only; smoothquant: int8/fp8 W8A8), else reset, unless given."""
        fields = {**self.as_dict(), **changes}
        weight_only = fields["activations"] is None
        for name, applies in (("group_size", weight_only and fields["precision"] == "int4"), ("clip", weight_only),
                              ("smoothquant", not weight_only and fields["precision"] != "int4")):
            if name not in changes and not applies:
                fields[name] = None
        return QuantConfig.from_mapping(fields)

    def as_dict(self) -> dict:
        """JSON-able fields: module types as ``{"type": qualified name}``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("include", "exclude"):
            out[name] = [s if isinstance(s, str) else {"type": s.qualname} for s in out[name]]
        return out

    def digest(self) -> str:
        """sha256 of the canonical JSON of the fields: equal configs, equal digest, in any process."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(f"QuantConfig\0{text}".encode()).hexdigest()

    def decide(self, name: str, module_type: Optional[type], k: int, n: int) -> Optional[str]:
        """None when the GEMM/conv of weight ``name`` (FQN without ``.weight``) is quantized, else a
        one-line reason why not. ``module_type``: the type of the module owning the weight, or None
        when unknown (then only names and sizes decide); ``k``/``n``: reduction and output sizes."""
        for sel in self.exclude:
            if _matches(sel, name, module_type):
                return f"excluded by {_describe(sel)}"
        if self.include and not any(_matches(sel, name, module_type) for sel in self.include):
            return "not matched by include (" + ", ".join(_describe(s) for s in self.include) + ")"
        if self.default_exclusions:
            mro = _mro_names(module_type) if module_type is not None else ()
            if any(t in mro for t in EMBEDDING_TYPES):
                return "embedding"
            if any(t in mro for t in BATCHNORM_TYPES):
                return "batch norm"
            for pattern in OUTPUT_LAYER_PATTERNS:
                if fnmatch.fnmatchcase(name, pattern):
                    return f"output layer ({name.rsplit('.', 1)[-1]})"
        if k < self.min_features:
            return f"K={k} < min_features {self.min_features}"
        if n < self.min_features:
            return f"N={n} < min_features {self.min_features}"
        return None


def _mro_names(module_type: type) -> Tuple[str, ...]:
    return tuple(f"{c.__module__}.{c.__qualname__}" for c in getattr(module_type, "__mro__", (module_type,)))


def _matches(sel: Selector, name: str, module_type: Optional[type]) -> bool:
    if isinstance(sel, str):
        return fnmatch.fnmatchcase(name, sel)
    return sel.matches(module_type)


def _describe(sel: Selector) -> str:
    return f"pattern {sel!r}" if isinstance(sel, str) else f"type {sel.short}"


def _selectors(field: str, value: Any) -> Tuple[Selector, ...]:
    """A tuple of globs and LayerTypes from a string, a class, or a list/tuple of those (or of
    ``{"type": qualified name}`` as :meth:`QuantConfig.as_dict` writes them)."""
    if isinstance(value, (str, type, LayerType, Mapping)):
        value = (value,)  # a lone pattern, not its characters
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"quant option {field!r} must be a list of module-name globs and module types, "
                         f"got {type(value).__name__}")
    if len(value) > _MAX_SELECTORS:
        raise ValueError(f"quant option {field!r} has {len(value)} entries; at most {_MAX_SELECTORS}")
    out = []
    for item in value:
        if isinstance(item, str):
            if not item or len(item) > _MAX_TEXT:
                raise ValueError(f"quant option {field!r}: a glob must be a non-empty string of at most "
                                 f"{_MAX_TEXT} characters, got {item!r}")
            out.append(item)
        elif isinstance(item, LayerType):
            out.append(item)
        elif isinstance(item, type):
            out.append(LayerType.of(item))
        elif isinstance(item, Mapping) and set(item) == {"type"}:
            try:
                out.append(LayerType(item["type"]))
            except ValueError as e:
                raise ValueError(f"quant option {field!r}: {e}") from None
        else:
            raise ValueError(f"quant option {field!r} entries must be module-name globs (str) or module "
                             f"types (classes), got {item!r}")
    return tuple(out)


def _choice(name: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"quant option {name!r} must be one of {', '.join(choices)}, got {value!r}")


__all__ = [
    "QuantConfig", "LayerType", "PRECISIONS", "WEIGHT_GRANULARITIES", "ACTIVATION_MODES", "CALIBRATORS",
    "DEFAULT_CALIBRATOR", "OUTPUT_LAYER_PATTERNS", "WEIGHT_ONLY_PRECISIONS", "GROUP_SIZES", "CLIP_METHODS",
    "SMOOTHQUANT_AUTO",
]
