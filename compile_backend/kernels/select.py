"""Kernel selection: which implementation runs each group.

For every group the builders of its kind are tried in order; the first that returns a kernel
is checked once against ATen on the real inputs (``Options.validate``) and kept, otherwise the
group runs through ATen and the report says why. Builders are named by import path so that no
Triton code is imported until a group actually needs it.
"""
from __future__ import annotations

import math

import importlib
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .base import Kernel, KernelContext, KernelGroup, Unsupported, op_name, sha256, triton_enabled

log = logging.getLogger("compile_backend")

#: builders per group kind, tried in order (module:function)
BUILDERS: Dict[str, Tuple[str, ...]] = {
    "gemm": ("compile_backend.kernels.gemm:build_gemm",),
    "grouped_gemm": ("compile_backend.kernels.weight_only_grouped:build_weight_only_grouped_mm",),
    "conv": ("compile_backend.kernels.conv:build_conv",),
    "pointwise": ("compile_backend.kernels.pointwise:build_pointwise",),
    "reduction": ("compile_backend.kernels.reduction:build_reduction",),
    "attention": ("compile_backend.kernels.attention:build_attention",),
    "pool": ("compile_backend.kernels.pool:build_pool", "compile_backend.kernels.avgpool:build_avg_pool"),
}

#: builders of groups anchored on the quantized ops, tried instead of their kind's (by anchor op)
ANCHOR_BUILDERS: Dict[str, Tuple[str, ...]] = {
    "compile_backend.scaled_mm": ("compile_backend.kernels.qgemm:build_scaled_mm",),
    "compile_backend.scaled_conv": ("compile_backend.kernels.qconv:build_scaled_conv",),
    "compile_backend.weight_only_linear": ("compile_backend.kernels.weight_only_build:build_weight_only_linear",),
}

#: the builders that tune, and the function making their candidates (:func:`compile_ahead`)
TUNINGS: Dict[str, str] = {
    "compile_backend.kernels.gemm:build_gemm": "compile_backend.kernels.gemm:gemm_candidates",
    "compile_backend.kernels.conv:build_conv": "compile_backend.kernels.conv:conv_candidates",
    "compile_backend.kernels.qgemm:build_scaled_mm": "compile_backend.kernels.qgemm:scaled_mm_candidates",
    "compile_backend.kernels.qconv:build_scaled_conv": "compile_backend.kernels.qconv:scaled_conv_candidates",
    "compile_backend.kernels.weight_only_build:build_weight_only_linear":
        "compile_backend.kernels.weight_only_build:weight_only_candidates",
}

#: relative error ‖out − ref‖ / ‖ref‖ a generated kernel may show against ATen, per dtype
#: (fp32 GEMMs on tensor cores run in tf32 only when precision allows it)
FP8_OUTPUTS = tuple(d for d in (getattr(torch, "float8_e4m3fn", None),) if d is not None)

VALIDATION_RTOL = {
    torch.float32: 2e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}


def aten_kernel(group: KernelGroup) -> Kernel:
    return Kernel(kind=group.kind, impl="aten", ops=group.ops, fn=group.reference)


def choose_kernel(
    group: KernelGroup, inputs: Sequence[Any], ctx: KernelContext
) -> Tuple[Kernel, List[Dict[str, str]]]:
    """Returns the kernel for ``group`` and the fallback entries explaining any ATen choice."""
    if group.kind == "aten":
        ops = ", ".join(sorted(set(group.ops))) or "?"
        return aten_kernel(group), [{"op": ops, "reason": "no kernel of ours covers this op; runs through ATen"}]
    if not triton_enabled(ctx.device):
        return aten_kernel(group), []
    decision = planned(group, ctx)
    if decision is not None and decision["impl"] == "aten":
        # the cold build of this very graph found no kernel that passed: do not search again
        return aten_kernel(group), [dict(f) for f in decision.get("fallbacks", [])]
    fallbacks: List[Dict[str, str]] = []
    reference: Optional[Tuple[Any, ...]] = None
    for path in builders_for(group):
        try:
            kernel = _load(path)(group, ctx)
        except Unsupported as exc:
            fallbacks.append({"op": _ops(group), "reason": f"{group.kind} kernel: {exc}"})
            continue
        except Exception as exc:  # a builder bug must never take the model down
            log.warning("compile_backend: %s builder failed on %s: %s", group.kind, group.name, exc)
            fallbacks.append({"op": _ops(group), "reason": f"{group.kind} builder error: {type(exc).__name__}: {exc}"})
            continue
        if not ctx.options.validate or _same_as_planned(kernel, decision):
            return kernel, []  # (a planned kernel was validated by the cold build of this graph)
        if reference is None:
            reference = group.reference(*inputs)
        problem = check_outputs(kernel, inputs, reference, rounds_to_int=rounds_floats(group))
        if problem is None:
            return kernel, []
        fallbacks.append({"op": _ops(group), "reason": f"{kernel.impl} {group.kind} kernel rejected: {problem}"})
    if not fallbacks:
        fallbacks.append({"op": _ops(group), "reason": f"no {group.kind} kernel builder available"})
    return aten_kernel(group), fallbacks


