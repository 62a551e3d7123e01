"""The result of calibration: per-layer activation amax plus the config, saved as JSON.

A :class:`Calibration` is what users save, load and pass as ``options={"quant": calib}``. Each
layer is named by its weight's fully-qualified parameter name and carries the weight's
fingerprint (:func:`weight_fingerprint`: shape and a hash of sampled values), so a calibration
applied to another model or made under another config is refused by :meth:`check_compatible`
with the mismatch named, never silently applied.

Files are JSON only (never pickle), written atomically, and :meth:`Calibration.load` treats the
file as hostile: a size limit, a regular file only (no device, FIFO or directory), UTF-8, no
duplicate keys, no NaN/Infinity literals, bounded numbers, exact key sets, types and ranges. Any
violation raises ``ValueError`` naming the file and the offending entry; nothing in the file is
ever executed or imported. The module imports no torch (:func:`weight_fingerprint` imports it
when called).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import types
from typing import Any, List, Mapping, Optional, Tuple, Union

from .config import CALIBRATORS, QuantConfig

#: what chose a layer's amax: a calibrator, or quantization-aware training (quant.convert)
RECORD_CALIBRATORS = CALIBRATORS + ("qat",)

FORMAT = "compile_backend.quant.calibration"
VERSION = 1
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LAYERS = 100_000
MAX_NAME_CHARS = 512
MAX_STATS = 32
MAX_META = 64
MAX_META_TEXT = 1024
#: values hashed by weight_fingerprint (evenly spaced over the flattened weight, ends included)
FINGERPRINT_SAMPLES = 4096

_FINGERPRINT = re.compile(r"\[(?:\d{1,12}(?:,\d{1,12}){0,15})?\]:[0-9a-f]{32}\Z")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}\Z")
_MAX_INT = 2 ** 63 - 1
_TOP_KEYS = {"format", "version", "config", "layers", "meta"}
_LAYER_KEYS = {"name", "amax", "calibrator", "fingerprint", "samples", "batches", "inf_count", "stats", "smooth",
               "alpha"}
#: most SmoothQuant factors of one layer (its input channels, K)
MAX_SMOOTH = 1 << 20

Number = Union[int, float]


def weight_fingerprint(weight: Any) -> str:
    """``"[out,in,...]:<32 hex>"``: the shape and a sha256 of up to 4096 values sampled at fixed
    positions, as fp32. Cheap (no full copy to the host), the same on every device and process;
    it tells another model or checkpoint apart, not a single edited value."""
    import torch

    t = weight.detach()
    flat = t.reshape(-1)
    n = flat.numel()
    if n > FINGERPRINT_SAMPLES:
        index = torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64) * (n - 1) // (FINGERPRINT_SAMPLES - 1)
        flat = flat[index.to(flat.device)]
    values = flat.to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
    shape = ",".join(str(s) for s in t.shape)
    digest = hashlib.sha256(f"{shape}\0{n}\0".encode() + values).hexdigest()[:32]
    return f"[{shape}]:{digest}"


def _shape_part(fingerprint: str) -> str:
    return fingerprint.split(":", 1)[0]


@dataclasses.dataclass(frozen=True)
class LayerCalibration:
    """One quantized layer: the amax of its input activation and how it was obtained.

    name: the weight's fully-qualified parameter name (``"encoder.layer.0.output.dense.weight"``).
    amax: the activation's absolute maximum after calibration (finite, >= 0).
    calibrator: the calibrator that chose it. fingerprint: :func:`weight_fingerprint` of the weight.
    samples / batches: values and batches observed; inf_count: inf values seen (clipped).
    stats: report numbers filled in by the graph side (e.g. ``{"sqnr_db": 38.2}``), +-inf allowed.
    smooth: SmoothQuant's per-input-channel factors ``s`` [K] (fp32 values, finite, > 0), or None
        (not smoothed). With them, ``amax`` is that of the smoothed input ``x / s``.
    alpha: the SmoothQuant alpha the factors were made with, in [0, 1] (0: ``smoothquant="auto"``
        chose no smoothing, and ``smooth`` is None), or None (not smoothed, or a file written
        before the field). For the report only: ``smooth`` already encodes it.
    """

    name: str
    amax: float
    calibrator: str
    fingerprint: str
    samples: int = 0
    batches: int = 0
    inf_count: int = 0
    stats: Mapping[str, float] = dataclasses.field(default_factory=dict)
    smooth: Optional[Tuple[float, ...]] = None
    alpha: Optional[float] = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "smooth", _check_smooth(self.name, self.smooth, self.fingerprint))
        object.__setattr__(self, "alpha", _check_alpha(self.name, self.alpha, self.smooth))
        if isinstance(self.amax, bool) or not isinstance(self.amax, (int, float)) \
                or not math.isfinite(self.amax) or self.amax < 0:
            raise ValueError(f"layer {self.name!r}: 'amax' must be a finite number >= 0, got {self.amax!r}")
        object.__setattr__(self, "amax", float(self.amax))
        if self.calibrator not in RECORD_CALIBRATORS:
            raise ValueError(f"layer {self.name!r}: 'calibrator' must be one of {', '.join(RECORD_CALIBRATORS)}, "
                             f"got {self.calibrator!r}")
        if not isinstance(self.fingerprint, str) or not _FINGERPRINT.match(self.fingerprint):
            raise ValueError(f"layer {self.name!r}: 'fingerprint' must be a weight_fingerprint() string, "
                             f"got {self.fingerprint!r:.80}")
        for field in ("samples", "batches", "inf_count"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_INT:
                raise ValueError(f"layer {self.name!r}: {field!r} must be an integer in [0, 2^63), got {v!r:.80}")
        if not isinstance(self.stats, Mapping) or len(self.stats) > MAX_STATS:
            raise ValueError(f"layer {self.name!r}: 'stats' must be a mapping of at most {MAX_STATS} names to numbers")
        stats = {}
        for key, value in self.stats.items():
            if not isinstance(key, str) or not _KEY.match(key):
                raise ValueError(f"layer {self.name!r}: stat name {key!r:.80} must be an identifier-like string")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"layer {self.name!r}: stat {key!r} must be a number (not NaN), got {value!r:.80}")
            stats[key] = float(value)
        object.__setattr__(self, "stats", types.MappingProxyType(dict(sorted(stats.items()))))

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stats"] = {k: (v if math.isfinite(v) else ("inf" if v > 0 else "-inf")) for k, v in self.stats.items()}
        out["smooth"] = None if self.smooth is None else list(self.smooth)
        return out


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibrated config: per-layer activation amax (see the module docstring).

    ``Calibration(config, layers, meta)``: ``layers`` is an iterable of LayerCalibration (or a
    mapping name -> LayerCalibration), stored as a read-only mapping sorted by name; ``meta`` is
    free, small, JSON-able information (batches, dataset name), not part of :meth:`digest`.
    """

    config: QuantConfig
    layers: Mapping[str, LayerCalibration] = dataclasses.field(default_factory=dict)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", QuantConfig.from_mapping(self.config))
        records = self.layers.values() if isinstance(self.layers, Mapping) else self.layers
        by_name = {}
        for record in records:
            if not isinstance(record, LayerCalibration):
                raise ValueError(f"calibration layers must be LayerCalibration records, got {type(record).__name__}")
            if record.name in by_name:
                raise ValueError(f"calibration has layer {record.name!r} twice")
            by_name[record.name] = record
        if isinstance(self.layers, Mapping) and any(k != v.name for k, v in self.layers.items()):
            raise ValueError("calibration layers: each key must be its record's name")
        if len(by_name) > MAX_LAYERS:
            raise ValueError(f"calibration has {len(by_name)} layers; at most {MAX_LAYERS}")
        smoothed = [r for r in by_name.values() if r.smooth is not None or r.alpha is not None]
        if smoothed and self.config.smoothquant is None:
            what = "factors" if smoothed[0].smooth is not None else "alpha"
            raise ValueError(f"calibration layer {smoothed[0].name!r} has SmoothQuant {what} but the config has "
                             "smoothquant=None")
        fixed = self.config.smoothquant if isinstance(self.config.smoothquant, float) else None
        other = [r for r in by_name.values() if fixed is not None and r.alpha is not None and r.alpha != fixed]
        if other:
            raise ValueError(f"calibration layer {other[0].name!r} has SmoothQuant alpha {other[0].alpha:g} but the "
                             f"config has smoothquant={fixed:g} (only smoothquant='auto' varies it per layer)")
        object.__setattr__(self, "layers", types.MappingProxyType(dict(sorted(by_name.items()))))
        object.__setattr__(self, "meta", types.MappingProxyType(_check_meta(self.meta)))

    # ------------------------------------------------------------------ access
    def amax(self, name: str) -> float:
        """The activation amax of the layer whose weight is ``name``."""
        return self.layer(name).amax

    def layer(self, name: str) -> LayerCalibration:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"layer {name!r} is not in this calibration ({len(self.layers)} layers)") from None

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def with_stats(self, name: str, **stats: float) -> "Calibration":
        """A copy where layer ``name`` has these stats added (the digest is unchanged)."""
        record = self.layer(name)
        updated = dataclasses.replace(record, stats={**record.stats, **stats})
        return Calibration(self.config, {**self.layers, name: updated}, self.meta)

    @property
    def model_fingerprint(self) -> str:
        """sha256 over the layer names and weight fingerprints: which model this calibrates."""
        text = "\n".join(f"{n}={r.fingerprint}" for n, r in self.layers.items())
        return hashlib.sha256(text.encode()).hexdigest()

    def digest(self) -> str:
        """sha256 of what a quantized engine depends on: format version, config, and per layer the
        name, amax (exact), calibrator, weight fingerprint and SmoothQuant factors (exact). Stats and
        meta (reporting only) are left out, so filling them in keeps compiled engines cached."""
        content = {"format": FORMAT, "version": VERSION, "config": self.config.as_dict(),
                   "layers": [[n, r.amax.hex(), r.calibrator, r.fingerprint]
                              + ([] if r.smooth is None else [_smooth_digest(r.smooth)])
                              for n, r in self.layers.items()]}
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, config: Optional[QuantConfig], layers: Mapping[str, str], *,
                         check_values: bool = True) -> None:
        """Raise ValueError unless this calibration fits: ``config`` (None: not checked) equals the
        calibration's, and every layer in ``layers`` (weight name -> :func:`weight_fingerprint` of
        the weight about to be quantized) was calibrated with the same weight. Calibrated layers
        missing from ``layers`` are fine (another graph of the model holds them).
        ``check_values=False`` compares weight shapes only (weights changed in place, refit)."""
        if config is not None:
            config = QuantConfig.from_mapping(config)
            mine, theirs = self.config.as_dict(), config.as_dict()
            diffs = [f"{k} {mine[k]!r} (calibration) vs {theirs[k]!r} (requested)" for k in mine if mine[k] != theirs[k]]
            if diffs:
                raise ValueError("this calibration was made under a different quant config: " + "; ".join(diffs)
                                 + ". Recalibrate with the requested config, or pass the calibration alone")
        problems: List[str] = []
        for name, fingerprint in layers.items():
            record = self.layers.get(name)
            if record is None:
                problems.append(f"layer {name!r} is not in the calibration")
            elif check_values and record.fingerprint != fingerprint:
                same_shape = _shape_part(record.fingerprint) == _shape_part(fingerprint)
                what = "different weight values" if same_shape else \
                    f"weight shape {_shape_part(fingerprint)} vs calibrated {_shape_part(record.fingerprint)}"
                problems.append(f"layer {name!r}: {what}")
            elif not check_values and _shape_part(record.fingerprint) != _shape_part(fingerprint):
                problems.append(f"layer {name!r}: weight shape {_shape_part(fingerprint)} "
                                f"vs calibrated {_shape_part(record.fingerprint)}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"this calibration ({len(self.layers)} layers, model fingerprint "
                             f"{self.model_fingerprint[:12]}) does not match the model: {shown}. It was made "
                             f"for another model or other weights: run quant.calibrate on this model")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "config": self.config.as_dict(),
                "layers": [r.to_dict() for r in self.layers.values()], "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> "Calibration":
        """Strictly validated inverse of :meth:`to_dict`; errors name ``source`` and the entry."""
        def fail(where: str, message: str) -> ValueError:
            return ValueError(f"{source}: {where}: {message}")

        if not isinstance(data, dict):
            raise fail("top level", f"must be a JSON object, got {_json_type(data)}")
        _exact_keys(data, _TOP_KEYS, "top level", fail)
        if data["format"] != FORMAT:
            raise fail("format", f"must be {FORMAT!r}, got {data['format']!r:.80}")
        if type(data["version"]) is not int or data["version"] != VERSION:
            raise fail("version", f"this compile_backend reads version {VERSION}, got {data['version']!r:.80}")
        if not isinstance(data["config"], dict):
            raise fail("config", f"must be an object, got {_json_type(data['config'])}")
        # every field written out: a default that changes between versions never fills a gap;
        # except fields added later whose absence has one meaning (files written before them)
        data["config"] = {**_ADDED_LATER, **data["config"]}
        _exact_keys(data["config"], {f.name for f in dataclasses.fields(QuantConfig)}, "config", fail)
        if not isinstance(data["meta"], dict):
            raise fail("meta", f"must be an object, got {_json_type(data['meta'])}")
        try:
            config = QuantConfig.from_mapping(data["config"])
        except (ValueError, TypeError) as e:
            raise fail("config", str(e)) from None
        layers = data["layers"]
        if not isinstance(layers, list):
            raise fail("layers", f"must be a list, got {_json_type(layers)}")
        if len(layers) > MAX_LAYERS:
            raise fail("layers", f"{len(layers)} entries; at most {MAX_LAYERS}")
        records = []
        for i, entry in enumerate(layers):
            where = f"layers[{i}]"
            if not isinstance(entry, dict):
                raise fail(where, f"must be an object, got {_json_type(entry)}")
            entry = {**_LAYER_ADDED_LATER, **entry}
            _exact_keys(entry, _LAYER_KEYS, where, fail)
            stats = entry["stats"]
            if isinstance(stats, dict):
                stats = {k: _decode_stat(v) for k, v in stats.items()}
            try:
                records.append(LayerCalibration(**{**entry, "stats": stats}))
            except (ValueError, TypeError) as e:
                raise fail(where, str(e)) from None
        try:
            return cls(config, records, data["meta"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write JSON atomically (a temporary file in the same directory, then a rename)."""
        path = os.fspath(path)
        text = json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False) + "\n"
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Calibration":
        """Read and strictly validate a calibration file (see the module docstring)."""
        path = os.fspath(path)
        source = f"calibration file {path!r}"
        data = _read_bounded(path, source)
        if data[:1] == b"\x80":
            raise ValueError(f"{source} looks like a pickle; calibration files are JSON and pickles are never loaded")
        try:
            text = data.decode("utf-8")
            parsed = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant,
                                parse_int=_bounded_int, parse_float=_bounded_float)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{source} is not a valid calibration JSON file: {str(e)[:200]}") from None
        return cls.from_dict(parsed, source)


# ------------------------------------------------------------------------------ file helpers
def _read_bounded(path: str, source: str) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)  # a FIFO must not block
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{source} does not exist") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{source} is not a regular file (a device, FIFO, socket or directory)")
        if info.st_size > MAX_FILE_BYTES:
            raise ValueError(f"{source} is {info.st_size} bytes; a calibration file is at most {MAX_FILE_BYTES}")
        chunks, total = [], 0
        while total <= MAX_FILE_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_FILE_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_FILE_BYTES:
            raise ValueError(f"{source} is larger than {MAX_FILE_BYTES} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r:.80}")
        out[key] = value
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise ValueError(f"integer {text[:24]}... is too large")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > 64:
        raise ValueError(f"number {text[:24]}... is too long")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _decode_stat(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value


#: QuantConfig fields newer than some calibration files, with the value those files meant: the
#: weight-only fields (issue #20) are None in every W8A8 config, the only kind calibrated
_ADDED_LATER = {"group_size": None, "clip": None, "smoothquant": None}
#: the same for layer entries: files before SmoothQuant (issue #20) smoothed no layer, and files
#: before smoothquant="auto" recorded no per-layer alpha (the report then shows the config's)
_LAYER_ADDED_LATER = {"smooth": None, "alpha": None}


def _exact_keys(obj: dict, expected: set, where: str, fail) -> None:
    missing, unknown = expected - set(obj), set(obj) - expected
    if unknown:
        raise fail(where, f"unknown key(s) {', '.join(sorted(repr(str(k)[:40]) for k in unknown)[:5])}")
    if missing:
        raise fail(where, f"missing key(s) {', '.join(sorted(missing))}")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"a layer name must be a printable string of 1 to {MAX_NAME_CHARS} characters, "
                         f"got {name!r:.80}")


def _check_smooth(name: str, smooth: Any, fingerprint: Any) -> Optional[Tuple[float, ...]]:
    """None, or a tuple of finite positive floats, one per input channel. When the fingerprint's
    shape is 2-D, as many as one of its dims: an ``nn.Linear`` weight is [N, K], a transformers
    ``Conv1D`` weight (GPT-2's) is [K, N], and the fingerprint cannot tell them apart; the count is
    checked against the layer's K at compile (as a merged layer's is)."""
    if smooth is None:
        return None
    if isinstance(smooth, (str, bytes)) or not isinstance(smooth, (list, tuple)) or not 0 < len(smooth) <= MAX_SMOOTH:
        raise ValueError(f"layer {name!r}: 'smooth' must be null or a flat list of 1 to {MAX_SMOOTH} numbers, "
                         f"got {type(smooth).__name__}")
    for v in smooth:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"layer {name!r}: 'smooth' factors must be finite numbers > 0, got {v!r:.80}")
    dims = _shape_part(fingerprint).strip("[]").split(",") if isinstance(fingerprint, str) else []
    if len(dims) == 2 and all(d.isdigit() for d in dims) and len(smooth) not in (int(dims[0]), int(dims[1])):
        raise ValueError(f"layer {name!r}: {len(smooth)} 'smooth' factors for a weight of shape "
                         f"{_shape_part(fingerprint)} (one per input channel: {dims[1]} for a [N, K] "
                         f"weight, {dims[0]} for a [K, N] one)")
    return tuple(float(v) for v in smooth)


def _check_alpha(name: str, alpha: Any, smooth: Optional[Tuple[float, ...]]) -> Optional[float]:
    """None, or a number in [0, 1]: 0 exactly when the layer has no factors (auto chose none)."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"layer {name!r}: 'alpha' must be null or a number in [0, 1], got {alpha!r:.80}")
    if (alpha == 0) != (smooth is None):
        raise ValueError(f"layer {name!r}: 'alpha' {alpha:g} " + ("needs 'smooth' factors" if alpha else
                         "means not smoothed, but the layer has 'smooth' factors"))
    return float(alpha)


def _smooth_digest(smooth: Tuple[float, ...]) -> str:
    return hashlib.sha256(",".join(v.hex() for v in smooth).encode()).hexdigest()


def _check_meta(meta: Any) -> dict:
    if not isinstance(meta, Mapping):
        raise ValueError(f"'meta' must be a mapping of names to short strings or numbers, got {type(meta).__name__}")
    if len(meta) > MAX_META:
        raise ValueError(f"'meta' has {len(meta)} entries; at most {MAX_META}")
    out = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"'meta' key {key!r:.80} must be an identifier-like string")
        ok = value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= MAX_META_TEXT) \
            or (isinstance(value, int) and abs(value) <= _MAX_INT) or (isinstance(value, float) and math.isfinite(value))
        if not ok:
            raise ValueError(f"'meta' {key!r} must be a short string, a finite number, a boolean or null, "
                             f"got {value!r:.80}")
        out[key] = value
    return dict(sorted(out.items()))


__all__ = ["Calibration", "LayerCalibration", "weight_fingerprint", "FORMAT", "VERSION", "MAX_FILE_BYTES"]
