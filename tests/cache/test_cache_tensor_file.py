"""Our safetensors reader/writer: exact round trips, compatibility, and refusal of bad bytes."""
import io
import json
import struct

import pytest
import torch

from compile_backend.cache import tensor_file
from compile_backend.cache.tensor_file import TensorFileError, dumps, loads

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _sample(dtype, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * 50
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return values.round().clamp(info.min, info.max).to(dtype)
    return values.to(dtype)


def _bits(tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact_for_every_dtype(dtype):
    tensors = {
        "odd": _sample(dtype, (3, 7, 5), 0),
        "strided": _sample(dtype, (5, 9), 1).t()[1:, ::2],  # not contiguous, with an offset
        "scalar": _sample(dtype, (), 2),
        "empty": _sample(dtype, (0, 3), 3),
    }
    loaded, metadata = loads(dumps(tensors, {"note": "x"}))
    assert metadata == {"note": "x"}
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype
        assert loaded[name].shape == tensor.shape
        # compare the bit patterns: exact, and NaN-safe
        assert torch.equal(_bits(loaded[name]), _bits(tensor))


def test_mixed_dtypes_are_laid_out_aligned():
    tensors = {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(5, dtype=torch.float64),
               "c": torch.ones(7, dtype=torch.float16)}
    data = dumps(tensors)
    (header_len,) = struct.unpack("<Q", data[:8])
    assert header_len % 8 == 0
    header = json.loads(data[8:8 + header_len])
    for name, info in header.items():
        begin = info["data_offsets"][0]
        assert begin % tensors[name].element_size() == 0, name
    loaded, _ = loads(data)
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def test_write_reports_size_and_sha256():
    import hashlib

    buffer = io.BytesIO()
    size, digest = tensor_file.write(buffer, {"x": torch.arange(11, dtype=torch.int32)})
    assert size == len(buffer.getvalue())
    assert digest == hashlib.sha256(buffer.getvalue()).hexdigest()


def test_readable_by_the_safetensors_package_and_back():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(3, 5).to(torch.bfloat16), "i": torch.arange(7), "b": torch.tensor(True),
               "e": torch.zeros(0, 3), "s": torch.ones(3, dtype=torch.int8), "d": torch.randn(5, dtype=torch.float64)}
    theirs = safetensors_torch.load(dumps(tensors))
    assert all(torch.equal(theirs[n], tensors[n]) for n in tensors)
    ours, _ = loads(safetensors_torch.save(tensors))
    assert all(torch.equal(ours[n], tensors[n]) for n in tensors)


def _file(header, body=b""):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("data, message", [
    (b"\x01\x02", "shorter than"),
    (struct.pack("<Q", 10 ** 12) + b"{}", "does not fit"),
    (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    (_file([1, 2]), "not a JSON object"),
    (_file({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (_file({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "bad shape"),
    (_file({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "bytes for shape"),
    (_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2), "past the data"),
    (_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "holes"),
    (_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9), "trailing"),
    (_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "bad data_offsets"),
    (_file({"__metadata__": {"a": 1}}), "__metadata__"),
])
def test_malformed_files_are_refused(data, message):
    with pytest.raises(TensorFileError, match=message):
        loads(data)


def test_writer_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        dumps({"x": [1, 2]})
    with pytest.raises(TypeError, match="layout"):
        dumps({"x": torch.eye(3).to_sparse()})
    with pytest.raises(ValueError, match="names"):
        dumps({"__metadata__": torch.ones(1)})
