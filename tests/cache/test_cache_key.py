"""The cache key: stable across processes, and every component matters on its own."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compile_backend.cache import Artifacts, CacheKey, EngineCache, key as key_module
from compile_backend.options import Options

GRAPH = "x = placeholder\nw = get_attr[w]\ny = aten.mm(x, w)\nz = aten.relu(y)\noutput(z)"


def _inputs():
    return [torch.ones(3, 5), torch.ones(5, 7), 2]


def _key(**changes):
    base = dict(graph=GRAPH, inputs=_inputs(), options={"precision": "fp16", "autotune": "fast"},
                calibration_hash=None, arch="sm90", gpu_name="NVIDIA H100", torch_version="2.11.0",
                triton_version="3.6.0", compile_backend_version="0.1.0", source="a" * 64)
    base.update(changes)
    graph, inputs, options = base.pop("graph"), base.pop("inputs"), base.pop("options")
    return CacheKey.create(graph, inputs, options, **base)


# Each change touches one component only; all must give a new key.
ONE_FIELD_CHANGES = {
    "graph": dict(graph=GRAPH.replace("relu", "gelu")),
    "shape": dict(inputs=[torch.ones(3, 6), torch.ones(5, 7), 2]),
    "stride": dict(inputs=[torch.ones(5, 3).t(), torch.ones(5, 7), 2]),
    "dtype": dict(inputs=[torch.ones(3, 5, dtype=torch.float16), torch.ones(5, 7), 2]),
    "device": dict(inputs=[torch.ones(3, 5, device="meta"), torch.ones(5, 7), 2]),
    "requires_grad": dict(inputs=[torch.ones(3, 5, requires_grad=True), torch.ones(5, 7), 2]),
    "scalar input": dict(inputs=[torch.ones(3, 5), torch.ones(5, 7), 3]),
    "options": dict(options={"precision": "bf16", "autotune": "fast"}),
    "source hash": dict(source="b" * 64),
    "torch version": dict(torch_version="2.12.0"),
    "triton version": dict(triton_version="3.7.0"),
    "compile_backend version": dict(compile_backend_version="0.2.0"),
    "arch": dict(arch="sm80"),
    "gpu name": dict(gpu_name="NVIDIA H200"),
    "calibration": dict(calibration_hash="c" * 64),
}


def test_same_components_same_digest():
    assert _key() == _key()
    assert _key().digest == _key().digest
    assert len(_key().digest) == 64 and int(_key().digest, 16) >= 0


@pytest.mark.parametrize("name", list(ONE_FIELD_CHANGES))
def test_each_component_alone_changes_the_key_and_misses(name, tmp_path):
    base, changed = _key(), _key(**ONE_FIELD_CHANGES[name])
    assert changed.digest != base.digest
    assert changed.differences(base.describe()), "describe() must show what differs"
    cache = EngineCache(tmp_path)
    cache.put(base, {}, {}, {"which": "base"})
    assert cache.get(changed) is None
    assert cache.get(base).meta == {"which": "base"}


def test_option_order_and_cache_location_do_not_change_the_key():
    assert _key(options={"autotune": "fast", "precision": "fp16"}).digest == _key().digest
    with_dir = {"precision": "fp16", "autotune": "fast", "cache_dir": "/somewhere/else"}
    assert _key(options=with_dir).digest == _key().digest


def test_options_dataclass_is_accepted():
    options = Options(precision="fp16")
    from_dataclass = _key(options=options)
    from_dict = _key(options={k: v for k, v in dataclasses.asdict(options).items()})
    assert from_dataclass.digest == from_dict.digest
    assert "cache_dir" not in json.loads(from_dataclass.options)


def test_describe_is_plain_json_with_every_component():
    description = _key(calibration_hash="d" * 64).describe()
    assert json.loads(json.dumps(description)) == description
    for name in ("graph", "inputs", "options", "versions", "arch", "gpu_name", "calibration_hash", "digest"):
        assert name in description
    assert description["inputs"][0] == {"shape": [3, 5], "stride": [5, 1], "dtype": "torch.float32",
                                        "device": "cpu", "requires_grad": False, "layout": "torch.strided"}
    assert description["versions"]["source_hash"] == "a" * 64


def test_defaults_come_from_the_running_process(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    key = CacheKey.create(GRAPH, _inputs(), {})
    assert key.torch_version == torch.__version__
    assert key.source_hash == key_module.source_hash()
    assert key.arch == "interp" and key.gpu_name == "cpu"


def test_source_hash_sees_every_python_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    before = key_module.hash_python_sources(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "c.py").write_text("junk")
    (tmp_path / "notes.txt").write_text("not code")
    assert key_module.hash_python_sources(tmp_path) == before
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert key_module.hash_python_sources(tmp_path) != before
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")  # same content, other file
    assert key_module.hash_python_sources(tmp_path) != before


def test_source_hash_is_computed_once_per_process(monkeypatch):
    value = key_module.source_hash()
    assert len(value) == 64
    calls = []
    monkeypatch.setattr(key_module, "hash_python_sources", lambda path: calls.append(path) or "x")
    assert key_module.source_hash() == value and calls == []


def test_unstable_values_are_refused():
    with pytest.raises(TypeError, match="no stable text form"):
        _key(options={"callback": object()})
    with pytest.raises(ValueError, match="graph text"):
        CacheKey.create("", _inputs(), {})


def test_tensor_digest_sees_values_dtype_and_shape():
    a = torch.arange(6, dtype=torch.float32)
    assert key_module.tensor_digest([a]) == key_module.tensor_digest([a.clone()])
    assert key_module.tensor_digest([a]) != key_module.tensor_digest([a + 1])
    assert key_module.tensor_digest([a]) != key_module.tensor_digest([a.reshape(2, 3)])
    assert key_module.tensor_digest([a]) != key_module.tensor_digest([a.to(torch.int32)])


def test_digest_is_the_same_in_another_process():
    # explicit source hash: the package's own files may be edited while the suite runs
    code = (
        "import torch\n"
        "from compile_backend.cache import CacheKey\n"
        "print(CacheKey.create('g', [torch.ones(3, 5), 2], {'b': 1, 'a': [1.5, 'x']}, source='s').digest)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    here = CacheKey.create("g", [torch.ones(3, 5), 2], {"a": [1.5, "x"], "b": 1}, source="s").digest
    assert result.stdout.strip() == here


def test_weights_are_not_in_the_key():
    """Refit path: new weight values (same metadata) must reuse the engine."""
    old_weights = [torch.zeros(3, 5), torch.zeros(5, 7), 2]
    new_weights = [torch.randn(3, 5), torch.randn(5, 7), 2]
    assert _key(inputs=old_weights).digest == _key(inputs=new_weights).digest


def test_build_or_get_with_artifacts_round_trip(tmp_path):
    cache = EngineCache(tmp_path)
    entry = cache.build_or_get(_key(), lambda: Artifacts({"k.py": b"src"}, {"t": torch.ones(2)}, {"a": 1}))
    assert entry.stored and not entry.from_cache
    again = EngineCache(tmp_path).get(_key())
    assert again.from_cache and again.files == {"k.py": b"src"} and again.meta == {"a": 1}
