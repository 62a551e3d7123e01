"""Triton max pooling (compile_backend/kernels/pool.py) against ATen's max_pool2d_with_indices.

CPU tensors under the Triton interpreter; odd shapes, kernel 2/3 (and 2x3), stride 1/2,
padding 0/1, dilation 2, ceil_mode, 3-D inputs, NCHW / channels-last / strided inputs,
fp32/fp16/bf16. Max involves no rounding, so every comparison is exact: values bit-identical
(NaN where ATen has NaN, the sign of zero included), indices equal, output strides equal
ATen's. The plain-PyTorch ``maxpool2d_reference`` is held against ATen as well.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groups import DTYPES, context, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels import pool
from compile_backend.kernels.base import Unsupported
from compile_backend.kernels.pool import PoolConfig, build_pool, maxpool2d_reference, pool_heuristic

# (input shape, kernel, stride, padding, dilation, ceil_mode)
CASES = [
    ((1, 3, 7, 9), 3, 2, 1, 1, False),
    ((2, 5, 17, 13), 2, 2, 0, 1, False),
    ((2, 5, 17, 13), 3, 1, 1, 2, False),
    ((1, 64, 23, 23), 3, 2, 1, 1, True),
    ((1, 3, 7, 9), (2, 3), (1, 2), (1, 0), 1, True),
    ((5, 11, 10), 3, 2, 1, 1, False),  # unbatched (C, H, W)
]


def pooling(kernel, stride, padding, dilation, ceil_mode, indices):
    def fn(x):
        values, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
        return (values, idx) if indices else (values,)

    return fn


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last" and x.dim() == 4:
        return x.to(memory_format=torch.channels_last)
    if name == "strided":  # every other column of a wider tensor: no dense layout
        wide = torch.cat([x, x.flip(-1) * 0.5], dim=-1)
        return wide[..., ::2]
    return x.contiguous()


def assert_identical(got, expected) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape and g.dtype == e.dtype, (i, g.shape, g.dtype, e.shape, e.dtype)
        assert g.stride() == e.stride(), (i, g.stride(), e.stride())
        if e.is_floating_point():
            assert torch.equal(g.isnan(), e.isnan()), f"output {i}: NaN pattern differs"
            bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[e.dtype]
            keep = ~e.isnan()
            assert torch.equal(g[keep].view(bits), e[keep].view(bits)), f"output {i}: values differ"
        else:
            assert torch.equal(g, e), f"output {i}: indices differ"


def run(x, *pool_args, indices=True, config=None):
    group = make_group(pooling(*pool_args, indices), x, kind="pool")
    kernel = build_pool(group, context(), config)
    assert kernel.kind == "pool" and kernel.impl == "triton" and kernel.supports_out
    expected = group.reference(x)
    assert_identical(kernel(x), expected)
    return kernel, group, expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}s{c[2]}p{c[3]}d{c[4]}"
                         + ("-ceil" if c[5] else ""))
def test_matches_aten_exactly(case, memory, dtype):
    shape, *args = case
    x = layout(randn(*shape, dtype=dtype, seed=len(shape) + shape[-1]), memory)
    for indices in (False, True):
        _, _, expected = run(x, *args, indices=indices)
    # the plain-PyTorch reference agrees with ATen as well (values and layout)
    ref = maxpool2d_reference(x, *args)
    assert ref.stride() == expected[0].stride()
    assert torch.equal(ref, expected[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_input_reads_through_strides(dtype):
    x = layout(randn(2, 3, 9, 11, dtype=dtype, seed=3), "strided")
    assert not x.is_contiguous()
    run(x, 3, 2, 1, 1, False)
    # transposed H/W: ATen writes NCHW-contiguous; so do we
    run(randn(2, 3, 11, 9, dtype=dtype, seed=4).transpose(2, 3), 2, 1, 0, 1, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_nan_propagates_like_aten(memory, dtype):
    x = randn(2, 5, 9, 11, dtype=dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    x[torch.rand(x.shape, generator=g) < 0.08] = float("nan")
    x[0, 0, 0, 0:3] = float("nan")  # several NaNs in one window: ATen reports the last one
    x = layout(x, memory)
    _, _, expected = run(x, 3, 2, 1, 1, False)
    assert expected[0].isnan().any() and not expected[0].isnan().all()
    torch.testing.assert_close(maxpool2d_reference(x, 3, 2, 1), expected[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_padding_reads_minus_infinity(memory, dtype):
    # all-negative input: a zero padding would win every border window
    x = layout(-(randn(1, 6, 8, 7, dtype=dtype, seed=7).abs() + 1), memory)
    _, _, expected = run(x, 3, 2, 1, 1, True)
    assert (expected[0] < 0).all()
    # all -inf: values -inf, indices the first element of each window inside the input
    run(layout(torch.full((1, 2, 5, 4), float("-inf"), dtype=dtype), memory), 3, 2, 1, 1, False)


def test_ties_keep_the_first_element_and_sign_of_zero():
    x = torch.tensor([[0.0, -0.0, 0.0], [-0.0, -0.0, 0.0], [1.0, 1.0, 1.0]]).reshape(1, 1, 3, 3)
    for memory in ("contiguous", "channels_last"):
        run(layout(x, memory), 2, 1, 0, 1, False)
        run(layout(x.neg(), memory), (1, 2), 1, 0, 1, False)


def test_out_buffers_from_the_memory_plan():
    x = layout(randn(2, 6, 9, 9, seed=8), "channels_last")
    kernel, group, expected = run(x, 3, 2, 1, 1, False)
    assert kernel.out_layouts == ((tuple(expected[0].shape), expected[0].stride(), torch.float32),
                                  (tuple(expected[1].shape), expected[1].stride(), torch.int64))
    given = tuple(torch.full(s, float("nan"), dtype=d).as_strided(s, st) if d.is_floating_point
                  else torch.full(s, -1, dtype=d).as_strided(s, st) for s, st, d in kernel.out_layouts)
    got = kernel(x, out=given)
    assert all(g is t for g, t in zip(got, given))
    assert_identical(got, expected)
    # None entries: that output is allocated
    assert_identical(kernel(x, out=(given[0], None)), expected)
    with pytest.raises(ValueError, match="stride"):
        kernel(x, out=(torch.empty(expected[0].shape), None))
    with pytest.raises(ValueError, match="built for"):
        kernel(randn(2, 6, 9, 8))


def test_only_indices_used():
    x = randn(1, 4, 7, 7, seed=9)
    group = make_group(lambda a: (F.max_pool2d(a, 3, 2, 1, return_indices=True)[1],), x, kind="pool")
    kernel = build_pool(group, context())
    assert kernel.out_layouts[0][2] == torch.int64
    assert_identical(kernel(x), group.reference(x))


def test_unsupported_dtypes_say_why():
    for dtype in (torch.int32, torch.float64):
        x = (randn(1, 2, 5, 5) * 10).to(dtype)
        group = make_group(lambda a: (F.max_pool2d(a, 2),), x, kind="pool")
        with pytest.raises(Unsupported, match="dtype"):
            build_pool(group, context())


def test_wide_indexing_path(monkeypatch):
    monkeypatch.setattr(pool, "INT32_MAX", 50)  # force 64-bit offsets on a small tensor
    for memory in ("contiguous", "channels_last"):
        run(layout(randn(2, 3, 9, 8, dtype=torch.float16, seed=10), memory), 3, 2, 1, 1, True)


def test_configs_and_heuristic():
    x = layout(randn(1, 19, 7, 6, seed=11), "channels_last")  # tiles overhang both grid dims
    for cfg in (PoolConfig(block_r=2, block_i=4, num_warps=1), PoolConfig(block_r=32, block_i=4, num_warps=2)):
        kernel, _, _ = run(x, 3, 2, 1, 1, False, config=cfg)
        assert kernel.config["block_r"] == cfg.block_r and kernel.config["indices"] is True
    # ResNet-50's stem pooling (1x64x112x112 fp16 channels-last -> 56x56): 256-output tiles along C
    assert pool_heuristic(56 * 56, 64) == PoolConfig(block_r=4, block_i=64, num_warps=2)
    assert pool_heuristic(3, 5) == PoolConfig(block_r=4, block_i=8, num_warps=1)
    assert pool_heuristic(7, 300) == PoolConfig(block_r=2, block_i=128, num_warps=2)
    with pytest.raises(ValueError, match="block_r"):
        PoolConfig(block_r=3)
    with pytest.raises(ValueError, match="at most"):
        PoolConfig(block_r=1024, block_i=1024)


def test_empty_batch():
    x = torch.empty(0, 3, 8, 8)
    group = make_group(lambda a: (F.max_pool2d(a, 2),), x, kind="pool")
    assert build_pool(group, context())(x)[0].shape == (0, 3, 4, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_on_gpu(dtype):
    for shape, *args in CASES + [((1, 64, 112, 112), 3, 2, 1, 1, False), ((8, 256, 28, 28), 2, 2, 0, 1, True)]:
        for memory in ("contiguous", "channels_last"):
            x = layout(randn(*shape, dtype=dtype).cuda(), memory)
            for indices in (False, True):
                group = make_group(pooling(*args, indices), x, kind="pool")
                assert_identical(build_pool(group, context())(x), group.reference(x))


# ----------------------------------------------------------------------------- end to end
class ConvReluPool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.max_pool2d(torch.relu(self.conv(x)), 3, 2, 1))


def _pool_kernels(report):
    return [k for g in report.graphs for k in g.kernels if k["kind"] == "pool"]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_compiled_model_runs_the_pool_kernel(training):
    """conv -> relu -> maxpool -> conv under the interpreter: the pooling is a "pool" group our
    Triton kernel runs (with indices in training, where backward reads them), no fallback, and
    the model (and its gradients) match eager."""
    import compile_backend
    from helpers import compile_and_compare  # tests/helpers.py

    torch.manual_seed(0)
    model = ConvReluPool().train(training)
    x = torch.randn(2, 3, 11, 9).to(memory_format=torch.channels_last)
    report = compile_backend.explain(model, x)
    pools = _pool_kernels(report)
    assert [(k["impl"], k["ops"], k["config"]["indices"]) for k in pools] == \
        [("triton", ["aten.max_pool2d_with_indices", "getitem"] + (["getitem"] if training else []), training)]
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert not any("max_pool2d" in f["op"] and "backward" not in f["op"] for f in fallbacks), fallbacks
    compile_and_compare(model, [x], training=training, calls=1)
