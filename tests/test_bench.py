"""The benchmark command on CPU: records, JSON schema, plot, failures, option parsing."""
from __future__ import annotations

import datetime
import json
import math

import pytest
import torch

from compile_backend.bench import cli, measure, peers

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
    rc = cli.main(["--model", "mlp", "--size", "tiny", "--device", "cpu",
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
    assert cli.main(["--model", "resnet50", "--precision", "bf16"] + args) == 0
    assert cli.main(["--model", "vit"] + args) == 0
    records = _records(out)
    assert [(r["model"], r["precision"]) for r in records] == [("resnet50", "bf16"), ("vit", "fp32")]
    bf16 = records[0]["accuracy"]
    # bf16 keeps 8 bits of mantissa: visibly off the fp32 reference but the same function
    assert 0 < bf16["rel_l2"] < 5e-2 and bf16["cosine"] > 0.99
    assert 0.0 <= bf16["top1"] <= 1.0
    assert records[1]["accuracy"]["top1"] == 1.0


def test_failing_peer_is_recorded_and_run_goes_on(tmp_path, monkeypatch):
    real = measure.compile_peer

    def flaky(peer, model, options, report=None):
        if peer == "inductor":
            raise RuntimeError("simulated inductor crash")
        return real(peer, model, options, report)

    monkeypatch.setattr(measure, "compile_peer", flaky)  # what run_peer calls
    out = tmp_path / "r.json"
    rc = cli.main(["--model", "mlp", "--size", "tiny", "--device", "cpu", "--compare", "inductor,eager",
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
    assert cli.main(["--model", "my_models:build", "--batch", "6", "--device", "cpu", "--compare",
                     "eager", "--iters", "2", "--warmup", "0", "--out", str(out)]) == 0
    (r,) = _records(out)
    assert r["model"] == "my_models:build" and r["batch"] == 6
    assert r["accuracy"]["top1"] == 1.0  # a [batch, classes] output counts as logits


def test_parse_options_and_peers():
    assert peers.parse_options('{"autotune": "max", "validate": false}') == {"autotune": "max", "validate": False}
    assert peers.parse_options("autotune=30, validate=false,cuda_graphs=off") == {
        "autotune": 30, "validate": False, "cuda_graphs": "off"}
    assert peers.parse_options(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        peers.parse_options("autotune")
    with pytest.raises(ValueError, match="inductor-max-autotune"):
        peers.parse_peers("eager,tensorrt")
    assert cli.main(["--compare", "eager,tensorrt"]) == 2


def test_compare_metrics():
    ref = [torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, -1.0]], dtype=torch.float64)]
    out = [ref[0].clone()]
    out[0][1, 1] = 5.0  # row 1's argmax moves from 0 to 1; error 4.5 on max |ref| 4
    acc = measure.compare(out, ref, logits=True)
    assert acc["max_abs"] == pytest.approx(4.5)
    assert acc["max_rel"] == pytest.approx(4.5 / 4.0)
    assert acc["top1"] == pytest.approx(0.5)
    r = ref[0].flatten()
    o = out[0].flatten()
    assert acc["cosine"] == pytest.approx(float(o @ r / (o.norm() * r.norm())))
    assert acc["rel_l2"] == pytest.approx(4.5 / float(r.norm()))
    assert measure.compare(out, ref, logits=False)["top1"] is None
    nan = [torch.full((2, 3), math.nan, dtype=torch.float64)]
    assert measure.compare(nan, ref, logits=True)["finite"] is False
    with pytest.raises(ValueError, match="differs"):
        measure.compare([torch.zeros(3, 2, dtype=torch.float64)], ref, logits=None)


def test_percentile():
    assert measure.percentile([4.0, 1.0, 3.0, 2.0, 5.0], 50) == 3.0
    assert measure.percentile([1.0, 2.0], 20) == pytest.approx(1.2)
    assert measure.percentile([7.0], 80) == 7.0


def test_suite_parts_cover_every_case_and_peer():
    from benchmarks import suite

    covered = {(c.model, c.batch, p) for part in suite.PARTS for c in part.cases for p in part.peers}
    cases = {("mlp", 2048), ("resnet50", 32), ("resnet50", 1), ("bert", 16), ("gpt2", 8), ("vit", 32),
             # issue #17: models from transformers / torchvision
             ("hf_bert", 16), ("hf_bert", 1), ("hf_gpt2", 8), ("tv_resnet50", 1), ("tv_resnet50", 32),
             ("tv_vit_b_16", 32)}
    extra = {("resnet50", 1, suite.NO_GRAPHS[0]), ("bert", 16, suite.NO_GRAPHS[0]),  # issue #7's cases
             ("hf_bert", 16, suite.NO_GRAPHS[0]), ("hf_bert", 1, suite.NO_GRAPHS[0])}
    # one model per other family, against the fast peers
    extra |= {(m, b, p) for m, b in [("hf_llama", 8), ("hf_t5_encoder", 16), ("tv_mobilenet_v3", 32)]
              for p in suite.FAST_PEERS}
    assert covered == {(m, b, p) for m, b in cases for p in peers.PEERS} | extra
    for part in suite.PARTS:  # max-autotune compiles take minutes: never shares a part
        assert part.peers == ("inductor-max-autotune",) or "inductor-max-autotune" not in part.peers
    assert suite.main(["--parts"]) == 0


def test_suite_records_what_it_could_not_measure(tmp_path):
    from benchmarks import suite

    out = tmp_path / "suite.json"
    assert suite.main(["--part", "2", "--size", "tiny", "--device", "cpu", "--peers", "eager,compile_backend",
                       "--budget-s", "0", "--out", str(out)]) == 0
    records = _records(out)
    assert [(r["model"], r["batch"], r["backend"]) for r in records] == [
        ("mlp", 2048, "eager"), ("mlp", 2048, "compile_backend"),
        ("resnet50", 32, "eager"), ("resnet50", 32, "compile_backend")]
    assert all(r["error"].startswith("not measured") and r["precision"] == "fp16" for r in records)


def test_suite_real_model_skipped_without_its_package(tmp_path, monkeypatch):
    from benchmarks import real_models, suite

    monkeypatch.setattr(real_models.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "suite.json"
    index = next(i for i, p in enumerate(suite.PARTS, 1) if suite.HF_GPT2 in p.cases and "eager" in p.peers)
    assert suite.main(["--part", str(index), "--device", "cpu", "--peers", "eager", "--out", str(out)]) == 0
    records = _records(out)
    assert [(r["model"], r["backend"]) for r in records] == [("benchmarks.real_models:hf_gpt2", "eager")]
    assert records[0]["error"] == "not measured: skipped: transformers not installed"


@pytest.mark.slow
def test_real_model_through_the_runner(tmp_path):
    """A transformers model by name through the runner (tiny config, CPU): the factory plumbing."""
    pytest.importorskip("transformers")
    from compile_backend.bench.cli import load_model

    model, inputs, _ = load_model("benchmarks.real_models:hf_bert", "tiny", 2, "cpu", 0)
    with torch.no_grad():
        assert model(*inputs).shape == (2, 128, 64)


def test_backend_is_registered_from_a_source_tree(monkeypatch):
    """Without the pip entry point (a plain checkout) the runner registers the backend itself."""
    registered = {}
    monkeypatch.setattr(torch._dynamo, "list_backends", lambda exclude_tags=(): ["eager", "inductor"])
    monkeypatch.setattr(torch._dynamo, "register_backend",
                        lambda fn, name: registered.setdefault(name, fn))
    measure.ensure_backend_registered()
    from compile_backend.backend import compile_backend as backend_fn

    assert registered == {"compile_backend": backend_fn}


# ----------------------------------------------------------------------------- peers with options

def test_compile_backend_peer_with_options():
    parsed = peers.parse_peers("eager, compile_backend[cuda_graphs=off,autotune=max],compile_backend")
    assert parsed == ["eager", "compile_backend[cuda_graphs=off,autotune=max]", "compile_backend"]
    assert peers.split_peer(parsed[1]) == ("compile_backend", {"cuda_graphs": "off", "autotune": "max"})
    assert peers.split_peer("compile_backend") == ("compile_backend", {})
    # the peer's own options win over --options; the cache directory is always the runner's
    opts = measure.peer_options(parsed[1], "fp16", {"cuda_graphs": "on", "validate": False}, "/tmp/c")
    assert opts == {"precision": "fp16", "cuda_graphs": "off", "validate": False, "autotune": "max",
                    "cache_dir": "/tmp/c"}
    assert measure.peer_cache_root("/r", parsed[1]) == "/r/compile_backend_cuda_graphs_off_autotune_max"
    assert measure.peer_cache_root("/r", "inductor-max-autotune") == "/r/inductor-max-autotune"
    with pytest.raises(ValueError, match="only compile_backend"):
        peers.parse_peers("eager[x=1]")
    with pytest.raises(ValueError, match="cuda_graphs"):  # a typo fails before any compile
        peers.parse_peers("compile_backend[cuda_graph=off]")
    with pytest.raises(ValueError, match="must be one of"):
        peers.parse_peers("compile_backend[cuda_graphs=sometimes]")
    assert cli.main(["--compare", "compile_backend[precison=fp16]"]) == 2


def test_runner_measures_a_peer_with_options(tmp_path):
    out = tmp_path / "r.json"
    assert cli.main(["--model", "mlp", "--size", "tiny", "--device", "cpu", "--iters", "2", "--warmup", "0",
                     "--compare", "compile_backend,compile_backend[validate=false]", "--commit", "c0ffee",
                     "--out", str(out)]) == 0
    plain, variant = _records(out)
    assert "error" not in plain and "error" not in variant, variant.get("traceback")
    assert variant["backend"] == "compile_backend[validate=false]"
    assert variant["options"] == {"precision": "fp32", "validate": False}
    assert plain["options"] == {"precision": "fp32"}
    assert variant["commit"] == plain["commit"] == "c0ffee"
    assert variant["accuracy"]["cosine"] > 0.99999


# ----------------------------------------------------------------------------- engine_bench

def test_engine_bench_cpu(tmp_path, aten_only, capsys):
    from benchmarks import engine_bench

    out = tmp_path / "engine.json"
    rc = engine_bench.main(["--device", "cpu", "--size", "tiny", "--cases", "resnet50:1,bert:2",
                            "--peers", "eager,compile_backend,compile_backend[cuda_graphs=off]",
                            "--iters", "3", "--warmup", "1", "--refit-calls", "2", "--commit", "abc123",
                            "--out", str(out)])
    assert rc == 0
    records = _records(out)
    latency = [r for r in records if r["kind"] == "latency"]
    refits = [r for r in records if r["kind"] == "refit"]
    assert [(r["model"], r["batch"], r["backend"]) for r in latency] == [
        (m, b, p) for m, b in (("resnet50", 1), ("bert", 2))
        for p in ("eager", "compile_backend", "compile_backend[cuda_graphs=off]")]
    for r in records:
        assert "error" not in r, r.get("traceback")
        assert r["commit"] == "abc123" and r["device"].startswith("cpu") and r["torch"] == torch.__version__
        assert r["precision"] == "fp16" and isinstance(r["triton"], str)
        datetime.datetime.fromisoformat(r["date"])
    for r in latency:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["peak_mem_mb"] is None
        assert r["accuracy"]["cosine"] > 0.999
    assert latency[2]["options"]["cuda_graphs"] == "off" and "cuda_graphs" not in latency[1]["options"]
    assert [(r["model"], r["batch"]) for r in refits] == [("resnet50", 1), ("bert", 2)]
    for r in refits:
        # the new weights reached the compiled model without a rebuild, and it follows eager
        assert r["ok"] and r["output_changed"] and r["matches_new_eager"] and r["engines_rebuilt"] == 0
        assert r["output_changed_rel_l2"] > 1e-2
        assert r["accuracy_vs_new_eager"]["rel_l2"] < 0.1 * r["stale_vs_new_eager_rel_l2"]
        assert r["refit_call_ms"] > 0 and r["plain_call_ms"] > 0
        assert r["refit_ms"] == pytest.approx(r["refit_call_ms"] - r["plain_call_ms"])
    text = capsys.readouterr().out
    assert "refit ms" in text and "compile_backend[cuda_graphs=off]" in text


def test_engine_bench_refit_check_can_fail(monkeypatch):
    """A compiled model that ignores new weights must be reported as not ok."""
    from benchmarks import engine_bench

    model = torch.nn.Linear(5, 3).eval()
    frozen = torch.nn.Linear(5, 3).eval()
    frozen.load_state_dict(model.state_dict())
    monkeypatch.setattr(torch, "compile", lambda m, **kw: frozen)  # never sees the refit
    args = engine_bench.build_parser().parse_args(["--device", "cpu", "--refit-calls", "1", "--warmup", "0"])
    args.user_options = {}
    record = engine_bench.measure_refit(model, (torch.randn(4, 5),), None, args,
                                        {"model": "linear", "batch": 4}, "/nonexistent")
    assert "error" not in record, record.get("traceback")
    assert not record["output_changed"] and not record["matches_new_eager"] and not record["ok"]


def test_engine_bench_shares_the_first_compile_backend_cache(tmp_path):
    from benchmarks import engine_bench

    args = engine_bench.build_parser().parse_args([])
    first = tmp_path / "compile_backend" / "compile_backend" / "arch"
    first.mkdir(parents=True, mode=0o700)
    (first / "timing.json").write_text("{}")
    peer = "compile_backend[cuda_graphs=off]"
    assert engine_bench._seed_cache(peer, "compile_backend", str(tmp_path), args) == "compile_backend"
    copied = tmp_path / "compile_backend_cuda_graphs_off" / "compile_backend" / "arch" / "timing.json"
    assert copied.read_text() == "{}" and (copied.parent.stat().st_mode & 0o777) == 0o700
    assert engine_bench._seed_cache("eager", "compile_backend", str(tmp_path), args) is None
    args.share_tuning = False
    assert engine_bench._seed_cache(peer, "compile_backend", str(tmp_path), args) is None
    with pytest.raises(ValueError, match="model:batch"):
        engine_bench.parse_cases("bert:0")


# ----------------------------------------------------------------------------- startup

def test_startup_cold_then_warm_cpu(tmp_path, capsys):
    """Two child processes on one cache directory: the cold one builds, the warm one hits."""
    from benchmarks import startup

    out = tmp_path / "startup.json"
    assert startup.main(["--models", "mlp", "--device", "cpu", "--size", "tiny", "--commit", "abc123",
                         "--out", str(out)]) == 0
    (r,) = _records(out)
    assert "error" not in r, (r["cold"].get("stderr_tail"), r["warm"].get("stderr_tail"))
    assert (r["model"], r["size"], r["autotune"], r["precision"], r["batch"]) == ("mlp", "tiny", "fast", "fp16", 3)
    assert r["commit"] == "abc123" and r["device"].startswith("cpu") and r["torch"] == torch.__version__
    assert isinstance(r["triton"], str)
    datetime.datetime.fromisoformat(r["date"])
    for phase in ("cold", "warm"):
        p = r[phase]
        for key in ("interpreter_s", "import_torch_s", "build_s", "beyond_torch_s", "import_backend_s",
                    "backend_compile_s", "total_s"):
            assert p[key] > 0, (phase, key)
        assert p["total_s"] >= p["import_torch_s"] + p["build_s"] + p["beyond_torch_s"]
        assert p["beyond_torch_s"] > p["import_backend_s"] + p["backend_compile_s"]
        assert set(p["tuning"]) == {"tuned", "from_cache", "heuristic", "candidates_timed", "seconds"}
        # GraphReport.tuning carries the tuner's counters: every GEMM kernel was chosen somehow
        assert p["tuning"]["tuned"] + p["tuning"]["from_cache"] + p["tuning"]["heuristic"] > 0
        assert p["output_shape"] == [3, 45] and p["graphs"] == 1 and p["kernels"] > 0
        assert r[f"{phase}_beyond_torch_s"] == p["beyond_torch_s"] and r[f"{phase}_total_s"] == p["total_s"]
    # under the interpreter the engine cache is on: a fresh directory misses, the next process hits
    assert (r["cold"]["engine_misses"], r["cold"]["engine_hits"]) == (1, 0)
    assert (r["warm"]["engine_misses"], r["warm"]["engine_hits"]) == (0, 1)
    assert r["warm_meets_goal"] == (r["warm_beyond_torch_s"] <= 3.0)
    assert "warm ours" in capsys.readouterr().out


def test_startup_records_what_the_budget_skipped(tmp_path):
    from benchmarks import startup

    out = tmp_path / "startup.json"
    assert startup.main(["--models", "mlp", "bert", "--autotune", "fast", "max", "--device", "cpu",
                         "--budget-s", "0", "--out", str(out)]) == 1  # nothing measured
    records = _records(out)
    assert [(r["model"], r["autotune"]) for r in records] == [
        ("mlp", "fast"), ("bert", "fast"), ("mlp", "max"), ("bert", "max")]
    assert all(r["cold"]["error"].startswith("not measured") and r["error"] for r in records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU demo")
def test_demo_on_cpu_says_speed_is_not_meaningful(aten_only, capsys, monkeypatch):
    from compile_backend import demo
    from compile_backend.report import NO_GENERATED_KERNELS

    seen = {}

    def fake_bench(argv):  # the timing itself is test_bench_mlp_eager_and_compile_backend's job
        seen["argv"] = argv
        return 0

    monkeypatch.setattr("compile_backend.bench.main", fake_bench)
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    assert NO_GENERATED_KERNELS in out  # the report says why every group is impl aten
    assert "cache: engine cache off" in out
    assert out.rstrip().splitlines()[-1] == demo.CPU_SPEED_NOTE
    assert "not meaningful" in demo.CPU_SPEED_NOTE and "speed is measured on CUDA" in demo.CPU_SPEED_NOTE.replace("Speed", "speed")
    assert seen["argv"][:2] == ["--model", "mlp"]


def test_compile_backend_record_says_what_the_engine_ran(tmp_path):
    """A result explains itself: groups by kind and impl, the tuner's picks, fallbacks, speed
    check and passes of every graph the peer compiled."""
    out = tmp_path / "r.json"
    rc = cli.main(["--model", "mlp", "--size", "tiny", "--device", "cpu", "--compare", "eager,compile_backend",
                   "--iters", "2", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    eager, ours = _records(out)
    assert "report" not in eager
    (graph,) = ours["report"]
    ((kind, n),) = graph["groups"].items()  # gemm:triton under the interpreter, gemm:aten without
    assert kind.startswith("gemm:") and n == 4 and graph["choices"][kind]["n"] == 4
    assert graph["fallbacks"] == [] and "constant_fold" in graph["passes"]


def test_quant_suite_cpu_records_every_peer_it_ran(tmp_path, monkeypatch):
    """The quantized suite on the CPU (tiny MLP): our FP16 and quantized engines side by side
    with eager, accuracy against FP32; torchao peers are recorded as skipped where absent."""
    import json

    from benchmarks import quant_suite

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the emulated quantized path: fast on the CPU
    out = tmp_path / "qs.json"
    assert quant_suite.main(["--device", "cpu", "--size", "tiny", "--cases", "mlp:8", "--iters", "2",
                             "--warmup", "1", "--peers", "eager,compile_backend,cb-int8-static,cb-fp8-dynamic",
                             "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    records = records["records"] if isinstance(records, dict) else records
    assert [r["backend"] for r in records] == ["eager", "compile_backend", "cb-int8-static", "cb-fp8-dynamic"]
    for r in records:
        assert "error" not in r, r.get("error")
        assert r["accuracy"]["cosine"] > 0.99 and r["median_ms"] > 0
    assert records[2]["quant"]["quantized"] == records[2]["quant"]["layers"] > 0
    assert records[2]["prepare_s"] > 0  # calibration timed apart from the compile
    assert records[0]["primed_s"] > 0  # the process's first compile paid before any peer
    stages = records[2]["compile_stages"]  # where our INT8 engine's first call went
    assert stages["compile_s"] > 0 and stages["passes_s"] > 0 and stages["kernels_s"] >= 0
    assert stages["passes_s"] + stages["kernels_s"] <= stages["compile_s"] + 1e-3
    assert stages["probe_layer_candidates"] == stages["probe_group_candidates"] == 0  # nothing probed on the CPU

    # issue #18's table and plot from that file, with a max-autotune record of benchmarks.suite's
    from benchmarks import quant_table

    autotune = tmp_path / "autotune.json"
    autotune.write_text(json.dumps([{"model": "mlp", "batch": 8, "backend": "inductor-max-autotune",
                                     "median_ms": 1e-3}]))
    md, png = tmp_path / "table.md", tmp_path / "plot.png"
    assert quant_table.main([str(out), str(autotune), "--markdown", str(md), "--plot", str(png)]) == 0
    rows = quant_table.verdicts(quant_table.load([str(out), str(autotune)]))
    assert [r["backend"] for r in rows] == ["cb-int8-static", "cb-fp8-dynamic"]
    static = rows[0]
    assert static["best_fp16_peer"] == "inductor-max-autotune" and static["target"] == 0.75
    assert static["meets_target"] is False and static["ratio"] == static["ms"] / 1e-3
    assert rows[1]["target"] is None and rows[1]["vs_ours_fp16"] > 0
    assert "| mlp:8 | cb-int8-static |" in md.read_text() and "**miss**" in md.read_text()
    assert png.stat().st_size > 1000


def test_qconv_bench_smoke_times_the_tma_convolution_beside_the_template(tmp_path):
    """benchmarks/qconv_bench.py on one tiny shape under the interpreter: per precision a record
    with the TMA candidate timed beside the template's, and the choice's result matching."""
    import json

    from benchmarks import gemm_bench, qconv_bench

    out = tmp_path / "qconv.json"
    try:
        assert qconv_bench.main(["--smoke", "--out", str(out)]) == 0
    finally:
        gemm_bench.SMOKE = False
    data = json.loads(out.read_text())
    assert not data["errors"], data["errors"]
    assert [r["precision"] for r in data["records"]] == ["int8", "fp8", "fp16"]
    for r in data["records"]:
        assert r["best_tma"].endswith(" tma") and r["best_tma_ms"] > 0 and r["timed"] == "2/2", r
        assert r["rel_err"] < 1e-3


def test_write_bench_smoke_times_a_producers_three_writes(tmp_path):
    """benchmarks/write_bench.py on one tiny producer under the interpreter: per precision and
    producer kind, the fp16 / codes / both writes timed and the two-output group matching."""
    import json

    from benchmarks import gemm_bench, write_bench

    out = tmp_path / "write.json"
    try:
        assert write_bench.main(["--smoke", "--out", str(out), "--precisions", "int8", "fp8"]) == 0
    finally:
        gemm_bench.SMOKE = False
    data = json.loads(out.read_text())
    assert not data["errors"], data["errors"]
    assert [(r["precision"], r["kind"]) for r in data["records"]] == [
        ("int8", "qconv"), ("int8", "conv"), ("fp8", "qconv"), ("fp8", "conv")]
    for r in data["records"]:
        assert r["float_ms"] > 0 and r["codes_ms"] > 0 and r["both_ms"] > 0 and r["both_max_err"] <= 1e-2, r
        assert r["probe_charge_us"] >= 0 and "engine_charge_us" in r


def test_quant_table_compares_each_dynamic_engine_with_torchaos():
    """Our dynamic engines face torchao's of the same precision, whatever their FP8 accumulation
    (``cb-fp8-dynamic-fast`` against ``torchao-fp8-dyn``: the column was empty in session 21)."""
    from benchmarks import quant_table

    def rec(backend, ms):
        return {"case": "mlp:8", "model": "mlp", "batch": 8, "backend": backend, "median_ms": ms}
    rows = quant_table.verdicts([rec("compile_backend", 1.0), rec("cb-fp8-dynamic-fast", 0.6),
                                 rec("cb-int8-dynamic", 0.8), rec("torchao-fp8-dyn", 0.75), rec("torchao-int8-dyn", 1.6)])
    vs = {r["backend"]: r.get("vs_torchao") for r in rows if r["backend"].startswith("cb-")}
    assert vs == {"cb-fp8-dynamic-fast": pytest.approx(0.8), "cb-int8-dynamic": pytest.approx(0.5)}


def test_pdl_peers_are_ours_with_the_option_and_face_their_twin(monkeypatch):
    """``-pdl`` peers (asked by name) build our engine with ``Options.pdl``; in the table our
    FP16 engine with PDL is an FP16 peer (the best one where fastest), a quantized ``-pdl``
    engine gets its static target and is compared with our FP16 engine launched the same way."""
    from benchmarks import quant_suite, quant_table

    seen = []
    monkeypatch.setattr(quant_suite, "compile_peer", lambda peer, model, options, report: seen.append(options))
    quant_suite.build_peer("compile_backend-pdl", None, (), "cpu", "/tmp/x", "off")
    quant_suite.build_peer("compile_backend", None, (), "cpu", "/tmp/x", "off")
    assert [o["pdl"] for o in seen] == [True, False]
    assert "cb-int8-static-pdl" in quant_suite.KNOWN_PEERS and "cb-int8-static-pdl" not in quant_suite.ALL_PEERS

    def rec(backend, ms):
        return {"case": "hf_bert_mask:16", "model": "hf_bert_mask", "batch": 16, "backend": backend, "median_ms": ms}
    rows = quant_table.verdicts([rec("compile_backend", 1.0), rec("compile_backend-pdl", 0.9),
                                 rec("cb-int8-static-pdl", 0.72), rec("cb-int8-static", 0.85)])
    by = {r["backend"]: r for r in rows}
    assert set(by) == {"cb-int8-static-pdl", "cb-int8-static"}
    assert by["cb-int8-static-pdl"]["best_fp16_peer"] == "compile_backend-pdl"
    assert by["cb-int8-static-pdl"]["ratio"] == pytest.approx(0.8) and by["cb-int8-static-pdl"]["target"] == 0.9
    assert by["cb-int8-static-pdl"]["vs_ours_fp16"] == pytest.approx(0.8)
    assert by["cb-int8-static"]["vs_ours_fp16"] == pytest.approx(0.85)


def test_qat_step_bench_cpu_times_steps_and_checks_float_gradients(tmp_path, monkeypatch):
    """One QAT training step beside the float steps (tiny MLP on the CPU): each peer timed, the
    QAT step's ratio to Inductor's float step recorded, our float step's gradients against
    eager's, and where the fake quantization ran (issue #19's GPU row, checked here)."""
    import json

    from benchmarks import qat_step_bench

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # our kernels, interpreted: the report's placement
    out = tmp_path / "qat_step.json"
    assert qat_step_bench.main(["--device", "cpu", "--size", "tiny", "--cases", "mlp:4", "--iters", "1",
                                "--warmup", "0", "--peers", "eager,compile_backend,cb-qat-int8",
                                "--autocast", "bf16", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    records = records["records"] if isinstance(records, dict) else records
    assert [r["backend"] for r in records] == ["eager", "compile_backend", "cb-qat-int8"]
    for r in records:
        assert "error" not in r, r.get("error")
        assert r["median_ms"] > 0
    grads = records[1]["gradients_vs_eager"]  # under bf16 autocast, as the GPU rows run
    assert grads["parameters"] > 0 and not grads["missing"] and grads["worst_cosine"] > 0.999, grads
    exact = records[1]["gradients_vs_eager_fp32"]  # and fp32 against fp32
    assert exact["parameters"] > 0 and not exact["missing"] and exact["worst_relative_error"] < 1e-4, exact
    placement = records[2]["report"]["forward"]["fake_quant"]
    assert placement["ops"] > 0 and placement["aten"] == 0, placement


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llm_accuracy_trains_then_compares_modes(tmp_path, monkeypatch, dtype):
    """The real-text accuracy benchmark of issue #20 in miniature: a few training steps of a
    tiny byte-level decoder, then a weight-only and a W8A8 mode against FP32 on held-out text;
    in bf16 every mode compiles the model cast to bf16 (calibration included)."""
    import json

    from benchmarks import llm_accuracy

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the emulated path
    out = tmp_path / "acc.json"
    assert llm_accuracy.main(["--steps", "3", "--hidden", "64", "--layers", "1", "--seq", "32", "--eval", "4",
                              "--modes", "w8a16", "int8-sq", "--dtype", dtype, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {r["mode"]: r for r in record["results"]}
    extra = {dtype} if dtype != "float32" else set()
    assert set(rows) == {"fp32", "w8a16", "int8-sq"} | extra and len(record["training"]["loss"]) >= 1
    assert record["dtype"] == dtype
    for mode in ("w8a16", "int8-sq"):
        assert rows[mode]["quantized"] > 0 and rows[mode]["logits_cosine"] > 0.99, rows[mode]
        if extra:
            assert rows[mode]["logits_cosine_vs_" + dtype] > 0.99, rows[mode]
    assert rows["w8a16"]["layer_sqnr_db_min"] > 20


def test_hf_cache_writes_records_each_family(tmp_path):
    """benchmarks.hf_cache_writes on one family: the caches written by kernels, the step equal."""
    import json

    pytest.importorskip("transformers")
    from benchmarks import hf_cache_writes

    out = tmp_path / "writes.json"
    assert hf_cache_writes.main(["--families", "Mistral", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["input_writes"] == ["kernel"] * (4 + row["token_counts"]) and row["max_abs_diff"] < 1e-5, row


def test_clean_slate_forgets_the_kernels_compiled_before():
    """Each peer's first call compiles its own kernels: the memo of generated modules is
    emptied between peers, so an identical source is compiled again (a quantized engine
    built after the FP16 one found its float kernels compiled in memory, session 20)."""
    from compile_backend.bench.measure import clean_slate
    from compile_backend.kernels import launch

    source = "VALUE = 41\n"
    first = launch.load_source(source)
    assert launch.load_source(source) is first
    clean_slate("cpu")
    again = launch.load_source(source)
    assert again is not first and again.VALUE == 41
