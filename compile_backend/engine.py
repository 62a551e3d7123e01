"""Engine: runs a compiled graph as straight-line Python over kernels and ATen calls.

The partitioned graph is turned into the source of one Python function: each kernel group is
one call, every other node (views, getitem, mutation epilogues, groups ATen runs) is a direct
ATen call, and values are deleted after their last use so memory is returned as eagerly as in
eager mode. Constants (frozen weights and folded values) are read from a table each call, so a
refit only swaps or updates table entries and never regenerates code.

With a memory plan (``memory_plan.plan``), kernels that can write into given tensors get views
of one arena the engine allocates once: ``kernel_3(v1, v2, out=(buf_a, None))``. Calls then
share memory, so an engine with an arena runs one call at a time (a lock; on CUDA a call on
another stream than the last one first waits for that stream's work).
"""
from __future__ import annotations

import contextlib
import math
import operator
import threading
import warnings
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .cuda_graph import CudaGraphRunner, items_at
from .fx_passes.constant_fold import ConstantProgram
from .fx_passes.rules import written_placeholders
from .kernels.base import INTERPRETER_LOCK, Kernel, KernelGroup
from .weights import WeightWatch

#: a tensor's version counter, read in a C-level pass over the frozen weights (``Engine._stale``)
_VERSION = operator.attrgetter("_version")


class GroupCall:
    """Graph target standing for one kernel group until its kernel is chosen."""

    def __init__(self, index: int, group: KernelGroup):
        self.index, self.group = index, group
        self.kernel: Kernel | None = None
        # outputs the kernel writes into given tensors, passed as out= by the engine:
        # {output index: (node, slice index)}: a slice of a stack's buffer (stack_outputs.py),
        # or with index None the node's tensor itself, an input written in place (input_writes.py)
        self.out_views: Dict[int, Tuple[fx.Node, Optional[int]]] = {}
        self.__name__ = f"kernel_{index}"

    def __call__(self, *args: Any, out: Optional[Sequence[Any]] = None) -> Tuple[Any, ...]:
        if out is not None:  # only planned for kernels with supports_out
            return self.kernel(*args, out=out)
        return (self.kernel or self.group.reference)(*args)

    def __repr__(self) -> str:
        return f"<{self.__name__} {self.group.kind}>"


class WeightLayoutChanged(Exception):
    """A frozen weight was replaced by a tensor of another shape, stride, dtype or device: the
    engine's kernels were built for the old layout, so the caller must build a new engine."""


