"""decode_bench's weight-only reference (benchmarks/decode_reference.py, issue #20): the fp32
model with exactly the engine's quantized layers round-tripped by kernels/weight_only_ref.py.
Tiny sizes on the CPU (the engine's emulated path: TRITON_INTERPRET=0)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks import decode_bench, decode_reference
from compile_backend import ops  # noqa: F401  (registers torch.ops.compile_backend.weight_only_*)
from compile_backend.kernels import quant_ref

MODES = {"w8a16": ("int8", None), "w4a16": ("int4", 128)}


class _EngineOpLinear(torch.nn.Module):
    """A bias-free linear layer computed by the engine's weight-only ops, as the weight-only pass
    emits them (fx_passes/weight_only.py): scales and codes of the [N, K] weight, then
    ``weight_only_linear``."""

    def __init__(self, weight: torch.Tensor, precision: str, group_size, clip: str = "minmax") -> None:
        super().__init__()
        wo = torch.ops.compile_backend
        self.precision, self.group_size = precision, group_size
        self.register_buffer("scales", wo.weight_only_scales(weight.detach(), precision, group_size, clip))
        self.register_buffer("codes", wo.weight_only_codes(weight.detach(), self.scales, precision, group_size))

    def forward(self, x):
        return torch.ops.compile_backend.weight_only_linear(x, self.codes, self.scales, None, self.precision,
                                                            self.group_size, None)


def _engine_ops(spec):
    """``prepare`` for hf_fp32_logits: every linear layer of ``spec`` through the engine's ops."""
    def prepare(twin):
        for name, (precision, group_size, clip) in spec.items():
            path = name[:-len(".weight")]
            owner, child = path.rsplit(".", 1)
            layer = twin.get_submodule(path)
            assert isinstance(layer, torch.nn.Linear) and layer.bias is None
            setattr(twin.get_submodule(owner), child, _EngineOpLinear(layer.weight, precision, group_size, clip))
    return prepare


@pytest.fixture(scope="module")
def hf_tiny():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return decode_bench.hf_decode_case("tiny", 1, "cpu", torch.float32)


def test_round_trip_is_the_engine_ops_on_the_nk_weight():
    """round_trip dequantizes exactly what weight_only_scales / weight_only_codes make of a
    linear layer's [N, K] weight (INT4 groups along K: a row's scales do not depend on other rows)."""
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(0))
    for precision, group in MODES.values():
        s = torch.ops.compile_backend.weight_only_scales(w, precision, group, "minmax")
        codes = torch.ops.compile_backend.weight_only_codes(w, s, precision, group)
        x = torch.eye(200)
        via_op = torch.ops.compile_backend.weight_only_linear(x, codes, s, None, precision, group, None).t()
        assert torch.equal(decode_reference.round_trip(w, precision, group), via_op)
        # row independence: the first 8 output channels alone quantize the same
        assert torch.equal(decode_reference.round_trip(w[:8], precision, group), via_op[:8])
    # not the transposed weight's round trip (what layer_output_sqnr quantized before session 15)
    assert not torch.allclose(decode_reference.round_trip(w.t(), "int4", 128).t(), decode_reference.round_trip(w, "int4", 128))


def test_round_trip_weights_unties_shared_weights_and_checks_names():
    emb = torch.nn.Embedding(40, 16)
    head = torch.nn.Linear(16, 40, bias=False)
    head.weight = emb.weight  # tied, as some LM heads are
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    before = emb.weight.detach().clone()
    done = decode_reference.round_trip_weights(model, {"head.weight": ("int4", 32, "minmax")})
    assert done == ["head.weight"]
    assert torch.equal(model["emb"].weight, before)  # the embedding keeps its float values
    assert torch.equal(model["head"].weight, decode_reference.round_trip(before, "int4", 32))
    with pytest.raises(KeyError):
        decode_reference.round_trip_weights(model, {"head.bias": ("int8", None, "minmax")})


def test_reference_equals_eager_model_on_the_engine_ops(hf_tiny):
    """The reference (fp32 copy, quantized layers' weights round-tripped) equals, within fp32
    rounding, the same fp32 model whose quantized linear layers run the engine's weight-only ops
    eagerly; W8A16's cosine against fp32 is above W4A16's, both below 1."""
    model, inputs = hf_tiny
    fp32 = decode_reference.fp32_logits(model, inputs, "hf", "tiny")
    cos = {}
    for mode, (precision, group) in MODES.items():
        spec = decode_reference.default_spec(model, precision, group)
        assert len(spec) == 14 and not any("lm_head" in n for n in spec)  # 2 layers x 7 linears
        ref = decode_reference.fp32_logits(model, inputs, "hf", "tiny", spec)
        via_ops = decode_bench.hf_fp32_logits(model, inputs, "tiny", prepare=_engine_ops(spec))
        torch.testing.assert_close(ref, via_ops, rtol=1e-5, atol=1e-5)
        cos[mode] = decode_reference.cosine(ref, fp32)
    assert 0.999 < cos["w8a16"] < 1 and 0.9 < cos["w4a16"] < cos["w8a16"], cos
    # the caller's model is untouched (the reference works on a copy)
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("proj"))


