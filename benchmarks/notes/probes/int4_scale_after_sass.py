"""Offline sm_90 SASS: the INT4 words tensor-core GEMV loop (M = 1) in bf16, today's words_dots
(dequantize with the scale in PTX, fp32 route) against a scale-after-the-dot form: (q - 8) exact in
bf16 (lop3 under 0x4300 + sub.rn.bf16x2: weight_only_parts.words_to_codes, since integrated), one dot
per step (a step inside one group), then part += dot * scale. fp16's unscaled form stays here
(the engine keeps fp16's measured per-weight form)."""
import sys
import triton
import triton.language as tl
import torch
from compile_backend.kernels.weight_only_parts import dot_column, words_dots, words_to_codes
from benchmarks.kernel_sass import compile_for_hopper, longest_loop

_Q_PAIRS_F16 = tl.constexpr("""{
.reg .b32 s, m, n, o, p;
mov.b32 m, 0x000F000F;
mov.b32 n, 0x00F000F0;
mov.b32 o, 0x64086408;
mov.b32 p, 0x54805480;
shr.b32 s, $4, 8;
lop3.b32 $0, $4, m, o, 0x6a;
lop3.b32 $1, $4, n, p, 0x6a;
lop3.b32 $2, s, m, o, 0x6a;
lop3.b32 $3, s, n, p, 0x6a;
sub.rn.f16x2 $0, $0, o;
sub.rn.f16x2 $1, $1, p;
sub.rn.f16x2 $2, $2, o;
sub.rn.f16x2 $3, $3, p;
}""")


@triton.jit
def words_q16(words):
    return tl.inline_asm_elementwise(_Q_PAIRS_F16, "=r,=r,=r,=r,r", [words],
                                     dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def gemv_k(X, W, S, OUT, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AFTER: tl.constexpr, DT: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    KQ: tl.constexpr = BLOCK_K // 4
    part = tl.zeros([BLOCK_N, 16], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rq = k0 // 4 + tl.arange(0, KQ)
        words = tl.load(W + rn[:, None] * (K // 4) + rq[None, :]).to(tl.uint16, bitcast=True)
        scale = tl.load(S + rn * (K // 128) + k0 // 128)[:, None]
        x = tl.load(X + k0 + tl.arange(0, BLOCK_K))
        if AFTER:
            if DT == tl.float16:
                w0, w1, w2, w3 = words_q16(words)
            else:
                w0, w1, w2, w3 = words_to_codes(words, tl.bfloat16, True)
            x_b0, x_b1 = tl.split(tl.reshape(x, [KQ, 2, 2]))
            x0, x2 = tl.split(x_b0)
            x1, x3 = tl.split(x_b1)
            d = tl.zeros([BLOCK_N, 16], tl.float32)
            d = dot_column(w0, x0, d, 16, False)
            d = dot_column(w1, x1, d, 16, False)
            d = dot_column(w2, x2, d, 16, False)
            d = dot_column(w3, x3, d, 16, False)
            part += d * scale.to(tl.float32)
        else:
            part = words_dots(part, tl.reshape(words, [BLOCK_N, 1, KQ]), tl.reshape(scale, [BLOCK_N, 1, 1]), x, 1,
                              DT, True, False)
    acc = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, part, 0.0), axis=1)
    tl.store(OUT + rn, acc.to(DT))


N, K = 11264, 2048
import itertools
for dt, after, (bn, bk) in itertools.product((torch.float16, torch.bfloat16), (False, True), ((64, 128), (128, 128))):
        tdt = tl.float16 if dt == torch.float16 else tl.bfloat16
        args = (torch.empty(K, dtype=dt), torch.empty(N, K // 4, dtype=torch.int16),
                torch.empty(N, K // 128, dtype=torch.float16), torch.empty(N, dtype=dt), N, K)
        r = compile_for_hopper(gemv_k, args, dict(BLOCK_N=bn, BLOCK_K=bk, AFTER=after, DT=tdt, num_warps=4))
        print(dt, after, bn, bk, r["registers"], r.get("loop_instructions"), r.get("loop_sm_clocks"), round(r.get("loop_instructions") / (bn * bk / 128), 2), flush=True)
