"""EngineCache: compiled engines on disk, one directory per key.

Layout below the root (see ``location.py``; the entry format is in ``entry.py``)::

    <arch>/<toolchain>/entries/<key digest>/   one verified-on-read entry per key
    <arch>/<toolchain>/tmp/                    entries being written, entries being deleted
    <arch>/<toolchain>/locks/<digest>.lock     per-key build locks (flock)
    <arch>/<toolchain>/triton/                 Triton's binary cache for our kernels

Writes are built in ``tmp/`` and renamed into place, so a reader sees a whole entry or none;
when two processes write one key, the first rename wins and the other drops its copy.
``build_or_get`` also holds an exclusive lock per key while building, so concurrent processes
build a key once (the others wait, then load the winner's entry).

Every read is verified: an entry that is corrupt, truncated, fails a checksum, comes from another
arch or version, or is reached through a symlink is never loaded: it is reported (a
``CacheWarning`` naming cause and path, once per cause and path), discarded and rebuilt. A cache
directory owned by another user or writable by group/others is bypassed (never read or written).
A cache directory that cannot be written (read-only, full, vanished) costs the caching, never the
result: the caller still gets what it built, with one warning.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from . import entry as entry_format
from . import location, trust
from .entry import MANIFEST, Artifacts, Entry
from .key import CacheKey

log = logging.getLogger("compile_backend.cache")

DEFAULT_MAX_BYTES = 2 * 1024 ** 3
DEFAULT_LOCK_TIMEOUT_S = 30 * 60.0
#: a temporary directory this old belongs to a crashed writer
STALE_TMP_S = 3600.0

ENTRIES_DIR = "entries"
TMP_DIR = "tmp"
LOCKS_DIR = "locks"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class CacheWarning(UserWarning):
    """The cache skipped, discarded or could not write something; the message names cause and path."""


class EngineCache:
    """On-disk cache of compiled engines.

    root: the ``cache_dir`` option (None: $COMPILE_BACKEND_CACHE_DIR, else the XDG default).
    max_bytes: size cap over all entries of all architectures; least recently used entries are
        evicted after each write (Triton's own binary cache directories are not counted).
    lock_timeout_s: how long ``build_or_get`` waits for another process building the same key
        before building on its own (with a warning).
    """

    def __init__(self, root: Optional[location.PathLike] = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        if not lock_timeout_s > 0:
            raise ValueError(f"lock_timeout_s must be positive, got {lock_timeout_s!r}")
        self.root = location.resolve_root(root)
        self.max_bytes = max_bytes
        self.lock_timeout_s = float(lock_timeout_s)
        self._counts = {"hits": 0, "misses": 0, "writes": 0, "evictions": 0}
        # (cause, path) -> {"reason", "path", "detail", "count"}; each new pair warns once
        self._bypasses: Dict[Tuple[str, str], Dict[str, Any]] = {}

    # ----------------------------------------------------------------------------- paths
    def scope_dir(self, key: CacheKey) -> Path:
        return location.scope_dir(self.root, key.arch, key.toolchain)

    def entry_dir(self, key: CacheKey) -> Path:
        return self.scope_dir(key) / ENTRIES_DIR / key.digest

    def triton_dir(self, key: CacheKey) -> Path:
        """Where Triton should keep the binaries of this key's kernels (see ``location.triton_cache``)."""
        return location.triton_cache_dir(self.scope_dir(key))

    @contextlib.contextmanager
    def triton_cache(self, key: CacheKey) -> Iterator[Optional[Path]]:
        """Wrap the compile step in this so Triton keeps our kernels' binaries in our cache, and a
        warm start compiles nothing. Yields the directory, or None when the cache directory is not
        usable (Triton then keeps its default; ``build_or_get`` reports the cause). Process-global
        while active: see ``location.triton_cache``."""
        scope = self._scope_or_bypass(key, create=True, report=False)
        if scope is None:
            yield None
            return
        with location.triton_cache(location.triton_cache_dir(scope)) as path:
            yield path

    # ----------------------------------------------------------------------------- public API
    def get(self, key: CacheKey) -> Optional[Entry]:
        """The verified entry for ``key``, or None (a miss; untrusted entries count as misses too)."""
        scope = self._scope_or_bypass(key, create=False)
        entry = self._load_verified(key, scope) if scope is not None else None
        self._counts["hits" if entry is not None else "misses"] += 1
        return entry

    def put(self, key: CacheKey, files: Mapping[str, bytes], tensors: Mapping[str, torch.Tensor],
            meta: Mapping[str, Any]) -> Entry:
        """Store artifacts under ``key``; returns them as an Entry (``path`` None if not stored)."""
        artifacts = entry_format.validated(Artifacts(dict(files), dict(tensors), dict(meta)))
        scope = self._scope_or_bypass(key, create=True)
        if scope is None:
            return entry_format.unstored(key, artifacts)
        return self._store(key, scope, artifacts)

    def build_or_get(self, key: CacheKey, build_fn: Callable[[], Any]) -> Entry:
        """The entry for ``key``, calling ``build_fn()`` only when no valid one exists.

        ``build_fn`` returns :class:`Artifacts` or ``(files, tensors, meta)``. While it runs, this
        process holds an exclusive lock on the key: other processes asking for the same key wait,
        then load this one's entry instead of building again.
        """
        scope = self._scope_or_bypass(key, create=True)
        if scope is None:
            self._counts["misses"] += 1
            return entry_format.unstored(key, entry_format.validated(entry_format.as_artifacts(build_fn())))
        entry = self._load_verified(key, scope)
        if entry is not None:
            self._counts["hits"] += 1
            return entry
        with self._key_lock(key, scope) as locked:
            if locked:  # someone may have built it while we waited for the lock
                entry = self._load_verified(key, scope)
                if entry is not None:
                    self._counts["hits"] += 1
                    return entry
            self._counts["misses"] += 1
            artifacts = entry_format.validated(entry_format.as_artifacts(build_fn()))
            return self._store(key, scope, artifacts)

    def stats(self) -> Dict[str, Any]:
        """For the report: hits, misses, writes, evictions, the cache dir, and the bypasses:
        ``bypasses`` lists {reason, path, detail, count} per cause and path, ``bypass_reasons``
        counts them per cause. An entry rejected on read counts as a miss and as a bypass."""
        reasons: collections.Counter = collections.Counter()
        for event in self._bypasses.values():
            reasons[event["reason"]] += event["count"]
        return {
            **self._counts,
            "bypasses": [dict(event) for event in self._bypasses.values()],
            "bypass_reasons": dict(reasons),
            "dir": str(self.root),
        }

    # ----------------------------------------------------------------------------- trust
    def _report(self, problem: trust.Untrusted, action: str) -> None:
        """Count a bypass and warn once per (cause, path)."""
        event = self._bypasses.get((problem.reason, problem.path))
        if event is not None:
            event["count"] += 1
            return
        self._bypasses[(problem.reason, problem.path)] = {
            "reason": problem.reason, "path": problem.path, "detail": problem.detail, "count": 1}
        detail = f" ({problem.detail})" if problem.detail else ""
        warnings.warn(f"compile_backend cache: {problem.reason}: {problem.path}{detail}; {action}",
                      CacheWarning, stacklevel=4)

    def _report_os_error(self, exc: OSError, path: Union[str, Path]) -> None:
        reason = trust.reason_for_os_error(exc)
        self._report(trust.Untrusted(reason, path, exc.strerror or str(exc)), "continuing without the cache")

    def _scope_or_bypass(self, key: CacheKey, *, create: bool, report: bool = True) -> Optional[Path]:
        """The key's scope directory if it is safe to use (None: missing or bypassed, reported
        unless ``report`` is False)."""
        scope = self.scope_dir(key)
        creation_error: Optional[OSError] = None
        # each level is checked before anything is created inside it: nothing is ever written
        # into a directory we do not trust
        levels = [self.root, scope.parent, scope, scope / ENTRIES_DIR] + ([scope / TMP_DIR] if create else [])
        try:
            for depth, directory in enumerate(levels):
                if create and creation_error is None:
                    try:  # mode 0o700 (makedirs applies it to the last level only, hence one by one)
                        os.makedirs(directory, mode=0o700, exist_ok=True)
                    except OSError as exc:
                        creation_error = exc  # a read-only cache can still serve what it holds
                if not trust.check_directory(directory, follow=depth == 0):
                    if creation_error is not None and report:
                        self._report_os_error(creation_error, self.root)
                    return None
        except trust.Untrusted as problem:
            if report:
                self._report(problem, "not reading or writing the cache there")
            return None
        except OSError as exc:
            if report:
                self._report_os_error(exc, self.root)
            return None
        if create and creation_error is None:
            with contextlib.suppress(OSError):  # no locks dir: build without the lock
                os.makedirs(scope / LOCKS_DIR, mode=0o700, exist_ok=True)
        return scope

    def _load_verified(self, key: CacheKey, scope: Path) -> Optional[Entry]:
        path = scope / ENTRIES_DIR / key.digest
        if not os.path.lexists(path):
            return None
        try:
            entry = entry_format.load_entry(path, key)
        except trust.Untrusted as problem:
            if problem.reason == trust.TRUNCATED and not os.path.lexists(path):
                return None  # evicted by another process while we read it: a plain miss
            self._report(problem, "discarding it and rebuilding")
            _discard(path, scope)
            return None
        except OSError as exc:
            self._report_os_error(exc, path)
            return None
        entry_format.touch(path, entry.manifest)
        return entry

    # ----------------------------------------------------------------------------- writes
    def _store(self, key: CacheKey, scope: Path, artifacts: Artifacts) -> Entry:
        tmp = scope / TMP_DIR / f"{key.digest}.{os.getpid()}.{uuid.uuid4().hex}"
        target = scope / ENTRIES_DIR / key.digest
        try:
            manifest = entry_format.write_entry(tmp, key, artifacts)
            for attempt in range(2):
                try:
                    os.rename(tmp, target)
                    break
                except OSError as exc:
                    if not os.path.lexists(target) or attempt == 1:
                        raise
                    # another writer won the race: keep its entry if it is valid
                    winner = self._load_verified(key, scope)
                    if winner is not None:
                        shutil.rmtree(tmp, ignore_errors=True)
                        return winner
            self._counts["writes"] += 1
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self._report_os_error(exc, self.root)
            return entry_format.unstored(key, artifacts)
        self._evict(keep=target)
        return Entry(key.digest, artifacts.files, artifacts.tensors, artifacts.meta, target, manifest)

    @contextlib.contextmanager
    def _key_lock(self, key: CacheKey, scope: Path) -> Iterator[bool]:
        """Exclusive per-key lock across processes; yields False when none could be taken."""
        try:
            import fcntl
        except ImportError:  # no flock on this OS: atomic renames still keep one valid entry
            yield False
            return
        lock_path = scope / LOCKS_DIR / f"{key.digest}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError:
            yield False  # read-only cache: the store step will say so
            return
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            pause = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        self._report(trust.Untrusted(trust.LOCK_TIMEOUT, lock_path,
                                                     f"waited {self.lock_timeout_s:.0f} s"),
                                     "building without waiting")
                        yield False
                        return
                    time.sleep(pause)
                    pause = min(pause * 2, 0.1)
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ----------------------------------------------------------------------------- size cap
    def entries(self) -> List["EntryInfo"]:
        """Every entry under the root (all architectures and toolchains), unverified."""
        return list_entries(self.root)

    def total_bytes(self) -> int:
        return sum(info.size for info in self.entries())

    def prune(self, max_bytes: Optional[int] = None, *, keep: Optional[Path] = None) -> List["EntryInfo"]:
        """Evict least recently used entries until the total is at most ``max_bytes`` (default: the
        cap); also removes temporary directories left by crashed writers. Returns what was evicted."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        _sweep_stale_tmp(self.root)
        infos = list_entries(self.root, read_manifests=False)  # sizes alone are cheap
        total = sum(info.size for info in infos)
        if total <= cap:
            return []
        evicted = []
        for info in sorted(map(_read_manifest, infos), key=lambda i: (i.last_used, i.digest)):
            if total <= cap:
                break
            if keep is not None and info.path == keep:
                continue
            if _discard(info.path, info.path.parent.parent):
                total -= info.size
                evicted.append(info)
        self._counts["evictions"] += len(evicted)
        return evicted

    def _evict(self, keep: Path) -> None:
        try:
            self.prune(keep=keep)
        except OSError as exc:  # eviction is housekeeping: never fail a compile over it
            log.debug("cache eviction failed: %s", exc)

    def clear(self, arch: Optional[str] = None) -> int:
        """Remove every entry (of one architecture if given), with its Triton binaries and locks.
        Returns the number of entries removed."""
        removed = sum(1 for info in self.entries() if arch is None or info.arch == arch)
        targets = [self.root / location.safe_name(arch)] if arch else \
            [p for p in _children(self.root) if p.is_dir() and not p.is_symlink()]
        for target in targets:
            if target.is_symlink():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
        return removed


@dataclasses.dataclass
class EntryInfo:
    """What ``cache list`` shows about one entry, read from its manifest without verifying files."""

    path: Path
    arch: str
    toolchain: str
    digest: str
    size: int
    hits: int = 0
    created: float = 0.0
    last_used: float = 0.0
    readable: bool = True  # False: the manifest is missing or unparseable


def list_entries(root: Path, *, read_manifests: bool = True) -> List[EntryInfo]:
    """Entries under ``root``, sizes from the disk; hits and times from the manifests if asked."""
    infos = []
    for arch_dir in _children(root):
        for scope in _children(arch_dir):
            for path in _children(scope / ENTRIES_DIR):
                if _DIGEST.match(path.name):
                    info = EntryInfo(path, arch_dir.name, scope.name, path.name, _tree_size(path))
                    infos.append(_read_manifest(info) if read_manifests else info)
    return infos


def _read_manifest(info: EntryInfo) -> EntryInfo:
    try:
        manifest = json.loads((info.path / MANIFEST).read_text())
        return dataclasses.replace(info, hits=int(manifest.get("hits", 0)),
                                   created=float(manifest.get("created", 0.0)),
                                   last_used=float(manifest.get("last_used", 0.0)))
    except (OSError, ValueError, TypeError, AttributeError):
        return dataclasses.replace(info, readable=False)  # unreadable: first to be evicted


def _children(path: Path) -> List[Path]:
    try:
        return sorted(p for p in path.iterdir() if not p.is_symlink())
    except OSError:
        return []


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _discard(path: Path, scope: Path) -> bool:
    """Remove an entry: rename it out of ``entries/`` first so no reader sees it half-deleted."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return True
        graveyard = scope / TMP_DIR / f"discard.{uuid.uuid4().hex}"
        os.makedirs(graveyard.parent, mode=0o700, exist_ok=True)
        os.rename(path, graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)
        return True
    except OSError as exc:
        log.debug("could not discard cache entry %s: %s", path, exc)
        return False


def _sweep_stale_tmp(root: Path) -> None:
    now = time.time()
    for arch_dir in _children(root):
        for scope in _children(arch_dir):
            for tmp in _children(scope / TMP_DIR):
                try:
                    if now - tmp.lstat().st_mtime > STALE_TMP_S:
                        shutil.rmtree(tmp, ignore_errors=True)
                except OSError:
                    pass


