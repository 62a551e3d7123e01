"""The TMA-streamed weight-only GEMV (compile_backend/kernels/weight_only_tma.py, issue #20)
against the reference, with test_weight_only's tolerances (only the order of the fp32 sums
differs; under the interpreter most results are bit-identical).

CPU under the interpreter (Triton's interpreter runs tensor descriptors, zeros past the bounds as
TMA does): decode rows M 1/3, N not a multiple of the block (past-N rows read as zeros), K with a
partial last step and a short last INT4 group, INT4 steps of several groups and INT8 steps of
several 256-code boxes (3-D boxes), split-K
(partial sums and ``split_sum``), x by pointer (any row alignment) and by descriptor, fp16/bf16,
with and without bias; the operands it refuses, by name.
GPU: every ``CONFIGS["tma"]`` config and the fused loop's (``ENGINE_TMA_INT8`` / ``_INT4``) at
decoder shapes (compiled, with the PTX dequantize).
"""
from __future__ import annotations

import pytest
import torch

from compile_backend.kernels.weight_only import CONFIGS, WeightOnlyConfig, weight_only_linear

from test_weight_only import check, operands

MODES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]
#: (M, N, K): K a multiple of 32 (INT4's words need it), with steps past K and short groups
SHAPES = [(1, 37, 160), (3, 70, 96), (2, 40, 256)]
#: small blocks and steps: several steps a slice, several slices, a partial block of rows
SMALL = {"split": WeightOnlyConfig("tma", 1, 16, 32, split_k=3, num_stages=3),
         "one-slice": WeightOnlyConfig("tma", 1, 32, 64, split_k=1, num_stages=2),
         "x-tma": WeightOnlyConfig("tma", 1, 16, 64, split_k=2, num_stages=4, tma_x=True),
         # INT4 steps of whole groups (K a multiple of the group; else one group a step)
         "groups": WeightOnlyConfig("tma", 1, 16, 128, split_k=2, num_stages=9),
         "groups-x": WeightOnlyConfig("tma", 1, 16, 256, split_k=1, num_stages=3, tma_x=True)}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("precision,group_size", MODES, ids=str)
def test_tma_gemv_matches_reference(precision, group_size, name, dtype):
    for i, (m, n, k) in enumerate(SHAPES):
        x, codes, scales, b = operands(m, n, k, dtype, precision, group_size, bias=i == 0, seed=7 * i)
        check(x, codes, scales, b, precision, group_size, config=SMALL[name])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("block_k,x_tma", [(512, False), (1024, False), (512, True)])
def test_tma_gemv_int8_steps_of_several_boxes(block_k, x_tma, dtype):
    """INT8 steps past one TMA box (256 codes): [rows, steps / 256, 256] boxes of the codes viewed
    [N, K / 256, 256], K a multiple of 256: a partial last step (K 768 at 512 a step: its second
    box past K reads zeros), a step longer than K (1024 at K 512), split-K, N a partial block."""
    for i, (m, n, k) in enumerate([(1, 37, 768), (3, 20, 512), (2, 33, 1280)]):
        x, codes, scales, b = operands(m, n, k, dtype, "int8", None, bias=i == 0, seed=11 * i)
        cfg = WeightOnlyConfig("tma", 1, 16, block_k, split_k=1 + i % 2, num_stages=3, tma_x=x_tma)
        check(x, codes, scales, b, "int8", None, config=cfg)


def test_int8_steps_past_a_box_need_whole_boxes_of_k():
    """Past 256 codes a step, K must be whole boxes: a config asking more runs 256 there (K 208,
    K 272), the asked step where K is whole boxes, never more than K's next power of two."""
    from compile_backend.kernels.weight_only_tma import int8_step_for, tma_weights_ready

    assert [int8_step_for(1024, k) for k in (208, 272, 512, 768, 5632, 64)] == [256, 256, 512, 1024, 1024, 64]
    codes = torch.zeros(16, 272, dtype=torch.int8)
    assert "multiple of 256" in tma_weights_ready(codes, 272, False, 1, 512)
    assert tma_weights_ready(codes[:, :256], 256, False, 1, 256) == ""


def test_tma_gemv_zero_groups_and_outliers():
    """A zero row group (scale 0) and a group with one outlier: their weights as the reference's."""
    x, codes, scales, b = operands(1, 33, 256, torch.float16, "int4", 64, seed=3)
    w = torch.randn(33, 256, generator=torch.Generator().manual_seed(5))
    w[4, 64:128] = 0.0
    w[9, 0] = 50.0
    from compile_backend.kernels import weight_only_ref as ref

    codes, scales = ref.quantize_weight(w, "int4", 64)
    check(x, codes, scales, b, "int4", 64, config=SMALL["split"])


