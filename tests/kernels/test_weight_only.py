"""Weight-only GEMM kernels (compile_backend/kernels/weight_only.py, issue #20) against the
reference GEMM of ``weight_only_ref`` (``weight_only_mm`` on the unpacked codes).

CPU tensors under the Triton interpreter; odd shapes (M 1/3/17, N 5/33, K 7/64/130: partial
tiles everywhere, odd K for the INT4 pad nibble, a short last scale group), fp16/bf16/fp32
activations with and without bias, INT8 per channel and INT4 with every group size, both paths
forced (the skinny one with split-K, so the partial sums and the second pass run) and as the
heuristic picks them, zero weight groups, and the argument checks.

Tolerances, per output dtype. The kernels dequantize exactly as the reference does (the same
fp32 product, rounded to x's dtype to nearest even), and products of 16-bit operands are exact in
fp32, so only the order of the fp32 sums differs (and, for fp32 x, the rounding of the products):
each order is within gamma ~ (K + 1) * 2**-24 of the exact sum of S = |x| @ |w|^T + |bias|, so
two orders differ by at most 2 * (K + 1) * 2**-24 * S. Then the one rounding to the output dtype
may land on either side of a rounding boundary: one ulp of it, at most ULP[dtype] * |y|, plus
its subnormal spacing TINY[dtype]. Under the interpreter most results are bit-identical.
"""
from __future__ import annotations

import pytest
import torch

from compile_backend.kernels import weight_only_ref as ref
from compile_backend.kernels.weight_only import (CONFIGS, GEMV_MAX_M, SKINNY_MAX_M, WeightOnlyConfig, fits_registers, heuristic,
                                                 weight_only_linear, weight_only_linear_reference)

