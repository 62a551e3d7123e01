"""Declared dynamic dimensions (Options.profiles): bucket engines, padding, rejection, the bound.

Most tests run the plain CPU/ATen path (``aten_only``): bucketing happens in CompiledGraph, above
the kernels, so the ATen engines exercise all of it quickly. One test runs Triton kernels under
the interpreter to check that padded inputs reach generated kernels correctly.
"""
import warnings

import pytest
import torch
import torch.nn as nn

from compile_backend.backend import compile_backend
from compile_backend.cache.key import _key_options, canonical_json
from compile_backend.options import Options
from compile_backend.profiles import Profile, bucket_sizes
from compile_backend.report import Report
from helpers import assert_same

PROFILE = {"input": 0, "dim": 0, "min": 2, "opt": 8, "max": 32}  # buckets 2, 4, 8, 16, 32


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Centered(nn.Module):
    """Each output row depends on every input row (a mean over the batch): padding is wrong."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16)

    def forward(self, x):
        return self.a(x - x.mean(0))


def compiled(model, options, **compile_kwargs):
    """torch.compile through our backend, with the Report it fills (one graph entry per engine)."""
    report = Report()

    def backend(gm, example_inputs):
        return compile_backend(gm, example_inputs, options=options, report=report)

    return torch.compile(model, backend=backend, **compile_kwargs), report


def run_all(fn, model, inputs_list, mark=None):
    """Call ``fn`` on every input tuple, compare with eager, return the warnings raised."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for inputs in inputs_list:
            if mark is not None:
                mark(*inputs)
            assert_same(fn(*inputs), model(*inputs))
    return [str(w.message) for w in caught if str(w.message).startswith("compile_backend:")]


# --------------------------------------------------------------------------- options
def test_profiles_from_dicts_round_trip_and_enter_the_cache_key():
    opts = Options.from_mapping({"profiles": [PROFILE]})
    assert opts.profiles == (Profile(**PROFILE),)
    assert opts.replace(precision="fp16").profiles == opts.profiles
    assert Options.from_mapping(opts.as_dict()) == opts
    assert opts.as_dict()["profiles"] == (PROFILE,)
    key = canonical_json(_key_options(opts))
    assert '"profiles":[{"dim":0,"input":0,"max":32,"min":2,"opt":8}]' in key
    assert canonical_json(_key_options(Options())) != key