class Engine:
    """A compiled graph for one set of input shapes."""

    def __init__(
        self,
        graph: fx.Graph,
        n_args: int,
        constants: Dict[str, Any],
        programs: Sequence[ConstantProgram] = (),
        frozen: Dict[int, str] | None = None,
        args: Sequence[Any] = (),
        memory: Any = None,  # memory_plan.MemoryPlan of ``graph``
        device: Optional[torch.device] = None,
        interpreted: bool = False,  # its kernels run in Triton's interpreter (not thread-safe)
        calls: Sequence[GroupCall] = (),  # its kernel groups, in graph order (the cached plan)
        fallbacks: Optional[Dict[str, List[Dict[str, str]]]] = None,  # per group: why ATen runs it
        first_call_context: Callable[[], ContextManager] = contextlib.nullcontext,
        cuda_graph: bool = False,  # record the launches once and replay them (CUDA)
        static_inputs: Sequence[int] = (),  # arguments at a stable address (a training graph's weights)
        returned_outputs: Optional[int] = None,  # a training forward's outputs the caller gets (then saved ones)
    ):
        self.device = device
        self.constants = constants
        self.programs = list(programs)
        self.frozen = dict(frozen or {})  # arg index -> constant name
        self._const_names = list(constants)
        self.memory = memory if memory is not None and memory.buffers else None
        self.arena: Optional[torch.Tensor] = None  # never reallocated: a CUDA graph records it
        outs: Dict[str, Dict[int, torch.Tensor]] = {}
        if self.memory is not None:
            self.arena = torch.empty(self.memory.arena_bytes, dtype=torch.uint8, device=device)
            for b in self.memory.buffers:
                outs.setdefault(b.call, {})[b.output] = b.view(self.arena)
        self._lock = threading.Lock()  # calls share the arena (taken only when there is one)
        self._interpreted = interpreted
        self._stream: Any = None  # CUDA stream of the last call's launches
        self.source, self._fn = _generate(graph, self._const_names, outs)
        self._table = [constants[n] for n in self._const_names]
        self.n_args = n_args
        self._watch = WeightWatch()
        self._bind(args)
        self.calls, self.fallbacks = list(calls), dict(fallbacks or {})
        # the first call (and the CUDA graph's recording in it) runs inside this context: the
        # pipeline points Triton's binary cache at our cache there, so the kernels and launchers
        # Triton loads or builds lazily on that call come from (and go to) our cache directory
        self.first_call_context = first_call_context
        self._called = False
        # inputs the engine writes (a KV cache updated in place): a CUDA graph records them where
        # the caller keeps them instead of copying them in (and back out)
        self.written_inputs = written_inputs(graph)
        # and those it reads where they are, recording again if one moves (cuda_graph.py)
        self.static_inputs = frozenset(static_inputs)
        # a CUDA graph copies those out and hands the saved ones out (freed after the backward)
        self.returned_outputs = returned_outputs
        self.cuda_graph: CudaGraphRunner | None = CudaGraphRunner(self) if cuda_graph else None
        self.cache_key: Optional[str] = None  # the engine cache's key, when it came through the cache

    def __call__(self, args: Sequence[Any]) -> Any:
        if not self._called:
            self._called = True
            with self.first_call_context():
                return self._call(args)
        return self._call(args)

    def _call(self, args: Sequence[Any]) -> Any:
        if self._bound:
            if self._stale(args):
                self.refit(args)
            elif self._watch.due() and self._watch.changed(args[i] for i in self.frozen):
                self._watch.every_call = True
                warnings.warn(
                    "compile_backend: frozen weights changed without PyTorch recording it (a write "
                    "through .data?); refitting. Call compile_backend.refit(model) after such updates, "
                    "or compile with options={'freeze': False}, to never run on stale weights.",
                    stacklevel=4)
                self.refit(args)
        if self.cuda_graph is not None and self.cuda_graph.usable:
            return self.cuda_graph(args)
        return self.run(args)

    def run(self, args: Sequence[Any]) -> Any:
        """One call without a CUDA graph; with an arena, one call at a time."""
        if self._interpreted:
            with INTERPRETER_LOCK:
                return self._run_planned(args)
        return self._run_planned(args)

    def launch(self, args: Sequence[Any]) -> Any:
        """The launches alone: no lock, no stream bookkeeping (the CUDA graph runner records
        and warms up with this under its own lock)."""
        return self._fn(args, self._table)

    def _run_planned(self, args: Sequence[Any]) -> Any:
        if self.arena is None:
            return self._fn(args, self._table)
        with self._lock:
            if self.arena.device.type != "cuda":
                return self._fn(args, self._table)
            # the previous call's launches, on another stream, may still use the arena: wait for
            # everything enqueued there so far (an event, as the CUDA graph runner's); on the
            # same stream, stream order already serialises them
            stream = torch.cuda.current_stream(self.arena.device)
            if self._stream is not None and self._stream != stream:
                stream.wait_stream(self._stream)
                self.arena.record_stream(stream)  # freed after this stream's work too
            self._stream = stream
            return self._fn(args, self._table)

    def _bind(self, args: Sequence[Any]) -> None:
        # the user's own tensor objects, storages and versions: an in-place update bumps the
        # version, ``p.data = new`` moves the storage (writes through ``.data`` do neither: see
        # compile_backend.weights)
        self._bound = {i: (args[i], args[i].data_ptr(), args[i]._version) for i in self.frozen}
        self._watch.remember(args[i] for i in self.frozen)
        # the same, as lists the per-call check compares in C-level passes: a decoder passes
        # ~270 weights, and a Python loop over them cost ~60 us a call, as much as the rest of
        # our per-call work together
        self._frozen_args = items_at(tuple(self._bound))
        self._bound_tensors = [t for t, _, _ in self._bound.values()]
        self._bound_ptrs = [ptr for _, ptr, _ in self._bound.values()]
        self._bound_versions = [version for _, _, version in self._bound.values()]

    def _stale(self, args: Sequence[Any]) -> bool:
        """Whether a frozen weight changed since the last bind: another tensor object, a new
        version (an in-place update), another storage (``p.data = new``). Raises
        ``WeightLayoutChanged`` for a new tensor of another layout."""
        tensors = self._bound_tensors
        # the same objects (then reading the bound tensors reads the caller's), same versions,
        # same storages: the answer on nearly every call, found without a Python-level loop
        if all(map(operator.is_, self._frozen_args(args), tensors)) and \
                list(map(_VERSION, tensors)) == self._bound_versions and \
                list(map(torch.Tensor.data_ptr, tensors)) == self._bound_ptrs:
            return False
        return self._stale_weights(args)

    def _stale_weights(self, args: Sequence[Any]) -> bool:
        """``_stale``, weight by weight: which one changed, and how."""
        stale = False
        for i, (tensor, ptr, version) in self._bound.items():
            new = args[i]
            if new is not tensor:
                if (new.shape, new.stride(), new.dtype, new.device) != \
                        (tensor.shape, tensor.stride(), tensor.dtype, tensor.device):
                    raise WeightLayoutChanged(f"weight {i} changed from {tuple(tensor.shape)} "
                                              f"{tensor.dtype} to {tuple(new.shape)} {new.dtype}")
                stale = True
            elif tensor._version != version or tensor.data_ptr() != ptr:
                stale = True
        return stale

    def refit(self, args: Sequence[Any]) -> None:
        """Rebind frozen weights to ``args`` and recompute every folded constant from them."""
        before = [t.data_ptr() if isinstance(t, torch.Tensor) else None for t in self._table]
        for i, name in self.frozen.items():
            self.constants[name] = args[i].detach()
        for program in self.programs:
            for name, value in program.run(self.constants).items():
                old = self.constants.get(name)
                if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) and \
                        old.shape == value.shape and old.dtype == value.dtype:
                    old.copy_(value)  # folded constants own their memory: update in place
                else:
                    self.constants[name] = value
        self._table[:] = [self.constants[n] for n in self._const_names]
        self._bind(args)
        after = [t.data_ptr() if isinstance(t, torch.Tensor) else None for t in self._table]
        if self.cuda_graph is not None and before != after:
            self.cuda_graph.invalidate()  # a recorded graph reads constants at fixed addresses


