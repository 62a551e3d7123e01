"""User errors on the command line are one line on stderr naming the cause and the fix, and a
non-zero exit; never a traceback (issue #14, item 9)."""
import subprocess
import sys
from pathlib import Path

import pytest

from compile_backend.__main__ import main

BENCH = ["bench", "--device", "cpu", "--compare", "eager", "--iters", "1", "--warmup", "0"]


def _one_error_line(capsys, argv, *expected):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[bench]")]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_unknown_command(capsys):
    _one_error_line(capsys, ["bogus"], "unknown command 'bogus'", "demo, bench, cache", "--help")


def test_no_command_prints_usage_to_stderr(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage:") and not captured.out
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("argv, expected", [
    (["--model", "nosuchmodel"], ("'nosuchmodel'", "zoo model", "mlp", "module:function")),
    (["--model", "nosuchmod:fn"], ("cannot import module 'nosuchmod'", "PYTHONPATH")),
    (["--model", "os:nofn"], ("module 'os' has no function 'nofn'", "returns (model, inputs)")),
    (["--model", "mlp", "--batch", "-1"], ("--batch must be a positive integer, got -1",)),
    (["--model", "mlp", "--batch", "0"], ("--batch must be a positive integer, got 0",)),
    (["--model", "mlp", "--options", "precison=fp16"], ("--options", "unknown option 'precison'",
                                                       "Did you mean 'precision'")),
    (["--model", "mlp", "--options", "autotune=sometimes"], ("--options", "autotune")),
    (["--model", "mlp", "--options", "{bad"], ("--options", "not valid JSON")),
    (["--model", "mlp", "--compare", "compile_backend[precison=fp16]"],
     ("compile_backend[precison=fp16]", "unknown option 'precison'")),
    (["--model", "mlp", "--compare", "eager,tensorrt"], ("unknown peer", "tensorrt")),
    (["--model", "mlp", "--device", "tpu"], ("--device must be cpu or cuda",)),
    (["--model", "mlp", "--iters", "0"], ("--iters must be >= 1",)),
])
def test_bench_usage_errors(capsys, argv, expected):
    _one_error_line(capsys, BENCH + argv, *expected)


def test_bench_option_error_is_caught_before_compiling(capsys, monkeypatch):
    from benchmarks import bench

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr(bench, "load_model", no_model)
    _one_error_line(capsys, ["bench", "--model", "mlp", "--options", "precison=fp16"], "precison")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only message")
def test_bench_cuda_without_cuda(capsys):
    _one_error_line(capsys, BENCH + ["--model", "mlp", "--device", "cuda"], "CUDA is not available",
                    "--device cpu")


@pytest.mark.parametrize("body, expected", [
    ("def build():\n    raise RuntimeError('weights file missing')\n",
     ("build() raised RuntimeError: weights file missing", "fix the factory")),
    ("def build():\n    return 3\n", ("must return (model, inputs)", "got int")),
    ("raise ImportError('needs foo')\n", ("cannot import module", "needs foo")),
    ("build = 3\n", ("has no function 'build'",)),
])
def test_bench_factory_errors(capsys, tmp_path, monkeypatch, body, expected):
    name = f"factory_{abs(hash(body))}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _one_error_line(capsys, BENCH + ["--model", f"{name}:build"], f"--model {name}:build", *expected)


def test_bench_unreadable_results_file(capsys, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{not json")
    _one_error_line(capsys, BENCH + ["--model", "mlp", "--out", str(out)], f"--out {out}", "JSON")


def test_demo_bad_batch(capsys):
    _one_error_line(capsys, ["demo", "--batch", "-2"], "--batch must be a positive integer")


def test_real_entry_point_prints_one_line():
    proc = subprocess.run([sys.executable, "-m", "compile_backend", "bench", "--model", "nosuchmodel"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --model"), proc.stderr
