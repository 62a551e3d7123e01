"""A small reader/writer for the safetensors file format, on top of json and raw bytes.

Why our own: the ``safetensors`` package is not installed everywhere (CPU CI), and the cache must
never unpickle anything (no ``torch.load``). The format is simple and is data only:

    8 bytes   little-endian unsigned header length N
    N bytes   JSON header: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
              optional "__metadata__": {str: str}}; padded with spaces to a multiple of 8
    rest      raw little-endian tensor bytes; offsets are relative to the start of this part

Files written here are readable by the ``safetensors`` package and the other way round. Tensors
are laid out largest element size first so every tensor starts at an offset its dtype divides.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import struct
import sys
from typing import BinaryIO, Dict, List, Mapping, Optional, Tuple

import torch

#: safetensors dtype names <-> torch dtypes (only those this torch build has)
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "C64": "complex64", "C128": "complex128",
}
NAME_TO_DTYPE: Dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _DTYPE_NAMES.items() if hasattr(torch, attr)
}
DTYPE_TO_NAME: Dict[torch.dtype, str] = {dtype: name for name, dtype in NAME_TO_DTYPE.items()}

#: a header larger than this is not something we wrote: refuse before allocating it
MAX_HEADER_BYTES = 100 * 1024 * 1024


class TensorFileError(ValueError):
    """The bytes are not a well-formed safetensors file (corrupt, truncated or foreign)."""


def _check_byte_order() -> None:
    if sys.byteorder != "little":  # the format is little-endian; raw copies would be wrong
        raise NotImplementedError("safetensors files are little-endian; this machine is not")


def _prepared(tensors: Mapping[str, torch.Tensor]) -> List[Tuple[str, torch.Tensor]]:
    """CPU, contiguous, detached copies ordered for natural alignment (big elements first)."""
    items = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor names must be non-empty strings other than __metadata__, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in DTYPE_TO_NAME:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        if tensor.layout != torch.strided:
            raise TypeError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors are stored")
        items.append((name, tensor.detach().to("cpu").contiguous()))
    items.sort(key=lambda item: (-item[1].element_size(), item[0]))
    return items


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of a CPU contiguous tensor's bytes (``bytes(storage)`` is far too slow)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def write(stream: BinaryIO, tensors: Mapping[str, torch.Tensor],
          metadata: Optional[Mapping[str, str]] = None) -> Tuple[int, str]:
    """Write ``tensors`` to a binary stream; returns (bytes written, sha256 hex of those bytes)."""
    _check_byte_order()
    items = _prepared(tensors)
    header: Dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_TO_NAME[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    digest = hashlib.sha256()
    total = 0
    for chunk in [struct.pack("<Q", len(header_bytes)), header_bytes] + [tensor_bytes(t) for _, t in items]:
        stream.write(chunk)
        digest.update(chunk)
        total += len(chunk)
    return total, digest.hexdigest()


def dumps(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    import io

    buffer = io.BytesIO()
    write(buffer, tensors, metadata)
    return buffer.getvalue()


def loads(data: bytes) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Parse a whole safetensors file held in memory; returns (tensors on CPU, metadata).

    Every field is validated before use: a corrupt or hostile file raises TensorFileError and
    never makes us allocate more than the file's own size.
    """
    _check_byte_order()
    view = memoryview(data)
    if len(view) < 8:
        raise TensorFileError(f"file is {len(view)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(view):
        raise TensorFileError(f"header length {header_len} does not fit in a {len(view)}-byte file")
    try:
        header = json.loads(bytes(view[8:8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorFileError("__metadata__ must map strings to strings")
    body = view[8 + header_len:]
    spans = []
    tensors: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype, shape, begin, end = _entry(name, info)
        numel = 1
        for size in shape:
            numel *= size
        if end - begin != numel * dtype.itemsize:
            raise TensorFileError(f"tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}")
        if end > len(body):
            raise TensorFileError(f"tensor {name!r} ends at byte {end}, past the data ({len(body)} bytes)")
        spans.append((begin, end))
        # clone: an aligned buffer of its own, independent of the file's bytes
        raw = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8) if end > begin else \
            torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    spans.sort()
    position = 0
    for begin, end in spans:  # the format requires the data to be covered exactly, no holes
        if begin != position:
            raise TensorFileError("tensor data has holes or overlaps")
        position = end
    if position != len(body):
        raise TensorFileError(f"{len(body) - position} trailing bytes after the last tensor")
    return tensors, dict(metadata)


def _entry(name: str, info: object) -> Tuple[torch.dtype, List[int], int, int]:
    if not isinstance(info, dict):
        raise TensorFileError(f"tensor {name!r}: header entry is not an object")
    dtype = NAME_TO_DTYPE.get(info.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise TensorFileError(f"tensor {name!r}: unknown dtype {info.get('dtype')!r}")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise TensorFileError(f"tensor {name!r}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise TensorFileError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    return dtype, shape, offsets[0], offsets[1]
