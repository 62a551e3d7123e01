"""EngineCache: round trips, reads you cannot trust (issue #8 point 5), failed writes, LRU cap."""
import errno
import fcntl
import json
import os
import shutil
import warnings

import pytest
import torch

from compile_backend.cache import CacheKey, CacheWarning, EngineCache, entry as entry_format, trust
from compile_backend.cache.store import LOCKS_DIR

GRAPH = "x = placeholder\ny = aten.sin(x)\noutput(y)"


def _key(graph=GRAPH, arch="sm90"):
    return CacheKey.create(graph, [torch.ones(3, 5)], {"precision": "fp32"}, arch=arch, gpu_name="test-gpu")


class Builder:
    """A build_fn that counts its calls and returns fresh, recognisable artifacts."""

    def __init__(self, scale=1.0):
        self.calls = 0
        self.scale = scale

    def __call__(self):
        self.calls += 1
        files = {"kernel.py": b"def kernel(): pass\n", "plan.json": b'{"launches": 3}'}
        tensors = {"scales": torch.arange(7, dtype=torch.float16) * self.scale,
                   "table": torch.arange(15, dtype=torch.int32).reshape(3, 5)}
        return files, tensors, {"calls": self.calls}


def _assert_is_build(entry, builder):
    files, tensors, _ = Builder(builder.scale)()
    assert entry.files == files
    assert set(entry.tensors) == set(tensors)
    assert all(torch.equal(entry.tensors[n], tensors[n]) for n in tensors)


@pytest.fixture
def cache(tmp_path):
    return EngineCache(tmp_path / "cache")


@pytest.fixture
def stored(cache):
    """A cache holding one valid entry; returns (cache, key, entry path)."""
    key = _key()
    entry = cache.build_or_get(key, Builder())
    assert entry.stored
    return cache, key, entry.path


# --------------------------------------------------------------------------------- round trip
def test_round_trip_hit_and_miss_counts(cache):
    key, builder = _key(), Builder()
    first = cache.build_or_get(key, builder)
    assert not first.from_cache and first.stored
    second = cache.build_or_get(key, builder)
    assert second.from_cache and builder.calls == 1
    _assert_is_build(second, builder)
    assert second.meta == {"calls": 1}
    assert cache.get(_key(GRAPH + "\n# other")) is None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["writes"]) == (1, 2, 1)
    assert stats["bypasses"] == [] and stats["bypass_reasons"] == {}
    assert stats["dir"] == str(cache.root)


def test_entry_layout_and_manifest(stored):
    cache, key, path = stored
    assert path == cache.root / "sm90" / key.toolchain / "entries" / key.digest
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == key.describe()
    assert manifest["arch"] == "sm90" and manifest["versions"] == key.versions
    assert set(manifest["sha256"]) == {"files/kernel.py", "files/plan.json", "tensors.safetensors"}
    assert manifest["sizes"]["total"] == sum(manifest["sizes"]["files"].values())
    assert manifest["created"] <= manifest["last_used"]
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.pkl"))
    assert oct(os.stat(cache.root).st_mode & 0o777) == "0o700"


def test_hit_updates_last_used_and_hits(stored, monkeypatch):
    cache, key, path = stored
    monkeypatch.setattr(entry_format, "_now", lambda: 4_000_000_000.0)
    cache.get(key)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["last_used"] == 4_000_000_000.0 and manifest["hits"] == 1
    assert manifest["created"] < manifest["last_used"]


def test_put_refuses_caller_mistakes(cache):
    with pytest.raises(ValueError, match="file name"):
        cache.put(_key(), {"../escape": b""}, {}, {})
    with pytest.raises(TypeError, match="bytes"):
        cache.put(_key(), {"a.txt": "text"}, {}, {})
    with pytest.raises(TypeError, match="JSON"):
        cache.put(_key(), {}, {}, {"fn": print})


# --------------------------------------------------------------------------------- point 5: entries
def _rewrite_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _corrupt_manifest(path):
    (path / "manifest.json").write_bytes(b"{not json")


