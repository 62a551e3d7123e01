"""Auto-tuner (kernels/autotune.py) and timing cache (cache/timing.py).

The tuner's timing path is exercised on the CPU with a wall-clock timer (the default timer on
CPU is none: the heuristic wins without timing); candidates are Python functions that sleep
for known times, or GEMM template candidates under the Triton interpreter. Cross-process
behaviour (cache round trip, concurrent writers) runs real subprocesses.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

from groups import context, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels.autotune import Candidate, Tuner, TuningKey, tuner_for, tuning_level
from compile_backend.kernels.timers import WallClockTimer
from compile_backend.kernels.base import KernelGroup
from compile_backend.kernels.gemm import gemm_candidates
from compile_backend.kernels.gemm_config import GemmConfig
from compile_backend.kernels.template import choose_kernel_of
from compile_backend.cache.timing import TimingCache
from compile_backend.kernels.autotune import current_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = TuningKey("test", "abc123", ((4, 4),), ((4, 1),), ("torch.float32",), "relu")


class Counting:
    """Candidates that sleep ``seconds`` per run and count compiles and runs."""

    def __init__(self):
        self.compiled, self.runs = [], []

    def make(self, name: str, seconds: float, fail: str = "") -> Candidate:
        def compile_():
            self.compiled.append(name)
            if fail == "compile":
                raise RuntimeError("out of resources: shared memory (simulated)")

            def run(*inputs):
                self.runs.append(name)
                if fail == "run":
                    raise RuntimeError("launch failed (simulated)")
                time.sleep(seconds)
                return (inputs[0] * 2,)

            return run

        return Candidate(name, {"name": name}, compile_, impl="python")


def make_inputs():
    return (torch.ones(4),)


def timed_tuner(tmp_path=None, autotune="fast", **kw) -> Tuner:
    cache = TimingCache(tmp_path) if tmp_path is not None else None
    return Tuner(autotune, cache=cache, timer=WallClockTimer(), compile_workers=2, **kw)


def test_picks_the_fastest_and_caches(tmp_path):
    c = Counting()
    cands = [c.make("slow", 0.004), c.make("fast", 0.0), c.make("medium", 0.002)]
    choice = timed_tuner(tmp_path).choose(KEY, cands, make_inputs)
    assert choice.candidate.name == "fast" and choice.tuned and not choice.from_cache
    assert set(choice.timings_ms) == {"slow", "fast", "medium"}
    assert choice.timings_ms["fast"] < choice.timings_ms["medium"] < choice.timings_ms["slow"]
    # a second tuner on the same cache compiles only the winner and runs nothing
    c2 = Counting()
    cands2 = [c2.make("slow", 0.004), c2.make("fast", 0.0), c2.make("medium", 0.002)]
    again = timed_tuner(tmp_path).choose(KEY, cands2, make_inputs)
    assert again.candidate.name == "fast" and again.from_cache
    assert c2.compiled == ["fast"] and c2.runs == []


def test_reference_candidate_is_timed_never_chosen(tmp_path):
    """A reference (the float layer a quantized one replaces) is timed and recorded, never the
    winner: not when fastest, not from the cache, not by the heuristic; alone it is no choice."""
    import dataclasses

    c = Counting()
    ref = dataclasses.replace(c.make("float reference", 0.0), reference=True)
    cands = [ref, c.make("slow", 0.003), c.make("medium", 0.001)]
    choice = timed_tuner(tmp_path).choose(KEY, cands, make_inputs)
    assert choice.candidate.name == "medium"
    assert set(choice.timings_ms) == {"float reference", "slow", "medium"}
    assert choice.timings_ms["float reference"] < choice.timings_ms["medium"]
    assert timed_tuner(tmp_path).choose(KEY, cands, make_inputs).candidate.name == "medium"  # cache hit
    assert Tuner("off").choose(KEY, cands, make_inputs).candidate.name == "slow"  # heuristic skips it
    with pytest.raises(ValueError, match="no candidates"):
        timed_tuner().choose(KEY, [ref], make_inputs)


def test_report_names_kernels_slower_than_their_reference():
    from compile_backend.report import Report

    r = Report()
    g = r.new_graph("g0", "inference")
    cfg = {"impl": "triton", "tuned_ms": 0.05, "reference": "float linear float16", "reference_ms": 0.03}
    g.kernels = [{"kind": "gemm", "impl": "triton", "ops": ["scaled_mm", "relu"], "config": cfg},
                 {"kind": "gemm", "impl": "triton", "ops": ["scaled_mm"], "config": {**cfg, "tuned_ms": 0.02}}]
    assert [x["kernel"] for x in g.slower_than_reference()] == [0]
    assert g.to_dict()["slower_than_reference"][0]["reference_ms"] == 0.03
    assert "slower than float: kernel #0 (scaled_mm, relu) 0.0500 ms vs float linear float16 0.0300 ms" in str(r)


def test_failing_candidates_are_skipped(tmp_path, caplog):
    c = Counting()
    cands = [c.make("bad_compile", 0.0, fail="compile"), c.make("bad_run", 0.0, fail="run"), c.make("ok", 0.001)]
    with caplog.at_level(logging.DEBUG, logger="compile_backend"):
        choice = timed_tuner(tmp_path).choose(KEY, cands, make_inputs)
    assert choice.candidate.name == "ok"
    assert set(choice.timings_ms) == {"ok"}
    assert "bad_compile" in caplog.text and "bad_run" in caplog.text
    with pytest.raises(RuntimeError, match="every candidate failed"):
        timed_tuner().choose(KEY, cands[:2], make_inputs)


def test_off_and_cpu_take_the_heuristic_without_timing(tmp_path):
    for tuner in (timed_tuner(tmp_path, autotune="off"), Tuner("max", cache=TimingCache(tmp_path))):
        c = Counting()
        cands = [c.make("broken", 0.0, fail="compile"), c.make("first", 0.01), c.make("fastest", 0.0)]
        choice = tuner.choose(KEY, cands, make_inputs)
        assert choice.candidate.name == "first" and not choice.tuned
        assert c.compiled == ["broken", "first"] and c.runs == []
    assert not os.listdir(tmp_path)  # nothing measured, nothing cached


def test_cached_winner_from_a_quicker_level_is_retuned(tmp_path):
    c = Counting()
    timed_tuner(tmp_path, "fast").choose(KEY, [c.make("a", 0.0), c.make("b", 0.002)], make_inputs)
    c2 = Counting()
    choice = timed_tuner(tmp_path, "max").choose(KEY, [c2.make("a", 0.002), c2.make("b", 0.0)], make_inputs)
    assert not choice.from_cache and choice.candidate.name == "b"
    c3 = Counting()  # and the max result now serves fast too
    choice = timed_tuner(tmp_path, "fast").choose(KEY, [c3.make("a", 0.0), c3.make("b", 0.0)], make_inputs)
    assert choice.from_cache and choice.candidate.name == "b"


def test_seconds_budget_is_shared():
    tuner = timed_tuner(autotune=0.05)
    assert tuner.level == "budget"
    c = Counting()
    first = tuner.choose(KEY, [c.make("a", 0.01), c.make("b", 0.0)], make_inputs)
    assert first.tuned  # some candidates were timed while the budget lasted
    time.sleep(0.06)
    other = TuningKey("test", "abc123", ((8, 8),), ((8, 1),), ("torch.float32",), "relu")
    c2 = Counting()
    second = tuner.choose(other, [c2.make("a", 0.01), c2.make("b", 0.0)], make_inputs)
    assert not second.tuned and second.candidate.name == "a" and c2.runs == []


def test_progress_lines():
    lines = []
    tuner = Tuner("fast", timer=WallClockTimer(), progress=lines.append, progress_after_s=0.0)
    c = Counting()
    tuner.choose(KEY, [c.make("a", 0.0), c.make("b", 0.0)], make_inputs)
    assert any("tuning test" in line and "2/2" in line for line in lines)
    assert lines[-1].startswith("tuned test") and "compiling 2 of 2 candidates)" in lines[-1], lines[-1]


def test_levels_and_tuner_for_context():
    assert [tuning_level(v) for v in ("off", "fast", "max", 2.5)] == ["off", "fast", "max", "budget"]
    with pytest.raises(ValueError):
        tuning_level("slow")
    ctx = context()
    assert tuner_for(ctx) is tuner_for(ctx)  # one tuner (and one budget) per compilation


# ----------------------------------------------------------------------------- timing cache
def test_cache_round_trip_and_environment(tmp_path):
    cache = TimingCache(tmp_path)
    env = current_environment(torch.device("cpu"))
    assert cache.get(KEY.as_dict(), env) is None
    cache.put(KEY.as_dict(), env, {"winner": {"name": "x"}, "level": "fast"})
    assert TimingCache(tmp_path).get(KEY.as_dict(), env)["winner"] == {"name": "x"}
    other_gpu = dict(env, gpu="NVIDIA H100", arch="sm_90")
    assert cache.get(KEY.as_dict(), other_gpu) is None  # other GPU: other file
    files = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(files) == 1
    data = json.load(open(tmp_path / files[0]))  # plain JSON, with the environment spelled out
    assert data["env"] == env and len(data["entries"]) == 1
    assert (cache.hits, cache.misses) == (0, 2)


def test_corrupt_cache_file_is_ignored(tmp_path, caplog):
    cache = TimingCache(tmp_path)
    env = current_environment(None)
    with open(cache.path_for(env), "w") as f:
        f.write("{not json")
    with caplog.at_level(logging.WARNING, logger="compile_backend"):
        assert cache.get(KEY.as_dict(), env) is None
    assert "unreadable timing cache" in caplog.text
    cache.put(KEY.as_dict(), env, {"winner": {}})  # and writing replaces it with a good file
    assert TimingCache(tmp_path).get(KEY.as_dict(), env) is not None


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from compile_backend.cache.timing import TimingCache
    cache = TimingCache({dir!r})
    env = {{"gpu": "test", "arch": "x"}}
    for i in range(15):
        cache.put({{"writer": {w}, "i": i}}, env, {{"winner": {{"i": i}}}})
""")


