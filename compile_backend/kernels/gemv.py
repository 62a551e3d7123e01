"""The decode GEMV (M <= ``GEMV_MAX_M`` rows; up to 16 on the tensor cores) as one generated
launch (issue #20), for INT8 and INT4 weight-only layers and for float (fp16/bf16/fp32) weights
alike.

A decode step reads every weight once; at batch 1 its layers are short, so launches, not bytes,
decide how close it gets to the weight bandwidth. This kernel does in one launch what took up to
three (the GEMV, the split-K sum, the generated epilogue) plus, where the partitioner fused it, a
fourth (the activation's producer):

* **x prologue** (``gemv_prologue``). ``x_at(m, k)`` computes the activation at its
  coordinates: a load of x, or element-wise ops over loads (SwiGLU's ``silu(gate) * up`` read
  from the gate/up projection's output), each intermediate rounded to its dtype as eager's
  kernels store it; row values (an RMS norm's mean of squares) are loops over the row before
  the main loop, or, where they reach x as one factor (Llama's RMS norm), deferred: x_at
  computes x without the factor, ``x_row_terms`` the reduction's input at the same k, which the
  main loop sums next to x's use (per element of a tile, over the tile after the loop), and the
  factor is computed from the total after the loop (``DEFERRED``).
* **main loop.** BLOCK_N weight rows over one K slice, ``UNROLL`` K tiles a step (their loads
  issued together: the H200 measured these loops bound by the bytes in flight). Weight tiles
  loaded (float, any strides) or dequantized (``weight_only_parts``); INT4 bytes are not
  interleaved (low nibbles meet x's even elements, high nibbles its odd ones); with 16-bit x
  INT4 is read as 16-bit words of four codes (x split four ways to meet them) and INT8 as
  codes, a step's tiles in ONE load (``step_weights``, ``ONE_LOAD``); the first step's load
  comes before the prologue (and a PDL wait), that step peeled off the loop; fp16 weights
  are made from the codes in PTX, two words or four codes a register. Elementwise:
  one row of x per program (grid axis 2), products accumulated in a [BLOCK_N, BLOCK_K] fp32
  tile, summed over K once after the loop. Tensor cores (``DOT``, 16-bit x): weights made from
  their codes' bits in x's dtype, products summed by ``tl.dot`` in fp32 against a [K, 16]
  operand holding x's row in column 0, or (``ROWS`` 16, no row values) 16 rows of x, so
  batch-16 decode reads each weight once.
* **PDL** (``Options.pdl``): the wait for the kernel before comes after the program ids and the
  first step's weight load (``PDL_AFTER``): weights are constants.
* **split-K finish.** Decode has too few N blocks to fill the GPU, so K is cut into slices.
  Each program stores its fp32 partial sums; the last of a tile's programs to arrive (an atomic
  counter per tile, acquire/release) adds all slices in slice order, so the result does not
  depend on the order the programs ran in (bitwise reproducible, unlike fp32 atomics); a
  deferred factor's row sums likewise (after the partials, one per slice and tile). That
  program sets the counter back to 0, so an engine's runner keeps one counter buffer for all
  its launches (:class:`launch.Counters`: no fill per launch, which a decode step's CUDA graph would
  replay 66 times); a launch without one zeroes a fresh buffer.
* **epilogue.** A deferred row factor times the fp32 sums, bias in fp32, the one rounding to the
  output dtype (the anchor's value), then the group's chain (``gemm_template.plan_epilogue``: a
  residual add, the next norm's square) in the (m, n) index space.

Layers: the template and :func:`render` (source), :func:`launch` (checks, allocates, launches),
:func:`gemv` (the plain kernel, no prologue or chain: ``weight_only.weight_only_linear``'s gemv
path); the reference is ``weight_only.weight_only_linear_reference`` (plus the group's ATen
graph for a fused group). This module imports Triton (through ``weight_only_parts``).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import torch
import triton

from . import gemm_template as tpl
from . import pdl
from .base import triton_interpret
from .expr_casts import tl_type
from .launch import Counters, next_pow2
from .weight_only_parts import auto_split, k_slices
from .weight_only_tma import int4_descriptor, int4_step_for, int8_descriptor, int8_step_for, tma_weights_ready
from .gemv_prologue import PLAIN_X, ROW_TOTAL, XPrologue

INT32_MAX = 2**31 - 1
#: the kernel's statements before a PDL launch's wait (``pdl.with_entry``'s ``after``): program
#: ids and indices, then the first step's weight load. Why: a weight-only decode step is ~90
#: GEMVs of a few microseconds, each paying a memory latency before its first bytes arrive; with
#: PDL a kernel's programs are placed while the one before drains, and their first weights
#: (constants) load meanwhile. H100, session 24, 88 INT4 GEMVs in one graph (benchmarks/
#: gemv_chain.py): 6.15 us a launch plain, 5.40 with the first step before the wait, 6.11 with
#: the wait first, 6.80 when a bulk L2 prefetch of the program's rows also went before the wait
#: (the form measured slower in sessions 11-18, removed); the decode step (HF Llama 1.1B, b1):
#: W4A16 0.891 -> 0.788 ms, our FP16 1.276 -> 1.178.
PDL_AFTER = 9
#: elements of a row a prologue's row loop reads per step (registers: 32 a thread at 4 warps)
ROW_BLOCK_MAX = 4096

_TEMPLATE = '''\
import triton
import triton.language as tl
from compile_backend.kernels.weight_only_parts import (codes_to_f32, dot16, dot_column, first_weights, float_weights,
                                                          int4_step, int4_weights, int4_weights16, int8_step, int8_weights,
                                                          int8_weights16, round_to, step_weights, words_dots, words_math)
{helpers}

@triton.jit
def x_at(m, kk, K, {x_params}{row_params}):
    # x[m, kk] in fp32, 0 past K (where the weights are 0 too: no 0 * inf)
    ok = kk < K
{x_body}
    return tl.where(ok, {x_value}, 0.0)


@triton.jit
def x_row_terms(m, kk, K, {x_params}):
{row_terms_body}


@triton.jit
def {name}(
    W, WD, S, BIAS, WS, COUNT, {x_ptrs}, {ptrs},
    M, N, K, K_SLICE, swn, swk, ssn,
    {x_strides}, {strides},
    WEIGHTS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_BLOCK: tl.constexpr, DOT: tl.constexpr,
    ROWS: tl.constexpr, UNROLL: tl.constexpr, ODD_K: tl.constexpr,
    WORDS: tl.constexpr, ONE_LOAD: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)  # ROWS 1: x's row; ROWS 16 (DOT, no row values): rows 16m.. as the dot's columns
    # rows past M read row M - 1 (in bounds); their sums are never stored
    xm = tl.minimum(m * ROWS + tl.arange(0, ROWS), M - 1)[None, :]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k_lo = pid_k * K_SLICE
    k_hi = tl.minimum(k_lo + K_SLICE, K)
    # the first step's weights (ONE_LOAD and TMA loops), before the prologue reads x (and before
    # a PDL launch's wait: weights are constants), so their latency overlaps the prologue's; that
    # step is peeled off the loop (carried through it, the loaded codes went one a register and
    # were packed again for the dequantize: +10-60% instructions, sm_90)
    first_w, first_s = first_weights(W, WD, S, rn, n_ok, k_lo, k_hi, swn, ssn, pid_n * BLOCK_N, WEIGHTS, ONE_LOAD, TMA,
                                     GROUP, BLOCK_N, BLOCK_K, UNROLL)
    STEP: tl.constexpr = BLOCK_K * UNROLL
    # a deferred row factor (gemv_prologue): its reduction's input summed from the x the loop
    # loads, per element of a K tile (of a step where a step is one load: the peeled first step
    # rebinds it), then over the tile after the loop. Summed over the tile every step, it took
    # shuffles and barriers in the loop (32 x 128 u2, sm_90: +3 BAR, +7 SHFL, +19 instructions)
    DEFERRED: tl.constexpr = {deferred}
    # an x with a transcendental (COMPACT_X) made in the INT8 tma loop as [BLOCK_K / XC, XC] rows and
    # flattened where it is used: computed once a step, one element a thread, then spread through
    # shared memory; made flat, Triton placed its math in the products' layout, so each thread row
    # sharing a k redid it (SwiGLU + down, INT8 16 x 512: MUFU 32 -> 8 a step, 9.25 -> 7.39 SASS a
    # weight, sm_90 Triton 3.6; an x loaded as it is pays for the reshape: 5.47 -> 6.31, left flat;
    # INT4's words loop splits x four ways and mostly has it compact already: the same change
    # helped its 16 x 1024 loop and slowed 32 x 512 and 16 x 512, so it is left as it is)
    COMPACT_X: tl.constexpr = {compact_x}
    XC: tl.constexpr = 32 if BLOCK_K >= 32 else BLOCK_K
    if DEFERRED:
        tl.static_assert(ROWS == 1, "a deferred row factor is one row's: one row a program")
        row_acc = tl.zeros([BLOCK_K], tl.float32)
{row_body}
    if DOT:  # 16-bit x: weights in x's dtype, products on the tensor cores (dot_column)
        part = tl.zeros([BLOCK_N, 16], tl.float32)
        if WEIGHTS == 1 and WORDS:  # INT4 as 16-bit words of four codes, a step in one load: four dots a step
            # bf16 with a step inside one group: the group scale applied to the dots' sums, not to
            # each weight (words_dots); fp16 keeps the measured per-weight form
            SCALE_AFTER: tl.constexpr = {x_dtype} == tl.bfloat16 and STEP <= GROUP
            # x: one row [STEP] (column 0 of the dots' operand) or ROWS 16 rows [STEP, 16]
            xk = k_lo + tl.arange(0, STEP)
            xs = x_at(xm, xk[:, None], k_hi, {x_args}{row_params}) if ROWS == 16 else x_at(m, xk, k_hi, {x_args}{row_params})
            if DEFERRED:
                row_acc = x_row_terms(m, xk, k_hi, {x_args})
            part = words_dots(part, first_w, first_s, xs, ROWS, {x_dtype}, not SOFT_BF16, SOFT_BF16, SCALE_AFTER)
            for k_step in range(k_lo + STEP, k_hi, STEP):
                words, scale = step_weights(W, S, rn, n_ok, k_step, k_hi, swn, ssn, WEIGHTS, ONE_LOAD, GROUP, BLOCK_K, UNROLL)
                xk = k_step + tl.arange(0, STEP)
                xs = x_at(xm, xk[:, None], k_hi, {x_args}{row_params}) if ROWS == 16 else x_at(m, xk, k_hi, {x_args}{row_params})
                if DEFERRED:
                    row_acc += x_row_terms(m, xk, k_hi, {x_args})
                part = words_dots(part, words, scale, xs, ROWS, {x_dtype}, not SOFT_BF16, SOFT_BF16, SCALE_AFTER)
        elif WEIGHTS == 1:
            HALF16: tl.constexpr = BLOCK_K // 2
            for k_step in range(k_lo, k_hi, BLOCK_K * UNROLL):
                for u in tl.static_range(UNROLL):  # UNROLL K tiles a step: their loads in flight together
                    k0 = k_step + u * BLOCK_K
                    rb = k0 // 2 + tl.arange(0, HALF16)
                    lo, hi = int4_weights16(W, S, rn, rb, k0, n_ok, k_hi, swn, ssn, GROUP, {x_dtype}, ODD_K)
                    # x read along K in one piece, then split into the even and odd k the low and
                    # high nibbles meet (read at a stride of 2 it took a 2-byte load per element)
                    rk = k0 + tl.arange(0, BLOCK_K)
                    if ROWS == 16:
                        xs = tl.permute(tl.reshape(x_at(xm, rk[:, None], k_hi, {x_args}{row_params}), [HALF16, 2, 16]), (0, 2, 1))
                        x_even, x_odd = tl.split(xs)
                        part = dot16(lo, x_even.to({x_dtype}), part, SOFT_BF16)
                        part = dot16(hi, x_odd.to({x_dtype}), part, SOFT_BF16)
                    else:
                        x_even, x_odd = tl.split(tl.reshape(x_at(m, rk, k_hi, {x_args}{row_params}), [HALF16, 2]))
                        if DEFERRED:
                            row_acc += x_row_terms(m, rk, k_hi, {x_args})
                        part = dot_column(lo, x_even.to({x_dtype}), part, 16, SOFT_BF16)
                        part = dot_column(hi, x_odd.to({x_dtype}), part, 16, SOFT_BF16)
        elif WEIGHTS == 0:
            scale = tl.load(S + rn * ssn, mask=n_ok, other=0.0)[:, None]
            for k_step in range(k_lo, k_hi, BLOCK_K * UNROLL):
                for u in tl.static_range(UNROLL):  # UNROLL K tiles a step: their loads in flight together
                    k0 = k_step + u * BLOCK_K
                    rk = k0 + tl.arange(0, BLOCK_K)
                    w = int8_weights16(W, rn, rk, n_ok, k_hi, swn, scale, {x_dtype}, not SOFT_BF16)
                    if ROWS == 16:
                        part = dot16(w, x_at(xm, rk[:, None], k_hi, {x_args}{row_params}).to({x_dtype}), part, SOFT_BF16)
                    else:
                        part = dot_column(w, x_at(m, rk, k_hi, {x_args}{row_params}).to({x_dtype}), part, 16, SOFT_BF16)
                        if DEFERRED:
                            row_acc += x_row_terms(m, rk, k_hi, {x_args})
        else:
            for k_step in range(k_lo, k_hi, BLOCK_K * UNROLL):
                for u in tl.static_range(UNROLL):  # UNROLL K tiles a step: their loads in flight together
                    k0 = k_step + u * BLOCK_K
                    rk = k0 + tl.arange(0, BLOCK_K)
                    w = tl.load(W + rn[:, None] * swn + rk[None, :] * swk, mask=n_ok[:, None] & (rk < k_hi)[None, :], other=0.0)
                    if ROWS == 16:
                        part = dot16(w.to({x_dtype}), x_at(xm, rk[:, None], k_hi, {x_args}{row_params}).to({x_dtype}), part, SOFT_BF16)
                    else:
                        part = dot_column(w.to({x_dtype}), x_at(m, rk, k_hi, {x_args}{row_params}).to({x_dtype}), part, 16, SOFT_BF16)
                        if DEFERRED:
                            row_acc += x_row_terms(m, rk, k_hi, {x_args})
        if ROWS == 16:
            acc = tl.trans(part)  # [16 rows, BLOCK_N]
        else:
            acc = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, part, 0.0), axis=1)[None, :]  # columns 1.. are 0 * w
    elif WEIGHTS == 1 and TMA:  # INT4 words through WD (16-bit x): U groups of Q words a step
        U: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
        Q: tl.constexpr = (GROUP if BLOCK_K > GROUP else BLOCK_K) // 4
        rk = k_lo + tl.arange(0, BLOCK_K)
        part = words_math(tl.zeros([BLOCK_N, U, Q], tl.float32), first_w, first_s, x_at(m, rk, k_hi, {x_args}{row_params}),
                          {x_dtype}, not SOFT_BF16)
        if DEFERRED:
            row_acc = x_row_terms(m, rk, k_hi, {x_args})
        for k0 in tl.range(k_lo + BLOCK_K, k_hi, BLOCK_K, num_stages=STAGES):
            words, scale = int4_step(WD, S, rn, n_ok, pid_n * BLOCK_N, k0, K, ssn, GROUP, BLOCK_K)
            rk = k0 + tl.arange(0, BLOCK_K)
            part = words_math(part, words, scale, x_at(m, rk, k_hi, {x_args}{row_params}), {x_dtype}, not SOFT_BF16)
            if DEFERRED:
                row_acc += x_row_terms(m, rk, k_hi, {x_args})
    elif WEIGHTS == 1 and WORDS:  # INT4 read as 16-bit words of four codes (16-bit x), a step in one load
        # a step's UNROLL tiles as one [BLOCK_N, UNROLL, BLOCK_K / 4] load, so all its bytes are
        # in flight at once (tiles unrolled one by one, ptxas kept 2-3 of them in flight: each
        # tile's x went through shared memory, and loads stay behind its barriers; sm_90 SASS)
        part = tl.zeros([BLOCK_N, UNROLL, BLOCK_K // 4], tl.float32)
        part = words_math(part, first_w, first_s, x_at(m, k_lo + tl.arange(0, STEP), k_hi, {x_args}{row_params}),
                          {x_dtype}, not SOFT_BF16)
        if DEFERRED:
            row_acc = x_row_terms(m, k_lo + tl.arange(0, STEP), k_hi, {x_args})
        for k_step in range(k_lo + STEP, k_hi, STEP):
            words, scale = step_weights(W, S, rn, n_ok, k_step, k_hi, swn, ssn, WEIGHTS, ONE_LOAD, GROUP, BLOCK_K, UNROLL)
            part = words_math(part, words, scale, x_at(m, k_step + tl.arange(0, STEP), k_hi, {x_args}{row_params}),
                              {x_dtype}, not SOFT_BF16)
            if DEFERRED:
                row_acc += x_row_terms(m, k_step + tl.arange(0, STEP), k_hi, {x_args})
    elif WEIGHTS == 1:  # INT4, two codes a byte
        HALF: tl.constexpr = BLOCK_K // 2
        part = tl.zeros([BLOCK_N, HALF], tl.float32)
        for k_step in range(k_lo, k_hi, BLOCK_K * UNROLL):
            for u in tl.static_range(UNROLL):  # UNROLL K tiles a step: their loads in flight together
                k0 = k_step + u * BLOCK_K
                rb = k0 // 2 + tl.arange(0, HALF)
                lo, hi = int4_weights(W, S, rn, rb, k0, n_ok, k_hi, swn, ssn, GROUP, {x_dtype}, SOFT_BF16, ODD_K)
                x_even, x_odd = tl.split(tl.reshape(x_at(m, k0 + tl.arange(0, BLOCK_K), k_hi, {x_args}{row_params}), [HALF, 2]))
                # two fused multiply-adds into the sums (lo * x + hi * x, then + part, took a
                # multiply, a fused one and an add: 32 of the loop's 529 instructions, sm_90)
                part += lo * x_even[None, :]
                part += hi * x_odd[None, :]
                if DEFERRED:
                    row_acc += x_row_terms(m, k0 + tl.arange(0, BLOCK_K), k_hi, {x_args})
    elif WEIGHTS == 0 and TMA:  # INT8 through WD, a TMA descriptor (16-bit x): see weight_only_tma
        # a shared-memory ring STAGES - 1 steps ahead, each step's math as its bytes land, where
        # the one-load loops do all theirs after the slice's last byte (H100, session 31, plain
        # kernels at M = 1: gate/up 8.85 -> 7.10 us, down 9.64 -> 8.24)
        # x (the prologue's loads and math) one step ahead in registers: pointer loads outside
        # tl.dot are never pipelined, and read in the step they feed, they stalled each step (in
        # the W8A16 step, H100 session 31 run 6: SwiGLU + down's tma loop lost to the one-load
        # loop's 10.9 us, where the plain kernel had won 8.24 against 9.64)
        # the first step (its codes loaded before a PDL launch's wait: first_weights) peeled
        # off: in the W8A16 step the tuner's tma picks (O and gate/up, 0.1-0.2 us faster alone)
        # made the step 5% slower, each losing the one-load loops' early first load (H100,
        # session 32 run 1: 0.885 -> 0.928 ms; session 24: 0.75 us a launch in a chain)
        scale = tl.load(S + rn * ssn, mask=n_ok, other=0.0)[:, None]
        rk = k_lo + tl.arange(0, BLOCK_K)
        xs = x_at(m, rk, k_hi, {x_args}{row_params})
        if DEFERRED:
            row_acc = x_row_terms(m, rk, k_hi, {x_args})
        rk = k_lo + BLOCK_K + tl.arange(0, BLOCK_K)  # the next step's (zeros past the slice: no access)
        xs_next = x_at(m, rk, k_hi, {x_args}{row_params})
        terms = x_row_terms(m, rk, k_hi, {x_args}) if DEFERRED else xs
        part = codes_to_f32(first_w, scale, {x_dtype}, not SOFT_BF16) * xs[None, :]
        xs = xs_next
        for k0 in tl.range(k_lo + BLOCK_K, k_hi, BLOCK_K, num_stages=STAGES):
            rk = k0 + BLOCK_K + tl.arange(0, BLOCK_K)
            if COMPACT_X:
                xs_next = tl.reshape(x_at(m, tl.reshape(rk, [BLOCK_K // XC, XC]), k_hi, {x_args}{row_params}), [BLOCK_K])
            else:
                xs_next = x_at(m, rk, k_hi, {x_args}{row_params})
            w = codes_to_f32(int8_step(WD, pid_n * BLOCK_N, k0, BLOCK_N, BLOCK_K), scale, {x_dtype}, not SOFT_BF16)
            part += w * xs[None, :]
            if DEFERRED:
                row_acc += terms
                terms = x_row_terms(m, rk, k_hi, {x_args})
            xs = xs_next
    elif WEIGHTS == 0 and ONE_LOAD:  # INT8, 16-bit x: a step's tiles in one load (see INT4 words)
        scale = tl.load(S + rn * ssn, mask=n_ok, other=0.0)[:, None, None]
        rk = k_lo + (tl.arange(0, UNROLL) * BLOCK_K)[:, None] + tl.arange(0, BLOCK_K)[None, :]  # [UNROLL, BLOCK_K]
        w = codes_to_f32(first_w, scale, {x_dtype}, not SOFT_BF16)
        part = w * x_at(m, rk, k_hi, {x_args}{row_params})[None, :, :]
        if DEFERRED:
            row_acc = x_row_terms(m, rk, k_hi, {x_args})
        for k_step in range(k_lo + STEP, k_hi, STEP):
            codes, _ = step_weights(W, S, rn, n_ok, k_step, k_hi, swn, ssn, WEIGHTS, ONE_LOAD, GROUP, BLOCK_K, UNROLL)
            rk = k_step + (tl.arange(0, UNROLL) * BLOCK_K)[:, None] + tl.arange(0, BLOCK_K)[None, :]
            w = codes_to_f32(codes, scale, {x_dtype}, not SOFT_BF16)
            part += w * x_at(m, rk, k_hi, {x_args}{row_params})[None, :, :]
            if DEFERRED:
                row_acc += x_row_terms(m, rk, k_hi, {x_args})
    elif WEIGHTS == 0:  # INT8, a scale per row
        part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        scale = tl.load(S + rn * ssn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        for k_step in range(k_lo, k_hi, BLOCK_K * UNROLL):
            for u in tl.static_range(UNROLL):  # UNROLL K tiles a step: their loads in flight together
                k0 = k_step + u * BLOCK_K
                rk = k0 + tl.arange(0, BLOCK_K)
                w = int8_weights(W, rn, rk, n_ok, k_hi, swn, scale, {x_dtype}, SOFT_BF16)
                part += w * x_at(m, rk, k_hi, {x_args}{row_params})[None, :]
                if DEFERRED:
                    row_acc += x_row_terms(m, rk, k_hi, {x_args})
    else:  # float weights
        part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k_step in range(k_lo, k_hi, BLOCK_K * UNROLL):
            for u in tl.static_range(UNROLL):  # UNROLL K tiles a step: their loads in flight together
                k0 = k_step + u * BLOCK_K
                rk = k0 + tl.arange(0, BLOCK_K)
                part += float_weights(W, rn, rk, n_ok, k_hi, swn, swk) * x_at(m, rk, k_hi, {x_args}{row_params})[None, :]
                if DEFERRED:
                    row_acc += x_row_terms(m, rk, k_hi, {x_args})
    if (ONE_LOAD or (TMA and WEIGHTS == 1)) and not DOT:  # [BLOCK_N, steps or groups, K] sums
        acc = tl.sum(tl.sum(part, axis=2), axis=1)[None, :]
    elif not DOT:
        acc = tl.sum(part, axis=1)[None, :]
    rm = m * ROWS + tl.arange(0, ROWS)
    mask = (rm < M)[:, None] & n_ok[None, :]
    last = pid_k == pid_k
    if DEFERRED:
        row_acc = tl.sum(row_acc)  # the slice's part of the row's sum
        {row_total} = row_acc
    if SPLIT > 1:
        ws = WS + rm[:, None] * N + rn[None, :]
        tl.store(ws + pid_k * M * N, acc, mask=mask)
        if DEFERRED:  # the slice's row sum after the partials, [SPLIT, M, grid_n]: each tile reads its own
            row_ws = WS + SPLIT * M * N + m * tl.num_programs(0) + pid_n
            tl.store(row_ws + pid_k * M * tl.num_programs(0), row_acc)
        tl.debug_barrier()  # every thread's partials are written before the release below
        counter = COUNT + m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        last = arrived == SPLIT - 1
        if last:
            tl.store(counter, 0)  # every slice has arrived: the counter is free for the next launch
            acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT):  # unrolled: the loads go out together, not one round trip each
                acc += tl.load(ws + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if DEFERRED:  # in slice order, as the partials: the same bits every run
                {row_total} = tl.load(row_ws, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    {row_total} += tl.load(row_ws + s * M * tl.num_programs(0), cache_modifier=".cg")
    if last:
        if DEFERRED:  # the row factor of x, on the fp32 sums (before the bias and the output's rounding)
{factor_body}
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = round_to(acc, {out_dtype}, SOFT_BF16).to(tl.float32)
{epilogue}
'''


#: the anchor's value (bias added, rounded to the output dtype) stored as it is
PLAIN_EPILOGUE = tpl.EpilogueSpec(lines=("acc_v = acc",), stores=("acc_v",))


def render(x: XPrologue, epilogue: tpl.EpilogueSpec, x_dtype: torch.dtype, out_dtype: torch.dtype,
           helpers: str = "") -> Tuple[str, str]:
    """(source, name) of the fused GEMV; ``helpers``: module-level source the prologue's and the
    epilogue's lines call (``expr.helper_source`` of both sets)."""

    def offset(p: str) -> str:
        return f"rm[:, None] * {p}_s0 + rn[None, :] * {p}_s1"

    ptrs, strides = tpl.io_params(epilogue, 2)
    x_ptrs = [f"P{i}" for i in range(x.loads)]
    x_strides = [f"p{i}_s{d}" for i in range(x.loads) for d in range(2)]
    x_params = ", ".join(f"P{i}, p{i}_s0, p{i}_s1" for i in range(x.loads))
    x_body = [f"r{i} = tl.load(P{i} + m * p{i}_s0 + kk * p{i}_s1, mask=ok, other=0)" for i in range(x.loads)]
    x_body += list(x.lines)
    if x.deferred:
        row_terms_body = ["# the deferred row reduction's input (gemv_prologue) at [m, kk], 0 past K",
                        "ok = kk < K", *x.row_input_lines, f"return tl.where(ok, {x.row_input}, 0.0)"]
        factor_body = [*x.factor_lines, f"acc = acc * {x.factor}"]
    else:
        row_terms_body, factor_body = ["return 0.0  # no deferred row factor: never called (DEFERRED is False)"], ["pass"]
    return tpl.finish(
        _TEMPLATE, "wo_gemv", helpers=helpers or epilogue.helpers, x_params=x_params,
        x_body="\n".join("    " + line for line in x_body), x_value=x.value, x_ptrs=", ".join(x_ptrs),
        x_strides=", ".join(x_strides), x_args=x_params, ptrs=ptrs, strides=strides,
        x_dtype=tl_type(x_dtype), out_dtype=tl_type(out_dtype),
        row_params="".join(", " + a for a in x.row_args),
        row_body="\n".join("    " + line for line in x.row_lines) or "    pass",
        deferred=str(x.deferred), compact_x=str(x.transcendental), row_total=ROW_TOTAL, row_terms_body="\n".join("    " + line for line in row_terms_body),
        factor_body="\n".join(" " * 12 + line for line in factor_body),
        epilogue="\n".join(tpl.epilogue_body(epilogue, offset, "mask", " " * 8)))


