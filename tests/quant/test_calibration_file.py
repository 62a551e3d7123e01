"""Calibration: records, digest, compatibility checks, and JSON files (round trip, hostile input)."""
import json
import math
import os
import pickle

import pytest
import torch
from torch import nn

from compile_backend.quant import Calibration, LayerCalibration, QuantConfig, weight_fingerprint
from compile_backend.quant import calibration as calibration_module


def make(config=None, **stats):
    torch.manual_seed(0)
    w1, w2 = torch.randn(32, 16), torch.randn(8, 32)
    layers = [
        LayerCalibration("encoder.fc1.weight", 3.25, "entropy", weight_fingerprint(w1), samples=4096,
                         batches=4, inf_count=2, stats=stats),
        LayerCalibration("encoder.fc2.weight", 0.1 + 0.2, "entropy", weight_fingerprint(w2), 4096, 4),
    ]
    return Calibration(config or QuantConfig(exclude=["lm_head", nn.Embedding]), layers, {"batches": 4})


# ------------------------------------------------------------------------------------ records
def test_accessors_and_order():
    calib = make()
    assert calib.amax("encoder.fc2.weight") == 0.1 + 0.2
    assert list(calib.layers) == ["encoder.fc1.weight", "encoder.fc2.weight"]
    assert "encoder.fc1.weight" in calib and len(calib) == 2
    with pytest.raises(KeyError, match="layer 'nope' is not in this calibration"):
        calib.amax("nope")


@pytest.mark.parametrize("field, value, message", [
    ("amax", float("inf"), "'amax' must be a finite number >= 0"),
    ("amax", -1.0, "'amax' must be a finite number >= 0"),
    ("amax", True, "'amax'"),
    ("calibrator", "kl", "'calibrator' must be one of"),
    ("fingerprint", "abc", "'fingerprint' must be a weight_fingerprint"),
    ("samples", -1, "'samples' must be an integer"),
    ("name", "", "a layer name must be a printable string"),
    ("name", "a\nb", "a layer name must be a printable string"),
    ("stats", {"sqnr": float("nan")}, "stat 'sqnr' must be a number"),
])
def test_bad_records_are_refused(field, value, message):
    fields = dict(name="fc.weight", amax=1.0, calibrator="max", fingerprint=weight_fingerprint(torch.ones(2, 2)))
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        LayerCalibration(**fields)


def test_duplicate_layers_refused():
    rec = make().layer("encoder.fc1.weight")
    with pytest.raises(ValueError, match="twice"):
        Calibration(QuantConfig(), [rec, rec])


# ------------------------------------------------------------------------------------ fingerprints
def test_weight_fingerprint_is_deterministic_and_tells_weights_apart():
    w = torch.randn(300, 50)
    fp = weight_fingerprint(w)
    assert fp.startswith("[300,50]:") and fp == weight_fingerprint(w.clone())
    assert fp == weight_fingerprint(w.t().contiguous().t())  # layout does not matter, values do
    assert fp != weight_fingerprint(w + 1)
    assert fp != weight_fingerprint(w.reshape(50, 300))
    assert weight_fingerprint(nn.Parameter(w)) == fp
    assert weight_fingerprint(torch.zeros(0, 3)).startswith("[0,3]:")


def test_digest_and_model_fingerprint():
    calib = make()
    assert calib.digest() == make().digest()
    assert calib.digest() != make(QuantConfig(precision="fp8")).digest()
    with_sqnr = calib.with_stats("encoder.fc1.weight", sqnr_db=38.5)
    assert with_sqnr.layer("encoder.fc1.weight").stats == {"sqnr_db": 38.5}
    assert with_sqnr.digest() == calib.digest()  # report numbers do not invalidate engines
    other_amax = Calibration(calib.config, [calib.layer("encoder.fc2.weight"),
                                            LayerCalibration("encoder.fc1.weight", 3.2500001, "entropy",
                                                             calib.layer("encoder.fc1.weight").fingerprint)])
    assert other_amax.digest() != calib.digest()
    assert other_amax.model_fingerprint == calib.model_fingerprint


