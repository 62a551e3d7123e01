"""Scaled (INT8 / FP8) GEMM and convolution group kernels (compile_backend/kernels/qgemm.py,
qconv.py) against ``quant_ref`` (the ops' CPU implementation, i.e. the group's ATen reference).

CPU tensors under the Triton interpreter; odd shapes (M 1/17/33, K 24/40, N 8/24; convolutions
with stride, padding, dilation and groups), per-tensor and per-row activation scales, per-channel
and per-tensor weight scales, with and without bias, fp32/fp16/bf16 outputs, fused chains
(activation, residual, cast). The vendor candidates (``torch._int_mm`` / ``torch._scaled_mm`` +
the generated epilogue) run here too: ATen's CPU versions stand in for cuBLASLt.

Tolerances, per operand dtype:
* int8: the accumulation is exact (int32 in the kernel, fp64 in quant_ref, |acc| < 2^24 here),
  and the interpreter computes the epilogue ``acc * (x_scale * w_scale) + bias`` with the same
  fp32 roundings as quant_ref: bit-identical for the anchor alone (on a GPU an fma contraction
  may differ by one fp32 ulp: rtol 2e-7 there). A chain adds the ops' own tolerance
  (groups.TOL per output dtype).
* fp8: products of e4m3 values are exact in fp32, the fp32 sums differ in order: 1e-5 of the
  output's magnitude, plus one rounding of a reduced output dtype (groups.TOL).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import compile_backend.ops  # noqa: F401  (registers torch.ops.compile_backend.*)
from groups import TOL, context, make_group, randn  # tests/kernels/groups.py
from compile_backend.fx_passes.partition import partition
from compile_backend.kernels import quant_ref
from compile_backend.kernels.base import KernelContext, KernelGroup, Unsupported
from compile_backend.kernels.gemm_config import GemmConfig
from compile_backend.kernels.gemm_runner import EPILOGUE_ALTERNATIVES
from compile_backend.kernels.qconv import build_scaled_conv, scaled_conv_candidates
from compile_backend.kernels.qgemm import build_scaled_mm, scaled_mm_candidates
from compile_backend.kernels.select import builders_for, choose_kernel
from compile_backend.options import Options

FP8 = torch.float8_e4m3fn
scaled_mm = torch.ops.compile_backend.scaled_mm
scaled_conv = torch.ops.compile_backend.scaled_conv


def quantized_linear(m, k, n, precision, *, per_row=False, per_channel=True, bias=True, bias_dtype=torch.float32,
                     seed=0):
    """(xq, x_scale, wq, w_scale, bias) as the quantize pass makes them."""
    x, w = randn(m, k, seed=seed) * 3, randn(n, k, seed=seed + 1)
    wq, ws = quant_ref.quantize_weight(w, precision, per_channel)
    xs = quant_ref.row_scale(x, precision) if per_row else quant_ref.scale_from_amax(x.abs().amax(), precision)
    xq = quant_ref.quantize(x, xs, precision)
    b = randn(n, seed=seed + 2).to(bias_dtype) if bias else None
    return xq, xs, wq, ws, b


def anchor_group(fn, *inputs, kind="gemm", op="scaled_mm") -> KernelGroup:
    g = make_group(fn, *inputs)
    anchor = next(n for n in g.gm.graph.nodes if n.op == "call_function" and n.target._opname == op)
    return KernelGroup(kind, g.gm, anchor=anchor.name)


def check(kernel, group, inputs, precision, out_dtype, chain=False):
    expected, got = group.reference(*inputs), kernel(*inputs)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        if precision == "int8" and not chain and e.dtype == torch.float32:
            assert torch.equal(g, e)  # bit-identical (see module docstring)
            continue
        tol = dict(TOL[e.dtype])
        if precision == "fp8" or chain:
            tol["atol"] = max(tol["atol"], 1e-5 * e.float().abs().max().item())
            tol["rtol"] = max(tol["rtol"], 1e-5)
        torch.testing.assert_close(g, e, **tol)


CTX = KernelContext(Options(), torch.device("cpu"), True)


# ----------------------------------------------------------------------------- scaled_mm
@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("mkn", [(1, 24, 8), (17, 40, 24), (33, 24, 24), (17, 24, 8)], ids=str)
@pytest.mark.parametrize("scales", ["tensor-channel", "row-channel", "row-tensor", "tensor-tensor"])
def test_scaled_mm_anchor_only(mkn, precision, scales):
    m, k, n = mkn
    per_row, per_channel = scales.startswith("row"), scales.endswith("channel")
    inputs = quantized_linear(m, k, n, precision, per_row=per_row, per_channel=per_channel, bias=scales != "row-tensor")
    xq, xs, wq, ws, b = inputs
    if b is None:
        fn = lambda xq, xs, wq, ws: scaled_mm(xq, xs, wq, ws, None, torch.float32)  # noqa: E731
        inputs = inputs[:4]
    else:
        fn = lambda xq, xs, wq, ws, b: scaled_mm(xq, xs, wq, ws, b, torch.float32)  # noqa: E731
    group = anchor_group(fn, *inputs)
    kernel = build_scaled_mm(group, CTX)
    assert kernel.impl == "triton" and kernel.kind == "gemm"
    check(kernel, group, inputs, precision, torch.float32)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_scaled_mm_fused_chain(out_dtype, precision):
    """GELU + residual add + cast back in the scaled GEMM's epilogue; a half-precision bias."""
    xq, xs, wq, ws, b = quantized_linear(33, 40, 24, precision, per_row=True, bias_dtype=torch.float16, seed=5)
    r = randn(33, 24, seed=9).to(out_dtype)

    def fn(xq, xs, wq, ws, b, r):
        y = scaled_mm(xq, xs, wq, ws, b, out_dtype)
        return (F.gelu(y) + r).float() * 0.5

    inputs = (xq, xs, wq, ws, b, r)
    group = anchor_group(fn, *inputs)
    kernel = build_scaled_mm(group, CTX)
    assert "gelu" in " ".join(group.ops)
    check(kernel, group, inputs, precision, out_dtype, chain=True)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_scaled_mm_vendor_candidate(precision):
    """torch._int_mm / torch._scaled_mm (their CPU versions here) + the generated epilogue."""
    inputs = quantized_linear(33, 48, 32, precision, per_row=True, seed=7)
    fn = lambda xq, xs, wq, ws, b: F.gelu(scaled_mm(xq, xs, wq, ws, b, torch.bfloat16))  # noqa: E731
    group = anchor_group(fn, *inputs)
    tuning = scaled_mm_candidates(group, CTX, vendor=True)
    name = "torch._int_mm" if precision == "int8" else "torch._scaled_mm"
    vendors = [c for c in tuning.candidates if c.config.get("vendor") == name and not c.config.get("scaled")]
    # with a long chain (a transcendental, a quantize), one candidate per epilogue tile
    assert [c.name for c in vendors] == [f"{name} + triton epilogue"] + [
        f"{name} + triton epilogue {t.block_m}x{t.block_n} w{t.num_warps}" for t in EPILOGUE_ALTERNATIVES]
    expected = group.reference(*inputs)[0]
    for vendor in vendors:
        run = vendor.compile()
        torch.testing.assert_close(run(*inputs)[0], expected, **TOL[torch.bfloat16])
        out = torch.empty_like(expected)
        assert run(*inputs, out=[out])[0] is out  # writes into the engine's buffer


