"""benchmarks.decode_families in miniature: transformers' decode steps (StaticCache) of families
whose rotary embeddings are spelled differently compile whole, with every op in our kernels
(under the interpreter: the generated kernels themselves), close to eager."""
import json

import pytest

pytest.importorskip("transformers")


def test_gptj_falcon_mistral_and_gpt2_decode_steps_leave_nothing_in_aten(tmp_path):
    from benchmarks import decode_families

    out = tmp_path / "decode.json"
    assert decode_families.main(["--families", "gptj", "falcon", "mistral", "gpt2", "--modes", "float", "w4a16-g32",
                                 "--dtype", "float32", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["errors"] == 0
    for row in record["results"]:
        for mode, r in row["modes"].items():
            # GPT-J: gather of a repeated table + stack (fx_passes/gathers.py); Falcon: qkv[..., [-2], :]
            # (a negative row index); Mistral: sliding-window cache layers; GPT-2: Conv1D's [K, N]
            # weights (INT4 codes of a transposed view)
            assert r["graphs"] == 1 and r["aten"] == [] and r["rejected"] == [] and r["repeatable"], (row["family"], mode, r)
            # INT4 g32 over random N(0, 1/fan_in) weights (quant_families.layers_that_matter): ~0.95-0.98
            assert r["cosine"] > (0.99999 if mode == "float" else 0.93), (row["family"], mode, r)
            assert (r["quantized"] > 0) is (mode != "float")


def test_a_family_whose_own_step_fails_is_recorded(monkeypatch):
    from benchmarks import decode_families

    def broken():
        raise RuntimeError("no such model")

    row = decode_families.run_family("broken", broken, ["float"], __import__("torch").float32, "cpu")
    assert "no such model" in row["error"] and row["modes"] == {}