def test_concurrent_writers_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, dir=str(tmp_path), w=w)])
             for w in range(4)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    cache = TimingCache(tmp_path)
    env = {"gpu": "test", "arch": "x"}
    assert all(cache.get({"writer": w, "i": i}, env) is not None for w in range(4) for i in range(15))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------- GEMM templates
def linear_group():
    x, w, b = randn(9, 20, seed=1), randn(11, 20, seed=2), randn(11, seed=3)
    g = make_group(lambda x, w, b: torch.relu(F.linear(x, w, b)), x, w, b)
    anchor = next(n for n in g.gm.graph.nodes if n.op == "call_function" and "addmm" in str(n.target))
    return KernelGroup("gemm", g.gm, anchor=anchor.name), (x, w, b)


CONFIGS = [GemmConfig(16, 16, 16, num_stages=1), GemmConfig(32, 16, 32, num_stages=1)]


def test_gemm_failing_config_is_skipped():
    group, inputs = linear_group()
    tuning = gemm_candidates(group, context(), configs=CONFIGS)

    def out_of_resources():
        raise RuntimeError("OutOfResources: shared memory, Required: 300000 (simulated)")

    tuning.candidates.insert(0, Candidate("triton huge", {"impl": "triton", "huge": 1}, out_of_resources))
    ctx = context()
    ctx.tuner = Tuner("fast", timer=WallClockTimer(), compile_workers=2)
    kernel = choose_kernel_of(group, ctx, tuning)
    assert kernel.impl == "triton" and "huge" not in kernel.config
    torch.testing.assert_close(kernel(*inputs)[0], group.reference(*inputs)[0], rtol=1e-4, atol=1e-4)



