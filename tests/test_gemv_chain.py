"""benchmarks/gemv_chain.py on the CPU (Triton's interpreter): what its GPU run depends on.

The chain at tiny decoder shapes against the reference GEMV by GEMV (split-K over one shared set
of counters included), the floor chains' own checks, the PDL sources (rendered and loaded,
never launched: the interpreter has no grid-dependency intrinsics), the CLI and the CPU smoke
end to end, and the timed path's bookkeeping with CUDA's graph and event calls stood in."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gemv_chain as gc
from compile_backend.kernels import gemm_template as tpl
from compile_backend.kernels import pdl
from compile_backend.kernels.launch import Counters
from compile_backend.kernels.weight_only import WeightOnlyConfig

CPU = torch.device("cpu")
SHAPES = gc.SMOKE_SHAPES


def test_shapes_are_the_base_decoders_and_each_output_feeds_the_next():
    assert gc.decoder_shapes() == [("qkv", 2560, 2048), ("o", 2048, 2048), ("gate_up", 11264, 2048),
                                   ("down", 2048, 5632)]
    for shapes in (gc.decoder_shapes(), SHAPES):
        for (_, n, _), (_, _, k_next) in zip(shapes, shapes[1:] + shapes[:1]):
            assert k_next <= n  # x of the next GEMV is a view of this output's first K columns


def test_cli_parses():
    args = gc.parse_args(["--out", "o.json"])
    assert (args.layers, args.iters, args.weights, args.group, args.variants, args.cpu_smoke) == \
        (None, 20, "int4", 128, list(gc.VARIANTS), False)
    args = gc.parse_args(["--out", "o.json", "--layers", "3", "--iters", "5", "--weights", "int8", "--variants",
                          "gemv", "empty_pdl", "--commit", "abc", "--cpu-smoke"])
    assert (args.layers, args.iters, args.weights, args.variants, args.commit, args.cpu_smoke) == \
        (3, 5, "int8", ["gemv", "empty_pdl"], "abc", True)
    with pytest.raises(SystemExit):
        gc.parse_args(["--out", "o.json", "--variants", "nope"])


def _chain_errors(configs, weights="int4"):
    layer_weights = gc.make_weights(SHAPES, 1, weights, 128, CPU)
    x0 = torch.randn(1, SHAPES[0][2], dtype=torch.float16)
    outs = [[torch.full((1, n), float("nan"), dtype=torch.float16) for _, n, _ in SHAPES]]
    run = gc.gemv_chain(tpl.load_kernel(*gc.gemv_source(False)), layer_weights, x0, outs, SHAPES, configs, weights,
                        128, Counters(), False)
    run()
    return gc.reference_errors(x0, layer_weights, outs, SHAPES, weights, 128)


def test_tuned_configs_are_gemv_configs_and_the_chain_matches_the_reference():
    tuned = gc.tuned_configs(SHAPES, "int4", 128, CPU)  # on the CPU: the tuner's first candidate
    assert [info["shape"] for _, info in tuned] == ["qkv", "o", "gate_up", "down"]
    for cfg, info in tuned:
        assert cfg.path == "gemv" and info["config"]["path"] == "gemv" and info["candidate"] == info["tuner_winner"]
    errs = _chain_errors([cfg for cfg, _ in tuned])
    assert len(errs) == 4 and max(errs) < gc.REL_TOL, errs


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_split_k_chain_over_shared_counters_matches_the_reference(weights):
    # 2 K slices a launch (the interpreter's own choice is 1): every launch's last program finds
    # and resets the counters the launch before used (grids of 4 to 16 tiles)
    cfg = WeightOnlyConfig("gemv", 1, 32, 64, split_k=2)
    errs = _chain_errors([cfg] * 4, weights)
    assert max(errs) < gc.REL_TOL, errs


def test_pdl_sources_render_with_the_wait_where_the_engine_puts_it():
    plain, name = gc.gemv_source(False)
    source, same = gc.gemv_source(True)
    wait, signal = pdl.ENTRY
    assert same == name and "gdc_wait" in source and "gdc_wait" not in plain
    added = [line.strip() for line in source.splitlines() if line not in plain.splitlines()]
    assert added == [wait, signal]
    assert source.index(wait) > source.index("first_weights(")  # after the first step's weight load
    assert callable(tpl.load_kernel(source, name))  # loads (compiled only when launched, on a GPU)
    for kernel in ("bump", "read_words"):
        assert "gdc_wait" in pdl.with_entry(gc.FLOOR_SOURCE, kernel)
        gc.floor_kernel(kernel, True)


def test_floor_chains_run_and_check_themselves():
    run, slots = gc.empty_chain(5, CPU, False)
    run()
    assert slots[-1].item() == 5
    layer_weights = gc.make_weights(SHAPES[:2], 1, "int4", 128, CPU)
    run, launches = gc.copy_chain(layer_weights, False)
    run()
    assert len(launches) == 2 and all(gc.copy_maxes_ok(*launch) for launch in launches)
    launches[0][3][0] -= 1
    assert not gc.copy_maxes_ok(*launches[0])


def test_cpu_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "chain.json"
    assert gc.main(["--cpu-smoke", "--layers", "1", "--out", str(out), "--commit", "abc"]) == 0
    result = json.loads(out.read_text())
    assert result["commit"] == "abc" and result["launches"] == 4 and result["weight_bytes"] > 0
    assert [c["shape"] for c in result["configs"]] == ["qkv", "o", "gate_up", "down"]
    rows = result["variants"]
    assert list(rows) == list(gc.VARIANTS)
    assert rows["gemv"]["reference"]["ok"] and rows["empty"]["ok"] and rows["copy"]["ok"]
    assert all("skipped" in rows[v] for v in ("gemv_pdl", "gemv_pdl_top", "empty_pdl", "copy_pdl", "standalone"))
    assert "tracebacks" not in result
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[4])["variant"] == "gemv" and "ms/chain" in lines[-len(gc.VARIANTS) - 1]


class FakeEvent:
    def __init__(self, enable_timing=False):
        assert enable_timing

    def record(self):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return 2.0


def test_graph_timing_calls(monkeypatch):
    calls = []

    class FakeGraph:
        def replay(self):
            calls.append("replay")

    class Capture:
        def __init__(self, graph):
            assert isinstance(graph, FakeGraph)

        def __enter__(self):
            calls.append("capture")

        def __exit__(self, *exc):
            calls.append("captured")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    ms, blocks = gc.graph_ms(lambda: calls.append("run"), 4, lambda: calls.append("prepare"))
    assert (ms, blocks) == (0.5, [0.5] * 5)
    assert calls == ["run", "capture", "run", "captured", "prepare"] + ["replay"] * (3 + 5 * 4)


def test_timed_path_bookkeeping(monkeypatch, capsys):
    # graphs stood in by eager runs, PDL by plain launches (the interpreter cannot wait on a grid)
    def eager_graph_ms(run, iters, prepare=lambda: None):
        run()
        prepare()
        run()  # the replays: what is left after them is theirs
        return 0.25, [0.25] * 5

    plain_source, plain_floor = gc.gemv_source, gc.floor_kernel
    monkeypatch.setattr(gc, "graph_ms", eager_graph_ms)
    monkeypatch.setattr(gc, "gemv_source", lambda use_pdl, after=0: plain_source(False))
    monkeypatch.setattr(gc, "floor_kernel", lambda name, use_pdl: plain_floor(name, False))
    monkeypatch.setattr(pdl, "available", lambda device: True)
    monkeypatch.setattr(pdl, "launch_kwargs", lambda enabled: {})
    monkeypatch.setattr(gc, "STANDALONE_CALLS", 2)
    monkeypatch.setattr(gc, "L2_BYTES", 0)
    args = gc.parse_args(["--out", "unused.json", "--layers", "1"])
    result = {"layers": 1, "weights": "int4", "device": "cpu"}
    bench = gc.ChainBench(args, CPU, SHAPES, 1, True, result)
    result.update(launches=bench.launches, variants={name: bench.variant(name) for name in gc.VARIANTS})
    rows = result["variants"]
    assert result["pdl_equal"] is True and rows["gemv_pdl"]["pdl_equal"] and result["reference"]["ok"]
    assert rows["gemv"]["finite"] and rows["empty_pdl"]["ok"] and rows["copy_pdl"]["ok"]
    for name in ("gemv", "copy", "empty"):
        assert rows[name]["us_per_launch"] == pytest.approx(0.25e3 / 4)
    assert rows["gemv"]["gb_per_s"] == pytest.approx(result["weight_bytes"] / 0.25e-3 / 1e9)
    assert "gb_per_s" not in rows["empty"]
    assert set(rows["standalone"]["per_call_us"]) == {"qkv", "o", "gate_up", "down"}
    assert rows["standalone"]["ms_per_chain"] == pytest.approx(4 * 0.25 / 2)
    gc.summary(result)
    table = capsys.readouterr().out
    assert "pdl_equal True" in table and "gemv_pdl" in table and "1.000" in table


def test_a_failing_variant_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(gc, "copy_chain", broken)
    out = tmp_path / "chain.json"
    assert gc.main(["--cpu-smoke", "--layers", "1", "--variants", "copy", "empty", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["variants"]["copy"]["error"] == "RuntimeError: out of resources"
    assert "out of resources" in result["tracebacks"]["copy"] and result["variants"]["empty"]["ok"]