def test_engine_equals_reference_and_report_names_the_default_selection(hf_tiny, monkeypatch):
    """A weight-only engine (the CPU's emulated path) computes the reference's numbers; the layers
    its report names are those default_spec picks (every linear layer but lm_head)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, inputs = hf_tiny
    fn, report = decode_bench._peer("w4a16", model, inputs)
    with torch.no_grad():
        logits = fn(*inputs)[0].float()
    spec = decode_reference.spec_from_report(report)
    assert spec == decode_reference.default_spec(model, "int4", 128)
    assert set(spec) == decode_bench._quantized_weights(report)
    got = decode_bench._reference_cosine(logits, model, inputs, "hf", "tiny", report)
    assert got["reference_layers"] == 14 and got["cosine_vs_reference"] > 0.99999, got
    fp32 = decode_reference.fp32_logits(model, inputs, "hf", "tiny")
    assert decode_reference.cosine(logits, fp32) < 0.9995  # the quantization's own effect is visible
    torch._dynamo.reset()


def test_decode_bench_rows_carry_cosine_vs_reference(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "hf.json"
    assert decode_bench.main(["--model", "hf", "--size", "tiny", "--device", "cpu", "--batches", "1", "--iters", "1",
                              "--peers", "eager", "w8a16", "w4a16", "--out", str(out)]) == 0
    rows = {r["peer"]: r for r in json.loads(out.read_text())}
    assert "cosine_vs_reference" not in rows["eager"]
    for peer in ("w8a16", "w4a16"):
        r = rows[peer]
        assert "error" not in r and "reference_error" not in r, (r.get("error"), r.get("reference_error"))
        assert r["cosine_vs_reference"] > 0.99999 and r["reference_layers"] == len(r["layer_sqnr_db"]) == 14, r
    assert rows["w8a16"]["cosine_vs_fp32"] > rows["w4a16"]["cosine_vs_fp32"]
    assert all(r["ms_pipelined"] > 0 and r["tokens_per_s_pipelined"] > 0 for r in rows.values())
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [p["cosine_vs_reference"] for p in printed if p["peer"] == "w4a16"] == [rows["w4a16"]["cosine_vs_reference"]]


def test_layer_output_sqnr_is_the_engine_ops_output_error(hf_tiny):
    """layer_output_sqnr quantizes each layer as the engine does: its value is the SQNR of the
    engine's weight-only op output against the float layer's, on the same inputs."""
    model, inputs = hf_tiny
    name = "model.model.layers.0.mlp.down_proj"
    seen = {}
    layer = model.get_submodule(name)
    def keep(module, args, out):  # returns None: the output stays
        seen.setdefault("x", args[0].detach())

    hook = layer.register_forward_hook(keep)
    try:
        got = decode_bench.layer_output_sqnr(model, inputs, "int4", 128, quantized={f"{name}.weight"})
    finally:
        hook.remove()
    x = seen["x"].float().reshape(-1, layer.in_features)
    want = quant_ref.sqnr_db(x @ layer.weight.float().t(), _EngineOpLinear(layer.weight.float(), "int4", 128)(x))
    assert set(got) == {name} and got[name] == round(want, 2), (got, want)


def test_non_hf_reference_copies_the_callers_caches():
    """Zoo models: the reference runs on fp32 copies of the inputs (a cache written in place
    stays the caller's) and equals the fp32 model with its weights round-tripped."""
    from compile_backend import zoo

    model, inputs = zoo.get("llama_decode_inplace", "tiny", batch=1)
    before = [x.clone() for x in inputs]
    spec = decode_reference.default_spec(model, "int8", None)
    ref = decode_reference.fp32_logits(model, inputs, "zoo-inplace", "tiny", spec)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs))
    twin = copy.deepcopy(model)
    decode_reference.round_trip_weights(twin, spec)
    with torch.no_grad():
        want = twin(*[x.clone() for x in inputs])[0]
    torch.testing.assert_close(ref, want.float(), rtol=0, atol=0)


def test_pipelined_loop_feeds_each_steps_argmax_to_the_next():
    """``_loop_ms``: a step reads the token the step before it chose, on the device, with no
    host read between steps."""
    seen = []
    token = torch.tensor([[3]])

    def step():
        seen.append(int(token))
        logits = torch.zeros(1, 10)
        logits[0, (int(token) + 1) % 10] = 1.0  # the next token: this one plus one
        return (logits,)

    host = []
    assert decode_bench._loop_ms(step, token, steps=4, host=host) >= 0
    assert seen == [(3 + i) % 10 for i in range(len(seen))] and len(seen) == 3 + 5 * 4
    assert len(host) == 5 and all(h >= 0 for h in host)  # each loop's host ms a step
