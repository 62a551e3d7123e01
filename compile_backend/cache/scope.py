"""Where tuning results and Triton's binaries for our kernels live on disk.

``<cache root>/<arch>/<toolchain>/timing`` holds the timing cache (JSON) and ``.../triton``
Triton's compiled binaries, so a second process neither re-tunes nor recompiles. The root is
the ``cache_dir`` option, else $COMPILE_BACKEND_CACHE_DIR, else ~/.cache/compile_backend. A
root that is not ours (another owner, group/other-writable, a symlink inside it) or cannot be
written is not used: the compile goes on without caching, after one warning naming the cause.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

def open_scope(cache_dir: Optional[str], device: torch.device) -> Optional[Path]:
    from . import location, trust

    root = location.resolve_root(cache_dir)
    scope = location.scope_dir(root, location.device_arch(device), location.toolchain_tag())
    try:
        # each level is checked before anything is created inside it: nothing is ever written
        # into a directory that is not ours
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        trust.check_directory(root, follow=True)
        path = root
        for part in scope.relative_to(root).parts:
            path = path / part
            path.mkdir(exist_ok=True, mode=0o700)
            trust.check_directory(path)
    except trust.Untrusted as exc:
        _warn_once(str(exc), str(root))
        return None
    except OSError as exc:
        _warn_once(f"cannot use cache directory: {exc}", str(root))
        return None
    return scope


def timing_cache(scope: Optional[Path]):
    if scope is None:
        return None
    from .timing import TimingCache

    return TimingCache(str(scope / "timing"))


@contextlib.contextmanager
def triton_binaries(scope: Optional[Path], enabled: bool) -> Iterator[None]:
    if scope is None or not enabled:
        yield
        return
    from .location import triton_cache, triton_cache_dir

    with triton_cache(triton_cache_dir(scope)):
        yield


def _warn_once(cause: str, path: str) -> None:
    # Python's default warning filter shows a message once per place: no registry of our own
    warnings.warn(f"compile_backend: not caching in {path}: {cause}", stacklevel=4)
