"""benchmarks.moe_bench on the CPU (tiny sizes, the kernels under the interpreter): every peer runs
at every token count and the weight-only kernels agree with their reference."""
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")


def test_moe_bench_runs_every_peer_and_agrees_with_the_reference(tmp_path):
    from benchmarks import moe_bench

    out = tmp_path / "moe.json"
    assert moe_bench.main(["--device", "cpu", "--models", "qwen15_moe_a27b", "--tokens", "1", "5",
                           "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layer"], r["tokens"], r["rows"]) for r in rows] == [("gate_up", 1, 4), ("gate_up", 5, 20),
                                                                      ("down", 1, 4), ("down", 5, 20)]
    for r in rows:
        assert set(r["peers"]) == {"bf16_grouped_mm", "int8", "int4"} and 1 <= r["experts_touched"] <= 60
        assert max(r["max_rel_err"].values()) < 1e-2, r  # bf16 outputs: one rounding, sums in another order