def compile_ahead(groups: Sequence[KernelGroup], ctx: KernelContext) -> int:
    """Compile the candidates of every group the build will tune, all in the tuner's pool
    (``Tuner.precompile``), before any is timed; returns how many compiled. Why: the build
    tunes one group after another, each compiling its dozen candidates while the GPU waits
    (ResNet-50's FP16 engine: 30 tuned groups, 28-59 s of a 31-65 s first call; H100, session
    21), where the quantize pass's probes compile theirs in one pool. A group whose candidates
    cannot be made yet (``Unsupported``, no shapes) is left to its build; a problem two groups
    share is compiled once. Nothing happens where the tuner does not time (the CPU, ``off``) or
    tunes under a seconds budget, nor for the groups of a warm build (an engine plan describes
    them: their candidates are not even made)."""
    from .autotune import tuner_for
    from .template import release_probe

    if not triton_enabled(ctx.device) or not tuner_for(ctx).compiles_ahead:
        return 0
    room = _room_for_probes(ctx.device)
    tunings, keys = [], set()
    for group in groups:
        paths = builders_for(group) if group.kind != "aten" else ()
        make = TUNINGS.get(paths[0]) if paths else None
        if make is None or planned(group, ctx) is not None:
            continue  # a group an engine plan describes was tuned by the cold build: its tunings are cached
        room -= _probe_bytes(group)
        if room < 0:  # the groups left build as before, one at a time
            break
        try:
            tuning = _load(make)(group, ctx)
        except Exception as exc:  # noqa: BLE001  (its build says why, or builds it)
            log.debug("compile_backend: %s not compiled ahead: %s", group.name, exc)
            continue
        if tuning.key in keys:
            release_probe(tuning)
            continue
        keys.add(tuning.key)
        tunings.append(tuning)
    try:
        return tuner_for(ctx).precompile([(t.key, t.candidates) for t in tunings])
    finally:
        for tuning in tunings:
            release_probe(tuning)


#: of the device's free memory, what the groups compiled ahead may hold at once: each compile runs
#: its candidate once on random inputs of the group's shapes (``template.warmed``), and all of
#: them are alive until the pool is done, where a one-at-a-time build held one group's
COMPILE_AHEAD_MEMORY = 0.25


def _room_for_probes(device: torch.device) -> float:
    if device.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    return COMPILE_AHEAD_MEMORY * free


def _probe_bytes(group: KernelGroup) -> int:
    """Bytes of a group's inputs and outputs (its probe's inputs, a candidate's first run's outputs)."""
    from .base import meta_of

    outputs = [x for node in group.gm.graph.nodes if node.op == "output" for x in node.all_input_nodes]
    values = [meta_of(node) for node in list(group.placeholders) + outputs]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def builders_for(group: KernelGroup) -> Tuple[str, ...]:
    """The builders to try for ``group``: by its anchor op where ANCHOR_BUILDERS names it, else by kind."""
    anchor = next((n for n in group.gm.graph.nodes if n.name == group.anchor), None) if group.anchor else None
    if anchor is not None and anchor.op == "call_function" and op_name(anchor.target) in ANCHOR_BUILDERS:
        return ANCHOR_BUILDERS[op_name(anchor.target)]
    return BUILDERS.get(group.kind, ())


def rounds_floats(group: KernelGroup) -> bool:
    """Whether the group's int8 outputs are float values rounded to codes: an explicit round, or
    an op carrying a fused quantize (``compile_backend::attention``'s ``quant``: the next GEMM's
    input), whose codes move a step where its float value differs from ATen's by rounding (an
    H100 rejected every INT8 BERT attention kernel by comparing those codes exactly)."""
    if "aten.round" in group.ops:
        return True
    for node in group.gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        names = [a.name for a in schema.arguments] if schema is not None else []
        if "quant" in names:
            at = names.index("quant")
            value = node.args[at] if at < len(node.args) else node.kwargs.get("quant")
            if value is not None:
                return True
    return False