#: one ulp of the output dtype relative to the value, and its subnormal spacing
ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TINY = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MODES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]
#: (M, N, K): decode, odd K, a partial M block past 16 in both paths
SHAPES = [(1, 33, 130), (3, 5, 7), (17, 33, 64), (17, 5, 130)]
#: small tiles, so several K tiles and split-K slices run even at K = 130
FORCED = {"gemv": WeightOnlyConfig("gemv", 1, 16, 32, split_k=3),
          "skinny": WeightOnlyConfig("skinny", 4, 16, 32, split_k=3),
          "gemv-tc": WeightOnlyConfig("gemv", 1, 16, 32, split_k=3, tensor_cores=True),
          "gemv-u2": WeightOnlyConfig("gemv", 1, 16, 32, split_k=3, unroll=2),  # a step's 2nd tile past a slice's end
          "gemv-tc-u4": WeightOnlyConfig("gemv", 1, 16, 32, split_k=2, tensor_cores=True, unroll=4),
          "tiled": WeightOnlyConfig("tiled", 16, 16, 32, group_m=2),
          "tiled-wf": WeightOnlyConfig("tiled", 16, 16, 32, group_m=2, weights_first=True),
          "dequant": WeightOnlyConfig("dequant", 1, 16, 32)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def operands(m, n, k, dtype, precision, group_size, *, bias=True, seed=0):
    w = torch.randn(n, k, generator=_gen(seed))
    codes, scales = ref.quantize_weight(w, precision, group_size)
    x = torch.randn(m, k, generator=_gen(seed + 1)).to(dtype)
    b = torch.randn(n, generator=_gen(seed + 2)).to(dtype) if bias else None
    return x, codes, scales, b


def check(x, codes, scales, b, precision, group_size, out_dtype=None, config=None):
    got = weight_only_linear(x, codes, scales, b, precision=precision, group_size=group_size,
                             out_dtype=out_dtype, config=config)
    want = weight_only_linear_reference(x, codes, scales, b, precision=precision, group_size=group_size,
                                        out_dtype=out_dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    k = x.shape[-1]
    unpacked = ref.unpack_int4(codes, k) if precision == "int4" else codes
    w = ref.dequantize(unpacked, scales, precision, group_size).to(x.dtype).float()
    s = x.reshape(x.shape[:-1].numel(), k).float().abs() @ w.abs().t() + (b.float().abs() if b is not None else 0.0)
    tol = 2 * (k + 1) * 2.0**-24 * s.reshape(want.shape) + ULP[want.dtype] * want.float().abs() + TINY[want.dtype]
    err = (got.float() - want.float()).abs()
    assert torch.equal(got.isnan(), want.isnan()), "NaN in different places"
    ok = (err <= tol) | want.isnan()
    assert ok.all(), f"{(~ok).sum().item()} outside the tolerance; worst excess {(err - tol).max().item():.3g}"
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["skinny", "tiled", "tiled-wf", "gemv-tc", "gemv-u2", "gemv-tc-u4", "dequant"])
@pytest.mark.parametrize("precision,group_size", MODES, ids=str)
def test_matches_reference(precision, group_size, path, dtype):
    for i, (m, n, k) in enumerate(SHAPES):
        check(*operands(m, n, k, dtype, precision, group_size, bias=i % 2 == 0, seed=i), precision, group_size,
              config=FORCED[path])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("path", ["tiled", "tiled-wf"])
def test_tiled_int4_words(path, dtype):
    """The tiled kernels read INT4 as 16-bit words (K a multiple of 4, 16-bit x): K tiles that end
    inside a word run (K = 100, 68: masked by whole words), every group size; the words variant
    ran (no compiler-failure fallback to the bytes' tile)."""
    from compile_backend.kernels import weight_only

    for i, (m, n, k, group) in enumerate([(17, 33, 100, 32), (19, 5, 68, 64), (3, 40, 132, 128)]):
        check(*operands(m, n, k, dtype, "int4", group, bias=i % 2 == 0, seed=30 + i), "int4", group, config=FORCED[path])
    assert not weight_only._WORDS_UNCOMPILABLE


def test_tiled_words_that_fail_to_compile_fall_back_to_the_bytes_tile(monkeypatch):
    """A words variant the installed Triton cannot compile (Triton 3.6: "Illegal shared layout"
    at some tiles) runs as the bytes' tile, right, and is not tried again in the process."""
    from compile_backend.kernels import weight_only

    real, tried = weight_only._tiled_kernel, []

    class Failing:
        __name__ = real.__name__

        def __getitem__(self, grid):
            def launch(*args, WORDS, **kwargs):
                tried.append(WORDS)
                if WORDS:
                    raise RuntimeError("PassManager::run failed")
                return real[grid](*args, WORDS=WORDS, **kwargs)
            return launch

    monkeypatch.setattr(weight_only, "_tiled_kernel", Failing())
    monkeypatch.setattr(weight_only, "_WORDS_UNCOMPILABLE", set())
    x, codes, scales, b = operands(17, 33, 100, torch.float16, "int4", 32, seed=40)
    for _ in range(2):
        check(x, codes, scales, b, "int4", 32, config=FORCED["tiled"])
    assert tried == [True, False, False]
    assert len(weight_only._WORDS_UNCOMPILABLE) == 1


@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 64)], ids=str)
def test_heuristic_picks_the_path_by_m(precision, group_size):
    assert heuristic(1).path == heuristic(GEMV_MAX_M).path == "gemv"
    assert heuristic(GEMV_MAX_M + 1).path == heuristic(SKINNY_MAX_M).path == "skinny"
    assert heuristic(SKINNY_MAX_M + 1).path == "tiled"
    for m, dtype in ((1, torch.float16), (3, torch.bfloat16), (16, torch.float32), (17, torch.float16)):
        check(*operands(m, 33, 130, dtype, precision, group_size, seed=m), precision, group_size)


def test_split_k_counts():
    """1 slice (no second pass), slices that do not divide the K tiles, more asked than there are tiles."""
    x, codes, scales, b = operands(2, 5, 130, torch.float16, "int4", 32, seed=7)
    for split in (1, 2, 4, 64):
        check(x, codes, scales, b, "int4", 32, config=WeightOnlyConfig("skinny", 2, 16, 16, split_k=split))
        check(x, codes, scales, b, "int4", 32, config=WeightOnlyConfig("gemv", 1, 16, 16, split_k=split))