#: the kernel's WEIGHTS: INT8 codes [N, K] + a scale per row; INT4 codes packed [N, ceil(K / 2)]
#: + a scale per group; float weights W [N, K] of any strides (``mm``'s b transposed)
WEIGHT_KINDS = {"int8": 0, "int4": 1, "float": 2}


def launch(kernel, x_loads: Sequence[torch.Tensor], w: torch.Tensor, scales: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], loads: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], *,
           weights: str, group: int, config, x_dtype: torch.dtype, row_values: bool = False,
           deferred: bool = False, unrounded_x: bool = False, counters: Optional[Counters] = None,
           use_pdl: bool = False) -> None:
    """Launch a rendered kernel. ``x_loads``: the prologue's tensors as [M, K] views; ``w``: codes
    or the float weight as [N, K] (a view); ``weights``: a key of WEIGHT_KINDS; ``loads`` and
    ``outs``: the epilogue's as [M, N] views; ``config``: a gemv ``WeightOnlyConfig`` (block_n,
    block_k, split_k 0 = fill the GPU, warps, waves, tensor_cores), or a tma one (INT8 codes or
    INT4 words streamed through a TMA descriptor, ``num_stages`` the ring's depth + 1);
    ``x_dtype``: the prologue's x dtype (fp16 / bf16: the tensor-core main loop where the config asks for it); ``row_values``:
    the prologue computes row values (an RMS norm's mean of squares, one row a program), else
    the tensor-core loop takes up to 16 rows a program (the weights read once for all);
    ``deferred``: the prologue defers its row factor (``XPrologue.deferred``; implies
    ``row_values``): the split-K workspace also holds each slice's row sums; ``unrounded_x``:
    x's values may exceed x's dtype (``XPrologue.unrounded``): no tensor-core loop;
    ``counters``: the caller's reusable split-K counters (None: a zeroed buffer for this launch);
    ``use_pdl``: the kernel was rendered with ``pdl.with_entry``: launch it with PDL."""
    m, k = x_loads[0].shape
    n = w.shape[0]
    if weights == "int4" and w.shape[1] > 1 and w.stride(1) != 1:
        # the INT4 loops read a row's packed bytes (or words) at unit stride along K
        raise ValueError(f"gemv: INT4 codes with stride {w.stride(1)} along K; pass them row-major "
                         "(weight_only_ref.pack_int4 makes them so)")
    bn = max(16, min(config.block_n, next_pow2(n)))
    if config.path == "tma":
        bk = int4_step_for(config.block_k, k, group) if weights == "int4" else int8_step_for(config.block_k, k)
    else:
        bk = max(16, min(config.block_k, next_pow2(k), group if weights == "int4" else 1 << 30))
    grid_n = triton.cdiv(n, bn)
    dot = uses_tensor_cores(config, x_dtype, weights, bk)
    if dot and unrounded_x:
        raise ValueError("gemv: a tensor-core config for an x computed past its dtype's range (an unrounded deferred "
                         "norm factor); the candidates leave these out (gemv_build.GemvPlan.runs)")
    rows = 16 if dot and not (row_values or deferred) else 1
    grid_m = triton.cdiv(m, rows)
    # slices of whole steps (UNROLL tiles): a slice of 2 tiles under UNROLL 4 ran 2 masked tiles'
    # instructions for nothing (the base decoder's qkv at 8 slices: half its loop)
    step = bk * config.unroll
    split = config.split_k or auto_split(grid_n * grid_m, triton.cdiv(k, step), w.device, config.waves, min_tiles=1)
    k_slice, split = k_slices(k, step, split)
    # a deferred factor's row sums after the partials: [split, m, grid_n] (one per tile, so the
    # tile's last program reads what its own slices wrote before their release)
    workspace = split * m * (n + (grid_n if deferred else 0))
    if max((n - 1) * w.stride(0) + (w.shape[1] - 1) * w.stride(1) + 1, workspace,
           *(t.stride(0) * m for t in x_loads)) > INT32_MAX:
        raise ValueError("weight_only_linear: an operand (or the split-K workspace) has 2**31 elements or more; "
                         "split the call or lower split_k (the kernels index in 32 bits)")
    if split > 1:
        ws = torch.empty(workspace, dtype=torch.float32, device=w.device)
        count = (counters.get(m * grid_n, w.device) if counters is not None
                 else torch.zeros(m * grid_n, dtype=torch.int32, device=w.device))
    else:
        ws = count = w  # never read with one slice
    io = [*loads, *outs]
    # the tma path's configs (``WeightOnlyConfig.path``): INT8 weights streamed by TMA
    tma = config.path == "tma"
    wd = tma_descriptor(w, k, weights, group, x_dtype, bn, bk) if tma else w
    # INT4 read as 16-bit words (four codes each): 16-bit x, K a multiple of 4, even row stride
    # (the tma loop reads words through its descriptor: its own branch)
    words = (not tma and weights == "int4" and (not dot or bk >= 64) and x_dtype in (torch.float16, torch.bfloat16)
             and k % 4 == 0 and w.stride(0) % 2 == 0 and w.data_ptr() % 2 == 0)
    one_load = not tma and (words or (weights == "int8" and not dot and x_dtype in (torch.float16, torch.bfloat16)))
    kernel[(grid_n, split, grid_m)](
        w, wd, scales if scales is not None else w, bias if bias is not None else w, ws, count, *x_loads, *io,
        m, n, k, k_slice, w.stride(0), w.stride(1), scales.stride(0) if scales is not None else 0,
        *(s for t in [*x_loads, *io] for s in t.stride()),
        WEIGHTS=WEIGHT_KINDS[weights], GROUP=group, HAS_BIAS=bias is not None, SOFT_BF16=triton_interpret(), SPLIT=split,
        BLOCK_N=bn, BLOCK_K=bk, ROW_BLOCK=min(next_pow2(k), ROW_BLOCK_MAX),
        DOT=dot, ROWS=rows, UNROLL=config.unroll, ODD_K=k % 2 == 1,
        WORDS=words, ONE_LOAD=one_load,
        TMA=tma, STAGES=config.num_stages, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl.launch_kwargs(use_pdl))