# ------------------------------------------------------------------------------------ compatibility
def test_check_compatible_accepts_the_same_model_and_a_subset():
    calib = make()
    prints = {n: r.fingerprint for n, r in calib.layers.items()}
    calib.check_compatible(calib.config, prints)
    calib.check_compatible(None, {"encoder.fc1.weight": prints["encoder.fc1.weight"]})  # one graph of several


def test_check_compatible_refuses_another_config():
    calib = make()
    with pytest.raises(ValueError, match="different quant config: precision 'int8' \\(calibration\\) vs 'fp8'"):
        calib.check_compatible(calib.config.replace(precision="fp8"), {})


def test_check_compatible_refuses_another_model():
    calib = make()
    with pytest.raises(ValueError, match="layer 'decoder.fc.weight' is not in the calibration"):
        calib.check_compatible(None, {"decoder.fc.weight": weight_fingerprint(torch.ones(4, 4))})
    with pytest.raises(ValueError, match=r"layer 'encoder.fc1.weight': weight shape \[32,17\] vs calibrated \[32,16\]"):
        calib.check_compatible(None, {"encoder.fc1.weight": weight_fingerprint(torch.ones(32, 17))})
    other = weight_fingerprint(torch.ones(32, 16))
    with pytest.raises(ValueError, match="different weight values.*run quant.calibrate"):
        calib.check_compatible(None, {"encoder.fc1.weight": other})
    calib.check_compatible(None, {"encoder.fc1.weight": other}, check_values=False)  # refit: shapes only


# ------------------------------------------------------------------------------------ files
def test_save_load_round_trip_is_exact(tmp_path):
    calib = make(sqnr_db=float("inf"), rel_err=0.01)
    path = tmp_path / "calib.json"
    calib.save(path)
    loaded = Calibration.load(path)
    assert loaded == calib and loaded.digest() == calib.digest()
    assert loaded.amax("encoder.fc2.weight") == 0.1 + 0.2  # exact float round trip
    assert loaded.layer("encoder.fc1.weight").stats["sqnr_db"] == math.inf
    assert loaded.config.exclude == calib.config.exclude
    assert os.listdir(tmp_path) == ["calib.json"]  # no temporary left behind
    json.loads(path.read_text())  # strict JSON: no Infinity/NaN literals


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "calib.json"
    make().save(path)
    make(QuantConfig(precision="fp8")).save(str(path))
    assert Calibration.load(path).config.precision == "fp8"
    assert sorted(os.listdir(tmp_path)) == ["calib.json"]


def _valid(tmp_path):
    return make(sqnr_db=30.0).to_dict()


def _write(tmp_path, content):
    path = tmp_path / "c.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def _mutations():
    def setter(path, value):
        def apply(d):
            target = d
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            return d
        return apply

    def deleter(path):
        def apply(d):
            target = d
            for key in path[:-1]:
                target = target[key]
            del target[path[-1]]
            return d
        return apply

    return [
        (setter(["version"], 2), "reads version 1"),
        (setter(["version"], True), "version"),
        (setter(["format"], "other"), "format"),
        (setter(["evil"], 1), "unknown key"),
        (deleter(["meta"]), "missing key"),
        (setter(["config", "precision"], "int2"), "config: quant option 'precision'"),
        (deleter(["config", "calibrator"]), "config: missing key"),
        (setter(["config", "include"], [{"type": "os.system"}, {"x": [[[]]]}]), "config"),
        (setter(["layers"], {"a": 1}), "layers: must be a list"),
        (setter(["layers", 0], [1, 2]), r"layers\[0\]: must be an object"),
        (setter(["layers", 0, "amax"], "3.0"), r"layers\[0\]: .*'amax' must be a finite number"),
        (setter(["layers", 0, "amax"], -0.5), "'amax' must be a finite number >= 0"),
        (setter(["layers", 0, "amax"], 1e308 * 10), "not allowed|out of range"),
        (setter(["layers", 0, "samples"], 1.5), "'samples' must be an integer"),
        (setter(["layers", 0, "name"], "x" * 10_000), "a layer name must be"),
        (setter(["layers", 0, "name"], ["nested", {"junk": [1]}]), "a layer name must be"),
        (setter(["layers", 0, "stats"], {"sqnr_db": "NaN"}), "stat 'sqnr_db' must be a number"),
        (setter(["layers", 0, "stats"], [1]), "'stats' must be a mapping"),
        (setter(["layers", 0, "fingerprint"], "[1]:" + "g" * 32), "'fingerprint'"),
        (setter(["layers", 0, "extra"], 0), r"layers\[0\]: unknown key"),
        (setter(["layers", 1, "name"], "encoder.fc1.weight"), "twice"),
        (setter(["meta"], [1]), "meta: must be an object"),
        (setter(["meta"], {"k": {"nested": 1}}), "'meta' 'k' must be"),
        (setter(["config"], None), "config: must be an object"),
    ]


