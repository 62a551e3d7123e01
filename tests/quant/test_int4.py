"""INT4 (signed, symmetric [-7, 7], stored as int8): the numerics reference, the config's
rules, and the static flow end to end on the emulated path and through the interpreted INT8
kernels (4-bit values in int8 operands multiply exactly)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import compile_backend
from compile_backend import quant
from compile_backend.kernels import quant_ref
from helpers import ConvMLP, image_batches


def test_int4_codes_round_half_even_and_saturate():
    scale = torch.tensor(0.5)
    x = torch.tensor([0.0, 0.25, 0.75, 1.25, -1.25, 3.4, 3.6, 100.0, -100.0, float("nan")])
    q = quant_ref.quantize(x, scale, "int4")
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 0, 2, 2, -2, 7, 7, 7, -7, 0]
    assert torch.equal(quant_ref.fake_quantize(x[:4], scale, "int4"), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert float(quant_ref.scale_from_amax(torch.tensor(7.0), "int4")) == 1.0


def test_int4_weight_quantization_per_channel():
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    wq, scale = quant_ref.quantize_weight(w, "int4")
    assert scale.shape == (5,) and wq.abs().max() == 7 and (wq.abs().amax(dim=1) == 7).all()
    err = (quant_ref.dequantize(wq, scale.reshape(-1, 1)) - w).abs()
    assert (err <= scale.reshape(-1, 1) / 2 + 1e-6).all()  # half a step at most


def test_int4_config_rules():
    cfg = quant.QuantConfig(precision="int4")
    assert cfg.calibrator == "mse" and cfg.weights == "per_channel" and cfg.activations == "static"
    with pytest.raises(ValueError, match="int4.*per_channel.*static"):
        quant.QuantConfig(precision="int4", activations="dynamic")
    with pytest.raises(ValueError, match="int4.*per_channel.*static"):
        quant.QuantConfig(precision="int4", weights="per_tensor")
    assert cfg.digest() != quant.QuantConfig(precision="int8").digest()


def Small():
    return ConvMLP()


def _batches(n, seed=0):
    return image_batches(n, seed, size=4)


def _fake_quant_reference(model, calib, x):
    """What an INT4 engine computes, from the reference alone: every layer's input and weight
    fake-quantized with the calibration's scales, in fp32."""
    def fq(t, amax):
        return quant_ref.fake_quantize(t, quant_ref.scale_from_amax(torch.tensor(amax), "int4"), "int4")

    def wfq(w):
        s = quant_ref.weight_scale(w, "int4")
        return quant_ref.fake_quantize(w, s.reshape((-1,) + (1,) * (w.dim() - 1)), "int4")

    m = model
    h = torch.relu(nn.functional.conv2d(fq(x, calib.amax("conv.weight")), wfq(m.conv.weight), m.conv.bias, padding=1))
    h = h.flatten(1)
    h = torch.relu(nn.functional.linear(fq(h, calib.amax("fc1.weight")), wfq(m.fc1.weight), m.fc1.bias))
    return nn.functional.linear(fq(h, calib.amax("fc2.weight")), wfq(m.fc2.weight), m.fc2.bias)


@pytest.mark.parametrize("interpret", [False, True], ids=["emulated", "interpreted_kernels"])
def test_int4_static_engine_equals_the_fake_quant_reference(interpret, monkeypatch, tmp_path):
    if not interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = Small().eval()
    cfg = quant.QuantConfig(precision="int4", calibrator="max")
    calib = quant.calibrate(model, _batches(3), cfg, progress=False, cache_dir=str(tmp_path))
    x = _batches(1, seed=5)[0][0]
    report = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path))
    layers = {q["name"]: q for g in report.graphs for q in g.quant}
    assert {n for n, q in layers.items() if q["status"] == "quantized"} == {"conv.weight", "fc1.weight", "fc2.weight"}
    assert all(q["precision"] == "int4" for q in layers.values())
    fast = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        got, want = fast(x), _fake_quant_reference(model, calib, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
