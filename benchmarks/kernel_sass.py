"""What our generated GEMM kernels cost per output element on Hopper, read on a machine without a GPU.

Triton compiles for any target where it runs: its wheel ships ``ptxas``, ``cuobjdump`` and
``nvdisasm``. This tool builds a GEMM group's real kernel (the template and epilogue the engine
would launch, for a config named on the command line), compiles it for sm_90 exactly as Triton's
JIT would specialise it for 16-byte aligned arguments, and reports per form (``linear``,
``gelu``, ``gelu_fp8``, ``gelu_int8``: FFN1's epilogue without, with an FP8 and with an INT8
quantize of the next layer's input) the registers, the spill traffic (local stores/loads) and the
SASS instructions the epilogue adds per output element over the plain GEMM (per copy: the
persistent TMA kernel's binary holds its epilogue twice). A GEMM epilogue is straight-line code
over each thread's share of the tile, so that count is what the SMs issue per element after the
main loop: on BERT-base's FFN1 (H100, session 13) FP8's epilogue took ~12 us
of a 27 us kernel at ~46 instructions an element.

Run: ``python -m benchmarks.kernel_sass [--shape M N K] [--forms ...] [--json FILE]``; with
``--gemv N K`` the decode GEMV's main loop instead (SASS instructions per weight, by weight kind);
with ``--conv-tma C HW OC`` the TMA convolution of a 3x3 layer (TMA loads, tensor-core operands).
It uses Triton's JIT binder (``create_function_from_signature``, ``JITFunction._pack_args``), so it
follows the installed Triton's specialisation; checked with Triton 3.9 (another may move them).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch
import torch.nn.functional as F

FORMS = ("linear", "gelu", "gelu_fp8", "gelu_int8")
CONFIGS = {  # name: GemmConfig fields (block_m, block_n, block_k, group_m, split_k, warps, stages, tma)
    "tma128x256w8s3": (128, 256, 64, 8, 1, 8, 3, True),
    "tma128x128w8s4": (128, 128, 64, 8, 1, 8, 4, True),
    "ptr64x128x128w4s4": (64, 128, 128, 8, 1, 4, 4, False),
}


class _Compiled:
    """Stands in for a loaded kernel: ``kernel[grid](*args, **meta)`` compiles it for sm_90 and
    records what ptxas made of it."""

    def __init__(self, fn, sink: List[dict]):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(compile_for_hopper(self.fn, args, kwargs))
        return launch


def tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_for_hopper(fn, args, kwargs) -> Dict[str, object]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([os.path.join(tools_dir(), "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools_dir(), "nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    instructions = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    return {"kernel": fn.__name__, "registers": regs, "stack_bytes": stack,
            "instructions": sum(1 for i in instructions if not re.search(r"\bNOP\b", i)),
            "local_stores": sum(" STL" in i for i in instructions),
            "local_loads": sum(" LDL" in i for i in instructions),
            "mufu": sum("MUFU" in i for i in instructions),
            # asynchronous copies global -> shared (cp.async / TMA): loads Triton's pipeliner
            # keeps in flight in shared memory rather than in registers
            "async_copies": sum(bool(re.search(r"\b(LDGSTS|UBLKCP|UTMALDG)\b", i)) for i in instructions),
            "tma_loads": sum(bool(re.search(r"\bUTMALDG\b", i)) for i in instructions),
            "mma": sum(bool(re.search(r"\b[HQI]GMMA\b", i)) for i in instructions),
            # Hopper's tensor-core GEMM reads its A operand from shared memory (TTGIR: a memdesc)
            # or from registers (after a local_load): a TMA convolution's 2-D patch takes the latter
            "dot_a_shared": bool(re.search(r"warp_group_dot %\S+, %\S+, %\S+ \{[^}]*\} : !ttg\.memdesc",
                                           kernel.asm.get("ttgir", ""))),
            "loop_instructions": longest_loop(sass),
            "loop_sm_clocks": loop_clocks(longest_loop(sass, body=True)),
            # what the main loop spends its instructions on (session 34: bf16 weight-only loops)
            "loop_opcodes": dict(collections.Counter(
                m.group(2) for m in (re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_]+)", t) for t in longest_loop(sass, body=True))
                if m).most_common(12))}


#: warp instructions an SM completes a clock, by SASS opcode (compute capability 9.0, from the
#: CUDA C programming guide's arithmetic throughput table: results a clock / 32; opcodes it does
#: not list are taken as the integer ALU's): fp32 FMA pipe 4, half2 4 (8 results), integer,
#: logic, compare, select and permute 2, conversions and MUFU 0.5, loads and stores 1 (the
#: LSU). Tensor-core and control instructions are not counted.
WARP_RATE = {"FFMA": 4, "FADD": 4, "FMUL": 4, "HFMA2": 4, "HADD2": 4, "HMUL2": 4,
             "I2F": 0.5, "F2I": 0.5, "F2F": 0.5, "I2FP": 0.5, "F2IP": 0.5, "MUFU": 0.5, "POPC": 0.5, "FLO": 0.5,
             "LDG": 1, "LDS": 1, "STS": 1, "STG": 1, "LDSM": 1, "STSM": 1, "SHFL": 1}
_FREE = ("HGMMA", "QGMMA", "IGMMA", "WARPGROUP", "BRA", "BAR", "NOP", "EXIT", "MEMBAR", "FENCE", "DEPBAR", "ELECT",
         "SYNCS", "UMOV", "ULDC", "UIADD3", "USHF", "ULEA", "UIMAD", "ULOP3", "R2UR", "S2UR", "S2R", "CS2R")


def loop_clocks(body: List[str]) -> float:
    """SM clocks one warp's pass through ``body`` occupies its busiest pipes, summed over
    instructions at :data:`WARP_RATE` (an issue model: latencies and dual issue ignored)."""
    clocks = 0.0
    for text in body:
        m = re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_]+)", text)
        op = m.group(2) if m else ""
        if op.startswith(_FREE):
            continue
        clocks += 1.0 / WARP_RATE.get(op, 2)
    return clocks


def longest_loop(sass: str, body: bool = False):
    """Instructions in the longest loop of a disassembly (a branch back to an earlier label):
    a main loop's body, executed once per K step (with ``body``: the instructions' text)."""
    at, labels, pending = [], {}, None
    for line in sass.splitlines():
        label = re.match(r"^\.(L_x_\d+):", line)
        if label:
            pending = label.group(1)
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            at.append((int(m.group(1), 16), m.group(2)))
            if pending:
                labels[pending], pending = at[-1][0], None
    longest: List[str] = []
    for address, text in at:
        target = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", text)
        if target and labels.get(target.group(1), address + 1) < address:
            loop = [t for a, t in at if labels[target.group(1)] <= a <= address]
            longest = loop if len(loop) > len(longest) else longest
    return longest if body else len(longest)


def form_fn(form: str, scaled: bool):
    from compile_backend.kernels import quant_ref

    def tail(y, inv):
        if form == "linear":
            return y
        y = F.gelu(y)
        if form == "gelu":
            return y
        return quant_ref.quantize_steps(quant_ref.eager, y, torch.float16, inv, form.split("_")[1])

    if scaled:
        return lambda xq, xs, wq, ws, b, inv: tail(
            torch.ops.compile_backend.scaled_mm(xq, xs, wq, ws, b, torch.float16), inv)
    return lambda x, w, b, inv: tail(F.linear(x, w, b), inv)


def kernels_of(form: str, operands: str, m: int, n: int, k: int, cfg, quant_gelu: str = "tanh") -> List[dict]:
    """Build the group's candidate for ``cfg`` as on a GPU and run it once on CPU tensors: each
    launch compiles for sm_90 instead. ``quant_gelu``: as ``Options.quant_gelu`` (a GELU only a
    quantize reads takes its tanh form on the tanh unit, fx_passes.quant_math)."""
    from compile_backend import ops  # noqa: F401  (registers compile_backend::scaled_mm)
    from compile_backend.fx_passes import PassContext
    from compile_backend.fx_passes.quant_math import approximate_before_quantize
    from compile_backend.kernels import gemm, gemm_template, qgemm, quant_ref
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.template import traced_group
    from compile_backend.options import Options

    sink: List[dict] = []
    load, dot_fields = gemm_template.load_kernel, gemm_template.dot_fields
    # the GPU's kernels: the dot as compiled there (the CPU context would pick the interpreter's)
    gemm_template.load_kernel = lambda source, name: _Compiled(load(source, name), sink)
    gemm_template.dot_fields = lambda operand, tf32, interpret, int_acc: dot_fields(operand, tf32, False, int_acc)
    try:
        ctx = KernelContext(options=Options(), device=torch.device("cpu"), interpret=False)
        inv = torch.tensor(20.0)
        if operands == "fp16":
            inputs = (torch.randn(m, k, dtype=torch.float16), torch.randn(n, k, dtype=torch.float16),
                      torch.randn(n, dtype=torch.float16), inv)
            group = traced_group(form_fn(form, False), inputs, "gemm", "addmm")
            if quant_gelu == "tanh":
                approximate_before_quantize(group.gm, PassContext())
            tuning = gemm.gemm_candidates(group, ctx, vendor=False, configs=[cfg], tma=cfg.tma)
        else:
            x, w = torch.randn(m, k), torch.randn(n, k) / k ** 0.5
            xs = quant_ref.scale_from_amax(x.abs().amax(), operands)
            wq, ws = quant_ref.quantize_weight(w, operands, True)
            inputs = (quant_ref.quantize(x, xs, operands), xs, wq, ws, torch.randn(n, dtype=torch.float16), inv)
            group = traced_group(form_fn(form, True), inputs, "gemm", "scaled_mm")
            if quant_gelu == "tanh":
                approximate_before_quantize(group.gm, PassContext())
            tuning = qgemm.scaled_mm_candidates(group, ctx, vendor=False, configs=[cfg])
        tuning.candidates[0].compile()(*tuning.make_inputs())
    finally:
        gemm_template.load_kernel, gemm_template.dot_fields = load, dot_fields
    return sink


def conv_tma_rows(c: int, hw: int, oc: int, kinds=("int8", "fp8", "fp16")) -> List[dict]:
    """The TMA convolution (``kernels/conv_tma.py``) of a 3x3 pad-1 layer (``c`` -> ``oc``
    channels over an ``hw`` x ``hw`` map, its bias and ReLU) per operand kind (``kinds``), stride
    (1; 2: a 5-D box over the pixel pairs) and patch kind,
    compiled for sm_90: registers, spills, TMA loads (UTMALDG), tensor-core instructions, and
    whether the input tile reaches the tensor cores from shared memory (a row patch's) or through
    registers (a 2-D patch's: Triton reshapes it there)."""
    from compile_backend import ops  # noqa: F401  (registers compile_backend::scaled_conv)
    from compile_backend.kernels import conv, gemm_template, qconv, qgemm, quant_ref
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.conv_tma import ConvTmaConfig
    from compile_backend.kernels.template import traced_group
    from compile_backend.options import Options

    sink: List[dict] = []
    load, dot_fields, scaled_dot = gemm_template.load_kernel, gemm_template.dot_fields, qgemm.scaled_dot_fields
    gemm_template.load_kernel = lambda source, name: _Compiled(load(source, name), sink)
    gemm_template.dot_fields = lambda operand, tf32, interpret, int_acc: dot_fields(operand, tf32, False, int_acc)
    qconv.scaled_dot_fields = lambda dtype, interpret, accumulation="tile": scaled_dot(dtype, False, accumulation)
    cl = torch.channels_last
    rows = []
    try:
        ctx = KernelContext(options=Options(), device=torch.device("cpu"), interpret=False)
        x, w = torch.randn(2, c, hw, hw).contiguous(memory_format=cl), torch.randn(oc, c, 3, 3) / (9 * c) ** 0.5
        b = torch.randn(oc, dtype=torch.float16)
        for operands in kinds:
            for stride, patch in ((1, (1, 64)), (1, (8, 16)), (2, (1, 64)), (2, (8, 8))):
                bk = min(64 if operands == "fp16" else 128, c)
                cfg = ConvTmaConfig(*patch, 128, bk, 4 if patch[0] * patch[1] <= 64 else 8, 4)
                if operands == "fp16":
                    inputs = (x.half(), w.half().contiguous(memory_format=cl), b)
                    group = traced_group(lambda x, w, b, s=stride: torch.relu(F.conv2d(x, w, b, s, 1)), inputs, "conv",
                                         "convolution")
                    tuning = conv.conv_candidates(group, ctx, vendor=False, configs=[], tma_configs=[cfg])
                else:
                    xs = quant_ref.scale_from_amax(x.abs().amax(), operands)
                    wq, ws = quant_ref.quantize_weight(w, operands, True)
                    inputs = (quant_ref.quantize(x, xs, operands), xs, wq.contiguous(memory_format=cl), ws, b)
                    group = traced_group(lambda xq, xs, wq, ws, b, s=stride: torch.relu(torch.ops.compile_backend.scaled_conv(
                        xq, xs, wq, ws, b, [s, s], [1, 1], [1, 1], 1, torch.float16)), inputs, "conv", "scaled_conv")
                    tuning = qconv.scaled_conv_candidates(group, ctx, vendor=False, configs=[], gemm_configs=[],
                                                          tma_configs=[cfg])
                (cand,) = [t for t in tuning.candidates if t.config.get("conv_tma")]
                cand.compile()(*inputs)
                rows.append({"operands": operands, "stride": stride, "patch": list(patch), "config": cfg.name,
                             **sink[-1]})
    finally:
        gemm_template.load_kernel, gemm_template.dot_fields, qconv.scaled_dot_fields = load, dot_fields, scaled_dot
    return rows


def gemv_rows(n: int, k: int, kinds=("int4", "int8", "float"), configs=None,
              x_dtype: torch.dtype = torch.float16) -> List[dict]:
    """The decode GEMV (``kernels/gemv.py``, M = 1) for INT4 (group 128), INT8 and fp16 weights,
    elementwise and tensor-core loops: main-loop SASS instructions per weight. At the H200's
    4.8 TB/s an INT4 weight (half a byte) leaves an SM ~3.5 issue slots (132 SMs x 128 lanes x
    1.98 GHz / 9.6e12 weights/s); more and the GEMV is bound by instructions, not bytes.
    ``configs`` (default: one elementwise and two tensor-core loops) are then named in full.
    ``x_dtype``: the activations' (bf16: session 34's bf16 dequantize)."""
    from compile_backend.kernels import gemm_template, gemv, weight_only_ref
    import triton

    from compile_backend.kernels.weight_only import WeightOnlyConfig

    sink: List[dict] = []
    load = gemm_template.load_kernel
    gemm_template.load_kernel = lambda source, name: _Compiled(load(source, name), sink)
    rows = []
    try:
        x, w = torch.randn(1, k, dtype=x_dtype), torch.randn(n, k)
        named = configs is not None
        # the tuner's elementwise and tensor-core candidates (weight_only.CONFIGS["gemv"])
        # the third: tensor cores at 4 stages, its weight loads pipelined through shared memory
        configs = configs or (WeightOnlyConfig("gemv", 1, 32, 128, num_stages=1, waves=8, unroll=2),
                              WeightOnlyConfig("gemv", 1, 64, 128, num_stages=1, waves=8, tensor_cores=True),
                              WeightOnlyConfig("gemv", 1, 64, 128, num_stages=4, waves=2, tensor_cores=True))
        for weights in kinds:
            for cfg in configs:
                gemv.plain_kernel.cache_clear()
                out = torch.empty(1, n, dtype=x_dtype)
                if weights == "float":
                    gemv.launch(gemv.plain_kernel(x.dtype, out.dtype), [x], w.to(x_dtype), None, None, [], [out],
                                weights="float", group=1, config=cfg, x_dtype=x.dtype)
                else:
                    codes, scales = weight_only_ref.quantize_weight(w, weights, 128 if weights == "int4" else None)
                    gemv.gemv(x, codes, scales, None, out, int4=weights == "int4", group=128, config=cfg)
                r = sink[-1]
                per_thread = cfg.block_n * cfg.block_k * cfg.unroll / (32 * cfg.num_warps)
                weight_bytes = {"int4": 0.5, "int8": 1.0, "float": 2.0}[weights]
                # the weight bytes a second the issue model lets 132 SMs at 1.755 GHz stream
                issue_tb_s = 132 * 1.755e9 * per_thread * 32 / r["loop_sm_clocks"] * weight_bytes / 1e12
                loop = ("elementwise" if not cfg.tensor_cores else "tensor cores"
                        + (f" {cfg.num_stages} stages" if cfg.num_stages > 1 else ""))
                if named:
                    loop += f" {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} split{cfg.split_k} u{cfg.unroll}"
                rows.append({"weights": weights, "x": str(x_dtype).split(".")[-1], "loop": loop, "shape": [n, k],
                             "target": "sm_90",
                             "triton": triton.__version__, "torch": torch.__version__, **r,
                             "instructions_per_weight": round(r["loop_instructions"] / per_thread, 2),
                             "issue_bound_tb_s": round(issue_tb_s, 2)})
    finally:
        gemm_template.load_kernel = load
        gemv.plain_kernel.cache_clear()
    return rows


def gemv_norm_rows(n: int, k: int) -> List[dict]:
    """The fused decode GEMV with Llama's RMS norm as its x prologue (``kernels/gemv_prologue``),
    M = 1, INT4 (group 128) and INT8 weights, fp16 and bf16 x, the elementwise 32 x 128 loop
    (unroll 2): main-loop SASS with the norm's factor deferred (fp16: w * h unrounded, in fp32)
    and with the row loop (deferral turned off), as the engine would build each."""
    import triton

    import compile_backend.ops  # noqa: F401  (registers compile_backend::weight_only_linear)
    from compile_backend import Options
    from compile_backend.kernels import gemm_template, gemv_prologue, weight_only_ref
    from compile_backend.kernels.base import KernelContext
    from compile_backend.kernels.template import traced_group
    from compile_backend.kernels.weight_only_build import weight_only_candidates

    def normed(h, codes, scales, w, precision, group):
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = w.to(h.dtype) * h32.to(h.dtype)
        return torch.ops.compile_backend.weight_only_linear(x, codes, scales, None, precision, group)

    sink: List[dict] = []
    load, deferral = gemm_template.load_kernel, gemv_prologue._Writer._deferred_factor
    gemm_template.load_kernel = lambda source, name: _Compiled(load(source, name), sink)
    ctx = KernelContext(options=Options(autotune="off"), device=torch.device("cpu"), interpret=False)
    rows = []
    try:
        for weights, group in (("int4", 128), ("int8", None)):
            codes, scales = weight_only_ref.quantize_weight(torch.randn(n, k), weights, group)
            for dtype in (torch.float16, torch.bfloat16):
                inputs = (torch.randn(1, k).to(dtype), codes, scales, torch.linspace(0.5, 1.5, k))
                for prologue in ("deferred", "row loop"):
                    gemv_prologue._Writer._deferred_factor = deferral if prologue == "deferred" else (lambda *a: None)
                    group_ = traced_group(lambda h, c, s, w: normed(h, c, s, w, weights, group), inputs,
                                          "gemm", "weight_only_linear")
                    name = f"triton fused gemv {weights} 32x128 split0 waves8 w4 s1 u2"
                    cand = next(c for c in weight_only_candidates(group_, ctx).candidates if c.name == name)
                    cand.compile()(*inputs)
                    r = sink[-1]
                    rows.append({"weights": weights, "x": str(dtype).split(".")[-1], "prologue": prologue,
                                 "shape": [n, k], "target": "sm_90", "triton": triton.__version__,
                                 "torch": torch.__version__, **r})
    finally:
        gemm_template.load_kernel, gemv_prologue._Writer._deferred_factor = load, deferral
    return rows


def main(argv=None) -> int:
    from compile_backend.kernels.gemm_config import GemmConfig

    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_sass", description=__doc__.split("\n")[0])
    p.add_argument("--shape", nargs=3, type=int, default=[2048, 3072, 768], metavar=("M", "N", "K"))
    p.add_argument("--forms", nargs="*", default=list(FORMS), choices=FORMS)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--operands", nargs="*", default=["fp16", "fp8"], choices=("fp16", "fp8", "int8"))
    p.add_argument("--gemv", nargs=2, type=int, metavar=("N", "K"),
                   help="instead: the decode GEMV's main loop per weight at [N, K] (e.g. 5632 2048)")
    p.add_argument("--gemv-int4", nargs=2, type=int, metavar=("N", "K"),
                   help="the INT4 decode GEMV's elementwise loops at the tuner's words configs "
                        "(16x128 w4 split1 u8, 32x128 u4, 64x128 u2)")
    p.add_argument("--gemv-x", choices=("float16", "bfloat16"), default="float16",
                   help="with --gemv / --gemv-int4: the activations' dtype")
    p.add_argument("--gemv-norm", nargs=2, type=int, metavar=("N", "K"),
                   help="instead: the decode GEMV with an RMS norm prologue, its factor deferred or the row loop")
    p.add_argument("--conv-tma", nargs=3, type=int, metavar=("C", "HW", "OC"),
                   help="instead: the TMA convolution of a 3x3 layer C -> OC over an HW x HW map (e.g. 64 56 64)")
    p.add_argument("--fp8-cast", choices=("this-torch", "nan"), default="this-torch",
                   help="nan: generate as for a torch whose fp32 -> fp8 cast makes overflow NaN (torch "
                        "2.11, the GPU image's: FP8 conversions then carry an overflow guard)")
    p.add_argument("--quant-gelu", choices=("tanh", "exact"), default="tanh",
                   help="a GELU only a quantize reads: as Options.quant_gelu (default tanh: the tanh unit)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.fp8_cast == "nan":
        from compile_backend.kernels import expr_casts
        expr_casts.fp8_saturates = lambda: False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_sass: compiles for the GPU; run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(tools_dir(), "ptxas")):
        print(f"kernel_sass: no ptxas in {tools_dir()} (this Triton wheel ships none)", file=sys.stderr)
        return 2
    if args.conv_tma:
        rows = conv_tma_rows(*args.conv_tma, kinds=args.operands)
        for r in rows:
            print(f"conv tma {r['operands']:5s} stride {r['stride']} {r['config']:26s} regs {r['registers']:3d} spill st/ld "
                  f"{r['local_stores']}/{r['local_loads']} TMA loads {r['tma_loads']} tensor-core ops {r['mma']} "
                  f"A from {'shared memory' if r['dot_a_shared'] else 'registers'}", flush=True)
        return write_json(args.json, rows)
    if args.gemv_norm:
        rows = gemv_norm_rows(*args.gemv_norm)
        for r in rows:
            print(f"gemv {r['weights']:5s} {r['x']:9s} norm {r['prologue']:9s} regs {r['registers']:3d} instructions "
                  f"{r['instructions']:5d} loop {r['loop_instructions']:4d} issue-model clocks {r['loop_sm_clocks']}",
                  flush=True)
        return write_json(args.json, rows)
    if args.gemv or args.gemv_int4:
        if args.gemv:
            rows = gemv_rows(*args.gemv, x_dtype=getattr(torch, args.gemv_x))
        else:
            from compile_backend.kernels.weight_only import WeightOnlyConfig

            rows = gemv_rows(*args.gemv_int4, kinds=("int4",), configs=(
                WeightOnlyConfig("gemv", 1, 16, 128, 1, num_warps=4, num_stages=1, unroll=8),
                WeightOnlyConfig("gemv", 1, 32, 128, num_warps=8, num_stages=1, unroll=4),
                WeightOnlyConfig("gemv", 1, 64, 128, num_warps=4, num_stages=1, unroll=2),
                WeightOnlyConfig("gemv", 1, 64, 128, num_warps=2, num_stages=1),
                WeightOnlyConfig("gemv", 1, 64, 128, num_warps=2, num_stages=1, tensor_cores=True)),
                x_dtype=getattr(torch, args.gemv_x))
        for r in rows:
            print(f"gemv {r['weights']:5s} x {r['x']:8s} {r['loop']:21s} regs {r['registers']:3d} async copies {r['async_copies']:2d} "
                  f"loop {r['loop_instructions']:4d} "
                  f"SASS = {r['instructions_per_weight']} a weight; the issue model's bound "
                  f"{r['issue_bound_tb_s']} TB/s of weights (H200 copy: ~4.8)", flush=True)
        return write_json(args.json, rows)
    m, n, k = args.shape
    rows = []
    for cname in args.configs:
        fields = CONFIGS[cname]
        for operands in args.operands:
            if operands != "fp16" and fields[7]:
                continue  # the 8-bit GEMMs' TMA configs are tuned at "max" only: not shown
            cfg = GemmConfig(*fields[:2], max(fields[2], 32 if operands != "fp16" else 16), *fields[3:7], tma=fields[7])
            base = None
            per_thread = cfg.block_m * cfg.block_n // (32 * cfg.num_warps)
            # the persistent TMA kernel's flattened tile loop is pipelined with one peeled
            # iteration: its epilogue is in the binary twice (GELU's one MUFU an element shows it)
            copies = 2 if cfg.tma else 1
            for form in args.forms:
                (r,) = kernels_of(form, operands, m, n, k, cfg, args.quant_gelu)
                base = r if form == "linear" else base
                extra = None if base is None else round((r["instructions"] - base["instructions"]) / per_thread / copies, 1)
                if form == "gelu" and base is not None and r["mufu"] - base["mufu"] != copies * per_thread:
                    print(f"kernel_sass: {cname}: {r['mufu'] - base['mufu']} MUFU for GELU, expected {copies} "
                          f"epilogue copies x {per_thread} elements: the per-element counts may be off", file=sys.stderr)
                row = {"config": cname, "operands": operands, "form": form, "shape": [m, n, k], **r,
                       "epilogue_copies": copies, "epilogue_instructions_per_element": extra}
                rows.append(row)
                print(f"{cname:18s} {operands:5s} {form:10s} regs {r['registers']:3d} stack {r['stack_bytes']:4d} "
                      f"spill st/ld {r['local_stores']:3d}/{r['local_loads']:3d} SASS {r['instructions']:6d}"
                      + ("" if extra is None else f"  epilogue +{extra} / element"), flush=True)
    return write_json(args.json, rows)


def write_json(path, rows) -> int:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
