"""Auto-tuner (kernels/autotune.py) and timing cache (cache/timing.py).

The tuner's timing path is exercised on the CPU with a wall-clock timer (the default timer on
CPU is none: the heuristic wins without timing); candidates are Python functions that sleep
for known times, or GEMM template candidates under the Triton interpreter. Cross-process
behaviour (cache round trip, concurrent writers) runs real subprocesses.
"""
from __future__ import annotations

import contextlib
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
from compile_backend.kernels.autotune import Candidate, Tuner, TuningKey, WallClockTimer, tuner_for, tuning_level
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
    from compile_backend.kernels.autotune import Tuner, WallClockTimer
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

    def timing_init(self, *args, **kwargs):  # time on the CPU (the wall clock) as on a GPU
        real_init(self, *args, **{**kwargs, "timer": WallClockTimer()})
    monkeypatch.setattr(Tuner, "__init__", timing_init)
    ahead, built = [], []
    real_ahead, real_build = select.compile_ahead, Tuner._build_each

    def recording_ahead(groups, ctx):
        ahead.append(real_ahead(groups, ctx))
        return ahead[-1]

    def recording_build(self, todo, workers):
        built.append((workers > 1, [key.kind for key, _ in todo]))
        return real_build(self, todo, workers)
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


class _FakeCuda:
    """torch.cuda's events, spin and synchronize for the timer's CPU tests: each event's time is
    the count of launches queued before it (1 ms a launch); ``behind`` makes the spin's event
    report done when queried (the host fell behind the spin)."""

    def __init__(self, behind: bool):
        self.behind, self.launches, self.sleeps = behind, 0, []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = fake.launches

            def query(self):
                return fake.behind

            def elapsed_time(self, end):
                return float(end.at - self.at)

        self.Event = Event

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "_sleep", self.sleeps.append)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def runner(self, *inputs):
        self.launches += 1


@pytest.mark.parametrize("behind", [False, True])
def test_event_timer_spins_once_a_batch_unless_the_host_falls_behind(monkeypatch, behind):
    """One spin covers a batch of launches timed back to back; a batch the host could not queue
    before the spin ended is timed again with a spin before each launch, and counted."""
    from compile_backend.kernels.autotune import CudaEventTimer, batch_spin_cycles

    fake = _FakeCuda(behind)
    fake.install(monkeypatch)
    timer = CudaEventTimer()
    times = timer.measure(fake.runner, [()], 7, 50e-6)
    assert times == [1.0] * 7
    assert fake.sleeps[0] == batch_spin_cycles(7, 50e-6)
    if behind:  # the batch, then 7 spaced launches
        assert timer.fallbacks == 1 and fake.launches == 14 and len(fake.sleeps) == 8
    else:
        assert timer.fallbacks == 0 and fake.launches == 7 and len(fake.sleeps) == 1
    assert timer.spin_s == pytest.approx(sum(fake.sleeps) / 2e9)
    spaced = CudaEventTimer(batched=False)
    assert spaced.measure(fake.runner, [()], 7, 50e-6) == [1.0] * 7 and spaced.spin_s > timer.spin_s / (8 if behind else 1) > 0


@pytest.mark.parametrize("probed_s, rebatched", [(1.5e-3, True), (10e-6, False)])
def test_a_batch_whose_host_was_slower_than_probed(monkeypatch, probed_s, rebatched):
    """The host queued slower than its two-call probe said: a little slower (at most
    REBATCH_MAX_RATIO), the batch runs once more behind one spin sized for the queueing seen;
    far slower, with a spin before each launch (then the cheaper), the ratio recorded either way."""
    from compile_backend.kernels.autotune import REBATCH_MAX_RATIO, CudaEventTimer, batch_spin_cycles

    fake = _FakeCuda(True)
    fake.install(monkeypatch)

    def slow_runner(*inputs):  # ~2 ms a call
        time.sleep(2e-3)
        fake.launches += 1
        fake.behind = fake.launches <= 5  # the first batch falls behind, nothing after it does

    timer = CudaEventTimer()
    assert timer.measure(slow_runner, [()], 5, probed_s) == [1.0] * 5
    ratio, = timer.behind_ratios
    assert (ratio <= REBATCH_MAX_RATIO) == rebatched and ratio > 1
    assert fake.launches == 10 and timer.rebatches == int(rebatched) and timer.fallbacks == int(not rebatched)
    if rebatched:  # one spin for the second batch, covering the queueing seen with margin
        assert len(fake.sleeps) == 2 and fake.sleeps[1] > batch_spin_cycles(5, probed_s)
        assert fake.sleeps[1] / 2e9 >= 1.5 * 5 * 2e-3
    else:  # a spin before each launch
        assert len(fake.sleeps) == 1 + 5


