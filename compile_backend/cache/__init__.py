"""On-disk engine cache: compiled engines per GPU architecture and toolchain (issue #8).

Typical use by the pipeline::

    cache = EngineCache(options.cache_dir)          # one per process (it keeps the stats)
    key = CacheKey.create(graph_text, example_inputs, options, calibration_hash=...)
    with cache.triton_cache(key):                  # Triton's binaries land in our cache too
        entry = cache.build_or_get(key, lambda: Artifacts(files, tensors, meta))
        engine = load(entry.files, entry.tensors, entry.meta, weights)   # bind weights here
        engine.warm_up()   # Triton compiles (or finds its binaries) at a kernel's first launch:
                           # that launch must happen inside the block too
    report.cache = cache.stats()                   # hits, misses, bypasses and their reasons

Weights are not in the key: engines bind them at load time (refit path). Nothing here imports
Triton at import time, and nothing is ever unpickled: entries are JSON, raw bytes and
safetensors, all verified before use.
"""
from .entry import Artifacts, Entry
from .key import CacheKey, input_metadata, source_hash, tensor_digest
from .location import (CACHE_DIR_ENV, default_root, device_arch, resolve_root, toolchain_tag,
                       triton_cache, triton_cache_dir)
from .store import DEFAULT_MAX_BYTES, CacheWarning, EngineCache, EntryInfo

__all__ = [
    "Artifacts", "CACHE_DIR_ENV", "CacheKey", "CacheWarning", "DEFAULT_MAX_BYTES", "EngineCache",
    "Entry", "EntryInfo", "default_root", "device_arch", "input_metadata", "resolve_root",
    "source_hash", "tensor_digest", "toolchain_tag", "triton_cache", "triton_cache_dir",
]