def test_fp8_accumulation_option_reaches_the_dot_and_the_vendor():
    """Options.fp8_accumulation: "fp32" promotes the tensor cores' sum every K tile, "fast" keeps
    Triton's (and cuBLAS's fast-accumulation) one accumulator; INT8 sums stay exact either way.
    Under the interpreter both are fp32 sums, so both match the reference."""
    from compile_backend.kernels.qgemm import scaled_dot_fields

    with pytest.raises(ValueError, match="fp8_accumulation"):
        Options(fp8_accumulation="fp16")
    assert "max_num_imprecise_acc=BLOCK_K" in scaled_dot_fields(FP8, False, "tile")["dot_args"]
    assert "max_num_imprecise_acc=0" in scaled_dot_fields(FP8, False, "instruction")["dot_args"]
    assert "imprecise" not in scaled_dot_fields(FP8, False, "fast")["dot_args"]
    assert "imprecise" not in scaled_dot_fields(torch.int8, False, "tile")["dot_args"]
    fast_ctx = KernelContext(Options(fp8_accumulation="fast"), torch.device("cpu"), True)
    assert fast_ctx.fp8_fast_accumulation and not CTX.fp8_fast_accumulation
    inputs = quantized_linear(33, 48, 32, "fp8", seed=4)
    fn = lambda xq, xs, wq, ws, b: F.gelu(scaled_mm(xq, xs, wq, ws, b, torch.float16))  # noqa: E731
    group = anchor_group(fn, *inputs)
    fast, fp32 = (scaled_mm_candidates(group, c, vendor=True) for c in (fast_ctx, CTX))
    assert fast.key != fp32.key  # the timing cache keeps their winners apart
    assert all(c.config.get("accumulation") == "fast" for c in fast.candidates)
    assert not any("accumulation" in c.config for c in fp32.candidates)
    expected = group.reference(*inputs)[0]
    for cand in fast.candidates:
        torch.testing.assert_close(cand.compile()(*inputs)[0], expected, **TOL[torch.float16])
    int8 = quantized_linear(33, 48, 32, "int8", seed=4)
    assert not any("accumulation" in c.config for c in scaled_mm_candidates(anchor_group(fn, *int8), fast_ctx).candidates)


