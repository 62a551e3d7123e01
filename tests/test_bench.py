"""The benchmark command on CPU: records, JSON schema, plot, failures, option parsing."""
from __future__ import annotations

import datetime
import json
import math

import pytest
import torch

from benchmarks import bench

RECORD_FIELDS = {
    "model", "size", "batch", "precision", "backend", "median_ms", "p20_ms", "p80_ms", "compile_s",
    "warm_compile_s", "peak_mem_mb", "accuracy", "device", "torch", "triton", "commit", "date", "options",
}
ACCURACY_FIELDS = {"max_abs", "max_rel", "rel_l2", "cosine", "top1", "finite"}


def _records(path):
    with open(path) as f:
        return json.load(f)


def test_bench_mlp_eager_and_compile_backend(tmp_path, capsys):
    out, png = tmp_path / "results.json", tmp_path / "plot.png"
    rc = bench.main(["--model", "mlp", "--size", "tiny", "--device", "cpu",
                     "--compare", "eager,compile_backend", "--iters", "5", "--warmup", "1",
                     "--warm-compile", "--options", "validate=true", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    records = _records(out)
    assert [r["backend"] for r in records] == ["eager", "compile_backend"]
    for r in records:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert "error" not in r, r.get("traceback")
        assert (r["model"], r["size"], r["batch"], r["precision"]) == ("mlp", "tiny", 3, "fp32")
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_mem_mb"] is None  # CPU: no GPU allocator to ask
        assert r["device"].startswith("cpu") and r["torch"] == torch.__version__
        assert isinstance(r["triton"], str) and isinstance(r["commit"], str) and r["commit"]
        datetime.datetime.fromisoformat(r["date"])
        acc = r["accuracy"]
        assert set(acc) == ACCURACY_FIELDS
        assert acc["finite"] and acc["top1"] is None  # the MLP's output is not logits
        assert acc["cosine"] > 0.99999 and acc["max_rel"] < 1e-4 and acc["max_abs"] < 1e-4
        assert r["speedup_vs_eager"] > 0 and r["ratio_vs_best"] >= 1.0
    eager, cb = records
    assert eager["compile_s"] is None and eager["warm_compile_s"] is None and eager["options"] == {}
    assert cb["compile_s"] > 0 and cb["warm_compile_s"] > 0
    assert cb["options"] == {"precision": "fp32", "validate": True}  # temp cache_dir left out
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert min(r["ratio_vs_best"] for r in records) == pytest.approx(1.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = capsys.readouterr().out
    assert "compile_backend" in table and "vs eager" in table


def test_results_are_appended_and_precision_applies(tmp_path):
    out = tmp_path / "r.json"
    args = ["--size", "tiny", "--device", "cpu", "--compare", "eager", "--iters", "3", "--warmup", "0",
            "--out", str(out)]
    assert bench.main(["--model", "resnet50", "--precision", "bf16"] + args) == 0
    assert bench.main(["--model", "vit"] + args) == 0
    records = _records(out)
    assert [(r["model"], r["precision"]) for r in records] == [("resnet50", "bf16"), ("vit", "fp32")]
    bf16 = records[0]["accuracy"]
    # bf16 keeps 8 bits of mantissa: visibly off the fp32 reference but the same function
    assert 0 < bf16["rel_l2"] < 5e-2 and bf16["cosine"] > 0.99
    assert 0.0 <= bf16["top1"] <= 1.0
    assert records[1]["accuracy"]["top1"] == 1.0


def test_failing_peer_is_recorded_and_run_goes_on(tmp_path, monkeypatch):
    real = bench.compile_peer

    def flaky(peer, model, options):
        if peer == "inductor":
            raise RuntimeError("simulated inductor crash")
        return real(peer, model, options)

    monkeypatch.setattr(bench, "compile_peer", flaky)
    out = tmp_path / "r.json"
    rc = bench.main(["--model", "mlp", "--size", "tiny", "--device", "cpu", "--compare", "inductor,eager",
                     "--iters", "2", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    failed, eager = _records(out)
    assert failed["backend"] == "inductor" and "simulated inductor crash" in failed["error"]
    assert "median_ms" not in failed
    assert eager["backend"] == "eager" and "error" not in eager and eager["median_ms"] > 0


def test_custom_model_function(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def build(batch=4):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Linear(7, 5), (torch.randn(batch, 7),)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "r.json"
    assert bench.main(["--model", "my_models:build", "--batch", "6", "--device", "cpu", "--compare",
                       "eager", "--iters", "2", "--warmup", "0", "--out", str(out)]) == 0
    (r,) = _records(out)
    assert r["model"] == "my_models:build" and r["batch"] == 6
    assert r["accuracy"]["top1"] == 1.0  # a [batch, classes] output counts as logits


def test_parse_options_and_peers():
    assert bench.parse_options('{"autotune": "max", "validate": false}') == {"autotune": "max", "validate": False}
    assert bench.parse_options("autotune=30, validate=false,cuda_graphs=off") == {
        "autotune": 30, "validate": False, "cuda_graphs": "off"}
    assert bench.parse_options(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_options("autotune")
    with pytest.raises(ValueError, match="inductor-max-autotune"):
        bench.parse_peers("eager,tensorrt")
    assert bench.main(["--compare", "eager,tensorrt"]) == 2


def test_compare_metrics():
    ref = [torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, -1.0]], dtype=torch.float64)]
    out = [ref[0].clone()]
    out[0][1, 1] = 5.0  # row 1's argmax moves from 0 to 1; error 4.5 on max |ref| 4
    acc = bench.compare(out, ref, logits=True)
    assert acc["max_abs"] == pytest.approx(4.5)
    assert acc["max_rel"] == pytest.approx(4.5 / 4.0)
    assert acc["top1"] == pytest.approx(0.5)
    r = ref[0].flatten()
    o = out[0].flatten()
    assert acc["cosine"] == pytest.approx(float(o @ r / (o.norm() * r.norm())))
    assert acc["rel_l2"] == pytest.approx(4.5 / float(r.norm()))
    assert bench.compare(out, ref, logits=False)["top1"] is None
    nan = [torch.full((2, 3), math.nan, dtype=torch.float64)]
    assert bench.compare(nan, ref, logits=True)["finite"] is False
    with pytest.raises(ValueError, match="differs"):
        bench.compare([torch.zeros(3, 2, dtype=torch.float64)], ref, logits=None)


def test_percentile():
    assert bench.percentile([4.0, 1.0, 3.0, 2.0, 5.0], 50) == 3.0
    assert bench.percentile([1.0, 2.0], 20) == pytest.approx(1.2)
    assert bench.percentile([7.0], 80) == 7.0


def test_suite_parts_cover_every_case_and_peer():
    from benchmarks import suite

    covered = {(c.model, c.batch, p) for part in suite.PARTS for c in part.cases for p in part.peers}
    cases = {("mlp", 2048), ("resnet50", 32), ("resnet50", 1), ("bert", 16), ("gpt2", 8), ("vit", 32)}
    assert covered == {(m, b, p) for m, b in cases for p in bench.PEERS}
    for part in suite.PARTS:  # max-autotune compiles take minutes: never shares a part
        assert part.peers == ("inductor-max-autotune",) or "inductor-max-autotune" not in part.peers
    assert suite.main(["--parts"]) == 0


def test_suite_records_what_it_could_not_measure(tmp_path):
    from benchmarks import suite

    out = tmp_path / "suite.json"
    assert suite.main(["--part", "1", "--size", "tiny", "--device", "cpu", "--peers", "eager,compile_backend",
                       "--budget-s", "0", "--out", str(out)]) == 0
    records = _records(out)
    assert [(r["model"], r["batch"], r["backend"]) for r in records] == [
        ("mlp", 2048, "eager"), ("mlp", 2048, "compile_backend"),
        ("resnet50", 1, "eager"), ("resnet50", 1, "compile_backend")]
    assert all(r["error"].startswith("not measured") and r["precision"] == "fp16" for r in records)


def test_backend_is_registered_from_a_source_tree(monkeypatch):
    """Without the pip entry point (a plain checkout) the runner registers the backend itself."""
    registered = {}
    monkeypatch.setattr(torch._dynamo, "list_backends", lambda exclude_tags=(): ["eager", "inductor"])
    monkeypatch.setattr(torch._dynamo, "register_backend",
                        lambda fn, name: registered.setdefault(name, fn))
    bench.ensure_backend_registered()
    from compile_backend.backend import compile_backend as backend_fn

    assert registered == {"compile_backend": backend_fn}