@pytest.mark.parametrize("path", ["gemv", "skinny", "tiled"])
def test_zero_weight_groups(path):
    """Zero groups have scale 0 and codes 0: the output is exactly the bias where a row is zero."""
    n, k = 5, 130
    w = torch.randn(n, k, generator=_gen(3))
    w[1] = 0.0  # a whole row: int8 scale 0, every int4 group 0
    w[2, 32:64] = 0.0  # one int4 group of 32
    x = torch.randn(17, k, generator=_gen(4)).half()
    b = torch.randn(n, generator=_gen(5)).half()
    for precision, group_size in (("int8", None), ("int4", 32)):
        codes, scales = ref.quantize_weight(w, precision, group_size)
        y = check(x, codes, scales, b, precision, group_size, config=FORCED[path])
        assert torch.isfinite(y).all() and torch.equal(y[:, 1], b[1].expand(17))


def test_leading_dims_views_out_dtype_and_empty():
    x, codes, scales, _ = operands(6, 33, 64, torch.float16, "int4", 32, seed=9)
    b32 = torch.randn(33, generator=_gen(10))  # an fp32 bias with fp16 activations
    y = check(x.reshape(2, 3, 64), codes, scales, b32, "int4", 32, out_dtype=torch.float32)
    assert y.shape == (2, 3, 33) and y.dtype == torch.float32
    xt = torch.randn(64, 3, generator=_gen(11)).to(torch.bfloat16).t()  # strided rows: copied, not misread
    check(xt, codes, scales, None, "int4", 32)
    assert weight_only_linear(x[:0], codes, scales, precision="int4", group_size=32).shape == (0, 33)
    # K = 0 (ref.quantize_weight cannot make it: amax of an empty row): the output is the bias
    e_codes, e_scales = torch.zeros(4, 0, dtype=torch.int8), torch.zeros(4, dtype=torch.float16)
    y0 = weight_only_linear(torch.zeros(3, 0), e_codes, e_scales, torch.arange(4.0), precision="int8")
    assert torch.equal(y0, torch.arange(4.0).expand(3, 4))


