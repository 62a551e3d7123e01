"""The engine cache through the pipeline: a second compile of the same graph is a hit that
rebuilds exactly what the cold compile gave (outputs, strides, number of outputs, aliasing),
a changed graph/shape/option misses, an untrusted cache is bypassed with the reason reported,
and two processes compiling one model at once build it once.

Runs under TRITON_INTERPRET=1 (conftest): engines with generated kernels are what gets cached.
"""
import multiprocessing
import os
import pathlib
import warnings

import pytest
import torch
import torch.nn as nn

import compile_backend
from compile_backend.cache import CacheWarning


class Block(nn.Module):
    """GEMM + epilogue, a reduction, and outputs that alias (a view of another output, an input
    passed through)."""

    def __init__(self, width=24):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        h = torch.relu(self.fc(x)) + x
        y = self.norm(h)
        return y, y.transpose(0, 1), x


def _explain(model, x, cache_dir, **options):
    torch._dynamo.reset()
    return compile_backend.explain(model, x, cache_dir=str(cache_dir), **options)


def _run(model, x, cache_dir):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="compile_backend", options={"cache_dir": str(cache_dir)})
    with torch.no_grad():
        return compiled(x)


def test_second_compile_hits_and_restores_the_cold_result(tmp_path):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(5, 24)
    cold = _explain(model, x, tmp_path)
    assert cold.to_dict()["cache"]["misses"] == 1 and cold.to_dict()["cache"]["hits"] == 0
    warm = _explain(model, x, tmp_path)
    summary = warm.to_dict()["cache"]
    assert summary["hits"] == 1 and summary["misses"] == 0
    assert [k["impl"] for k in warm.graphs[0].kernels] == [k["impl"] for k in cold.graphs[0].kernels]
    assert [k["config"] for k in warm.graphs[0].kernels] == [k["config"] for k in cold.graphs[0].kernels]
    assert "engine cache hit" in str(warm)

    out_cold = _run(model, x, tmp_path / "other")  # a cold compile in another root
    out_warm = _run(model, x, tmp_path)  # a hit
    assert len(out_warm) == len(out_cold) == 3
    for a, b in zip(out_cold, out_warm):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype
    # aliasing as eager gives it: output 1 is a view of output 0, output 2 is the input itself
    assert out_warm[1].data_ptr() == out_warm[0].data_ptr()
    assert (out_warm[2] is x) == (out_cold[2] is x)
    ref = model(x)
    torch.testing.assert_close(out_warm[0], ref[0], rtol=1e-4, atol=1e-4)


def test_hit_binds_the_current_weights(tmp_path):
    """Weights are not in the key: a hit with other weights computes with those weights."""
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(5, 24)
    _run(model, x, tmp_path)
    other = Block().eval()  # same architecture, different weights
    out = _run(other, x, tmp_path)
    torch.testing.assert_close(out[0], other(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change", ["shape", "dtype", "option", "graph"])
def test_a_changed_component_misses(tmp_path, change):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(5, 24)
    _explain(model, x, tmp_path)
    options = {}
    if change == "shape":
        x = torch.randn(7, 24)
    elif change == "dtype":
        model, x = model.double(), x.double()
    elif change == "option":
        options = {"validate": False}
    else:
        model.norm = nn.Identity()
    report = _explain(model, x, tmp_path, **options)
    assert report.to_dict()["cache"]["misses"] == 1 and report.to_dict()["cache"]["hits"] == 0


def test_untrusted_cache_directory_is_bypassed_and_reported(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)  # writable by others: never read or written
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(5, 24)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _explain(model, x, root)
    assert any(issubclass(w.category, CacheWarning) for w in caught)
    summary = report.to_dict()["cache"]
    assert summary["hits"] == 0 and summary["bypasses"], summary
    assert "writable" in str(summary["bypasses"][0]["reason"]).lower() or summary["bypasses"][0]["reason"]
    assert not (root / "entries").exists() and list(root.iterdir()) == []
    assert "cache bypass" in str(report)


def test_corrupt_entry_is_rebuilt(tmp_path):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(5, 24)
    _explain(model, x, tmp_path)
    manifests = list(pathlib.Path(tmp_path).rglob("manifest.json"))
    assert len(manifests) == 1
    engine_py = manifests[0].parent / "files" / "engine.py"
    data = bytearray(engine_py.read_bytes())
    data[-2] = ord("#") if data[-2] != ord("#") else ord("$")  # same size, other content
    engine_py.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _explain(model, x, tmp_path)
    assert any("checksum" in str(w.message).lower() or "sha" in str(w.message).lower() for w in caught), \
        [str(w.message) for w in caught]
    assert report.to_dict()["cache"]["misses"] == 1
    assert _explain(model, x, tmp_path).to_dict()["cache"]["hits"] == 1  # rebuilt and stored again


def _child(cache_dir, barrier, queue):
    os.environ["TRITON_INTERPRET"] = "1"
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(5, 24)
    barrier.wait()
    report = compile_backend.explain(model, x, cache_dir=cache_dir)
    queue.put(report.to_dict()["cache"]["hits"])


def test_two_processes_build_one_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    hits = sorted(queue.get(timeout=5) for _ in procs)
    assert hits == [0, 1]  # one built it, the other waited on the key's lock and loaded it
    assert len(list(pathlib.Path(tmp_path).rglob("manifest.json"))) == 1


def test_first_engine_call_loads_triton_binaries_from_our_cache(tmp_path, monkeypatch):
    """Triton builds or loads kernels and launchers lazily on the first launch: that call must
    use our cache's Triton directory, or a warm process compiles them again elsewhere."""
    from compile_backend.engine import Engine

    seen = []
    real = Engine._call

    def spy(self, args):
        seen.append(os.environ.get("TRITON_CACHE_DIR"))
        return real(self, args)

    monkeypatch.setattr(Engine, "_call", spy)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(5, 24)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="compile_backend", options={"cache_dir": str(tmp_path / "ours")})
    with torch.no_grad():
        compiled(x)
        compiled(x)
    assert len(seen) == 2
    first = pathlib.Path(seen[0])
    assert first.name == "triton" and (tmp_path / "ours") in first.parents
    assert seen[1] == str(tmp_path / "elsewhere")  # later calls leave the process setting alone
