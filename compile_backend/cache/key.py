"""The cache key: everything a compiled engine depends on, as named components.

Two compiles share an entry only when every component is equal:

- ``graph``: canonical graph text from the pipeline (ops, arguments and wiring);
- ``inputs``: per input, shape, stride, dtype, device and requires_grad (or a scalar's value);
- ``options``: the backend options, minus those that only say where/how much to cache
  (:data:`OPTIONS_NOT_IN_KEY`);
- ``source_hash``: sha256 over compile_backend's own ``.py`` files, so any code change
  invalidates old entries without a manual version bump;
- ``torch_version``, ``triton_version``, ``compile_backend_version``;
- ``arch`` and ``gpu_name``: two GPUs of one architecture can still tune differently;
- ``calibration_hash``: hash of the calibration data when quantization calibrated (else None).

Weights are not part of the key: engines bind them at load time (the refit path), so retraining
a model reuses its engine.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from . import location

#: bump when the meaning of a component changes, so older entries are never matched
KEY_SCHEMA = 1

#: options that choose where or how much to cache, not what gets built
# quant: calibration_hash; compile_processes: where kernels compile, not what
OPTIONS_NOT_IN_KEY = frozenset({"cache_dir", "cache_max_bytes", "cache", "quant", "compile_processes"})


def hash_python_sources(package_dir: Path) -> str:
    """sha256 over every .py file below ``package_dir`` (relative path, length and content)."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir).as_posix()
        if "__pycache__" in relative:
            continue
        content = path.read_bytes()
        digest.update(f"{relative}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over the compile_backend package's .py files, computed once per process."""
    return hash_python_sources(Path(__file__).resolve().parents[1])


def canonical_json(value: Any) -> str:
    """The same text for equal values in every process: sorted keys, no whitespace, no repr()."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), allow_nan=True)


def _plain(value: Any) -> Any:
    """JSON-able form of option values and input metadata; refuses what has no stable text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)  # symbolic sizes of dynamic-shape graphs, e.g. "s0"
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, torch.Size)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(
        f"cannot put a {type(value).__name__} into a cache key: no stable text form "
        f"(give its metadata as plain values instead)"
    )


def input_metadata(value: Any) -> Dict[str, Any]:
    """What the key records about one graph input."""
    if isinstance(value, torch.Tensor):
        return {
            "shape": _plain(list(value.shape)),
            "stride": _plain(list(value.stride())) if value.layout == torch.strided else None,
            "dtype": str(value.dtype),
            "device": str(value.device),
            "requires_grad": bool(value.requires_grad),
            "layout": str(value.layout),
        }
    if isinstance(value, Mapping):  # metadata already extracted by the caller
        return {str(k): _plain(v) for k, v in value.items()}
    return {"type": type(value).__name__, "value": _plain(value)}


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over dtype, shape and bytes of tensors: e.g. the ``calibration_hash`` of a data set."""
    from .tensor_file import tensor_bytes

    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous()
        digest.update(f"{flat.dtype}{list(flat.shape)}\0".encode())
        digest.update(tensor_bytes(flat))
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """Immutable, hashable key; ``digest`` names the entry on disk. Build with :meth:`create`."""

    graph: str
    inputs: str  # canonical JSON list of input metadata
    options: str  # canonical JSON object
    source_hash: str
    torch_version: str
    triton_version: str
    compile_backend_version: str
    arch: str
    gpu_name: str
    calibration_hash: Optional[str] = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "calibration_hash" and value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"CacheKey.{field.name} must be a string, got {type(value).__name__}")

    @classmethod
    def create(
        cls,
        graph: str,
        inputs: Sequence[Any],
        options: Any = None,
        *,
        device: Any = None,
        calibration_hash: Optional[str] = None,
        arch: Optional[str] = None,
        gpu_name: Optional[str] = None,
        torch_version: Optional[str] = None,
        triton_version: Optional[str] = None,
        compile_backend_version: Optional[str] = None,
        source: Optional[str] = None,
    ) -> "CacheKey":
        """Key for compiling ``graph`` (canonical text) for ``inputs`` (tensors, scalars or metadata
        dicts) with ``options`` (a dict or the Options dataclass).

        ``device`` defaults to the first tensor input's device; it gives ``arch`` and ``gpu_name``.
        Versions and the source hash default to the running process; pass them only in tests.
        """
        if not isinstance(graph, str) or not graph:
            raise ValueError("CacheKey needs the canonical graph text (a non-empty string)")
        if device is None:
            device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        return cls(
            graph=graph,
            inputs=canonical_json([input_metadata(x) for x in inputs]),
            options=canonical_json(_key_options(options)),
            source_hash=source or source_hash(),
            torch_version=torch_version or torch.__version__,
            triton_version=triton_version or location.triton_version(),
            compile_backend_version=compile_backend_version or location.compile_backend_version(),
            arch=arch or location.device_arch(device),
            gpu_name=gpu_name or location.device_name(device),
            calibration_hash=calibration_hash,
        )

    @functools.cached_property
    def digest(self) -> str:
        """Stable 64-hex-digit name of the entry (sha256 of every component)."""
        fields = {"schema": KEY_SCHEMA, **dataclasses.asdict(self)}
        return hashlib.sha256(canonical_json(fields).encode()).hexdigest()

    @property
    def toolchain(self) -> str:
        return location.toolchain_tag(self.torch_version, self.triton_version, self.compile_backend_version)

    @property
    def versions(self) -> Dict[str, str]:
        return {
            "torch": self.torch_version,
            "triton": self.triton_version,
            "compile_backend": self.compile_backend_version,
            "source_hash": self.source_hash,
        }

    def describe(self) -> Dict[str, Any]:
        """Components as plain JSON for the manifest (and for humans comparing two keys)."""
        return {
            "schema": KEY_SCHEMA,
            "digest": self.digest,
            "graph": self.graph,
            "graph_sha256": hashlib.sha256(self.graph.encode()).hexdigest(),
            "inputs": json.loads(self.inputs),
            "options": json.loads(self.options),
            "versions": self.versions,
            "arch": self.arch,
            "gpu_name": self.gpu_name,
            "calibration_hash": self.calibration_hash,
        }

    def differences(self, other_description: Mapping[str, Any]) -> List[str]:
        """Names of the components that differ from another key's :meth:`describe` output."""
        mine = self.describe()
        return sorted(name for name in mine if name != "digest" and mine[name] != other_description.get(name))


def _key_options(options: Any) -> Dict[str, Any]:
    if options is None:
        return {}
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict or an Options dataclass, got {type(options).__name__}")
    return {str(k): _plain(v) for k, v in options.items() if k not in OPTIONS_NOT_IN_KEY}
