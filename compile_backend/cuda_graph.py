"""CUDA-graph replay of an engine, with outputs handed to the caller without a copy.

A recorded graph writes its outputs at fixed addresses, so a replay overwrites what the last
one returned. Cloning every output after each replay keeps the caller safe but costs a device
copy per call (GPT-2's 411 MB of logits: about 0.2 ms of a 2.7 ms call on an H200). Instead
the runner records up to two *hand-out* slots, each a graph with its own output memory, and
returns views of a slot's outputs directly. Before replaying a slot it checks that the caller
no longer holds any of that slot's outputs (the outputs' storage reference counts are back to
what they were right after recording). The usual loop ``out = model(x)`` keeps one output
alive while the next call runs, so two slots alternate and nothing is copied.

A training forward's outputs are of two kinds: those the caller gets (``Engine.returned_outputs``,
the first ones), which are copied, and the activations saved for the backward, handed out and
released by autograd after it; so one recording serves every step, whatever the caller keeps.

A caller that keeps more outputs (appending them to a list) finds both slots held; the runner
then replays a third recording, the *copy* slot, whose outputs are only ever cloned, so no
output a caller holds is ever overwritten. Outputs in an input's memory (the input itself or a
view of it, also where the input is copied into a buffer of the runner) are handed back as that
view of the caller's tensor, as eager returns them; outputs in a constant's memory are cloned (a
refit writes there).

Where the storage reference count cannot be read (a PyTorch without
``torch._C._storage_Use_Count``), every output is cloned, as before.

Inputs at a stable address are *borrowed*: recorded where the caller keeps them, so a replay
reads (and, for inputs the engine writes, writes) the caller's tensor, with no copy in or out.
They are the inputs the engine writes (a decode step's KV caches: most of the bytes it would
copy) and a training graph's static inputs (``Engine.static_inputs``: the forward's parameters,
the backward's saved activations). The runner keeps their addresses, not the tensors (a cache
the caller drops is freed at once), and keeps the recordings per set of addresses (a
*binding*): a caller alternating two caches, or a backward reading saved activations from
more than one place, replays one recording per binding, up to
``MAX_BINDINGS`` (least recently used dropped). A borrowed input seen at more than
``MAX_ADDRESSES`` addresses (a new tensor every call) is copied instead: into a buffer of the
runner before each replay, and, if the engine writes it, back after. An engine with borrowed
inputs runs its first call outside the graph, for real (the warm-up, writing the caller's tensor
once, as eager does), and records on the second. An output that is an input, or a view of
one (a forward returning a weight or its batch, saved for the backward), is handed out as that
view of the caller's tensor, never cloned.
"""
from __future__ import annotations

import logging
import operator
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import torch
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger("compile_backend")

HAND_OUT_SLOTS = 2  # recordings whose outputs are returned without a copy
MAX_ADDRESSES = 3  # a borrowed input seen at more addresses than this is copied instead
MAX_BINDINGS = 3  # sets of borrowed addresses whose recordings are kept
storage_use_count: Optional[Callable[[int], int]] = getattr(torch._C, "_storage_Use_Count", None)


def items_at(indices: Sequence[int]) -> Callable[[Sequence[Any]], tuple]:
    """``seq -> tuple(seq[i] for i in indices)`` in one C call: the per-call checks pick their
    arguments out of hundreds (``operator.itemgetter``, which returns a bare item for one index)."""
    indices = tuple(indices)
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    if indices:
        (only,) = indices
        return lambda seq: (seq[only],)
    return lambda seq: ()


class OutputLease:
    """Whether anyone besides the runner still holds a recording's output storages.

    ``owned`` are the output tensors the recording allocated; right after recording, each
    storage's strong reference count is remembered. Handing out adds a reference per view;
    the lease is free again once every count is back to its remembered value."""

    def __init__(self, owned: Sequence[torch.Tensor]):
        storages = {}
        for t in owned:
            storages.setdefault(t.untyped_storage().data_ptr(), t)
        self.refs = [StorageWeakRef(t.untyped_storage()) for t in storages.values()]
        # what storage_use_count reads, kept alive by the weak references above
        self.storage_impls = [r.cdata for r in self.refs]
        self.baseline = [storage_use_count(r.cdata) for r in self.refs] if storage_use_count else []

    def free(self) -> bool:
        return all(map(operator.le, map(storage_use_count, self.storage_impls), self.baseline))


