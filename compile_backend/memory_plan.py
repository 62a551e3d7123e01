"""Memory planning: kernel outputs live in one arena, at offsets chosen at compile time.

The engine graph is straight-line code, so every value's lifetime is known before the first
call: it is written by the node that defines it and read until the last use of the value or of
anything that may alias it (a view, a getitem, an op writing into it). Two values may share
bytes when their lifetimes do not intersect. Only outputs of kernels that write into given
tensors (``Kernel.supports_out``) are planned; graph outputs, and anything that may alias one,
an input or a constant, are fresh tensors as before (the caller owns them).

Aliasing is judged conservatively: an ATen op's output is fresh only when its schema says so
(no alias annotation on any return or argument), it is not a composite that may hand back an
input as is, and it is not one of the few ops that alias without saying so; every other node
may alias all of its inputs, which only ever lengthens lifetimes.

Sizes are storage extents (shape and stride), rounded up to ``ALIGN`` bytes; offsets are
multiples of ``ALIGN``. Placement is greedy best-fit, largest buffer first.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .engine import GroupCall

ALIGN = 256  # bytes: covers every dtype and the 16-byte alignment Triton specialises on
# schemas without alias annotations that still return (views of) inputs
_ALIASING_NAMES = ("_unsafe_view", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk", "lift")


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One planned kernel output: ``call`` writes output ``output`` into it, ``value`` names it."""

    value: str  # engine-graph node (the getitem) holding the value
    call: str  # the group-call node that writes it
    output: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype
    size: int  # bytes reserved (a multiple of ALIGN)
    start: int  # lifetime over node positions, both ends included
    end: int
    offset: int = -1

    def view(self, arena: torch.Tensor) -> torch.Tensor:
        """The tensor this buffer is: its bytes of ``arena`` seen with its dtype and layout."""
        flat = arena[self.offset:self.offset + self.size].view(self.dtype)
        return flat.as_strided(self.shape, self.stride)  # keeps the slice's storage offset


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Where each planned value lives in the engine's arena (buffers ordered by first write)."""

    arena_bytes: int
    buffers: Tuple[Buffer, ...]

    @property
    def planned_count(self) -> int:
        return len(self.buffers)

    def live_bytes_bound(self) -> int:
        """Most bytes of buffers live at one moment: no arena can be smaller."""
        return _peak((b.start, b.end, b.size) for b in self.buffers)


# --------------------------------------------------------------------------- aliasing
def fresh_op(target: Any) -> bool:
    """Whether ``target``'s outputs are new tensors that alias none of its inputs."""
    if not isinstance(target, torch._ops.OpOverload) or target.is_view:
        return False
    schema = target._schema
    if any(r.alias_info is not None for r in schema.returns) or \
            any(a.alias_info is not None for a in schema.arguments):
        return False
    if target._opname in _ALIASING_NAMES:
        return False
    return not torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd")


