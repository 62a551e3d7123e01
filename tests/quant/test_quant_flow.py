"""PTQ end to end on CPU (the emulated path: the quantized engine runs kernels/quant_ref): the
graph rewrite, calibration across graph breaks, the report, refusal of a foreign calibration,
save/load, refit re-quantizing weights (issue #16)."""
import pytest
import torch
import torch.nn as nn

import compile_backend
from compile_backend import quant
from compile_backend.errors import UserError
from compile_backend.kernels import quant_ref


class Net(nn.Module):
    def __init__(self, broken=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 10)  # N = 10 < 16: stays float
        self.tiny = nn.Linear(10, 4)  # K = 10 < 16: stays float
        self.broken = broken
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        h = torch.relu(self.fc1(h))
        if self.broken:
            torch._dynamo.graph_break()
        h = self.head(torch.relu(self.fc2(h)))
        return self.tiny(h)


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, 6, 6, generator=g),) for _ in range(n)]


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_dynamic_quantization_rewrites_and_stays_close(aten_only, precision, tmp_path):
    model = Net().eval()
    x = batches(1)[0][0]
    cfg = quant.QuantConfig(precision=precision, activations="dynamic")
    report = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path))
    (g,) = report.graphs
    status = {q["name"]: q["status"] for q in g.quant}
    assert status["conv.weight"] == "quantized" and status["fc1.weight"] == "quantized"
    assert status["tiny.weight"] == "float"
    assert g.rules["quantize"] == {"linear": 2, "conv": 1, "experts": 0, "gelu_before_quantize": 0,  # head (N=10) and
                                   "tanh_before_quantize": 0,                        # tiny (K=10) stay float
                                   "residual_reads_codes": 0}
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        y, ref = fast(x), model(x)
    assert cosine(y, ref) > 0.99
    assert not torch.equal(y, ref)  # it did quantize


def test_static_calibration_across_graph_breaks_and_report(aten_only, tmp_path):
    model = Net(broken=True).eval()
    cfg = quant.QuantConfig(precision="int8", activations="static", calibrator="max")
    calib = quant.calibrate(model, batches(), cfg, progress=False, cache_dir=str(tmp_path))
    assert set(calib.layers) == {"conv.weight", "fc1.weight", "fc2.weight"}
    x = batches(1, seed=7)[0][0]
    report = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path))
    layers = {q["name"]: q for g in report.graphs for q in g.quant}
    assert layers["fc2.weight"]["status"] == "quantized" and layers["fc2.weight"]["sqnr_db"] > 20
    assert layers["conv.weight"]["status"] == "quantized"  # BatchNorm folded into it first
    assert layers["tiny.weight"]["reason"]
    text = str(report)
    assert "quantized: " in text and "fc2.weight" in text
    fast = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        assert cosine(fast(x), model(x)) > 0.99


def test_calibration_of_another_model_is_refused(aten_only, tmp_path):
    cfg = quant.QuantConfig(precision="int8", calibrator="max")
    calib = quant.calibrate(Net().eval(), batches(2), cfg, progress=False, cache_dir=str(tmp_path))
    other = Net().eval()
    with torch.no_grad():
        other.fc1.weight.mul_(-1.5)
    fast = torch.compile(other, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path)})
    with pytest.raises(UserError, match="does not match the model"):
        with torch.no_grad():
            fast(batches(1)[0][0])


