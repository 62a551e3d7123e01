"""Where the cache lives, per-arch/toolchain directories, and Triton's binary cache inside ours."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compile_backend.cache import location


def test_default_root_follows_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv(location.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert location.resolve_root() == tmp_path / "xdg" / "compile_backend"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert location.resolve_root() == tmp_path / "home" / ".cache" / "compile_backend"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert location.resolve_root() == tmp_path / "home" / ".cache" / "compile_backend"


def test_option_wins_over_env_which_wins_over_default(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(location.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert location.resolve_root() == tmp_path / "env"
    assert location.resolve_root(tmp_path / "option") == tmp_path / "option"
    assert location.resolve_root(str(tmp_path / "option")) == tmp_path / "option"


def test_env_var_name_matches_the_options_module():
    from compile_backend import options

    assert options.CACHE_DIR_ENV == location.CACHE_DIR_ENV == "COMPILE_BACKEND_CACHE_DIR"


def test_arch_names(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert location.device_arch("cpu") == "interp"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert location.device_arch(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert location.device_arch("cuda:0") == "sm90"


def test_toolchain_tag_and_scope_dir(tmp_path):
    tag = location.toolchain_tag("2.11.0", "3.6.0", "0.1.0")
    assert tag == "torch-2.11.0_triton-3.6.0_cb-0.1.0"
    assert location.scope_dir(tmp_path, "sm90", tag) == tmp_path / "sm90" / tag
    assert location.triton_cache_dir(tmp_path / "sm90" / tag) == tmp_path / "sm90" / tag / "triton"
    # the running toolchain: real versions, and one safe path component
    running = location.toolchain_tag()
    assert running.startswith(f"torch-{location.safe_name(torch.__version__)}_triton-")
    assert "/" not in running and ".." not in running


@pytest.mark.parametrize("text", ["../../etc", "a/b", "", ".."])
def test_safe_name_never_escapes_a_directory(text):
    name = location.safe_name(text)
    assert name and "/" not in name and name not in (".", "..")


def test_triton_cache_points_triton_into_our_dir_and_restores(monkeypatch, tmp_path):
    triton = pytest.importorskip("triton")
    from triton.runtime.cache import get_cache_manager

    monkeypatch.setenv(location.TRITON_CACHE_ENV, str(tmp_path / "before"))
    target = tmp_path / "sm90" / "tc" / "triton"
    with location.triton_cache(target) as path:
        assert path == target and target.is_dir()
        assert os.environ[location.TRITON_CACHE_ENV] == str(target)
        manager = get_cache_manager("0123456789abcdef" * 4)  # what triton.compile asks for
        written = manager.put(b"binary", "kernel.cubin", binary=True)
        assert Path(written).resolve().is_relative_to(target.resolve())
    assert os.environ[location.TRITON_CACHE_ENV] == str(tmp_path / "before")
    if hasattr(triton, "knobs"):
        assert triton.knobs.cache.dir == str(tmp_path / "before")  # reads the env again
    outside = get_cache_manager("fedcba9876543210" * 4)
    assert not Path(outside.cache_dir).resolve().is_relative_to(target.resolve())


def test_triton_cache_restores_on_error_and_unset_env(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.delenv(location.TRITON_CACHE_ENV, raising=False)
    with pytest.raises(RuntimeError):
        with location.triton_cache(tmp_path / "t"):
            raise RuntimeError("compile failed")
    assert location.TRITON_CACHE_ENV not in os.environ


def test_package_import_and_use_do_not_import_triton(tmp_path):
    code = (
        "import sys, torch\n"
        "from compile_backend.cache import CacheKey, EngineCache, Artifacts\n"
        "key = CacheKey.create('g', [torch.ones(2)], {})\n"
        f"EngineCache({str(tmp_path)!r}).build_or_get(key, lambda: Artifacts())\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_engine_cache_points_triton_into_the_key_scope(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    from triton.runtime.cache import get_cache_manager

    from compile_backend.cache import CacheKey, EngineCache

    monkeypatch.delenv(location.TRITON_CACHE_ENV, raising=False)
    cache = EngineCache(tmp_path / "cache")
    key = CacheKey.create("g", [torch.ones(2)], {}, arch="sm90", gpu_name="gpu")
    with cache.triton_cache(key) as path:
        assert path == cache.scope_dir(key) / "triton"
        written = get_cache_manager("ab" * 32).put(b"binary", "k.cubin", binary=True)
        assert Path(written).resolve().is_relative_to(path.resolve())
    assert location.TRITON_CACHE_ENV not in os.environ


def test_untrusted_cache_leaves_triton_alone(monkeypatch, tmp_path):
    from compile_backend.cache import CacheKey, EngineCache

    monkeypatch.delenv(location.TRITON_CACHE_ENV, raising=False)
    root = tmp_path / "shared"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    cache = EngineCache(root)
    key = CacheKey.create("g", [torch.ones(2)], {}, arch="sm90", gpu_name="gpu")
    with cache.triton_cache(key) as path:
        assert path is None and location.TRITON_CACHE_ENV not in os.environ
    assert cache.stats()["bypasses"] == []  # reported by build_or_get, not here


def test_overlapping_triton_cache_blocks_restore_the_setting_from_before(monkeypatch, tmp_path):
    """Two graphs building on two threads: blocks exit out of order; the last one out restores
    the setting from before the first (not the directory the other block set)."""
    pytest.importorskip("triton")
    monkeypatch.setenv(location.TRITON_CACHE_ENV, str(tmp_path / "before"))
    a, b = location.triton_cache(tmp_path / "a"), location.triton_cache(tmp_path / "b")
    a.__enter__()
    b.__enter__()
    assert os.environ[location.TRITON_CACHE_ENV] == str(tmp_path / "b")
    a.__exit__(None, None, None)  # the first block ends while the second still builds
    assert os.environ[location.TRITON_CACHE_ENV] == str(tmp_path / "b")
    b.__exit__(None, None, None)
    assert os.environ[location.TRITON_CACHE_ENV] == str(tmp_path / "before")
