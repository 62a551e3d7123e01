"""Where an activation's quantize runs (issue #18: no standalone quantize kernel where the
producer is ours): a LayerNorm feeding a Linear through the [B, S, H] -> [B*S, H] flatten
quantizes inside the norm's kernel, static (per tensor) and dynamic (per row: the row amax
joins the norm's reduction). Generated kernels under the interpreter; values as eager's
fake-quantized model within the quantization error."""
import pytest
import torch
import torch.nn as nn

import compile_backend
from compile_backend import quant


class NormLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 48)

    def forward(self, x):
        return self.fc(self.norm(x))


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_quantize_joins_the_norm_kernel(activations, tmp_path):
    model = NormLinear().eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    cfg = quant.QuantConfig(precision="int8", activations=activations, min_features=1)
    q = quant.calibrate(model, [(x,)], cfg, progress=False, use_cache=False) if activations == "static" else cfg
    with torch.no_grad():
        report = compile_backend.explain(model, x, quant=q, cache_dir=str(tmp_path), autotune="off",
                                         speed_check=False)
    (g,) = report.graphs
    kinds = [(k["kind"], k["ops"]) for k in g.kernels]
    assert [kind for kind, _ in kinds] == ["reduction", "gemm"], kinds  # no quantize kernel of its own
    norm_ops = set(kinds[0][1])
    assert {"aten.native_layer_norm", "aten.round"} <= norm_ops
    if activations == "dynamic":
        assert "aten.amax" in norm_ops
    fast = torch.compile(model, backend="compile_backend", options={"quant": q, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        y, ref = fast(x), model(x)
    cos = torch.nn.functional.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0).item()
    assert cos > 0.999 and not torch.equal(y, ref)
