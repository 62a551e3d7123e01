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


# --------------------------------------------------------------------------- the stored post-pass graph
class Folding(nn.Module):
    """Two GEMMs over one input (merged into one GEMM over concatenated weights: a constant
    program) and a LayerNorm; K and N of 32 so a quantization config selects both."""

    def __init__(self, width=32):
        super().__init__()
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(torch.relu(self.q(x)) + self.k(x))


def _compiled(model, cache_dir, report=None, **options):
    from compile_backend.backend import compile_backend as backend

    torch._dynamo.reset()
    return torch.compile(model, backend=lambda gm, ex, **kw: backend(gm, ex, report=report, **kw),
                         options={"cache_dir": str(cache_dir), **options})


def _report():
    from compile_backend.report import Report

    return Report()


def _no_passes(monkeypatch):
    from compile_backend import capture, fx_passes

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit ran the fx passes")

    monkeypatch.setattr(fx_passes, "run_passes", refuse)
    monkeypatch.setattr(capture, "specialize", refuse)


def test_hit_skips_the_passes_and_equals_the_cold_engine(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = Folding().eval(), torch.randn(6, 32)
    cold_report = _report()
    with torch.no_grad():
        cold = _compiled(model, tmp_path, cold_report)(x)
    assert cold_report.graphs[0].cache["graph"] == "stored"
    graph_json = next(pathlib.Path(tmp_path).rglob("graph.json"))
    import json

    assert json.loads(graph_json.read_text())["programs"], "the merged weights should come from a constant program"
    _no_passes(monkeypatch)
    warm_report = _report()
    with torch.no_grad():
        warm = _compiled(model, tmp_path, warm_report)(x)
    g, c = warm_report.graphs[0], cold_report.graphs[0]
    assert g.cache["engine"] == "hit" and g.cache["passes"] == "skipped" and g.cache["graph"] == "loaded"
    assert torch.equal(warm, cold) and warm.stride() == cold.stride()
    assert (g.passes, g.rules, g.kernels, g.fallbacks, g.memory) == (c.passes, c.rules, c.kernels, c.fallbacks, c.memory)
    assert g.fired() == c.fired() and "merge_parallel_gemms" in g.fired()


def test_refit_after_a_hit_follows_the_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = Folding().eval(), torch.randn(6, 32)
    with torch.no_grad():
        _compiled(model, tmp_path)(x)
    _no_passes(monkeypatch)
    other = Folding().eval()  # other weights at the hit: the programs fold them, not the stored ones
    compiled = _compiled(other, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), other(x), rtol=1e-4, atol=1e-4)
        weight_before = other.q.weight.clone()
        other.q.weight.mul_(-2.0)  # in place: the engine refits the merged weight from it
        other.k.bias.add_(1.0)
        torch.testing.assert_close(compiled(x), other(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(other.q.weight, weight_before * -2.0)  # the refit never wrote into a weight


def _rewrite_entry_file(entry_dir: pathlib.Path, relative: str, data: bytes) -> None:
    """What a writer with access to the directory could leave: consistent sizes and checksums."""
    import hashlib
    import json

    (entry_dir / relative).write_bytes(data)
    manifest = json.loads((entry_dir / "manifest.json").read_text())
    manifest["sizes"]["files"][relative] = len(data)
    manifest["sizes"]["total"] = sum(manifest["sizes"]["files"].values())
    manifest["sha256"][relative] = hashlib.sha256(data).hexdigest()
    (entry_dir / "manifest.json").write_text(json.dumps(manifest))


def _target_to(name):
    def change(record):
        node = next(n for n in record["graph"]["nodes"] if n["op"] == "call_function")
        node["target"] = name
    return change


STORED_GRAPH_CHANGES = {
    "a Python builtin as target": _target_to("builtins.eval"),
    "an operator of another namespace": _target_to("os.system.default"),
    "a frozen weight bound elsewhere": lambda r: r["bound"][0].__setitem__(1, "_frozen_999"),
    "a constant program reading nothing": lambda r: r["programs"][0].__setitem__("inputs", ["_nothing"]),
    "a keyword injected into the engine's source": lambda r: next(
        n for n in r["graph"]["nodes"] if n["op"] == "call_function")["kwargs"].update({"x=print(1)": None}),
    "not JSON": None,
}


@pytest.mark.parametrize("change", sorted(STORED_GRAPH_CHANGES))
def test_hostile_stored_graph_is_refused_and_the_passes_run(tmp_path, change):
    import json

    torch.manual_seed(0)
    model, x = Folding().eval(), torch.randn(6, 32)
    with torch.no_grad():
        cold = _compiled(model, tmp_path)(x)
    graph_json = next(pathlib.Path(tmp_path).rglob("graph.json"))
    record = json.loads(graph_json.read_text())
    if STORED_GRAPH_CHANGES[change] is None:
        data = b"{not json"
    else:
        STORED_GRAPH_CHANGES[change](record)
        data = json.dumps(record).encode()
    _rewrite_entry_file(graph_json.parent.parent, "files/graph.json", data)
    report = _report()
    with torch.no_grad():
        warm = _compiled(model, tmp_path, report)(x)
    cache = report.graphs[0].cache
    assert cache["engine"] == "hit" and cache["passes"] == "ran" and cache["graph"] == "refused", cache
    assert cache["graph_reason"]
    assert torch.equal(warm, cold)


def test_unstorable_graph_is_recorded_and_hits_run_the_passes(tmp_path, monkeypatch):
    from compile_backend.cache import post_pass

    def unstorable(front, aten_gm):
        raise post_pass.Unstorable("a node this format cannot hold")

    monkeypatch.setattr(post_pass, "dump", unstorable)
    torch.manual_seed(0)
    model, x = Folding().eval(), torch.randn(6, 32)
    cold_report, warm_report = _report(), _report()
    with torch.no_grad():
        cold = _compiled(model, tmp_path, cold_report)(x)
        warm = _compiled(model, tmp_path, warm_report)(x)
    assert cold_report.graphs[0].cache["graph"] == "not stored"
    cache = warm_report.graphs[0].cache
    assert cache["engine"] == "hit" and cache["passes"] == "ran"
    assert cache["graph_reason"] == "a node this format cannot hold"
    assert torch.equal(warm, cold)


def test_quantized_hit_reports_the_same_layers(tmp_path, monkeypatch):
    from compile_backend import quant
    from compile_backend.report import quant_lines

    cfg = quant.QuantConfig(precision="int8", activations="dynamic")
    torch.manual_seed(0)
    model, x = Folding().eval(), torch.randn(6, 32)
    cold_report, warm_report = _report(), _report()
    with torch.no_grad():
        cold = _compiled(model, tmp_path, cold_report, quant=cfg)(x)
        _no_passes(monkeypatch)
        warm = _compiled(model, tmp_path, warm_report, quant=cfg)(x)
    g, c = warm_report.graphs[0], cold_report.graphs[0]
    assert g.cache["passes"] == "skipped"
    assert c.quant and quant_lines(g.quant) == quant_lines(c.quant)
    assert g.fired() == c.fired() and g.standalone_quantizes == c.standalone_quantizes
    assert torch.equal(warm, cold)


def test_autocast_batchnorm_training_hits_its_stored_backward_graph(tmp_path):
    """On the CPU, BatchNorm of bf16 input under autocast saves fp32 statistics that AOT's backward
    graph records as bf16: the graph's metadata is propagated again from the real inputs, so the
    stored backward graph matches them and a second process loads it (it was refused every run)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 5)).train()
    x = torch.randn(2, 3, 6, 6)
    reports, grads = [], []
    for _ in range(2):
        with torch.autocast("cpu", torch.bfloat16):
            reports.append(_explain(model, x, tmp_path))
        torch._dynamo.reset()
        model.zero_grad()
        compiled = torch.compile(model, backend="compile_backend", options={"cache_dir": str(tmp_path)})
        with torch.autocast("cpu", torch.bfloat16):
            out = compiled(x)
        out.float().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    cold, warm = reports
    assert [g.role for g in warm.graphs] == ["forward", "backward"]
    assert [g.cache["graph"] for g in cold.graphs] == ["stored", "stored"]
    assert [g.cache["graph"] for g in warm.graphs] == ["loaded", "loaded"], [g.cache for g in warm.graphs]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
