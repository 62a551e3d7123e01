"""End-to-end behaviour of the backend on small hand-written models (no zoo)."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_backend
from helpers import assert_same, compile_and_compare


class Block(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d + 1), nn.Linear(2 * d + 1, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 7)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("training", [False, True])
def test_block_matches_eager(training):
    torch.manual_seed(0)
    compile_and_compare(Block().train(training), (torch.randn(3, 5, 12),), training=training)


@pytest.mark.parametrize("training", [False, True])
def test_convnet_matches_eager(training):
    torch.manual_seed(0)
    compile_and_compare(ConvNet().train(training), (torch.randn(2, 3, 9, 7),), training=training)


def test_graph_break_compiles_each_subgraph():
    torch.manual_seed(0)

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            y = torch.relu(self.a(x))
            torch._dynamo.graph_break()
            return self.b(y) * 2

    m = Broken().eval()
    x = torch.randn(4, 6)
    report = compile_backend.explain(m, x)
    assert len([g for g in report.graphs if g.role == "inference"]) == 2
    compile_and_compare(m, (x,))


def test_input_mutation_and_aliasing_preserved():
    def f(x, y):
        x.add_(1)  # mutates the caller's tensor
        view = y.view(-1)  # output aliases an input
        return x * 2, view

    x, y = torch.randn(4, 3), torch.randn(2, 6)
    x_ref = x.clone()
    compiled = torch.compile(f, backend="compile_backend")
    out, view = compiled(x, y)
    assert_same(x, x_ref + 1)
    assert_same(out, (x_ref + 1) * 2)
    assert view.data_ptr() == y.data_ptr()
    view[0] = 42.0
    assert y[0, 0].item() == 42.0


def test_changed_batch_size():
    torch.manual_seed(0)
    m = Block().eval()
    compiled = torch.compile(m, backend="compile_backend")
    with torch.no_grad():
        for batch in (3, 5, 2, 7):
            x = torch.randn(batch, 4, 12)
            assert_same(compiled(x), m(x))


def test_unsupported_op_falls_back_with_report_entry():
    class Sorts(nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=-1).values + 1

    x = torch.randn(3, 9)
    report = compile_backend.explain(Sorts().eval(), x)
    reasons = [f for g in report.graphs for f in g.fallbacks]
    assert any("sort" in f["op"] and "ATen" in f["reason"] for f in reasons), reasons
    compile_and_compare(Sorts().eval(), (x,))


def test_pipeline_failure_falls_back_to_eager_with_warning(monkeypatch):
    from compile_backend import pipeline

    def broken(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(pipeline, "compile_graph", broken)
    m = Block().eval()
    x = torch.randn(2, 3, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = torch.compile(m, backend="compile_backend")(x)
            assert_same(out, m(x))
    messages = [str(w.message) for w in caught]
    assert any("injected failure" in s and "graph" in s and "eagerly" in s for s in messages), messages


def test_fallback_error_raises(monkeypatch):
    from compile_backend import pipeline

    def broken(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(pipeline, "compile_graph", broken)
    compiled = torch.compile(Block().eval(), backend="compile_backend", options={"fallback": "error"})
    with pytest.raises(Exception, match="injected failure"), torch.no_grad():
        compiled(torch.randn(2, 3, 12))


def test_frozen_weights_follow_updates():
    """In inference weights are frozen and folded; in-place updates refit before the next call."""
    torch.manual_seed(0)
    m = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(m, backend="compile_backend")
    with torch.no_grad():
        assert_same(compiled(x), m(x))
        m.conv.weight.mul_(1.5)  # in-place (what an optimizer step does)
        m.bn.running_var.add_(0.3)
        assert_same(compiled(x), m(x))
        state = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in m.state_dict().items()}
        m.load_state_dict(state)
        assert_same(compiled(x), m(x))
        m.load_state_dict({k: v + 0.1 if v.is_floating_point() else v for k, v in state.items()}, assign=True)
        assert_same(compiled(x), m(x))


def test_optimizer_step_between_evals():
    torch.manual_seed(0)
    m = Block()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 3, 12)
    compiled_eval = torch.compile(m, backend="compile_backend")
    for _ in range(2):
        m.eval()
        with torch.no_grad():
            assert_same(compiled_eval(x), m(x))
        m.train()
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()


def test_compile_entry_and_options_reach_backend():
    m = Block().eval()
    compiled = compile_backend.compile(m, precision="fp32", fallback="error")
    x = torch.randn(2, 2, 12)
    with torch.no_grad():
        assert_same(compiled(x), m(x))


def test_precision_fp16_runs_gemms_in_half():
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 3, 12)
    report = compile_backend.explain(m, x, precision="bf16")
    assert report.graphs[0].passes["lower_precision"] == 2
    with torch.no_grad():
        out = compile_backend.compile(m, precision="bf16")(x)
        assert out.dtype == torch.float32
        assert_same(out, m(x), {torch.float32: (5e-2, 5e-2)})


def test_report_contract():
    x = torch.randn(2, 3, 8, 8)
    report = compile_backend.explain(ConvNet().eval(), x)
    d = report.to_dict()
    assert set(d) >= {"graphs", "cache", "device", "versions"}
    g = d["graphs"][0]
    assert set(g) >= {"passes", "kernels", "fallbacks"}
    assert all(set(k) >= {"kind", "ops", "impl", "config"} for k in g["kernels"])
    assert {"hits", "misses", "dir", "timing_hits"} <= set(d["cache"])
    assert d["cache"]["dir"]  # the resolved cache root, never None
    assert {"torch", "triton", "compile_backend"} <= set(d["versions"])
    text = str(report)
    assert "aten.convolution" in text and "passes:" in text
    assert "<table>" in report._repr_html_()


def test_entry_point_works_without_importing_package():
    code = (
        "import torch\n"
        "m = torch.nn.Linear(4, 2).eval()\n"
        "with torch.no_grad():\n"
        "    out = torch.compile(m, backend='compile_backend')(torch.randn(3, 4))\n"
        "print(tuple(out.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("(3, 2)")


def test_import_is_light():
    code = (
        "import sys, torch, compile_backend\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'cuda initialised'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_wrong_kernel_is_rejected_by_validation(monkeypatch):
    """A generated kernel that disagrees with ATen never reaches the user: ATen runs, reported."""
    from compile_backend.kernels import base, select

    def wrong_builder(group, ctx):
        def fn(*args):
            return tuple(o * 1.5 for o in group.reference(*args))  # off by 50%

        return base.Kernel(kind=group.kind, impl="triton", ops=group.ops, fn=fn)

    monkeypatch.setitem(sys.modules, "fake_builders", type(sys)("fake_builders"))
    sys.modules["fake_builders"].build = wrong_builder
    monkeypatch.setitem(select.BUILDERS, "pointwise", ("fake_builders:build",))

    class Act(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) * 3 + 1

    x = torch.randn(5, 7)
    report = compile_backend.explain(Act().eval(), x)
    reasons = [f["reason"] for g in report.graphs for f in g.fallbacks]
    assert any("rejected" in r and "relative error" in r for r in reasons), reasons
    assert all(k["impl"] == "aten" for g in report.graphs for k in g.kernels if k["kind"] == "pointwise")
    compile_and_compare(Act().eval(), (x,))


def test_engine_bound_warns_once_and_stays_correct():
    torch.manual_seed(0)
    m = Block().eval()
    compiled = torch.compile(m, backend="compile_backend", options={"max_engines": 2}, dynamic=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for batch in (2, 3, 4, 5, 6):
            x = torch.randn(batch, 3, 12)
            assert_same(compiled(x), m(x))
    bound = [w for w in caught if "max_engines=2" in str(w.message)]
    assert len(bound) == 1, [str(w.message) for w in caught]


def test_weight_with_another_layout_rebuilds_the_engine(monkeypatch):
    """Frozen weights are not in the per-call engine key (it runs on every call); a weight
    replaced by a tensor of another layout makes the engine refuse it and a new one is built."""
    from compile_backend import runtime

    made = []

    class Recording(runtime.CompiledGraph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(runtime, "CompiledGraph", Recording)
    torch.manual_seed(0)
    model, x = torch.nn.Linear(8, 8).eval(), torch.randn(3, 8)
    compiled = torch.compile(model, backend="compile_backend")
    with torch.no_grad():
        ref = compiled(x)
        (graph,) = made
        engine = next(iter(graph.engines.values()))
        weight_index = next(iter(engine.frozen))
        # same values, transposed storage: another stride under the same graph
        calls = []
        original = graph._build

        def counting(args, key):
            calls.append(key)
            return original(args, key)

        graph._build = counting
        bound = {i: t for i, (t, *_) in engine._bound.items()}
        new_args = [bound.get(i) for i in range(max(bound) + 1)] + [x]
        w = new_args[weight_index]
        new_args[weight_index] = w.t().contiguous().t()
        assert new_args[weight_index].stride() != w.stride()
        out = graph(*new_args)
    assert len(calls) == 1  # rebuilt once
    torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, ref)


class UpcastAttention(torch.nn.Module):
    """16-bit q, k, v upcast to fp32 for the products and softmax, the result cast back: the
    graph SDPA's math path gives on CUDA (torch >= 2.5 upcasts 16-bit math attention), which
    HF BERT on the H200 took (issue #17: 4 copy kernels per layer)."""

    def forward(self, q, k, v, mask):
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * 0.125 + mask
        return torch.matmul(torch.softmax(s, dim=-1), v.float()).half()


def test_precision_fp16_drops_exact_round_trip_casts_around_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g).half() for _ in range(3))
    mask = torch.zeros(2, 1, 1, 17)
    mask[..., 13:] = -1e4
    m = UpcastAttention().eval()
    report = compile_backend.explain(m, q, k, v, mask, precision="fp16")
    g0 = report.graphs[0]
    assert g0.passes["fuse_attention"] == 1 and g0.passes["lower_upcast_attention"] == 1
    ops = [op for kern in g0.kernels for op in kern["ops"]]
    assert "compile_backend.attention" in ops
    assert ops.count("aten._to_copy") <= 1, ops  # at most the mask's cast; never q/k/v or the output
    with torch.no_grad():
        out = compile_backend.compile(m, precision="fp16")(q, k, v, mask)
        assert out.dtype == torch.float16
        assert_same(out, m(q, k, v, mask), {torch.float16: (2e-3, 2e-3)})


