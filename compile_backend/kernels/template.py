"""The shared core of the template kernel families (GEMM, convolution, attention, and the
scaled INT8/FP8 ones to come): what a family's builder needs around its own kernel.

* dtype sets and small helpers (:func:`triton_cdiv`, :func:`as3d`, :func:`fit_pow2`,
  :func:`dtype_name`), the device's limits (:func:`device_limits`);
* the tuning problem: the key parts of a group (:func:`group_shapes`, :func:`group_strides`,
  :func:`group_dtypes`), random inputs shaped like it (:class:`Probe`, :func:`random_like`),
  the warm-up of a compiled candidate (:func:`warmed`);
* what a builder hands the tuner (:class:`TemplateTuning`) and the :class:`Kernel` made of its
  choice (:func:`choose_kernel_of`), with the candidates every fused-epilogue family offers
  (:func:`aten_epilogue_candidate`).

Imports neither Triton nor CUDA (family modules import this, the selector imports them lazily).
"""
from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import torch

from .autotune import Candidate, TuningKey, tuner_for
from .base import Kernel, KernelContext, KernelGroup, meta_of, propagate_fake

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None),) if d is not None)
QUANT_DTYPES = (torch.int8,) + FP8_DTYPES


# ------------------------------------------------------------------------------- helpers
def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def index_strides(t: torch.Tensor) -> Tuple[int, ...]:
    """``t``'s strides for a kernel's address arithmetic, 0 for a dim of size 1 (its index is
    always 0, so its stride is never used). Why: Triton specialises an integer argument equal to
    1 as the constant 1, which says nothing about its divisibility; a 1x1 convolution's weight
    [oc, cg, 1, 1] has strides (cg, 1, 1, 1), so ``kh * sw_h`` left the weight tile's address of
    unknown alignment and the FP8/INT8 template loaded it one byte at a time (32 byte loads and
    shared-memory stores a thread a K step, SASS for sm_90): ResNet-50's 1x1 convolutions ran
    at 40-90 us in FP8 against cuDNN's 11-28 us in fp16 (H100, session 16). 0 is divisible by
    16, so Triton vectorises the loads."""
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


