"""QAT on real data, a short fixed-seed run on the CPU (issue #19; the full two-epoch run is
``python -m benchmarks.qat_bench``, result in benchmarks/results/qat_mnist_cpu.json): the
trained MNIST CNN, every layer quantized, ~40 steps of QAT from the pretrained weights. The
converted engine's top-1 equals the fake-quantized model's within 0.05 point, does not fall
below PTQ's, and for INT8 / FP8 stays within 0.1 point of FP32."""
import pytest
import torch

data = pytest.importorskip("benchmarks.quant_data")
qat_bench = pytest.importorskip("benchmarks.qat_bench")


@pytest.mark.parametrize("precision", ["int4", "int8", "fp8"])
def test_mnist_qat_short_run(aten_only, precision):
    try:
        r = qat_bench.run(precision, epochs=0.1, device=torch.device("cpu"), compiled=False)
    except data.MissingDataError as exc:
        pytest.skip(str(exc))
    print(f"mnist qat {precision}: {r}")
    assert abs(r["qat_engine"] - r["qat_fake_quant"]) <= 0.05
    assert r["qat_engine"] >= r["ptq"] - 0.05
    if precision != "int4":
        assert r["qat_engine"] >= r["fp32"] - 0.1
