"""benchmarks/decode_bench.py on the CPU (issue #20): the zoo and transformers' decode steps
through every kind of peer, tiny sizes, their records (cosines, per-layer SQNR, Dynamo's
counters), torchao's weight-only peers and the fp32 reference's memory guard."""
from __future__ import annotations

import pytest
import torch


def test_decode_bench_cpu_records_peers_cosine_and_per_layer_sqnr(tmp_path, monkeypatch):
    """The decode benchmark (issue #20) on the CPU, tiny decoder: every peer recorded with its
    tokens/s and cosine against eager; the weight-only engines with every quantized layer's
    output SQNR (INT8 per channel above INT4 grouped)."""
    import json

    from benchmarks import decode_bench

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the emulated path: fast on the CPU
    out = tmp_path / "decode.json"
    assert decode_bench.main(["--size", "tiny", "--device", "cpu", "--batches", "1", "--iters", "1",
                              "--peers", "eager", "compile_backend", "w8a16", "w4a16", "--out", str(out)]) == 0
    rows = {r["peer"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"eager", "compile_backend", "w8a16", "w4a16"}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s"] > 0 and r["cosine_vs_eager"] > 0.99
        assert r["primed_s"] > 0  # first calls measured after the process's own start-up
    w8, w4 = rows["w8a16"]["layer_sqnr_db"], rows["w4a16"]["layer_sqnr_db"]
    assert len(w8) == 14 and set(w8) == set(w4)  # 2 layers x 7 linears (merged ones counted per part)
    assert rows["w8a16"]["layer_sqnr_db_min"] > rows["w4a16"]["layer_sqnr_db_min"] > 5, (w8, w4)

    # the prefill row's W8A8 engines with SmoothQuant: calibrated, per-layer SQNR from calibration
    out = tmp_path / "prefill.json"
    assert decode_bench.main(["--size", "tiny", "--device", "cpu", "--batches", "1", "--iters", "1", "--prefill",
                              "--peers", "eager", "int8-sq", "fp8-sq", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text()) if r["case"] == "prefill"]
    assert [r["peer"] for r in rows] == ["eager", "int8-sq", "fp8-sq"]
    for r in rows[1:]:
        assert "error" not in r, r.get("error")
        assert r["quantized"] > 0 and r["cosine_vs_eager"] > 0.98 and r["layer_sqnr_db_min"] > 10, r


def test_decode_bench_times_transformers_mixtral(tmp_path, monkeypatch):
    """``--model hf-moe``: transformers' Mixtral decode step, tiny, bf16, on the CPU: every peer
    runs and the weight-only engine quantizes layers (on transformers 5 the experts too, as
    ``weight_only_grouped_mm``; transformers 4's experts are linears in a loop)."""
    import json

    transformers = pytest.importorskip("transformers")
    from benchmarks import decode_bench

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the emulated path: fast on the CPU
    out = tmp_path / "moe.json"
    assert decode_bench.main(["--model", "hf-moe", "--size", "tiny", "--device", "cpu", "--dtype", "bfloat16",
                              "--batches", "1", "--iters", "1", "--peers", "eager", "w4a16", "--out", str(out)]) == 0
    rows = {r["peer"]: r for r in json.loads(out.read_text())}
    assert rows["eager"]["model"] == "hf-moe" and not rows["w4a16"].get("error"), rows["w4a16"].get("error")
    assert rows["w4a16"]["quantized"] > 0 and rows["w4a16"]["cosine_vs_eager"] > 0.98
    if int(transformers.__version__.split(".")[0]) >= 5:  # experts as [E, N, K] parameters: 4 linears + 4 experts
        assert rows["w4a16"]["quantized"] == 8 and rows["w4a16"]["cosine_vs_reference"] > 0.9999, rows["w4a16"]


def test_decode_bench_times_transformers_llama_with_a_static_cache(tmp_path, monkeypatch):
    """``--model hf``: the decode step of transformers' LlamaForCausalLM (a StaticCache written in
    place) through the same peers, tiny sizes on the CPU: recorded, close to eager, quantized."""
    import json

    pytest.importorskip("transformers")
    from benchmarks import decode_bench

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the emulated path: fast on the CPU
    out = tmp_path / "hf.json"
    assert decode_bench.main(["--model", "hf", "--size", "tiny", "--device", "cpu", "--batches", "1", "--iters", "1",
                              "--peers", "eager", "compile_backend", "w4a16", "--out", str(out)]) == 0
    rows = {r["peer"]: r for r in json.loads(out.read_text())}
    assert rows["eager"]["model"] == "hf" and "error" not in rows["w4a16"], rows["w4a16"].get("error")
    # every call decodes the same position (transformers 5 advances its cache's count per call:
    # the step resets it), so a peer timed after others still matches the fp32 reference
    for peer in ("eager", "compile_backend"):
        assert rows[peer]["cosine_vs_fp32"] > 0.9999, (peer, rows[peer].get("cosine_vs_fp32"), rows[peer].get("error"))
    # Dynamo's counters per peer: our engine's step is one graph, no break
    assert rows["compile_backend"]["compile_counters"]["unique_graphs"] == 1
    assert rows["compile_backend"]["compile_counters"]["graph_breaks"] == 0
    assert rows["w4a16"]["quantized"] == 8 and rows["w4a16"]["cosine_vs_eager"] > 0.99  # 2 layers x 4 (merged)


def test_decode_bench_times_the_zoo_step_writing_its_caches_in_place(tmp_path, monkeypatch):
    """``--model zoo-inplace``: the zoo decoder's step into per-layer caches written in place."""
    import json

    from benchmarks import decode_bench

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "zoo_inplace.json"
    assert decode_bench.main(["--model", "zoo-inplace", "--size", "tiny", "--device", "cpu", "--batches", "1",
                              "--iters", "1", "--peers", "eager", "compile_backend", "w8a16", "w8a16-head",
                              "--out", str(out)]) == 0
    rows = {r["peer"]: r for r in json.loads(out.read_text())}
    assert all("error" not in r for r in rows.values()), [r.get("error") for r in rows.values()]
    assert rows["compile_backend"]["cosine_vs_eager"] > 0.9999 and rows["w8a16"]["cosine_vs_eager"] > 0.999
    # the -head peer quantizes the LM head as well, and reports its SQNR
    assert rows["w8a16-head"]["quantized"] == rows["w8a16"]["quantized"] + 1
    assert "decoder.lm_head.weight" in rows["w8a16"]["float_layers"] and not rows["w8a16-head"]["float_layers"]
    assert rows["w8a16-head"]["layer_sqnr_db"]["decoder.lm_head"] > 30


def test_decode_bench_torchao_weight_only_peers(tmp_path):
    """torchao's weight-only peers (issue #20's published numbers are torchao's): INT8 quantizes
    every Linear of a copy and stays close to the float step; INT4 (tinygemm, bfloat16 only) on a
    float32 model is refused with the reason and the flag that fixes it, recorded in its row."""
    import json

    pytest.importorskip("transformers")
    pytest.importorskip("torchao")
    from benchmarks import decode_bench

    model, inputs = decode_bench.hf_decode_case("tiny", 1, "cpu", torch.float32)
    twin = decode_bench.torchao_weight_only(model, "torchao-int8wo")
    assert twin is not model and type(model.model.lm_head.weight) is torch.nn.Parameter  # the original untouched
    assert type(twin.model.lm_head.weight).__name__ != "Parameter"  # the head quantized too
    with torch.no_grad():
        ref, out = model(*inputs)[0], twin(*inputs)[0]
    assert torch.nn.functional.cosine_similarity(ref.reshape(-1), out.reshape(-1), dim=0) > 0.99
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        decode_bench.torchao_weight_only(model, "torchao-int4wo")
    out_file = tmp_path / "ao.json"
    decode_bench.main(["--model", "hf", "--size", "tiny", "--device", "cpu", "--batches", "1", "--iters", "1",
                       "--peers", "eager", "torchao-int4wo", "--out", str(out_file)])
    rows = {r["peer"]: r for r in json.loads(out_file.read_text())}
    assert "--dtype bfloat16" in rows["torchao-int4wo"]["error"] and rows["eager"]["dtype"] == "float32"
    assert rows["eager"]["compile_counters"] == {"unique_graphs": 0, "graph_breaks": 0, "cudagraph_skips": 0}


def test_decode_bench_skips_an_fp32_reference_that_would_not_fit(monkeypatch):
    """An fp32 copy of the model for the reference cosine is skipped, with the sizes, when the
    GPU's free memory cannot hold it (session 34: an 8B model's ran out of memory mid-run)."""
    from benchmarks import decode_bench

    class Weight:
        is_cuda, device = True, "cuda:0"

        def numel(self):
            return 8 * 10**9

    class Model:
        def parameters(self):
            return [Weight()]

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    reason = decode_bench.fp32_copy_short(Model())
    assert reason.startswith("skipped") and "48.4 GiB" in reason and "40.0 GiB free" in reason
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * 2**30, 80 * 2**30))
    assert decode_bench.fp32_copy_short(Model()) is None
    assert decode_bench.fp32_copy_short(torch.nn.Linear(2, 2)) is None  # on the CPU: nothing to check
