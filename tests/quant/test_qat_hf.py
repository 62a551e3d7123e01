"""QAT on a model no one here wrote: transformers' BertModel (one small layer, random init), prepared,
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
    # one layer of transformers' BertModel, a small vocabulary: each linear kind once (the
    # suite's time goes to interpreted kernels: two layers took 117-135 s on 2 cores)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=512)
    model = real_models.Output(transformers.BertModel(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
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
    assert len(layers) == 6  # query, key, value, attention output, intermediate, output
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
