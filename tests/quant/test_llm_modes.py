"""The tiny Llama decoder (zoo ``llama_decode`` / ``llama_prefill``) in every quantization mode
of the LLM issue (#20): W8A16, W4A16, and W8A8 INT8/FP8 with static and dynamic activations.

Each mode compiles on the emulated path (``TRITON_INTERPRET=0`` on the CPU: each op's ATen
implementation of ``kernels/quant_ref`` / ``weight_only_ref``, the numerics reference), and three
of them (``KERNEL_MODES``) also with the Triton kernels under the interpreter. Checked: every decoder linear is quantized (the LM
head stays float: the output layer), the two paths agree (the kernels compute the reference's
numerics; only the order of fp32 sums may differ), and the output's cosine against the FP32
model is within the mode's bound (measured at the time of writing, with margin: W8A16 0.99998,
W4A16 g32 0.9942, INT8 static 0.9992, INT8 dynamic 0.99996, FP8 static 0.9996, FP8 dynamic
0.9994 on the decode step).
"""
from __future__ import annotations

import pytest
import torch

from compile_backend import quant, zoo
from compile_backend.backend import compile_backend as backend
from compile_backend.report import Report

MODES = {
    "w8a16": (dict(precision="int8", activations=None), 0.9995),
    "w4a16": (dict(precision="int4", activations=None, group_size=32), 0.985),
    "int8_static": (dict(precision="int8", activations="static"), 0.998),
    "int8_dynamic": (dict(precision="int8", activations="dynamic"), 0.999),
    "fp8_static": (dict(precision="fp8", activations="static"), 0.998),
    "fp8_dynamic": (dict(precision="fp8", activations="dynamic"), 0.998),
}
DECODER_LINEARS = 8  # 2 layers x (merged q/k/v, o, merged gate/up, down)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _compiled_logits(model, inputs, q, cache_dir):
    torch._dynamo.reset()
    report = Report()
    fn = torch.compile(model, backend=lambda gm, ex: backend(gm, ex, options={"quant": q, "cache_dir": cache_dir},
                                                             report=report))
    with torch.no_grad():
        logits = fn(*inputs)[0]
    torch._dynamo.reset()
    return logits, [layer for g in report.graphs for layer in g.quant]


def _setup(name: str, mode: str):
    model, inputs = zoo.get(name, "tiny", batch=2, seed=0)
    fields, bound = MODES[mode]
    cfg = quant.QuantConfig(**fields)
    if cfg.activations == "static":
        calib = [zoo.get(name, "tiny", batch=2, seed=s)[1] for s in (1, 2)]
        cfg = quant.calibrate(model, calib, cfg, progress=False, use_cache=False)
    with torch.no_grad():
        ref = model(*inputs)[0]
    return model, inputs, cfg, ref, bound


def _check_layers(layers):
    status = {layer["name"]: layer["status"] for layer in layers}
    quantized = [n for n, s in status.items() if s == "quantized"]
    assert len(quantized) == DECODER_LINEARS, {n: (s, layer.get("reason")) for layer in layers
                                               for n, s in [(layer["name"], layer["status"])]}
    assert status.get("decoder.lm_head.weight") == "float"


#: modes whose Triton kernels run under the interpreter here too (the others' kernels are the
#: same templates with another dtype or scale granularity, covered by tests/kernels): the
#: interpreter compiles take most of this file's time
KERNEL_MODES = ("w4a16", "int8_static", "fp8_dynamic")


@pytest.mark.parametrize("mode", list(MODES))
def test_decode_step_in_every_mode_kernels_match_the_reference_path(mode, tmp_path, monkeypatch):
    model, inputs, cfg, ref, bound = _setup("llama_decode", mode)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    emulated, layers = _compiled_logits(model, inputs, cfg, str(tmp_path / "emulated"))
    _check_layers(layers)
    assert _cosine(emulated, ref) >= bound, _cosine(emulated, ref)
    if mode not in KERNEL_MODES:
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels, layers = _compiled_logits(model, inputs, cfg, str(tmp_path / "kernels"))
    _check_layers(layers)
    scale = emulated.abs().max().item()
    torch.testing.assert_close(kernels, emulated, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("mode", ["w4a16", "int8_dynamic", "fp8_static"])
def test_prefill_in_the_weight_only_and_w8a8_modes(mode, tmp_path, monkeypatch):
    """The prefill graph (many rows: the weight-only skinny/tiled paths, W8A8 GEMMs over the
    prompt) on the emulated path, against the FP32 model."""
    model, inputs, cfg, ref, bound = _setup("llama_prefill", mode)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out, layers = _compiled_logits(model, inputs, cfg, str(tmp_path / "emulated"))
    _check_layers(layers)
    assert _cosine(out, ref) >= bound, _cosine(out, ref)


def test_weight_only_decode_step_is_seven_launches_a_layer(tmp_path, monkeypatch):
    """W4A16 decode (2 rows): each weight-only GEMV is one fused launch (kernels/gemv)
    that also computes its activation: the RMS norm inside the Q/K/V and gate/up GEMVs, SwiGLU's
    product inside the down projection (fx_passes/partition_merge.merge_gemv_prologues). A layer:
    Q/K/V, query rotation, key rotation + cache updates, attention, output projection, gate/up,
    down: 7 launches (was 9 groups and 14 launches with the split-K sums and epilogue kernels).
    Prefill (many rows) keeps the norms as kernels of their own: the tiled GEMMs take no prologue."""
    import compile_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, inputs, cfg, _, _ = _setup("llama_decode", "w4a16")
    with torch.no_grad():
        report = compile_backend.explain(model, *inputs, quant=cfg, cache_dir=str(tmp_path), autotune="off",
                                         speed_check=False)
    (g,) = report.graphs
    gemvs = [k for k in g.kernels if "compile_backend.weight_only_linear" in k["ops"]]
    assert len(gemvs) == DECODER_LINEARS and all(k["config"].get("fused") for k in gemvs), gemvs
    assert sum("aten.mean" in k["ops"] for k in gemvs) == 4 and sum("aten.silu" in k["ops"] for k in gemvs) == 2
    assert len(g.kernels) <= 22, [(k["kind"], k["ops"]) for k in g.kernels]
    model, inputs, cfg, _, _ = _setup("llama_prefill", "w4a16")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.no_grad():
        report = compile_backend.explain(model, *inputs, quant=cfg, cache_dir=str(tmp_path / "prefill"))
    groups = [k["ops"] for g in report.graphs for k in g.kernels if "compile_backend.weight_only_linear" in k["ops"]]
    assert groups and not any("aten.mean" in ops or "aten.silu" in ops for ops in groups), groups