def test_interpreted_candidates_compile_one_at_a_time():
    """On CUDA a candidate's compile runs it once (template.warmed); under TRITON_INTERPRET=1
    with CUDA tensors that run is interpreted, and the interpreter's process-wide state breaks
    two kernels at once: 8 compile threads dropped most candidates (H200 run 3:
    test_gpu_tuned_linear/test_gpu_tuned_bn_block[fp16-fast] saw timed < total). Here the
    warm-up is simulated on CPU tensors: every candidate must compile and be timed."""
    group, inputs = linear_group()
    configs = [GemmConfig(bm, bn, bk, num_stages=1) for bm in (16, 32) for bn in (16, 32) for bk in (16, 32)]
    tuning = gemm_candidates(group, context(), configs=configs)

    def warming(cand: Candidate) -> Candidate:
        def compile_():
            run = cand.compile()
            run(*inputs)  # what template.warmed does on CUDA
            return run

        return Candidate(cand.name, cand.config, compile_, cand.impl)

    tuning.candidates = [warming(c) for c in tuning.candidates]
    ctx = context()
    ctx.tuner = Tuner("fast", timer=WallClockTimer(), compile_workers=8)
    kernel = choose_kernel_of(group, ctx, tuning)
    assert kernel.config["timed"] == f"{len(configs)}/{len(configs)}", kernel.config


