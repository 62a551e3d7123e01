"""The TMA convolution (kernels/conv_tma.py): which problems it takes, its configs, and its
results against the scaled convolution's reference under Triton's interpreter (CPU, odd shapes,
padding through the loads' out-of-bounds zeros, a channel tail) and on a Hopper GPU.

Tolerances: INT8 products accumulate exactly in int32; the fp16 output is one rounding of the
fp32 epilogue, so int8 results equal the reference up to that rounding (``TOL[float16]``); FP8
sums in fp32 in another order (atol 1e-5 of the largest output), as test_quant_kernels.py's
``check``.
"""
from __future__ import annotations

import pytest
import torch

import compile_backend.ops  # noqa: F401  (registers torch.ops.compile_backend.*)
from groups import TOL, randn  # tests/kernels/groups.py
from test_quant_kernels import CTX, anchor_group, quantized_conv
from compile_backend.kernels.conv_tma import ConvTmaConfig, conv_tma_configs, conv_tma_supported
from compile_backend.kernels.qconv import scaled_conv_candidates

scaled_conv = torch.ops.compile_backend.scaled_conv
CL = torch.channels_last


def _problem(precision, c, hw, oc, k, pad, seed=3, device="cpu", stride=1):
    xq, xs, wq, ws, b = quantized_conv(2, c, hw, oc, k, 1, precision, per_channel=True, bias=True,
                                       channels_last=True, seed=seed)
    wq = wq.contiguous(memory_format=CL)  # as the layout pass stores a convolution's weight on CUDA
    oh, ow = ((size + 2 * pad - k) // stride + 1 for size in hw)
    r = randn(2, oc, oh, ow, seed=seed + 5).half().contiguous(memory_format=CL)
    inputs = tuple(t.to(device) for t in (xq, xs, wq, ws, b, r))

    def fn(xq, xs, wq, ws, b, r):
        return torch.relu(scaled_conv(xq, xs, wq, ws, b, [stride] * 2, [pad, pad], [1, 1], 1, torch.float16) + r)

    return anchor_group(fn, *inputs, kind="conv", op="scaled_conv"), inputs


def _close(got, want, precision):
    tol = dict(TOL[torch.float16])
    if precision == "fp8":
        tol["atol"] = max(tol["atol"], 1e-5 * want.float().abs().max().item())
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("c,hw,oc,k,pad", [(32, (5, 7), 24, 3, 1), (48, (9, 6), 40, 3, 0), (32, (6, 5), 16, 5, 2)],
                         ids=["3x3_pad1", "3x3_pad0_channel_tail", "5x5_pad2"])
@pytest.mark.parametrize("patch", [(4, 8), (1, 8)], ids=["patch", "row"])
def test_tma_convolution_matches_the_reference_in_the_interpreter(precision, c, hw, oc, k, pad, patch):
    """Patches (2-D, and rows) that overhang the map, padding read as the loads' zeros, a channel
    block past C (48 = 32 + 16: zeros on both operands), output channels past OC (masked), with
    the group's bias, residual add and ReLU in the epilogue."""
    group, inputs = _problem(precision, c, hw, oc, k, pad)
    cfg = ConvTmaConfig(*patch, 16, 32, 4, 1)
    tuning = scaled_conv_candidates(group, CTX, vendor=False, tma_configs=[cfg])
    (tma,) = [cand for cand in tuning.candidates if cand.config.get("conv_tma")]
    assert tma.name == f"triton conv {patch[0]}x{patch[1]}x16x32 w4 s1 g8 tma" and tma.name in tuning.writes_out
    (got,) = tma.compile()(*inputs)
    (want,) = group.reference(*inputs)
    assert got.shape == want.shape and got.stride() == want.stride()
    _close(got, want, precision)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_convolution_on_the_tma_kernel_in_the_interpreter(dtype):
    """A 16-bit convolution group (bias, ReLU) on the TMA kernel equals its reference: 16
    channels (32 bytes a pixel) over an odd map with padding 1."""
    from compile_backend.kernels.conv import conv_candidates
    from groups import make_group

    x = randn(2, 16, 7, 5, seed=11).to(dtype).contiguous(memory_format=CL)
    w = (randn(24, 16, 3, 3, seed=12) / 12).to(dtype).contiguous(memory_format=CL)
    b = randn(24, seed=13).to(dtype)
    g = make_group(lambda x, w, b: torch.relu(torch.nn.functional.conv2d(x, w, b, 1, 1)), x, w, b)
    anchor = next(n.name for n in g.gm.graph.nodes if n.op == "call_function" and "convolution" in str(n.target))
    group = type(g)("conv", g.gm, anchor=anchor)
    tuning = conv_candidates(group, CTX, vendor=False, tma_configs=[ConvTmaConfig(4, 4, 16, 16, 4, 1)])
    (tma,) = [c for c in tuning.candidates if c.config.get("conv_tma")]
    (got,), (want,) = tma.compile()(x, w, b), group.reference(x, w, b)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("c,hw,oc,k,pad", [(32, (6, 10), 24, 3, 1), (64, (8, 6), 16, 1, 0), (32, (10, 8), 16, 5, 2)],
                         ids=["3x3_pad1", "1x1_downsample", "5x5_pad2"])
@pytest.mark.parametrize("patch", [(4, 8), (1, 8)], ids=["patch", "row"])
def test_stride_2_reads_one_parity_of_the_pixel_pairs(precision, c, hw, oc, k, pad, patch):
    """Stride 2 over an even map: x viewed [N, H/2, 2, W/2, 2C], each tap one 5-D box of a row and
    column parity; the padding's negative offsets, the map's far edge and the downsampling 1x1
    convolution (a stride-2 one: no rows GEMM) all match the reference. BLOCK_K divides C (32)."""
    group, inputs = _problem(precision, c, hw, oc, k, pad, stride=2)
    tuning = scaled_conv_candidates(group, CTX, vendor=False, tma_configs=[ConvTmaConfig(*patch, 16, 32, 4, 1)])
    (tma,) = [cand for cand in tuning.candidates if cand.config.get("conv_tma")]
    (got,), (want,) = tma.compile()(*inputs), group.reference(*inputs)
    assert got.shape == want.shape
    _close(got, want, precision)


def test_an_unaligned_input_view_is_copied_not_refused():
    """A descriptor's base address must be 16-byte aligned: an input viewed at an odd offset of
    its storage (a slice of a graph input) is copied for the kernel, and the result is right."""
    group, inputs = _problem("int8", 32, (5, 7), 24, 3, 1)
    xq = inputs[0]
    storage = torch.zeros(xq.numel() + 1, dtype=xq.dtype)
    shifted = storage[1:].as_strided(xq.shape, xq.stride())
    shifted.copy_(xq)
    assert shifted.data_ptr() % 16 and shifted.is_contiguous(memory_format=CL)
    tuning = scaled_conv_candidates(group, CTX, vendor=False, tma_configs=[ConvTmaConfig(4, 8, 16, 32, 4, 1)])
    (tma,) = [c for c in tuning.candidates if c.config.get("conv_tma")]
    (got,), (want,) = tma.compile()(shifted, *inputs[1:]), group.reference(*inputs)
    _close(got, want, "int8")


def test_which_convolutions_it_takes():
    x = torch.zeros(2, 32, 9, 9, dtype=torch.int8).contiguous(memory_format=CL)
    w = torch.zeros(16, 32, 3, 3, dtype=torch.int8).contiguous(memory_format=CL)
    assert conv_tma_supported(x, w, (1, 1), (1, 1), (1, 1), 1)
    assert conv_tma_supported(x[:, :, :8, :8].contiguous(memory_format=CL), w, (2, 2), (1, 1), (1, 1), 1)
    assert not conv_tma_supported(x, w, (2, 2), (1, 1), (1, 1), 1)  # stride 2 over an odd map (9x9)
    assert not conv_tma_supported(x, w, (3, 3), (1, 1), (1, 1), 1)
    assert not conv_tma_supported(x, w, (1, 1), (2, 2), (2, 2), 1)  # dilated
    assert not conv_tma_supported(x, w[:, :16].contiguous(memory_format=CL), (1, 1), (1, 1), (1, 1), 2)  # groups
    w1 = w[:, :, :1, :1].contiguous(memory_format=CL)
    assert not conv_tma_supported(x, w1, (1, 1), (0, 0), (1, 1), 1)  # 1x1 stride 1: the rows GEMM's
    assert conv_tma_supported(x[:, :, :8, :8].contiguous(memory_format=CL), w1, (2, 2), (0, 0), (1, 1), 1)
    assert not conv_tma_supported(x.contiguous(), w, (1, 1), (1, 1), (1, 1), 1)  # NCHW
    x8, w8 = x[:, :8].contiguous(memory_format=CL), w[:, :8].contiguous(memory_format=CL)
    assert not conv_tma_supported(x8, w8, (1, 1), (1, 1), (1, 1), 1)  # 8-byte channel rows
    assert conv_tma_supported(x8.half(), w8.half(), (1, 1), (1, 1), (1, 1), 1)  # 16 bytes in fp16
    assert not conv_tma_supported(x.float(), w.float(), (1, 1), (1, 1), (1, 1), 1)


def test_configs_fit_the_map_and_the_channels():
    fast = conv_tma_configs(256, 56, 56, torch.int8, "fast")
    assert len(fast) == 6 and all(c.block_k == 128 for c in fast) and fast[0].name == "8x16x128x128 w8 s4 g8 tma"
    assert [c.block_w for c in fast if c.block_h == 1] == [64]  # a 128-wide row patch wastes over half a 56 row
    assert not any(c.block_h == 1 for c in conv_tma_configs(256, 28, 28, torch.int8, "fast"))
    assert all(c.block_k == 64 for c in conv_tma_configs(64, 56, 56, torch.int8, "fast"))  # 128 does not divide 64
    assert all(c.block_k == 64 for c in conv_tma_configs(48, 56, 56, torch.int8, "fast"))  # a tail of zeros
    assert all(c.block_k == 16 for c in conv_tma_configs(48, 28, 28, torch.int8, "fast", stride=2))  # divides 48
    assert all(c.block_k == 64 for c in conv_tma_configs(512, 7, 7, torch.float16, "fast"))
    small = conv_tma_configs(512, 3, 3, torch.int8, "max")
    assert small and all(c.block_h <= 8 and c.block_w <= 8 for c in small)
    assert len(conv_tma_configs(256, 56, 56, torch.int8, "max")) > len(fast)
    assert conv_tma_configs(256, 56, 56, torch.int8, "off") == fast[:1]


def test_no_tma_candidates_off_hopper():
    group, _ = _problem("int8", 32, (5, 7), 24, 3, 1)
    assert not any(c.config.get("conv_tma") for c in scaled_conv_candidates(group, CTX, vendor=False).candidates)


@pytest.mark.gpu
@pytest.mark.parametrize("precision,hw,count", [("int8", (14, 13), 5), ("fp8-fast", (14, 13), 5), ("fp8", (14, 13), 0),
                                                ("fp8", (6, 64), 0)])
def test_gpu_tma_convolution_candidates(precision, hw, count):
    """On Hopper a stride-1 3x3 scaled convolution gets the TMA configs; each runs and matches.
    FP8 summed in fp32 (the default accumulation) gets none (``configs_for``: Triton's dots
    there lose the per-tile promotion, H100 sessions 22-23); with fp8_accumulation="fast"
    every patch, within the tensor cores' accumulator's 1e-2."""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.options import Options

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    accumulation = "fast" if precision.endswith("-fast") else "fp32"
    group, inputs = _problem(precision.split("-")[0], 64, hw, 96, 3, 1, device="cuda")
    ctx = KernelContext(Options(fp8_accumulation=accumulation), torch.device("cuda"), False)
    tma = [c for c in scaled_conv_candidates(group, ctx, vendor=False).candidates if c.config.get("conv_tma")]
    assert len(tma) == count, [c.name for c in tma]
    (want,) = group.reference(*inputs)
    for cand in tma:
        (got,) = cand.compile()(*inputs)
        if accumulation == "fast":
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 1e-2, (cand.name, err)
        else:
            _close(got, want, precision)


def test_fp8_tma_convolution_only_with_fast_accumulation(monkeypatch):
    """Which TMA configs an FP8 convolution gets per accumulation mode (see the GPU test)."""
    from types import SimpleNamespace

    import compile_backend.kernels.gemm_tma as gemm_tma
    from compile_backend.kernels.conv_tma import configs_for

    monkeypatch.setattr(gemm_tma, "tma_available", lambda device: True)
    x = torch.empty(2, 64, 6, 64, dtype=torch.float8_e4m3fn).contiguous(memory_format=CL)
    w = torch.empty(96, 64, 3, 3, dtype=torch.float8_e4m3fn).contiguous(memory_format=CL)

    def pick(fast):
        ctx = SimpleNamespace(device=torch.device("cuda"), tuning="fast", fp8_fast_accumulation=fast)
        return configs_for(x, w, (2, 96, 6, 64), (1, 1), (1, 1), (1, 1), 1, ctx)

    fast, fp32 = pick(True), pick(False)
    assert {c.block_h for c in fast} > {1} and any(c.block_h == 1 for c in fast) and fp32 == []


@pytest.mark.gpu
def test_gpu_float_tma_convolution_candidates():
    """On Hopper a stride-1 3x3 fp16 convolution group gets the TMA configs beside cuDNN's and the
    template's; each runs and matches."""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.conv import conv_candidates
    from compile_backend.options import Options
    from groups import make_group

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    x = randn(4, 64, 14, 13, seed=21).half().cuda().contiguous(memory_format=CL)
    w = (randn(96, 64, 3, 3, seed=22) / 24).half().cuda().contiguous(memory_format=CL)
    b = randn(96, seed=23).half().cuda()
    g = make_group(lambda x, w, b: torch.relu(torch.nn.functional.conv2d(x, w, b, 1, 1)), x, w, b)
    anchor = next(n.name for n in g.gm.graph.nodes if n.op == "call_function" and "convolution" in str(n.target))
    group = type(g)("conv", g.gm, anchor=anchor)
    ctx = KernelContext(Options(), torch.device("cuda"), False)
    tma = [c for c in conv_candidates(group, ctx).candidates if c.config.get("conv_tma")]
    assert len(tma) == 5, [c.name for c in tma]
    (want,) = group.reference(x, w, b)
    for cand in tma:
        (got,) = cand.compile()(x, w, b)
        torch.testing.assert_close(got, want, **TOL[torch.float16])


def test_broadcast_operands_load_as_rows_and_scalars(monkeypatch):
    """The epilogue loads the per-channel bias and weight scales as one [1, BLOCK_N] row and the
    per-tensor input scale as a scalar, the residual as the full tile (sm_90: the INT8 kernel's
    registers 250 -> 122 with them, benchmarks/kernel_sass.py --conv-tma)."""
    from compile_backend.kernels import gemm_template

    sources = []
    load = gemm_template.load_kernel
    monkeypatch.setattr(gemm_template, "load_kernel", lambda source, name: sources.append(source) or load(source, name))
    group, inputs = _problem("int8", 32, (5, 7), 24, 3, 1)
    tuning = scaled_conv_candidates(group, CTX, vendor=False, tma_configs=[ConvTmaConfig(4, 8, 16, 32, 4, 1)])
    (tma,) = [c for c in tuning.candidates if c.config.get("conv_tma")]
    tma.compile()(*inputs)
    loads = [line.strip() for line in sources[-1].splitlines() if "tl.load(L" in line]
    rows = [line for line in loads if "oc_out[None, :] * l" in line and "nb *" not in line]
    scalars = [line for line in loads if line.endswith("+ 0)")]
    full = [line for line in loads if "nb *" in line and "oc_out[None, :]" in line]
    assert len(rows) == 2 and len(scalars) == 1 and len(full) == 1, loads  # w_scale, bias; x_scale; residual
