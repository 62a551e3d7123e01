"""Regression tests for the wrong results and crashes differential fuzzing and user probes found.

Each case runs on the plain CPU path (ATen through our passes) and under Triton's interpreter
(our generated kernels), with validation on and off: validation is a safety net, the passes and
kernels must be right without it. Numbers are compared with eager at the per-dtype tolerances of
``helpers.TOLERANCES``; IEEE cases (signed zeros) compare bit patterns.
"""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compile_backend
from helpers import assert_same

MODES = [pytest.param(("0", True), id="plain"), pytest.param(("1", True), id="interpret"),
         pytest.param(("1", False), id="interpret-novalidate")]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    interpret, validate = request.param
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    return {"validate": validate}


def compiled_equals_eager(fn, *inputs, options=None, grad=False):
    """``fn`` compiled gives eager's values (and gradients); no fallback warning on the way."""
    clone = lambda: [x.detach().clone().requires_grad_(grad and x.is_floating_point()) for x in inputs]
    e_in, c_in = clone(), clone()
    expected = fn(*e_in)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile_backend: compiling")
        actual = torch.compile(fn, backend="compile_backend", options=options)(*c_in)
    assert_same(actual, expected)
    if grad:
        expected.float().pow(2).sum().backward()
        actual.float().pow(2).sum().backward()
        for a, e in zip(c_in, e_in):
            if e.grad is not None:
                torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)
    return actual


# ------------------------------------------------------------------ writes through views (item 1)
def test_inplace_on_strided_slice_of_intermediate(mode):
    def fn(x):
        v = x @ x.T
        v[..., ::2].mul_(-2)
        return v.norm(dim=-2)

    compiled_equals_eager(fn, torch.randn(5, 7), options=mode)


def test_inplace_on_split_output(mode):
    def fn(h):
        h = h * 2
        a, b, c = h.split(2, -1)
        a.relu_()
        return h + 1

    compiled_equals_eager(fn, torch.randn(3, 5), options=mode)


def test_setitem_on_intermediate(mode):
    def fn(x):
        h = x * 3
        h[1:3] = 0
        return h.sum(0)

    compiled_equals_eager(fn, torch.randn(5, 4), options=mode)