def written_inputs(graph: fx.Graph) -> frozenset:
    """Argument indices of the inputs the engine graph writes: through an ATen op (``copy_``)
    or as a kernel's ``out=`` tensor (input_writes.py)."""
    nodes = set(written_placeholders(graph))
    for node in graph.nodes:
        if isinstance(node.target, GroupCall):
            nodes.update(n for n, index in node.target.out_views.values() if index is None and n.op == "placeholder")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return frozenset(n.meta.get("arg_index", placeholders.index(n)) for n in nodes)


# --------------------------------------------------------------------------- code generation
def _generate(graph: fx.Graph, const_names: List[str],
              outs: Dict[str, Dict[int, torch.Tensor]]) -> Tuple[str, Callable]:
    """``outs``: per group-call node name, the planned tensors its kernel writes, by output."""
    globals_: Dict[str, Any] = {}
    names: Dict[fx.Node, str] = {}
    ids: Dict[int, str] = {}
    const_index = {n: i for i, n in enumerate(const_names)}

    def glob(obj: Any, hint: str) -> str:
        key = id(obj)
        if key not in ids:
            base = "".join(c if c.isalnum() else "_" for c in hint)[:40] or "g"
            name = f"{base}_{len(globals_)}"
            globals_[name] = obj
            ids[key] = name
        return ids[key]

    def fmt(a: Any) -> str:
        if isinstance(a, fx.Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(fmt(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if a is None or isinstance(a, (bool, int, str)):
            return repr(a)
        if isinstance(a, float) and math.isfinite(a):
            return repr(a)
        return glob(a, type(a).__name__)

    nodes = list(graph.nodes)
    last_use: Dict[fx.Node, fx.Node] = {}
    for node in nodes:
        written = [n for n, _ in node.target.out_views.values()] if isinstance(node.target, GroupCall) else []
        for inp in [*node.all_input_nodes, *written]:  # a tensor a kernel writes lives until then
            last_use[inp] = node
    frees: Dict[fx.Node, List[str]] = {}

    lines = ["def run(args, CONST):"]
    placeholder_index = 0
    for node in nodes:
        var = f"v{len(names)}"
        if node.op == "placeholder":
            index = node.meta.get("arg_index", placeholder_index)
            placeholder_index += 1
            names[node] = var
            lines.append(f"    {var} = args[{index}]")
        elif node.op == "get_attr":
            names[node] = var
            lines.append(f"    {var} = CONST[{const_index[node.target]}]")
        elif node.op == "call_function":
            names[node] = var
            if node.target is operator.getitem:
                lines.append(f"    {var} = {fmt(node.args[0])}[{fmt(node.args[1])}]")
            else:
                fn = glob(node.target, getattr(node.target, "__name__", "fn"))
                call_args = [fmt(a) for a in node.args]
                call_args += [f"{k}={fmt(v)}" for k, v in node.kwargs.items()]
                sliced = node.target.out_views if isinstance(node.target, GroupCall) else {}
                if node.name in outs or sliced:  # views of the arena, made once: constants of the source
                    n_out = len(node.target.group.outputs)
                    views = [glob(outs[node.name][k], "buf") if k in outs.get(node.name, {}) else
                             _out_view(names[sliced[k][0]], sliced[k][1]) if k in sliced else "None"
                             for k in range(n_out)]
                    call_args.append("out=(" + "".join(v + ", " for v in views) + ")")
                lines.append(f"    {var} = {fn}({', '.join(call_args)})")
        elif node.op == "output":
            lines.append(f"    return {fmt(node.args[0])}")
            continue
        else:
            raise NotImplementedError(f"engine cannot run node op {node.op!r} ({node})")
        written = [n for n, _ in node.target.out_views.values()] if isinstance(node.target, GroupCall) else []
        for inp in [*node.all_input_nodes, *written]:
            if last_use.get(inp) is node and inp.op != "get_attr":
                frees.setdefault(node, []).append(names[inp])
        if not node.users and node.op == "call_function":
            frees.setdefault(node, []).append(var)
        if node in frees:
            lines.append(f"    del {', '.join(dict.fromkeys(frees[node]))}")
    source = "\n".join(lines) + "\n"
    code = compile(source, "<compile_backend engine>", "exec")
    scope: Dict[str, Any] = dict(globals_)
    exec(code, scope)  # our own generated source, built from the graph above
    return source, scope["run"]


def _out_view(name: str, index: Optional[int]) -> str:
    return name if index is None else f"{name}[{index}]"