def test_every_candidate_config_runs():
    x, codes, scales, b = operands(3, 33, 130, torch.float16, "int4", 64, seed=12)
    for cfg in CONFIGS["skinny"] + CONFIGS["gemv"]:
        check(x, codes, scales, b, "int4", 64, config=cfg)
    x = torch.randn(20, 130, generator=_gen(13)).half()
    for cfg in CONFIGS["tiled"] + CONFIGS["dequant"]:
        check(x, codes, scales, b, "int4", 64, config=cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_wave_int4_configs_read_several_steps_and_stay_int4_only(dtype):
    # K of 2 and a bit steps of unroll x block_k (the last one masked), odd N, no split and split
    # 2; 16-bit x reads the codes as words, fp32 x two codes a byte
    one_wave = [c for c in CONFIGS["gemv"] if c.split_k in (1, 2) and c.unroll >= 8]
    assert len(one_wave) == 3
    x, codes, scales, b = operands(1, 19, 2 * 16 * 32 + 70, dtype, "int4", 32, seed=14)
    for cfg in one_wave:
        check(x, codes, scales, b, "int4", 32, config=cfg)
        assert fits_registers(cfg, "int4")
    # 32768 weights a step (16 x 128 u16): twice an INT8 step's, for INT4's half bytes only
    for cfg in CONFIGS["gemv"]:
        big = cfg.block_n * cfg.block_k * cfg.unroll > 16384
        assert fits_registers(cfg, "int8") == fits_registers(cfg, "float") == (not big)
        assert fits_registers(cfg, "int4")
    assert sum(cfg.block_n * cfg.block_k * cfg.unroll > 16384 for cfg in CONFIGS["gemv"]) == 2


def _bad_calls():
    x = torch.randn(3, 8).half()
    c8, s8 = ref.quantize_weight(torch.randn(4, 8), "int8")
    c4, s4 = ref.quantize_weight(torch.randn(4, 8), "int4", 32)
    return [
        ("precision", dict(x=x, codes=c8, scales=s8, precision="fp8"), "int8 or int4"),
        ("group", dict(x=x, codes=c4, scales=s4, precision="int4", group_size=48), "group_size must be one of"),
        ("int8 group", dict(x=x, codes=c8, scales=s8, precision="int8", group_size=32), "group_size=None"),
        ("x dtype", dict(x=x.double(), codes=c8, scales=s8, precision="int8"), "float16, bfloat16 or float32"),
        ("int8 K", dict(x=x[:, :7], codes=c8, scales=s8, precision="int8"), "int8 codes \\[N, K\\]"),
        ("unpacked int4", dict(x=x, codes=ref.unpack_int4(c4, 8), scales=s4, precision="int4", group_size=32),
         "pack_int4"),
        ("scale dtype", dict(x=x, codes=c8, scales=s8.float(), precision="int8"), "float16 scales of shape \\(4,\\)"),
        ("scale groups", dict(x=x, codes=c4, scales=s4.repeat(1, 2), precision="int4", group_size=32),
         "shape \\(4, 1\\)"),
        ("bias", dict(x=x, codes=c8, scales=s8, bias=torch.zeros(5), precision="int8"), "shape \\(4,\\)"),
        ("out dtype", dict(x=x, codes=c8, scales=s8, precision="int8", out_dtype=torch.int32), "out_dtype"),
        ("device", dict(x=x.to("meta"), codes=c8, scales=s8, precision="int8"), "several devices"),
    ]


@pytest.mark.parametrize("what,kwargs,match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_arguments_are_refused(what, kwargs, match):
    with pytest.raises(ValueError, match=match):
        weight_only_linear(**kwargs)


def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, codes, scales, _ = operands(1, 4, 8, torch.float16, "int8", None)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1.*weight_only_linear_reference"):
        weight_only_linear(x, codes, scales, precision="int8")


@pytest.mark.parametrize("fields,match", [
    (dict(path="wide", block_m=16, block_n=16, block_k=16), "path"),
    (dict(path="tiled", block_m=8, block_n=16, block_k=16), "block_m"),
    (dict(path="skinny", block_m=1, block_n=24, block_k=16), "block_n"),
    (dict(path="tiled", block_m=16, block_n=16, block_k=16, split_k=2), "skinny-path setting"),
    (dict(path="skinny", block_m=16, block_n=64, block_k=128), "at most 16384"),
    (dict(path="skinny", block_m=1, block_n=16, block_k=16, split_k=-1), "split_k"),
    (dict(path="gemv", block_m=2, block_n=16, block_k=16), "block_m"),
    (dict(path="gemv", block_m=1, block_n=64, block_k=256), "at most 8192"),
    (dict(path="gemv", block_m=1, block_n=128, block_k=256, tensor_cores=True), "at most 16384"),
    (dict(path="skinny", block_m=1, block_n=16, block_k=16, tensor_cores=True), "gemv-path setting"),
    (dict(path="gemv", block_m=1, block_n=16, block_k=16, weights_first=True), "tiled-path setting"),
    (dict(path="gemv", block_m=1, block_n=16, block_k=16, unroll=3), "1, 2, 4, 8 or 16"),
    (dict(path="skinny", block_m=1, block_n=16, block_k=16, unroll=2), "gemv-path setting"),
])
def test_config_checks(fields, match):
    with pytest.raises(ValueError, match=match):
        WeightOnlyConfig(**fields)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 128)], ids=str)
def test_gpu_decode_and_prefill_shapes(precision, group_size, dtype):
    """On the GPU (compiled kernels, the heuristic's path and one config of each path) at
    decoder shapes: decode M = 1 and 16 (skinny, split-K), prefill M = 64 (tiled)."""
    for m in (1, 16, 64):
        x, codes, scales, b = (t.cuda() if t is not None else None
                               for t in operands(m, 2048 + 8, 1024 + 64, dtype, precision, group_size, seed=m))
        check(x, codes, scales, b, precision, group_size)
        # every path at every M; tensor-core / weights-first loops and the elementwise / plain ones
        for cfg in (CONFIGS["gemv"][0], CONFIGS["gemv"][-1], CONFIGS["skinny"][0], CONFIGS["tiled"][0],
                    CONFIGS["tiled"][-1], CONFIGS["dequant"][0]):
            check(x, codes, scales, b, precision, group_size, config=cfg)
