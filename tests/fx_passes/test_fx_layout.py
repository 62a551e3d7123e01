"""Channels-last layout: the rewrite runs on CPU tensors (one conversion in, copies out only
where needed, values unchanged); the policy only fires for CUDA conv stacks in inference."""
import torch
import torch.nn as nn

from compile_backend.fx_passes.batchnorm import fold_batchnorm
from compile_backend.fx_passes.layout import choose_layout, to_channels_last
from fx_passes.graphs import check_meta, count, ctx, inference_graph, run


class ConvStack(nn.Module):
    def __init__(self, convs=3):
        super().__init__()
        layers, c = [], 3
        for i in range(convs):
            layers += [nn.Conv2d(c, 6 + i, 3, padding=1), nn.BatchNorm2d(6 + i), nn.ReLU()]
            c = 6 + i
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c * 5 * 7, 4)

    def forward(self, x):
        y = self.body(x)
        return self.head(y.flatten(1)), y


def _layout_clones(gm, fmt):
    return [n for n in gm.graph.nodes
            if n.target is torch.ops.aten.clone.default and n.kwargs.get("memory_format") == fmt]


def test_conv_stack_switches_with_one_conversion_in():
    model = ConvStack().eval()
    x = torch.randn(2, 3, 5, 7)
    t = inference_graph(model, x)
    fold_batchnorm(t.gm, ctx())
    out_strides = [n.meta["val"].stride() for n in next(iter(reversed(t.gm.graph.nodes))).all_input_nodes]
    assert choose_layout(t.gm, ctx(device="cuda")) == 3
    check_meta(t.gm)
    inputs = [n for n in _layout_clones(t.gm, torch.channels_last) if n.args[0].op == "placeholder"]
    assert len(inputs) == 1  # the image, converted once
    # flatten(1) of a channels-last value cannot be a view: one contiguous copy feeds it
    assert len(_layout_clones(t.gm, torch.contiguous_format)) == 2  # flatten + returned y
    output = next(iter(reversed(t.gm.graph.nodes)))
    assert [n.meta["val"].stride() for n in output.all_input_nodes] == out_strides
    with torch.no_grad():
        expected = model(x)
    for got, want in zip(run(t), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.stride() == want.stride()


def test_policy_needs_cuda_inference_and_a_stack():
    x = torch.randn(2, 3, 5, 7)
    t = inference_graph(ConvStack().eval(), x)
    assert choose_layout(t.gm, ctx(device="cpu")) == 0
    assert choose_layout(t.gm, ctx(device="cuda", training=True)) == 0
    t = inference_graph(ConvStack(convs=1).eval(), x)
    assert choose_layout(t.gm, ctx(device="cuda")) == 0  # a lone conv is not worth two copies
    assert count(t.gm, "clone") == 0


def test_rewrite_is_idempotent():
    t = inference_graph(ConvStack().eval(), torch.randn(2, 3, 5, 7))
    to_channels_last(t.gm)
    clones = count(t.gm, "clone")
    to_channels_last(t.gm)
    assert count(t.gm, "clone") == clones
