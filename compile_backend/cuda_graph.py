"""CUDA-graph replay of an engine, with outputs handed to the caller without a copy.

A recorded graph writes its outputs at fixed addresses, so a replay overwrites what the last
one returned. Cloning every output after each replay keeps the caller safe but costs a device
copy per call (GPT-2's 411 MB of logits: about 0.2 ms of a 2.7 ms call on an H200). Instead
the runner records up to two *hand-out* slots, each a graph with its own output memory, and
returns views of a slot's outputs directly. Before replaying a slot it checks that the caller
no longer holds any of that slot's outputs (the outputs' storage reference counts are back to
what they were right after recording). The usual loop ``out = model(x)`` keeps one output
alive while the next call runs, so two slots alternate and nothing is copied.

A caller that keeps more outputs (appending them to a list) finds both slots held; the runner
then replays a third recording, the *copy* slot, whose outputs are only ever cloned, so no
output a caller holds is ever overwritten. Outputs that alias an input buffer or a constant
are always cloned (the next call's input copy or a refit writes there).

Where the storage reference count cannot be read (a PyTorch without
``torch._C._storage_Use_Count``), every output is cloned, as before.

Inputs the engine writes (a KV cache updated in place) are *borrowed*: recorded where the caller
keeps them, so a replay reads and writes the caller's tensor, with no copy in or out (a decode
step's caches are most of the bytes it would copy). The runner keeps their addresses, not the
tensors (a cache the caller drops is freed at once), and replays only when the caller passes
tensors at those addresses. An engine with borrowed inputs
runs its first call outside the graph, for real (the warm-up, writing the caller's tensor once,
as eager does), and records on the second. When the caller passes another tensor there (a new
cache), the runner records again for it; a caller that changes it nearly every call (fewer than
``REBIND_MIN_REPLAYS`` replays in between, after ``FREE_REBINDS``) gets copies instead: the
input is copied into a buffer of the runner before each replay and the buffer back after it.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import torch
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger("compile_backend")

HAND_OUT_SLOTS = 2  # recordings whose outputs are returned without a copy
FREE_REBINDS = 2  # records again for a borrowed input's new tensor at least this often
REBIND_MIN_REPLAYS = 4  # after that, only if the last tensor served this many replays
storage_use_count: Optional[Callable[[int], int]] = getattr(torch._C, "_storage_Use_Count", None)


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
        self.baseline = [storage_use_count(r.cdata) for r in self.refs] if storage_use_count else []

    def free(self) -> bool:
        return all(storage_use_count(r.cdata) <= b for r, b in zip(self.refs, self.baseline))


class Recording:
    """One recording: its graph, its outputs, who may still read them."""

    def __init__(self, graph: Any, static_out: Any, fixed: Set[int], hand_out: bool):
        self.graph, self.static_out = graph, static_out
        self.hand_out = hand_out and storage_use_count is not None
        tensors = _tensors(static_out)
        # an output whose storage the runner does not own (an input buffer, a constant) is cloned
        self.owned = {id(t) for t in tensors if t.untyped_storage().data_ptr() not in fixed}
        self.lease = OutputLease([t for t in tensors if id(t) in self.owned]) if self.hand_out else None
        self.stream: Any = None  # the stream of the last replay: a later one on another waits for it

    def free(self) -> bool:
        return self.lease is None or self.lease.free()

    def outputs(self) -> Any:
        return _map(self.static_out, lambda t: t.detach() if self.hand_out and id(t) in self.owned
                    else t.clone())


class CudaGraphRunner:
    """Replays an engine's launches from CUDA graphs.

    Inputs are copied into static buffers (skipped when the caller passes the static buffer
    itself), except those the engine writes, which are borrowed (module docstring); constants are
    read where they live, so a refit that updates them in place needs no re-recording, and one
    that moves them re-records on the next call. The engine's arena (planned intermediates) is
    allocated once and never moved, so every recording shares it. If recording fails (an op
    that synchronises, a CPU tensor), the engine runs without a graph.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.usable = True
        self.static_args: list = []
        self.slots: List[Recording] = []  # hand-out recordings
        self.copy_slot: Optional[Recording] = None  # recorded once both hand-out slots were held
        self.copy_failed = False
        self.hand_out_slots = HAND_OUT_SLOTS
        self.lock = threading.Lock()  # replays share the static buffers and the arena
        self.done = None  # event after the last replay
        # written inputs recorded on the caller's tensors; those given up on are copied back
        self.borrowed = set(getattr(engine, "written_inputs", ())) - set(engine.frozen)
        self.copied_back = set()
        self.rebinds, self.replays = 0, 0  # records for a borrowed input's new tensor; replays since
        self.copied_in: List[int] = []
        self.borrowed_ptrs: Dict[int, int] = {}  # borrowed input -> the address its recordings use
        self.warm = False  # the engine has run outside a graph on this device (lazy inits done)

    @property
    def graph(self) -> Any:  # the first recording (None before the first call or after a refit)
        return self.slots[0].graph if self.slots else None

    def invalidate(self) -> None:
        """Drop every recording (constants moved); outputs callers hold stay theirs."""
        self.slots, self.copy_slot, self.static_args, self.copy_failed = [], None, [], False

    def __call__(self, args: Sequence[Any]) -> Any:
        with self.lock:
            stream = torch.cuda.current_stream()
            if self.done is not None:  # the previous replay, maybe on another stream, must finish
                stream.wait_event(self.done)
            if self.slots and self._moved(args):
                self._rebind()
            if not self.slots and self.borrowed and not self.warm:
                self.warm = True  # this call, run for real, is the warm-up; the next one records
                return self.engine.run(args)
            if not self.slots:
                try:
                    self._warm_up(args)
                    self.slots.append(self._record(args, hand_out=True))
                except Exception as exc:
                    log.warning("compile_backend: CUDA graph recording failed (%s: %s); running "
                                "this engine without a graph", type(exc).__name__, exc)
                    self.usable = False
                    torch.cuda.synchronize()
                    return self.engine.run(args)
            # every call: the warm-up may have written the copies of written inputs
            for i in self.copied_in:
                static, arg = self.static_args[i], args[i]
                if static is not arg and static.data_ptr() != arg.data_ptr():
                    static.copy_(arg)
            slot = self._free_slot(args)
            if slot is None:  # every recording's outputs are held and no copy recording could be made
                return self.engine.run(args)
            if slot.stream is not None and slot.stream != stream:
                stream.wait_stream(slot.stream)  # the caller may have read its outputs there
            slot.graph.replay()
            self.replays += 1
            for i in self.copied_back:
                if self.static_args[i].data_ptr() != args[i].data_ptr():
                    args[i].copy_(self.static_args[i])
            slot.stream = stream
            out = slot.outputs()
            self.done = torch.cuda.Event()
            self.done.record(stream)
            return out

    def _free_slot(self, args: Sequence[Any]) -> Optional[Recording]:
        slot = next((s for s in self.slots if s.free()), None)
        if slot is not None:
            return slot
        if len(self.slots) < self.hand_out_slots:
            try:
                self.slots.append(self._record(args, hand_out=True))
                return self.slots[-1]
            except Exception as exc:  # memory, most likely: keep to the slots there are
                log.warning("compile_backend: a second CUDA graph recording failed (%s: %s); "
                            "outputs held across calls are copied", type(exc).__name__, exc)
                self.hand_out_slots = len(self.slots)
        if self.copy_slot is None and not self.copy_failed:
            try:
                self.copy_slot = self._record(args, hand_out=False)
            except Exception as exc:  # then such calls run without a graph (fresh outputs)
                log.warning("compile_backend: the CUDA graph copy recording failed (%s: %s); calls made "
                            "while every earlier output is held run without a graph", type(exc).__name__, exc)
                self.copy_failed = True
        return self.copy_slot

    def _moved(self, args: Sequence[Any]) -> bool:
        """A borrowed input came in another tensor than the one the recordings write."""
        return any(args[i].data_ptr() != self.borrowed_ptrs[i] for i in self.borrowed)

    def _rebind(self) -> None:
        """Record again for the new tensors, or, for a caller that changes them nearly every
        call, stop borrowing: copy those inputs in before each replay and back after it."""
        if self.rebinds >= FREE_REBINDS and self.replays < REBIND_MIN_REPLAYS:
            log.info("compile_backend: written inputs change tensors every few calls; copying them "
                     "in and out of the CUDA graph's buffers instead of recording again")
            self.copied_back |= self.borrowed
            self.borrowed = set()
        self.rebinds += 1
        self.invalidate()

    def _warm_up(self, args: Sequence[Any]) -> None:
        """Static buffers for the copied inputs, addresses of the borrowed ones, and two runs
        outside the graph (lazy inits, workspace allocation) on a side stream; not for an engine
        with borrowed inputs: its first call ran for real instead (``warm``), as a copy of a
        borrowed cache for the warm-up to write would double its memory for a moment."""
        frozen = set(self.engine.frozen)
        self.static_args = [
            None if i in self.borrowed else  # not held: a cache the caller drops is freed at once
            torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
            if isinstance(a, torch.Tensor) and i not in frozen else a
            for i, a in enumerate(args)
        ]
        self.borrowed_ptrs = {i: args[i].data_ptr() for i in self.borrowed}
        self.replays = 0
        # the inputs copied in before each replay: neither weights nor borrowed (looping over only
        # these matters: a decoder passes 200 weights and 44 caches beside its 2 small inputs)
        self.copied_in = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)
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
        happens only when the caller passes tensors at those addresses again: ``_moved``)."""
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
        return Recording(graph, static_out, fixed, hand_out)


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _map(out: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (list, tuple)):
        return type(out)(_map(o, fn) for o in out)
    return out