def test_vendor_candidate_needs_its_shapes():
    inputs = quantized_linear(16, 40, 24, "int8")  # M <= 16: torch._int_mm refuses
    fn = lambda xq, xs, wq, ws, b: scaled_mm(xq, xs, wq, ws, b, torch.float32)  # noqa: E731
    tuning = scaled_mm_candidates(anchor_group(fn, *inputs), CTX, vendor=True)
    assert all(c.impl == "triton" for c in tuning.candidates)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_scaled_mm_epilogue_split_in_halves(precision):
    """GELU + the next layer's quantize in an epilogue run over half the columns at a time."""
    inputs = (*quantized_linear(19, 40, 45, precision, per_row=True, bias_dtype=torch.float16, seed=13),
              torch.tensor(4.0))

    def fn(xq, xs, wq, ws, b, inv):
        y = F.gelu(scaled_mm(xq, xs, wq, ws, b, torch.float16))
        return quant_ref.quantize_steps(quant_ref.eager, y, torch.float16, inv, precision)
    group = anchor_group(fn, *inputs)
    run = scaled_mm_candidates(group, CTX, configs=[GemmConfig(16, 32, 32, num_stages=1, epilogue_split=2)]).candidates[0].compile()
    got, expected = run(*inputs)[0], group.reference(*inputs)[0]
    # codes equal but where the fp32 product sits on a rounding boundary: one step at most
    assert (got.float() - expected.float()).abs().max().item() <= (1.0 if precision == "int8" else 32.0)
    assert (got.float() != expected.float()).float().mean().item() < 0.02


def test_split_k_config_accumulates_int32():
    inputs = quantized_linear(17, 40, 24, "int8", per_row=True)
    fn = lambda xq, xs, wq, ws, b: scaled_mm(xq, xs, wq, ws, b, torch.float32)  # noqa: E731
    group = anchor_group(fn, *inputs)
    tuning = scaled_mm_candidates(group, CTX, configs=[GemmConfig(16, 16, 16, split_k=2, num_stages=1)])
    assert torch.equal(tuning.candidates[0].compile()(*inputs)[0], group.reference(*inputs)[0])


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tma_persistent_kernel_takes_eight_bit_operands(precision, monkeypatch):
    """The persistent TMA kernel (tensor descriptors work under the interpreter too) on K-major
    8-bit operands, edges in M and N zero-filled by the descriptor loads; GELU in the epilogue."""
    from compile_backend.kernels import gemm_tma

    inputs = quantized_linear(37, 64, 45, precision, per_row=True, bias_dtype=torch.float16, seed=11)
    fn = lambda xq, xs, wq, ws, b: F.gelu(scaled_mm(xq, xs, wq, ws, b, torch.float16))  # noqa: E731
    group = anchor_group(fn, *inputs)
    cfg = GemmConfig(32, 16, 32, num_stages=1, tma=True)
    run = scaled_mm_candidates(group, CTX, configs=[cfg]).candidates[0].compile()
    made = []
    real = gemm_tma.tma_descriptors
    monkeypatch.setattr(gemm_tma, "tma_descriptors", lambda *a: made.append(a[3:]) or real(*a))
    expected = group.reference(*inputs)[0]
    torch.testing.assert_close(run(*inputs)[0], expected, **TOL[torch.float16])
    assert made == [(True, True)]  # the TMA path ran