@pytest.mark.parametrize("profiles, message", [
    ([{**PROFILE, "min": 0}], "entry 0: profile field 'min' must be a positive integer"),
    ([{**PROFILE, "opt": 40}], "min <= opt <= max, got min=2 opt=40 max=32"),
    ([{**PROFILE, "max": 2.5}], "profile field 'max' must be a positive integer"),
    ([{**PROFILE, "max": True}], "profile field 'max'"),
    ([{**PROFILE, "dim": "0"}], "profile field 'dim' must be an integer"),
    ([{**PROFILE, "input": -1}], "profile field 'input'"),
    ([{k: v for k, v in PROFILE.items() if k != "opt"}], "profile field 'opt' is missing"),
    ([{**PROFILE, "maxx": 3}], "unknown profile field 'maxx'. Did you mean 'max'"),
    ([PROFILE, {**PROFILE, "max": 64}], "entries 0 and 1 both declare input 0 dim 0"),
    ("input0", "option 'profiles' must be a list"),
    ([3], "entry 0: a profile must be a dict"),
])
def test_bad_profiles_name_the_field(profiles, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Options.from_mapping({"profiles": profiles})


def test_bucket_sizes():
    assert bucket_sizes(1, 8, 64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(3, 10, 40) == (3, 4, 8, 10, 16, 32, 40)
    assert bucket_sizes(5, 5, 5) == (5,)
    assert bucket_sizes(4, 4, 8) == (4, 8)  # powers of two strictly between min and max
    p = Profile(input=0, dim=0, min=3, opt=10, max=40)
    assert [p.bucket(s) for s in (3, 5, 9, 10, 11, 33, 40)] == [3, 8, 10, 10, 16, 40, 40]
    assert p.bucket(2) is None and p.bucket(41) is None


# --------------------------------------------------------------------------- runtime
def test_one_engine_per_bucket_and_outside_sizes_get_their_own(aten_only):
    torch.manual_seed(0)
    model = MLP().eval()
    fn, report = compiled(model, {"profiles": [PROFILE]}, dynamic=True)
    inside = [(torch.randn(b, 12),) for b in (3, 5, 8, 6, 20, 4, 3)]  # buckets 4, 8, 32
    assert run_all(fn, model, inside) == []
    assert len(report.graphs) == 3
    assert report.graphs[0].shapes == ["4x12:float32"]  # the engine ran at the bucket size
    state = report.graphs[0].profiles[0]
    assert state["status"] == "active" and state["built"] == [4, 8, 32]
    messages = run_all(fn, model, [(torch.randn(b, 12),) for b in (40, 50, 40)])
    outside = [m for m in messages if "outside the declared profile [2, 32]" in m]
    assert len(outside) == 1 and len(messages) == 1, messages
    assert len(report.graphs) == 5  # 40 and 50: one engine each, counted like any shape
    assert "profile input 0 dim 0 [2..32, opt 8]: active; buckets 2,4,8,16,32; built 4,8,32" in str(report)


def test_mark_dynamic_range_gives_one_graph_for_the_profile(aten_only):
    torch.manual_seed(0)
    model = MLP().eval()
    fn, report = compiled(model, {"profiles": [PROFILE]})
    mark = lambda x: torch._dynamo.mark_dynamic(x, 0, min=2, max=32)  # noqa: E731
    assert run_all(fn, model, [(torch.randn(b, 12),) for b in (3, 7, 6, 4)], mark=mark) == []
    assert [g.shapes for g in report.graphs] == [["4x12:float32"], ["8x12:float32"]]


def test_padding_rejected_when_rows_depend_on_each_other(aten_only):
    torch.manual_seed(0)
    model = Centered().eval()
    fn, report = compiled(model, {"profiles": [PROFILE]}, dynamic=True)
    messages = run_all(fn, model, [(torch.randn(b, 12),) for b in (3, 5, 6, 3)])
    assert len(messages) == 1, messages
    assert ("profile for input 0 dim 0 rejected: outputs depend on padded rows along input 0 dim 0"
            in messages[0])
    assert "building one engine per shape instead" in messages[0]
    assert [g.shapes for g in report.graphs] == [["3x12:float32"], ["5x12:float32"], ["6x12:float32"]]
    state = report.graphs[0].profiles[0]
    assert state["status"] == "rejected" and "padded rows" in state["reason"]


def test_exact_bucket_engine_is_not_reused_for_padding_after_rejection(aten_only):
    """A bucket engine built at its exact size (nothing to check yet) stays an exact-size engine
    when the first padded call shows padding is wrong."""
    torch.manual_seed(0)
    model = Centered().eval()
    fn, report = compiled(model, {"profiles": [PROFILE]}, dynamic=True)
    messages = run_all(fn, model, [(torch.randn(b, 12),) for b in (8, 7, 8)])
    assert len(messages) == 1 and "rejected" in messages[0]
    assert [g.shapes for g in report.graphs] == [["8x12:float32"], ["7x12:float32"]]


def test_output_that_cannot_be_sliced_rejects_the_profile(aten_only):
    class AppendRow(nn.Module):
        def forward(self, x):
            return torch.cat([x, x[:1]]) * 2  # size + 1 rows: padding cannot be sliced off

    model = AppendRow()
    fn, report = compiled(model, {"profiles": [PROFILE]}, dynamic=True)
    messages = run_all(fn, model, [(torch.randn(b, 12),) for b in (3, 5)])
    assert len(messages) == 1 and "padding cannot be undone: output 0 has dim 0" in messages[0]
    assert len(report.graphs) == 2


def test_profile_input_counts_tensor_arguments_in_signature_order(aten_only):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 5), nn.Linear(7, 5)

        def forward(self, x, y):
            return self.b(y) * 2, self.a(x)  # y is used first: Dynamo lists it first

    torch.manual_seed(0)
    model = Two().eval()
    inputs = [(torch.randn(4, 12), torch.randn(b, 7)) for b in (9, 10, 12, 20)]  # y: 16, 16, 16, 32
    for declared in (1, "y"):
        torch._dynamo.reset()
        fn, report = compiled(model, {"profiles": [{**PROFILE, "input": declared}]}, dynamic=True)
        assert run_all(fn, model, inputs) == []
        assert report.graphs[0].profiles[0]["built"] == [16, 32]
        assert len(report.graphs) == 2


def test_engine_bound_still_holds_with_buckets(aten_only):
    torch.manual_seed(0)
    model = MLP().eval()
    fn, report = compiled(model, {"profiles": [PROFILE], "max_engines": 2}, dynamic=True)
    messages = run_all(fn, model, [(torch.randn(b, 12),) for b in (3, 6, 12, 20, 3)])
    assert len(report.graphs) == 2
    assert len([m for m in messages if "max_engines=2" in m]) == 1, messages


def test_training_graphs_keep_one_engine_per_shape(aten_only):
    torch.manual_seed(0)
    model = MLP().train()
    fn, report = compiled(model, {"profiles": [PROFILE]}, dynamic=True)
    for b in (3, 5):
        x = torch.randn(b, 12, requires_grad=True)
        assert_same(fn(x), model(x))
    forward = [g for g in report.graphs if g.role == "forward"]
    assert [g.shapes for g in forward] == [["3x12:float32"], ["5x12:float32"]]
    assert forward[0].profiles[0]["status"] == "not applied"


def test_padded_inputs_through_triton_kernels():
    """Under the Triton interpreter: generated kernels run on the padded inputs."""
    torch.manual_seed(0)
    model = MLP().eval()
    fn, report = compiled(model, {"profiles": [{**PROFILE, "max": 8}]}, dynamic=True)
    assert run_all(fn, model, [(torch.randn(b, 12),) for b in (3, 6, 7)]) == []
    assert [g.shapes for g in report.graphs] == [["4x12:float32"], ["8x12:float32"]]
    assert any(k["impl"] == "triton" for k in report.graphs[0].kernels)


@pytest.mark.gpu
def test_buckets_on_cuda_with_cuda_graphs():
    """On the GPU: bucket engines run generated kernels through CUDA graphs on padded inputs."""
    torch.manual_seed(0)
    model = MLP().cuda().eval()
    fn, report = compiled(model, {"profiles": [{"input": 0, "dim": 0, "min": 1, "opt": 16, "max": 64}]},
                          dynamic=True)
    inside = [(torch.randn(b, 12, device="cuda"),) for b in (3, 10, 16, 40, 3, 12)]  # 4, 16, 64
    assert run_all(fn, model, inside) == []
    assert [g.shapes for g in report.graphs] == [["4x12:float32"], ["16x12:float32"], ["64x12:float32"]]
    assert all(g.cuda_graph for g in report.graphs)
    centered = Centered().cuda().eval()
    fn, report = compiled(centered, {"profiles": [PROFILE]}, dynamic=True)
    messages = run_all(fn, centered, [(torch.randn(b, 12, device="cuda"),) for b in (3, 5)])
    assert len(messages) == 1 and "outputs depend on padded rows" in messages[0]
