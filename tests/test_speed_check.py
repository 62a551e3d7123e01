"""First-call speed check (compile_backend/speed_check.py): which runner is kept, what is
skipped. On the CPU with a fake timer and a stand-in engine; the real race runs on the GPU."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx

import compile_backend
from compile_backend.backend import compile_backend as backend
from compile_backend.report import Report
from compile_backend import speed_check
from compile_backend.speed_check import ATEN, ENGINE, NO_GRAPH


class FakeEngine:
    def __init__(self):
        self.cuda_graph = object()
        self.calls = []

    def __call__(self, args):
        self.calls.append("graph")
        return args[0] + 1

    def run(self, args):
        self.calls.append("plain")
        return args[0] + 1


def _aten_gm(mutate=False):
    g = fx.Graph()
    x = g.placeholder("x")
    if mutate:
        g.call_function(torch.ops.aten.add_.Tensor, (x, x))
    g.output((g.call_function(torch.ops.aten.add.Tensor, (x, 1)),))
    return fx.GraphModule(torch.nn.Module(), g)


def _timer(ms):
    """A timer that runs the call and reports ``ms[name]`` for the runner it recognises."""
    def timer(fn):
        before = len(engine.calls)
        fn()
        if len(engine.calls) == before:
            return ms[ATEN]
        return ms[ENGINE] if engine.calls[-1] == "graph" else ms[NO_GRAPH]
    engine = FakeEngine()
    return engine, timer


@pytest.mark.parametrize("ms,chosen", [
    ({ENGINE: 1.0, NO_GRAPH: 1.2, ATEN: 1.5}, ENGINE),
    ({ENGINE: 1.02, NO_GRAPH: 1.2, ATEN: 1.0}, ENGINE),   # within the margin: the engine stays
    ({ENGINE: 1.2, NO_GRAPH: 1.0, ATEN: 1.5}, NO_GRAPH),  # the graph's copies cost more than it saves
    ({ENGINE: 1.2, NO_GRAPH: 1.3, ATEN: 1.0}, ATEN),      # eager's kernels win: run them
])
def test_race_keeps_the_fastest(ms, chosen):
    engine, timer = _timer(ms)
    gm = _aten_gm()
    kept, entry = speed_check.race(engine, gm, [torch.ones(3)], timer=timer)
    assert entry["chosen"] == chosen and entry["ms"] == ms
    assert kept is (gm if chosen == ATEN else engine)
    assert (engine.cuda_graph is None) == (chosen == NO_GRAPH)
    # interleaved: warm-up then timed turns, each runner as often as the others
    assert engine.calls.count("graph") == engine.calls.count("plain") == speed_check.WARMUP + speed_check.REPS


def test_graphs_that_write_their_inputs_are_not_raced():
    assert speed_check.writes_inputs(_aten_gm(mutate=True))
    assert not speed_check.writes_inputs(_aten_gm())


def test_cpu_engines_are_not_raced_and_the_option_is_validated():
    m = torch.nn.Linear(4, 4).eval()
    report = compile_backend.explain(m, torch.randn(2, 4))
    assert report.graphs[0].speed_check == {}
    with pytest.raises(ValueError, match="speed_check"):
        compile_backend.Options(speed_check="yes")


@pytest.mark.gpu
def test_gpu_speed_check_runs_and_reports():
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda().half().eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    report = Report()
    fast = torch.compile(m, backend=functools.partial(backend, report=report))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(fast(x), m(x), rtol=2e-2, atol=2e-2)
    sc = report.graphs[0].speed_check
    assert set(sc["ms"]) == {ENGINE, NO_GRAPH, ATEN} and sc["chosen"] in sc["ms"]
    assert "speed check:" in str(report)


@pytest.mark.gpu
def test_gpu_warm_process_applies_the_stored_verdict(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU()).cuda().half().eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    reports = []
    for _ in range(2):  # the second compile stands for a new process on the same cache directory
        torch._dynamo.reset()
        reports.append(Report())
        fast = torch.compile(m, backend=functools.partial(backend, report=reports[-1],
                                                          options={"cache_dir": str(tmp_path)}))
        with torch.no_grad():
            torch.testing.assert_close(fast(x), m(x), rtol=2e-2, atol=2e-2)
    cold, warm = (r.graphs[0] for r in reports)
    assert not cold.speed_check.get("from_cache") and warm.speed_check["from_cache"]
    assert warm.speed_check["chosen"] == cold.speed_check["chosen"] and warm.cache["engine"] == "hit"


def test_quantized_and_mutating_engines_are_not_raced():
    """The ATen graph computes in float: racing a quantized engine against it could hand the
    user a float model. A graph writing its inputs cannot run more than once unseen."""
    from compile_backend.engine import Engine
    from compile_backend.options import Options
    from compile_backend.runtime import CompiledGraph

    engine = object.__new__(Engine)
    engine.device = torch.device("cuda")

    def graph(options, mutate=False):
        return CompiledGraph(_aten_gm(mutate), role="inference", name="g", frozen=None,
                             options=options, report_sink=None)

    assert graph(compile_backend.Options())._checks_speed(engine)
    assert not graph(compile_backend.Options(speed_check=False))._checks_speed(engine)
    assert not graph(compile_backend.Options(), mutate=True)._checks_speed(engine)
    from compile_backend import quant

    dynamic = quant.QuantConfig(activations="dynamic")
    assert not graph(Options(quant=dynamic))._checks_speed(engine)


def test_a_stored_verdict_is_applied_without_timing():
    engine = FakeEngine()

    def timer(fn):
        raise AssertionError("a stored verdict must not time anything")

    kept, entry = speed_check.race(engine, _aten_gm(), [torch.ones(2)], timer=timer,
                                   known={"chosen": NO_GRAPH, "ms": {ENGINE: 2.0, NO_GRAPH: 1.0}})
    assert kept is engine and engine.cuda_graph is None and engine.calls == []
    assert entry["chosen"] == NO_GRAPH and entry["from_cache"]


def test_verdicts_round_trip_through_the_cache_directory(tmp_path):
    verdicts = speed_check.Verdicts.open(str(tmp_path), torch.device("cpu"))
    assert verdicts.get("k" * 64) is None
    verdicts.put("k" * 64, {"chosen": ATEN, "ms": {ENGINE: 1.5, ATEN: 1.0}})
    again = speed_check.Verdicts.open(str(tmp_path), torch.device("cpu"))  # another process
    assert again.get("k" * 64)["chosen"] == ATEN
    assert again.get("j" * 64) is None
