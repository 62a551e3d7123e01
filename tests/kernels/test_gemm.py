"""GEMM template (compile_backend/kernels/gemm*.py) against plain PyTorch.

CPU tensors under the Triton interpreter, small odd shapes (M, N, K in 1, 17, 129, mixes, one
K ~ 1000), transposed operands through strides, batched, every epilogue, fp32/fp16/bf16, int8
and fp8 with scale vectors, split-K, and the cuBLAS + fused-epilogue path (its epilogue kernel
runs here too; ATen stands in for cuBLAS on the CPU).

Tolerances, per output dtype:
* direct API (:func:`gemm` vs :func:`gemm_reference`: fp64 products, fp32 epilogue, one final
  rounding): fp32 1e-4 (fp32 accumulation of up to ~1000 products); fp16 1e-3 (one rounding,
  half an ulp each side); bf16 2**-6 (the interpreter rounds fp32 -> bf16 by truncation: one ulp,
  2**-7, plus half an ulp of the reference's rounding); int32 exact; fp8 inputs with fp32 output
  1e-5 (products of e4m3 values are exact in fp32, only the summation order differs).
* group kernels vs the group's ATen graph (eager rounds the GEMM result, then every op): a
  different summation order may flip the GEMM's own rounding by one ulp and each later op may
  round that to one more: fp32 1e-4, fp16 2e-3 (two fp16 ulps of <= 2**-10), bf16 2**-6 (two
  bf16 ulps of <= 2**-7).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groups import context, make_group, randn  # tests/kernels/groups.py
from compile_backend.kernels.base import KernelGroup, Unsupported
from compile_backend.kernels.gemm import build_gemm, gemm_candidates
from compile_backend.kernels.gemm_config import GemmConfig, candidate_configs, heuristic_config
from compile_backend.kernels.gemm_runner import EPILOGUE_ALTERNATIVES
from compile_backend.kernels.gemm_direct import gemm, gemm_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIRECT_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-3, atol=1e-3),
              torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}
GROUP_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}
FP8 = torch.float8_e4m3fn


def gemm_group(fn, *inputs) -> KernelGroup:
    g = make_group(fn, *inputs)
    anchor = next(n for n in g.gm.graph.nodes if n.op == "call_function"
                  and n.target.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm"))
    return KernelGroup("gemm", g.gm, anchor=anchor.name)


def check_group(kernel, group, inputs, dtype):
    expected = group.reference(*inputs)
    got = kernel(*inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, g.dtype, e.shape, e.dtype)
        torch.testing.assert_close(g, e, **GROUP_TOL[dtype])


# ----------------------------------------------------------------------------- direct API
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mnk", [(1, 1, 1), (17, 1, 129), (1, 17, 5), (17, 33, 129), (129, 17, 17), (5, 7, 1000)], ids=str)
def test_direct_shapes(mnk, dtype):
    m, n, k = mnk
    a, b = randn(m, k, dtype=dtype, seed=1), randn(k, n, dtype=dtype, seed=2)
    out = gemm(a, b)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out, gemm_reference(a, b), **DIRECT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["at", "bt", "both", "sliced"])
def test_direct_transposed_operands(layout, dtype):
    m, n, k = 19, 23, 37
    a = randn(k, m, dtype=dtype, seed=3).t() if layout in ("at", "both") else randn(m, k, dtype=dtype, seed=3)
    b = randn(n, k, dtype=dtype, seed=4).t() if layout in ("bt", "both") else randn(k, n, dtype=dtype, seed=4)
    if layout == "sliced":  # non-unit strides on both axes
        a = randn(2 * m, 3 * k, dtype=dtype, seed=5)[::2, ::3]
    torch.testing.assert_close(gemm(a, b), gemm_reference(a, b), **DIRECT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_direct_batched(dtype):
    a = randn(3, 17, 33, dtype=dtype, seed=6)
    b = randn(3, 21, 33, dtype=dtype, seed=7).transpose(1, 2)
    torch.testing.assert_close(gemm(a, b), gemm_reference(a, b), **DIRECT_TOL[dtype])
    shared = randn(33, 9, dtype=dtype, seed=8)  # one B for every batch entry (stride 0)
    torch.testing.assert_close(gemm(a, shared), gemm_reference(a, shared), **DIRECT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"])
def test_direct_epilogues(activation, dtype):
    m, n, k = 17, 33, 40
    a, b = randn(m, k, dtype=dtype, seed=9), randn(k, n, dtype=dtype, seed=10)
    bias, res = randn(n, dtype=dtype, seed=11), randn(m, n, dtype=dtype, seed=12)
    out = gemm(a, b, bias=bias, activation=activation, residual=res)
    ref = gemm_reference(a, b, bias=bias, activation=activation, residual=res)
    torch.testing.assert_close(out, ref, **DIRECT_TOL[dtype])


@pytest.mark.parametrize("split_k", [2, 4])
def test_direct_split_k(split_k):
    a, b = randn(5, 1000, seed=13), randn(1000, 7, seed=14)
    bias = randn(7, seed=15)
    cfg = GemmConfig(16, 16, 64, split_k=split_k, num_stages=1)
    out = gemm(a, b, bias=bias, activation="relu", config=cfg)
    torch.testing.assert_close(out, gemm_reference(a, b, bias=bias, activation="relu"), **DIRECT_TOL[torch.float32])


def test_int8_int32_accumulation():
    a = torch.randint(-128, 128, (17, 129), dtype=torch.int8)
    b = torch.randint(-128, 128, (33, 129), dtype=torch.int8).t()
    out = gemm(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out, a.int() @ b.int())  # |acc| < 2**21: exact in any order
    out_sk = gemm(a, b, config=GemmConfig(16, 32, 32, split_k=2, num_stages=1))
    assert torch.equal(out_sk, out)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_int8_with_scales(out_dtype):
    a = torch.randint(-128, 128, (17, 40), dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 9), dtype=torch.int8)
    sa, sb = torch.rand(17) / 100, torch.rand(9) / 100
    bias = randn(9, seed=16)
    out = gemm(a, b, scale_a=sa, scale_b=sb, bias=bias, activation="relu", out_dtype=out_dtype)
    ref = gemm_reference(a, b, scale_a=sa, scale_b=sb, bias=bias, activation="relu", out_dtype=out_dtype)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out, ref, **(dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else DIRECT_TOL[out_dtype]))


def test_fp8_with_scales():
    a = randn(2, 17, 40, seed=17).to(FP8)
    b = randn(2, 9, 40, seed=18).to(FP8).transpose(1, 2)
    sa, sb = torch.rand(17) + 0.5, torch.rand(9) + 0.5
    out = gemm(a, b, scale_a=sa, scale_b=sb, activation="silu")
    assert out.dtype == torch.float32 and out.shape == (2, 17, 9)
    torch.testing.assert_close(out, gemm_reference(a, b, scale_a=sa, scale_b=sb, activation="silu"), rtol=1e-5, atol=1e-5)
    half = gemm(a, b, scale_b=sb, out_dtype=torch.bfloat16)
    torch.testing.assert_close(half, gemm_reference(a, b, scale_b=sb, out_dtype=torch.bfloat16), **DIRECT_TOL[torch.bfloat16])


def test_direct_rejects_bad_inputs():
    a, b = randn(4, 5), randn(6, 7)
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm(a, b)
    with pytest.raises(ValueError, match="activation"):
        gemm(a, randn(5, 7), activation="swish")
    with pytest.raises(ValueError, match="scale_a"):
        gemm(a, randn(5, 7), scale_a=torch.ones(3))
    with pytest.raises(ValueError):
        GemmConfig(block_m=48)


# ----------------------------------------------------------------------------- group builder
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_3d_gelu_residual(dtype):
    """Linear as the zoo produces it: view to 2-D, addmm with t(weight), view back, + residual."""
    x, w, b = randn(2, 7, 33, dtype=dtype, seed=20), randn(17, 33, dtype=dtype, seed=21), randn(17, dtype=dtype, seed=22)
    r = randn(2, 7, 17, dtype=dtype, seed=23)
    group = gemm_group(lambda x, w, b, r: F.gelu(F.linear(x, w, b)) + r, x, w, b, r)
    kernel = build_gemm(group, context())
    assert kernel.impl == "triton" and kernel.kind == "gemm"
    assert "tl.erf" in kernel.source  # the GELU is inside the GEMM kernel
    check_group(kernel, group, [x, w, b, r], dtype)


EPILOGUES = {
    "bias": lambda x, w, b: F.linear(x, w, b),
    "relu": lambda x, w, b: torch.relu(F.linear(x, w, b)),
    "gelu_tanh": lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"),
    "silu": lambda x, w, b: F.silu(F.linear(x, w) + b),
    "tanh": lambda x, w, b: torch.tanh(F.linear(x, w, b)),
    "sigmoid": lambda x, w, b: torch.sigmoid(F.linear(x, w, b)),
    "scale": lambda x, w, b: F.linear(x, w, b) * 0.125,
    "cast": lambda x, w, b: F.linear(x, w, b).float() * 2.0,
    "two_outputs": lambda x, w, b: _both(F.linear(x, w, b)),
    "gelu_new_dag": lambda x, w, b: _gelu_new(F.linear(x, w, b)),
}


def _gelu_new(h):
    """GPT-2's tanh GELU written out: the epilogue reads the GEMM result three times."""
    return 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))