@pytest.mark.parametrize("scales", ["tensor-tensor", "row-channel", "tensor-channel"])
@pytest.mark.parametrize("chain", [False, True])
def test_fp8_vendor_candidate_applies_scales_and_bias_in_cublas(scales, chain):
    """FP8 ``_scaled_mm`` with the scales and bias applied (per tensor, or "rowwise" [M, 1] x
    [1, N]) and the op's output dtype; a chain runs over that value. It is the first FP8
    candidate; where it returns the vendor's own tensor it does not claim to write ``out=``."""
    per_row, per_channel = scales.startswith("row"), scales.endswith("channel")
    inputs = quantized_linear(33, 64, 48, "fp8", per_row=per_row, per_channel=per_channel,
                              bias_dtype=torch.float16, seed=3)
    if chain:
        fn = lambda xq, xs, wq, ws, b: F.gelu(scaled_mm(xq, xs, wq, ws, b, torch.float16)) * 2  # noqa: E731
    else:
        fn = lambda xq, xs, wq, ws, b: scaled_mm(xq, xs, wq, ws, b, torch.float16)  # noqa: E731
    group = anchor_group(fn, *inputs)
    tuning = scaled_mm_candidates(group, CTX, vendor=True)
    first = tuning.candidates[0]
    assert first.name == "torch._scaled_mm scaled" + (" + triton epilogue" if chain else ""), first.name
    assert (first.name in tuning.writes_out) == chain
    fp32_bias = quantized_linear(33, 64, 48, "fp8", per_row=per_row, per_channel=per_channel, seed=3)
    names = [c.name for c in scaled_mm_candidates(anchor_group(fn, *fp32_bias), CTX, vendor=True).candidates]
    assert not any(n.startswith("torch._scaled_mm scaled") for n in names), names  # fp32 bias: two roundings
    scaled = [c for c in tuning.candidates if c.name.startswith("torch._scaled_mm scaled")]
    assert len(scaled) == (1 + len(EPILOGUE_ALTERNATIVES) if chain else 1), [c.name for c in scaled]
    expected = group.reference(*inputs)[0]
    for cand in scaled:
        try:
            run = cand.compile()
            got = run(*inputs)[0]
        except (RuntimeError, NotImplementedError) as exc:  # a torch without fp8 _scaled_mm on the CPU
            pytest.skip(f"torch._scaled_mm on the CPU: {exc}")
        # one fp16 rounding of the same fp32 value, summed in another order: an ulp at most
        torch.testing.assert_close(got, expected, atol=1e-3 * expected.abs().max().item(), rtol=1e-3)
        torch.testing.assert_close(run(*inputs)[0], expected, atol=1e-3 * expected.abs().max().item(), rtol=1e-3)


def test_fp8_scaled_candidate_spreads_a_constant_x_scale_once_per_version():
    """A static (constant) per-tensor x scale with per-channel w scales: rowwise ``_scaled_mm``
    wants it as [M, 1]; the candidate spreads it once per constant and again only after the
    constant changes (a refit writes in place, bumping its version). ``groups.extract_group``
    names the group inputs graph constants feed (``KernelGroup.constants``)."""
    xq, xs, wq, ws, b = quantized_linear(33, 64, 48, "fp8", bias_dtype=torch.float16, seed=5)
    fn = lambda xq, xs, wq, ws, b: F.gelu(scaled_mm(xq, xs, wq, ws, b, torch.float16))  # noqa: E731
    group = anchor_group(fn, xq, xs, wq, ws, b)
    group = dataclasses.replace(group, constants=frozenset({group.placeholders[1].name}))
    first = scaled_mm_candidates(group, CTX, vendor=True).candidates[0]
    assert first.name.startswith("torch._scaled_mm scaled"), first.name
    try:
        run = first.compile()
        run(xq, xs, wq, ws, b)
    except (RuntimeError, NotImplementedError) as exc:  # a torch without fp8 _scaled_mm on the CPU
        pytest.skip(f"torch._scaled_mm on the CPU: {exc}")
    other = xs * 0.5  # a second layer sharing the kernel, with its own constant
    for scale in (xs, other, xs):
        expected = group.reference(xq, scale, wq, ws, b)[0]
        torch.testing.assert_close(run(xq, scale, wq, ws, b)[0], expected, atol=1e-3 * expected.abs().max().item(), rtol=1e-3)
    xs.mul_(2.0)  # in place: a new version of the same storage
    expected = group.reference(xq, xs, wq, ws, b)[0]
    torch.testing.assert_close(run(xq, xs, wq, ws, b)[0], expected, atol=1e-3 * expected.abs().max().item(), rtol=1e-3)


def test_tma_layout_of_eight_bit_operands_needs_k_major():
    from compile_backend.kernels.gemm_tma import tma_layout_of

    for dtype in (torch.int8, FP8):
        assert tma_layout_of((64, 32), (32, 1), (32, 48), (1, 32), dtype, dtype) == (True, True)
        assert tma_layout_of((64, 32), (32, 1), (32, 48), (48, 1), dtype, dtype) is None  # B [K, N] row-major
        assert tma_layout_of((64, 24), (24, 1), (24, 48), (1, 24), dtype, dtype) is None  # rows of 24 bytes
    assert tma_layout_of((64, 32), (32, 1), (32, 48), (48, 1), torch.float16, torch.float16) == (True, False)