TUNE_IN_A_PROCESS = textwrap.dedent("""
    import os, sys, json
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import test_autotune as t
    from compile_backend.kernels.autotune import Tuner
    from compile_backend.kernels.timers import WallClockTimer
    from compile_backend.kernels.gemm import gemm_candidates
    from compile_backend.kernels.template import choose_kernel_of
    from compile_backend.cache.timing import TimingCache
    group, inputs = t.linear_group()
    ctx = t.context()
    ctx.tuner = Tuner("fast", cache=TimingCache({dir!r}), timer=WallClockTimer(), compile_workers=1)
    kernel = choose_kernel_of(group, ctx, gemm_candidates(group, ctx, configs=t.CONFIGS))
    ok = bool((kernel(*inputs)[0] - group.reference(*inputs)[0]).abs().max() < 1e-4)
    print(json.dumps({{"from_cache": kernel.tuned_from_cache, "config": kernel.config, "ok": ok,
                      "stats": ctx.tuner.stats}}))
""")


def test_timing_cache_round_trip_across_processes(tmp_path):
    script = TUNE_IN_A_PROCESS.format(root=ROOT, tests=os.path.dirname(os.path.abspath(__file__)), dir=str(tmp_path))
    env = dict(os.environ, TRITON_INTERPRET="1")
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["ok"] and second["ok"]
    assert not first["from_cache"] and first["stats"]["tuned"] == 1 and first["stats"]["candidates_timed"] == 2
    assert second["from_cache"] and second["stats"]["tuned"] == 0 and second["stats"]["candidates_timed"] == 0
    assert second["config"]["block_m"] == first["config"]["block_m"]


def test_probe_inputs_are_released_after_the_choice():
    """The winner's runner keeps its probe for the engine's life: the probe's cached inputs
    (random copies of the group's inputs, weights included) must not stay with it."""
    from compile_backend.kernels.template import Probe, TemplateTuning

    x = torch.randn(4, 8)
    group = make_group(lambda a: torch.relu(a), x)
    probe = Probe(group, torch.device("cpu"))

    def compile_():
        probe.first()  # what ``template.warmed`` does on CUDA
        return lambda *inputs, out=None: (torch.relu(inputs[0]),)

    tuning = TemplateTuning("pointwise", KEY, [Candidate("only", {"name": "only"}, compile_, "python")], probe.make, {})
    kernel = choose_kernel_of(group, context(), tuning)
    assert not probe.holds_inputs
    torch.testing.assert_close(kernel.fn(x)[0], torch.relu(x))


