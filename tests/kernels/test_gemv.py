"""The fused decode GEMV (kernels/gemv.py, gemv_prologue.py, gemv_build.py; issue #20): a
decode layer's activation producer, the GEMV, the split-K sum and the chain after it in one
launch, for weight-only (INT8 / INT4) and float weights, against the group's ATen graph (its
reference).

Groups as the partitioner hands them (make_fx graphs with meta['val']), CPU tensors under the
interpreter, odd shapes (K 37 / 70: a short last INT4 group and partial K tiles; N 33), M 1 and
3, INT8 and INT4, split-K forced to 3 slices (the last-arriving program sums the partials) and
the heuristic's. Prologues: SwiGLU's ``silu(gate) * up`` read from a slice of the gate/up
output (the norm prologues: test_gemv_norm.py; the helpers: gemv_groups.py).

Tolerances: the kernel computes the reference's function; the prologue's intermediates are
rounded to their dtypes as eager stores them, so x agrees to an ulp at most, and the GEMV's fp32
sums differ only in order: fp32 1e-4 relative, fp16 / bf16 the select module's validation
bounds (1e-2 / 4e-2 relative to the output's norm).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import compile_backend
import compile_backend.ops  # noqa: F401 (registers compile_backend::weight_only_linear)
from compile_backend.kernels import weight_only_ref as ref
from compile_backend.kernels.weight_only_parts import offset_codes_to
from gemv_groups import Norm, assert_close, choose_gemv, count_launches, gemv_group, quantized_weights  # tests/kernels/gemv_groups.py


@pytest.mark.parametrize("split_k", [3, None], ids=["split3", "heuristic"])
@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 32)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_swiglu_prologue_and_residual_epilogue(dtype, precision, group_size, split_k, monkeypatch):
    """down(silu(gate) * up) + residual, gate and up two slices of one [M, 2I] tensor."""
    m, k, n = 3, 37, 33
    codes, scales = quantized_weights(n, k, precision, group_size, seed=1)
    gen = torch.Generator().manual_seed(2)
    gu = torch.randn(1, m, 2 * k, generator=gen).to(dtype)
    res = torch.randn(1, m, n, generator=gen).to(dtype)

    def fn(gu, c, s, r):
        x = F.silu(gu[..., :k]) * gu[..., k:]
        return torch.ops.compile_backend.weight_only_linear(x, c, s, None, precision, group_size) + r

    inputs = (gu, codes, scales, res)
    group = gemv_group(fn, inputs)
    kernel = choose_gemv(group, inputs, monkeypatch, split_k)
    runs = count_launches(monkeypatch)
    assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])
    assert runs == ["gemv"]  # prologue, GEMV, split-K sum and chain: one launch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 32)], ids=str)
def test_sixteen_rows_a_program_on_the_tensor_cores(dtype, precision, group_size, monkeypatch):
    """Batch-16 decode (M 5..16, past GEMV_MAX_M): the tensor-core loop takes up to 16 rows a
    program, so the fused GEMV (residual epilogue, split-K) reads each weight once; M = 13 (rows
    past M masked) and 16 (two row blocks, M = 17, run in test_weight_only's plain kernel). With an RMS-norm prologue (row values: one
    row a program) past GEMV_MAX_M rows the group takes the skinny path instead."""
    from compile_backend.kernels import weight_only
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.select import choose_kernel

    k, n = 70, 33
    codes, scales = quantized_weights(n, k, precision, group_size, seed=31)
    gen = torch.Generator().manual_seed(32)
    monkeypatch.setattr(weight_only, "heuristic", lambda m: weight_only.WeightOnlyConfig(
        "gemv", 1, 16, 32, split_k=3, tensor_cores=True))
    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cpu"), interpret=True)

    def residual(x, c, s, r):
        return torch.ops.compile_backend.weight_only_linear(x, c, s, None, precision, group_size) + r

    for m in (13, 16):
        inputs = (torch.randn(m, k, generator=gen).to(dtype), codes, scales, torch.randn(m, n, generator=gen).to(dtype))
        group = gemv_group(residual, inputs)
        kernel, fallbacks = choose_kernel(group, inputs, ctx)
        assert (kernel.impl, fallbacks, kernel.config.get("fused")) == ("triton", [], True)
        assert kernel.fn.plan.row_values is False
        assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])

    def normed(h, c, s):
        h32 = h.float()
        x = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype)
        return torch.ops.compile_backend.weight_only_linear(x, c, s, None, precision, group_size)

    inputs = (torch.randn(13, k, generator=gen).to(dtype), codes, scales)
    group = gemv_group(normed, inputs)
    kernel, fallbacks = choose_kernel(group, inputs, ctx)
    assert not kernel.config.get("fused")
    assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])


def test_a_prologue_it_cannot_express_leaves_the_kernel_path():
    """A softmax over x's row is no row value the prologue knows (amax): the group still runs,
    through the non-fused path, equal to its reference."""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.select import choose_kernel

    m, k, n = 1, 37, 33
    codes, scales = quantized_weights(n, k, "int8", None, seed=7)
    h = torch.randn(m, k, generator=torch.Generator().manual_seed(8))

    def fn(h, c, s):
        return torch.ops.compile_backend.weight_only_linear(torch.softmax(h, -1), c, s, None, "int8", None)

    inputs = (h, codes, scales)
    group = gemv_group(fn, inputs)
    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cpu"), interpret=True)
    kernel, _ = choose_kernel(group, inputs, ctx)
    assert not kernel.config.get("fused")
    assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])


def test_split_k_counters_are_reused_and_left_at_zero(monkeypatch):
    """The runner's arrival counters serve every launch: the last program of each tile sets its
    counter back to 0, so repeated calls give the same bits with no fill in between."""
    m, k, n = 2, 70, 33
    codes, scales = quantized_weights(n, k, "int8", None, seed=9)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(10)).half()

    def fn(x, c, s):
        return torch.ops.compile_backend.weight_only_linear(x, c, s, None, "int8", None)

    inputs = (x, codes, scales)
    kernel = choose_gemv(gemv_group(fn, inputs), inputs, monkeypatch, split_k=3)
    first = kernel(*inputs)[0]
    (counts,) = kernel.fn.counters.buffers.values()
    assert not counts.any()
    assert torch.equal(kernel(*inputs)[0], first) and not counts.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weights,group_size", [("int8", None), ("int4", 32), ("int4", 64), ("float", None)], ids=str)
@pytest.mark.parametrize("m,n,k,split", [(1, 33, 70, 3), (3, 50, 130, 1), (2, 17, 256, 4)], ids=str)
def test_tensor_core_loop_equals_the_elementwise_one(dtype, weights, group_size, m, n, k, split):
    """The tensor-core main loop (16-bit x: weights made from their codes' bits, products in
    tl.dot, x in column 0) against the elementwise loop and the plain reference: both compute the
    reference's weights exactly, so they differ only in the order of fp32 sums. Odd N, K with a
    partial last tile (and a short last INT4 group), split-K."""
    from compile_backend.kernels import gemv, weight_only

    gen = torch.Generator().manual_seed(21)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if weights == "int8" else None
    if weights == "float":
        w, s = (torch.randn(n, k, generator=gen) * 0.05).to(dtype), None
        want = (x.float() @ w.float().t()).to(dtype)
    else:
        w, s = quantized_weights(n, k, weights, group_size, seed=22)
        want = weight_only.weight_only_linear_reference(x, w, s, bias, precision=weights, group_size=group_size)
    kernel = gemv.plain_kernel(dtype, dtype)
    outs = {}
    for tc in (False, True):
        cfg = weight_only.WeightOnlyConfig("gemv", 1, 16, 64, split_k=split, tensor_cores=tc)
        assert gemv.uses_tensor_cores(cfg, dtype, weights, min(64, group_size or 64)) == tc
        out = torch.empty(m, n, dtype=dtype)
        gemv.launch(kernel, [x], w, s, bias, [], [out], weights=weights, group=group_size or 1, config=cfg,
                    x_dtype=dtype)
        outs[tc] = out
        assert_close(out, want)
    assert_close(outs[True], outs[False])


@pytest.mark.gpu
@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 128)], ids=str)
def test_gpu_fused_decode_layer(precision, group_size, monkeypatch):
    """Compiled on the GPU at decoder sizes (K 2048 + 64 and 5632: split-K with many slices, the
    counters' acquire/release for real): an RMS norm prologue (fp16: the row loop) with a
    residual epilogue, and the SwiGLU prologue, at the heuristic's config and at 16 slices;
    twice (the counters reset), the same bits both times."""
    from compile_backend.kernels import weight_only
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.select import choose_kernel

    gen = torch.Generator().manual_seed(11)
    k1, k2, n = 2048 + 64, 5632, 2048 + 8
    norm = Norm(k1)
    c1, s1 = (t.cuda() for t in quantized_weights(n, k1, precision, group_size, seed=12))
    c2, s2 = (t.cuda() for t in quantized_weights(n, k2, precision, group_size, seed=13))
    h = torch.randn(1, 1, k1, generator=gen).half().cuda()
    res = torch.randn(1, 1, n, generator=gen).half().cuda()
    gu = torch.randn(1, 1, 2 * k2, generator=gen).half().cuda()
    w = norm.weight.detach().cuda()

    def normed(h, c, s, w, r):
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.eps)
        return torch.ops.compile_backend.weight_only_linear(w.half() * h32.half(), c, s, None, precision, group_size) + r

    def swiglu(gu, c, s):
        x = F.silu(gu[..., :k2]) * gu[..., k2:]
        return torch.ops.compile_backend.weight_only_linear(x, c, s, None, precision, group_size)

    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cuda"), interpret=False)
    for split, tc, unroll in ((0, False, 1), (16, False, 1), (0, True, 1), (16, True, 1), (0, False, 2), (16, True, 4)):
        monkeypatch.setattr(weight_only, "heuristic", lambda m, s=split, tc=tc, u=unroll: weight_only.WeightOnlyConfig(
            "gemv", 1, 32, 128, split_k=s, num_stages=1, waves=8, tensor_cores=tc, unroll=u))
        for fn, inputs in ((normed, (h, c1, s1, w, res)), (swiglu, (gu, c2, s2))):
            group = gemv_group(fn, inputs)
            kernel, fallbacks = choose_kernel(group, inputs, ctx)
            assert (kernel.impl, fallbacks, kernel.config.get("fused")) == ("triton", [], True)
            assert not kernel.fn.plan.deferred  # fp16: the norm's row loop (gemv_prologue._WIDE_RANGE)
            want = group.reference(*inputs)[0]
            first = kernel(*inputs)[0]
            assert_close(first, want)
            assert torch.equal(kernel(*inputs)[0], first)  # split-K sums (and row sums) in slice order


@pytest.mark.parametrize("split_k", [3, None], ids=["split3", "heuristic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_float_weights_through_the_gemm_builder(dtype, split_k, monkeypatch):
    """The FP16 decode step: ``mm`` / ``addmm`` with the weight as ``W.t()`` (strided [K, N]) take
    the same prologues: the RMS norm (with a bias and a residual) and SwiGLU (no bias)."""
    m, k, n = 2, 70, 33
    gen = torch.Generator().manual_seed(14)
    norm = Norm(k)
    w1, w2 = (torch.randn(n, k, generator=gen).to(dtype) * 0.1 for _ in range(2))
    bias = torch.randn(n, generator=gen).to(dtype)
    h, res = torch.randn(m, k, generator=gen).to(dtype), torch.randn(m, n, generator=gen).to(dtype)
    gu = torch.randn(m, 2 * k, generator=gen).to(dtype)
    nw = norm.weight.detach().to(dtype)

    def normed(h, w, b, nw, r):
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.eps)
        return torch.addmm(b, nw * h32.to(h.dtype), w.t()) + r

    def swiglu(gu, w):
        return (F.silu(gu[:, :k]) * gu[:, k:]) @ w.t()

    for fn, inputs, op in ((normed, (h, w1, bias, nw, res), "addmm"), (swiglu, (gu, w2), "aten.mm")):
        group = gemv_group(fn, inputs, anchor_op=op)
        kernel = choose_gemv(group, inputs, monkeypatch, split_k)
        assert kernel.fn.plan.deferred == (fn is normed)
        assert kernel.fn.plan.unrounded_x == (fn is normed and dtype == torch.float16)  # fp16: in fp32
        runs = count_launches(monkeypatch)
        assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])
        assert runs == ["gemv"] and kernel.config["weights"] == "float"


@pytest.mark.gpu
def test_gpu_float_decode_gemv_against_cublas(monkeypatch):
    """Compiled on the GPU: the fused float GEMV with an RMS norm prologue at the base decoder's
    gate/up shape (K 2048, N 11264), fp16, 1 and 16 slices, equal to the reference (cuBLAS for
    the GEMM) within fp16's validation bound. (The norm's factor is deferred, its fp16 x
    unrounded: the tensor-core configs asked are left out, the elementwise loop runs.)"""
    from compile_backend.kernels import weight_only

    gen = torch.Generator().manual_seed(15)
    k, n = 2048, 11264
    norm = Norm(k)
    w = (torch.randn(n, k, generator=gen) * 0.02).half().cuda()
    h = torch.randn(1, k, generator=gen).half().cuda()
    nw = norm.weight.detach().half().cuda()

    def normed(h, w, nw):
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + norm.eps)
        return (nw * h32.to(h.dtype)) @ w.t()

    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.select import choose_kernel

    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cuda"), interpret=False)
    inputs = (h, w, nw)
    for split, tc in ((1, False), (16, False), (1, True), (16, True)):
        monkeypatch.setattr(weight_only, "heuristic", lambda m, s=split, tc=tc: weight_only.WeightOnlyConfig(
            "gemv", 1, 32, 128, split_k=s, num_stages=1, waves=8, tensor_cores=tc))
        group = gemv_group(normed, inputs, anchor_op="aten.mm")
        kernel, fallbacks = choose_kernel(group, inputs, ctx)
        assert (kernel.impl, fallbacks, kernel.config.get("fused")) == ("triton", [], True)
        assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])


def test_float_prologue_groups_keep_cublas_as_a_timed_candidate():
    """A float GEMV group with a prologue: only the fused kernel computes it in one launch, so on
    CUDA the tuner also times the group's own ATen ops around cuBLAS (the group as it was): a
    fused GEMV slower than cuBLAS on some GPU and shape is never chosen. (Candidates are only
    listed here: nothing runs.)"""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.gemm import gemm_candidates

    gen = torch.Generator().manual_seed(16)
    h, w = torch.randn(1, 64, generator=gen), torch.randn(32, 64, generator=gen)
    group = gemv_group(lambda h, w: F.silu(h) @ w.t(), (h, w), anchor_op="aten.mm")
    names = {}
    for device in ("cpu", "cuda"):
        ctx = KernelContext(options=compile_backend.Options(), device=torch.device(device), interpret=device == "cpu")
        names[device] = [c.name for c in gemm_candidates(group, ctx).candidates]
    assert all(n.startswith("triton fused gemv") for n in names["cpu"])
    assert names["cuda"][:-1] == names["cpu"] and names["cuda"][-1] == "cublas + aten prologue and epilogue"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(37, 260), (5, 132), (9, 130)])  # K % 4 == 2: the byte loop
def test_int4_elementwise_loops_words_and_bytes_match_the_reference(dtype, n, k):
    # 16-bit x reads the codes as 16-bit words of four nibbles where K % 4 == 0, bytes otherwise;
    # each weight is the reference's rounded value either way, so the sums differ by fp32 order only
    from compile_backend.kernels import gemv
    from compile_backend.kernels.weight_only import WeightOnlyConfig, weight_only_linear_reference

    torch.manual_seed(0)
    x = torch.randn(3, k).to(dtype)
    codes, scales = ref.quantize_weight(torch.randn(n, k), "int4", 64)
    out = torch.empty(3, n, dtype=dtype)
    cfg = WeightOnlyConfig("gemv", 1, 32, 64, num_stages=1, waves=8, unroll=2)
    gemv.gemv(x, codes, scales, None, out, int4=True, group=64, config=cfg)
    expected = weight_only_linear_reference(x, codes, scales, None, precision="int4", group_size=64)
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-2)


def test_int4_codes_of_a_transposed_weight_are_row_major_and_others_refused():
    """GPT-2's Conv1D keeps its weight [K, N]: the [N, K] rows the weight-only pass quantizes are a
    transposed view, and the packed codes kept those strides, which the INT4 loops (reading a
    row's bytes at unit stride) misread: every GPT-2 W4A16 GEMV was rejected by validation. The
    packed codes are row-major now, and the launcher refuses codes that are not."""
    from compile_backend.kernels import gemv
    from compile_backend.kernels.weight_only import WeightOnlyConfig, weight_only_linear_reference

    torch.manual_seed(0)
    w = torch.randn(96, 40).t()  # [N 40, K 96] as a view of a [K, N] weight
    codes, scales = ref.quantize_weight(w, "int4", 32)
    assert codes.is_contiguous()
    x, out = torch.randn(1, 96), torch.empty(1, 40)
    cfg = WeightOnlyConfig("gemv", 1, 32, 32, num_stages=1, waves=8, unroll=1)
    gemv.gemv(x, codes, scales, None, out, int4=True, group=32, config=cfg)
    expected = weight_only_linear_reference(x, codes, scales, None, precision="int4", group_size=32)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=1e-3)
    with pytest.raises(ValueError, match="stride 40 along K"):
        gemv.gemv(x, codes.t().contiguous().t(), scales, None, out, int4=True, group=32, config=cfg)


@triton.jit
def _dequantize_bf16_on_the_bits(U, S, OUT, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(OUT + i, offset_codes_to(tl.load(U + i), 8, tl.load(S + i), tl.bfloat16))


def test_bf16_dequantize_on_the_bits_keeps_a_nan_product():
    """The bf16 lowering on the bits (the interpreter's, and the GPU test's reference) rounds the
    fp32 product to nearest even on its bits: a NaN with a full payload (the GPU's canonical
    0x7FFFFFFF; here an fp16 NaN 0x7FFF widened to 0x7FFFE000) carried into the sign and came
    out -0.0 (H100, session 36). A NaN product stays NaN; 0 x inf is NaN too."""
    codes = torch.tensor([3, 8, 0, 15, 8, 12, 1, 9], dtype=torch.int32)  # 8 is the code 0
    scales = torch.tensor([0x7FFF, 0x7C00, 0x7C00, 0xFC00, 0x3C00, 0x3C00, 0x7E00, 0x0001], dtype=torch.int32)
    scales = scales.to(torch.int16).view(torch.float16)  # NaN (full payload), inf, inf, -inf, 1, 1, NaN, subnormal
    out = torch.empty(8, dtype=torch.bfloat16)
    _dequantize_bf16_on_the_bits[(1,)](codes, scales, out, N=8)
    want = ((codes - 8).float() * scales.float()).to(torch.bfloat16)
    assert torch.equal(out.isnan(), want.isnan()) and want.isnan()[[0, 1, 6]].all()  # NaN, 0 x inf, NaN
    assert torch.equal(out[~want.isnan()], want[~want.isnan()])


@pytest.mark.gpu
@pytest.mark.parametrize("widen", [False, True], ids=["16bit", "widened"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_gpu_native_dequantize_bit_identical(precision, dtype, widen):
    """Compiled on the GPU: the PTX dequantize of the fp16 and bf16 loops (``weight_only_parts``'
    ``words_to`` / ``int8_weights16`` through ``_INT4_PAIRS_F16`` / ``_INT8_QUADS_F16`` and the
    bf16 twins, whose fp32 scales take a register each; ``widen``: the elementwise loops' fp32
    variants ``words_to_f32`` / ``codes_to_f32``) equals Triton's own lowering (the interpreter's)
    bit for bit, over every code and scales of every magnitude (subnormal, huge: products
    overflowing to inf, inf, NaN, -0.0)."""
    import triton
    import triton.language as tl

    from compile_backend.kernels.weight_only_parts import codes_to_f32, int8_weights16, words_to, words_to_f32

    @triton.jit
    def dequantize(W, S, OUT, N, K, swn, ssn, INT4: tl.constexpr, NATIVE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DTYPE: tl.constexpr, WIDEN: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n_ok = rn < N
        ok = n_ok[:, None]
        if INT4:
            rq = k0 // 4 + tl.arange(0, BLOCK_K // 4)
            words = tl.load(W.to(tl.pointer_type(tl.uint16)) + rn[:, None] * (swn // 2) + rq[None, :], mask=ok, other=0)
            scale = tl.load(S + rn * ssn + k0 // BLOCK_K, mask=n_ok, other=0.0)[:, None]
            if WIDEN:  # fp32 holding DTYPE values: stored as DTYPE exactly
                w0, w1, w2, w3 = words_to_f32(words, scale, DTYPE, NATIVE)
                w0, w1, w2, w3 = w0.to(DTYPE), w1.to(DTYPE), w2.to(DTYPE), w3.to(DTYPE)
            else:
                w0, w1, w2, w3 = words_to(words, scale, DTYPE, NATIVE)
            at = OUT + rn[:, None] * K + 4 * rq[None, :]
            tl.store(at, w0, mask=ok)
            tl.store(at + 1, w1, mask=ok)
            tl.store(at + 2, w2, mask=ok)
            tl.store(at + 3, w3, mask=ok)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            scale = tl.load(S + rn * ssn, mask=n_ok, other=0.0)[:, None]
            if WIDEN:
                codes = tl.load(W + rn[:, None] * swn + rk[None, :], mask=ok & (rk < K)[None, :], other=0)
                w = codes_to_f32(codes, scale, DTYPE, NATIVE).to(DTYPE)
            else:
                w = int8_weights16(W, rn, rk, n_ok, K, swn, scale, DTYPE, NATIVE)
            tl.store(OUT + rn[:, None] * K + rk[None, :], w, mask=ok)

    gen = torch.Generator().manual_seed(16)
    n, k, group = 64, 1024, 128  # every byte value in every row; 8 scale groups a row (INT4)
    int4 = precision == "int4"
    codes = torch.arange(n * k // (2 if int4 else 1), dtype=torch.int64).remainder(256).reshape(n, -1)
    codes = codes[:, torch.randperm(codes.shape[1], generator=gen)].to(torch.uint8)
    codes = codes if int4 else codes.view(torch.int8)
    magnitude = torch.exp2(torch.randint(-24, 16, (n, k // group), generator=gen).float())
    scales = (torch.randn(n, k // group, generator=gen) * magnitude).half()
    scales[0, 0], scales[1, 1], scales[2, 2], scales[3, 3] = float("inf"), float("nan"), -0.0, 6.0e-8
    scales = scales if int4 else scales[:, :1].contiguous()
    outs = []
    for native in (False, True):
        out = torch.empty(n, k, dtype=dtype, device="cuda")
        dequantize[(1, k // group)](codes.cuda(), scales.cuda(), out, n, k, codes.stride(0), scales.stride(0),
                                    INT4=int4, NATIVE=native, BLOCK_N=n, BLOCK_K=group,
                                    DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16, WIDEN=widen)
        outs.append(out.cpu())
    want = ref.dequantize(ref.unpack_int4(codes, k) if int4 else codes, scales, precision, group if int4 else None).to(dtype)
    nan = want.isnan()  # NaN payloads may differ (the GPU's canonical NaN)
    full = (ref.unpack_int4(codes, k) if int4 else codes).to(torch.int64)
    per = scales.float().repeat_interleave(group, dim=1)[:, :k] if int4 else scales.float().expand(n, k)
    problems = []
    for native, out in zip((False, True), outs):
        bad = (out.isnan() != nan) | (~nan & (out.view(torch.int16) != want.view(torch.int16)))
        at = bad.nonzero()[:6].tolist()
        if bad.any():
            problems.append(f"native={native}: {int(bad.sum())} of {bad.numel()} differ; (row, col, code, scale, got, "
                            f"want): {[(r, c, int(full[r, c]), per[r, c].item(), out[r, c].item(), want[r, c].item()) for r, c in at]}")
    assert not problems, problems


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("precision,tc", [("int4", False), ("int4", True), ("int8", False)], ids=str)
@pytest.mark.parametrize("unroll,split", [(2, 1), (4, 2), (8, 1), (16, 1)], ids=str)
def test_step_in_one_load(dtype, precision, tc, unroll, split):
    """INT4 read as 16-bit words (and INT8 codes, elementwise) with a step's tiles in one
    [BLOCK_N, UNROLL, BLOCK_K (/ 4)] load: K of 10 tiles of 64 (INT4: 10 scale groups; a step
    past K's end, split-K slices ending mid-step), odd N, one and two rows, against the
    reference."""
    from compile_backend.kernels import gemv, weight_only

    gen = torch.Generator().manual_seed(23)
    n, k = 33, 640
    group = 64 if precision == "int4" else None
    w, s = quantized_weights(n, k, precision, group, seed=24)
    kernel = gemv.plain_kernel(dtype, dtype)
    for m in (1, 2):
        x = torch.randn(m, k, generator=gen).to(dtype)
        want = weight_only.weight_only_linear_reference(x, w, s, None, precision=precision, group_size=group)
        cfg = weight_only.WeightOnlyConfig("gemv", 1, 16, 64, split_k=split, tensor_cores=tc, unroll=unroll)
        out = torch.empty(m, n, dtype=dtype)
        gemv.launch(kernel, [x], w, s, None, [], [out], weights=precision, group=group or 1, config=cfg, x_dtype=dtype)
        assert_close(out, want)


def test_pdl_wait_after_the_weight_preload_and_before_x():
    """Under PDL the GEMV's first statements (program ids, the L2 prefetch, the first step's
    weights: constants) come before the wait; every read of x (the kernel before's output) after."""
    from compile_backend.kernels import gemv, pdl
    from compile_backend.kernels.gemv_prologue import PLAIN_X

    source, name = gemv.render(PLAIN_X, gemv.PLAIN_EPILOGUE, torch.float16, torch.float16)
    body = pdl.with_entry(source, name, after=gemv.PDL_AFTER).split(f"def {name}(")[1]
    wait = body.index(pdl.ENTRY[0])
    assert body.rindex("first_weights(W, WD, S, rn, n_ok, k_lo", 0, wait) < wait
    assert "x_at(" not in body[:wait] and "tl.load(" not in body[:wait]


def test_split_k_slices_are_whole_steps():
    """K slices hold whole steps of UNROLL tiles: 16 tiles asked in 8 slices under UNROLL 4 make
    4 slices of one step (2 tiles a slice left half of each step's tiles masked)."""
    from compile_backend.kernels import gemv, weight_only

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    n, k = 64, 2048
    w, s = quantized_weights(n, k, "int4", 128, seed=25)
    x, out = torch.randn(1, k).half(), torch.empty(1, n, dtype=torch.float16)
    cfg = weight_only.WeightOnlyConfig("gemv", 1, 32, 128, split_k=8, unroll=4)
    gemv.launch(Recorder(), [x], w, s, None, [], [out], weights="int4", group=128, config=cfg, x_dtype=torch.float16)
    (grid, args, kwargs), = launches
    k_slice = args[11]  # after W, WD, S, BIAS, WS, COUNT, x, out, M, N, K
    assert (grid[1], k_slice, kwargs["UNROLL"]) == (4, 512, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("unroll,rows", [(1, 1), (2, 1), (1, 13)], ids=["step-in-group", "step-spans-groups", "m13"])
def test_int4_words_on_the_tensor_cores_scale_after_the_dot(dtype, unroll, rows):
    """bf16 INT4 words on the tensor cores with a step inside one group apply the group scale to
    the dots' fp32 sums (weight_only_parts.words_dots SCALE_AFTER); a step spanning groups and
    fp16 keep the per-weight scale. K 200 (groups of 64: a short last group, a partial last step;
    words on the tensor cores take K steps of 64 or more), N 37, split-K 3: every form within the
    dtype's tolerance of the reference."""
    from compile_backend.kernels import gemv, weight_only

    m, k, n = rows, 200, 37
    codes, scales = quantized_weights(n, k, "int4", 64, seed=41)
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(m, k, generator=gen).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    cfg = weight_only.WeightOnlyConfig("gemv", 1, 16, 64, split_k=3, tensor_cores=True, unroll=unroll)
    gemv.gemv(x, codes, scales, None, out, int4=True, group=64, config=cfg)
    want = ref.weight_only_mm(x, ref.unpack_int4(codes, k), scales, "int4", 64)
    assert_close(out, want)