def rounding_noise(inputs: Sequence[Any], numel: int, dtype: torch.dtype) -> float:
    """The error norm a result of ``numel`` elements may carry from rounding alone: 16 units in
    the last place of its inputs' root-mean-square value, per element (a real fault costs about
    the inputs' size itself)."""
    rms = 0.0
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            finite = t[torch.isfinite(t)].double()
            if finite.numel():
                rms = max(rms, finite.pow(2).mean().sqrt().item())
    return 16 * torch.finfo(dtype).eps * rms * math.sqrt(numel)


def check_outputs(kernel: Kernel, inputs: Sequence[Any], reference: Sequence[Any],
                  rounds_to_int: bool = False) -> Optional[str]:
    """None when the kernel reproduces ATen on these inputs, else what differs. fp8 outputs, and
    int8 outputs of a group that rounds floats (a quantize), are compared in quantization steps."""
    try:
        outputs = kernel(*inputs)
    except Exception as exc:
        return f"failed to run: {type(exc).__name__}: {exc}"
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs, expected {len(reference)}"
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        if not isinstance(ref, torch.Tensor):
            continue
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
            got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
            return f"output {i}: got {got}, expected {(tuple(ref.shape), ref.dtype)}"
        if ref.dtype in FP8_OUTPUTS or (rounds_to_int and ref.dtype == torch.int8):
            fast = (kernel.config or {}).get("accumulation") == "fast"
            fraction = FAST_ACCUMULATION_STEP_FRACTION if fast else QUANTIZED_STEP_FRACTION
            noise = FP8_NOISE_FRACTION
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in inputs):
                fraction, noise = max(fraction, BF16_STEP_FRACTION), BF16_FP8_NOISE_FRACTION
            elif any(isinstance(t, torch.Tensor) and t.dtype == torch.float16 for t in inputs):
                fraction = max(fraction, FP16_STEP_FRACTION)
            problem = quantized_mismatch(out, ref, fraction, noise)
            if problem:
                return f"output {i}: {problem}"
        elif ref.is_floating_point():
            o, r = out.double(), ref.double()
            if not torch.equal(torch.isnan(o), torch.isnan(r)):
                return f"output {i}: NaN pattern differs"
            finite = torch.isfinite(r)
            if not torch.equal(o[~finite].nan_to_num(), r[~finite].nan_to_num()):
                return f"output {i}: infinities differ"
            o, r = o[finite], r[finite]
            denom = r.norm().item()
            err = (o - r).norm().item() / max(denom, 1e-30) if denom > 0 else (o - r).abs().max().item() if o.numel() else 0.0
            tol = VALIDATION_RTOL.get(ref.dtype, 2e-3)
            # a result that cancels to rounding noise (softmax's backward for a uniform output
            # gradient is ~1e-9) may differ by what rounding its inputs can leave, whatever its size
            if err > tol and (o - r).norm().item() > rounding_noise(inputs, r.numel(), ref.dtype):
                return f"output {i}: relative error {err:.2e} > {tol:.0e}"
        elif not torch.equal(out, ref):
            return f"output {i}: values differ"
    return None