def test_cuda_index_of_a_bare_cuda_device_is_the_current_one(monkeypatch):
    """Tuning threads make the tuner's device current; torch.cuda.set_device refuses a bare
    'cuda' (H200: every quantized GEMM candidate of a context made with 'cuda' was dropped)."""
    from compile_backend.kernels.autotune import cuda_index
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert cuda_index(torch.device("cuda")) == 3
    assert cuda_index(torch.device("cuda", 1)) == 1
    assert cuda_index(torch.device("cpu")) is None


def test_precompile_builds_every_problems_candidates_once_in_one_pool(tmp_path, monkeypatch):
    """``precompile`` compiles the candidates of several problems in one pool (the pool, not the
    interpreter's one-at-a-time path), skips a problem the timing cache answers, and each
    problem's ``choose`` then times those runners without compiling again; a candidate that
    failed to compile stays failed."""
    import dataclasses
    import threading

    from compile_backend.kernels import autotune

    monkeypatch.setattr(autotune, "triton_interpret", lambda: False)
    c = Counting()
    threads = set()
    key_b, key_c = dataclasses.replace(KEY, extra="b"), dataclasses.replace(KEY, extra="c")

    def traced(cand):
        def compile_():
            threads.add(threading.get_ident())
            time.sleep(0.05)  # a compile takes a while: the pool's threads share the six
            return cand.compile()
        return dataclasses.replace(cand, compile=compile_)

    prefix = {KEY: "a", key_b: "b"}
    problems = {key: [traced(c.make(f"{prefix[key]}{i}", 0.0, fail="compile" if i == 2 else "")) for i in range(3)]
                for key in prefix}
    cache = TimingCache(tmp_path)
    timed_tuner(tmp_path).choose(key_c, [c.make("c0", 0.0)], make_inputs)  # key_c: in the cache now
    c.compiled.clear()
    tuner = Tuner("fast", cache=cache, timer=WallClockTimer(), compile_workers=1)
    built = tuner.precompile([(KEY, problems[KEY]), (key_b, problems[key_b]), (key_c, [c.make("c0", 0.0)])],
                             workers=4)
    assert built == 4 and sorted(c.compiled) == ["a0", "a1", "a2", "b0", "b1", "b2"] and len(threads) > 1
    assert tuner.precompile([(KEY, problems[KEY])]) == 0  # built already: nothing again
    for key in (KEY, key_b):
        choice = tuner.choose(key, problems[key], make_inputs)
        assert choice.tuned and set(choice.timings_ms) == {f"{prefix[key]}0", f"{prefix[key]}1"}
    assert len(c.compiled) == 6  # choose compiled nothing more
    off = Tuner("fast")  # no timer (the CPU): nothing is timed, so nothing is precompiled
    assert off.precompile([(KEY, problems[KEY])]) == 0 and len(c.compiled) == 6


def test_precompile_leaves_a_seconds_budget_alone():
    """A seconds budget tunes in the heuristic order until spent; precompiling every candidate
    ahead would spend what the budget is meant to bound."""
    c = Counting()
    tuner = Tuner(0.5, timer=WallClockTimer())
    assert tuner.precompile([(KEY, [c.make("a", 0.0), c.make("b", 0.0)])]) == 0 and c.compiled == []