def test_selector_routes_scaled_ops_and_partition_fuses_epilogue():
    inputs = quantized_linear(17, 24, 8, "int8", per_row=True)
    fn = lambda xq, xs, wq, ws, b: torch.sigmoid(scaled_mm(xq, xs, wq, ws, b, torch.float16)).float()  # noqa: E731
    gm = make_group(fn, *inputs).gm
    groups = partition(gm)
    kinds = [(g.kind, g.ops) for g in groups]
    assert ("gemm", ("compile_backend.scaled_mm", "sigmoid", "_to_copy")) in kinds, kinds
    group = anchor_group(fn, *inputs)
    assert builders_for(group) == ("compile_backend.kernels.qgemm:build_scaled_mm",)
    kernel, fallbacks = choose_kernel(group, inputs, context())
    assert kernel.impl == "triton" and fallbacks == []


def test_unsupported_scaled_mm_says_why():
    xq, xs, wq, ws, b = quantized_linear(5, 24, 8, "int8")
    group = anchor_group(lambda xq, xs, wq, ws: scaled_mm(xq, xs, wq, ws, None, torch.float64), xq, xs, wq, ws)
    with pytest.raises(Unsupported, match="output dtype"):
        build_scaled_mm(group, CTX)
    kernel, fallbacks = choose_kernel(group, (xq, xs, wq, ws), context())
    assert kernel.impl == "aten" and "output dtype" in fallbacks[0]["reason"]


