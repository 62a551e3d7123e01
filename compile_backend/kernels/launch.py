"""Shared pieces of the generated pointwise/reduction kernels: configs, heuristics, loading.

* Configs are frozen dataclasses validated at construction; builders take one as a parameter
  (``config=None`` means "use the heuristic") so an autotuner can rebuild a group with others,
  and ``Kernel.config`` carries ``dataclasses.asdict(config)``.
* :func:`load_source` turns generated source into a module, once per distinct source per
  process (the memo is keyed by the source text itself), so the same group compiles once.
  ``triton.jit`` reads its function's source with ``inspect``: the source is registered in
  ``linecache`` rather than written to a file.

Importing this module does not import Triton; the generated modules do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import linecache
import sys
import threading
from collections import OrderedDict
from types import ModuleType
from typing import Any, Optional, Tuple

_POW2 = tuple(1 << i for i in range(20))


def _check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in _POW2 or not lo <= value <= hi:
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class PointwiseConfig:
    """Launch parameters of a generated pointwise kernel: BLOCK elements per program."""

    block: int = 1024
    num_warps: int = 4

    def __post_init__(self) -> None:
        _check_pow2("block", self.block, 16, 1 << 16)
        _check_pow2("num_warps", self.num_warps, 1, 32)


@dataclasses.dataclass(frozen=True)
class ReductionConfig:
    """Launch parameters of a generated row reduction.

    xblock rows per program; rblock row elements per step. persistent: the whole row is held
    in registers (rblock >= row length) and read once; otherwise the kernel loops over the row
    in rblock chunks, re-reading it once per reduction stage. split: programs per block of rows,
    each reducing a contiguous part of the row (looped kernels of one stage, see reduction.py):
    a whole-tensor sum, one row of millions of elements, is otherwise one program on one SM.
    """

    xblock: int = 1
    rblock: int = 1024
    num_warps: int = 4
    persistent: bool = True
    split: int = 1

    def __post_init__(self) -> None:
        _check_pow2("xblock", self.xblock, 1, 4096)
        _check_pow2("rblock", self.rblock, 1, 1 << 16)
        _check_pow2("num_warps", self.num_warps, 1, 32)
        if not isinstance(self.persistent, bool):
            raise ValueError(f"persistent must be True or False, got {self.persistent!r}")
        if self.xblock * self.rblock > (1 << 16):
            raise ValueError(f"xblock * rblock must be at most 65536, got {self.xblock * self.rblock}")
        _check_pow2("split", self.split, 1, SPLIT_MAX)
        if self.split > 1 and self.persistent:
            raise ValueError("a split reduction loops over its part of the row: persistent must be False")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pointwise_heuristic(numel: int) -> PointwiseConfig:
    """Enough elements per thread for 16-byte accesses, fewer programs on large tensors."""
    if numel >= (1 << 22):
        return PointwiseConfig(block=2048, num_warps=8)
    if numel >= 4096:
        return PointwiseConfig(block=1024, num_warps=4)
    return PointwiseConfig(block=max(16, min(1024, next_pow2(numel))), num_warps=4 if numel > 1024 else 2)


# rows up to this many elements are held in registers (one read of the row); rows up to
# PERSISTENT_MAX_LIGHT too when the kernel reads a single row-shaped input (e.g. softmax):
# on H100 a 32768-element fp16 softmax row in 16 warps used 127 registers, no spills, and ran
# at 70% of copy bandwidth against 47% for the looped kernel (benchmarks/notes/codegen.md)
PERSISTENT_MAX = 16384
PERSISTENT_MAX_LIGHT = 32768


def reduction_heuristic(rows: int, row_len: int, row_contiguous: bool, row_inputs: int = 1) -> ReductionConfig:
    """Persistent when the row fits; several rows per program for short rows or when the
    reduced dim is strided and the kept dim is contiguous (column reductions)."""
    rp2 = next_pow2(row_len)
    if row_contiguous and row_inputs <= 1 and PERSISTENT_MAX < rp2 <= PERSISTENT_MAX_LIGHT:
        return ReductionConfig(xblock=1, rblock=rp2, num_warps=16, persistent=True)
    if not row_contiguous:
        # column-style: coalesce along rows, loop over the reduced dim in small chunks
        xblock = min(64, next_pow2(rows))
        rblock = min(rp2, max(1, 4096 // xblock))
        return ReductionConfig(xblock=xblock, rblock=rblock, num_warps=4, persistent=rblock >= row_len)
    if rp2 <= PERSISTENT_MAX:
        xblock = max(1, min(next_pow2(rows), 2048 // rp2)) if rp2 < 2048 else 1
        elems = xblock * rp2
        warps = 1 if elems <= 256 else 2 if elems <= 512 else 4 if elems <= 2048 else 8 if elems <= 8192 else 16
        return ReductionConfig(xblock=xblock, rblock=rp2, num_warps=warps, persistent=True)
    # looped: 16 warps x 8192 elements (~55 registers offline, sm_90) keep 2 programs per SM, so
    # fewer rows are in flight and a row read again in a later pass is still in L2
    return ReductionConfig(xblock=1, rblock=8192, num_warps=16, persistent=False)


#: split reductions: at most this many programs per block of rows; a row shorter than
#: SPLIT_MIN_ROW elements is never split (one program reads it in a few microseconds)
SPLIT_MAX = 1024
SPLIT_MIN_ROW = 1 << 16


def reduction_split(row_blocks: int, row_len: int, rblock: int, sm_count: int) -> int:
    """Programs per block of rows for a looped reduction: enough for about two programs per
    SM in all, each still looping over at least two chunks of ``rblock``; 1 when the rows
    alone fill the GPU or the row is short."""
    if row_len < SPLIT_MIN_ROW or row_blocks >= sm_count:
        return 1
    want = next_pow2(-(-2 * sm_count // row_blocks))
    most = max(1, row_len // (2 * rblock))
    most = 1 << (most.bit_length() - 1)  # a power of two, at most row_len / (2 rblock)
    return max(1, min(SPLIT_MAX, want, most))


class Counters:
    """One runner's split arrival counters (split-K GEMVs, split reductions, flash-decoding),
    reused by all its launches (each launch leaves them at 0). Launches that share them must not
    overlap: on one stream they cannot; a launch on another stream than the last first waits for
    that stream's work (not while a CUDA graph is being captured: the graph runner orders its
    warm-up and capture itself)."""

    def __init__(self) -> None:
        self.buffers: dict = {}
        self.stream: Any = None

    def get(self, size: int, device: Any) -> Any:
        import torch

        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            stream = torch.cuda.current_stream(device)
            if self.stream is not None and self.stream != stream:
                stream.wait_stream(self.stream)
            self.stream = stream
        buf = self.buffers.get(device)
        if buf is None or buf.numel() < size:
            buf = self.buffers[device] = torch.zeros(max(size, 256), dtype=torch.int32, device=device)
        return buf


# Process-wide memo of loaded kernel modules, least recently used first. Bounded: past
# MAX_MODULES the oldest is forgotten (with its sys.modules and linecache entries); engines that
# hold its kernels keep it alive, and a later identical source is simply compiled again.
MAX_MODULES = 4096
_MODULES: "OrderedDict[str, ModuleType]" = OrderedDict()
_LOCK = threading.Lock()
_stats = {"compiled": 0, "reused": 0}


def forget_loaded() -> int:
    """Forget every memoised module (how many): a later identical source is compiled again, as in
    a fresh process, while engines holding kernels keep theirs. For benchmarks that time a cold
    compile after another engine in the same process (``bench.measure.clean_slate``)."""
    with _LOCK:
        count = len(_MODULES)
        while _MODULES:
            _forget_oldest()
        return count


def _forget_oldest() -> None:
    """Drop the least recently used module with its sys.modules and linecache entries (under _LOCK)."""
    _, old = _MODULES.popitem(last=False)
    sys.modules.pop(old.__name__, None)
    linecache.cache.pop(f"<compile_backend generated k_{old.__name__.rsplit('_', 1)[-1]}>", None)


def load_source(source: str) -> ModuleType:
    """Run generated source as a module, memoised by the source text.

    The source never touches the disk: it is compiled from memory under a pseudo file name
    (``<compile_backend generated k_<sha256>>``) whose lines are registered in ``linecache``, which is
    where ``inspect.getsourcelines`` (used by ``triton.jit`` and its interpreter) and tracebacks
    read source from. So nothing accumulates in a temporary directory, and no code is ever
    read back from a shared path another user could have written."""
    with _LOCK:
        mod = _MODULES.get(source)
        if mod is not None:
            _MODULES.move_to_end(source)
            _stats["reused"] += 1
            return mod
        digest = hashlib.sha256(source.encode()).hexdigest()[:20]
        filename = f"<compile_backend generated k_{digest}>"
        # (size, mtime None, lines, name): mtime None keeps linecache.checkcache from dropping
        # the entry for want of a file on disk
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        name = f"compile_backend_gen_{digest}"
        mod = ModuleType(name)
        sys.modules[name] = mod
        exec(compile(source, filename, "exec"), mod.__dict__)  # noqa: S102  (our own generated code)
        _MODULES[source] = mod
        _stats["compiled"] += 1
        while len(_MODULES) > MAX_MODULES:
            _forget_oldest()
        return mod


def generated_source(module_name: str) -> Optional[str]:
    """The source text of a module :func:`load_source` made, by the module's name (None for any
    other module, or one forgotten since): how a kernel of ours is shipped to a compile worker."""
    prefix = "compile_backend_gen_"
    if not module_name.startswith(prefix):
        return None
    entry = linecache.cache.get(f"<compile_backend generated k_{module_name[len(prefix):]}>")
    return "".join(entry[2]) if entry else None


def memo_stats() -> Tuple[int, int]:
    """(distinct sources loaded, loads served from the memo) in this process."""
    return _stats["compiled"], _stats["reused"]


# ------------------------------------------------------------------------ graph/launch helpers
def map_nodes(value, env):
    """Replace FX nodes in an argument structure with their values from ``env``."""
    import torch.fx as fx

    if isinstance(value, fx.Node):
        return env[value]
    if isinstance(value, (list, tuple)):
        return type(value)(map_nodes(v, env) for v in value)
    return value


def dense_order(shape, stride):
    """Dims from outermost to innermost in memory (stable), or None when the strides are not
    a dense, non-overlapping permutation of ``shape``."""
    dims = sorted(range(len(shape)), key=lambda d: (-stride[d], d))
    expected = 1
    for d in reversed(dims):
        if shape[d] != 1 and stride[d] != expected:
            return None
        expected *= shape[d]
    return tuple(dims)


def strides_for(shape, order):
    """Strides of a dense tensor of ``shape`` whose dims lie in memory in ``order`` (outer first)."""
    stride = [0] * len(shape)
    running = 1
    for d in reversed(order):
        stride[d] = running
        running *= max(1, shape[d])
    return tuple(stride)


def output_order(meta):
    """Memory order to allocate an output like its reference (row-major when not dense)."""
    order = dense_order(tuple(meta.shape), tuple(meta.stride()))
    return order if order is not None else tuple(range(meta.dim()))
