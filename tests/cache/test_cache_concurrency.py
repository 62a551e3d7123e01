"""Several processes asking for one key at the same moment (spawned, so each is a fresh interpreter).

Phase 1: build_or_get on one key: the per-key lock means build_fn runs once, the others load it.
Phase 2: plain put() of one key by everyone at once (no lock): atomic renames leave one valid entry.
Three processes at most: each one imports torch.
"""
import multiprocessing
import os
import time

import torch

from compile_backend.cache import CacheKey, EngineCache

PROCESSES = 3


def _key(graph):
    # explicit source hash: each process would hash the package files itself, and they may be
    # edited while the suite runs (a real deployment has one fixed set of files)
    return CacheKey.create(graph, [torch.ones(3, 5)], {"precision": "fp32"}, arch="sm90", gpu_name="test-gpu",
                           source="0" * 64)


def _artifacts(tag):
    return {"kernel.py": f"# built by {tag}\n".encode() * 100}, {"t": torch.full((33,), 7.0)}, {"by": tag}


def _worker(root, builds_log, barrier, results):
    try:
        cache = EngineCache(root)

        def build():
            with open(builds_log, "a") as log:  # O_APPEND: one line per build, from any process
                log.write(f"{os.getpid()}\n")
            time.sleep(0.5)  # long enough that the others are waiting on the lock
            return _artifacts(os.getpid())

        barrier.wait(timeout=60)
        entry = cache.build_or_get(_key("phase 1"), build)
        barrier.wait(timeout=60)
        written = cache.put(_key("phase 2"), *_artifacts(f"writer {os.getpid()}"))
        results.put(("ok", entry.from_cache, entry.meta, float(entry.tensors["t"].sum()), str(entry.path),
                     written.stored, cache.stats()))
    except BaseException as exc:  # report instead of hanging the parent
        results.put(("error", repr(exc)))


def test_processes_build_a_key_once_and_leave_one_valid_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results = context.Queue()
    root, builds_log = str(tmp_path / "cache"), str(tmp_path / "builds.log")
    workers = [context.Process(target=_worker, args=(root, builds_log, barrier, results)) for _ in range(PROCESSES)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert all(outcome[0] == "ok" for outcome in outcomes), outcomes

    with open(builds_log) as log:
        builders = log.read().split()
    assert len(builders) == 1, f"build_fn ran {len(builders)} times"
    assert sorted(outcome[1] for outcome in outcomes) == [False] + [True] * (PROCESSES - 1)
    assert {str(outcome[2]["by"]) for outcome in outcomes} == set(builders)  # everyone got the winner's
    assert all(outcome[3] == 7.0 * 33 for outcome in outcomes)
    assert len({outcome[4] for outcome in outcomes}) == 1
    assert all(outcome[5] for outcome in outcomes)
    assert sum(outcome[6]["hits"] for outcome in outcomes) == PROCESSES - 1
    assert all(outcome[6]["bypasses"] == [] for outcome in outcomes)

    cache = EngineCache(root)
    for graph in ("phase 1", "phase 2"):
        entry = cache.get(_key(graph))
        assert entry is not None and entry.from_cache, graph
    assert len(cache.entries()) == 2
    leftovers = [p for p in (cache.scope_dir(_key("phase 2")) / "tmp").iterdir()]
    assert leftovers == [], "losing writers must remove their temporary copies"