# ----------------------------------------------------------------------------- scaled_conv
def quantized_conv(nb, c, hw, oc, k, groups, precision, *, per_channel=True, bias=True, channels_last=False, seed=0):
    x, w = randn(nb, c, *hw, seed=seed) * 2, randn(oc, c // groups, k, k, seed=seed + 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wq, ws = quant_ref.quantize_weight(w, precision, per_channel)
    xs = quant_ref.scale_from_amax(x.abs().amax(), precision)
    return quant_ref.quantize(x, xs, precision), xs, wq, ws, (randn(oc, seed=seed + 2) if bias else None)


#: (batch, channels, (h, w), out channels, kernel, stride, padding, dilation, groups)
CONVS = {
    "3x3_pad": (2, 6, (9, 7), 8, 3, 1, 1, 1, 1),
    "stride2_dil2": (1, 5, (11, 10), 24, 3, 2, 0, 2, 1),
    "groups2_pad2": (2, 6, (7, 5), 8, 3, 1, 2, 1, 2),
    "depthwise_stride2": (1, 8, (9, 9), 8, 3, 2, 1, 1, 8),
    "1x1": (3, 40, (5, 3), 24, 1, 1, 0, 1, 1),
    "rgb_stem": (2, 3, (13, 11), 8, 7, 2, 3, 1, 1),  # few channels: the flat-K loop
}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("variant", ["channel_bias", "tensor_nobias"])
def test_scaled_conv_anchor_only(case, precision, variant):
    nb, c, hw, oc, k, stride, pad, dil, groups = CONVS[case]
    xq, xs, wq, ws, b = quantized_conv(nb, c, hw, oc, k, groups, precision, per_channel=variant == "channel_bias",
                                       bias=variant == "channel_bias", channels_last=case == "1x1")
    geometry = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    inputs = (xq, xs, wq, ws) + ((b,) if b is not None else ())
    fn = lambda xq, xs, wq, ws, b=None: scaled_conv(xq, xs, wq, ws, b, *geometry, torch.float32)  # noqa: E731
    group = anchor_group(fn, *inputs, kind="conv", op="scaled_conv")
    kernel = build_scaled_conv(group, CTX)
    assert kernel.impl == "triton" and kernel.kind == "conv"
    check(kernel, group, inputs, precision, torch.float32)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_scaled_conv_fused_chain_and_cudnn_candidate(out_dtype, precision):
    """conv -> relu -> residual add in one kernel; the cuDNN-on-fp32 candidate (ATen on the CPU)."""
    xq, xs, wq, ws, b = quantized_conv(2, 6, (7, 9), 8, 3, 1, precision, seed=11)
    r = randn(2, 8, 7, 9, seed=12).to(out_dtype)

    def fn(xq, xs, wq, ws, b, r):
        return torch.relu(scaled_conv(xq, xs, wq, ws, b, [1, 1], [1, 1], [1, 1], 1, out_dtype)) + r

    inputs = (xq, xs, wq, ws, b, r)
    group = anchor_group(fn, *inputs, kind="conv", op="scaled_conv")
    check(build_scaled_conv(group, CTX), group, inputs, precision, out_dtype, chain=True)
    tuning = scaled_conv_candidates(group, CTX, vendor=True)
    cudnn = tuning.candidates[-1]
    assert cudnn.impl == "cudnn" and cudnn.name not in tuning.writes_out
    check(lambda *a: cudnn.compile()(*a), group, inputs, precision, out_dtype, chain=True)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_scaled_conv_as_a_gemm_over_its_rows(precision, channels_last):
    """A 1x1 convolution's rows GEMM (bias, ReLU and a residual add in its epilogue) equals the
    convolution template; on NCHW tensors (rows not viewable) the candidate fails to run, so the
    tuner would skip it."""
    xq, xs, wq, ws, b = quantized_conv(2, 24, (5, 7), 40, 1, 1, precision, per_channel=True, bias=True,
                                       channels_last=channels_last, seed=5)
    r = randn(2, 40, 5, 7, seed=6).half()
    if channels_last:
        r = r.contiguous(memory_format=torch.channels_last)

    def fn(xq, xs, wq, ws, b, r):
        return torch.relu(scaled_conv(xq, xs, wq, ws, b, [1, 1], [0, 0], [1, 1], 1, torch.float16)) + r

    inputs = (xq, xs, wq, ws, b, r)
    group = anchor_group(fn, *inputs, kind="conv", op="scaled_conv")
    tuning = scaled_conv_candidates(group, CTX, vendor=False)
    rows = [c for c in tuning.candidates if c.config.get("rows_gemm")]
    assert len(rows) == 1 and rows[0].name in tuning.writes_out
    if not channels_last:
        with pytest.raises(RuntimeError):
            rows[0].compile()(*inputs)
        return
    (got,) = rows[0].compile()(*inputs)
    (want,) = tuning.candidates[0].compile()(*inputs)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_only_pointwise_convolutions_get_the_rows_gemm():
    xq, xs, wq, ws, b = quantized_conv(1, 8, (5, 5), 16, 3, 1, "int8", channels_last=True)
    group = anchor_group(lambda xq, xs, wq, ws: scaled_conv(xq, xs, wq, ws, None, [1, 1], [1, 1], [1, 1], 1,
                                                            torch.float16), xq, xs, wq, ws, kind="conv", op="scaled_conv")
    assert not any(c.config.get("rows_gemm") for c in scaled_conv_candidates(group, CTX, vendor=False).candidates)


@pytest.mark.parametrize("channels_last", [True, False])
def test_scaled_conv_output_layout_is_the_same_everywhere(channels_last):
    """Regression: the op's fake (what the engine plans with) and its CPU implementation gave
    different strides for a channels-last input; the kernel writes the planned layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    xq, xs, wq, ws, b = quantized_conv(2, 6, (5, 7), 8, 3, 1, "int8", channels_last=channels_last)
    args = ([1, 1], [1, 1], [1, 1], 1, torch.float16)
    real = scaled_conv(xq, xs, wq, ws, b, *args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = scaled_conv(mode.from_tensor(xq), xs, mode.from_tensor(wq), ws, b, *args)
    assert real.stride() == fake.stride() and real.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    group = anchor_group(lambda xq, xs, wq, ws, b: scaled_conv(xq, xs, wq, ws, b, *args), xq, xs, wq, ws, b,
                         kind="conv", op="scaled_conv")
    (out,) = build_scaled_conv(group, CTX)(xq, xs, wq, ws, b)
    assert out.stride() == real.stride()
    torch.testing.assert_close(out, real, rtol=0, atol=0)


def test_the_float_conv_yardstick_has_no_bias_pass(monkeypatch):
    """The float convolution a quantized one is timed against (the report's and the layer
    decision's yardstick) runs without its bias: a float engine fuses the bias into its epilogue,
    and ``F.conv2d``'s separate bias pass doubled the yardstick on ResNet-50's stage-1 layers
    (session 15), so slower FP8 convolutions passed for as fast as float."""
    from compile_backend.kernels import qconv

    xq, xs, wq, ws, b = quantized_conv(2, 6, (7, 9), 8, 3, 1, "int8", seed=11)
    fn = lambda xq, xs, wq, ws, b: scaled_conv(xq, xs, wq, ws, b, [1, 1], [1, 1], [1, 1], 1, torch.float16)  # noqa: E731
    group = anchor_group(fn, xq, xs, wq, ws, b, kind="conv", op="scaled_conv")
    seen = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, w, bias, *geometry: seen.append(bias) or real(x.float(), w.float(), bias, *geometry))
    reference = qconv.float_conv_candidate(qconv.scaled_conv_problem(group, torch.device("cpu")), torch.device("cpu"))
    out = reference.compile()(xq, xs, wq, ws, b)
    assert reference.reference and seen == [None] and out.shape == (2, 8, 7, 9)


def test_scaled_conv_routing_and_unsupported():
    xq, xs, wq, ws, b = quantized_conv(1, 4, (5, 5), 8, 3, 1, "int8")
    fn = lambda xq, xs, wq, ws, b: scaled_conv(xq, xs, wq, ws, b, [1, 1], [0, 0], [1, 1], 1, torch.float16)  # noqa: E731
    gm = make_group(fn, xq, xs, wq, ws, b).gm
    assert [g.kind for g in partition(gm)] == ["conv"]
    group = anchor_group(fn, xq, xs, wq, ws, b, kind="conv", op="scaled_conv")
    kernel, fallbacks = choose_kernel(group, (xq, xs, wq, ws, b), context())
    assert kernel.impl == "triton" and fallbacks == []
    # a 1-D convolution: the template is 2-D, ATen (quant_ref) runs it and the report says why
    x1, w1 = xq[:, :, 0], wq[:, :, 0]
    fn1 = lambda xq, xs, wq, ws, b: scaled_conv(xq, xs, wq, ws, b, [1], [0], [1], 1, torch.float32)  # noqa: E731
    group1 = anchor_group(fn1, x1, xs, w1, ws, b, kind="conv", op="scaled_conv")
    kernel, fallbacks = choose_kernel(group1, (x1, xs, w1, ws, b), context())
    assert kernel.impl == "aten" and "2-D" in fallbacks[0]["reason"]


# ----------------------------------------------------------------------------- GPU
def _gpu_ctx(autotune="fast", fp8_accumulation="fp32"):
    return KernelContext(Options(autotune=autotune, fp8_accumulation=fp8_accumulation), torch.device("cuda"), False)


def _fp8_ok():
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8", "fp8-fast"])
@pytest.mark.parametrize("mkn", [(1, 24, 8), (33, 40, 24), (256, 512, 384)], ids=str)
def test_gpu_scaled_mm_tuned(mkn, precision):
    """Every candidate (template configs, vendor + epilogue) compiles, runs and matches; with
    fp8_accumulation="fast" too (the tensor cores' accumulator: still within 1e-2)."""
    accumulation = "fast" if precision.endswith("-fast") else "fp32"
    precision = precision.split("-")[0]
    if precision == "fp8" and not _fp8_ok():
        pytest.skip("fp8 needs sm_89+")
    inputs = tuple(t.cuda() if t is not None else None for t in quantized_linear(*mkn, precision, per_row=True))
    fn = lambda xq, xs, wq, ws, b: F.silu(scaled_mm(xq, xs, wq, ws, b, torch.bfloat16))  # noqa: E731
    group = anchor_group(fn, *inputs)
    expected = group.reference(*inputs)[0].float()
    tuning = scaled_mm_candidates(group, _gpu_ctx(fp8_accumulation=accumulation))
    names = [c.name for c in tuning.candidates]
    m, k, n = mkn
    assert names[0] == "float linear bfloat16" and tuning.candidates[0].reference, names
    if m > 16 and (k % 8 == 0 and n % 8 == 0 if precision == "int8" else k % 16 == 0 and n % 16 == 0):
        assert names[1].startswith("torch._"), names  # the vendor GEMM + epilogue, first to choose
    for cand in tuning.candidates[1:]:
        got = cand.compile()(*inputs)[0].float()
        err = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        assert err < 1e-2, (cand.name, err)
    kernel = build_scaled_mm(group, _gpu_ctx(fp8_accumulation=accumulation))
    timed, total = map(int, kernel.config["timed"].split("/"))
    assert timed == total, kernel.config
    # the float GEMM the layer replaces is timed beside the candidates (the report compares)
    assert kernel.config["reference"] == "float linear bfloat16" and kernel.config["reference_ms"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("cin", [64, 256])
def test_gpu_pointwise_conv_rows_on_the_short_k_tiles(precision, cin):
    """A 1x1 convolution of few input channels (ResNet-50's expanding layers) gets the short-K
    8-bit tiles over its rows, the persistent TMA ones on Hopper; each matches the convolution
    template with its bias, ReLU and residual add, on odd spatial sizes."""
    if precision == "fp8" and not _fp8_ok():
        pytest.skip("fp8 needs sm_89+")
    xq, xs, wq, ws, b = (t.cuda() for t in quantized_conv(3, cin, (9, 13), 96, 1, 1, precision, per_channel=True,
                                                           bias=True, channels_last=True, seed=7))
    r = randn(3, 96, 9, 13, seed=8).half().cuda().contiguous(memory_format=torch.channels_last)

    def fn(xq, xs, wq, ws, b, r):
        return torch.relu(scaled_conv(xq, xs, wq, ws, b, [1, 1], [0, 0], [1, 1], 1, torch.float16) + r)

    inputs = (xq, xs, wq, ws, b, r)
    group = anchor_group(fn, *inputs, kind="conv", op="scaled_conv")
    tuning = scaled_conv_candidates(group, _gpu_ctx(), vendor=False)
    rows = [c for c in tuning.candidates if c.config.get("rows_gemm")]
    names = [c.name for c in rows]
    assert any(" 128x64x64 w4 s4 " in n for n in names), names
    if torch.cuda.get_device_capability()[0] >= 9:
        assert any(n.endswith(" tma") for n in names), names
    want = group.reference(*inputs)[0].float()
    for cand in rows:
        got = cand.compile()(*inputs)[0].float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, (cand.name, err)


@pytest.mark.gpu
def test_gpu_int8_anchor_is_exact_to_fp32_rounding():
    inputs = tuple(t.cuda() for t in quantized_linear(65, 128, 96, "int8", per_row=True, seed=3))
    fn = lambda xq, xs, wq, ws, b: scaled_mm(xq, xs, wq, ws, b, torch.float32)  # noqa: E731
    group = anchor_group(fn, *inputs)
    for cand in scaled_mm_candidates(group, _gpu_ctx()).candidates[1:]:  # [0]: the float reference
        got, want = cand.compile()(*inputs)[0], group.reference(*inputs)[0]
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-6, msg=cand.name)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("case", ["3x3_pad", "depthwise_stride2", "1x1"])
def test_gpu_scaled_conv_tuned(case, precision):
    if precision == "fp8" and not _fp8_ok():
        pytest.skip("fp8 needs sm_89+")
    nb, c, hw, oc, k, stride, pad, dil, groups = CONVS[case]
    inputs = tuple(t.cuda() for t in quantized_conv(nb, c, hw, oc, k, groups, precision, channels_last=True))
    geometry = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    fn = lambda xq, xs, wq, ws, b: torch.relu(scaled_conv(xq, xs, wq, ws, b, *geometry, torch.float16))  # noqa: E731
    group = anchor_group(fn, *inputs, kind="conv", op="scaled_conv")
    expected = group.reference(*inputs)[0].float()
    tuning = scaled_conv_candidates(group, _gpu_ctx())
    assert any(c.impl == "cudnn" for c in tuning.candidates)
    assert tuning.candidates[0].name == "float conv float16" and tuning.candidates[0].reference
    for cand in tuning.candidates[1:]:
        got = cand.compile()(*inputs)[0].float()
        err = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        assert err < 1e-2, (cand.name, err)
    kernel = build_scaled_conv(group, _gpu_ctx())
    timed, total = map(int, kernel.config["timed"].split("/"))
    assert timed == total, kernel.config
    assert kernel.config["reference_ms"] > 0


def test_a_seeded_group_tunes_its_probe_winners():
    """``template.seeded``: an anchor carrying its speed probe's winners (PROBE_SEEDS) tunes
    those Triton configs, the heuristic's first and the vendor's, under a key of its own."""
    from compile_backend.kernels.template import PROBE_SEEDS

    xq, xs, wq, ws, b = quantized_conv(2, 16, (7, 5), 24, 3, 1, "int8")
    fn = lambda xq, xs, wq, ws, b: scaled_conv(xq, xs, wq, ws, b, [1, 1], [1, 1], [1, 1], 1, torch.float16)  # noqa: E731
    configs = [GemmConfig(16, 16, 32, num_stages=1), GemmConfig(32, 16, 32, num_stages=1),
               GemmConfig(16, 32, 32, num_stages=1), GemmConfig(32, 32, 32, num_stages=1)]
    group = anchor_group(fn, xq, xs, wq, ws, b, kind="conv", op="scaled_conv")
    full = scaled_conv_candidates(group, CTX, vendor=True, configs=configs)
    names = [c.name for c in full.candidates]
    anchor = next(n for n in group.gm.graph.nodes if n.name == group.anchor)
    anchor.meta[PROBE_SEEDS] = (names[2], "triton 999x1x1 w1 s1 g1")  # a seed no candidate has is ignored
    tuning = scaled_conv_candidates(group, CTX, vendor=True, configs=configs)
    assert [c.name for c in tuning.candidates] == [names[0], names[2], names[-1]]  # heuristic, seed, cuDNN
    assert tuning.key != full.key and "seeded" in tuning.key.extra and tuning.writes_out <= full.writes_out
    anchor.meta[PROBE_SEEDS] = ("triton 999x1x1 w1 s1 g1",)
    assert scaled_conv_candidates(group, CTX, vendor=True, configs=configs).key == full.key