class UpcastAttentionKeptInFp32(torch.nn.Module):
    def forward(self, q, k, v, mask):
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * 0.125 + mask
        return torch.matmul(torch.softmax(s, dim=-1), v.float())  # the caller wants fp32


@pytest.mark.parametrize("keep_fp32", [False, True])
def test_default_precision_runs_upcast_16_bit_attention_in_16_bits(keep_fp32):
    """At the default precision too: the graph SDPA's math path gives for 16-bit inputs on CUDA
    runs as the 16-bit attention eager's fused kernel is; an fp32 result the caller keeps is
    left in fp32."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g).half() for _ in range(3))
    mask = torch.zeros(2, 1, 1, 17)
    m = (UpcastAttentionKeptInFp32() if keep_fp32 else UpcastAttention()).eval()
    g0 = compile_backend.explain(m, q, k, v, mask).graphs[0]
    assert g0.passes["fuse_attention"] == 1
    assert g0.passes["lower_upcast_attention"] == (0 if keep_fp32 else 1)
    ops = [op for kern in g0.kernels for op in kern["ops"]]
    assert ops.count("aten._to_copy") == (3 if keep_fp32 else 1), ops
    with torch.no_grad():
        out = compile_backend.compile(m)(q, k, v, mask)
        want = m(q, k, v, mask)
        assert out.dtype == want.dtype
        assert_same(out, want, {torch.float16: (2e-3, 2e-3), torch.float32: (1e-5, 1e-5)})