@pytest.mark.parametrize("precision,group_size,k,match", [
    ("int4", 128, 100, "multiple of 32"),  # K % 4 == 0 but the rows' bytes are not 16-byte multiples
    ("int8", None, 40, "multiple of 16"),
])
def test_tma_gemv_refuses_what_tma_cannot_read(precision, group_size, k, match):
    x, codes, scales, _ = operands(1, 16, k, torch.float16, precision, group_size)
    with pytest.raises(ValueError, match=match):
        weight_only_linear(x, codes, scales, precision=precision, group_size=group_size, config=SMALL["split"])


def test_tma_gemv_pointer_x_takes_an_unaligned_view():
    """x by pointer needs no alignment (a view one column in: 2-byte aligned rows); x through a
    descriptor (``tma_x``) refuses it, naming why."""
    x, codes, scales, b = operands(2, 33, 160, torch.float16, "int8", None, seed=9)
    wide = torch.cat([torch.zeros(2, 1, dtype=x.dtype), x], 1)[:, 1:]  # x's values, rows at an odd offset
    check(wide, codes, scales, b, "int8", None, config=SMALL["split"])
    with pytest.raises(ValueError, match="needed with tma_x"):
        weight_only_linear(wide, codes, scales, precision="int8", config=SMALL["x-tma"])


def test_tma_gemv_refuses_fp32_x():
    x, codes, scales, _ = operands(1, 16, 64, torch.float32, "int8", None)
    with pytest.raises(ValueError, match="fp16/bf16 activations"):
        weight_only_linear(x, codes, scales, precision="int8", config=SMALL["split"])


@pytest.mark.parametrize("fields,match", [
    (dict(path="tma", block_m=1, block_n=16, block_k=32, num_stages=1), "2 or more stages"),
    (dict(path="tma", block_m=1, block_n=16, block_k=32, num_stages=17), "num_stages"),
    (dict(path="gemv", block_m=1, block_n=16, block_k=32, num_stages=9), "num_stages"),
    (dict(path="tma", block_m=1, block_n=128, block_k=256, num_stages=3), "<= 16384"),
    (dict(path="tma", block_m=2, block_n=16, block_k=32, num_stages=3), "block_m"),
    (dict(path="gemv", block_m=1, block_n=16, block_k=32, tma_x=True), "tma-path setting"),
])
def test_tma_config_checks(fields, match):
    with pytest.raises(ValueError, match=match):
        WeightOnlyConfig(**fields)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 128)], ids=str)
