"""Test configuration.

TRITON_INTERPRET=1 is set here, before anything imports Triton, so every Triton kernel in the
suite runs on CPU tensors under Triton's interpreter. Tests that check the plain CPU/ATen path
set it to "0" with monkeypatch (the backend reads it when it builds an engine). Tests marked
`gpu` run only on a CUDA machine with TRITON_INTERPRET=0 (benchmarks/device/quant_run.sh).
"""
import dataclasses
import os
import shutil
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# tuning results and Triton binaries from the suite go to a throwaway root, not ~/.cache; the
# root is made only when the caller did not choose one, and removed when the session ends
_OWN_CACHE_DIR = None
if "COMPILE_BACKEND_CACHE_DIR" not in os.environ:
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="cb-test-cache-")
    os.environ["COMPILE_BACKEND_CACHE_DIR"] = _OWN_CACHE_DIR

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist workers share the machine's cores: each worker's ATen running one thread a core
# oversubscribed them (2 workers x 2 threads on 2 cores: the real-data QAT and fuzz test files
# took 4:58 min of user CPU against 3:32 with one thread a worker, session 27), so each worker
# takes its share of the cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def _interpreter_without_dead_overflow_checks():
    """Triton's interpreter (3.6 to 3.9) runs every int32 add, sub and mul of a kernel a second time
    in int64 with range compares (``sanitize_overflow``, on by default), only to hand the result to
    ``device_assert``, which returns at once unless ``options.debug``; the interpreter never sets
    debug (always its default False), so the checks can never fire: work without effect, as on a
    GPU, where they compile to dead code without debug. They were ~20% of the interpreted kernels'
    time (cProfile, the HF static-cache tests, session 28). Kept on wherever debug is on."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    options = getattr(interpreter, "InterpreterOptions", None)
    fields = getattr(options, "__dataclass_fields__", {})
    if "sanitize_overflow" not in fields or "debug" not in fields or fields["debug"].default is not False:
        return  # another Triton: left as it is

    def without_dead_checks(*args, **kwargs):
        made = options(*args, **kwargs)
        if made.debug or "sanitize_overflow" in kwargs:
            return made
        return dataclasses.replace(made, sanitize_overflow=False)

    interpreter.InterpreterOptions = without_dead_checks  # builders made later
    builder = getattr(interpreter, "interpreter_builder", None)  # the one made at import
    if builder is not None and isinstance(getattr(builder, "options", None), options) and not builder.options.debug:
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def _decorate_kernel_helpers_for_the_interpreter():
    """Import every kernel module now, under TRITON_INTERPRET=1. ``@triton.jit`` picks the
    interpreter or the compiler when a module is imported; a generated kernel (built per call,
    under the variable as it is then) calls the shared helpers (``weight_only_parts``, ...) as
    they were decorated. A test that sets TRITON_INTERPRET=0 and is the first in its worker to
    import a helper module left its helpers compiled-only, and every interpreted kernel after
    it in that worker calling them failed ("Cannot call @triton.jit'd outside of the scope of a
    kernel"): session 34 found it by running test_decode_bench.py before test_gemv.py."""
    import importlib
    import pkgutil

    import compile_backend.kernels as kernels

    for info in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"compile_backend.kernels.{info.name}")


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_without_dead_overflow_checks()
    _decorate_kernel_helpers_for_the_interpreter()


def pytest_unconfigure(config):
    # the last hook of a run (also after an interrupted or failed collection); only the
    # directory this conftest created is removed, never one the caller named
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            return
        # a GPU test under the interpreter measures the interpreter, not the kernels the GPU
        # runs (an H200 run once did: three "failures" were interpreter rounding)
        skip = pytest.mark.skip(reason="GPU tests run compiled kernels: set TRITON_INTERPRET=0")
    else:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aten_only(monkeypatch):
    """The plain CPU path: no Triton kernels, everything through ATen."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def engines(monkeypatch):
    """Every engine the pipeline builds during the test, in build order (to read its source,
    memory plan, arena)."""
    from compile_backend import pipeline
    from compile_backend.engine import Engine

    built = []

    class Recording(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(pipeline, "Engine", Recording)
    return built
