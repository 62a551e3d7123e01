"""The zoo's tiny models through every pass: pass counts and groups per kind are pinned (read
from the partition of the traced graphs), and the rewritten graphs still compute eager's values."""
import collections

import pytest
import torch

from compile_backend import zoo
from compile_backend.fx_passes.partition import partition, validate
from fx_passes.graphs import ctx, inference_graph, run, run_passes

EXPECTED = {
    # passes: (CSE, no-ops, BN folded, GEMM merges, attention fusions); groups per kind
    "mlp": ((0, 3, 0, 0, 0), {"gemm": 4}),
    "resnet50": ((0, 0, 17, 0, 0), {"conv": 17, "gemm": 1, "pool": 1, "reduction": 1}),
    # the token embedding runs in a pointwise kernel with the add after it (was ATen; BERT's add
    # left its norm's prologue for it: the same count, nothing in ATen; GPT-2: one launch fewer)
    "bert": ((4, 15, 0, 2, 2), {"attention": 2, "gemm": 8, "pointwise": 2, "reduction": 5}),
    "gpt2": ((4, 15, 0, 2, 2), {"attention": 2, "gemm": 9, "pointwise": 1, "reduction": 5}),
    # the class-token cat joins the position-embedding add's pointwise kernel (was an ATen cat)
    "vit": ((4, 7, 0, 2, 2), {"attention": 2, "conv": 1, "gemm": 9, "pointwise": 1, "reduction": 5}),
}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_tiny_model_pass_counts_and_groups(name):
    model, inputs = zoo.get(name, "tiny")
    t = inference_graph(model, *inputs)
    with torch.no_grad():
        expected = model(*inputs)
    counts = run_passes(t.gm, ctx())
    fired = tuple(counts[k] for k in ("eliminate_common_subexpressions", "remove_noops", "fold_batchnorm",
                                      "merge_parallel_gemms", "fuse_attention"))
    groups = partition(t.gm)
    validate(t.gm, groups)
    kinds = dict(sorted(collections.Counter(g.kind for g in groups).items()))
    assert (fired, kinds) == EXPECTED[name]
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-5)