def test_gpu_tma_configs(precision, group_size, dtype):
    """Every tuner config of the tma path, compiled, at a decoder shape with a partial row block."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0 or later")
    # K 1088: INT8 steps of 256 at most; K 1280: whole boxes, INT8 steps of 512 and 1024 (3-D boxes)
    for m, k in ((1, 1024 + 64), (3, 1024 + 64), (1, 1024 + 256)):
        x, codes, scales, b = (t.cuda() if t is not None else None
                               for t in operands(m, 2048 + 8, k, dtype, precision, group_size, seed=m))
        for cfg in CONFIGS["tma"]:
            check(x, codes, scales, b, precision, group_size, config=cfg)
        # the fused GEMV's tma loop (gemv.py), the engine's configs
        from compile_backend.kernels import gemv
        from compile_backend.kernels.weight_only import (ENGINE_TMA_INT4, ENGINE_TMA_INT8,
                                                         weight_only_linear_reference)
        from gemv_groups import assert_close

        want = weight_only_linear_reference(x, codes, scales, b, precision=precision, group_size=group_size)
        for cfg in ENGINE_TMA_INT4 if precision == "int4" else ENGINE_TMA_INT8:
            out = torch.empty_like(want)
            gemv.gemv(x, codes, scales, b, out, int4=precision == "int4", group=group_size or 1, config=cfg)
            assert_close(out, want)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("precision,group_size,split_k,k,block_k", [
    ("int8", None, 1, 208, 64), ("int8", None, 2, 208, 64), ("int8", None, 2, 768, 512), ("int8", None, 1, 64, 64),
    ("int4", 64, 1, 320, 128), ("int4", 64, 2, 320, 128), ("int4", 64, 1, 192, 32), ("int4", 32, 1, 96, 128),
    ("int4", 128, 2, 224, 512)], ids=str)
@pytest.mark.parametrize("prologue", ["rms_norm", "swiglu"])
def test_fused_gemv_tma_loop(dtype, precision, group_size, split_k, k, block_k, prologue, monkeypatch):
    """The fused GEMV's tma main loop (gemv.py), its first step loaded before the rest: Llama's
    RMS norm as x's prologue (its factor deferred to the sums) or SwiGLU's product of a gate/up
    output's halves, a residual add after, two rows, one and two K slices (the arrival counter's
    finish). INT8: K 208 (a partial last step), 768 in steps of 512 (two TMA boxes a step, the
    second step's second box past K), 64 (one step: the peeled first, no loop). INT4 (16-bit
    words): steps of whole groups (3-D boxes: 2 groups of 64 a step over 5, a partial last
    step), a step inside a group (32 of 64), K not whole groups (224 at group 128: one group a
    step, the last short), a step past K (96 at 128)."""
    import compile_backend
    from compile_backend.kernels import weight_only
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.select import choose_kernel
    from gemv_groups import assert_close, gemv_group, quantized_weights, rms_norm

    m, n = 2, 33
    gen = torch.Generator().manual_seed(61)
    h, r = (2 * torch.randn(m, k, generator=gen)).to(dtype), torch.randn(m, n, generator=gen).to(dtype)
    nw = torch.linspace(0.5, 1.5, k)
    cfg = WeightOnlyConfig("tma", 1, 16, block_k, split_k=split_k, num_stages=3)
    monkeypatch.setattr(weight_only, "heuristic", lambda m: cfg)  # with tuning off, the first candidate runs
    if prologue == "rms_norm":
        inputs = (h, *quantized_weights(n, k, precision, group_size, seed=62), nw, r)

        def fn(h, c, s, nw, r):
            x = rms_norm(h, nw)
            return torch.ops.compile_backend.weight_only_linear(x, c, s, None, precision, group_size) + r
    else:
        gu = torch.randn(m, 2 * k, generator=gen).to(dtype)
        inputs = (gu, *quantized_weights(n, k, precision, group_size, seed=62), r)

        def fn(gu, c, s, r):
            x = torch.nn.functional.silu(gu[:, :k]) * gu[:, k:]
            return torch.ops.compile_backend.weight_only_linear(x, c, s, None, precision, group_size) + r

    group = gemv_group(fn, inputs)
    ctx = KernelContext(options=compile_backend.Options(autotune="off"), device=torch.device("cpu"), interpret=True)
    kernel, fallbacks = choose_kernel(group, inputs, ctx)
    assert (kernel.impl, fallbacks, kernel.config.get("fused"), kernel.config["path"]) == ("triton", [], True, "tma")
    # SiLU in x: the INT8 loop makes x once a step, compact (gemv_prologue.TRANSCENDENTAL)
    assert f"COMPACT_X: tl.constexpr = {prologue == 'swiglu'}" in kernel.source
    assert_close(kernel(*inputs)[0], group.reference(*inputs)[0])


def test_tma_candidates_by_precision():
    """The tuner's tma candidates: INT8 (K a multiple of 16) and INT4 (of 32) with 16-bit x."""
    from compile_backend.kernels import weight_only

    cpu = torch.device("cpu")
    for dtype in (torch.float16, torch.bfloat16):
        assert weight_only.tma_candidates("int8", 1, dtype, 208, cpu) == weight_only.ENGINE_TMA_INT8
        assert weight_only.tma_candidates("int4", 1, dtype, 224, cpu) == weight_only.ENGINE_TMA_INT4
        assert weight_only.tma_candidates("int8", 1, dtype, 200, cpu) == ()  # K not a multiple of 16
        assert weight_only.tma_candidates("int4", 1, dtype, 208, cpu) == ()  # K not a multiple of 32
        assert weight_only.tma_candidates("int8", weight_only.GEMV_MAX_M + 1, dtype, 208, cpu) == ()
    assert weight_only.tma_candidates("int8", 1, torch.float32, 208, cpu) == ()


def test_fused_gemv_tma_refuses_float_weights():
    from compile_backend.kernels import gemv

    x = torch.randn(1, 64).half()
    with pytest.raises(ValueError, match="INT8 or INT4 codes with 16-bit x"):
        gemv.launch(gemv.plain_kernel(x.dtype, x.dtype), [x], torch.randn(16, 64).half(), None, None, [],
                    [torch.empty(1, 16).half()], weights="float", group=1, config=SMALL["split"], x_dtype=x.dtype)
