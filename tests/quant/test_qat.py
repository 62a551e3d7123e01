"""Quantization-aware training (quant/qat.py): prepare, train (eager and compiled through the
backend), convert; the converted engine equals the fake-quantized model; selection, resuming,
merged layers, never-trained models and bad scales. CPU: the emulated path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import compile_backend
from compile_backend import quant
from compile_backend.quant.qat import QATLayer
from helpers import ConvMLP, image_batches


def Net():
    return ConvMLP(head=True)


def batches(n, seed=0, size=8):
    return image_batches(n, seed, size)


def _train(model, steps, compiled=False, seed=1, lr=1e-2):
    run = torch.compile(model, backend="compile_backend") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g)
        target = torch.randint(0, 4, (8,), generator=g)
        loss = nn.functional.cross_entropy(run(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_prepare_train_convert_engine_equals_fake_quant_model(aten_only, precision, tmp_path):
    model = Net().eval()
    cfg = quant.QuantConfig(precision=precision, calibrator="max")
    qmodel = quant.prepare_qat(model, cfg, batches(2), progress=False)
    assert qmodel is model
    assert {n for n, m in model.named_modules() if isinstance(m, QATLayer)} == {"conv", "fc1", "fc2"}
    assert {"conv.qat_scale", "fc1.qat_scale", "fc2.qat_scale"} <= set(model.state_dict())
    _train(model, 3)
    model.eval()
    x = batches(1, seed=9)[0][0]
    with torch.no_grad():
        fake = model(x)
    calib = quant.convert(model)
    assert not any(isinstance(m, QATLayer) for m in model.modules()) and "conv.qat_scale" not in model.state_dict()
    assert set(calib.layers) == {"conv.weight", "fc1.weight", "fc2.weight"}
    assert all(r.calibrator == "qat" for r in calib.layers.values())
    report = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path))
    assert sum(q["status"] == "quantized" for g in report.graphs for q in g.quant) == 3
    fast = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        got = fast(x)
    torch.testing.assert_close(got, fake, rtol=1e-4, atol=1e-4)  # to rounding


def test_learned_scales_move_and_fixed_ones_do_not(aten_only):
    for mode, moves in (("learned", True), ("fixed", False)):
        model = Net().eval()
        quant.prepare_qat(model, quant.QuantConfig(calibrator="max", qat_scales=mode), batches(2), progress=False)
        before = float(model.fc1.qat_scale.detach())
        losses = _train(model, 5)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert (float(model.fc1.qat_scale.detach()) != before) == moves
        assert model.fc1.qat_scale.requires_grad == moves


@pytest.mark.parametrize("path", ["aten", "interpreted_kernels"])
def test_training_compiled_through_the_backend_matches_eager(path, monkeypatch):
    if path == "aten":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    eager, compiled = Net(), Net()
    cfg = quant.QuantConfig(calibrator="max")
    for m in (eager, compiled):
        quant.prepare_qat(m.eval(), cfg, batches(2), progress=False)
    l_eager = _train(eager, 3)
    l_comp = _train(compiled, 3, compiled=True)
    torch.testing.assert_close(torch.tensor(l_comp), torch.tensor(l_eager), rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=n)


def test_without_batches_the_first_call_initialises_and_a_checkpoint_resumes(aten_only, tmp_path):
    model = Net().eval()
    quant.prepare_qat(model, quant.QuantConfig())  # no calibration data
    assert torch.isnan(model.fc1.qat_scale)
    x = batches(1)[0][0]
    compiled = torch.compile(model, backend="compile_backend")
    with torch.no_grad():
        out = compiled(x)  # Dynamo runs the uninitialised branch eagerly, then recompiles
    assert float(model.fc1.qat_scale.detach()) > 0 and torch.isfinite(out).all()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    _train(model, 2)
    path = tmp_path / "qat.pt"
    torch.save(model.state_dict(), path)
    resumed = quant.prepare_qat(Net().eval(), quant.QuantConfig())
    resumed.load_state_dict(torch.load(path))
    resumed(x)  # the loaded amax is kept, not re-initialised from this batch
    assert float(resumed.fc1.qat_scale.detach()) == float(model.fc1.qat_scale.detach())


def test_never_trained_converts_to_ptq(aten_only, tmp_path):
    model = Net().eval()
    cfg = quant.QuantConfig(calibrator="max")
    ptq = quant.calibrate(model, batches(2), cfg, progress=False, use_cache=False)
    reference = copy.deepcopy(model)
    calib = quant.convert(quant.prepare_qat(model, cfg, batches(2), progress=False))
    assert {n: r.amax for n, r in calib.layers.items()} == {n: r.amax for n, r in ptq.layers.items()}
    x = batches(1, seed=4)[0][0]
    with torch.no_grad():
        a = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path)})(x)
        b = torch.compile(reference, backend="compile_backend", options={"quant": ptq, "cache_dir": str(tmp_path)})(x)
    assert torch.equal(a, b)


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def test_merged_gemm_parts_share_or_combine_their_amax(aten_only, tmp_path):
    x = torch.randn(5, 32)
    with_batches = quant.prepare_qat(QKV().eval(), quant.QuantConfig(calibrator="max"), [(x,)], progress=False)
    assert with_batches.q.qat_scale is with_batches.k.qat_scale is with_batches.v.qat_scale  # one input
    calib = quant.convert(with_batches)
    (name,) = calib.layers
    assert sorted(name.split("+")) == ["k.weight", "q.weight", "v.weight"]
    without = quant.prepare_qat(QKV().eval(), quant.QuantConfig())
    without(x)
    calib = quant.convert(without)
    assert set(calib.layers) == {"q.weight", "k.weight", "v.weight"}
    report = compile_backend.explain(without, x, quant=calib, cache_dir=str(tmp_path))
    (layer,) = [q for g in report.graphs for q in g.quant]
    assert layer["status"] == "quantized" and sorted(layer["name"].split("+")) == ["k.weight", "q.weight", "v.weight"]


def test_bad_configs_and_double_prepare(aten_only):
    with pytest.raises(ValueError, match="static"):
        quant.prepare_qat(Net(), quant.QuantConfig(activations="dynamic"))
    with pytest.raises(ValueError, match="qat_scales"):
        quant.QuantConfig(qat_scales="sometimes")
    for alpha in (0.5, "auto"):  # SmoothQuant is post-training: QAT would train the wrong scales
        with pytest.raises(ValueError, match="smoothquant.*post-training"):
            quant.prepare_qat(Net().eval(), quant.QuantConfig(smoothquant=alpha))
    model = quant.prepare_qat(Net().eval(), quant.QuantConfig())
    with pytest.raises(ValueError, match="already prepared"):
        quant.prepare_qat(model, quant.QuantConfig())
    with pytest.raises(ValueError, match="never ran"):
        quant.convert(model)
    with pytest.raises(ValueError, match="not prepared"):
        quant.convert(Net())


def test_a_learned_amax_driven_negative_is_clamped(aten_only):
    model = quant.prepare_qat(Net().eval(), quant.QuantConfig(calibrator="max"), batches(1), progress=False)
    with torch.no_grad():
        model.fc1.qat_scale.fill_(-1.0)
    out = model(batches(1)[0][0])
    assert torch.isfinite(out).all()
    calib = quant.convert(model)
    assert calib.amax("fc1.weight") > 0


def test_autocast_gradient_accumulation_and_mode_switches_compiled(aten_only):
    """torch.compile's usual training features on a prepared model: bf16 autocast, gradients
    accumulated over two micro-batches (equal to one step on both), train/eval switches."""
    model = quant.prepare_qat(Net().eval(), quant.QuantConfig(calibrator="max"), batches(2), progress=False)
    twin = copy.deepcopy(model)
    step = torch.compile(model, backend="compile_backend")
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for half in (slice(0, 8), slice(8, 16)):  # accumulate
            (nn.functional.cross_entropy(step(x[half]), target[half]) / 2).backward()
    twin.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(twin(x[:8]), target[:8]).div(2).backward()
        nn.functional.cross_entropy(twin(x[8:]), target[8:]).div(2).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert a.grad is not None and torch.isfinite(a.grad).all(), n
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=1e-3, msg=n)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(step(x), twin.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_compiled_training_graph_fuses_the_fake_quantization(precision, tmp_path):
    """The fake-quant ops of the training graph run inside our kernels, none in ATen: each
    activation's scale chain and fake-quantize in one pointwise kernel, each weight's per-channel
    amax, scale and fake-quantize in one reduction kernel, the straight-through masks of the
    backward in the GEMM epilogues / gradient kernels (issue #19). ATen keeps only the
    convolution's backward. Interpreted kernels on CPU, so the fused kernels' values are
    checked against eager too (test_training_compiled_through_the_backend_matches_eager)."""
    model = quant.prepare_qat(Net().eval(), quant.QuantConfig(precision=precision, calibrator="max"), batches(2),
                              progress=False)
    model.train()
    report = compile_backend.explain(model, batches(1, seed=9)[0][0], cache_dir=str(tmp_path))
    forward, backward = ([g for g in report.graphs if g.role == role][0] for role in ("forward", "backward"))
    # a warm process builds from the engine cache's stored graph: the summary survives
    warm = compile_backend.explain(model, batches(1, seed=9)[0][0], cache_dir=str(tmp_path))
    assert all(g.cache["engine"] == "hit" for g in warm.graphs), [g.cache for g in warm.graphs]
    assert [g.fake_quant for g in warm.graphs] == [g.fake_quant for g in report.graphs]
    assert forward.groups_by_kind().get("aten", 0) == 0, forward.fallbacks
    assert [f["op"] for f in backward.fallbacks] == ["aten.convolution_backward"], backward.fallbacks
    codes = {"round", "clamp"} if precision == "int8" else {"_to_copy"}  # fp8: a cast rounds
    weights = [k for k in forward.kernels if k["kind"] == "reduction"]
    assert len(weights) == 3 and all({"amax", "where"} | codes <= {o.split(".")[-1] for o in k["ops"]}
                                     and k["impl"] == "triton" for k in weights), weights
    activations = [k for k in forward.kernels if k["kind"] == "pointwise"]
    assert len(activations) == 3 and all({"clamp_min", "reciprocal"} | codes <= {o.split(".")[-1] for o in k["ops"]}
                                         for k in activations), activations
    for graph in (forward, backward):  # the report's summary says so
        assert graph.fake_quant["aten"] == 0 and graph.fake_quant["ops"] > 0, graph.fake_quant
    assert forward.fake_quant["kernels"] == {"pointwise": 3, "reduction": 3}
    assert "fake-quant (QAT): " in str(report) and ", 0 groups in ATen" in str(report)
    # was 35 forward groups (5 in ATen) and 22 backward (5 in ATen) before scale chains, fills
    # and straight-through masks joined the kernels around them
    assert len(forward.kernels) == 10 and len(backward.kernels) <= 17, (len(forward.kernels), len(backward.kernels))


@pytest.mark.parametrize("bad", [0.0, -1.0, 1e-30])
def test_bad_scales_in_the_compiled_training_graph_match_eager(bad):
    """A learned scale driven to zero, below zero or to a tiny value, inside our fused kernels
    (the scale chain computed in the fake-quantize kernel, the masks in the GEMM epilogues):
    losses and every gradient as eager's, all finite."""
    models = []
    for _ in range(2):
        m = quant.prepare_qat(Net().eval(), quant.QuantConfig(calibrator="max"), batches(2), progress=False)
        with torch.no_grad():
            m.fc1.qat_scale.fill_(bad)
        models.append(m.train())
    eager, compiled = models
    run = torch.compile(compiled, backend="compile_backend")
    x, target = batches(1, seed=4)[0][0], torch.arange(8) % 4
    for model, fn in ((eager, eager), (compiled, run)):
        nn.functional.cross_entropy(fn(x), target).backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.isfinite(b.grad).all(), n
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
