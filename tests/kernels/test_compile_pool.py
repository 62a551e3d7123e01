"""The compile workers (kernels/compile_pool.py): a generated module's source found by its name,
the worker protocol (a job in, an answer out, a failing job answered with its reason), the
recording hook, and on the GPU: a tuner's Triton candidates compiled in the workers, then loaded
from Triton's cache by the tuner's own build."""
import pytest
import torch

from compile_backend.kernels import compile_pool, launch
from compile_backend.options import Options

_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def scale_kernel(X, Y, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=ok) * FACTOR, mask=ok)
'''


def test_a_generated_modules_source_is_found_by_its_name():
    mod = launch.load_source(_SOURCE + "\n# found by name\n")
    assert launch.generated_source(mod.__name__) == _SOURCE + "\n# found by name\n"
    assert launch.generated_source("compile_backend.kernels.pool") is None
    assert launch.generated_source("compile_backend_gen_0000") is None


def test_a_worker_answers_each_job_and_names_what_failed():
    worker = compile_pool._Worker()
    try:
        bad = compile_pool.Job(module="no_such_module_here", name="k", specialization="{}", device=0, cache_dir=None)
        why = worker.ask(bad, timeout_s=120)
        assert "no_such_module_here.k" in why and "ModuleNotFoundError" in why
        missing = compile_pool.Job(module="compile_backend_gen_x", name="nope", specialization="{}", device=0,
                                   cache_dir=None, source=_SOURCE)
        assert "AttributeError" in worker.ask(missing, timeout_s=60)  # the same worker, a second job
    finally:
        worker.close()
    assert worker.proc.poll() is not None


def test_the_hook_records_on_a_recording_thread_and_defers_elsewhere():
    from types import SimpleNamespace

    Info = SimpleNamespace(jit_function=SimpleNamespace(fn=SimpleNamespace(
        __module__="compile_backend.kernels.pool", __name__="pool_kernel")))

    calls = []
    compile_pool._hook_state["previous"] = lambda **kw: calls.append(kw) or "theirs"
    try:
        assert compile_pool._hook(fn=Info, compile={"specialization_data": "{}", "device": 0}) == "theirs"
        compile_pool._LOCAL.jobs = jobs = []
        assert compile_pool._hook(fn=Info, compile={"specialization_data": "{\"a\": 1}", "device": 1}) is True
    finally:
        compile_pool._LOCAL.jobs = None
        compile_pool._hook_state["previous"] = None
    assert len(calls) == 1
    (job,) = jobs
    assert (job.module, job.name, job.specialization, job.device, job.source) == (
        "compile_backend.kernels.pool", "pool_kernel", "{\"a\": 1}", 1, None)


def test_too_few_builds_or_workers_compile_nothing_ahead():
    builds = [lambda: None] * 10
    assert compile_pool.precompile(builds, workers=1)["kernels"] == 0
    assert compile_pool.precompile(builds[:compile_pool.MIN_JOBS - 1], workers=4)["kernels"] == 0
    from compile_backend.kernels.autotune import Tuner

    assert Tuner(compile_processes=4).precompile_async([]) == 0  # off CUDA: nothing sent


def test_an_async_batch_finishes_before_the_next_and_is_not_sent_again(monkeypatch):
    """``precompile_async`` records at once and compiles on a thread: a later ``precompile``
    waits for that batch (one batch on the workers at a time) and sends only the kernels it
    did not compile."""
    import threading

    asked, release = [], threading.Event()

    class Worker:
        def ask(self, job, timeout_s):
            release.wait(10)  # the async batch is still compiling when the next one comes
            asked.append(job.name)
            return None if job.name != "bad" else "bad: failed"

    def job(name):
        return compile_pool.Job(module="m", name=name, specialization="{}", device=0, cache_dir="/c/" + name[:0])

    batches = iter([[job(n) for n in ("a", "b", "c", "d")], [job(n) for n in ("c", "d", "e", "bad")]])
    monkeypatch.setattr(compile_pool, "_workers", lambda count: [Worker(), Worker()])
    monkeypatch.setattr(compile_pool, "record", lambda builds: next(batches))
    monkeypatch.setattr(compile_pool, "_done", set())
    future = compile_pool.precompile_async([lambda: None] * 4, workers=2)
    assert future is not None and not future.done()
    later = threading.Thread(target=lambda: asked.append(compile_pool.precompile([lambda: None] * 4, workers=2)))
    later.start()
    release.set()
    later.join(10)
    assert future.result(10)["compiled"] == 4
    stats = asked.pop()
    assert sorted(asked[:4]) == ["a", "b", "c", "d"] and sorted(asked[4:]) == ["bad", "e"], asked
    assert (stats["kernels"], stats["compiled"], stats["failed"]) == (4, 1, 1)  # c, d: compiled already
    assert compile_pool.precompile_async([lambda: None] * 2, workers=2) is None  # too few to send


def test_a_streamed_batch_says_when_each_group_is_ready(monkeypatch):
    """``precompile_groups_async`` compiles the groups' kernels in the order given, and its
    stream's ``wait(i)`` returns once group i's are done, before the batch ends: the quantize
    pass times one layer probe while the next compile. A kernel two groups share compiles once;
    one compiled by an earlier batch counts as ready at once."""
    import threading

    from compile_backend.kernels.autotune import Tuner

    asked, release = [], threading.Event()

    class Worker:
        def ask(self, job, timeout_s):
            if job.name.startswith("late"):
                release.wait(10)
            asked.append(job.name)
            return None

    def job(name):
        return compile_pool.Job(module="m", name=name, specialization="{}", device=0, cache_dir=None)

    groups = {"g0": [job("a"), job("b")], "g1": [job("b"), job("late"), job("old")], "g2": [job("c")]}
    monkeypatch.setattr(compile_pool, "_workers", lambda count: [Worker(), Worker()])
    monkeypatch.setattr(compile_pool, "record", lambda builds: groups[builds[0]()])
    monkeypatch.setattr(compile_pool, "_done", {job("old")})
    stream = compile_pool.precompile_groups_async([[lambda: "g0", lambda: "g0"], [lambda: "g1"], [lambda: "g2"]], 2)
    assert stream.wait(0, 10) and stream.wait(2, 10)  # a, b, c done while "late" still compiles
    assert not stream.wait(1, 0.05) and not stream.future.done()
    release.set()
    assert stream.wait(1, 10) and stream.future.result(10)["compiled"] == 4
    assert sorted(asked) == ["a", "b", "c", "late"] and asked[-1] == "late"
    assert stream.future.result()["kernels"] == 5  # b once; "old" compiled before, not sent
    # the tuner: a streamed problem's build waits for its own group, then builds without the pool
    tuner = Tuner(compile_processes=4)
    waited, built = [], []

    class Stream:
        def wait(self, group, timeout_s):
            waited.append(group)
            return True
    monkeypatch.setattr(tuner, "_build_each", lambda todo, workers, pool=True: built.append(pool) or [lambda: 1] * len(todo))
    tuner._streamed["key"] = (Stream(), 3)
    from compile_backend.kernels.autotune import Candidate

    cands = [Candidate("x", {}, lambda: None), Candidate("y", {}, lambda: None)]
    assert sorted(tuner._compile_all("key", cands)) == ["x", "y"] and (waited, built) == ([3], [False])
    assert sorted(tuner._compile_all("key", cands)) == ["x", "y"] and (waited, built) == ([3], [False, True])
    assert not tuner._streamed and tuner.stats["stream_wait_seconds"] >= 0


def test_the_option_is_checked_and_not_part_of_the_engine_key():
    from compile_backend.cache.key import OPTIONS_NOT_IN_KEY

    assert Options(compile_processes=0).compile_processes == 0
    for bad in (-1, True, 2.5, "4"):
        with pytest.raises(ValueError, match="compile_processes"):
            Options(compile_processes=bad)
    assert "compile_processes" in OPTIONS_NOT_IN_KEY


def _scale_candidate(kernel, x, factor):
    """A tuner candidate launching ``kernel`` (``_SOURCE``'s) with the constexpr ``factor``."""
    import triton

    from compile_backend.kernels.autotune import Candidate

    def compile_():
        def run():
            y = torch.empty_like(x)
            kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), FACTOR=factor, BLOCK=256)
            return y
        run()
        return run
    return Candidate(f"x{factor}", {"factor": factor}, compile_)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["pool", "async", "streamed"])
def test_gpu_workers_fill_tritons_cache_and_the_build_loads_from_it(mode, tmp_path):
    """Eight candidates of distinct constexprs: the workers compile all eight (in the build's
    own precompile, or sent ahead by ``Tuner.precompile_async``, which returns at once; streamed:
    the build waits for its problem's kernels alone), the tuner's build then finds each in
    Triton's cache (no compile in this process), and the kernels compute."""
    import triton

    from compile_backend.cache.location import triton_cache
    from compile_backend.kernels.autotune import Tuner, TuningKey

    kernel = launch.load_source(_SOURCE + f"\n# gpu test {mode}\n").scale_kernel
    x = torch.randn(1000, device="cuda")
    hits = []
    listener = triton.knobs.compilation.listener
    try:
        with triton_cache(tmp_path / "triton"):
            tuner = Tuner(device=torch.device("cuda"), compile_processes=4)
            key = TuningKey("test", f"scale {mode}", ((1000,),), ((1,),), ("fp32",))
            todo = [(key, _scale_candidate(kernel, x, float(f))) for f in range(1, 9)]
            if mode != "pool":
                assert tuner.precompile_async([(key, [c for _, c in todo])], each=mode == "streamed") == 8
            triton.knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
            if mode == "streamed":
                built = list(tuner._compile_all(key, [c for _, c in todo]).values())
            else:
                built = tuner._build_each(todo, workers=4)
    finally:
        triton.knobs.compilation.listener = listener
        compile_pool.shutdown()
    tuner.collect_async(wait=True)
    print(tuner.stats)
    sent = ("pool_kernels", "pool_compiled") if mode == "pool" else ("async_kernels", "async_kernels")
    assert [tuner.stats[s] for s in sent] == [8, 8] and tuner.stats["async_pending"] == 0, tuner.stats
    assert hits == [True] * 8, hits
    for f, run in zip(range(1, 9), built):
        torch.testing.assert_close(run(), x * f)


def test_a_cold_build_starts_workers_only_where_it_will_compile_on_a_gpu(monkeypatch):
    from compile_backend.kernels import autotune

    started = []
    monkeypatch.setattr(compile_pool, "start", started.append)
    autotune.start_compile_workers(Options(), torch.device("cpu"))
    autotune.start_compile_workers(Options(compile_processes=3), torch.device("cuda"))  # interpreter: no
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    autotune.start_compile_workers(Options(compile_processes=3, autotune="off"), torch.device("cuda"))
    autotune.start_compile_workers(Options(compile_processes=3), torch.device("cuda"))
    autotune.start_compile_workers(Options(), torch.device("cuda"))
    assert started == [3, autotune.default_compile_processes()]


def test_workers_that_cannot_start_leave_every_compile_in_this_process(monkeypatch):
    def refuse():
        raise OSError("no more processes")

    monkeypatch.setattr(compile_pool, "_Worker", refuse)
    monkeypatch.setitem(compile_pool._pool, "workers", [])
    monkeypatch.setitem(compile_pool._pool, "broken", False)
    compile_pool.start(4)  # no raise
    assert compile_pool._pool["broken"]
    assert compile_pool.precompile([lambda: None] * 8, workers=4)["kernels"] == 0
