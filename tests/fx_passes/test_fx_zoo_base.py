"""The zoo's base-size models on CPU (fp32, batch 1): every BatchNorm of ResNet-50 folded; Q/K/V
merged and attention fused in every layer of BERT, GPT-2 (causal, from its tril buffer) and ViT (SDPA)."""
import operator

import pytest
import torch

from compile_backend import zoo
from compile_backend.fx_passes import total
from compile_backend.fx_passes.attention import fuse_attention
from compile_backend.fx_passes.batchnorm import fold_batchnorm
from compile_backend.fx_passes.cleanup_rules import eliminate_common_subexpressions, remove_noops
from compile_backend.fx_passes.merge_gemms import merge_parallel_gemms
from fx_passes.graphs import count, ctx, inference_graph

aten = torch.ops.aten
LAYERS = 12  # every base transformer in the zoo has 12 layers


def check_resnet50() -> None:
    model, inputs = zoo.get("resnet50", "base", batch=1)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 53
    t = inference_graph(model, *inputs)
    c = ctx()
    eliminate_common_subexpressions(t.gm, c)
    remove_noops(t.gm, c)
    assert total(fold_batchnorm(t.gm, c)) == n_bn
    assert count(t.gm, "_native_batch_norm_legit_no_training") == 0
    assert count(t.gm, "convolution") == n_bn


def check_attention_model(name: str, causal: bool) -> None:
    model, inputs = zoo.get(name, "base", batch=1)
    t = inference_graph(model, *inputs)
    c = ctx()
    eliminate_common_subexpressions(t.gm, c)
    remove_noops(t.gm, c)
    assert total(merge_parallel_gemms(t.gm, c)) == LAYERS
    splits = [n for n in t.gm.graph.nodes if n.target is aten.split_with_sizes.default]
    assert len(splits) == LAYERS
    hidden = 768
    for s in splits:  # Q, K and V: three equal pieces of one GEMM over the layer input
        assert list(s.args[1]) == [hidden] * 3
        assert sorted(u.args[1] for u in s.users if u.target is operator.getitem) == [0, 1, 2]
    assert total(fuse_attention(t.gm, c)) == LAYERS
    fused = [n for n in t.gm.graph.nodes if n.target is torch.ops.compile_backend.attention.default]
    assert len(fused) == LAYERS
    assert all(n.args[5] is causal for n in fused)
    assert all(n.args[4] == 1 / 8 for n in fused)  # 1 / sqrt(head dim 64)
    assert count(t.gm, "_softmax") == 0 and count(t.gm, "bmm") == 0


@pytest.mark.slow
def test_resnet50_base_folds_every_batchnorm():
    check_resnet50()


@pytest.mark.slow
def test_bert_base_merges_qkv_and_fuses_attention_in_every_layer():
    check_attention_model("bert", causal=False)


@pytest.mark.slow
def test_gpt2_base_merges_qkv_and_fuses_causal_attention_in_every_layer():
    check_attention_model("gpt2", causal=True)


@pytest.mark.slow
def test_vit_base_merges_qkv_and_fuses_attention_in_every_layer():
    check_attention_model("vit", causal=False)
