"""benchmarks.quant_families in miniature: quantization modes on transformers families (random
init) run without an error and stay close to float; GPT-2's Conv1D with SmoothQuant included."""
import json

import pytest

pytest.importorskip("transformers")


def test_quant_families_gpt2_and_llama_in_bf16(tmp_path, monkeypatch):
    from benchmarks import quant_families

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the emulated path
    out = tmp_path / "families.json"
    assert quant_families.main(["--families", "gpt2", "llama", "--modes", "int8-sq", "w4a16-g32",
                                "--dtype", "bfloat16", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["errors"] == 0 and record["dtype"] == "bfloat16"
    for row in record["results"]:
        for mode, r in row["modes"].items():
            # INT4 g32 over random N(0, 1/fan_in) weights (quant_families.layers_that_matter): 0.95-0.97
            assert r["quantized"] > 0 and r["cosine"] > (0.93 if mode == "w4a16-g32" else 0.97), (row["family"], mode, r)


def test_quant_families_records_an_error_instead_of_raising(monkeypatch):
    """A mode that fails (here an invalid config) becomes the row's error, and the run goes on."""
    import torch

    from benchmarks import quant_families

    monkeypatch.setitem(quant_families.MODES, "w8a16", dict(precision="int8", activations=None, group_size=-1))
    row = quant_families.run_family("llama", quant_families.families()["llama"], ["w8a16"], torch.float32, "cpu")
    assert "error" in row["modes"]["w8a16"], row
