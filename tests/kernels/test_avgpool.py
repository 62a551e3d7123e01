"""Triton average pooling (compile_backend/kernels/avgpool.py) against ATen's avg_pool2d.

CPU tensors under the Triton interpreter; odd shapes, kernel 2/3 (and 2x3), stride 1/2,
padding 0/1, ceil_mode, count_include_pad on and off, divisor_override, 3-D inputs, NCHW /
channels-last / strided inputs, fp32/fp16/bf16. The kernel sums in fp32 in ATen's CUDA order;
ATen's CPU kernels sum in another, so values are compared within a few ulps of the output
dtype (tolerances below); output strides equal ATen's. The plain-PyTorch
``avgpool2d_reference`` is held against ATen and against the kernel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groups import DTYPES, context, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels.avgpool import avgpool2d_reference, build_avg_pool
from compile_backend.kernels.base import Unsupported
from compile_backend.kernels.pool import build_pool

#: (rtol, atol) per dtype: one rounding of an fp32 mean whose sum order differs from ATen CPU's
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}

# (input shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
CASES = [
    ((1, 3, 7, 9), 2, 2, 0, False, True, None),  # DenseNet's transition
    ((2, 5, 17, 13), 3, 1, 1, False, True, None),  # Inception's branch pool
    ((2, 5, 17, 13), 3, 1, 1, False, False, None),
    ((1, 6, 23, 23), 3, 2, 1, True, True, None),
    ((1, 6, 23, 23), 3, 2, 1, True, False, None),
    ((1, 3, 7, 9), (2, 3), (1, 2), (1, 0), True, True, None),
    ((2, 4, 9, 8), 3, 2, 1, False, True, 5),
    ((5, 11, 10), 3, 2, 1, False, False, None),  # unbatched (C, H, W)
]


def pooling(*args):
    return lambda x: (F.avg_pool2d(x, *args),)


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last" and x.dim() == 4:
        return x.to(memory_format=torch.channels_last)
    if name == "strided":  # every other column of a wider tensor: no dense layout
        return torch.cat([x, x.flip(-1) * 0.5], dim=-1)[..., ::2]
    return x.contiguous()


def run(x, *args):
    group = make_group(pooling(*args), x, kind="pool")
    kernel = build_avg_pool(group, context())
    assert kernel.kind == "pool" and kernel.impl == "triton" and kernel.supports_out
    (expected,) = group.reference(x)
    (got,) = kernel(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert got.stride() == expected.stride(), (got.stride(), expected.stride())
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    return kernel, group, expected, got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}s{c[2]}p{c[3]}"
                         + ("-ceil" if c[4] else "") + ("" if c[5] else "-nopad") + (f"-div{c[6]}" if c[6] else ""))
def test_matches_aten(case, memory, dtype):
    shape, *args = case
    x = layout(randn(*shape, dtype=dtype, seed=len(shape) + shape[-1]), memory)
    _, _, expected, got = run(x, *args)
    ref = avgpool2d_reference(x, *args)
    assert ref.stride() == expected.stride()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(ref, expected, rtol=rtol, atol=atol)
    # the kernel and the reference both sum in fp32 in the same order: bit-identical
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_input_reads_through_strides(dtype):
    x = layout(randn(2, 3, 9, 11, dtype=dtype, seed=3), "strided")
    assert not x.is_contiguous()
    run(x, 3, 2, 1)
    run(randn(2, 3, 11, 9, dtype=dtype, seed=4).transpose(2, 3), 2, 1, 0, True, False)


def test_out_buffer_from_the_memory_plan():
    x = layout(randn(2, 6, 9, 9, seed=8), "channels_last")
    kernel, _, expected, got = run(x, 3, 2, 1)
    assert kernel.out_layouts == ((tuple(expected.shape), expected.stride(), torch.float32),)
    (s, st, d), = kernel.out_layouts
    given = torch.full(s, float("nan"), dtype=d).as_strided(s, st)
    (again,) = kernel(x, out=(given,))
    assert again is given and torch.equal(given, got)


def test_the_max_pool_builder_leaves_it_to_this_one_and_back():
    x = randn(1, 3, 8, 8, seed=9)
    with pytest.raises(Unsupported, match="max_pool2d_with_indices"):
        build_pool(make_group(pooling(2, 2), x, kind="pool"), context())
    max_group = make_group(lambda t: (F.max_pool2d(t, 2, 2, return_indices=True)[0],), x, kind="pool")
    with pytest.raises(Unsupported, match="avg_pool2d"):
        build_avg_pool(max_group, context())
    with pytest.raises(Unsupported, match="dtype"):
        build_avg_pool(make_group(pooling(2, 2), torch.ones(1, 2, 4, 4, dtype=torch.float64), kind="pool"), context())
