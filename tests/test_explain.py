"""compile_backend.explain: leaves other compiled models alone, reports training as forward and
backward graphs (issue #14, item 10), and says when generated kernels cannot run (item 11)."""
import inspect

import pytest
import torch
import torch.nn as nn

import compile_backend
from compile_backend.report import NO_GENERATED_KERNELS


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Broken(Small):
    def forward(self, x):
        y = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(y)


def _counting_backend(calls):
    def backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return gm.forward
    return backend


@pytest.mark.parametrize("cls", [Small, Broken])
@pytest.mark.parametrize("same_object", [False, True])
def test_explain_keeps_other_compiled_models(aten_only, cls, same_object):
    torch.manual_seed(0)
    calls = []
    model_b = cls().eval()
    compiled_b = torch.compile(model_b, backend=_counting_backend(calls))
    x = torch.randn(3, 5)
    with torch.no_grad():
        compiled_b(x)
    built = len(calls)
    assert built >= 1
    model_a = model_b if same_object else cls().eval()
    report = compile_backend.explain(model_a, torch.randn(3, 5))
    assert report.graphs and all(g.role == "inference" for g in report.graphs)
    with torch.no_grad():
        out = compiled_b(x)  # B's compiled code is still there: no recompile
    assert len(calls) == built
    torch.testing.assert_close(out, model_b(x))


def test_explain_repeatedly_past_the_recompile_limit(aten_only):
    # each explain compiles afresh (its own code object): none counts against Dynamo's limit
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    model = Small().eval()
    # config.patch, not monkeypatch: in torch 2.11 one of the two names is an alias, and
    # setattr + undo on it left "recompile_limit does not exist" for every later compile
    with dynamo_config.patch(**{name: 2}):
        for batch in (3, 4, 5, 3):
            report = compile_backend.explain(model, torch.randn(batch, 5))
            assert [g.role for g in report.graphs] == ["inference"]
            assert report.graphs[0].shapes == [f"{batch}x5:float32"]


def test_train_mode_reports_forward_and_backward(aten_only):
    torch.manual_seed(0)
    model = Small().train()
    report = compile_backend.explain(model, torch.randn(3, 5))
    assert [g.role for g in report.graphs] == ["forward", "backward"]
    assert report.graphs[0].name.endswith(".forward") and report.graphs[1].name.endswith(".backward")
    assert report.graphs[1].kernels  # the backward engine was built and described
    assert all(p.grad is None for p in model.parameters())  # explain leaves .grad alone


def test_input_requiring_grad_is_explained_as_training(aten_only):
    model = Small().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 5, requires_grad=True)
    report = compile_backend.explain(model, x)
    assert [g.role for g in report.graphs] == ["forward", "backward"]
    assert x.grad is None


def test_frozen_train_mode_model_has_no_backward(aten_only):
    model = Small().train()
    for p in model.parameters():
        p.requires_grad_(False)
    report = compile_backend.explain(model, torch.randn(3, 5))
    assert [g.role for g in report.graphs] == ["inference"]


def test_cpu_report_says_why_groups_run_aten(aten_only):
    report = compile_backend.explain(Small().eval(), torch.randn(3, 5))
    text = str(report)
    assert report.generated_kernels is False
    assert text.splitlines()[1] == NO_GENERATED_KERNELS
    assert "TRITON_INTERPRET=1" in text and "only on CUDA" in text
    # header and footer agree: the engine cache is off, the footer does not list a directory
    assert "engine cache off" in text
    footer = text.splitlines()[-1]
    assert footer.startswith("cache: engine cache off") and "dir" not in footer
    assert report.to_dict()["generated_kernels"] is False


def test_interpreted_report_has_no_cpu_note(tmp_path):
    report = compile_backend.explain(Small().eval(), torch.randn(3, 5), cache_dir=str(tmp_path))
    text = str(report)
    assert report.generated_kernels is True
    assert NO_GENERATED_KERNELS not in text
    assert text.splitlines()[-1].startswith(f"cache: dir {tmp_path}")


@pytest.mark.skipif("isolate_recompiles" not in inspect.signature(torch.compile).parameters,
                    reason="this torch.compile has no isolate_recompiles")
def test_explain_graph_breaking_model_repeatedly(aten_only, request):
    # the model's own frames get compiled after the break; explaining it again and again must
    # neither run out of recompiles nor disturb a compiled copy of the same model
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    patch = dynamo_config.patch(**{name: 2})  # not monkeypatch: see the test above
    patch.__enter__()
    request.addfinalizer(lambda: patch.__exit__(None, None, None))
    calls = []
    model = Broken().eval()
    compiled = torch.compile(model, backend=_counting_backend(calls))
    x = torch.randn(3, 5)
    with torch.no_grad():
        compiled(x)
    built = len(calls)
    for _ in range(3):
        report = compile_backend.explain(model, x)
        assert [g.role for g in report.graphs] == ["inference", "inference"]
    with torch.no_grad():
        compiled(x)
    assert len(calls) == built


def test_explain_shows_per_rule_counts_for_resnet50(aten_only):
    """Issue #15: the report names each rule with its count under its pass (53 BN folds)."""
    from compile_backend import zoo

    model = zoo.ResNet(64, (64, 128, 256, 512), (3, 4, 6, 3), 1000).eval()
    report = compile_backend.explain(model, torch.randn(1, 3, 32, 32))
    (graph,) = report.graphs
    assert graph.rules["fold_batchnorm"] == {"conv_bn": 53, "linear_bn": 0, "bn_affine": 0}
    assert graph.passes["fold_batchnorm"] == 53
    assert "fold_batchnorm.conv_bn: 53" in str(report)
    assert report.to_dict()["graphs"][0]["rules"]["fold_batchnorm"]["conv_bn"] == 53


def test_report_says_where_the_first_call_went(tmp_path):
    """Each graph's report splits its first call's seconds into the passes and the kernels'
    build (``GraphReport.stages``), and the text report says it on a ``compile:`` line."""
    with torch.no_grad():
        report = compile_backend.explain(Small().eval(), torch.randn(3, 5), cache_dir=str(tmp_path))
    (g,) = report.graphs
    assert {"passes", "kernels"} <= set(g.stages) and g.stages["probes"] == {}  # nothing quantized: no probes
    assert 0 <= g.stages["passes"] + g.stages["kernels"] <= g.compile_s + 1e-3
    line = next(line for line in str(report).splitlines() if line.startswith("compile: "))
    assert line.startswith("compile: passes ") and "kernels " in line and "probes" not in line
