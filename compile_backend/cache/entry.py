"""The entry format: how one engine's artifacts are written to and verified from a directory.

Layout of one entry directory::

    manifest.json          key components, versions, arch, created, last_used, hits, sizes,
                           sha256 of every other file, the caller's ``meta``
    tensors.safetensors    the caller's tensors (our own safetensors writer: no pickle, ever)
    files/<name>           the caller's byte blobs (kernel sources, binaries, launch plans)

``load_entry`` trusts nothing it reads: every name, size and checksum is checked, files are
opened without following symlinks (see ``trust.py``), and the first problem raises
``trust.Untrusted`` naming its cause and path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import tensor_file, trust
from .key import CacheKey

log = logging.getLogger("compile_backend.cache")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
FILES_DIR = "files"
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


def _now() -> float:
    """Wall-clock seconds for created/last_used (a seam for tests of the LRU order)."""
    return time.time()


@dataclasses.dataclass
class Artifacts:
    """What a ``build_fn`` returns (a ``(files, tensors, meta)`` tuple is accepted too)."""

    files: Dict[str, bytes] = dataclasses.field(default_factory=dict)
    tensors: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Entry:
    """One engine's artifacts. ``path`` is None when they could not be stored (bypass)."""

    digest: str
    files: Dict[str, bytes]
    tensors: Dict[str, torch.Tensor]
    meta: Dict[str, Any]
    path: Optional[Path] = None
    manifest: Dict[str, Any] = dataclasses.field(default_factory=dict)
    from_cache: bool = False  # True when loaded from disk (a hit)

    @property
    def stored(self) -> bool:
        return self.path is not None


