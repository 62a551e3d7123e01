"""Residual adds reading 8-bit codes (fx_passes/quant_residual.py, ``options["quant_residuals"]``):
a block input read by a quantized convolution and by the skip connection's add is written once,
in 8 bits, where the add may read the codes; the engine's values stay within the quantization
error of eager's. Generated kernels under the interpreter (float32 model: the CPU's)."""
import pytest
import torch

import compile_backend
from compile_backend import quant
from helpers import groups_built  # tests/helpers.py


class ResidualStack(torch.nn.Module):
    """Two ResNet basic-style blocks: x -> relu(conv2(relu(conv1(x))) + x), each input read by
    the block's first convolution and its skip connection."""

    def __init__(self, channels=8):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleList([torch.nn.Conv2d(channels, channels, 3, padding=1),
                                 torch.nn.Conv2d(channels, channels, 1)]) for _ in range(2))
        self.head = torch.nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for a, b in self.blocks:
            h = torch.relu(b(torch.relu(a(h))) + h)
        return self.head(h)


def _explain(model, x, calib, tmp_path, residuals):
    with torch.no_grad():
        return compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path / residuals), autotune="off",
                                       speed_check=False, quant_residuals=residuals)


def _written(monkeypatch, model, x, calib, tmp_path, residuals):
    """(report, [(ops, output dtypes)] of each convolution kernel the engine builds)."""
    seen = groups_built(monkeypatch)
    report = _explain(model, x, calib, tmp_path, residuals)
    convs = [(g.ops, [o.meta["val"].dtype for o in g.outputs]) for g in seen if g.kind == "conv"]
    monkeypatch.undo()
    return report, convs


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_skip_connections_read_the_codes(precision, monkeypatch, tmp_path):
    model = ResidualStack().eval()
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(3))
    calib = quant.calibrate(model, [(x,)], quant.QuantConfig(precision=precision, min_features=1), progress=False,
                            use_cache=False)
    floats, float_convs = _written(monkeypatch, model, x, calib, tmp_path, "float")
    codes, code_convs = _written(monkeypatch, model, x, calib, tmp_path, "quantized")
    assert floats.graphs[0].rules["quantize"]["residual_reads_codes"] == 0
    assert codes.graphs[0].rules["quantize"]["residual_reads_codes"] == 2  # both blocks' adds
    codes_dtype = torch.int8 if precision == "int8" else torch.float8_e4m3fn
    # the stem and both blocks write their output in float and in 8 bits for the float adds;
    # reading the codes, in 8 bits alone
    assert sum(dt.count(torch.float32) for _, dt in float_convs) > sum(dt.count(torch.float32) for _, dt in code_convs)
    assert [dt for _, dt in code_convs] == [[codes_dtype], [codes_dtype], [codes_dtype], [codes_dtype], [codes_dtype],
                                            [torch.float32]], code_convs
    # each add's kernel (the block's second convolution) dequantizes the codes it reads
    adds = [ops for ops, _ in code_convs if "aten.add" in ops]
    assert len(adds) == 2 and all(ops[1:4] == ("aten._to_copy", "aten.mul", "aten.add") for ops in adds), adds
    fast = torch.compile(model, backend="compile_backend",
                         options={"quant": calib, "cache_dir": str(tmp_path / "run"), "quant_residuals": "quantized"})
    with torch.no_grad():
        y, ref = fast(x), model(x)
    cos = torch.nn.functional.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0).item()
    assert cos > (0.995 if precision == "int8" else 0.99), cos


def test_a_value_with_a_float_reader_keeps_its_float_add(tmp_path):
    """The skip connection keeps the float value when something else reads it in float (here the
    model's output): the float copy is written anyway, the codes would only add error."""

    class Returned(ResidualStack):
        def forward(self, x):
            h = torch.relu(self.stem(x))
            a, b = self.blocks[0]
            return self.head(torch.relu(b(torch.relu(a(h))) + h)), h

    model = Returned().eval()
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(4))
    calib = quant.calibrate(model, [(x,)], quant.QuantConfig(min_features=1), progress=False, use_cache=False)
    (g,) = _explain(model, x, calib, tmp_path, "quantized").graphs
    assert g.rules["quantize"]["residual_reads_codes"] == 0


def test_the_option_is_checked():
    from compile_backend.options import Options

    with pytest.raises(ValueError, match="quant_residuals"):
        Options(quant_residuals="int8")


def test_an_fp8_epilogue_load_reads_zero_as_a_float():
    """Masked-off lanes of an FP8 load read 0.0: compiled Triton has no int -> fp8 cast (the
    interpreter has one), and every Triton candidate of an FP8 residual group failed on the GPU
    for ``other=0`` (H100 session 22: the group fell back to cuDNN over fp32 copies, 0.9 ms)."""
    from compile_backend.kernels.expr_casts import masked_zero
    from compile_backend.kernels.gemm_template import EpilogueSpec, epilogue_body

    assert masked_zero(torch.empty(2, dtype=torch.float8_e4m3fn)) == "0.0"
    assert masked_zero(torch.empty(2, dtype=torch.int8)) == masked_zero(torch.empty(2)) == "0"
    spec = EpilogueSpec(loads=("r0", "r1"), lines=("v = acc + r0 + r1",), stores=("v",), load_zeros=("0.0", "0"))
    body = "\n".join(epilogue_body(spec, lambda p: f"{p}_off", "mask", ""))
    assert "L0 + l0_off, mask=mask, other=0.0)" in body and "L1 + l1_off, mask=mask, other=0)" in body
