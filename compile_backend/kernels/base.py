"""What every kernel builder takes and returns.

A *group* is a piece of the ATen graph that the partitioner decided should become one kernel
(a GEMM with its epilogue, a pointwise chain, a row reduction, an attention block, a max
pooling, or a single op ATen must run). A *builder* turns a group into a :class:`Kernel`, or raises
:class:`Unsupported` with a reason; the selector then tries the next builder and finally ATen.

This module imports neither Triton nor CUDA: builders import Triton lazily inside ``build``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import pdl

# Triton's interpreter (TRITON_INTERPRET=1) swaps globals of triton.language while a kernel runs,
# so two threads inside it at once break each other (InterpreterError). Everything that runs
# interpreted kernels (an engine call, a build that tunes and validates) holds this lock; on
# CUDA nothing takes it. Process-wide because the interpreter's state is.
INTERPRETER_LOCK = threading.RLock()

KINDS = ("gemm", "grouped_gemm", "conv", "pointwise", "reduction", "attention", "pool", "aten")


class Unsupported(Exception):
    """A builder cannot serve this group; the message says why (it goes into the report)."""


def canonical_names(graph: fx.Graph) -> None:
    """Name a group's placeholders ``in0``, ``in1``, ... and its other nodes ``op0``, ... in graph
    order. Generated kernels use node names, so identical layers (or a probe traced in a layer's
    form, quant/speed.py) give identical source and share one tuning result and one compiled
    kernel instead of one each."""
    for i, x in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        x._rename(f"in{i}")
    for j, n in enumerate(n for n in graph.nodes if n.op not in ("placeholder", "output")):
        n._rename(f"op{j}")


@dataclasses.dataclass
class KernelGroup:
    """One unit of work for a kernel builder.

    gm: a standalone ATen graph: placeholders are the group's inputs in order; the output node
        returns a tuple with one entry per group output. Every node carries ``meta['val']``
        (a tensor on the ``meta`` device with the real shape, stride and dtype, or a Python
        scalar) so builders can read shapes without running anything.
    anchor: name of the GEMM/conv/attention node in ``gm`` for template kinds, else None.
    constants: names of the placeholders graph constants feed (a kernel may derive a value from
        one once per version: qgemm's x scale spread to [M, 1]).
    """

    kind: str
    gm: fx.GraphModule
    anchor: Optional[str] = None
    name: str = "group"
    constants: FrozenSet[str] = frozenset()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"group kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def ops(self) -> Tuple[str, ...]:
        return tuple(op_name(n.target) for n in self.gm.graph.nodes if n.op == "call_function")

    @property
    def placeholders(self) -> List[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    @property
    def outputs(self) -> List[fx.Node]:
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        return list(out.args[0])

    def reference(self, *inputs: Any) -> Tuple[Any, ...]:
        """Plain ATen execution of the group: the ground truth every kernel is checked against."""
        return tuple(self.gm(*inputs))


#: (shape, stride, dtype) of an output tensor a kernel allocates
OutLayout = Tuple[Tuple[int, ...], Tuple[int, ...], torch.dtype]


@dataclasses.dataclass
class Kernel:
    """A compiled group: call it with the group's inputs, get a tuple of its outputs.

    supports_out: ``fn`` also takes ``out=``, one entry per group output: a tensor to write that
        output into (exactly ``out_layouts[i]``, on the inputs' device) or None to allocate it.
        The engine's memory plan hands such kernels views of its arena.
    out_layouts: per group output, the layout ``fn`` allocates; None where the output is an
        input or a view of one (no tensor may be given for it).
    """

    kind: str
    impl: str  # triton | cublas | cudnn | sdpa | aten
    ops: Tuple[str, ...]
    fn: Callable[..., Tuple[Any, ...]]
    config: Dict[str, Any] = dataclasses.field(default_factory=dict)
    source: Optional[str] = None  # generated source, kept for the report / debug dump
    tuned_from_cache: bool = False
    supports_out: bool = False
    out_layouts: Tuple[Optional[OutLayout], ...] = ()

    def __post_init__(self) -> None:
        if self.supports_out and not any(layout is not None for layout in self.out_layouts):
            raise ValueError("a kernel that supports out= must give the layout of an output it allocates")

    def __call__(self, *args: Any, out: Optional[Sequence[Optional[torch.Tensor]]] = None) -> Tuple[Any, ...]:
        if out is None:
            return self.fn(*args)
        if not self.supports_out:
            raise ValueError(f"{self.kind} kernel ({self.impl}) cannot write into given output tensors")
        check_out(out, self.out_layouts)
        return self.fn(*args, out=out)

    def describe(self) -> dict:
        return {"kind": self.kind, "ops": list(self.ops), "impl": self.impl, "config": dict(self.config),
                "tuned_from_cache": self.tuned_from_cache}


TUNING_LEVELS = ("off", "fast", "max")


def tuning_level(autotune: Any) -> str:
    """'off' | 'fast' | 'max' | 'budget' (a number of seconds) for an ``Options.autotune`` value."""
    if isinstance(autotune, str):
        if autotune not in TUNING_LEVELS:
            raise ValueError(f"autotune must be off, fast, max or seconds, got {autotune!r}")
        return autotune
    if isinstance(autotune, (int, float)) and not isinstance(autotune, bool) and autotune > 0:
        return "budget"
    raise ValueError(f"autotune must be off, fast, max or seconds, got {autotune!r}")


def allows_tf32(precision: str) -> bool:
    """fp32 GEMMs, convolutions and attention may use TF32 tensor cores under this
    ``Options.precision`` (anything but ``fp32``, which keeps eager's IEEE fp32 products)."""
    return precision != "fp32"


@dataclasses.dataclass
class KernelContext:
    """What a builder may know about the compilation: options, device, tuning, progress.

    The options are interpreted once, here: ``tuning`` (the tuning level) and ``allow_tf32``
    are what builders read, never ``options.autotune`` / ``options.precision`` themselves.
    ``tuner`` is the compilation's one tuner (``autotune.tuner_for`` makes it on first use),
    so a seconds budget is shared by every group the context builds.
    """

    options: Any  # compile_backend.options.Options
    device: torch.device
    interpret: bool  # Triton runs under TRITON_INTERPRET=1 (CPU tensors)
    timing_cache: Any = None  # a store with get/put (cache.timing.TimingCache, cache.plan.PlanTimings) or None
    progress: Optional[Callable[[str], None]] = None
    plan: Any = None  # cache.plan.Plan of a cache hit: the cold build's decisions per group
    tuner: Any = None  # autotune.Tuner, made by the first group that tunes
    tuning: str = dataclasses.field(init=False)  # tuning_level(options.autotune)
    allow_tf32: bool = dataclasses.field(init=False)  # allows_tf32(options.precision)
    pdl: bool = dataclasses.field(init=False)  # Options.pdl, where the device and Triton have it (kernels/pdl.py)
    fp8_fast_accumulation: bool = dataclasses.field(init=False)  # Options.fp8_accumulation == "fast"

    def __post_init__(self) -> None:
        self.tuning = tuning_level(self.options.autotune)
        self.allow_tf32 = allows_tf32(self.options.precision)
        self.pdl = bool(getattr(self.options, "pdl", False)) and not self.interpret and pdl.available(self.device)
        self.fp8_fast_accumulation = getattr(self.options, "fp8_accumulation", "fp32") == "fast"

    @property
    def autotune(self) -> Any:
        return self.options.autotune

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


def triton_interpret() -> bool:
    """Triton's own documented switch: kernels run on CPU tensors in its interpreter.

    The one place the project reads it, with the spellings Triton itself accepts."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def triton_enabled(device: torch.device) -> bool:
    """Our Triton kernels serve this device: CUDA, or CPU tensors under the interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpret()


def sha256(text: Optional[str]) -> Optional[str]:
    """Hex digest of a kernel's generated source (plans record it; rebuilds compare it)."""
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def op_name(target: Any) -> str:
    """'aten.addmm' style name for an FX call_function target."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


# Views that change how values read rather than where they are: the conjugate and negative bits
# live on the tensor, not in its memory, so a kernel (or a rewrite) that follows only the strides
# would drop them. They run as ordinary ATen ops.
_BIT_VIEWS = ("_conj", "_neg_view", "conj_physical", "_conj_copy", "_neg_view_copy")


#: ops whose value depends on no tensor's elements, only on a shape (of an argument or of another
#: tensor): a generated kernel computes one as a constant, so any kernel may recompute it and the
#: partitioner copies one per reader (``fill.Tensor`` reads its value from a tensor: not here)
FILL_OPS = frozenset(getattr(torch.ops.aten, name) for name in (
    "full", "full_like", "scalar_tensor", "zeros", "ones", "zeros_like", "ones_like",
    "new_zeros", "new_ones", "new_full"))


def is_fill(node: fx.Node) -> bool:
    """``node`` computes a constant of its shape (see FILL_OPS)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.overloadpacket in FILL_OPS


def roll_parts(node: fx.Node):
    """(input, ((dim, shift), ...)) of ``aten.roll(x, shifts, dims)`` over named dims of a static
    shape, each shift in [0, size) (``roll(x, -3, 1)`` on 56 rows: shift 53); None for anything
    else (a roll of the flattened tensor, no dims)."""
    if node.op != "call_function" or node.target is not torch.ops.aten.roll.default or not node.args:
        return None
    x = node.args[0]
    shifts = node.args[1] if len(node.args) > 1 else node.kwargs.get("shifts")
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", [])
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    shifts, dims = ([v] if isinstance(v, int) else list(v or []) for v in (shifts, dims))
    if not isinstance(val, torch.Tensor) or not dims or len(shifts) != len(dims) or val.dim() == 0 \
            or not all(isinstance(v, int) for v in [*shifts, *dims, *val.shape]):
        return None
    parts = {}
    for shift, dim in zip(shifts, dims):
        dim %= val.dim()
        parts[dim] = (parts.get(dim, 0) + shift) % max(int(val.shape[dim]), 1)
    # a shift of a whole turn (any shift of a size-1 dim) moves nothing: no rolled dim there
    return x, tuple(sorted((d, s) for d, s in parts.items() if s))


def pad_parts(node: fx.Node):
    """(input, ((dim, low, input size), ...), value) of ``aten.constant_pad_nd(x, pad, value)`` of
    static sizes: output index i along a padded dim reads the input at i - low, ``value`` where
    that is outside it (a negative pad crops); None for anything else."""
    if node.op != "call_function" or node.target is not torch.ops.aten.constant_pad_nd.default or len(node.args) < 2:
        return None
    x, pad = node.args[0], node.args[1]
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(pad, (list, tuple)) or len(pad) % 2 \
            or len(pad) // 2 > val.dim() or not isinstance(value, (int, float, bool)) \
            or not all(isinstance(v, int) for v in [*pad, *val.shape]):
        return None
    dims = []
    for j in range(len(pad) // 2):  # pad runs from the last dim backwards: (low, high) pairs
        low, high = pad[2 * j], pad[2 * j + 1]
        if low or high:
            dim = val.dim() - 1 - j
            dims.append((dim, int(low), int(val.shape[dim])))
    return x, tuple(sorted(dims)), value


def axis_index_parts(node: fx.Node):
    """(input, ((dim, index tensor), ...)) of ``aten._unsafe_index(x, [None] * k + [t0, t1, ...])``
    whose index tensors each vary along one result dim of their own, in order (``t0`` [OH, 1],
    ``t1`` [OW]: an interpolation's rows and columns, ``F.interpolate`` nearest or bilinear):
    result dim ``k + j`` reads ``x`` at ``tj``'s value there; None for anything else."""
    if node.op != "call_function" or node.target is not torch.ops.aten._unsafe_index.Tensor or len(node.args) < 2:
        return None
    x, indices = node.args[0], node.args[1]
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    out = node.meta.get("val")
    if not isinstance(xv, torch.Tensor) or not isinstance(out, torch.Tensor) or not isinstance(indices, (list, tuple)):
        return None
    k = 0
    while k < len(indices) and indices[k] is None:
        k += 1
    tables = list(indices[k:])
    m = len(tables)
    if m == 0 or k + m > xv.dim() or out.dim() != xv.dim() or any(not isinstance(t, fx.Node) for t in tables):
        return None
    parts = []
    for j, t in enumerate(tables):
        tv = t.meta.get("val")
        if not isinstance(tv, torch.Tensor) or tv.dtype not in (torch.int32, torch.int64) or tv.dim() > m:
            return None
        sizes = [1] * (m - tv.dim()) + list(tv.shape)
        if not all(isinstance(s, int) for s in sizes) or any(s != 1 for p, s in enumerate(sizes) if p != j) \
                or sizes[j] != out.shape[k + j]:
            return None
        if out.shape[k + j] == 1:
            if xv.shape[k + j] == 1:
                continue  # the one element of a size-1 dim (its index can only be 0): nothing to look up
            return None  # one row of many: the generator drops size-1 dims, so it could not look it up
        parts.append((k + j, t))
    return x, tuple(parts)


def is_view_op(target: Any) -> bool:
    """``target``'s output is a re-indexing of its first input's values: an alias (``view``,
    ``slice``, ``transpose``, ``expand``, ``_unsafe_view``) or the functional copy of one
    (``view_copy``, ``slice_copy``). PyTorch also tags ``slice_scatter`` ``view_copy``; the
    ``*_scatter`` ops write into a copy of their input, so they are not views here (treating
    one as a view dropped the write)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    name = target._opname
    if name in _BIT_VIEWS or name.endswith("_scatter"):
        return False
    return target.is_view or target.overloadpacket is torch.ops.aten._unsafe_view \
        or torch.Tag.view_copy in target.tags


def meta_of(node: fx.Node) -> Any:
    return node.meta.get("val")


def propagate_fake(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """``meta['val']`` of every node of ``gm`` from ``inputs`` (fake tensors; Python scalars as
    themselves). torch 2.11's FakeTensorProp leaves a scalar placeholder without one (2.13 stores
    the scalar), and kernels read a scalar input's value type from it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), inputs):
        if node.meta.get("val") is None and isinstance(value, (bool, int, float)):
            node.meta["val"] = value


def tensor_inputs(inputs: Sequence[Any]) -> List[torch.Tensor]:
    return [x for x in inputs if isinstance(x, torch.Tensor)]


def check_out(out: Sequence[Optional[torch.Tensor]], layouts: Sequence[Optional[OutLayout]]) -> None:
    """``out`` gives one entry per output, and tensors only for outputs the kernel allocates."""
    if len(out) != len(layouts):
        raise ValueError(f"out= has {len(out)} entries for {len(layouts)} outputs")
    for i, (t, layout) in enumerate(zip(out, layouts)):
        if t is not None and layout is None:
            raise ValueError(f"out[{i}]: this output is an input or a view of one; no tensor can be given for it")


def output_tensor(out: Optional[Sequence[Optional[torch.Tensor]]], index: int, layout: OutLayout,
                  device: torch.device) -> torch.Tensor:
    """Output ``index`` of one kernel call: the caller's tensor from ``out`` when it gives one
    (which must be exactly ``layout`` on ``device``), else a new tensor of that layout."""
    shape, stride, dtype = layout
    given = out[index] if out is not None else None
    if given is None:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    for what, have, want in (("shape", tuple(given.shape), tuple(shape)), ("stride", tuple(given.stride()), tuple(stride)),
                             ("dtype", given.dtype, dtype), ("device", given.device, torch.device(device))):
        if have != want:
            raise ValueError(f"out[{index}]: {what} {have}, but the kernel writes {want}")
    return given
