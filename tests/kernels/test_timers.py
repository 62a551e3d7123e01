"""The tuner's timers (``kernels/timers.py``): CUDA events around launches queued behind one
GPU spin, the calls captured in CUDA graphs and replayed; CPU tests through fakes of torch.cuda,
GPU tests marked."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from compile_backend.kernels.autotune import Candidate, Tuner, TuningKey

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = TuningKey("test", "abc123", ((4, 4),), ((4, 1),), ("torch.float32",), "relu")


def make_inputs():
    return (torch.ones(4),)


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
    from compile_backend.kernels.timers import CudaEventTimer, batch_spin_cycles

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
    from compile_backend.kernels.timers import REBATCH_MAX_RATIO, CudaEventTimer, batch_spin_cycles

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
    from compile_backend.kernels.timers import CudaEventTimer

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
    from compile_backend.kernels.timers import SPIN_HZ, batch_spin_cycles

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
    from compile_backend.kernels.timers import CudaEventTimer

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
    from compile_backend.kernels.timers import CudaEventTimer, release_graphs, replay

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
        from compile_backend.kernels.timers import CudaEventTimer, release_graphs, replay

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
