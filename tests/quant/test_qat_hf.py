"""QAT on a model no one here wrote: transformers' BertModel (tiny config, random init), prepared,
trained two steps through the backend (interpreted kernels) and eagerly from the same weights:
the same losses and weights (dropout off, the attention's too: compiled and eager draw random
numbers differently),
every linear fake-quantized, the fake quantization in our kernels, then converted to the
quantized engine whose output equals the fake-quantized model's."""
import copy

import pytest
import torch

import compile_backend
from compile_backend import quant

pytest.importorskip("transformers")
from benchmarks import real_models  # noqa: E402


def _bert():
    model, (ids,) = real_models.hf_bert(batch=2, size="tiny", seq=8)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout_prob", None), float):  # SDPA attention's own dropout
            m.dropout_prob = 0.0
    return model, ids


def _train(model, ids, steps, compiled):
    run = torch.compile(model, backend="compile_backend") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    target = torch.randn(2, 8, model.m.config.hidden_size, generator=torch.Generator().manual_seed(5))
    losses = []
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(run(ids), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_qat_on_transformers_bert_trains_compiled_like_eager_and_converts(tmp_path):
    model, ids = _bert()
    cfg = quant.QuantConfig(precision="int8", calibrator="max")
    quant.prepare_qat(model.eval(), cfg, [(ids,)], progress=False, cache_dir=str(tmp_path))
    twin = copy.deepcopy(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, quant.qat.QATLayer)]
    assert len(layers) == 12  # 2 layers x (query, key, value, attention output, intermediate, output)
    compiled = _train(model, ids, 2, compiled=True)
    eager = _train(twin, ids, 2, compiled=False)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)

    report = compile_backend.explain(model.train(), ids, cache_dir=str(tmp_path))
    for g in report.graphs:
        assert g.fake_quant and g.fake_quant["aten"] == 0, (g.role, g.fake_quant)

    model.eval()
    with torch.no_grad():
        fake = model(ids)
    calib = quant.convert(model)
    fast = torch.compile(model, backend="compile_backend", options={"quant": calib, "cache_dir": str(tmp_path)})
    with torch.no_grad():
        got = fast(ids)
    torch.testing.assert_close(got, fake, rtol=1e-3, atol=1e-3)