@pytest.mark.parametrize("mutate, message", _mutations())
def test_load_refuses_wrong_content(tmp_path, mutate, message):
    path = _write(tmp_path, mutate(_valid(tmp_path)))
    with pytest.raises(ValueError, match=message):
        Calibration.load(path)


def test_load_refuses_json_tricks(tmp_path):
    good = json.dumps(_valid(tmp_path))
    cases = {
        "truncated": good[: len(good) // 2].encode(),
        "nan literal": good.replace('"amax": 3.25', '"amax": NaN').encode(),
        "infinity literal": good.replace('"amax": 3.25', '"amax": Infinity').encode(),
        "huge integer": good.replace('"samples": 4096', '"samples": ' + "9" * 5000).encode(),
        "huge float": good.replace('"amax": 3.25', '"amax": 1e999').encode(),
        "duplicate key": good.replace('"amax": 3.25', '"amax": 3.25, "amax": 0.0').encode(),
        "deep nesting": b"[" * 200_000 + b"]" * 200_000,
        "not utf-8": b"\xff\xfe{}",
        "empty": b"",
        "top-level list": b"[]",
    }
    assert '"amax": 3.25' in good and '"samples": 4096' in good
    for what, content in cases.items():
        with pytest.raises(ValueError, match="calibration file"):
            Calibration.load(_write(tmp_path, content))


class _Boom:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/cb-quant-pickle-was-executed",))


def test_load_never_unpickles(tmp_path):
    marker = "/tmp/cb-quant-pickle-was-executed"
    assert not os.path.exists(marker)
    path = _write(tmp_path, pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match="looks like a pickle"):
        Calibration.load(path)
    assert not os.path.exists(marker)
    torch.save({"amax": torch.ones(1)}, tmp_path / "t.pt")  # a torch checkpoint (zip of pickles)
    with pytest.raises(ValueError, match="not a valid calibration JSON"):
        Calibration.load(tmp_path / "t.pt")


def test_load_refuses_special_files(tmp_path):
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        Calibration.load(link)
    with pytest.raises(ValueError, match="not a regular file"):
        Calibration.load(tmp_path)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        Calibration.load(fifo)  # must not block waiting for a writer
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Calibration.load(tmp_path / "missing.json")


def test_load_refuses_oversized_files(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration_module, "MAX_FILE_BYTES", 1000)
    path = _write(tmp_path, b" " * 1001)
    with pytest.raises(ValueError, match="at most 1000|larger than 1000"):
        Calibration.load(path)


def test_a_symlink_to_a_valid_file_loads(tmp_path):
    make().save(tmp_path / "real.json")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert Calibration.load(tmp_path / "link.json") == make()


def test_files_written_before_the_weight_only_fields_still_load(tmp_path):
    # calibration files from before group_size / clip (issue #20) lack them; they meant None
    data = _valid(tmp_path)
    for key in ("group_size", "clip"):
        del data["config"][key]
    loaded = Calibration.load(_write(tmp_path, data))
    assert loaded.config.group_size is None and loaded.config.clip is None