class InputView:
    """An output in an input's memory (a borrowed input, or the buffer a copied one is copied
    into): rebuilt per call as that view of the caller's tensor, as eager returns it (a recording
    holding the tensor would keep a cache the caller dropped alive; a copy would cost a clone)."""

    def __init__(self, index: int, t: torch.Tensor, base: torch.Tensor):
        self.index = index
        self.offset = t.storage_offset() - base.storage_offset()  # from the input's first element
        self.same = (t.shape, t.stride(), self.offset) == (base.shape, base.stride(), 0)
        self.size, self.stride = tuple(t.shape), tuple(t.stride())

    def of(self, args: Sequence[Any]) -> torch.Tensor:
        arg = args[self.index]
        return arg if self.same else arg.as_strided(self.size, self.stride, arg.storage_offset() + self.offset)


class Recording:
    """One recording: its graph, its outputs, who may still read them. With ``returned`` (a
    training forward), only the outputs past the first ``returned`` top-level ones (the values
    saved for the backward, which autograd drops after it) are handed out; those the caller gets
    are copied, so a caller keeping its outputs never holds the recording."""

    def __init__(self, graph: Any, static_out: Any, fixed: Set[int], hand_out: bool,
                 inputs: Optional[Dict[int, torch.Tensor]] = None, returned: Optional[int] = None):
        # ``inputs``: per argument, the tensor the recording read it from (the caller's, borrowed,
        # or the runner's buffer); outputs in their memory become views of the caller's tensor
        storages = {t.untyped_storage().data_ptr(): (i, t) for i, t in (inputs or {}).items()}
        static_out = _map(static_out, lambda t: _input_view(storages, t))
        self.graph, self.static_out = graph, static_out
        self.hand_out = hand_out and storage_use_count is not None
        top = static_out if isinstance(static_out, (list, tuple)) else [static_out]
        # per output tensor (in _map's order): handed out (the recording's own memory, not one the
        # caller gets) or cloned (an input buffer, a constant, a returned output)
        self.handed = [self.hand_out and (returned is None or i >= returned) and t.untyped_storage().data_ptr() not in fixed
                       for i, o in enumerate(top) for t in _tensors(o)]
        tensors = _tensors(static_out)
        self.lease = OutputLease([t for t, h in zip(tensors, self.handed) if h]) if self.hand_out else None
        self.stream: Any = None  # the stream of the last replay: a later one on another waits for it
        # the usual inference call: a flat list or tuple of outputs, every one handed out
        self.flat_handed = type(static_out) in (list, tuple) and all(self.handed) and \
            all(isinstance(o, torch.Tensor) for o in static_out)

    def free(self) -> bool:
        return self.lease is None or self.lease.free()

    def outputs(self, args: Sequence[Any]) -> Any:
        if self.flat_handed:
            return type(self.static_out)(map(torch.Tensor.detach, self.static_out))
        handed = iter(self.handed)
        return _map(self.static_out, lambda t: t.detach() if next(handed) else t.clone(), lambda v: v.of(args))


class Binding:
    """The recordings made for one set of borrowed inputs' addresses."""

    def __init__(self) -> None:
        self.slots: List[Recording] = []  # hand-out recordings
        self.copy_slot: Optional[Recording] = None  # recorded once every hand-out slot was held
        self.copy_failed = False


