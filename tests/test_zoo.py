"""The zoo: every tiny model builds and runs; base models have the real parameter counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compile_backend import zoo

TINY_OUTPUT_SHAPES = {
    "mlp": (3, 45),
    "resnet50": (2, 10),
    "bert": (3, 13, 48),
    "gpt2": (2, 11, 101),
    "vit": (2, 10),
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


@pytest.mark.parametrize("name", zoo.NAMES)
def test_tiny_builds_and_runs(name):
    model, inputs = zoo.get(name, "tiny")
    assert not model.training
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == TINY_OUTPUT_SHAPES[name]
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0


@pytest.mark.parametrize("name", zoo.NAMES)
def test_seed_is_deterministic_and_leaves_global_rng_alone(name):
    state = torch.get_rng_state()
    m1, x1 = zoo.get(name, "tiny", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    m2, x2 = zoo.get(name, "tiny", seed=3)
    m3, x3 = zoo.get(name, "tiny", seed=4)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(x1, x2))
    assert not all(torch.equal(a, b) for a, b in zip(x1, x3))
    w1 = next(m1.parameters())
    w3 = next(m3.parameters())
    assert not torch.equal(w1, w3)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_train_mode_differs(name):
    model, inputs = zoo.get(name, "tiny")
    if name == "resnet50":  # like the real ResNet-50: no dropout; BatchNorm differs in train
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    else:
        assert any(isinstance(m, nn.Dropout) and m.p == pytest.approx(0.1) for m in model.modules())
    with torch.no_grad():
        eval_out = model(*inputs)
        torch.manual_seed(0)
        train_out = model.train()(*inputs)
    assert not torch.allclose(eval_out, train_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_dtype_casts_floats_only(name, dtype):
    model, inputs = zoo.get(name, "tiny", batch=2, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    for t in inputs:
        assert t.dtype == (dtype if t.is_floating_point() else torch.int64)
    assert inputs[0].shape[0] == 2


def test_bert_mask_hides_padding():
    model, (ids, mask) = zoo.get("bert", "tiny")
    assert (mask == 0).any() and mask[0].all(), "some (not all) rows must be padded"
    row = int(mask.sum(1).argmin())
    pad = mask[row] == 0
    changed = ids.clone()
    changed[row, pad] = (ids[row, pad] + 1) % 97
    with torch.no_grad():
        a, b = model(ids, mask), model(changed, mask)
    real = ~pad
    torch.testing.assert_close(a[row, real], b[row, real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[row, pad], b[row, pad])


def test_gpt2_is_causal():
    model, (ids,) = zoo.get("gpt2", "tiny")
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 101
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, -1], b[:, -1])


def _dynamo_targets(model, inputs):
    """Function/method targets in the graph Dynamo captures (what the backend's passes see)."""
    seen = set()

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op in ("call_function", "call_method"):
                seen.add(getattr(node.target, "__name__", str(node.target)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return seen


def test_attention_forms():
    """bert/gpt2 write the eager chain, vit calls SDPA; q/k/v are separate Linears."""
    bert, bert_in = zoo.get("bert", "tiny")
    gpt2, gpt2_in = zoo.get("gpt2", "tiny")
    vit, vit_in = zoo.get("vit", "tiny")
    bert_ops, gpt2_ops, vit_ops = (_dynamo_targets(m, x) for m, x in
                                   ((bert, bert_in), (gpt2, gpt2_in), (vit, vit_in)))
    assert {"matmul", "softmax"} <= bert_ops and "scaled_dot_product_attention" not in bert_ops
    assert {"matmul", "softmax", "masked_fill"} <= gpt2_ops
    assert "scaled_dot_product_attention" in vit_ops and "softmax" not in vit_ops
    for attn, names in ((bert.layers[0].attention, ("query", "key", "value")),
                        (gpt2.blocks[0].attn, ("q_proj", "k_proj", "v_proj")),
                        (vit.blocks[0].attn, ("q", "k", "v"))):
        projections = [getattr(attn, n) for n in names]
        assert all(isinstance(p, nn.Linear) for p in projections)
        assert len({id(p.weight) for p in projections}) == 3


# Reference sizes: torchvision resnet50 25,557,032; HF BertModel without pooler 108,891,648
# (109,482,240 with it); GPT-2 small 124,439,808 (LM head tied); timm vit_base_patch16_224
# 86,567,656.
BASE_PARAMS = {
    "resnet50": 25_557_032,
    "bert": 108_891_648,
    "gpt2": 124_439_808,
    "vit": 86_567_656,
    "mlp": 4 * (4096 * 4096 + 4096),
}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_base_parameter_counts(name):
    model, inputs = zoo.get(name, "base", batch=1)  # building is cheap; no base forward here
    assert _n_params(model) == BASE_PARAMS[name]


def test_base_default_batches_and_input_shapes():
    expected = {
        "mlp": [(2048, 4096)],
        "resnet50": [(32, 3, 224, 224)],
        "bert": [(16, 128), (16, 128)],
        "gpt2": [(8, 512)],
        "vit": [(32, 3, 224, 224)],
    }
    for name, shapes in expected.items():
        s = zoo.spec(name, "base")
        inputs = s.make_inputs(s.batch, torch.Generator().manual_seed(0))
        assert [tuple(t.shape) for t in inputs] == shapes


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="resnet50"):
        zoo.get("resnet51")
    with pytest.raises(ValueError, match="tiny"):
        zoo.get("mlp", size="huge")
    with pytest.raises(ValueError, match="batch"):
        zoo.get("mlp", batch=0)
