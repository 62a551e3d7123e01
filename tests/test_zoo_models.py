"""Every zoo `tiny` model, compiled with compile_backend, matches eager in inference and training.

Runs with TRITON_INTERPRET=1 (conftest), so on CPU the generated Triton kernels run in Triton's
interpreter; `test_zoo_aten_path` covers the plain CPU path (everything through ATen).
"""
import pytest
import torch

import compile_backend
from compile_backend import zoo
from compile_backend.report import Report
from helpers import compile_and_compare


_INFERENCE = {}


def _inference(name):
    """The zoo's tiny ``name`` compiled for inference under the interpreter and compared with eager,
    and its engines' report (what ``compile_backend.explain`` gives). Built once a process:
    test_zoo_inference and test_zoo_groups_run_through_triton_under_interpreter check the same
    build (each built its own before: the second build was 27 of this file's 150 s in the suite,
    session 28); either one run alone, or on another xdist worker, builds and compares it itself."""
    if name not in _INFERENCE:
        model, inputs = zoo.get(name, "tiny")
        report = Report()
        compile_and_compare(model.eval(), inputs, report=report)
        _INFERENCE[name] = report
    return _INFERENCE[name]


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_inference(name):
    _inference(name)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_groups_run_through_triton_under_interpreter(name):
    """With TRITON_INTERPRET=1 every GEMM, conv, pointwise, reduction, attention and pool group of a
    tiny model runs in one of our Triton kernels (report impl 'triton'), nothing falls back
    except ops no kernel covers, and the output matches eager (the same build as
    test_zoo_inference's)."""
    report = _inference(name)
    kernels = [k for g in report.graphs for k in g.kernels]
    ours = [k for k in kernels if k["kind"] in ("gemm", "conv", "pointwise", "reduction", "attention", "pool")]
    assert ours
    not_triton = [(k["kind"], k["ops"], k["impl"]) for k in ours if k["impl"] != "triton"]
    assert not not_triton, not_triton
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert all("no kernel of ours covers" in f["reason"] for f in fallbacks), fallbacks


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_training(name, monkeypatch):
    # dropout draws random numbers differently once compiled: compare with dropout off
    # (modules and the functional attention dropout that reads zoo.DROPOUT at call time)
    monkeypatch.setattr(zoo, "DROPOUT", 0.0)
    model, inputs = zoo.get(name, "tiny")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    compile_and_compare(model, inputs, training=True)


@pytest.mark.parametrize("name", ["resnet50", "bert"])
def test_zoo_aten_path(name, aten_only):
    model, inputs = zoo.get(name, "tiny")
    compile_and_compare(model.eval(), inputs)


def test_zoo_report_lists_every_graph():
    model, inputs = zoo.get("bert", "tiny")
    report = compile_backend.explain(model.eval(), *inputs)
    g = report.graphs[0]
    assert g.role == "inference" and g.kernels
    assert sum(1 for k in g.kernels if k["kind"] == "gemm") >= 4
