"""Where the cache lives on disk, and how Triton's own binary cache is pointed into it.

Root directory, first match wins:

1. the ``cache_dir`` option (``EngineCache(root=...)`` / ``resolve_root(cache_dir)``);
2. the environment variable ``COMPILE_BACKEND_CACHE_DIR``;
3. ``$XDG_CACHE_HOME/compile_backend``, else ``~/.cache/compile_backend``.

Below the root, one directory per GPU architecture and toolchain, because a compiled engine is
only valid for both::

    <root>/sm90/torch-2.11.0_triton-3.6.0_cb-0.1.0/entries/<key digest>/   our engine entries
    <root>/sm90/torch-2.11.0_triton-3.6.0_cb-0.1.0/triton/                 Triton's binaries
    <root>/interp/...   Triton kernels run by the interpreter on CPU tensors
    <root>/cpu/...      CPU engines without Triton

Nothing here imports Triton at module import time.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch

#: documented environment variable for the cache location (same name as options.CACHE_DIR_ENV)
CACHE_DIR_ENV = "COMPILE_BACKEND_CACHE_DIR"
TRITON_CACHE_ENV = "TRITON_CACHE_DIR"

PathLike = Union[str, "os.PathLike[str]"]

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9.+_-]")


def default_root() -> Path:
    """``$XDG_CACHE_HOME/compile_backend`` or ``~/.cache/compile_backend``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    # the XDG spec says relative values are invalid and must be ignored
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "compile_backend"


def resolve_root(cache_dir: Optional[PathLike] = None) -> Path:
    """The cache root: the ``cache_dir`` option, else $COMPILE_BACKEND_CACHE_DIR, else the default."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return default_root()


def _interpreting() -> bool:
    from ..kernels.base import triton_interpret

    return triton_interpret()


def device_arch(device: Any = None) -> str:
    """Architecture directory name: ``sm90`` for an H100, ``interp`` for Triton's interpreter on
    CPU tensors, ``cpu`` otherwise (``gfx942``-style names on ROCm)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        if getattr(torch.version, "hip", None):
            name = torch.cuda.get_device_properties(device).gcnArchName
            return safe_name(name.split(":")[0])
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    if device.type == "cpu":
        return "interp" if _interpreting() else "cpu"
    return safe_name(device.type)


def device_name(device: Any = None) -> str:
    """Human-readable device name that goes into the key (two GPUs of one arch can differ)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def triton_version() -> str:
    """Installed Triton version, read from package metadata so Triton is not imported."""
    import sys

    module = sys.modules.get("triton")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    from importlib import metadata

    for distribution in ("triton", "pytorch-triton", "pytorch-triton-rocm"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "none"


def compile_backend_version() -> str:
    import sys

    package = sys.modules.get("compile_backend")
    version = getattr(package, "__version__", None)
    if version:
        return str(version)
    from importlib import metadata

    try:
        return metadata.version("compile_backend")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def toolchain_tag(torch_version: Optional[str] = None, triton: Optional[str] = None,
                  compile_backend: Optional[str] = None) -> str:
    """``torch-2.11.0_triton-3.6.0_cb-0.1.0`` for the running (or the given) versions."""
    parts = (
        ("torch", torch_version or torch.__version__),
        ("triton", triton or triton_version()),
        ("cb", compile_backend or compile_backend_version()),
    )
    return "_".join(f"{label}-{safe_name(version)}" for label, version in parts)


def safe_name(text: str) -> str:
    """One path component: letters, digits and ``.+_-`` only (no separators, no ``..``)."""
    cleaned = _UNSAFE_CHARS.sub("-", str(text)).strip(".") or "unknown"
    return cleaned[:100]


def scope_dir(root: PathLike, arch: str, toolchain: str) -> Path:
    """``<root>/<arch>/<toolchain>``: everything valid for one architecture and toolchain."""
    return Path(root) / safe_name(arch) / safe_name(toolchain)


def triton_cache_dir(scope: PathLike) -> Path:
    """Where Triton keeps its compiled binaries for our kernels, inside one scope directory."""
    return Path(scope) / "triton"


# The ``triton_cache`` blocks active now (their paths, oldest first) and the setting from
# before the first of them. Blocks overlap when graphs build on several threads at once: each
# one points Triton at its own directory, an exit points it back at the latest block still
# active, and only the last one out restores the setting it found (not the one an earlier
# overlapping block set). Bound: one entry per block in progress.
_REDIRECT_LOCK = threading.Lock()
_active: List[str] = []
_saved: Dict[str, Any] = {}


@contextlib.contextmanager
def triton_cache(path: PathLike) -> Iterator[Path]:
    """Point Triton's binary cache at ``path`` while the block runs, then restore it.

    Triton has no per-kernel or per-call cache location: ``triton.compile`` asks
    ``triton.runtime.cache.get_cache_manager``, which reads the process-wide
    ``triton.knobs.cache.dir`` (Triton >= 3.4; it falls back to $TRITON_CACHE_DIR, which older
    Triton reads directly). So this sets that knob, and the environment variable that Triton
    mirrors it into (child processes such as parallel compile workers read the variable), and
    restores both when the last block active exits. Use it only around our own compile step
    (builders, warm-up launches, autotuning), where Triton compiles our kernels; it is
    process-global while active, so do not run unrelated Triton compiles on other threads at
    the same time (and two of our blocks overlapping on threads share the later one's directory).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _REDIRECT_LOCK:
        if not _active:
            knob_owner = _triton_cache_knobs()
            _saved.update(env=os.environ.get(TRITON_CACHE_ENV), knob_owner=knob_owner,
                          knob=knob_owner.__dict__.get("dir", _MISSING) if knob_owner is not None else _MISSING)
        _active.append(str(path))
        _point_triton_at(str(path))
    try:
        yield path
    finally:
        with _REDIRECT_LOCK:
            _active.remove(str(path))
            if _active:
                _point_triton_at(_active[-1])
            else:
                _restore_triton_cache()


_MISSING = object()


def _point_triton_at(path: str) -> None:
    os.environ[TRITON_CACHE_ENV] = path
    if _saved["knob_owner"] is not None:
        _saved["knob_owner"].dir = path


def _restore_triton_cache() -> None:
    knob_owner, knob, env = _saved.pop("knob_owner"), _saved.pop("knob"), _saved.pop("env")
    if knob_owner is not None:
        if knob is _MISSING:
            knob_owner.__dict__.pop("dir", None)  # back to "read the environment"
        else:
            knob_owner.__dict__["dir"] = knob
    if env is None:
        os.environ.pop(TRITON_CACHE_ENV, None)
    else:
        os.environ[TRITON_CACHE_ENV] = env


def _triton_cache_knobs() -> Any:
    """``triton.knobs.cache`` where this Triton has it, else None (env var only)."""
    try:
        from triton import knobs  # imported here on purpose: only when a compile is under way
    except ImportError:
        return None
    return getattr(knobs, "cache", None)