class CudaGraphRunner:
    """Replays an engine's launches from CUDA graphs.

    Inputs are copied into static buffers (skipped when the caller passes the static buffer
    itself), except the borrowed ones (module docstring); constants are read where they live, so
    a refit that updates them in place needs no re-recording, and one that moves them re-records
    on the next call. The engine's arena (planned intermediates) is allocated once and never
    moved, so every recording shares it. If recording fails (an op that synchronises, a CPU
    tensor), the engine runs without a graph.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.usable = True
        self.static_args: list = []  # per argument: its buffer (copied), None (borrowed) or itself
        self.prepared = False  # static_args made for the current borrowed set
        self.bindings: "OrderedDict[tuple, Binding]" = OrderedDict()  # least recently used first
        self.hand_out_slots = HAND_OUT_SLOTS
        self.lock = threading.Lock()  # replays share the static buffers and the arena
        self.last_stream: Any = None  # the stream of the last replay
        frozen = set(engine.frozen)
        self.written = set(getattr(engine, "written_inputs", ())) - frozen
        self._borrow((self.written | set(getattr(engine, "static_inputs", ()))) - frozen)
        self.copied_back: Set[int] = set()  # written inputs copied in and back out instead
        self.addresses: Dict[int, Set[int]] = {i: set() for i in self.borrowed}  # seen per borrowed input
        self.copied_in: List[tuple] = []  # (argument index, its buffer) per input copied in before a replay
        self.replays = 0
        self.warm = False  # the engine has run outside a graph on this device (lazy inits done)

    @property
    def slots(self) -> List[Recording]:  # the hand-out recordings of the last binding used
        return next(reversed(self.bindings.values())).slots if self.bindings else []

    @property
    def graph(self) -> Any:  # a recording (None before the first call or after a refit)
        return self.slots[0].graph if self.slots else None

    def invalidate(self) -> None:
        """Drop every recording (constants moved); outputs callers hold stay theirs."""
        self.bindings.clear()
        self.static_args, self.prepared, self.copied_in = [], False, []

    def _borrow(self, borrowed: Set[int]) -> None:
        self.borrowed = borrowed
        self.order = tuple(sorted(borrowed))  # the binding key's inputs
        self.borrowed_args = items_at(self.order)

    def __call__(self, args: Sequence[Any]) -> Any:
        with self.lock:
            stream = torch.cuda.current_stream()
            if self.last_stream is not None:
                if self.last_stream == stream:
                    # one object while the stream stays: the slot's check below is then `is`
                    stream = self.last_stream
                else:
                    stream.wait_stream(self.last_stream)  # the previous replay, on another stream, must finish
            if self.borrowed and not self.warm:
                self.warm = True  # this call, run for real, is the warm-up; the next one records
                self._tensors_only(args)
                self._seen(args)
                return self.engine.run(args)
            binding = self._binding(args)
            if not binding.slots:
                try:
                    if not self.prepared:
                        self._warm_up(args)
                    binding.slots.append(self._record(args, hand_out=True))
                except Exception as exc:
                    log.warning("compile_backend: CUDA graph recording failed (%s: %s); running "
                                "this engine without a graph", type(exc).__name__, exc)
                    self.usable = False
                    torch.cuda.synchronize()
                    return self.engine.run(args)
            # every call: the warm-up may have written the copies of written inputs
            for i, static in self.copied_in:
                arg = args[i]
                if static is not arg and static.data_ptr() != arg.data_ptr():
                    static.copy_(arg)
            slot = self._free_slot(binding, args)
            if slot is None:  # every recording's outputs are held and no copy recording could be made
                return self.engine.run(args)
            if slot.stream is not None and slot.stream is not stream and slot.stream != stream:
                stream.wait_stream(slot.stream)  # the caller may have read its outputs there
            slot.graph.replay()
            self.replays += 1
            for i in self.copied_back:
                if self.static_args[i].data_ptr() != args[i].data_ptr():
                    args[i].copy_(self.static_args[i])
            slot.stream = stream
            self.last_stream = stream
            return slot.outputs(args)

    def _tensors_only(self, args: Sequence[Any]) -> None:
        """Borrow tensors only (a size among the static inputs is a value, not an address)."""
        self._borrow({i for i in self.borrowed if isinstance(args[i], torch.Tensor)})
        self.written &= self.borrowed
        self.addresses = {i: self.addresses.get(i, set()) for i in self.borrowed}

    def _key(self, args: Sequence[Any]) -> tuple:
        return tuple(map(torch.Tensor.data_ptr, self.borrowed_args(args)))

    def _seen(self, args: Sequence[Any]) -> List[int]:
        """Remember the borrowed inputs' addresses; those not seen before."""
        new = [i for i in self.borrowed if args[i].data_ptr() not in self.addresses[i]]
        for i in new:
            self.addresses[i].add(args[i].data_ptr())
        return new

    def _binding(self, args: Sequence[Any]) -> Binding:
        """The recordings for the borrowed inputs' addresses in ``args`` (a new, empty binding
        for addresses not met together before). A borrowed input met at too many addresses
        is copied from then on: every recording is dropped, as they all read it in place."""
        key = self._key(args)
        binding = self.bindings.get(key)
        if binding is not None:
            self.bindings.move_to_end(key)
            return binding
        restless = {i for i in self._seen(args) if len(self.addresses[i]) > MAX_ADDRESSES}
        if restless:
            log.info("compile_backend: inputs %s come in a new tensor nearly every call; copying them "
                     "into the CUDA graph's buffers instead of recording again", sorted(restless))
            self._borrow(self.borrowed - restless)
            self.copied_back |= restless & self.written
            self.invalidate()
            key = self._key(args)
        binding = self.bindings[key] = Binding()
        if len(self.bindings) > MAX_BINDINGS:
            self.bindings.popitem(last=False)
        return binding

    def _free_slot(self, binding: Binding, args: Sequence[Any]) -> Optional[Recording]:
        for slot in binding.slots:
            if slot.free():
                return slot
        if len(binding.slots) < self.hand_out_slots:
            try:
                binding.slots.append(self._record(args, hand_out=True))
                return binding.slots[-1]
            except Exception as exc:  # memory, most likely: keep to the slots there are
                log.warning("compile_backend: a second CUDA graph recording failed (%s: %s); "
                            "outputs held across calls are copied", type(exc).__name__, exc)
                self.hand_out_slots = len(binding.slots)
        if binding.copy_slot is None and not binding.copy_failed:
            try:
                binding.copy_slot = self._record(args, hand_out=False)
            except Exception as exc:  # then such calls run without a graph (fresh outputs)
                log.warning("compile_backend: the CUDA graph copy recording failed (%s: %s); calls made "
                            "while every earlier output is held run without a graph", type(exc).__name__, exc)
                binding.copy_failed = True
        return binding.copy_slot

    def _warm_up(self, args: Sequence[Any]) -> None:
        """Static buffers for the copied inputs, and, unless the engine already ran for real
        (``warm``: an engine with borrowed inputs, whose first call was its warm-up, as a copy
        of a borrowed cache for a warm-up to write would double its memory for a moment), two
        runs outside the graph (lazy inits, workspace allocation) on a side stream."""
        frozen = set(self.engine.frozen)
        self.static_args = [
            None if i in self.borrowed else  # not held: a cache the caller drops is freed at once
            torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
            if isinstance(a, torch.Tensor) and i not in frozen else a
            for i, a in enumerate(args)
        ]
        self.prepared = True
        # the inputs copied in before each replay: neither weights nor borrowed (looping over only
        # these matters: a decoder passes 200 weights and 44 caches beside its 2 small inputs)
        self.copied_in = [(i, self.static_args[i]) for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                          and i not in frozen and i not in self.borrowed]
        if self.warm:
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # the warm-up runs draw random numbers the user's call must not see consumed
        device = next((a.device.index or 0 for a in args if isinstance(a, torch.Tensor)), 0)
        with torch.cuda.stream(side), torch.random.fork_rng(devices=[device]):
            for _ in range(2):  # warm-up outside the graph: lazy inits, workspace allocation
                self.engine.launch(self.static_args)
        torch.cuda.current_stream().wait_stream(side)
        self.warm = True

    def _record(self, args: Sequence[Any], hand_out: bool) -> Recording:
        """Record the launches on the static buffers and this call's borrowed tensors (a replay
        happens only when the caller passes tensors at those addresses again: ``_binding``)."""
        bound = [args[i] if i in self.borrowed else t for i, t in enumerate(self.static_args)]
        graph = torch.cuda.CUDAGraph()
        # thread_local: the default ("global") mode makes any other thread's unsafe CUDA call
        # (an allocation, a synchronize) during the capture fail there and invalidate the
        # capture; a user's other threads must never see an error because an engine records
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.engine.launch(bound)
        fixed = {t.untyped_storage().data_ptr() for t in bound if isinstance(t, torch.Tensor)}
        fixed |= {t.untyped_storage().data_ptr() for t in self.engine.constants.values()
                  if isinstance(t, torch.Tensor)}
        inputs = {i: t for i, t in enumerate(bound) if isinstance(t, torch.Tensor) and i not in self.engine.frozen}
        return Recording(graph, static_out, fixed, hand_out, inputs, getattr(self.engine, "returned_outputs", None))


def _input_view(storages: Dict[int, tuple], t: torch.Tensor) -> Any:
    """``t``, or an InputView when it lies in an input's memory (``storages``: storage address ->
    (argument index, the tensor the recording read it from))."""
    found = storages.get(t.untyped_storage().data_ptr())
    return InputView(found[0], t, found[1]) if found is not None else t


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _map(out: Any, fn: Callable[[torch.Tensor], Any], view: Optional[Callable[[InputView], Any]] = None) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, InputView) and view is not None:
        return view(out)
    if isinstance(out, (list, tuple)):
        return type(out)(_map(o, fn, view) for o in out)
    return out
