"""Nothing is left behind: generated kernel sources stay in memory, files are closed, and the
test suite removes the cache root it made (issue #14, item 12)."""
import gc
import inspect
import os
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import torch

from compile_backend.kernels import launch

ROOT = Path(__file__).parents[1]

KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def add_one_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # {tag}
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)
'''


def test_generated_source_is_not_written_and_triton_reads_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the old loader wrote
    source = KERNEL.format(tag=uuid.uuid4().hex)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = launch.load_source(source)
        kernel = module.add_one_kernel
        x = torch.arange(7, dtype=torch.float32)
        out = torch.empty_like(x)
        kernel[(1,)](x, out, 7, BLOCK=8)  # TRITON_INTERPRET=1 (conftest): runs on the CPU
        del module, kernel
        gc.collect()
    assert torch.equal(out, x + 1)
    assert not any(issubclass(w.category, ResourceWarning) for w in caught), [str(w.message) for w in caught]
    assert list(tmp_path.iterdir()) == []
    again = launch.load_source(source)
    assert again is launch.load_source(source)
    # triton.jit and tracebacks read the source through linecache
    assert "tl.store(out_ptr + offs" in inspect.getsource(again.add_one_kernel.fn)
    assert again.add_one_kernel.fn.__code__.co_filename.startswith("<compile_backend generated")


def test_test_session_removes_its_cache_root(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import os\n"
        "def test_cache_root_exists():\n"
        "    assert os.path.isdir(os.environ['COMPILE_BACKEND_CACHE_DIR'])\n")
    env = {k: v for k, v in os.environ.items() if k != "COMPILE_BACKEND_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(ROOT), "--confcutdir", str(ROOT / "tests"),
                           "-c", os.devnull, "-p", "conftest", str(probe)],
                          cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(tmp_path.glob("cb-test-cache-*"))