def _mutates(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and any(
        a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments)


class _Classes:
    """Union-find over nodes: one class per set of values that may share storage."""

    def __init__(self) -> None:
        self.parent: Dict[fx.Node, fx.Node] = {}

    def find(self, n: fx.Node) -> fx.Node:
        self.parent.setdefault(n, n)
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def group_output_aliases(group) -> List[FrozenSet[int]]:
    """Per output of a kernel group, the indices of group inputs it may alias."""
    classes = _alias_classes(group.gm.graph, lambda n: () if fresh_op(n.target) else n.all_input_nodes)
    placeholders = group.placeholders
    return [frozenset(i for i, p in enumerate(placeholders) if classes.find(p) is classes.find(o))
            if isinstance(o, fx.Node) else frozenset() for o in group.outputs]


def _alias_classes(graph: fx.Graph, links) -> _Classes:
    classes = _Classes()
    for node in graph.nodes:
        classes.find(node)
        if node.op == "call_function":
            for x in links(node):
                classes.union(node, x)
    return classes


def getitem_index(node: fx.Node) -> Optional[int]:
    """k for ``node = getitem(group_call, k)``, else None."""
    if node.op == "call_function" and len(node.args) == 2 and isinstance(node.args[1], int) and \
            isinstance(node.args[0], fx.Node) and isinstance(node.args[0].target, GroupCall):
        return node.args[1]
    return None


class _EngineGraph:
    """The engine graph with its alias classes and, per group-call output, whether the kernel
    writes it into a given tensor (a candidate for the arena) and whether it may alias inputs."""

    def __init__(self, graph: fx.Graph):
        self.nodes = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.aliases: Dict[fx.Node, List[FrozenSet[int]]] = {
            n: group_output_aliases(n.target.group) for n in self.nodes if isinstance(n.target, GroupCall)}
        self.candidates = [n for n in self.nodes if self._writable(n)]
        chosen = set(self.candidates)
        self.classes = _alias_classes(graph, lambda n: () if n in chosen else self._links(n))
        # inputs, constants and outputs belong to the caller; an op writing into a value (data
        # or metadata: t_, resize_) would change the arena's view objects, reused every call
        pinned = [n for n in self.nodes if n.op in ("placeholder", "get_attr") or _mutates(n.target)]
        pinned += [x for n in self.nodes if n.op == "output" for x in n.all_input_nodes]
        self.pinned = {self.classes.find(n) for n in pinned}  # classes the caller owns
        self.end: Dict[fx.Node, int] = {}
        for n in self.nodes:
            last = max([self.pos[u] for u in n.users] + [self.pos[n]])
            root = self.classes.find(n)
            self.end[root] = max(self.end.get(root, 0), last)

    def _links(self, node: fx.Node) -> Sequence[fx.Node]:
        k = getitem_index(node)
        if k is not None:  # an output the kernel allocates, or one aliasing some call inputs
            call = node.args[0]
            written = call.target.out_views.get(k)  # a slice of a stack (stack_outputs.py)
            if written is not None:
                return [written[0]]
            group_inputs = [a for a in call.args]
            aliased = self.aliases[call][k] if k < len(self.aliases[call]) else range(len(group_inputs))
            return [call] + [group_inputs[i] for i in aliased if isinstance(group_inputs[i], fx.Node)]
        if isinstance(node.target, GroupCall):
            return ()  # the call's tuple: its getitems link their own aliases
        return () if fresh_op(node.target) else node.all_input_nodes

    def _writable(self, node: fx.Node) -> bool:
        k = getitem_index(node)
        if k is None:
            return False
        call = node.args[0]
        kernel = call.target.kernel
        if k in call.target.out_views:
            return False  # written into a given tensor (a stack's slice, an input), not the arena
        return bool(kernel is not None and kernel.supports_out and k < len(kernel.out_layouts)
                    and kernel.out_layouts[k] is not None and not self.aliases[call][k]
                    # a node reading the call's tuple itself would read outputs unseen
                    and all(getitem_index(u) is not None for u in call.users))

    def planned(self) -> List[fx.Node]:
        return [n for n in self.candidates if self.classes.find(n) not in self.pinned
                and _extent(*n.args[0].target.kernel.out_layouts[n.args[1]]) > 0]


# --------------------------------------------------------------------------- planning
def plan(graph: fx.Graph) -> MemoryPlan:
    """The memory plan of an engine graph (after ``inline_aten_groups``), checked."""
    g = _EngineGraph(graph)
    buffers = []
    for n in g.planned():
        call, k = n.args[0], n.args[1]
        shape, stride, dtype = call.target.kernel.out_layouts[k]
        buffers.append(Buffer(n.name, call.name, k, tuple(shape), tuple(stride), dtype,
                              _aligned(_extent(shape, stride, dtype)), g.pos[call], g.end[g.classes.find(n)]))
    result = assign(buffers)
    check(result)
    return result


def assign(buffers: Iterable[Buffer]) -> MemoryPlan:
    """Offsets for ``buffers`` (lifetimes and sizes given): greedy best-fit, largest first; each
    goes into the smallest gap between the buffers it overlaps in time, else above them."""
    placed: List[Buffer] = []
    for b in sorted(buffers, key=lambda b: (-b.size, b.start, b.end, b.value)):
        busy = sorted((p.offset, p.offset + p.size) for p in placed if p.start <= b.end and b.start <= p.end)
        best: Optional[Tuple[int, int]] = None  # (gap size, offset)
        cursor = 0
        for lo, hi in busy:
            if lo - cursor >= b.size and (best is None or lo - cursor < best[0]):
                best = (lo - cursor, cursor)
            cursor = max(cursor, hi)
        placed.append(dataclasses.replace(b, offset=best[1] if best else cursor))
    placed.sort(key=lambda b: (b.start, b.value))
    return MemoryPlan(max((b.offset + b.size for b in placed), default=0), tuple(placed))


def check(plan: MemoryPlan) -> None:
    """Raise ValueError unless every buffer lies in the arena, aligned, and no two buffers whose
    lifetimes intersect share a byte."""
    active: List[Buffer] = []
    for b in sorted(plan.buffers, key=lambda b: b.start):
        if b.offset < 0 or b.offset % ALIGN or b.size <= 0 or b.offset + b.size > plan.arena_bytes:
            raise ValueError(f"memory plan: buffer {b.value} at [{b.offset}, +{b.size}) "
                             f"is outside the {plan.arena_bytes}-byte arena or misaligned")
        if b.end < b.start:
            raise ValueError(f"memory plan: buffer {b.value} ends ({b.end}) before it starts ({b.start})")
        active = [a for a in active if a.end >= b.start]
        for a in active:
            if a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                raise ValueError(f"memory plan: {a.value} [{a.start}, {a.end}] and {b.value} "
                                 f"[{b.start}, {b.end}] are live together and share bytes")
        active.append(b)


# --------------------------------------------------------------------------- peaks
def eager_peak_bytes(graph: fx.Graph) -> int:
    """Most bytes of intermediate tensors (outputs included) live at once when each is freed
    at its last use, as eager's allocator holds them; views cost nothing but keep their base.
    Every allocation counts rounded up to ALIGN bytes, as the arena's buffers do (CUDA's caching
    allocator rounds to 512)."""
    return _class_peak(graph, _alias_classes(graph, lambda n: () if fresh_op(n.target) else n.all_input_nodes),
                       lambda n: _value_bytes(n.meta.get("val")) if fresh_op(n.target) else 0)


def planned_peak_bytes(graph: fx.Graph, memory: MemoryPlan) -> int:
    """The arena plus the most bytes of unplanned intermediates live at once in the engine graph."""
    g = _EngineGraph(graph)
    planned = {b.value for b in memory.buffers}

    def owned(n: fx.Node) -> int:
        if isinstance(n.target, GroupCall):  # the outputs this call allocates outside the arena
            kernel, outs = n.target.kernel, n.target.group.outputs
            layouts = kernel.out_layouts if kernel is not None and kernel.out_layouts else [None] * len(outs)
            taken = {u.args[1] for u in n.users if u.name in planned}
            return sum(_aligned(_extent(*layouts[k])) if layouts[k] is not None else _value_bytes(o.meta.get("val"))
                       for k, o in enumerate(outs) if k not in taken and not g.aliases[n][k])
        return _value_bytes(n.meta.get("val")) if n.op == "call_function" and fresh_op(n.target) else 0

    return memory.arena_bytes + _class_peak(graph, g.classes, owned)


def summary(memory: MemoryPlan, graph: fx.Graph, eager_peak: int) -> Dict[str, Any]:
    """What the report shows for one engine."""
    return {"arena_bytes": memory.arena_bytes, "planned_peak_bytes": planned_peak_bytes(graph, memory),
            "eager_peak_bytes": eager_peak, "planned_buffers": memory.planned_count}


def _class_peak(graph: fx.Graph, classes: _Classes, owned) -> int:
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    spans: Dict[fx.Node, List[int]] = {}  # class -> [first def, last use, bytes]
    outputs = {x for n in nodes if n.op == "output" for x in n.all_input_nodes}
    for n in nodes:
        root = classes.find(n)
        span = spans.setdefault(root, [len(nodes), 0, 0])
        size = owned(n) if n.op == "call_function" else 0
        if size:
            span[0] = min(span[0], pos[n])
            span[2] += size
        span[1] = max([span[1], pos[n]] + [pos[u] for u in n.users] + ([len(nodes)] if n in outputs else []))
    return _peak((s, e, b) for s, e, b in spans.values() if b)


def _peak(spans: Iterable[Tuple[int, int, int]]) -> int:
    events: Dict[int, int] = {}
    for start, end, size in spans:
        events[start] = events.get(start, 0) + size
        events[end + 1] = events.get(end + 1, 0) - size
    live = best = 0
    for t in sorted(events):
        live += events[t]
        best = max(best, live)
    return best


def _extent(shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes from the first to one past the last element of a tensor at storage offset 0."""
    if any(int(s) == 0 for s in shape):
        return 0
    return (1 + sum((int(s) - 1) * abs(int(st)) for s, st in zip(shape, stride))) * dtype.itemsize


def _value_bytes(val: Any) -> int:
    if isinstance(val, torch.Tensor):
        try:
            return _aligned(_extent(val.shape, val.stride(), val.dtype))
        except (TypeError, RuntimeError):  # symbolic sizes: not counted
            return 0
    if isinstance(val, (list, tuple)):
        return sum(_value_bytes(v) for v in val)
    return 0


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