def _truncate_manifest(path):
    data = (path / "manifest.json").read_bytes()
    (path / "manifest.json").write_bytes(data[: len(data) // 2])


def _truncate_tensors(path):
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[:-5])


def _remove_file(path):
    (path / "files" / "plan.json").unlink()


def _flip_a_byte(path):
    data = bytearray((path / "files" / "kernel.py").read_bytes())
    data[3] ^= 0xFF
    (path / "files" / "kernel.py").write_bytes(bytes(data))


def _garbage_tensors_with_valid_checksum(path):
    import hashlib

    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{\"x\": 12345678}"
    (path / "tensors.safetensors").write_bytes(garbage)

    def fix(manifest):
        manifest["sizes"]["files"]["tensors.safetensors"] = len(garbage)
        manifest["sha256"]["tensors.safetensors"] = hashlib.sha256(garbage).hexdigest()
    _rewrite_manifest(path, fix)


def _other_arch(path):
    _rewrite_manifest(path, lambda m: m.update(arch="sm80"))


def _other_version(path):
    _rewrite_manifest(path, lambda m: m["versions"].update(torch="1.0.0"))


def _other_format(path):
    _rewrite_manifest(path, lambda m: m.update(format=99))


def _other_key(path):
    _rewrite_manifest(path, lambda m: m["key"].update(graph="something else"))


def _hostile_file_name(path):
    def change(manifest):
        manifest["sizes"]["files"]["files/../../x"] = 1
        manifest["sha256"]["files/../../x"] = "0" * 64
    _rewrite_manifest(path, change)


def _symlinked_entry(path):
    elsewhere = path.parent.parent / "elsewhere"
    shutil.copytree(path, elsewhere)  # a perfectly valid copy, reached through a link
    shutil.rmtree(path)
    path.symlink_to(elsewhere, target_is_directory=True)


def _symlinked_file(path):
    target = path.parent.parent / "kernel-copy.py"
    shutil.copy(path / "files" / "kernel.py", target)  # same bytes: only the link is wrong
    (path / "files" / "kernel.py").unlink()
    (path / "files" / "kernel.py").symlink_to(target)


def _symlinked_manifest(path):
    target = path.parent.parent / "manifest-copy.json"
    shutil.copy(path / "manifest.json", target)
    (path / "manifest.json").unlink()
    (path / "manifest.json").symlink_to(target)


def _symlinked_files_dir(path):
    target = path.parent.parent / "files-copy"
    shutil.copytree(path / "files", target)
    shutil.rmtree(path / "files")
    (path / "files").symlink_to(target, target_is_directory=True)


def _group_writable_entry(path):
    os.chmod(path, 0o770)


def _other_writable_file(path):
    os.chmod(path / "files" / "plan.json", 0o606)


ENTRY_DAMAGE = {
    "corrupt manifest": (_corrupt_manifest, trust.CORRUPT, "manifest.json"),
    "truncated manifest": (_truncate_manifest, trust.CORRUPT, "manifest.json"),
    "truncated tensors": (_truncate_tensors, trust.TRUNCATED, "tensors.safetensors"),
    "missing file": (_remove_file, trust.TRUNCATED, "plan.json"),
    "checksum mismatch": (_flip_a_byte, trust.CHECKSUM_MISMATCH, "kernel.py"),
    "corrupt tensors": (_garbage_tensors_with_valid_checksum, trust.CORRUPT, "tensors.safetensors"),
    "other arch": (_other_arch, trust.OTHER_ARCH, "entries"),
    "other version": (_other_version, trust.OTHER_VERSION, "entries"),
    "other format": (_other_format, trust.OTHER_VERSION, "entries"),
    "other key": (_other_key, trust.KEY_MISMATCH, "entries"),
    "hostile file name": (_hostile_file_name, trust.CORRUPT, "manifest.json"),
    "symlinked entry": (_symlinked_entry, trust.SYMLINK, "entries"),
    "symlinked file": (_symlinked_file, trust.SYMLINK, "kernel.py"),
    "symlinked manifest": (_symlinked_manifest, trust.SYMLINK, "manifest.json"),
    "symlinked files dir": (_symlinked_files_dir, trust.SYMLINK, "files"),
    "group-writable entry": (_group_writable_entry, trust.LOOSE_PERMISSIONS, "entries"),
    "other-writable file": (_other_writable_file, trust.LOOSE_PERMISSIONS, "plan.json"),
}


@pytest.mark.parametrize("case", list(ENTRY_DAMAGE))
def test_untrusted_entry_is_never_loaded_and_is_rebuilt(stored, case):
    cache, key, path = stored
    damage, reason, path_part = ENTRY_DAMAGE[case]
    damage(path)
    fresh = EngineCache(cache.root)  # a new process, as it were
    builder = Builder(scale=2.0)  # distinguishable from what was stored
    with pytest.warns(CacheWarning) as caught:
        entry = fresh.build_or_get(key, builder)
    assert builder.calls == 1, "the damaged entry must not be loaded"
    assert not entry.from_cache and entry.stored
    _assert_is_build(entry, builder)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert reason in messages[0] and path_part in messages[0] and str(cache.root) in messages[0]
    stats = fresh.stats()
    assert stats["bypass_reasons"] == {reason: 1} and stats["misses"] == 1 and stats["hits"] == 0
    # the rebuilt entry replaced the damaged one and is a real directory now
    assert not path.is_symlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = EngineCache(cache.root).get(key)
    assert again is not None and again.from_cache
    _assert_is_build(again, builder)


def test_same_damage_warns_once_per_cache(stored):
    cache, key, path = stored
    _flip_a_byte(path)
    fresh = EngineCache(cache.root)
    with pytest.warns(CacheWarning):
        assert fresh.get(key) is None
    fresh.put(key, *Builder()())
    _flip_a_byte(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fresh.get(key) is None
    assert not [w for w in caught if issubclass(w.category, CacheWarning)]
    assert fresh.stats()["bypasses"][0]["count"] == 2


# --------------------------------------------------------------------------------- point 5: directories
def _fake_other_owner(monkeypatch):
    monkeypatch.setattr(trust, "current_uid", lambda: os.geteuid() + 1)


@pytest.mark.parametrize("case", ["root group-writable", "root other-writable", "arch dir group-writable",
                                  "root owned by another user"])
def test_untrusted_cache_dir_is_bypassed_not_read_nor_written(stored, monkeypatch, case):
    cache, key, path = stored
    root = cache.root
    if case == "root group-writable":
        os.chmod(root, 0o770)
        reason, shown = trust.LOOSE_PERMISSIONS, root
    elif case == "root other-writable":
        os.chmod(root, 0o703)
        reason, shown = trust.LOOSE_PERMISSIONS, root
    elif case == "arch dir group-writable":
        os.chmod(root / "sm90", 0o775)
        reason, shown = trust.LOOSE_PERMISSIONS, root / "sm90"
    else:
        _fake_other_owner(monkeypatch)
        reason, shown = trust.FOREIGN_OWNER, root
    before = sorted(root.rglob("*"))
    fresh = EngineCache(root)
    builder = Builder(scale=3.0)
    # a new key of another arch (root cases) or of the untrusted arch: nothing may be created
    other = _key(GRAPH + "\n# new graph", arch="sm90" if "arch dir" in case else "sm80")
    with pytest.warns(CacheWarning) as caught:
        entry = fresh.build_or_get(key, builder)  # the valid entry there must not be read
        new = fresh.build_or_get(other, Builder())  # nor anything written
    assert builder.calls == 1 and not entry.from_cache and not entry.stored
    _assert_is_build(entry, builder)
    assert not new.stored
    assert sorted(root.rglob("*")) == before, "nothing may be created in an untrusted cache"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and reason in messages[0] and str(shown) in messages[0], messages
    assert fresh.stats()["bypass_reasons"] == {reason: 2}


def test_symlinked_arch_dir_is_bypassed(stored, tmp_path):
    cache, key, _ = stored
    moved = tmp_path / "moved-arch"
    (cache.root / "sm90").rename(moved)
    (cache.root / "sm90").symlink_to(moved, target_is_directory=True)
    with pytest.warns(CacheWarning, match="symlink"):
        entry = EngineCache(cache.root).build_or_get(key, Builder())
    assert not entry.from_cache and not entry.stored


def test_root_may_be_a_symlink_to_a_private_dir(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    cache = EngineCache(tmp_path / "link")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.build_or_get(_key(), Builder())
        assert cache.get(_key()).from_cache


# --------------------------------------------------------------------------------- failed writes
def _fail_writes(monkeypatch, code):
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(entry_format, "write_entry", failing)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, trust.DISK_FULL), (errno.EROFS, trust.UNWRITABLE),
                                          (errno.EACCES, trust.UNWRITABLE), (errno.ENOENT, trust.VANISHED)])
def test_failed_writes_return_the_build_with_one_warning(cache, monkeypatch, code, reason):
    _fail_writes(monkeypatch, code)
    builders = [Builder(), Builder()]
    with pytest.warns(CacheWarning) as caught:
        first = cache.build_or_get(_key(), builders[0])
        second = cache.build_or_get(_key(GRAPH + "\n# 2"), builders[1])
    assert [b.calls for b in builders] == [1, 1]
    assert not first.stored and not second.stored
    _assert_is_build(first, builders[0])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and reason in messages[0] and str(cache.root) in messages[0], messages
    assert cache.stats()["bypass_reasons"] == {reason: 2}
    assert not list((cache.scope_dir(_key()) / "tmp").iterdir()), "temporary files must be cleaned up"


def test_cache_dir_that_vanishes_mid_write(cache, monkeypatch):
    real_write = entry_format.write_entry

    def vanish_then_write(tmp, key, artifacts):
        shutil.rmtree(cache.root)
        return real_write(tmp, key, artifacts)
    monkeypatch.setattr(entry_format, "write_entry", vanish_then_write)
    builder = Builder()
    with pytest.warns(CacheWarning, match=trust.VANISHED):
        entry = cache.build_or_get(_key(), builder)
    assert not entry.stored and builder.calls == 1
    _assert_is_build(entry, builder)


def test_unwritable_root_cannot_be_created(tmp_path, monkeypatch):
    real_makedirs = os.makedirs
    root = tmp_path / "readonly" / "cache"

    def makedirs(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, "makedirs", makedirs)
    cache = EngineCache(root)
    with pytest.warns(CacheWarning, match=trust.UNWRITABLE):
        entry = cache.build_or_get(_key(), Builder())
    assert not entry.stored
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same cause, same path: no second warning
        assert not cache.put(_key(), *Builder()()).stored
    assert cache.stats()["bypass_reasons"] == {trust.UNWRITABLE: 2}


def test_read_only_cache_still_serves_hits(stored, monkeypatch):
    cache, key, _ = stored
    shutil.rmtree(cache.scope_dir(key) / LOCKS_DIR)  # a prepopulated, read-only cache
    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):
        if str(path).startswith(str(cache.root)) and not os.path.isdir(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, "makedirs", makedirs)
    _fail_writes(monkeypatch, errno.EROFS)
    monkeypatch.setattr(entry_format, "_write_new", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = EngineCache(cache.root).build_or_get(key, Builder())
    assert entry.from_cache


def test_lock_timeout_builds_anyway_with_a_warning(stored):
    cache, key, _ = stored
    other = _key(GRAPH + "\n# locked")
    scope = cache.scope_dir(other)
    os.makedirs(scope / LOCKS_DIR, exist_ok=True)
    with open(scope / LOCKS_DIR / f"{other.digest}.lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # "another process" is building this key
        slow = EngineCache(cache.root, lock_timeout_s=0.2)
        builder = Builder()
        with pytest.warns(CacheWarning, match=trust.LOCK_TIMEOUT):
            entry = slow.build_or_get(other, builder)
    assert builder.calls == 1 and entry.stored


def test_concurrent_writer_already_won(stored):
    """put() when another writer's valid entry is already in place keeps that one."""
    cache, key, path = stored
    inode = os.stat(path).st_ino
    entry = EngineCache(cache.root).put(key, *Builder(scale=5.0)())
    assert entry.stored and entry.path == path and os.stat(path).st_ino == inode
    assert entry.meta == {"calls": 1}


# --------------------------------------------------------------------------------- size cap
def test_lru_eviction_order(tmp_path, monkeypatch):
    clock = iter(range(1000, 100000))
    monkeypatch.setattr(entry_format, "_now", lambda: float(next(clock)))
    keys = {name: _key(GRAPH + f"\n# {name}") for name in "ABCDE"}
    probe = EngineCache(tmp_path / "probe")
    probe.put(keys["A"], *Builder()())
    size = probe.total_bytes()
    cache = EngineCache(tmp_path / "cache", max_bytes=3 * size + size // 2)  # room for three
    for name in "ABC":
        cache.put(keys[name], *Builder()())
    assert cache.get(keys["A"]) is not None  # A is now more recent than B and C
    cache.put(keys["D"], *Builder()())
    present = {name for name, key in keys.items() if cache.entry_dir(key).exists()}
    assert present == {"A", "C", "D"}
    assert cache.stats()["evictions"] == 1
    cache.get(keys["C"])  # order of use now: A, D, C
    cache.put(keys["E"], *Builder()())
    present = {name for name, key in keys.items() if cache.entry_dir(key).exists()}
    assert present == {"C", "D", "E"}
    assert cache.total_bytes() <= cache.max_bytes


def test_prune_to_zero_keeps_nothing_and_clears_stale_tmp(stored, monkeypatch):
    cache, key, _ = stored
    stale = cache.scope_dir(key) / "tmp" / "crashed-writer"
    stale.mkdir()
    os.utime(stale, (0, 0))
    evicted = cache.prune(0)
    assert [info.digest for info in evicted] == [key.digest]
    assert cache.entries() == [] and not stale.exists()


def test_arches_live_apart(tmp_path):
    cache = EngineCache(tmp_path)
    cache.put(_key(arch="sm90"), *Builder()())
    cache.put(_key(arch="sm80"), *Builder()())
    assert {info.arch for info in cache.entries()} == {"sm90", "sm80"}
    assert cache.clear(arch="sm80") == 1
    assert {info.arch for info in cache.entries()} == {"sm90"}
    assert cache.get(_key(arch="sm90")) is not None
