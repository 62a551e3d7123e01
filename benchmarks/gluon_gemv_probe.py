"""A probe of the INT4 decode GEMV on the tensor cores with layouts we choose (Gluon), for issue #20.

Why: at M = 1 our INT4 GEMV is bound by its math, not its bytes (session 33, H100: the merged
gate/up takes 10.5 us with its weights and 8.0 with every row read from L1; a copy of its bytes
5.2). Triton's loops spend ~4.3 SASS instructions a weight (the fp16 -> fp32 conversion and an
FFMA per weight, or on the tensor cores the shuffles into ``tl.dot``'s operand layout). Gluon
(``triton.experimental.gluon``, in Triton 3.6 and 3.9) lets the kernel name its layouts: the
weights are loaded straight into the layout ``mma_v2``'s A operand takes (a byte tensor in
``DotOperandLayout(k_width=1)``, whose two nibbles joined are the fp16 operand's k pairs: no
conversion), 16 bytes a thread a group in one load (the codes stored in that order:
:func:`fragment_order`), dequantized by PTX (two codes a LOP3, a subtraction of two), products
on the tensor cores with x in column 0 of B, each group's fp32 partial times its scale.

A program takes 64 rows over a K slice of four groups, all four groups' bytes loaded before any
math, and adds its fp32 sums into a zeroed output (atomics: the probe's split-K finish).
State: **a probe, not a kernel of the engine.** Offline (sm_90, Triton 3.6 and 3.9) a program
issues 3.05 SASS instructions a weight against 4.32 for the engine's elementwise loop
(``--sass``). It has not run on a GPU yet: ``--check`` (CUDA) compares it with the reference and
times it beside ``weight_only_linear`` at the merged gate/up's shape. Its numerics differ from the
reference's in one rounding: the scale multiplies a group's fp32 sum, not each weight in fp16.
Gluon kernels do not run under ``TRITON_INTERPRET=1`` (Triton 3.9: "0 active drivers"), so an
engine kernel built this way needs its Triton loop as CPU reference and fallback.

    PYTHONPATH=. python -m benchmarks.gluon_gemv_probe --sass            # any machine
    PYTHONPATH=. python -m benchmarks.gluon_gemv_probe --check --out F   # a CUDA machine
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from typing import Any, Dict

import torch

GROUP = 128  # codes a scale (the probe's only group size)
BLOCK_N = 64  # weight rows a program: four warps of mma's 16
GROUPS_A_PROGRAM = 4  # a program's K slice: 512 codes, its bytes all loaded before its math
# the dequantize of four code bytes (eight weights) into four fp16 pairs: nibble n -> fp16 bits
# 0x6400 | (n ^ 8) = 1024 + (n ^ 8), less 1032 = the two's complement code; (a & b) ^ c is LOP3 0x6A
_DEQUANT_PTX = """{
    .reg .b32 t0, t1, u0, u1, m;
    mov.b32 m, 0x64086408;
    prmt.b32 t0, $4, 0, 0x4140;
    prmt.b32 t1, $4, 0, 0x4342;
    lop3.b32 $0, t0, 0x000F000F, 0x64086408, 0x6A;
    lop3.b32 $1, t1, 0x000F000F, 0x64086408, 0x6A;
    shr.u32 u0, t0, 4;
    shr.u32 u1, t1, 4;
    lop3.b32 $2, u0, 0x000F000F, 0x64086408, 0x6A;
    lop3.b32 $3, u1, 0x000F000F, 0x64086408, 0x6A;
    sub.f16x2 $0, $0, m;
    sub.f16x2 $1, $1, m;
    sub.f16x2 $2, $2, m;
    sub.f16x2 $3, $3, m;
}"""


def fragment_order(packed: torch.Tensor) -> torch.Tensor:
    """Our packed INT4 codes (uint8 [N, K / 2], ``weight_only_ref.pack_int4``) in the order the
    probe loads them: in each group's 64 bytes of a row, byte 16q + j holds the code pair (k
    pair) 4j + q, so lane q of a quad reads its 16 pairs in one 16-byte load."""
    n, half = packed.shape
    if half % (GROUP // 2):
        raise ValueError(f"fragment_order: K must be a multiple of {GROUP}, got {2 * half}")
    return packed.reshape(n, half // (GROUP // 2), 16, 4).transpose(2, 3).reshape(n, half).contiguous()


def _kernel():
    """The Gluon kernel (built on first use: importing this module imports no Triton)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._layouts import (DistributedLinearLayout, DotOperandLayout,
                                                              NVMMADistributedLayout, SliceLayout)
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    @gluon.jit
    def group_dot(b, xv, s, acc, a8: gl.constexpr, a16: gl.constexpr, mma: gl.constexpr, BLOCK_N: gl.constexpr,
                  GROUP: gl.constexpr, PTX: gl.constexpr):
        # one group: its bytes [row, q, j] back to k pairs (c = 4 j + q), the PTX dequantize, the
        # nibbles joined into the fp16 A operand (k = 2 c + h), the products summed by mma_v2, the
        # group's fp32 sum times its scale
        b = gl.convert_layout(gl.reshape(gl.permute(b, [0, 2, 1]), [BLOCK_N, GROUP // 2]), a8)
        lo, hi = gl.inline_asm_elementwise(PTX, "=r,=r,=r,=r,r", [b], dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=4)
        w = gl.convert_layout(gl.reshape(gl.join(lo, hi), [BLOCK_N, GROUP]), a16)
        part = mma_v2(w, xv, gl.zeros([BLOCK_N, 8], gl.float32, mma))
        return acc + part * s[:, None]

    @gluon.jit
    def int4_gemv_mma(x_ptr, w_ptr, s_ptr, out_ptr, K: gl.constexpr, BLOCK_N: gl.constexpr, GROUP: gl.constexpr,
                      PTX: gl.constexpr, ROW_BYTES: gl.constexpr):
        # a program: BLOCK_N rows over 4 groups (a K slice of 512), all four groups' bytes loaded
        # before any math (16 x 4 bytes a thread in flight: at one program's rows a step, each
        # group would wait a memory latency); the slices' sums added into a zeroed fp32 out
        mma: gl.constexpr = NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
        a16: gl.constexpr = DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        a8: gl.constexpr = DotOperandLayout(operand_index=0, parent=mma, k_width=1)
        b16: gl.constexpr = DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        # a group's bytes of BLOCK_N rows as [row, q, j] (stored at 16 q + j): a8's rows and lanes,
        # j in registers, so a thread's 16 bytes of a row are one load
        ld: gl.constexpr = DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [8, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[BLOCK_N, 4, 16])
        NG: gl.constexpr = K // GROUP
        pid = gl.program_id(0)
        g0 = gl.program_id(1) * 4
        r = gl.arange(0, BLOCK_N, layout=SliceLayout(1, SliceLayout(2, ld)))
        q = gl.arange(0, 4, layout=SliceLayout(0, SliceLayout(2, ld)))
        j = gl.arange(0, 16, layout=SliceLayout(0, SliceLayout(1, ld)))
        # ROW_BYTES = K / 2; 0 reads every row from the first (the math alone: weights from L1)
        w_at = w_ptr + (pid * BLOCK_N + r)[:, None, None] * ROW_BYTES + q[None, :, None] * 16 + j[None, None, :]
        x_at = x_ptr + gl.arange(0, GROUP, layout=SliceLayout(1, b16))
        rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=SliceLayout(1, mma))
        b0 = gl.load(w_at + g0 * (GROUP // 2))
        b1 = gl.load(w_at + (g0 + 1) * (GROUP // 2))
        b2 = gl.load(w_at + (g0 + 2) * (GROUP // 2))
        b3 = gl.load(w_at + (g0 + 3) * (GROUP // 2))
        zx = gl.zeros([GROUP, 8], gl.float16, b16)
        x0 = gl.broadcast(gl.load(x_at + g0 * GROUP)[:, None], zx)[0]
        x1 = gl.broadcast(gl.load(x_at + (g0 + 1) * GROUP)[:, None], zx)[0]
        x2 = gl.broadcast(gl.load(x_at + (g0 + 2) * GROUP)[:, None], zx)[0]
        x3 = gl.broadcast(gl.load(x_at + (g0 + 3) * GROUP)[:, None], zx)[0]
        s_at = s_ptr + rows * NG + g0
        s0 = gl.load(s_at).to(gl.float32)
        s1 = gl.load(s_at + 1).to(gl.float32)
        s2 = gl.load(s_at + 2).to(gl.float32)
        s3 = gl.load(s_at + 3).to(gl.float32)
        acc = gl.zeros([BLOCK_N, 8], gl.float32, mma)
        acc = group_dot(b0, x0, s0, acc, a8, a16, mma, BLOCK_N, GROUP, PTX)
        acc = group_dot(b1, x1, s1, acc, a8, a16, mma, BLOCK_N, GROUP, PTX)
        acc = group_dot(b2, x2, s2, acc, a8, a16, mma, BLOCK_N, GROUP, PTX)
        acc = group_dot(b3, x3, s3, acc, a8, a16, mma, BLOCK_N, GROUP, PTX)
        col = gl.arange(0, 8, layout=SliceLayout(0, mma))
        gl.atomic_add(out_ptr + rows[:, None] + col[None, :] * 0, acc, mask=(col == 0)[None, :])

    return int4_gemv_mma


def sass(k: int = 2048) -> Dict[str, Any]:
    """The probe compiled for sm_90 here (no GPU needed): registers and its loop's SASS a weight."""
    import collections

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from .kernel_sass import tools_dir

    sig = {"x_ptr": "*fp16", "w_ptr": "*u8", "s_ptr": "*fp16", "out_ptr": "*fp16", "K": "constexpr",
           "BLOCK_N": "constexpr", "GROUP": "constexpr", "PTX": "constexpr", "ROW_BYTES": "constexpr"}
    consts = {"K": k, "BLOCK_N": BLOCK_N, "GROUP": GROUP, "PTX": _DEQUANT_PTX, "ROW_BYTES": k // 2}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}  # 16-byte aligned pointers, as torch's
    compiled = triton.compile(GluonASTSource(_kernel(), sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        text = subprocess.run([os.path.join(tools_dir(), "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(tools_dir(), "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    # straight-line code (a program's four groups unrolled): every instruction but NOPs, over the
    # weights a thread covers
    body = [m.group(1) for m in re.finditer(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", text, re.M)]
    body = [t for t in body if not re.match(r"(@!?U?P\w+\s+)?NOP\b", t)]
    per_thread = BLOCK_N * GROUPS_A_PROGRAM * GROUP / 128  # 4 warps
    ops = collections.Counter(re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_]+)", t).group(2) for t in body)
    return {"target": "sm_90", "triton": triton.__version__, "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "instructions": len(body), "instructions_per_weight": round(len(body) / per_thread, 2),
            "by_opcode_per_weight": {o: round(c / per_thread, 2) for o, c in ops.most_common(12)}}


def check(n: int = 11264, k: int = 2048) -> Dict[str, Any]:
    """On CUDA: the probe against the reference (random weights, group 128) and timed beside
    ``weight_only_linear`` (its heuristic config and the tuned engine's pick for the merged gate/up)."""
    from compile_backend.kernels import weight_only_ref as ref
    from compile_backend.kernels.weight_only import WeightOnlyConfig, weight_only_linear

    from .weight_only_bench import graph_time_ms, weight_copies

    if not torch.cuda.is_available():
        raise SystemExit("gluon_gemv_probe --check runs the kernel: it needs a CUDA device (--sass needs none)")
    if n % BLOCK_N or k % (GROUP * GROUPS_A_PROGRAM):
        raise ValueError(f"the probe takes N a multiple of {BLOCK_N} and K of {GROUP * GROUPS_A_PROGRAM}")
    dev = "cuda"
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    codes, scales = ref.quantize_weight(torch.randn(n, k, device=dev) * 0.02, "int4", GROUP)
    want = ref.dequantize(ref.unpack_int4(codes, k), scales, "int4", GROUP).half().float() @ x.float().t()
    kernel = _kernel()
    out = torch.empty(n, dtype=torch.float32, device=dev)
    copies = weight_copies(codes.numel() + scales.numel() * 2)
    sets = [(fragment_order(codes.clone()), scales.clone()) for _ in range(copies)]

    def launch(i, row_bytes=k // 2):
        kernel[(n // BLOCK_N, k // (GROUP * GROUPS_A_PROGRAM))](x, sets[i][0], sets[i][1], out, K=k, BLOCK_N=BLOCK_N,
                                                                 GROUP=GROUP, PTX=_DEQUANT_PTX, ROW_BYTES=row_bytes,
                                                                 num_warps=4)

    def probe(i):  # the zeroing of the slices' sum is part of the call (a launch of its own)
        out.zero_()
        launch(i)

    probe(0)
    torch.cuda.synchronize()
    cos = torch.nn.functional.cosine_similarity(out, want.reshape(-1), dim=0).item()
    ours = [(codes.clone(), scales.clone()) for _ in range(len(sets))]
    row = {"n": n, "k": k, "cosine_vs_reference": cos,
           "max_abs_err": (out - want.reshape(-1)).abs().max().item(),
           "probe_us": graph_time_ms(probe, len(sets)) * 1e3,
           # where the probe's time goes: its kernel alone (the sums pile up: timing only), the
           # zeroing alone, its math alone (every row read from the first: weights from L1), and
           # a production row reduction of the same bytes (torch's sum over int32 words): the
           # time to stream them in a GEMV's shape with next to no math
           "kernel_alone_us": graph_time_ms(launch, len(sets)) * 1e3,
           "zero_alone_us": graph_time_ms(lambda i: out.zero_(), len(sets)) * 1e3,
           "math_alone_us": graph_time_ms(lambda i: launch(i, 0), len(sets)) * 1e3,
           "row_sum_of_bytes_us": graph_time_ms(lambda i: sets[i][0].view(torch.int32).sum(dim=1, dtype=torch.int32),
                                                len(sets)) * 1e3}
    for name, cfg in (("gemv_64x128_w2_us", WeightOnlyConfig("gemv", 1, 64, 128, num_warps=2, num_stages=1)),
                      ("gemv_32x128_u2_us", WeightOnlyConfig("gemv", 1, 32, 128, num_stages=1, unroll=2))):
        row[name] = graph_time_ms(lambda i: weight_only_linear(x, *ours[i], precision="int4", group_size=GROUP,
                                                          config=cfg), len(ours)) * 1e3
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gluon_gemv_probe", description=__doc__.split("\n")[0])
    p.add_argument("--sass", action="store_true", help="compile for sm_90 here and count its loop's SASS")
    p.add_argument("--check", action="store_true", help="CUDA: accuracy against the reference and timings")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    if args.sass:
        rows.append({"part": "sass", **sass()})
    if args.check:
        from compile_backend.bench.results import environment

        rows.append({"part": "check", **check(), **environment("cuda")})
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
