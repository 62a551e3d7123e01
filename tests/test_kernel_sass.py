"""benchmarks/kernel_sass.py: our generated GEMM kernels compiled for sm_90 on this CPU machine
(Triton's own ptxas), read back as registers, spills and SASS instructions per element."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_epilogue_instructions_per_element_on_hopper(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "sass.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_sass", "--shape", "64", "128", "96",
                          "--configs", "ptr64x128x128w4s4", "--operands", "fp16", "--forms", "linear", "gelu",
                          "gelu_int8", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 2 and "no ptxas" in run.stderr:
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["form"]: r for r in json.loads(out.read_text())}
    assert rows["linear"]["epilogue_instructions_per_element"] == 0
    # GELU's erf costs tens of instructions an element (session 14: 33.5 at this tile); before an
    # INT8 quantize it takes its tanh form on the tanh unit (quant_gelu="tanh", fx_passes/quant_math):
    # GELU and quantize together cost less than erf GELU alone (session 15: 24.2 against 33.4)
    assert 15 < rows["gelu"]["epilogue_instructions_per_element"] < 60
    assert 5 < rows["gelu_int8"]["epilogue_instructions_per_element"] < rows["gelu"]["epilogue_instructions_per_element"] - 5
    assert all(r["local_stores"] == 0 for r in rows.values())
    assert "TRITON_INTERPRET=1" in subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_sass"], cwd=ROOT, capture_output=True, text=True,
        env={**env, "TRITON_INTERPRET": "1"}, timeout=120).stderr


def test_decode_gemv_instructions_per_weight(tmp_path):
    """The INT4 decode GEMV's main loop (sm_90): session 14 took it from 9.5 to 5.6 SASS
    instructions a weight on the tensor cores (8-byte code loads, x read in one piece): kept
    below 7, and below the elementwise loop's."""
    pytest.importorskip("triton")
    out = tmp_path / "gemv.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_sass", "--gemv", "64", "512", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 2 and "no ptxas" in run.stderr:
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["weights"], r["loop"]): r["instructions_per_weight"] for r in json.loads(out.read_text())}
    assert rows[("int4", "tensor cores")] < min(7.0, rows[("int4", "elementwise")]), rows
    assert rows[("float", "tensor cores")] < 3.5, rows
    bound = {(r["weights"], r["loop"]): r["issue_bound_tb_s"] for r in json.loads(out.read_text())}
    # the issue model: fp16 streams far past the copy bandwidth, INT4 at most a third of it
    assert bound[("float", "tensor cores")] > 8 and 0.3 < bound[("int4", "tensor cores")] < 3, bound
    # weight loads in flight without registers: Triton pipelines the tensor-core loop's loads
    # through shared memory at 4 stages (cp.async), never the elementwise loop's (session 19)
    copies = {(r["weights"], r["loop"]): r["async_copies"] for r in json.loads(out.read_text())}
    for weights in ("int4", "int8", "float"):
        assert copies[(weights, "tensor cores 4 stages")] > 0 and copies[(weights, "elementwise")] == 0, copies


def test_tma_convolution_lowers_to_tma_loads_and_tensor_cores(tmp_path):
    """The TMA convolution (kernels/conv_tma.py) compiled for sm_90 on this CPU machine: its
    operands arrive by TMA, the tensor cores multiply them, nothing spills, and a row patch's
    input tile reaches the tensor cores from shared memory (a 2-D patch's through registers:
    Triton reshapes it there)."""
    pytest.importorskip("triton")
    out = tmp_path / "conv.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-m", "benchmarks.kernel_sass", "--conv-tma", "64", "56", "64",
                          "--operands", "int8", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode == 2 and "no ptxas" in run.stderr:
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["stride"], tuple(r["patch"])): r for r in json.loads(out.read_text())}
    assert set(rows) == {(1, (1, 64)), (1, (8, 16)), (2, (1, 64)), (2, (8, 8))}
    for r in rows.values():
        assert r["tma_loads"] > 0 and r["mma"] > 0 and r["local_stores"] == 0, r
    # stride 2's 5-D box of a row patch folds unit dims only too
    assert rows[(1, (1, 64))]["dot_a_shared"] and rows[(2, (1, 64))]["dot_a_shared"]
    assert not rows[(1, (8, 16))]["dot_a_shared"]