def test_saved_calibration_gives_the_same_engine(aten_only, tmp_path):
    model = Net().eval()
    cfg = quant.QuantConfig(precision="fp8", calibrator="percentile")
    calib = quant.calibrate(model, batches(), cfg, progress=False, cache_dir=str(tmp_path))
    calib.save(tmp_path / "calib.json")
    loaded = quant.Calibration.load(tmp_path / "calib.json")
    assert loaded.digest() == calib.digest()
    x = batches(1, seed=3)[0][0]
    outs = []
    for c in (calib, loaded):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="compile_backend", options={"quant": c, "cache_dir": str(tmp_path)})
        with torch.no_grad():
            outs.append(fast(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_second_calibration_is_a_cache_hit(aten_only, tmp_path, capsys):
    model = Net().eval()
    cfg = quant.QuantConfig(precision="int8", calibrator="entropy")
    first = quant.calibrate(model, batches(), cfg, cache_dir=str(tmp_path))
    second = quant.calibrate(model, batches(), cfg, cache_dir=str(tmp_path))
    assert "cache hit" in capsys.readouterr().err
    assert second.digest() == first.digest()


def test_empty_calibration_set_is_an_error(aten_only, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        quant.calibrate(Net().eval(), [], quant.QuantConfig(precision="int8"), progress=False,
                        cache_dir=str(tmp_path))


def test_nan_in_calibration_data_names_the_layer(aten_only, tmp_path):
    data = batches(2)
    data[1][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="conv.weight"):
        quant.calibrate(Net().eval(), data, quant.QuantConfig(precision="int8", calibrator="max"),
                        progress=False, use_cache=False)


def test_refit_requantizes_weights(aten_only, tmp_path):
    model = Net().eval()
    cfg = quant.QuantConfig(precision="int8", activations="dynamic")
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    x = batches(1)[0][0]
    with torch.no_grad():
        before = fast(x)
        model.fc2.weight.mul_(2.0)  # in place: the engine refits and re-quantizes
        after, ref = fast(x), model(x)
    assert not torch.allclose(before, after)
    assert cosine(after, ref) > 0.99


def test_static_config_without_calibration_is_refused():
    with pytest.raises(ValueError, match="calibrat"):
        compile_backend.Options(quant=quant.QuantConfig(precision="int8", activations="static"))


def test_dynamic_int8_under_the_interpreter(tmp_path):
    """The generated-kernel path (TRITON_INTERPRET=1, as on a GPU): same flow, validated kernels."""
    model = Net().eval()
    x = batches(1)[0][0][:2]
    cfg = quant.QuantConfig(precision="int8", activations="dynamic")
    fast = torch.compile(model, backend="compile_backend", options={"quant": cfg, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        assert cosine(fast(x), model(x)) > 0.99


def test_calibration_of_a_wrapper_is_refused_naming_the_cause(aten_only, tmp_path):
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = Net().eval()
    calib = quant.calibrate(Wrapper(model).eval(), batches(2), quant.QuantConfig(precision="int8", calibrator="max"),
                            progress=False, cache_dir=str(tmp_path))
    assert "inner.fc1.weight" in calib
    fast = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path)})
    with pytest.raises(UserError, match="names none of this graph's layers"):
        with torch.no_grad():
            fast(batches(1)[0][0])


class TiedHead(nn.Module):
    """GPT-2's shape: the output layer reuses the embedding matrix (a tied weight)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(40, 32)
        self.body = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 40, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.body(self.wte(ids))))


def test_tied_output_layer_is_excluded_by_its_module_name(aten_only, tmp_path):
    report = compile_backend.explain(TiedHead().eval(), torch.randint(0, 40, (3, 5)), cache_dir=str(tmp_path),
                                     quant=quant.QuantConfig(precision="int8", activations="dynamic"))
    layers = {q["name"]: q for g in report.graphs for q in g.quant}
    assert layers["body.weight"]["status"] == "quantized"
    assert layers["wte.weight"]["status"] == "float" and "output layer" in layers["wte.weight"]["reason"]


def test_exclude_patterns_match_module_names(aten_only, tmp_path):
    cfg = quant.QuantConfig(precision="int8", activations="dynamic", exclude=("fc1",))
    report = compile_backend.explain(Net().eval(), batches(1)[0][0], quant=cfg, cache_dir=str(tmp_path))
    layers = {q["name"]: q for g in report.graphs for q in g.quant}
    assert layers["fc1.weight"]["status"] == "float" and "excluded" in layers["fc1.weight"]["reason"]
    assert layers["fc2.weight"]["status"] == "quantized"
