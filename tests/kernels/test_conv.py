"""Implicit-GEMM convolution template (compile_backend/kernels/conv.py) against plain PyTorch.

CPU tensors under the Triton interpreter: stride, padding, dilation, groups (depthwise too), odd
spatial sizes, channels-last and contiguous inputs, fp32/fp16/bf16, the epilogues a ResNet
produces (conv without bias + folded-BN bias add, ReLU, residual add) and the cuDNN + fused
epilogue path (ATen's CPU convolution stands in for cuDNN here).

Tolerances: direct API vs an fp64 reference with one final rounding: fp32 1e-4, fp16 1e-3 (half
an ulp each side), bf16 2**-6 (interpreter truncation: see test_gemm.py). Group kernels vs the
ATen graph: fp32 1e-4, fp16 2e-3, bf16 2**-6 (two ulps: the convolution's own rounding may flip
by one ulp under a different summation order, and each later op may add one).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groups import context, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels.base import KernelContext, KernelGroup, Unsupported
from compile_backend.kernels.conv import build_conv, conv2d, conv2d_reference, conv_candidates
from compile_backend.kernels.gemm_config import GemmConfig
from compile_backend.options import Options

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIRECT_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-3, atol=1e-3),
              torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}
GROUP_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}
CL = torch.channels_last


def conv_group(fn, *inputs) -> KernelGroup:
    g = make_group(fn, *inputs)
    anchor = next(n for n in g.gm.graph.nodes if n.op == "call_function"
                  and getattr(n.target, "overloadpacket", None) is torch.ops.aten.convolution)
    return KernelGroup("conv", g.gm, anchor=anchor.name)


def check_group(outputs, group, inputs, dtype):
    expected = group.reference(*inputs)
    assert len(outputs) == len(expected)
    for g, e in zip(outputs, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert g.stride() == e.stride(), (g.stride(), e.stride())  # channels-last stays so
        torch.testing.assert_close(g, e, **GROUP_TOL[dtype])


CASES = [  # (N, C, H, W, OC, kernel, stride, padding, dilation, groups)
    (1, 3, 7, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 8, 11, 13, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (1, 6, 9, 10, 4, (3, 2), (2, 1), (0, 2), (2, 1), 1),
    (2, 5, 7, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 5),  # depthwise
    (3, 16, 5, 5, 17, (1, 1), (2, 2), (0, 0), (1, 1), 1),  # strided 1x1 (ResNet downsample)
    (1, 4, 9, 9, 8, (7, 7), (2, 2), (3, 3), (1, 1), 1),  # ResNet stem shape, small
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"g{c[-1]}")
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_direct(case, dtype, layout):
    n, c, h, w_, oc, k, stride, pad, dil, groups = case
    x = randn(n, c, h, w_, dtype=dtype, seed=1)
    x = x.contiguous(memory_format=CL) if layout == "channels_last" else x
    w = randn(oc, c // groups, *k, dtype=dtype, seed=2)
    bias = randn(oc, dtype=dtype, seed=3)
    out = conv2d(x, w, bias, stride, pad, dil, groups, relu=True)
    ref = conv2d_reference(x, w, bias, stride, pad, dil, groups, relu=True)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=CL) == (layout == "channels_last")
    torch.testing.assert_close(out, ref, **DIRECT_TOL[dtype])


def test_direct_residual_and_small_blocks():
    x = randn(2, 6, 9, 7, seed=4).contiguous(memory_format=CL)
    w, r = randn(10, 6, 3, 3, seed=5), randn(2, 10, 9, 7, seed=6)
    out = conv2d(x, w, None, (1, 1), (1, 1), residual=r, config=GemmConfig(16, 16, 16, num_stages=1))
    torch.testing.assert_close(out, conv2d_reference(x, w, None, (1, 1), (1, 1), residual=r), **DIRECT_TOL[torch.float32])


def bn_block(x, w, b, r):
    """What a folded ResNet block leaves: conv (bias=None) + folded BN bias, ReLU, + residual."""
    return torch.relu(F.conv2d(x, w, None, 1, 1) + b.view(1, -1, 1, 1)) + r


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_folded_bn_relu_residual(dtype):
    x = randn(2, 8, 7, 9, dtype=dtype, seed=7).contiguous(memory_format=CL)
    w, b = randn(12, 8, 3, 3, dtype=dtype, seed=8), randn(12, dtype=dtype, seed=9)
    r = randn(2, 12, 7, 9, dtype=dtype, seed=10).contiguous(memory_format=CL)
    group = conv_group(bn_block, x, w, b, r)
    kernel = build_conv(group, context())
    assert kernel.kind == "conv" and kernel.impl == "triton"
    assert kernel.source.count("tl.load(L") == 2  # bias and residual loaded in the epilogue
    check_group(kernel(x, w, b, r), group, [x, w, b, r], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "x".join(map(str, c[:5])) + f"g{c[-1]}")
def test_group_conv_with_bias(case, dtype):
    n, c, h, w_, oc, k, stride, pad, dil, groups = case
    x = randn(n, c, h, w_, dtype=dtype, seed=11).contiguous(memory_format=CL)
    w, b = randn(oc, c // groups, *k, dtype=dtype, seed=12), randn(oc, dtype=dtype, seed=13)
    group = conv_group(lambda x, w, b: F.relu(F.conv2d(x, w, b, stride, pad, dil, groups)), x, w, b)
    check_group(build_conv(group, context())(x, w, b), group, [x, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chain", ["bn_block", "plain", "bias_relu", "bias_add_relu", "bias_only"])
def test_vendor_path_epilogue_kernel(chain, dtype):
    """cuDNN + fused epilogue: ATen convolution, then the chain as one kernel over the
    (pixel, channel) matrix of the channels-last output. A convolution's own bias (folded BN)
    moves into that kernel; a bias alone stays with ATen (no epilogue kernel to carry it)."""
    x = randn(2, 8, 7, 9, dtype=dtype, seed=14).contiguous(memory_format=CL)
    w, b = randn(12, 8, 3, 3, dtype=dtype, seed=15), randn(12, dtype=dtype, seed=16)
    r = randn(2, 12, 7, 9, dtype=dtype, seed=17).contiguous(memory_format=CL)
    fn = {"bn_block": bn_block,
          "plain": lambda x, w, b, r: F.conv2d(x, w, None, 1, 1),
          "bias_relu": lambda x, w, b, r: F.relu(F.conv2d(x, w, b, 1, 1)),
          "bias_add_relu": lambda x, w, b, r: F.relu(F.conv2d(x, w, b, 1, 1) + r),
          "bias_only": lambda x, w, b, r: F.conv2d(x, w, b, 1, 1)}[chain]
    group = conv_group(fn, x, w, b, r)
    tuning = conv_candidates(group, context(), vendor=True)
    vendor = [c.name for c in tuning.candidates if c.impl == "cudnn"]
    trivial = chain in ("plain", "bias_only")
    fused = {"bias_relu": ["cudnn fused conv+bias+relu"], "bias_add_relu": ["cudnn fused conv+bias+add+relu"]}
    fused = fused.get(chain, []) if dtype != torch.float32 else []  # cuDNN's fused ops: 16-bit only here
    assert vendor == (["cudnn"] if trivial else ["cudnn + triton epilogue", *fused, "cudnn + aten epilogue"])
    loads = {"bn_block": 2, "plain": 0, "bias_relu": 1, "bias_add_relu": 2, "bias_only": 0}[chain]
    # the template holds the epilogue whole and in halves (epilogue_split): count the whole one
    assert tuning.sources["cudnn"].rsplit("    else:\n", 1)[-1].count("tl.load(L") == loads
    assert tuning.candidates[0].impl == "cudnn"  # the untuned choice on CUDA
    check_group(tuning.candidates[0].compile()(x, w, b, r), group, [x, w, b, r], dtype)


def test_cudnn_fused_candidate_only_for_its_exact_chain():
    """Offered for relu(conv + bias) on the group's own inputs; not for a chain with more ops,
    fp32, or a convolution of a view made inside the group."""
    x = randn(2, 8, 7, 9, dtype=torch.float16, seed=22).contiguous(memory_format=CL)
    w, b = randn(12, 8, 3, 3, dtype=torch.float16, seed=23), randn(12, dtype=torch.float16, seed=24)

    def fused_names(fn, *inputs):
        tuning = conv_candidates(conv_group(fn, *inputs), context(), vendor=True)
        return [c.name for c in tuning.candidates if c.name.startswith("cudnn fused")]

    assert fused_names(lambda x, w, b: F.relu(F.conv2d(x, w, b, 1, 1)), x, w, b) == ["cudnn fused conv+bias+relu"]
    assert fused_names(lambda x, w, b: F.relu(F.conv2d(x, w, b, 1, 1)) * 2, x, w, b) == []
    assert fused_names(lambda x, w, b: F.relu(F.conv2d(x, w, b, 1, 1)), x.float(), w.float(), b.float()) == []
    # a view of an input inside the group: the template reads through it, cuDNN's op would not
    assert fused_names(lambda x, w, b: F.relu(F.conv2d(x.transpose(2, 3), w, b, 1, 1)), x, w, b) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cublas_rows_candidate_for_a_pointwise_conv_with_its_bias(dtype):
    """A 1x1 convolution with its bias and nothing else (cuDNN has no conv + bias kernel without
    a ReLU): cuBLAS's addmm over the channels-last rows, the bias in its epilogue, equal to the
    reference; not offered for another geometry, a longer chain, no bias or fp32."""
    x = randn(2, 8, 7, 9, dtype=dtype, seed=31).contiguous(memory_format=CL)
    w, b = randn(12, 8, 1, 1, dtype=dtype, seed=32), randn(12, dtype=dtype, seed=33)

    def rows(fn, *inputs):
        tuning = conv_candidates(conv_group(fn, *inputs), context(), vendor=True)
        return [c for c in tuning.candidates if c.name == "cublas rows conv+bias"]

    group = conv_group(lambda x, w, b: F.conv2d(x, w, b), x, w, b)
    (cand,) = [c for c in conv_candidates(group, context(), vendor=True).candidates if c.name == "cublas rows conv+bias"]
    assert cand.impl == "cublas"
    check_group(cand.compile()(x, w, b), group, [x, w, b], dtype)
    w3 = randn(12, 8, 3, 3, dtype=dtype, seed=34)
    assert rows(lambda x, w, b: F.conv2d(x, w, b, 1, 1), x, w3, b) == []  # 3x3
    assert rows(lambda x, w, b: F.conv2d(x, w, b, 2), x, w, b) == []  # stride 2
    assert rows(lambda x, w, b: F.relu(F.conv2d(x, w, b)), x, w, b) == []  # cuDNN's fused conv + bias + ReLU
    assert rows(lambda x, w: F.conv2d(x, w), x, w) == []  # no bias: the bare convolution is cuDNN's
    assert rows(lambda x, w, b: F.conv2d(x, w, b), x.float(), w.float(), b.float()) == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chain", ["bias_relu", "bias_add_relu"])
def test_gpu_cudnn_fused_candidate(chain, dtype):
    """cuDNN's fused conv + bias (+ residual) + ReLU against the group's ATen reference, with
    the channels-last output layout the engine planned."""
    dev = "cuda"
    x = randn(2, 16, 14, 14, dtype=dtype, seed=18).to(dev).contiguous(memory_format=CL)
    w = randn(32, 16, 3, 3, dtype=dtype, seed=19).to(dev).contiguous(memory_format=CL)
    b = randn(32, dtype=dtype, seed=20).to(dev)
    r = randn(2, 32, 14, 14, dtype=dtype, seed=21).to(dev).contiguous(memory_format=CL)
    fn = (lambda x, w, b, r: F.relu(F.conv2d(x, w, b, 1, 1))) if chain == "bias_relu" else \
        (lambda x, w, b, r: F.relu(F.conv2d(x, w, b, 1, 1) + r))
    group = conv_group(fn, x, w, b, r)
    ctx = KernelContext(options=Options(), device=torch.device(dev), interpret=False)
    tuning = conv_candidates(group, ctx, vendor=True)
    fused = [c for c in tuning.candidates if c.name.startswith("cudnn fused")]
    assert len(fused) == 1
    check_group(fused[0].compile()(x, w, b, r), group, [x, w, b, r], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_cublas_rows_candidate(dtype):
    """cuBLAS's addmm over a 1x1 convolution's channels-last rows on the GPU: the group's ATen
    reference, in the channels-last output layout the engine planned (checked on its probe run)."""
    dev = "cuda"
    x = randn(4, 64, 28, 28, dtype=dtype, seed=35).to(dev).contiguous(memory_format=CL)
    w = randn(256, 64, 1, 1, dtype=dtype, seed=36).to(dev).contiguous(memory_format=CL)
    b = randn(256, dtype=dtype, seed=37).to(dev)
    group = conv_group(lambda x, w, b: F.conv2d(x, w, b), x, w, b)
    ctx = KernelContext(options=Options(), device=torch.device(dev), interpret=False)
    (cand,) = [c for c in conv_candidates(group, ctx, vendor=True).candidates if c.name == "cublas rows conv+bias"]
    check_group(cand.compile()(x, w, b), group, [x, w, b], dtype)


def test_unsupported():
    x, w = randn(1, 4, 5, 5), randn(4, 3, 3, 3)
    with pytest.raises(Unsupported, match="transposed"):
        build_conv(conv_group(lambda x, w: F.conv_transpose2d(x, w), x, w), context())
    x1, w1 = randn(1, 4, 9), randn(3, 4, 3)
    with pytest.raises(Unsupported, match="1-D"):
        build_conv(conv_group(lambda x, w: F.conv1d(x, w), x1, w1), context())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,autotune", [(torch.float16, "fast"), (torch.bfloat16, "off")], ids=str)
def test_gpu_tuned_bn_block(dtype, autotune, tmp_path):
    from compile_backend.kernels.base import KernelContext
    from compile_backend.cache.timing import TimingCache

    dev = torch.device("cuda")
    x = randn(8, 64, 28, 28, dtype=dtype, seed=18).to(dev).contiguous(memory_format=CL)
    w, b = randn(64, 64, 3, 3, dtype=dtype, seed=19).to(dev), randn(64, dtype=dtype, seed=20).to(dev)
    r = randn(8, 64, 28, 28, dtype=dtype, seed=21).to(dev).contiguous(memory_format=CL)
    group = conv_group(bn_block, x, w, b, r)
    ctx = KernelContext(options=Options(autotune=autotune), device=dev, interpret=False, timing_cache=TimingCache(tmp_path))
    kernel = build_conv(group, ctx)
    if autotune == "fast":
        timed, total = map(int, kernel.config["timed"].split("/"))
        assert timed == total, kernel.config  # no candidate failed to compile or run
    expected, got = group.reference(x, w, b, r)[0], kernel(x, w, b, r)[0]
    err = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype], err


def test_size_one_dims_pass_stride_zero_so_triton_sees_aligned_addresses():
    # a 1x1 weight [oc, cg, 1, 1] has strides (cg, 1, 1, 1): passed as 1, Triton treats them as
    # constants of unknown divisibility and loads the weight tile byte by byte (sm_90 SASS)
    from compile_backend.kernels.template import index_strides

    w = torch.empty(64, 32, 1, 1)
    assert w.stride() == (32, 1, 1, 1)
    assert index_strides(w) == (32, 1, 0, 0)
    x = torch.empty(2, 32, 5, 7).to(memory_format=torch.channels_last)
    assert index_strides(x) == x.stride()


@pytest.mark.parametrize("block_k", [16, 32, 64])
def test_few_channels_step_over_the_flattened_reduction(block_k):
    """An RGB stem (3 channels, 7x7, stride 2, padding 3) and a depthwise 3x3 run the flat-K
    loop (each K element's tap and channel computed; masked past K = 147 / 9) and match the
    reference at every K block; a 64-channel layer keeps the per-tap loop."""
    from compile_backend.kernels.conv import flat_k, reduction_block

    assert flat_k(3, block_k) and flat_k(1, block_k) and not flat_k(64, block_k)
    # configs' K blocks: the stem's 147 = 3 x 49 flattened up to 64 wide; 64 channels per tap
    assert reduction_block(128, 3, 49, 16) == reduction_block(128, 3, 49, 32) == 64
    assert reduction_block(block_k, 64, 9, 16) == min(block_k, 64) and reduction_block(32, 1, 9, 16) == 16
    x = randn(2, 3, 13, 11, seed=21).contiguous(memory_format=CL)
    w, b = randn(8, 3, 7, 7, seed=22), randn(8, seed=23)
    out = conv2d(x, w, b, (2, 2), (3, 3), relu=True, config=GemmConfig(16, 16, block_k, num_stages=1))
    torch.testing.assert_close(out, conv2d_reference(x, w, b, (2, 2), (3, 3), relu=True), **DIRECT_TOL[torch.float32])
    xd, wd = randn(1, 6, 9, 8, seed=24).contiguous(memory_format=CL), randn(6, 1, 3, 3, seed=25)
    out = conv2d(xd, wd, None, (1, 1), (1, 1), (1, 1), 6, config=GemmConfig(16, 16, block_k, num_stages=1))
    torch.testing.assert_close(out, conv2d_reference(xd, wd, None, (1, 1), (1, 1), (1, 1), 6), **DIRECT_TOL[torch.float32])