class _FakeGraphs:
    """torch.cuda's streams and CUDA graphs over a :class:`_FakeCuda`: a captured call runs
    again (a launch) at each replay; ``fail`` makes a capture raise, as a call that synchronises."""

    def __init__(self, cuda: "_FakeCuda", fail: bool):
        self.captures, self.replays, self.resets, self.capturing = 0, 0, 0, False
        fakes = self

        class Stream:
            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def capture_begin(self, pool=None, capture_error_mode="global"):
                assert capture_error_mode == "thread_local" and pool == (0, 7)
                fakes.capturing, self.calls = True, cuda.launches

            def capture_end(self):
                fakes.capturing = False
                fakes.captures += 1
                if fail:
                    raise RuntimeError("operation not permitted when stream is capturing (simulated)")
                self.calls, cuda.launches = cuda.launches - self.calls, self.calls  # captured, not run

            def replay(self):
                fakes.replays += 1
                cuda.launches += self.calls

            def reset(self):
                fakes.resets += 1

        self.Stream, self.CUDAGraph = Stream, CUDAGraph

    def install(self, monkeypatch):
        self.ended = []
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 7))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda d, p: self.ended.append(("end", d, p)),
                            raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda d, p: self.ended.append(("release", d, p)),
                            raising=False)
        monkeypatch.setattr(torch.cuda, "Stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.CUDAGraph)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: self.Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


@pytest.mark.parametrize("capturable", [True, False])
def test_the_timed_repeats_replay_captured_calls(monkeypatch, capturable):
    """Each candidate's call is captured in a CUDA graph per input set and the timed repeats
    replay those (a replay's host time, not our runners' ~270 us of Python, sizes the spins);
    the graphs are freed after. A call that cannot be captured is timed as launched, counted; the
    allocator's routing to the failed capture's pool is ended and the pool released (torch leaves
    both in place when a capture fails), and the timer captures nothing more."""
    from compile_backend.kernels.autotune import CudaEventTimer

    cuda = _FakeCuda(False)
    cuda.install(monkeypatch)
    graphs = _FakeGraphs(cuda, fail=not capturable)
    graphs.install(monkeypatch)
    direct = []

    def compile_():
        def run(*inputs):
            direct.append(graphs.capturing)
            cuda.launches += 1
        return run

    tuner = Tuner("fast", timer=CudaEventTimer(), compile_workers=1)
    choice = tuner.choose(KEY, [Candidate("only", {}, compile_, impl="python")], make_inputs)
    assert choice.timings_ms["only"] == 1.0  # one launch between a repeat's events
    assert graphs.captures == 1  # one input set (no CUDA device: no L2 copies)
    if capturable:
        assert direct == [False] * 4 + [True] and graphs.replays >= 2 + 5 + 2
        assert tuner.stats["captured"] == 1 and tuner.stats["capture_failures"] == 0
        assert graphs.resets == 1
    else:
        assert direct[:5] == [False] * 4 + [True] and len(direct) >= 5 + 2 + 5 and graphs.replays == 0
        assert tuner.stats["captured"] == 0 and tuner.stats["capture_failures"] == 1
        assert graphs.ended == [("end", 0, (0, 7)), ("release", 0, (0, 7))]
        assert tuner.timer.graphs is False and tuner.timer.captured(compile_(), [()]) is None
        assert graphs.captures == 1
    assert not CudaEventTimer(graphs=False).captured(lambda: None, [()])


def test_batch_spin_covers_the_hosts_queueing():
    from compile_backend.kernels.autotune import SPIN_HZ, batch_spin_cycles

    assert batch_spin_cycles(1, 0.0) == 2e5  # at least ~100 us
    assert batch_spin_cycles(30, 300e-6) / SPIN_HZ >= 30 * 300e-6 * 1.25
    assert batch_spin_cycles(30, 50e-6) < batch_spin_cycles(30, 100e-6) < 30 * 4e6  # under the old per-launch spins


def _warm_host_s(fn, inputs) -> float:
    """``fn``'s first call done, the host seconds of a second one."""
    fn(*inputs[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*inputs[0])
    return time.perf_counter() - t0


@pytest.mark.gpu
def test_gpu_batched_event_timings_match_spaced_ones():
    """The batched timer's medians agree with one-spin-a-launch timings (the method before
    session 23) on a small and a large GEMM and a copy, for a fraction of the spin."""
    from compile_backend.kernels.autotune import CudaEventTimer

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cases = [(torch.mm, [(torch.randn(64, 64, device="cuda", dtype=torch.float16),) * 2]),
             (torch.mm, [(torch.randn(4096, 4096, device="cuda", dtype=torch.float16),) * 2]),
             (lambda x: x.clone(), [(torch.randn(1 << 24, device="cuda"),) for _ in range(3)])]
    batched, spaced = CudaEventTimer(), CudaEventTimer(batched=False)
    for fn, inputs in cases:
        host_s = _warm_host_s(fn, inputs)
        b = sorted(batched.measure(fn, inputs, 30, host_s))[15]
        s = sorted(spaced.measure(fn, inputs, 30, host_s))[15]
        assert abs(b - s) <= 0.15 * s + 2e-3, (b, s)
    # these launches' host time is short: the spaced spins are at their ~100 us floor (H100,
    # session 23: 9.5 ms of batched spin against 22 ms)
    assert batched.fallbacks == 0 and batched.spin_s < spaced.spin_s / 2


@pytest.mark.gpu
def test_gpu_captured_timings_match_launched_ones():
    """Replays of captured calls time as the launches themselves do (a small and a large GEMM, a
    copy, a cuDNN convolution), at a fraction of the host time a repeat. (A call that cannot be
    captured: the next test, in a process of its own.)"""
    from compile_backend.kernels.autotune import CudaEventTimer, release_graphs, replay

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    h = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16)  # noqa: E731
    conv = lambda x, w: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    cases = [(torch.mm, [(h(64, 64), h(64, 64))]), (torch.mm, [(h(4096, 4096), h(4096, 4096))]),
             (lambda x: x.clone(), [(torch.randn(1 << 24, device="cuda"),) for _ in range(3)]),
             (conv, [(h(32, 64, 56, 56).contiguous(memory_format=torch.channels_last),
                      h(64, 64, 3, 3).contiguous(memory_format=torch.channels_last))])]
    timer = CudaEventTimer()
    for fn, inputs in cases:
        host_s = _warm_host_s(fn, inputs)
        graphs = timer.captured(fn, inputs)
        assert graphs is not None and len(graphs) == len(inputs)
        t0 = time.perf_counter()
        replay(graphs[0])
        replay_s = time.perf_counter() - t0
        launched = sorted(timer.measure(fn, inputs, 30, host_s))[15]
        replayed = sorted(timer.measure(replay, [(g,) for g in graphs], 30, replay_s))[15]
        release_graphs(graphs)
        assert abs(replayed - launched) <= 0.15 * launched + 3e-3, (fn, replayed, launched)


@pytest.mark.gpu
def test_gpu_a_failed_capture_leaves_compiling_and_capturing_working(tmp_path):
    """A call that synchronises fails its capture; in that process a Triton kernel then compiles
    and runs, cuBLAS runs, and a fresh timer captures and replays (torch leaves the allocator
    routing to a failed capture's pool: session 26's GPU run, where this case ran in the test
    process, made the next test's every GEMV candidate fail). A process of its own: a broken
    allocator must not take the other GPU tests with it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from compile_backend.kernels.autotune import CudaEventTimer, release_graphs, replay

        def syncs(x):
            y = x * 2
            torch.cuda.synchronize()
            return y

        x = torch.randn(4096, device="cuda")
        timer = CudaEventTimer()
        assert timer.captured(syncs, [(x,)]) is None and timer.capture_failures == 1 and not timer.graphs
        assert torch.equal(syncs(x), x * 2)

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

        y = x.clone()
        add_one[(4,)](y, 4096, BLOCK=1024)
        a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
        assert torch.allclose(y, x + 1) and torch.isfinite(a @ a).all()
        fresh = CudaEventTimer()
        graphs = fresh.captured(lambda t: add_one[(4,)](t, 4096, BLOCK=1024), [(y,)])
        assert graphs is not None
        replay(graphs[0])
        release_graphs(graphs)
        assert torch.allclose(y, x + 3)  # the uncaptured warm call, then the replay
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = tmp_path / "failed_capture.py"  # a file: Triton reads its kernels' source
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]
