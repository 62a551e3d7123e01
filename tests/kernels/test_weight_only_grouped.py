"""The grouped weight-only GEMM (compile_backend/kernels/weight_only_grouped.py: a
mixture-of-experts layer's experts, W8A16 / W4A16) against its reference
(``weight_only_ref.grouped_weight_only_mm``: each expert's rows through the plain weight-only GEMM).

CPU tensors under the Triton interpreter; odd shapes (M 1/7/37, N 5/24, K 7/40/130: partial tiles,
odd K for INT4's pad nibble, a short last scale group), experts with no rows, one expert with
every row, rows past the last expert (written 0), int32 and int64 offsets, fp16/bf16/fp32
activations, INT8 and INT4 with every group size, decode-sized and prefill-sized row tiles.

Tolerances, per output dtype, as tests/kernels/test_weight_only.py argues them: the dequantized
weight is the reference's exactly, products of 16-bit operands are exact in fp32, so only the
order of the fp32 sums differs (2 (K + 1) 2^-24 |x| @ |w|^T), then one ulp of the output dtype.
"""
from __future__ import annotations

import pytest
import torch

from compile_backend.kernels import weight_only_ref as ref
from compile_backend.kernels.weight_only_grouped import (MAX_EXPERTS, tiles_for, weight_only_grouped_mm,
                                                         weight_only_grouped_mm_reference)

ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TINY = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MODES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def operands(m, n, k, counts, dtype, precision, group_size, *, seed=0, offs_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    codes, scales = ref.quantize_weight(torch.randn(len(counts) * n, k, generator=g), precision, group_size)
    x = torch.randn(m, k, generator=g).to(dtype)
    return x, codes, scales, torch.tensor(counts).cumsum(0).to(offs_dtype)


def check(x, codes, scales, offs, precision, group_size, tiles=None, out_dtype=None):
    got = weight_only_grouped_mm(x, codes, scales, offs, precision=precision, group_size=group_size,
                                 out_dtype=out_dtype, tiles=tiles)
    want = weight_only_grouped_mm_reference(x, codes, scales, offs, precision=precision, group_size=group_size,
                                            out_dtype=out_dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    k = x.shape[1]
    unpacked = ref.unpack_int4(codes, k) if precision == "int4" else codes
    w = ref.dequantize(unpacked, scales, precision, group_size).to(x.dtype).float().abs()
    n = want.shape[1]
    s = torch.stack([x.float().abs() @ w[e * n:(e + 1) * n].t() for e in range(offs.shape[0])]).amax(0)
    tol = 2 * (k + 1) * 2.0**-24 * s + ULP[want.dtype] * want.float().abs() + TINY[want.dtype]
    err = (got.float() - want.float()).abs()
    assert (err <= tol).all(), f"{(err > tol).sum().item()} outside the tolerance; worst {(err - tol).max().item():.3g}"
    return got


#: (M, N, K, rows per expert): decode top-2 of 4 experts, empty experts between, a tail of rows
#: past the last expert, one expert holding every row, partial tiles everywhere; M <= 16 runs
#: the GEMV kernel, beyond the tensor-core tiles
CASES = [(2, 24, 40, [1, 0, 1, 0]), (7, 5, 7, [0, 3, 0, 2]), (37, 24, 130, [17, 0, 20]), (37, 5, 40, [0, 37, 0]),
         (9, 24, 131, [2, 0, 5])]  # the GEMV kernel (M <= 16) on an odd K past a group's end, a tail row


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("precision,group_size", MODES, ids=str)
def test_matches_reference(precision, group_size, dtype):
    for i, (m, n, k, counts) in enumerate(CASES):
        check(*operands(m, n, k, counts, dtype, precision, group_size, seed=i), precision, group_size)


@pytest.mark.parametrize("tiles", [(16, 16, 16), (64, 16, 32), (1, 16, 32)], ids=str)
def test_row_tiles_across_experts_and_the_tail(tiles):
    """Many experts, row tiles ending inside an expert, the rows past the last expert zeroed
    whatever the output held; int64 offsets, a float32 output from bf16 rows."""
    x, codes, scales, offs = operands(70, 24, 40, [5, 0, 16, 17, 1, 0, 9, 3], torch.bfloat16, "int4", 32, seed=9,
                                      offs_dtype=torch.int64)
    got = check(x, codes, scales, offs, "int4", 32, tiles=tiles, out_dtype=torch.float32)
    assert int(offs[-1]) == 51 and torch.equal(got[51:], torch.zeros(19, 24))
    assert got[:51].abs().sum() > 0


def test_heuristic_tiles():
    assert tiles_for(2, 4096, 2048, 8, 1 << 30)[0] == 1  # decode: the GEMV kernel, a row a program
    assert tiles_for(40, 4096, 2048, 8, 1 << 30)[0] == 16  # a few rows an expert
    assert tiles_for(4096, 4096, 2048, 8, 1 << 30)[0] == 64  # prefill
    assert tiles_for(2, 4096, 2048, 8, 32)[2] == 32 and tiles_for(40, 4096, 2048, 8, 32)[2] == 32  # INT4: one group


def test_no_rows_and_no_k():
    x, codes, scales, offs = operands(0, 8, 16, [0, 0], torch.float16, "int8", None)
    assert weight_only_grouped_mm(x, codes, scales, offs, precision="int8").shape == (0, 8)
    x = torch.randn(3, 0).half()
    codes, scales = torch.zeros(16, 0, dtype=torch.int8), torch.ones(16, dtype=torch.float16)
    out = weight_only_grouped_mm(x, codes, scales, torch.tensor([1, 3], dtype=torch.int32), precision="int8")
    assert torch.equal(out, torch.zeros(3, 8, dtype=torch.float16))


@pytest.mark.parametrize("change,message", [
    (dict(offs=torch.tensor([[1, 2]], dtype=torch.int32)), "offs is"),
    (dict(offs=torch.tensor([1.0, 2.0])), "offs is"),
    (dict(offs=torch.zeros(MAX_EXPERTS + 1, dtype=torch.int32)), "offs is"),
    (dict(offs=torch.tensor([1, 2, 3], dtype=torch.int32)), "do not|codes are"),
    (dict(x=torch.randn(2, 3, 16).half()), "x is"),
    (dict(scales=torch.ones(32)), "scales are"),
    (dict(group_size=32), "group_size"),
])
def test_argument_checks_name_the_fix(change, message):
    x, codes, scales, offs = operands(4, 8, 16, [2, 2], torch.float16, "int8", None)
    args = dict(x=x, codes=codes, scales=scales, offs=offs, group_size=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        weight_only_grouped_mm(args["x"], args["codes"], args["scales"], args["offs"], precision="int8",
                               group_size=args["group_size"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 128)], ids=str)
def test_gpu_decode_and_prefill_rows(precision, group_size, dtype):
    """On the GPU (compiled kernels) at an MoE layer's sizes, 8 experts: decode top-2 at batch 1
    (2 rows: the GEMV kernel), 16 rows, and 300 rows routed unevenly (the tensor-core tiles)."""
    for m, counts in ((2, [0, 1, 0, 0, 0, 1, 0, 0]), (16, [3, 1, 0, 4, 2, 2, 3, 1]), (300, [90, 0, 10, 50, 1, 99, 30, 20])):
        x, codes, scales, offs = (t.cuda() for t in operands(m, 1024 + 16, 2048 + 64, counts, dtype, precision,
                                                             group_size, seed=m))
        check(x, codes, scales, offs, precision, group_size)
