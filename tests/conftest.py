"""Test configuration.

TRITON_INTERPRET=1 is set here, before anything imports Triton, so every Triton kernel in the
suite runs on CPU tensors under Triton's interpreter. Tests that check the plain CPU/ATen path
set it to "0" with monkeypatch (the backend reads it when it builds an engine).
"""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# tuning results and Triton binaries from the suite go to a throwaway root, not ~/.cache
os.environ.setdefault("COMPILE_BACKEND_CACHE_DIR", tempfile.mkdtemp(prefix="cb-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
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