def tma_descriptor(w: torch.Tensor, k: int, weights: str, group: int, x_dtype: torch.dtype, bn: int, bk: int):
    """The TMA descriptor of INT8 codes or packed INT4 codes ``w`` for steps of ``bk`` weights
    (``weight_only_tma.int8_descriptor`` / ``int4_descriptor``); ValueError naming the cause
    where TMA cannot stream them (the tuner then skips the candidate)."""
    if weights not in ("int8", "int4") or x_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gemv: the tma main loop takes INT8 or INT4 codes with 16-bit x, got {weights} weights with "
                         f"{x_dtype} x; use a gemv config")
    int4 = weights == "int4"
    why = tma_weights_ready(w, k, int4, group, bk)
    if why:
        raise ValueError(f"gemv: TMA cannot stream these weights: {why}; use a gemv config")
    return int4_descriptor(w, k, group, bn, bk) if int4 else int8_descriptor(w, k, bn, bk)


def uses_tensor_cores(config, x_dtype: torch.dtype, weights: str, block_k: int) -> bool:
    """Whether a launch takes the tensor-core main loop: asked by the config, 16-bit x, and K
    steps tl.dot takes (INT4's half tiles at least 16 wide)."""
    return (config.tensor_cores and x_dtype in (torch.float16, torch.bfloat16)
            and (weights != "int4" or block_k >= 32))


@functools.lru_cache(maxsize=None)
def plain_kernel(x_dtype: torch.dtype, out_dtype: torch.dtype):
    return tpl.load_kernel(*render(PLAIN_X, PLAIN_EPILOGUE, x_dtype, out_dtype))


def gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
         out: torch.Tensor, *, int4: bool, group: int, config) -> None:
    """``out [M, N] = x [M, K] @ dequantize(codes, scales)^T + bias`` with no prologue or chain
    (operands checked by the caller, ``weight_only.weight_only_linear``)."""
    launch(plain_kernel(x.dtype, out.dtype), [x], codes, scales, bias, [], [out],
           weights="int4" if int4 else "int8", group=group, config=config, x_dtype=x.dtype)


__all__ = ["PDL_AFTER", "PLAIN_EPILOGUE", "WEIGHT_KINDS", "render", "launch", "tma_descriptor",
           "uses_tensor_cores", "plain_kernel", "gemv"]