def as3d(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the (batch, rows, columns) index space of the templates: 2-D gets batch 1."""
    return t if t.dim() == 3 else t.unsqueeze(0)


def fit_pow2(x: int, lo: int, hi: int) -> int:
    """The smallest power of two >= ``x``, clamped to [lo, hi] (a block size covering ``x``)."""
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(1, x))))))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def device_limits(device: torch.device) -> Tuple[int, int]:
    """(multiprocessors, shared memory per block) of ``device``; H100-like defaults on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
        return props.multi_processor_count, int(smem)
    return 132, 227 * 1024


# ------------------------------------------------------------------------------- tuning problem
def group_shapes(group: KernelGroup) -> Tuple[Tuple[int, ...], ...]:
    """The shapes of the group's inputs (scalars: ``()``), as a tuning key part."""
    return tuple(tuple(getattr(meta_of(p), "shape", ())) for p in group.placeholders)


def group_strides(group: KernelGroup) -> Tuple[Tuple[int, ...], ...]:
    """The strides of the group's tensor inputs (scalars: ``()``), as a tuning key part."""
    return tuple(tuple(meta_of(p).stride()) if isinstance(meta_of(p), torch.Tensor) else () for p in group.placeholders)


def group_dtypes(group: KernelGroup) -> Tuple[str, ...]:
    """The dtypes of the group's inputs (scalars: their Python type), as a tuning key part."""
    return tuple(str(getattr(meta_of(p), "dtype", type(meta_of(p)).__name__)) for p in group.placeholders)


class Probe:
    """Random inputs shaped like the group's (same shapes, strides, dtypes) for tuning runs."""

    def __init__(self, group: KernelGroup, device: torch.device):
        self.group, self.device = group, device
        self._first: Optional[Tuple[Any, ...]] = None
        self._lock = threading.Lock()  # candidates compile (and first run) in a thread pool

    def make(self) -> Tuple[Any, ...]:
        return tuple(random_like(meta_of(p), self.device) for p in self.group.placeholders)

    def first(self) -> Tuple[Any, ...]:
        with self._lock:
            if self._first is None:
                self._first = self.make()
            return self._first

    @property
    def holds_inputs(self) -> bool:
        return self._first is not None

    def release(self) -> None:
        """Drop the inputs :meth:`first` made. The chosen kernel's runner keeps its probe (through
        the candidate's closure) for the engine's life: kept, those random copies of every
        group's inputs, weights included, were most of an engine's memory (HF BERT on the H200:
        990 MB peak against eager's 305)."""
        with self._lock:
            self._first = None


def warmed(run, probe: Probe):
    """On CUDA a candidate is compiled by running it once (in the tuner's thread pool), which
    also surfaces resource errors at compile time rather than at timing."""
    if probe.device.type == "cuda":
        run(*probe.first())
    return run


def random_like(val: Any, device: torch.device) -> Any:
    """A random tensor with ``val``'s shape, strides (broadcast ones too) and dtype."""
    if not isinstance(val, torch.Tensor):
        return val
    shape, stride, dtype = tuple(val.shape), tuple(val.stride()), val.dtype
    size = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    if dtype.is_floating_point:
        flat = torch.randn(size, device=device).to(dtype)
    elif dtype == torch.bool:
        flat = torch.randint(0, 2, (size,), device=device).bool()
    else:
        flat = torch.randint(-8, 8, (size,), device=device).to(dtype)
    return flat.as_strided(shape, stride)


# ------------------------------------------------------------------------------- choosing
@dataclasses.dataclass
class TemplateTuning:
    """What a template builder hands the tuner: the problem, the candidates, random inputs."""

    kind: str
    key: TuningKey
    candidates: List[Candidate]
    make_inputs: Any
    sources: Dict[str, str]  # impl -> generated source
    out_layouts: Tuple[Any, ...] = ()  # per group output: the layout written (None: passed through)
    writes_out: FrozenSet[str] = frozenset()  # candidates whose runner takes out= (Kernel.supports_out)


#: how many of the next fastest candidates a tuned kernel's config lists (``runners_up``)
RUNNERS_UP = 3


def choose_kernel_of(group: KernelGroup, ctx: KernelContext, tuning: TemplateTuning) -> Kernel:
    """The tuner's choice among ``tuning``'s candidates, as the group's :class:`Kernel`."""
    choice = tuner_for(ctx).choose(tuning.key, tuning.candidates, tuning.make_inputs)
    release_probe(tuning)
    cand = choice.candidate
    config = dict(cand.config)
    if choice.timings_ms and cand.name in choice.timings_ms:
        config["tuned_ms"] = round(choice.timings_ms[cand.name], 5)
        config["timed"] = f"{len(choice.timings_ms)}/{len(tuning.candidates)}"  # skipped ones failed
        for ref in (c for c in tuning.candidates if c.reference and c.name in choice.timings_ms):
            config["reference"], config["reference_ms"] = ref.name, round(choice.timings_ms[ref.name], 5)
        # the next fastest, so a report shows how close the race was and which family came second
        # (a decode step's picks left it unknown whether a new loop lost by 1% or by 2x)
        others = sorted((ms, name) for name, ms in choice.timings_ms.items()
                        if name != cand.name and not any(c.reference and c.name == name for c in tuning.candidates))
        config["runners_up"] = [[name, round(ms, 5)] for ms, name in others[:RUNNERS_UP]]
    writes_out = cand.name in tuning.writes_out and any(x is not None for x in tuning.out_layouts)
    return Kernel(kind=tuning.kind, impl=cand.impl, ops=group.ops, fn=choice.runner, config=config,
                  source=None if config.get("epilogue") == "aten" else tuning.sources.get("tma" if config.get("tma") else cand.impl),
                  tuned_from_cache=choice.from_cache, supports_out=writes_out,
                  out_layouts=tuning.out_layouts if writes_out else ())


#: anchor node meta: names of the candidates the quantize pass's speed probe timed fastest for
#: this layer, best first (``fx_passes/quant_probes.py``); :func:`seeded` narrows the group's
#: tuning to them (stored with an engine's graph: ``cache/graph_file.STORED_META``)
PROBE_SEEDS = "cb_probe_seeds"


def seeded(tuning: TemplateTuning, group: KernelGroup) -> TemplateTuning:
    """``tuning`` narrowed to its anchor's :data:`PROBE_SEEDS` among the Triton candidates, plus
    the heuristic's first (insurance against an epilogue that changes the ranking), every vendor
    candidate and the float reference. The probe timed every config on the layer's 8-bit GEMM /
    convolution alone at these shapes; the engine's group adds its epilogue, and tuned all of
    them again (INT8 BERT: 16 groups tuned in the kernels stage, 8.8 s of a 32.6 s first call
    against FP16's 19.8; H100, session 22). The key records the seeds, so a tuning of the full
    list and a seeded one never share a timing-cache record. Unchanged without seeds, or when
    none is a candidate here."""
    anchor = next((n for n in group.gm.graph.nodes if n.name == group.anchor), None)
    seeds = tuple(anchor.meta.get("cb_probe_seeds", ())) if anchor is not None else ()  # PROBE_SEEDS
    triton = [c for c in tuning.candidates if c.impl == "triton" and not c.reference]
    if not seeds or not any(c.name in seeds for c in triton):
        return tuning
    keep = {c.name for c in triton if c.name in seeds} | {triton[0].name}
    candidates = [c for c in tuning.candidates if c.reference or c.impl != "triton" or c.name in keep]
    if len(candidates) == len(tuning.candidates):
        return tuning
    key = dataclasses.replace(tuning.key, extra=f"{tuning.key.extra} | seeded {','.join(sorted(keep))}")
    return dataclasses.replace(tuning, key=key, candidates=candidates,
                               writes_out=frozenset(n for n in tuning.writes_out if any(c.name == n for c in candidates)))


def release_probe(tuning: TemplateTuning) -> None:
    """Drop the random inputs the tuning's probe holds (the builders pass ``Probe.make``): the
    runners keep their probe for the engine's life."""
    probe = getattr(tuning.make_inputs, "__self__", None)
    if isinstance(probe, Probe):
        probe.release()


def aten_epilogue_candidate(vendor: str, group: KernelGroup, probe: Probe) -> Candidate:
    """The vendor's kernel (cuBLAS, cuDNN) followed by the group's own ATen epilogue ops: the
    group's reference itself, timed like any candidate."""
    return Candidate(f"{vendor} + aten epilogue", {"impl": vendor, "epilogue": "aten"},
                     lambda: warmed(group.reference, probe), vendor)


def float_reference_candidate(name: str, make_operands: Any, op: Any) -> Candidate:
    """A reference :class:`Candidate` (timed, never chosen): ``op(*make_operands())``, the float
    layer a quantized group replaces, on random operands of the float layer's shapes (its time
    does not depend on the values); the runner ignores the group's inputs."""
    def compile_():
        operands = make_operands()

        def run(*_inputs, out=None):
            return op(*operands)

        return run

    return Candidate(name, {"impl": "reference"}, compile_, "aten", reference=True)


def float_linear_candidate(m: int, n: int, k: int, dtype: torch.dtype, has_bias: bool, device: torch.device) -> Candidate:
    """The float linear a quantized layer replaces (cuBLAS, bias fused) on random [M, K] x [N, K]
    operands of ``dtype``: the report's yardstick for a quantized GEMM (timed, never chosen)."""
    def operands():
        x = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(n, k, dtype=dtype, device=device)
        return x, w, torch.randn(n, dtype=dtype, device=device) if has_bias else None

    return float_reference_candidate(f"float linear {dtype_name(dtype)}", operands, torch.nn.functional.linear)


def traced_group(fn, inputs, kind: str, anchor_op: str) -> KernelGroup:
    """A group of ``kind`` made by tracing ``fn(*inputs)`` to ATen (fake metadata on every node),
    anchored on its first call of an op whose name contains ``anchor_op``: a layer's GEMM on its
    own, for timing it outside a model (quant/speed.py, benchmarks). ``fn`` returns a tensor or
    a tuple of them (the group's outputs)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda *xs: (lambda out: out if isinstance(out, tuple) else (out,))(fn(*xs)))(*inputs)
    propagate_fake(gm, inputs)
    anchor = next(n for n in gm.graph.nodes if n.op == "call_function" and anchor_op in str(n.target))
    return KernelGroup(kind, gm, anchor=anchor.name)


def anchor_only(plan) -> bool:
    """No chain in a fused-epilogue plan: every stored value is the anchor's result (or a
    reshape of it), so the vendor's result is the group's output as is."""
    return not plan.chain_ops and all(var == "acc_v" for var, *_ in plan.stores)
