"""BatchNorm folding: conv+BN and linear+BN fold in inference (values unchanged, refit works);
any other inference BN becomes a multiply-add in fp32; training graphs and non-constant
statistics are left alone, and a shared conv output is not folded into."""
import pytest
import torch
import torch.nn as nn

from compile_backend.fx_passes import total
from compile_backend.fx_passes.batchnorm import fold_batchnorm
from compile_backend.fx_passes.cleanup import eliminate_dead_code
from compile_backend.fx_passes.constant_fold import constant_fold, constant_programs
from fx_passes.graphs import Builder, check_meta, count, ctx, inference_graph, run, training_graph

aten = torch.ops.aten

# (rtol, atol) per dtype: folding reorders one multiply-add per output; fp16/bf16 round the
# folded weights once instead of rounding the conv output and then the BN output
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


class ConvBN(nn.Module):
    def __init__(self, conv_bias=True, affine=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(5, affine=affine)
        self.conv2 = nn.Conv2d(5, 7, 1, stride=2, groups=1, bias=not conv_bias)
        self.bn2 = nn.BatchNorm2d(7, eps=1e-3)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class LinearBN(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = nn.Linear(9, 6, bias=bias)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return torch.tanh(self.bn(self.fc(x)))


@pytest.mark.parametrize("conv_bias,affine", [(True, True), (False, False)])
def test_conv_bn_folds_and_matches_eager(conv_bias, affine):
    model = _randomise_bn(ConvBN(conv_bias, affine)).eval()
    x = torch.randn(2, 3, 9, 11)
    t = inference_graph(model, x)
    attrs = set(dict(t.gm.named_buffers())) | set(vars(t.gm))
    assert total(fold_batchnorm(t.gm, ctx())) == 2
    assert count(t.gm, "_native_batch_norm_legit_no_training") == 0
    assert count(t.gm, "convolution") == 2
    # nothing precomputed: the new weights are graph ops over the frozen constants
    assert set(dict(t.gm.named_buffers())) | set(vars(t.gm)) == attrs
    t.gm.graph.lint()
    check_meta(t.gm)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_conv_bn_fold_computes_in_fp32_and_casts_back(dtype):
    model = _randomise_bn(ConvBN()).eval().to(dtype)
    x = torch.randn(2, 3, 9, 11, dtype=dtype)
    t = inference_graph(model, x)
    assert total(fold_batchnorm(t.gm, ctx())) == 2
    casts = [n.kwargs.get("dtype") for n in t.gm.graph.nodes if n.target is aten._to_copy.default]
    if dtype != torch.float32:
        assert torch.float32 in casts and dtype in casts
    with torch.no_grad():
        expected = model.double()(x.double()).to(dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(run(t), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn_folds_into_addmm(bias):
    model = _randomise_bn(LinearBN(bias)).eval()
    x = torch.randn(4, 9)
    t = inference_graph(model, x)
    assert total(fold_batchnorm(t.gm, ctx())) == 1
    assert count(t.gm, "_native_batch_norm_legit_no_training") == 0
    assert count(t.gm, "addmm") == 1 and count(t.gm, "mm") == 0
    check_meta(t.gm)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-5)


def test_folded_weights_refit_when_bn_statistics_change():
    model = _randomise_bn(ConvBN()).eval()
    x = torch.randn(2, 3, 9, 11)
    t = inference_graph(model, x)
    fold_batchnorm(t.gm, ctx())
    assert constant_fold(t.gm, ctx()) > 0
    # the frozen weights, as the engine keeps them (views of the module's own tensors)
    frozen = {k: v for k, v in vars(t.gm).items() if k.startswith("_frozen_")}
    frozen.update({k: v for k, v in t.gm.named_buffers() if k.startswith("_frozen_")})
    eliminate_dead_code(t.gm, ctx())
    # the frozen constants share storage with the module: change the statistics in place,
    # re-run the constant program (what the engine does on refit) and compare with eager
    with torch.no_grad():
        model.bn1.running_var.mul_(3.0)
        model.bn2.running_mean.add_(0.5)
        expected = model(x)
    assert not torch.allclose(run(t), expected, rtol=1e-3, atol=1e-3)  # stale until refit
    for program in constant_programs(t.gm):
        constants = {name: frozen[name] for name in program.inputs}
        for name, value in program.run(constants).items():
            getattr(t.gm, name).copy_(value)
    torch.testing.assert_close(run(t), expected, rtol=1e-5, atol=1e-5)


def test_training_graph_is_left_alone():
    model = _randomise_bn(ConvBN())
    t = training_graph(model, torch.randn(2, 3, 9, 11))
    assert total(fold_batchnorm(t.gm, ctx(training=True))) == 0


def test_no_fold_without_constant_statistics_or_with_a_shared_conv_output():
    b = Builder()
    x = b.input(torch.randn(2, 3, 6, 6))
    w = b.const("w", torch.randn(4, 3, 3, 3))
    gamma, beta = b.const("gamma", torch.rand(4) + 0.5), b.const("beta", torch.randn(4))
    mean_in, var_in = b.input(torch.randn(4)), b.input(torch.rand(4) + 0.5)  # not frozen
    conv = b.op(aten.convolution.default, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    bn = b.op(aten._native_batch_norm_legit_no_training.default, conv, gamma, beta, mean_in, var_in, 0.1, 1e-5)
    out1 = b.op(__import__("operator").getitem, bn, 0)
    mean_c, var_c = b.const("mean", torch.randn(4)), b.const("var", torch.rand(4) + 0.5)
    conv2 = b.op(aten.convolution.default, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    bn2 = b.op(aten._native_batch_norm_legit_no_training.default, conv2, gamma, beta, mean_c, var_c, 0.1, 1e-5)
    out2 = b.op(__import__("operator").getitem, bn2, 0)
    t = b.build(out1, out2, conv2)  # conv2's output is also returned: folding would change it
    counts = fold_batchnorm(t.gm, ctx())
    # no fold; the constant-statistics BN becomes element-wise work, the other stays a BN
    assert (counts["conv_bn"], counts["linear_bn"], counts["bn_affine"]) == (0, 0, 1)
    assert count(t.gm, "_native_batch_norm_legit_no_training") == 1
    check_meta(t.gm)


class PreActivation(nn.Module):
    """DenseNet's layer (cat -> BN -> ReLU -> conv) and a pre-activation residual (the BN's
    input is also the skip): no layer before either BN to fold it into."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(7)
        self.conv = nn.Conv2d(7, 7, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(7, eps=1e-3)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, a, b, v):
        x = torch.cat([a, b], 1)
        x = self.conv(torch.relu(self.bn1(x)))
        return x + torch.relu(self.bn2(x)), self.bn3(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_bn_no_layer_takes_becomes_a_multiply_add_in_fp32(dtype):
    model = _randomise_bn(PreActivation()).eval().to(dtype)
    inputs = (torch.randn(2, 3, 5, 6, dtype=dtype), torch.randn(2, 4, 5, 6, dtype=dtype),
              torch.randn(4, 5, 3, dtype=dtype))
    t = inference_graph(model, *inputs)
    counts = fold_batchnorm(t.gm, ctx())
    assert (counts["conv_bn"], counts["bn_affine"]) == (0, 3), counts
    assert count(t.gm, "_native_batch_norm_legit_no_training") == 0
    t.gm.graph.lint()
    check_meta(t.gm)
    with torch.no_grad():
        expected = model.double()(*(x.double() for x in inputs))
    rtol, atol = TOL[dtype]
    for got, want in zip(run(t), expected):
        torch.testing.assert_close(got, want.to(dtype), rtol=rtol, atol=atol)