#: a kernel writing a quantized activation (the producer of a quantized GEMM's input) rounds an
#: fp32 value to the 8-bit grid; where its fp32 value differs from the reference's by rounding
#: (another accumulation order, an ulp in a layer norm), a value at a rounding boundary lands on
#: the neighbouring code. Accepted: every code within one step of the reference's, and at most
#: this fraction of them off (the statement in quant/README.md).
QUANTIZED_STEP_FRACTION = 1e-2
#: the same for an FP8 GEMM that sums in the tensor cores' own accumulator
#: (``Options.fp8_accumulation="fast"``): its sums differ from the reference's fp32 ones by
#: more rounding, so more values land one code away (H100, session 12: 1.2% at the MLP's
#: K = 4096 with GELU + quantize, growing with K); a wrong scale or sign is still many steps off
FAST_ACCUMULATION_STEP_FRACTION = 5e-2
#: the same for a group computing in bf16: the value quantized is rounded to bf16 first (as the
#: reference stores it), whose 8 significant bits are an int8 step's size at half the range, so
#: an ulp of difference in what precedes the rounding (an attention's sums in another order)
#: moves a code on several percent of elements (bf16 INT8 attention outputs under the interpreter,
#: bf16 rounded to nearest: a tiny Llama's 2.9-3.4%, a BERT-like head's 7.1%, every one a single
#: step: the kernel's probabilities are rounded to bf16 for the second dot; fp16's 11 bits: under
#: 1%). A wrong scale, sign or rounding mode still moves codes by more, or on most elements
BF16_STEP_FRACTION = 0.1
#: the same for a group computing from fp16 inputs: an ulp of fp16 (2^-11) on a value of code
#: magnitude c is c * 2^-11 of a step, so large codes land one step away more often than 1% (a
#: tiny ViT's fp16 INT8 attention output, codes to +-53, under the interpreter: 1.01%, every one
#: a single step; benchmarks/vision_families.py, session 37)
FP16_STEP_FRACTION = 3e-2
#: fp8's grid is relative: near zero its steps (2^-9 at the bottom) are far finer than the
#: numerical noise of the value being quantized (attention's probabilities rounded to fp16, seen
#: under the interpreter: 3 codes apart; the FP8 tensor cores' accumulation: the suspected cause
#: of the H200 rejecting every FP8 FC1 group of BERT, up to 14 codes apart on 0.6% of elements,
#: to confirm on the GPU). Differences within this fraction of the reference's largest
#: magnitude count as equal; a wrong scale or sign still differs far beyond it.
FP8_NOISE_FRACTION = 2.0 ** -9
#: the same where the group computes in bf16, 3 bits coarser than fp16: a bf16 DistilBERT's FP8
#: attention output had near-zero codes of opposite signs (0.5 against -0.5 of a 448 range) on
#: 5% of elements, each within 2^-8.8 of the largest magnitude (interpreter, session 36)
BF16_FP8_NOISE_FRACTION = 2.0 ** -6


def quantized_mismatch(out: torch.Tensor, ref: torch.Tensor, step_fraction: float = QUANTIZED_STEP_FRACTION,
                       noise_fraction: float = FP8_NOISE_FRACTION) -> Optional[str]:
    """Why int8 / fp8 codes ``out`` are not ``ref`` up to one quantization step (on at most
    ``step_fraction`` of them; fp8 differences within ``noise_fraction`` of the largest
    magnitude count as equal), or None."""
    if ref.dtype == torch.int8:
        steps = (out.to(torch.int16) - ref.to(torch.int16)).abs()
    else:  # fp8 codes are ordered like sign-magnitude integers: a step is a code distance of 1
        o, r = out.view(torch.uint8).to(torch.int16), ref.view(torch.uint8).to(torch.int16)
        o_nan, r_nan = torch.isnan(out.float()), torch.isnan(ref.float())
        if not torch.equal(o_nan, r_nan):
            return "NaN pattern differs"
        signed = lambda c: torch.where(c >= 128, -(c - 128), c)
        steps = (signed(o) - signed(r)).abs().masked_fill(r_nan, 0)
        of, rf = out.float().masked_fill(r_nan, 0), ref.float().masked_fill(r_nan, 0)
        if rf.numel():
            steps = steps.masked_fill((of - rf).abs() <= noise_fraction * rf.abs().max(), 0)
    if steps.numel() == 0:
        return None
    worst, fraction = int(steps.max()), float((steps > 0).double().mean())
    if worst > 1 or fraction > step_fraction:
        # the worst element's two values: enough to tell a scale, a cast or a rounding apart
        at = int(steps.reshape(-1).argmax())
        got, want = out.reshape(-1)[at].float().item(), ref.reshape(-1)[at].float().item()
        return (f"quantized values differ (up to {worst} steps, {fraction:.2%} of them; "
                f"worst: {got:g} where the reference has {want:g})")
    return None


def planned(group: KernelGroup, ctx: KernelContext) -> Optional[Dict[str, Any]]:
    """The stored decision for this group when the engine cache hit and it describes this group."""
    plan = getattr(ctx, "plan", None)
    decision = plan.decision(group.name) if plan is not None else None
    if decision is None or decision.get("kind") != group.kind or decision.get("ops") != list(group.ops):
        return None
    return decision


def _same_as_planned(kernel: Kernel, decision: Optional[Dict[str, Any]]) -> bool:
    if decision is None or kernel.impl != decision.get("impl"):
        return False
    return sha256(kernel.source) == decision.get("source_sha256")


def _ops(group: KernelGroup) -> str:
    return ", ".join(dict.fromkeys(group.ops))


def _load(path: str):
    module, func = path.split(":")
    return getattr(importlib.import_module(module), func)
