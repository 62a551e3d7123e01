"""Persistent timing cache: auto-tuning winners on disk, shared between processes.

Each environment (GPU name and architecture, torch / triton / compile_backend versions) gets one
JSON file ``timing-<hash>.json`` in the cache directory; inside, entries are keyed by a hash of
the tuning key (template source hash, shapes, strides, dtypes, epilogue). JSON only, never
pickle: a cache file is data, not code.

Several processes may tune at once. Writers take an exclusive ``fcntl`` lock on a lock file,
re-read the current file, merge their entries over it and replace it atomically
(``tempfile`` in the same directory + ``os.replace``), so no writer loses another's entries and
no reader ever sees a half-written file. Readers take no lock.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Dict, Iterator, Mapping, Optional

log = logging.getLogger("compile_backend")

FORMAT_VERSION = 1


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able value that is the same in every process (sorted keys, no repr)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class TimingCache:
    """Tuning winners for one cache directory (the lead passes ``<cache_dir>/timing``)."""

    def __init__(self, directory: "str | os.PathLike[str]"):
        self.directory = os.fspath(directory)
        self.hits = 0
        self.misses = 0
        # file path -> (mtime_ns, size, entries) so repeated lookups do not re-parse the file
        self._loaded: Dict[str, tuple] = {}

    # ------------------------------------------------------------------ public API
    def path_for(self, env: Mapping[str, str]) -> str:
        return os.path.join(self.directory, f"timing-{stable_hash(dict(env), 12)}.json")

    def get(self, key: Mapping[str, Any], env: Mapping[str, str]) -> Optional[Dict[str, Any]]:
        """The stored record for ``key`` in ``env``, or None. Counts hits and misses."""
        entries = self._entries(self.path_for(env))
        record = entries.get(stable_hash(dict(key), 32))
        if record is not None and record.get("key") == json.loads(json.dumps(dict(key), default=str)):
            self.hits += 1
            return dict(record)
        self.misses += 1
        return None

    def put(self, key: Mapping[str, Any], env: Mapping[str, str], record: Mapping[str, Any]) -> None:
        """Store ``record`` (JSON-able) for ``key``, merging with whatever other processes wrote."""
        entry = json.loads(json.dumps({**dict(record), "key": dict(key), "time": time.time()}, default=str))
        self.put_many([(stable_hash(dict(key), 32), entry)], env)

    def put_many(self, entries: "list[tuple[str, Dict[str, Any]]]", env: Mapping[str, str]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = self.path_for(env)
        with self._locked():
            current = self._read(path)
            current.update(dict(entries))
            payload = {"format": FORMAT_VERSION, "env": dict(env), "entries": current}
            fd, tmp = tempfile.mkstemp(prefix=".timing-", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(payload, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._loaded.pop(path, None)

    def stats(self) -> Dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "dir": self.directory}

    # ------------------------------------------------------------------ internals
    def _entries(self, path: str) -> Dict[str, Any]:
        try:
            st = os.stat(path)
        except OSError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._loaded.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        entries = self._read(path)
        self._loaded[path] = (stamp, entries)
        return entries

    @staticmethod
    def _read(path: str) -> Dict[str, Any]:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # a corrupt file costs a re-tune, never a crash
            log.warning("compile_backend: ignoring unreadable timing cache %s: %s", path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = os.path.join(self.directory, ".timing.lock")
        with open(lock_path, "a+") as handle:
            try:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except ImportError:  # not POSIX: atomic replace still keeps the file whole
                pass
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    import fcntl

                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
