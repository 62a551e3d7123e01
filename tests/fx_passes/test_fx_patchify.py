"""patchify_convolutions: a convolution whose stride is its kernel, over few input channels (a
ViT's / Swin's / ConvNeXt's patch embedding), becomes one copy of its patches and a GEMM; other
convolutions stay. Values against eager, metadata against a fresh propagation."""
import pytest
import torch
import torch.nn as nn

from compile_backend.fx_passes.patchify import patchify_convolutions
from fx_passes.graphs import count, ctx, rewritten


def _patchified(model, *inputs):
    return rewritten(patchify_convolutions, "patch_conv_as_gemm", model, *inputs, tol=1e-4)


class PatchEmbed(nn.Module):
    """torchvision ViT's embedding: conv (stride = kernel), flattened to tokens, then a linear."""

    def __init__(self, c=3, dim=12, patch=(4, 4), bias=True):
        super().__init__()
        self.proj = nn.Conv2d(c, dim, patch, stride=patch, bias=bias)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        y = self.proj(x)
        return self.fc(y.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("shape,patch,bias", [((2, 3, 16, 12), (4, 4), True), ((1, 3, 19, 10), (4, 3), False),
                                              ((3, 1, 10, 14), (5, 7), True)])
def test_a_patch_embedding_becomes_a_gemm_of_its_patches(shape, patch, bias):
    """Odd sizes: pixels past the last whole patch are dropped as the convolution drops them."""
    t, n = _patchified(PatchEmbed(shape[1], 12, patch, bias).eval(), torch.randn(shape))
    assert n == 1 and count(t.gm, "convolution") == 0
    assert count(t.gm, "addmm" if bias else "mm") >= 1


class Stem(nn.Module):
    """A ConvNeXt-like stem (4x4 stride 4) feeding a 3x3 convolution, and a ResNet stem (7x7
    stride 2, padding 3) and a convolution over many channels: only the first is a patch GEMM."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.resnet = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.wide = nn.Conv2d(8, 8, 2, stride=2)

    def forward(self, x):
        a = self.body(torch.relu(self.patch(x)))
        return a.sum() + self.resnet(x).sum() + self.wide(a).sum()


def test_channels_last_and_strided_inputs():
    """The patch grid is a view that only splits dims: any input strides take it."""
    x = torch.randn(2, 3, 16, 12).contiguous(memory_format=torch.channels_last)
    _, n = _patchified(PatchEmbed().eval(), x)
    assert n == 1
    _, n = _patchified(PatchEmbed().eval(), torch.randn(2, 3, 33, 26)[:, :, 1:, ::2])
    assert n == 1


def test_only_patch_convolutions_over_few_channels_change():
    t, n = _patchified(Stem().eval(), torch.randn(2, 3, 16, 16))
    assert n == 1 and count(t.gm, "convolution") == 3


def test_training_graphs_are_left_alone():
    from fx_passes.graphs import training_graph

    t = training_graph(PatchEmbed().train(), torch.randn(2, 3, 8, 8))
    assert patchify_convolutions(t.gm, ctx(training=True)) == {}


def test_a_patch_embedding_runs_as_our_gemm_through_the_backend(tmp_path):
    """End to end (generated kernels under the interpreter): the report counts the rule, the
    engine has no convolution group, the values match eager; an INT8 engine quantizes the patch
    GEMM as a linear layer (its input's quantize joins the patches' copy)."""
    import compile_backend
    from compile_backend import quant
    from helpers import compile_and_compare

    model, x = PatchEmbed(3, 16, (4, 4)).eval(), torch.randn(2, 3, 17, 16)
    report = compile_backend.explain(model, x, cache_dir=str(tmp_path))
    (g,) = report.graphs
    assert g.rules["patchify_convolutions"] == {"conv1d_as_conv2d": 0, "patch_conv_as_gemm": 1}
    assert "conv" not in {k["kind"] for k in g.kernels} and "gemm" in {k["kind"] for k in g.kernels}
    compile_and_compare(model, [x], options={"cache_dir": str(tmp_path)})
    cfg = quant.QuantConfig(precision="int8", activations="dynamic")
    q = compile_backend.explain(model, x, quant=cfg, cache_dir=str(tmp_path)).graphs[0]
    assert {s["name"]: s["status"] for s in q.quant}.get("proj.weight") == "quantized", q.quant


def test_dynamic_batch_sizes_stay_correct():
    """Compiled with dynamic shapes (a symbolic batch): the rule leaves symbolic sizes alone and
    every batch matches eager."""
    model = PatchEmbed(3, 16, (4, 4)).eval()
    compiled = torch.compile(model, backend="compile_backend", dynamic=True)
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 16, 12)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def _hf_models():
    transformers = pytest.importorskip("transformers")
    return {
        "vit": lambda: transformers.ViTModel(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)),
        "swin": lambda: transformers.SwinModel(transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)),
        "convnext": lambda: transformers.ConvNextModel(transformers.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32)),
    }


@pytest.mark.parametrize("name", ["vit", "swin", "convnext"])
def test_transformers_patch_embeddings_become_gemms(name):
    """Models no one here wrote (tiny transformers configs, random weights): each one's patch
    embedding is rewritten once and the compiled model matches eager."""
    import compile_backend

    torch.manual_seed(0)
    model, x = _hf_models()[name]().eval(), torch.randn(2, 3, 32, 32)
    report = compile_backend.explain(model, x, autotune="off", speed_check=False)
    assert sum(g.rules.get("patchify_convolutions", {}).get("patch_conv_as_gemm", 0) for g in report.graphs) == 1
    compiled = torch.compile(model, backend="compile_backend", options={"autotune": "off", "speed_check": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_a_static_int8_engine_quantizes_the_patches_in_their_copy(tmp_path):
    """INT8 static: the patch GEMM's input quantize (scale, round, clamp, cast) runs in the
    kernel copying the patches (``sink_views`` moved it in front of the rows' view), not in a
    second element-wise kernel."""
    import compile_backend
    from compile_backend import quant

    model, x = PatchEmbed(3, 64, (4, 4)).eval(), torch.randn(2, 3, 32, 32)
    calib = quant.calibrate(model, [(x,)], quant.QuantConfig(precision="int8", min_features=1), progress=False,
                            use_cache=False)
    (g,) = compile_backend.explain(model, x, quant=calib, cache_dir=str(tmp_path), autotune="off",
                                   speed_check=False).graphs
    copies = [k for k in g.kernels if "aten.clone" in k["ops"]]
    assert len(copies) == 1 and "aten.round" in copies[0]["ops"], g.kernels
    assert g.rules["sink_views"]["elementwise_before_view"] >= 4


class AudioConvs(nn.Module):
    """1-D convolutions as audio encoders and Mamba have them: a strided feature conv (wav2vec2),
    a padded one with GELU (Whisper), a grouped one with dilation, a depthwise causal one sliced
    back to the input's length (Mamba), over a transposed (non-contiguous) input."""

    def __init__(self):
        super().__init__()
        self.feature = nn.Conv1d(1, 16, 10, stride=5)
        self.padded = nn.Conv1d(16, 16, 3, padding=1)
        self.grouped = nn.Conv1d(16, 16, 5, padding=4, dilation=2, groups=4, bias=False)
        self.depthwise = nn.Conv1d(16, 16, 4, padding=3, groups=16)

    def forward(self, wave, tokens):
        h = nn.functional.gelu(self.padded(self.feature(wave)))
        h = self.grouped(h)
        t = tokens.transpose(1, 2)  # [B, L, C] -> [B, C, L]
        return h.sum(-1), torch.relu(self.depthwise(t)[..., :t.shape[-1]])


def test_1d_convolutions_become_2d_ones_over_a_height_of_one():
    t, n = rewritten(patchify_convolutions, "conv1d_as_conv2d", AudioConvs().eval(), torch.randn(2, 1, 97),
                     torch.randn(2, 23, 16), tol=1e-5)
    assert n == 4 and count(t.gm, "convolution") == 4
    assert all(len(c.meta["val"].shape) == 4 for c in t.gm.graph.nodes if c.op == "call_function"
               and "convolution" in str(c.target))


def test_1d_convolutions_run_as_our_conv_kernels_with_their_epilogues(tmp_path):
    """End to end under the interpreter: every 1-D convolution is a Triton conv group (they ran in
    ATen: "the template is 2-D"), the GELU joins its convolution's epilogue through the view; an
    INT8 engine quantizes them as convolutions."""
    import compile_backend
    from compile_backend import quant
    from helpers import compile_and_compare

    model, inputs = AudioConvs().eval(), (torch.randn(2, 1, 97), torch.randn(2, 23, 16))
    (g,) = compile_backend.explain(model, *inputs, cache_dir=str(tmp_path)).graphs
    convs = [k for k in g.kernels if "aten.convolution" in k["ops"]]
    assert len(convs) == 4 and {k["impl"] for k in convs} == {"triton"}, g.kernels
    assert any("aten.gelu" in k["ops"] for k in convs) and not g.fallbacks
    compile_and_compare(model, list(inputs), options={"cache_dir": str(tmp_path)})
    cfg = quant.QuantConfig(precision="int8", activations="dynamic", min_features=1)
    q = compile_backend.explain(model, *inputs, quant=cfg, cache_dir=str(tmp_path)).graphs[0]
    assert {s["name"]: s["status"] for s in q.quant}.get("padded.weight") == "quantized", q.quant
