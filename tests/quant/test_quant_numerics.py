"""Quantized engines on the edge cases issue #16 names (CPU, the emulated path): zero and tiny
scales give exact zeros (never NaN or inf), FP8 saturates at +-448 before the cast, inf in
calibration data is clipped by the calibrator and reported, NaN and empty data are errors."""
import pytest
import torch
import torch.nn as nn

import compile_backend
from compile_backend import quant
from compile_backend.kernels import quant_ref


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 24)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _compiled(model, q, tmp_path):
    torch._dynamo.reset()
    return torch.compile(model, backend="compile_backend", options={"quant": q, "cache_dir": str(tmp_path)})


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_zero_and_tiny_calibration_ranges_give_exact_zeros(aten_only, precision, tmp_path):
    model = Two().eval()
    for scale in (0.0, 1e-30):
        calib = quant.calibrate(model, [(torch.full((4, 32), scale),)], quant.QuantConfig(precision=precision),
                                progress=False, use_cache=False)
        assert calib.amax("a.weight") <= quant_ref.TINY_AMAX
        with torch.no_grad():
            y = _compiled(model, calib, tmp_path)(torch.randn(3, 32))
        assert torch.isfinite(y).all()
        # layer a sees a zero scale: its quantized input is exactly 0, so its output is its bias
        hidden = torch.relu(model.a.bias).expand(3, 32)
        torch.testing.assert_close(y, model.b(hidden), rtol=0.05, atol=0.05)


def test_fp8_saturates_inputs_beyond_the_calibrated_range(aten_only, tmp_path):
    model = Two().eval()
    calib = quant.calibrate(model, [(torch.randn(8, 32) * 0.01,)], quant.QuantConfig(precision="fp8"),
                            progress=False, use_cache=False)
    x = torch.randn(3, 32) * 1e6  # 1e8 times the calibrated range: past e4m3's 448 after scaling
    with torch.no_grad():
        y = _compiled(model, calib, tmp_path)(x)
    assert torch.isfinite(y).all()
    q = quant_ref.quantize(x, quant_ref.scale_from_amax(torch.tensor(calib.amax("a.weight")), "fp8"), "fp8")
    assert q.float().abs().max() == 448


def test_inf_in_calibration_data_is_clipped_and_reported(aten_only, tmp_path):
    data = [(torch.randn(8, 32),), (torch.randn(8, 32),)]
    data[1][0][0, 0] = float("inf")
    model = Two().eval()
    calib = quant.calibrate(model, data, quant.QuantConfig(precision="int8", calibrator="max"),
                            progress=False, use_cache=False)
    layer = calib.layer("a.weight")
    assert layer.inf_count == 1 and layer.amax == float(torch.cat([d[0] for d in data]).nan_to_num(posinf=0).abs().max())
    report = compile_backend.explain(model, torch.randn(3, 32), quant=calib, cache_dir=str(tmp_path))
    (row,) = [q for g in report.graphs for q in g.quant if q["name"] == "a.weight"]
    assert row["inf_count"] == 1 and row["status"] == "quantized"


def test_the_reference_sums_integer_codes_exactly_in_fp32_only_where_they_fit():
    """``quant_ref``'s INT8 GEMM / convolution sums integer products in fp32 where max |x| times
    the largest row's sum of |w| stays below 2^24 (exact there), else in fp64: equal to the
    int64 product either way, at a K where K * 127^2 passes 2^24."""
    from compile_backend.kernels import quant_ref

    gen = torch.Generator().manual_seed(0)
    k = 1153  # 1153 * 127^2 > 2^24
    small = torch.randint(-40, 41, (5, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-30, 31, (7, k), generator=gen, dtype=torch.int8)
    assert quant_ref.int_sums_fit_fp32(small, w)
    full = torch.full((5, k), -127, dtype=torch.int8)
    wide = torch.full((7, k), 127, dtype=torch.int8)
    assert not quant_ref.int_sums_fit_fp32(full, wide)
    assert not quant_ref.int_sums_fit_fp32(torch.full((1, k), -128, dtype=torch.int8), torch.full((1, k), 116, dtype=torch.int8))  # 128 (not -128) * 116 * 1153 > 2^24
    one = torch.ones((), dtype=torch.float32)
    for xq, wq in ((small, w), (full, wide)):
        exact = (xq.to(torch.int64) @ wq.to(torch.int64).t()).double()
        got = quant_ref.scaled_mm(xq, one, wq, one, out_dtype=torch.float64)
        assert torch.equal(got, exact.float().double())  # the fp32 result of the exact sum
    conv_x = torch.randint(-20, 21, (2, 128, 5, 5), generator=gen, dtype=torch.int8)
    conv_w = torch.randint(-20, 21, (9, 128, 3, 3), generator=gen, dtype=torch.int8)  # K = 1152
    assert quant_ref.int_sums_fit_fp32(conv_x, conv_w)
    ref = torch.nn.functional.conv2d(conv_x.double(), conv_w.double(), padding=1)
    got = quant_ref.scaled_conv(conv_x, one, conv_w, one, None, (1, 1), (1, 1), (1, 1), 1, out_dtype=torch.float64)
    assert torch.equal(got, ref.float().double())