@pytest.mark.parametrize("padding_mode", ["circular", "reflect", "replicate", "zeros"])
def test_conv_padding_modes(mode, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    compiled_equals_eager(lambda x: conv(x), torch.randn(2, 3, 6, 5), options=mode)


def test_backward_of_strided_slicing(mode):
    compiled_equals_eager(lambda x: x[:, ::2] * 3 + x[:, 1::2].exp(), torch.randn(5, 6),
                          options=mode, grad=True)


def test_slice_scatter_is_not_a_view():
    from compile_backend.kernels.base import is_view_op

    aten = torch.ops.aten
    assert not is_view_op(aten.slice_scatter.default)
    assert not is_view_op(aten._conj.default) and not is_view_op(aten._neg_view.default)
    assert is_view_op(aten.slice.Tensor) and is_view_op(aten.view.default) and is_view_op(aten.expand.default)


# ------------------------------------------------------------------ bit views and IEEE (items 2, 3)
def test_conj_is_kept(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z = torch.randn(4, dtype=torch.complex64)
    out = torch.compile(lambda z: z.conj() + 0, backend="compile_backend")(z)
    assert torch.equal(out.resolve_conj(), z.conj().resolve_conj())


def test_plus_zero_keeps_signed_zero(mode):
    x = torch.tensor([-0.0, 0.0, 1.0, -2.5])
    out = compiled_equals_eager(lambda x: 1 / (x + 0), x, options=mode)
    assert out[0] == float("inf") and out[1] == float("inf")
    out = compiled_equals_eager(lambda x: torch.atan2(x + 0, -torch.ones_like(x)), x, options=mode)
    assert out[0] > 0


def test_only_exact_identities_are_removed():
    """x - 0, x * 1, x / 1 and x + (-0.0) are exact for every x (incl. -0.0): still dropped;
    float x + 0 and x - (-0.0) are kept; on integers x + 0 is exact."""
    from compile_backend.fx_passes import total
    from compile_backend.fx_passes.cleanup_rules import remove_noops
    from fx_passes.graphs import Builder, ctx

    aten = torch.ops.aten
    cases = [(aten.sub.Tensor, 0, torch.randn(3), 1), (aten.mul.Tensor, 1, torch.randn(3), 1),
             (aten.div.Tensor, 1, torch.randn(3), 1), (aten.add.Tensor, -0.0, torch.randn(3), 1),
             (aten.add.Tensor, 0, torch.randn(3), 0), (aten.add.Tensor, 0.0, torch.randn(3), 0),
             (aten.sub.Tensor, -0.0, torch.randn(3), 0), (aten.add.Tensor, 0, torch.arange(3), 1)]
    for op, value, example, removed in cases:
        b = Builder()
        x = b.input(example)
        t = b.build(b.op(aten.neg.default, b.op(op, x, value)))
        assert total(remove_noops(t.gm, ctx())) == removed, (op, value, example.dtype)


# ------------------------------------------------------------------ random numbers (item 4)
def test_first_call_draws_the_same_random_numbers_as_eager(mode):
    drop = nn.Dropout(0.5)
    fn = lambda x: drop(x * 2) + torch.rand_like(x)
    x = torch.ones(257)
    torch.manual_seed(0)
    expected = [fn(x) for _ in range(3)]
    after_eager = torch.rand(3)
    compiled = torch.compile(fn, backend="compile_backend", options=mode)
    torch.manual_seed(0)
    actual = [compiled(x) for _ in range(3)]
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    assert torch.equal(torch.rand(3), after_eager)


def test_seeded_training_with_dropout_matches_eager(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Dropout(0.3), nn.GELU(), nn.Linear(9, 3))
    twin = nn.Sequential(nn.Linear(6, 9), nn.Dropout(0.3), nn.GELU(), nn.Linear(9, 3))
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, backend="compile_backend")
    x = torch.randn(4, 6)
    for step in range(2):
        torch.manual_seed(step)
        e = model(x)
        e.sum().backward()
        torch.manual_seed(step)
        a = compiled(x)
        a.sum().backward()
        assert_same(a, e)
    for pe, pa in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(pa.grad, pe.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ .data updates (item 6)
def _linear_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()


UPDATES = {
    "data_copy": lambda m: m[0].weight.data.copy_(torch.randn(5, 6)),
    "ema": lambda m: m[0].weight.data.mul_(0.5).add_(torch.ones(5, 6), alpha=0.5),
    "data_assign": lambda m: setattr(m[0].weight, "data", torch.randn(5, 6)),
    "buffer_fill": lambda m: m[1].running_mean.data.fill_(1),
}


@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("fix", ["refit", "freeze_false", "detected"])
def test_weights_written_through_data_are_never_served_stale(aten_only, update, fix):
    m = _linear_bn()
    compiled = torch.compile(m, backend="compile_backend", options={"freeze": fix != "freeze_false"})
    x = torch.randn(3, 6)
    with torch.no_grad():
        compiled(x)
        UPDATES[update](m)
        if fix == "refit":
            assert compile_backend.refit(m) == 7  # 4 parameters, BatchNorm's 2 statistics and counter
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = compiled(x)
    torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)
    noticed = [w for w in caught if "without PyTorch recording it" in str(w.message)]
    silent_by_design = fix != "detected" or update == "data_assign"  # seen, or a new storage
    assert bool(noticed) == (not silent_by_design)


def test_refit_rejects_what_is_not_weights():
    with pytest.raises(TypeError, match="module or tensors"):
        compile_backend.refit(3)
    with pytest.raises(ValueError, match="'freeze' must be True or False"):
        compile_backend.Options(freeze="no")


# ------------------------------------------------------------------ strided GEMM slices (item 7)
class TwoHeadsGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.gn = nn.Linear(8, 12), nn.Linear(8, 12), nn.GroupNorm(3, 12)

    def forward(self, x):
        return self.gn(self.a(x)) + self.b(x)


def test_merged_gemm_slice_feeding_group_norm(mode):
    torch.manual_seed(0)
    m = TwoHeadsGroupNorm().eval()
    report = compile_backend.explain(m, torch.randn(5, 8), **mode)
    assert report.graphs[0].passes["merge_parallel_gemms"] == 1
    with torch.no_grad():
        compiled_equals_eager(m, torch.randn(5, 8), options=mode)


# ------------------------------------------------------------------ threads (item 8)
@pytest.mark.parametrize("interpret", ["0", "1"])
def test_concurrent_first_calls_build_once_and_agree(monkeypatch, tmp_path, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    from compile_backend import pipeline

    cold = []
    original = pipeline.compile_graph

    def counting(*args, **kwargs):
        cold.append(kwargs.get("plan") is None)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compile_graph", counting)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.LayerNorm(8)).eval()
    compiled = torch.compile(m, backend="compile_backend", options={"cache_dir": str(tmp_path)})
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = m(x)
    outs, errors = [], []

    def work():
        try:
            with torch.no_grad():
                for _ in range(2):
                    outs.append(compiled(x))
        except Exception as exc:  # any exception in a user thread is a failure
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(outs) == 8 and all(torch.allclose(o, expected, atol=1e-5) for o in outs)
    # Dynamo compiles the frame once per thread that missed its cache (upstream behaviour, also
    # with backend="aot_eager"), so up to 4 graphs reach us; where kernels are built (the
    # interpreter here, CUDA on a GPU) the engine is built and tuned once: the other builds wait
    # on the engine cache's key lock and load that entry. The plain CPU path builds no kernels.
    if interpret == "1":
        assert cold.count(True) == 1, cold


# ------------------------------------------------------------------ on the GPU (run on the device)
@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", ["on", "off"])
def test_cuda_random_stream_matches_eager(cuda_graphs, tmp_path):
    """Building (tuning, validation) and the CUDA graph's warm-up runs draw random numbers; the
    user's calls must draw what eager draws under the same seed, replayed graphs included."""
    drop = nn.Dropout(0.5)
    lin = nn.Linear(64, 64).cuda().eval()
    fn = lambda x: drop(lin(x)) + torch.rand_like(x)
    x = torch.randn(32, 64, device="cuda")
    torch.manual_seed(0)
    with torch.no_grad():
        expected = [fn(x) for _ in range(4)]
    after_eager = torch.rand(3, device="cuda")
    compiled = torch.compile(fn, backend="compile_backend",
                             options={"cuda_graphs": cuda_graphs, "cache_dir": str(tmp_path)})
    torch.manual_seed(0)
    with torch.no_grad():
        actual = [compiled(x) for _ in range(4)]
    for a, e in zip(actual, expected):
        # the same masks and noise; values at fp32 GEMM tolerance (the GEMM may be ours)
        assert torch.equal(a == 0, e == 0)
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.rand(3, device="cuda"), after_eager)


@pytest.mark.gpu
def test_cuda_concurrent_first_calls(tmp_path):
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32), nn.LayerNorm(32)).cuda().eval()
    compiled = torch.compile(m, backend="compile_backend", options={"cache_dir": str(tmp_path)})
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        expected = m(x)
    outs, errors = [], []

    def work():
        try:
            with torch.no_grad():
                for _ in range(3):
                    outs.append(compiled(x))
            torch.cuda.synchronize()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(outs) == 12
    for o in outs:
        torch.testing.assert_close(o, expected, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ found by the fuzzer (issue #14)
def _bits_equal(actual, expected):
    """Same values, NaN where eager has NaN, and the same sign on every zero."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(actual), torch.signbit(expected) | (expected.isnan() & torch.signbit(actual)))


def test_tanh_keeps_the_sign_of_zero(mode):
    """tanh(-0.0) is -0.0 (generated code: the small-|x| series multiplies x, not |x|)."""
    x = torch.tensor([-0.0, 0.0, -1e-30, 1e-30, -0.2, 0.3, -3.0, 20.0, float("nan")])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        fn = lambda t: torch.tanh(t) * 2  # noqa: E731  (a pointwise chain, not a lone ATen call)
        out = torch.compile(fn, backend="compile_backend", options=mode)(x.to(dtype))
        eager = fn(x.to(dtype))
        assert torch.equal(torch.signbit(out[:4]), torch.signbit(eager[:4])), dtype
        torch.testing.assert_close(out, eager, equal_nan=True, **{"rtol": 2e-6, "atol": 0} if dtype == torch.float32 else {})


def test_complex_times_one_is_not_dropped(monkeypatch):
    """z * 1 is (a - b*0) + (a*0 + b)i for complex z: the sign of a zero real part and NaN
    from an infinite imaginary part differ from z; only z - 0 is an identity."""
    from compile_backend.fx_passes import total
    from compile_backend.fx_passes.cleanup_rules import remove_noops
    from fx_passes.graphs import Builder, ctx

    aten = torch.ops.aten
    z = torch.complex(torch.tensor([-0.0, 1.0, 0.0]), torch.tensor([-0.0, float("inf"), 0.0]))
    for op, value, removed in [(aten.mul.Tensor, 1, 0), (aten.div.Tensor, 1, 0), (aten.add.Tensor, -0.0, 0),
                               (aten.sub.Tensor, 0, 1)]:
        b = Builder()
        t = b.build(b.op(aten.neg.default, b.op(op, b.input(z), value)))
        assert total(remove_noops(t.gm, ctx())) == removed, op
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fn = lambda z: torch.view_as_real(z.conj() * 1)  # noqa: E731
    _bits_equal(torch.compile(fn, backend="compile_backend", options={"validate": False})(z), fn(z))


class _MaskedAttention(nn.Module):
    """softmax(q k^T * scale + mask) v written out (aten._softmax), or through SDPA."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, mask):
        if self.kind == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        return s.softmax(-1) @ v


@pytest.mark.parametrize("kind", ["chain", "sdpa"])
@pytest.mark.parametrize("mask_kind", ["bool", "neg_inf", "fp32_min"])
def test_fully_masked_attention_rows_match_eager(mode, kind, mask_kind):
    """A query row whose every key is masked: the explicit chain gives NaN (softmax of -inf),
    SDPA zeros, both with -inf; with finfo(fp32).min (a padding mask) both give the mean of v
    (the kernel's log2-domain mask must not overflow to -inf). Rows with keys are unchanged."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    keep = torch.rand(5, 7, generator=g) > 0.4
    keep[:, 0] = True
    keep[2] = False
    k, v = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    fill = {"neg_inf": float("-inf"), "fp32_min": torch.finfo(torch.float32).min}.get(mask_kind)
    mask = keep if fill is None else torch.zeros(5, 7).masked_fill(~keep, fill)
    model = _MaskedAttention(kind).eval()
    with torch.no_grad():
        expected = model(q, k, v, mask)
        actual = torch.compile(model, backend="compile_backend", options=mode)(q, k, v, mask)
    if mask_kind != "fp32_min":
        assert bool(expected[:, :, 2].isnan().all()) == (kind == "chain")
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_clamp_by_a_number_keeps_negative_zero(mode, dtype):
    """Eager replaces only values beyond a number bound: clamp(-0.0, min=0) is -0.0 (a max
    instruction would give +0.0); a NaN bound still gives NaN."""
    x = torch.tensor([-0.0, 0.0, -1.0, 2.0, 0.25, float("nan")], dtype=dtype)
    fns = [lambda t: t.clamp(min=0) * 2, lambda t: t.clamp(max=0) * 2, lambda t: t.clamp(-0.5, 0.5) * 2,
           lambda t: F.hardtanh(t) * 2, lambda t: t.clamp(min=float("nan")) * 2]
    for fn in fns:
        out = torch.compile(fn, backend="compile_backend", options=mode)(x)
        _bits_equal(out, fn(x))