def _both(y):
    return y, torch.relu(y)  # the GEMM result and its activation both leave the kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(EPILOGUES))
def test_epilogues(name, dtype):
    x, w, b = randn(17, 29, dtype=dtype, seed=24), randn(13, 29, dtype=dtype, seed=25), randn(13, dtype=dtype, seed=26)
    group = gemm_group(EPILOGUES[name], x, w, b)
    kernel = build_gemm(group, context())
    assert kernel.impl == "triton"
    check_group(kernel, group, [x, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bmm_attention_scores(dtype):
    q, k = randn(2, 3, 9, 16, dtype=dtype, seed=27), randn(2, 3, 11, 16, dtype=dtype, seed=28)

    def scores(q, k):
        s = torch.matmul(q, k.transpose(-1, -2))  # view to 3-D, bmm, view back
        return s * 0.25

    group = gemm_group(scores, q, k)
    assert "aten.bmm" in group.ops
    check_group(build_gemm(group, context()), group, [q, k], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_baddbmm_alpha_beta(dtype):
    c, a, b = randn(3, 1, 7, dtype=dtype, seed=29), randn(3, 5, 9, dtype=dtype, seed=30), randn(3, 9, 7, dtype=dtype, seed=31)
    group = gemm_group(lambda c, a, b: torch.relu(torch.baddbmm(c, a, b, beta=0.5, alpha=2.0)), c, a, b)
    check_group(build_gemm(group, context()), group, [c, a, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epilogue_loads_broadcast_along_one_side_are_rows_columns_or_scalars(dtype):
    """A bias [N] is loaded as one row of the tile, a per-row tensor [M, 1] as one column, a 0-d
    value as a scalar (registers: no full tile of repeated values); a batched GEMM's per-batch
    row [B, 1, N] and per-row [1, M, 1] values keep the batch term. Results as ATen's."""
    a, b = randn(19, 24, dtype=dtype, seed=40), randn(24, 33, dtype=dtype, seed=41)
    bias, rows, s = randn(33, dtype=dtype, seed=42), randn(19, 1, dtype=dtype, seed=43), randn((), dtype=dtype, seed=44)
    group = gemm_group(lambda a, b, bias, rows, s: torch.relu(a @ b + bias) * rows + s, a, b, bias, rows, s)
    kernel = build_gemm(group, context())
    check_group(kernel, group, [a, b, bias, rows, s], dtype)
    loads = [line.strip() for line in kernel.source.splitlines() if "= tl.load(L" in line]
    assert any("rn[None, :]" in line and "rm[:, None]" not in line for line in loads), loads  # the bias row
    assert any("rm[:, None]" in line and "rn[None, :]" not in line for line in loads), loads  # the column
    assert any("rm[" not in line and "rn[" not in line for line in loads), loads  # the scalar
    x, y = randn(3, 5, 9, dtype=dtype, seed=45), randn(3, 9, 7, dtype=dtype, seed=46)
    per_batch, per_row = randn(3, 1, 7, dtype=dtype, seed=47), randn(1, 5, 1, dtype=dtype, seed=48)
    group = gemm_group(lambda x, y, p, r: torch.bmm(x, y) * r + p, x, y, per_batch, per_row)
    check_group(build_gemm(group, context()), group, [x, y, per_batch, per_row], dtype)


def test_mm_transposed_input_and_addmm_beta_zero():
    a, b, c = randn(9, 17, seed=32), randn(9, 5, seed=33), torch.full((17, 5), float("nan"))
    group = gemm_group(lambda a, b, c: torch.addmm(c, a.t(), b, beta=0.0), a, b, c)
    out = build_gemm(group, context())(a, b, c)[0]
    assert not out.isnan().any()  # beta == 0 ignores the bias, NaN included (as ATen)
    check_group(build_gemm(group, context()), group, [a, b, c], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["two_outputs", "gelu_new_dag", "cast"])
def test_epilogue_split_in_halves(name, dtype):
    """A config whose epilogue runs over each half of the tile's columns (long chains spill
    over a whole tile): the same values, N odd so the second half is partly masked; also after
    split-K partial sums (the MODE-2 pass takes the split too)."""
    x, w, b = randn(17, 29, dtype=dtype, seed=24), randn(45, 29, dtype=dtype, seed=25), randn(45, dtype=dtype, seed=26)
    group = gemm_group(EPILOGUES[name], x, w, b)
    configs = [GemmConfig(16, 32, 16, num_stages=1, epilogue_split=2),
               GemmConfig(16, 64, 16, split_k=2, num_stages=1, epilogue_split=2)]
    tuning = gemm_candidates(group, context(), configs=configs)
    expected = group.reference(x, w, b)
    for cand in tuning.candidates:
        assert cand.name.endswith(" e2"), cand.name
        for got, exp in zip(cand.compile()(x, w, b), expected):
            torch.testing.assert_close(got, exp, **GROUP_TOL[dtype])


def test_split_epilogue_variants_only_for_crowded_tiles():
    from compile_backend.kernels.gemm_config import long_chain, with_split_epilogues

    assert long_chain(("aten.view", "aten.gelu")) and not long_chain(("aten.view", "aten.add"))

    big, small, tma = GemmConfig(128, 256, 64, num_warps=8), GemmConfig(64, 64, 64), GemmConfig(128, 256, 64, num_warps=8, tma=True)
    names = [c.name for c in with_split_epilogues([big, small, tma])]
    assert names == [big.name, big.name + " e2", small.name, tma.name]
    with pytest.raises(ValueError, match="epilogue_split"):
        GemmConfig(64, 64, 64, epilogue_split=2, tma=True)
    with pytest.raises(ValueError, match="epilogue_split"):
        GemmConfig(64, 16, 64, epilogue_split=2)


def test_split_k_group():
    x, w, b = randn(3, 1000, seed=34), randn(5, 1000, seed=35), randn(5, seed=36)
    group = gemm_group(lambda x, w, b: torch.relu(F.linear(x, w, b)), x, w, b)
    tuning = gemm_candidates(group, context(), configs=[GemmConfig(16, 16, 64, split_k=4, num_stages=1)])
    run = tuning.candidates[0].compile()
    expected = group.reference(x, w, b)[0]
    torch.testing.assert_close(run(x, w, b)[0], expected, **GROUP_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["bias", "two_outputs", "plain"])
def test_vendor_path_epilogue_kernel(name, dtype):
    """cuBLAS + fused epilogue: the anchor through ATen, the chain as one MODE-2 kernel."""
    x, w, b = randn(2, 7, 29, dtype=dtype, seed=37), randn(13, 29, dtype=dtype, seed=38), randn(13, dtype=dtype, seed=39)
    fns = {"bias": lambda x, w, b: F.gelu(F.linear(x, w, b)) * 2.0,
           "two_outputs": lambda x, w, b: _both(F.linear(x, w, b)),
           "plain": lambda x, w, b: F.linear(x, w)}
    group = gemm_group(fns[name], x, w, b)
    tuning = gemm_candidates(group, context(), vendor=True)
    names = [c.name for c in tuning.candidates]
    # the untuned order on CUDA: cuBLAS + ATen epilogue, cuBLAS + fused epilogue, templates
    assert names[:2] == (["cublas", "triton 16x16x32 w4 s1 g8"] if name == "plain" else
                         ["cublas + aten epilogue", "cublas + triton epilogue"]), names
    if name != "plain":  # the epilogue kernel in every tile (a long epilogue spills in the first)
        assert sum(nm.startswith("cublas + triton epilogue") for nm in names) == 1 + len(EPILOGUE_ALTERNATIVES), names
    expected = group.reference(x, w, b)
    for cand in tuning.candidates:
        if cand.impl == "cublas":
            for got, exp in zip(cand.compile()(x, w, b), expected):
                torch.testing.assert_close(got, exp, **GROUP_TOL[dtype])


def test_unsupported_groups():
    x, w = randn(4, 6), randn(6, 5)
    reduction = gemm_group(lambda x, w: (x @ w).sum(dim=1), x, w)
    with pytest.raises(Unsupported):
        build_gemm(reduction, context())
    x5 = randn(5, 6)  # 5 rows: beyond the fused decode GEMV, which computes an operand (test_gemv.py)
    computed_operand = gemm_group(lambda x, w: torch.exp(x) @ w, x5, w)  # exp is not a view
    with pytest.raises(Unsupported, match="only views"):
        build_gemm(computed_operand, context())
    ints = gemm_group(lambda x, w: x @ w, x.long(), w.long())
    with pytest.raises(Unsupported):
        build_gemm(ints, context())


def test_config_sets_are_pruned_and_valid():
    fast = candidate_configs(2048, 768, 768, 1, torch.float16, "fast")
    full = candidate_configs(2048, 768, 768, 1, torch.float16, "max")
    assert fast[0] == heuristic_config(2048, 768, 768, 1, torch.float16) == full[0]
    assert 1 < len(fast) <= 8 < len(full)
    for cfg in full:  # every config fits H100 shared memory
        assert (cfg.block_m + cfg.block_n) * cfg.block_k * 2 * cfg.num_stages <= 227 * 1024
    skinny = candidate_configs(16, 64, 8192, 1, torch.float16, "fast")
    assert any(c.split_k > 1 for c in skinny)  # long K, few tiles: split-K is tried
    assert candidate_configs(4096, 4096, 4096, 1, torch.float16, "off") == [heuristic_config(4096, 4096, 4096, 1, torch.float16)]


def test_eight_bit_fast_tiles_over_a_short_k_take_three_stages():
    """8-bit operands over K = 768 (6 steps of 128): the fast set's tiles at most 3 stages, so two
    programs fit an SM (the 3-stage tiles won every "max" timing at that K on the H100/H200);
    over K = 3072 and for 16-bit operands the stages are as before."""
    for dt in (torch.int8, torch.float8_e4m3fn):
        short = candidate_configs(6304, 2304, 768, 1, dt, "fast")
        assert len(short) == 8 and all(c.num_stages <= 3 for c in short)
        assert GemmConfig(128, 128, 128, 8, 1, 4, 3) in short
        long_k = candidate_configs(6304, 768, 3072, 1, dt, "fast")
        assert any(c.num_stages == 4 for c in long_k)
    assert any(c.num_stages == 4 for c in candidate_configs(6304, 2304, 768, 1, torch.float16, "fast"))


def test_short_k_configs_are_light_and_stage_no_further_than_k(monkeypatch):
    """A GEMM of one or two K steps (ResNet-50's expanding 1x1 layers as rows) gets tiles of at
    most 64 accumulators a thread and no more stages than K steps; the scaled 1x1 convolution's
    rows candidates try them right after the heuristic on a GPU."""
    from types import SimpleNamespace

    import compile_backend
    from compile_backend.kernels import qconv
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.gemm_config import short_k_configs, short_k_steps

    f8 = torch.float8_e4m3fn
    assert [short_k_steps(k, f8) for k in (64, 128, 256, 512)] == [1, 1, 2, 4]
    for k, stages in ((64, 1), (256, 2)):
        configs = short_k_configs(100352, 256, k, f8)
        assert configs and all(c.num_stages == stages and c.block_k == min(k, 128) for c in configs)
        assert all(c.block_m * c.block_n // (32 * c.num_warps) <= 64 for c in configs)
    gpu = KernelContext(options=compile_backend.Options(), device=torch.device("cuda"), interpret=False)
    # after the heuristic: the short-K 8-bit tiles timed best (the TMA ones on Hopper), one light tile
    for tma, cg, names in ((False, 64, ["128x64x64 w4 s4 g8"]),
                           (True, 64, ["128x64x64 w4 s4 g8", "256x128x64 w8 s4 g8 tma"]),
                           (True, 256, ["128x64x64 w4 s4 g8", "256x128x64 w8 s4 g8 tma", "256x128x128 w8 s4 g8 tma",
                                        "128x128x128 w4 s3 g8 tma"])):
        monkeypatch.setattr(qconv, "tma_available", lambda device, tma=tma: tma)
        rows = qconv._gemm_configs(SimpleNamespace(m=100352, oc=256, cg=cg, dtype=f8), gpu)
        assert [c.name for c in rows[1:-1]] == names, rows
        assert rows[-1].num_stages == short_k_steps(cg, f8) and not rows[-1].tma
    long_k = qconv._gemm_configs(SimpleNamespace(m=1568, oc=2048, cg=512, dtype=f8), gpu)
    assert all(c.num_stages > 2 and not c.tma for c in long_k)  # K of four steps and more: as before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,autotune", [(torch.float16, "fast"), (torch.bfloat16, "off"), (torch.float32, "off")], ids=str)
def test_gpu_tuned_linear(dtype, autotune, tmp_path):
    from compile_backend.kernels.base import KernelContext
    from compile_backend.cache.timing import TimingCache
    from compile_backend.options import Options

    dev = torch.device("cuda")
    x, w, b = (randn(4, 129, 768, dtype=dtype, seed=40).to(dev), randn(3072, 768, dtype=dtype, seed=41).to(dev),
               randn(3072, dtype=dtype, seed=42).to(dev))
    group = gemm_group(lambda x, w, b: F.gelu(F.linear(x, w, b)), x, w, b)
    ctx = KernelContext(options=Options(autotune=autotune), device=dev, interpret=False,
                        timing_cache=TimingCache(tmp_path))
    kernel = build_gemm(group, ctx)
    if autotune == "fast":
        timed, total = map(int, kernel.config["timed"].split("/"))
        assert timed == total, kernel.config  # no candidate failed to compile or run
    expected, got = group.reference(x, w, b)[0], kernel(x, w, b)[0]
    err = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype], err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_split_epilogue_configs(dtype):
    """Each crowded tile's split-epilogue variant compiles (reshape / permute / split of the MMA
    accumulator) and matches, GELU + residual chain, N not a multiple of the tile."""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.gemm_config import with_split_epilogues
    from compile_backend.options import Options

    dev = torch.device("cuda")
    x, w, b = (randn(300, 768, dtype=dtype, seed=50).to(dev), randn(1000, 768, dtype=dtype, seed=51).to(dev),
               randn(1000, dtype=dtype, seed=52).to(dev))
    group = gemm_group(lambda x, w, b: F.gelu(F.linear(x, w, b)) * 0.5 + 1.0, x, w, b)
    ctx = KernelContext(options=Options(autotune="fast"), device=dev, interpret=False)
    splits = [c for c in with_split_epilogues([GemmConfig(128, 256, 64, num_warps=8), GemmConfig(128, 128, 64, num_warps=4),
                                              GemmConfig(64, 256, 64, num_warps=4)]) if c.epilogue_split == 2]
    expected = group.reference(x, w, b)[0].double()
    for cand in gemm_candidates(group, ctx, configs=splits, vendor=False).candidates:
        got = cand.compile()(x, w, b)[0].double()
        err = ((got - expected).norm() / expected.norm()).item()
        assert err < {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype], (cand.name, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["linear", "a_transposed_b_rowmajor"])
def test_tma_persistent_kernel(layout, dtype, monkeypatch):
    """The persistent TMA variant (tensor descriptors work under the interpreter too): edges in
    M, N and a K tail are zero-filled by the descriptor loads, not masked."""
    if layout == "linear":
        x, w = randn(37, 72, dtype=dtype, seed=43), randn(45, 72, dtype=dtype, seed=44)
        b = randn(45, dtype=dtype, seed=45)
        fn, inputs = (lambda x, w, b: F.silu(F.linear(x, w, b))), (x, w, b)
    else:
        a, b = randn(72, 40, dtype=dtype, seed=46), randn(72, 48, dtype=dtype, seed=47)  # 16-byte rows
        fn, inputs = (lambda a, b: torch.relu(a.t() @ b)), (a, b)
    group = gemm_group(fn, *inputs)
    cfg = GemmConfig(32, 16, 32, num_stages=1, tma=True)
    tuning = gemm_candidates(group, context(), configs=[cfg], tma=True)
    run = tuning.candidates[0].compile()
    from compile_backend.kernels import gemm_tma

    made = []
    real = gemm_tma.tma_descriptors
    monkeypatch.setattr(gemm_tma, "tma_descriptors", lambda *a: made.append(a[3:]) or real(*a))
    expected = group.reference(*inputs)[0]
    torch.testing.assert_close(run(*inputs)[0], expected, **GROUP_TOL[dtype])
    assert made == [(True, True) if layout == "linear" else (False, False)]  # the TMA path ran
    with pytest.raises(ValueError):
        GemmConfig(tma=True, split_k=2)


@pytest.mark.parametrize("level", ["off", "fast"])
def test_candidate_order_on_cuda(level):
    """Which candidate runs untuned on CUDA (the first), decided from the H100 runs in
    benchmarks/notes/gemm.md: cuBLAS + ATen epilogue, unless a dimension is not a multiple of 8
    (cuBLAS is slow there): then the persistent TMA template. Only lists candidates: nothing
    runs, so this needs no GPU."""
    from compile_backend.kernels.base import KernelContext
    from compile_backend.options import Options

    ctx = KernelContext(options=Options(autotune=level), device=torch.device("cuda"), interpret=False)
    for n, first in ((64, "cublas + aten epilogue"), (50, "triton 128x128x64 w8 s4 g8 tma")):
        x, w, b = randn(40, 32, dtype=torch.float16), randn(n, 32, dtype=torch.float16), randn(n, dtype=torch.float16)
        group = gemm_group(lambda x, w, b: F.gelu(F.linear(x, w, b)), x, w, b)
        names = [c.name for c in gemm_candidates(group, ctx, tma=True).candidates]
        assert names[0] == first, names
        assert "cublas + triton epilogue" in names and any(nm.endswith("tma") for nm in names)
        if level == "fast":
            assert any(nm.startswith("triton") and not nm.endswith("tma") for nm in names)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epilogue_computes_the_other_branch_of_a_diamond(dtype):
    """A QAT weight gradient: mm's result masked where the saved weight was representable;
    the mask is computed in the epilogue from the loaded weight and its per-channel scale."""
    g, x = randn(13, 9, dtype=dtype, seed=40), randn(9, 21, dtype=dtype, seed=41)
    w, s = randn(13, 21, dtype=dtype, seed=42), (randn(13, 1, seed=43).abs() * 0.02 + 0.005).to(dtype)
    group = gemm_group(lambda g, x, w, s: torch.where((w / s).abs() <= 127.0, g @ x, torch.scalar_tensor(0.0, dtype=dtype)),
                       g, x, w, s)
    kernel = build_gemm(group, context())
    check_group(kernel, group, [g, x, w, s], dtype)