def validated(artifacts: Artifacts) -> Artifacts:
    """Refuse caller mistakes early (these raise; they are bugs, not cache problems)."""
    for name, blob in artifacts.files.items():
        if not isinstance(name, str) or not FILE_NAME.match(name):
            raise ValueError(f"cache file name {name!r} must match {FILE_NAME.pattern} (flat names only)")
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"cache file {name!r} must be bytes, got {type(blob).__name__}")
        artifacts.files[name] = bytes(blob)  # what we hash and count is then what we write
    for name, tensor in artifacts.tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"cache tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    try:
        json.dumps(artifacts.meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cache meta must be plain JSON data: {exc}") from None
    return artifacts


def as_artifacts(result: Any) -> Artifacts:
    if isinstance(result, Artifacts):
        return Artifacts(dict(result.files), dict(result.tensors), dict(result.meta))
    if isinstance(result, tuple) and len(result) == 3:
        files, tensors, meta = result
        return Artifacts(dict(files), dict(tensors), dict(meta))
    raise TypeError(f"build_fn must return Artifacts or (files, tensors, meta), got {type(result).__name__}")


def unstored(key: CacheKey, artifacts: Artifacts) -> Entry:
    return Entry(key.digest, artifacts.files, artifacts.tensors, artifacts.meta)


def _write_new(path: Path, chunks: List[Any]) -> Tuple[int, str]:
    """Create ``path`` (never through a link, never over an existing file); returns size, sha256."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def write_entry(tmp: Path, key: CacheKey, artifacts: Artifacts) -> Dict[str, Any]:
    os.mkdir(tmp, 0o700)
    os.mkdir(tmp / FILES_DIR, 0o700)
    sizes: Dict[str, int] = {}
    checksums: Dict[str, str] = {}
    for name, blob in sorted(artifacts.files.items()):
        sizes[f"{FILES_DIR}/{name}"], checksums[f"{FILES_DIR}/{name}"] = _write_new(tmp / FILES_DIR / name, [blob])
    fd = os.open(tmp / TENSORS, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        sizes[TENSORS], checksums[TENSORS] = tensor_file.write(handle, artifacts.tensors)
    now = _now()
    manifest = {
        "format": FORMAT_VERSION,
        "digest": key.digest,
        "key": key.describe(),
        "arch": key.arch,
        "gpu_name": key.gpu_name,
        "versions": key.versions,
        "created": now,
        "last_used": now,
        "hits": 0,
        "sizes": {"total": sum(sizes.values()), "files": sizes},
        "sha256": checksums,
        "tensors": {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in artifacts.tensors.items()},
        "meta": artifacts.meta,
    }
    _write_new(tmp / MANIFEST, [json.dumps(manifest, indent=1, sort_keys=True).encode()])
    return manifest


def load_entry(path: Path, key: Optional[CacheKey]) -> Entry:
    """Read and verify one entry directory; raises ``trust.Untrusted`` naming the first problem.

    With ``key`` None (``cache info``) only the entry's own integrity is checked.
    """
    dir_fd = trust.open_directory(path)
    try:
        manifest = _parse_manifest(trust.read_file(dir_fd, MANIFEST, path / MANIFEST), path)
        if key is not None:  # arch and versions first: the most telling cause of a copied entry
            _check_against_key(manifest, key, path)
        if manifest.get("digest") != path.name:
            raise trust.Untrusted(trust.KEY_MISMATCH, path, "manifest names another key")
        expected = _expected_files(manifest, path)
        blobs: Dict[str, bytes] = {}
        files_fd = trust.open_directory(FILES_DIR, dir_fd=dir_fd, shown_as=path / FILES_DIR)
        try:
            for relative, (size, checksum) in expected.items():
                if relative == TENSORS:
                    data = trust.read_file(dir_fd, TENSORS, path / TENSORS)
                else:  # "files/<name>", the name already checked against FILE_NAME
                    data = trust.read_file(files_fd, relative.split("/", 1)[1], path / relative)
                if len(data) != size:
                    raise trust.Untrusted(trust.TRUNCATED, path / relative, f"{len(data)} bytes, manifest says {size}")
                if hashlib.sha256(data).hexdigest() != checksum:
                    raise trust.Untrusted(trust.CHECKSUM_MISMATCH, path / relative)
                blobs[relative] = data
        finally:
            os.close(files_fd)
    finally:
        os.close(dir_fd)
    try:
        tensors, _ = tensor_file.loads(blobs.pop(TENSORS))
    except tensor_file.TensorFileError as exc:
        raise trust.Untrusted(trust.CORRUPT, path / TENSORS, str(exc)) from None
    files = {relative[len(FILES_DIR) + 1:]: data for relative, data in blobs.items()}
    meta = manifest.get("meta")
    if not isinstance(meta, dict):
        raise trust.Untrusted(trust.CORRUPT, path / MANIFEST, "meta is not an object")
    return Entry(path.name, files, tensors, meta, path, manifest, from_cache=True)


def _parse_manifest(data: bytes, path: Path) -> Dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise trust.Untrusted(trust.CORRUPT, path / MANIFEST, f"not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise trust.Untrusted(trust.CORRUPT, path / MANIFEST, "not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise trust.Untrusted(trust.OTHER_VERSION, path, f"entry format {manifest.get('format')!r}, "
                                                         f"this version reads {FORMAT_VERSION}")
    return manifest


def _check_against_key(manifest: Dict[str, Any], key: CacheKey, path: Path) -> None:
    if manifest.get("arch") != key.arch:
        raise trust.Untrusted(trust.OTHER_ARCH, path, f"built for {manifest.get('arch')!r}, this is {key.arch!r}")
    versions = manifest.get("versions")
    if versions != key.versions:
        theirs = versions if isinstance(versions, dict) else {}
        changed = [f"{name} {theirs.get(name)!r} != {mine!r}" for name, mine in key.versions.items()
                   if theirs.get(name) != mine]
        raise trust.Untrusted(trust.OTHER_VERSION, path, "; ".join(changed) or "versions unreadable")
    description = manifest.get("key")
    if not isinstance(description, dict) or key.describe() != description:
        changed = key.differences(description if isinstance(description, dict) else {})
        raise trust.Untrusted(trust.KEY_MISMATCH, path, f"components differ: {', '.join(changed)}")


def _expected_files(manifest: Dict[str, Any], path: Path) -> Dict[str, Tuple[int, str]]:
    """{relative path: (size, sha256)} from the manifest, every name checked to be one of ours."""
    sizes = (manifest.get("sizes") or {}).get("files") if isinstance(manifest.get("sizes"), dict) else None
    checksums = manifest.get("sha256")
    if not isinstance(sizes, dict) or not isinstance(checksums, dict) or set(sizes) != set(checksums) \
            or TENSORS not in sizes:
        raise trust.Untrusted(trust.CORRUPT, path / MANIFEST, "sizes and checksums do not list the same files")
    expected = {}
    for relative, size in sizes.items():
        inner = relative[len(FILES_DIR) + 1:] if relative.startswith(FILES_DIR + "/") else None
        if relative != TENSORS and (inner is None or not FILE_NAME.match(inner)):
            raise trust.Untrusted(trust.CORRUPT, path / MANIFEST, f"unexpected file name {relative!r}")
        checksum = checksums[relative]
        if not isinstance(size, int) or not isinstance(checksum, str):
            raise trust.Untrusted(trust.CORRUPT, path / MANIFEST, f"bad size or checksum for {relative!r}")
        expected[relative] = (size, checksum)
    return expected


def touch(path: Path, manifest: Dict[str, Any]) -> None:
    """Record a hit (last_used for LRU, hits for ``cache list``); atomic, best effort."""
    manifest["last_used"] = _now()
    hits = manifest.get("hits")
    manifest["hits"] = (hits if isinstance(hits, int) and not isinstance(hits, bool) else 0) + 1
    tmp = path / f".{MANIFEST}.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        _write_new(tmp, [json.dumps(manifest, indent=1, sort_keys=True).encode()])
        os.replace(tmp, path / MANIFEST)
    except OSError as exc:  # read-only cache: still usable, LRU order just goes stale
        log.debug("could not update %s: %s", path / MANIFEST, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
