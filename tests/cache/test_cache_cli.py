"""``python -m compile_backend cache list|info|clear|prune``."""
import argparse
import io

import pytest
import torch

from compile_backend.cache import CacheKey, EngineCache, cli


def _fill(root):
    """Two sm90 entries (one used twice) and one interp entry; returns their keys."""
    cache = EngineCache(root)
    keys = {}
    for name, arch in (("a", "sm90"), ("b", "sm90"), ("c", "interp")):
        keys[name] = CacheKey.create(f"graph {name}\nline 2", [torch.ones(3, 5)], {"precision": "fp16"},
                                     arch=arch, gpu_name="test-gpu")
        cache.put(keys[name], {"kernel.py": b"x" * 1000}, {"w": torch.ones(17)}, {"name": name})
    cache.get(keys["a"])
    cache.get(keys["a"])
    return keys


def _run(*argv):
    out = io.StringIO()
    status = cli.main(list(argv), out=out)
    return status, out.getvalue()


def test_list_shows_entries_per_arch_with_sizes_and_hits(tmp_path):
    keys = _fill(tmp_path)
    status, text = _run("list", "--cache-dir", str(tmp_path))
    assert status == 0
    lines = text.splitlines()
    row_a = next(line for line in lines if keys["a"].digest[:16] in line)
    assert row_a.split()[0] == "sm90" and row_a.split()[2] == keys["a"].digest[:16]
    assert row_a.split()[5] == "2"  # hits
    assert "KiB" in row_a
    assert any(line.startswith("sm90: 2 entries") and line.endswith("2 hits") for line in lines)
    assert any(line.startswith("interp: 1 entries") for line in lines)
    assert any(line.startswith("total: 3 entries") for line in lines)


def test_list_of_an_empty_cache(tmp_path):
    assert _run("list", "--cache-dir", str(tmp_path / "none")) == (0, f"cache: {tmp_path / 'none'}\nno entries\n")


def test_info_summary_and_one_entry(tmp_path):
    keys = _fill(tmp_path)
    status, text = _run("info", "--cache-dir", str(tmp_path))
    assert status == 0
    assert f"cache dir: {tmp_path}" in text and "status: ok" in text and "entries: 3" in text
    status, text = _run("info", keys["b"].digest[:10], "--cache-dir", str(tmp_path))
    assert status == 0
    assert "integrity: ok" in text and "arch: sm90" in text and '"name": "b"' in text
    assert "files/kernel.py" in text and "tensor w: torch.float32 [17]" in text
    assert "graph b" in text and '"precision": "fp16"' in text


def test_info_reports_a_damaged_entry(tmp_path):
    keys = _fill(tmp_path)
    path = EngineCache(tmp_path).entry_dir(keys["a"])
    (path / "files" / "kernel.py").write_bytes(b"y" * 1000)
    status, text = _run("info", keys["a"].digest, "--cache-dir", str(tmp_path))
    assert status == 1 and "integrity: FAILED" in text and "checksum mismatch" in text


def test_info_unknown_or_ambiguous_prefix(tmp_path):
    _fill(tmp_path)
    assert _run("info", "zzzz", "--cache-dir", str(tmp_path))[0] == 1
    status, text = _run("info", "", "--cache-dir", str(tmp_path))  # empty prefix: the summary
    assert status == 0 and "entries: 3" in text


def test_info_names_an_untrusted_dir(tmp_path):
    _fill(tmp_path)
    tmp_path.chmod(0o777)
    status, text = _run("info", "--cache-dir", str(tmp_path))
    assert "NOT USED" in text and "writable by group or others" in text
    tmp_path.chmod(0o700)


def test_clear_with_and_without_arch(tmp_path):
    keys = _fill(tmp_path)
    status, text = _run("clear", "--arch", "interp", "--cache-dir", str(tmp_path))
    assert status == 0 and text.startswith("removed 1 entries for interp")
    assert {info.arch for info in EngineCache(tmp_path).entries()} == {"sm90"}
    assert EngineCache(tmp_path).get(keys["a"]) is not None
    status, text = _run("clear", "--cache-dir", str(tmp_path))
    assert text.startswith("removed 2 entries") and EngineCache(tmp_path).entries() == []


def test_prune_to_a_size(tmp_path):
    _fill(tmp_path)
    cache = EngineCache(tmp_path)
    biggest = max(info.size for info in cache.entries())
    status, text = _run("prune", "--max-size", str(biggest + biggest // 2), "--cache-dir", str(tmp_path))
    assert status == 0 and text.startswith("evicted 2 entries")
    remaining = cache.entries()
    assert len(remaining) == 1 and remaining[0].hits == 2, "the most recently used entry stays"
    status, text = _run("prune", "--max-size", "0", "--cache-dir", str(tmp_path))
    assert text.startswith("evicted 1 entries") and cache.entries() == []


@pytest.mark.parametrize("text, size", [("2GiB", 2 * 1024 ** 3), ("500M", 500 * 1024 ** 2), ("1.5k", 1536),
                                        ("1048576", 1048576), ("3 gb", 3 * 1024 ** 3)])
def test_parse_size(text, size):
    assert cli.parse_size(text) == size


def test_parse_size_rejects_garbage():
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size("lots")


def test_dispatch_from_python_dash_m(tmp_path, capsys):
    from compile_backend.__main__ import main

    _fill(tmp_path)
    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    assert "total: 3 entries" in capsys.readouterr().out


def test_env_var_picks_the_cache(tmp_path, monkeypatch):
    _fill(tmp_path)
    monkeypatch.setenv("COMPILE_BACKEND_CACHE_DIR", str(tmp_path))
    status, text = _run("list")
    assert status == 0 and "total: 3 entries" in text