class ConvLinear(torch.nn.Module):
    """Two convolutions of one shape (one tuning problem) and a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 5 * 7, 8)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return self.fc(torch.relu(y).flatten(1))


def test_the_build_compiles_every_tuned_groups_candidates_ahead(monkeypatch, tmp_path):
    """Where the tuner times, the engine's build hands every tuned group's candidates to one
    compile pool before it times any (``select.compile_ahead``): each problem once (the two
    convolutions share theirs), and the groups' tunings then compile nothing more."""
    import compile_backend
    from compile_backend import pipeline
    from compile_backend.kernels import autotune, select

    monkeypatch.setattr(autotune, "triton_interpret", lambda: False)  # the pool, not one at a time
    real_init = Tuner.__init__

    class FlatTimer(WallClockTimer):  # the repeats under the interpreter were most of this test's time
        def measure(self, runner, input_sets, reps, host_s):
            return [1.0] * reps

    def timing_init(self, *args, **kwargs):  # a tuner that times, as on a GPU
        real_init(self, *args, **{**kwargs, "timer": FlatTimer()})
    monkeypatch.setattr(Tuner, "__init__", timing_init)
    ahead, built = [], []
    real_ahead, real_build = select.compile_ahead, Tuner._build_each

    def recording_ahead(groups, ctx):
        ahead.append(real_ahead(groups, ctx))
        return ahead[-1]

    def recording_build(self, todo, workers, pool=True):
        built.append((workers > 1, [key.kind for key, _ in todo]))
        return real_build(self, todo, workers, pool)
    monkeypatch.setattr(select, "compile_ahead", recording_ahead)
    monkeypatch.setattr(pipeline, "compile_ahead", recording_ahead)
    monkeypatch.setattr(Tuner, "_build_each", recording_build)
    x = torch.randn(2, 4, 5, 7)
    report = compile_backend.explain(ConvLinear().eval(), x, cache_dir=str(tmp_path), speed_check=False)
    assert ahead and ahead[0] > 0, ahead
    (_, kinds), *later = built
    assert sorted(set(kinds)) == ["conv", "gemm"] and kinds.count("conv") == len(kinds) - kinds.count("gemm")
    assert not any(todo for _, todo in later), later  # the tunings found every runner built
    graph = report.graphs[0]
    assert graph.tuning["tuned"] == 2 and graph.tuning["precompile_seconds"] > 0  # a conv problem, a gemm
    assert "s compiling ahead)" in graph.stage_line().split("kernels")[1], graph.stage_line()


def test_compile_ahead_stops_where_the_probes_would_crowd_the_device(monkeypatch):
    """The groups compiled ahead hold their probes' inputs and first outputs until the pool is
    done: past a quarter of the device's free memory the rest build one at a time, as before;
    and a warm build's planned groups are skipped."""
    from compile_backend.kernels import select

    x, w = torch.randn(8, 16), torch.randn(16, 32)
    groups = [make_group(lambda a, b: torch.relu(a @ b), x, w, kind="gemm", name=f"g{i}") for i in range(3)]
    for g in groups:
        g.anchor = next(n.name for n in g.gm.graph.nodes if n.op == "call_function" and "mm" in str(n.target))
    each = select._probe_bytes(groups[0])
    assert each == (8 * 16 + 16 * 32 + 8 * 32) * 4
    made = []

    def candidates(group, ctx):  # records which groups were taken, makes none (left to their builds)
        made.append(group.name)
        raise RuntimeError("not needed here")
    monkeypatch.setattr(select, "_room_for_probes", lambda device: 2.5 * each)
    monkeypatch.setattr(select, "_load", lambda path: candidates)
    ctx = context()
    ctx.tuner = timed_tuner()
    assert select.compile_ahead(groups, ctx) == 0
    assert made == ["g0", "g1"]
    # a warm build's groups (an engine plan describes them) are not even made
    made.clear()
    monkeypatch.setattr(select, "_room_for_probes", lambda device: 10 * each)
    monkeypatch.setattr(select, "planned", lambda group, ctx: {"impl": "triton"} if group.name != "g2" else None)
    assert select.compile_ahead(groups, ctx) == 0 and made == ["g2"]


@pytest.mark.gpu
def test_gpu_engine_compiles_its_groups_ahead(tmp_path):
    """On CUDA a cold build compiles its tuned groups' candidates in one pool before timing any:
    the report's kernels stage says the seconds spent compiling ahead."""
    import compile_backend

    model = ConvLinear().half().cuda().eval()
    x = torch.randn(4, 4, 5, 7, device="cuda").half()
    with torch.no_grad():
        report = compile_backend.explain(model, x, cache_dir=str(tmp_path), speed_check=False)
    graph = report.graphs[0]
    assert graph.tuning["tuned"] >= 2 and graph.tuning["precompile_seconds"] > 0, graph.tuning
    assert "compiling ahead)" in graph.stage_line().split("kernels")[1]
