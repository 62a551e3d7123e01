"""Every engine mode on vision models no one here wrote: one random-init ``torchvision``
classifier per architecture family (plain and bottleneck residuals, grouped and depthwise
convolutions, squeeze-excitation, channel shuffle, dense concatenation, inception branches,
channels-last LayerNorm blocks, shifted-window attention, patch-embedding transformers),
compiled through the backend in a dtype, against the same model in eager.

    PYTHONPATH=. python3 -m benchmarks.vision_families --dtype float16 --out benchmarks/results/vision_families_fp16_cpu.json

Small images (``--size``, default 64) keep a CPU run short; the graphs are the full models'.
Per family and mode: the logits' cosine to eager, the layers quantized, the graphs Dynamo made,
the ops left in ATen, the kernels validation rejected (seen under ``TRITON_INTERPRET=1`` or on a
GPU: the generated kernels themselves), and whether a second call gives the same logits. Random
weights say nothing of accuracy; what this checks is that each mode goes through each family's
graph and stays close to eager. An error is recorded in the row, never raised: the table is
the result.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List

import torch

from .quant_families import chosen_families, compiled_cell, cosine, families_parser, write_record

MODES: Dict[str, Dict[str, Any]] = {
    "float": {},
    "int8-static": dict(precision="int8", activations="static"),
    "fp8-static": dict(precision="fp8", activations="static"),
    "int8-dynamic": dict(precision="int8", activations="dynamic"),
}


def vision_families(size: int) -> Dict[str, Callable[[], torch.nn.Module]]:
    """name -> a factory of the random-init model (images of ``size`` pixels a side)."""
    import torchvision.models as tv
    import torchvision.models.segmentation as seg

    def vit():  # torchvision's ViT takes its image size; its head starts at zero (no cosine): a random one
        model = tv.VisionTransformer(image_size=size, patch_size=16, num_layers=2, num_heads=4, hidden_dim=128,
                                     mlp_dim=256)
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model

    return {
        "resnet18": lambda: tv.resnet18(),  # basic blocks, max pool
        "resnext50": lambda: tv.resnext50_32x4d(),  # grouped 3x3 convolutions (32 groups)
        "mobilenet_v2": lambda: tv.mobilenet_v2(),  # inverted residuals, ReLU6, depthwise
        "mobilenet_v3": lambda: tv.mobilenet_v3_small(),  # hard-swish, squeeze-excitation with hard-sigmoid
        "efficientnet_b0": lambda: tv.efficientnet_b0(),  # SiLU, squeeze-excitation, stochastic depth (eval: none)
        "regnet_y": lambda: tv.regnet_y_400mf(),  # group width 8, squeeze-excitation
        "shufflenet_v2": lambda: tv.shufflenet_v2_x0_5(),  # channel split / shuffle (view, transpose, chunk)
        "squeezenet": lambda: tv.squeezenet1_1(),  # fire modules (concat), conv classifier, no linear
        "densenet121": lambda: tv.densenet121(),  # BN-ReLU before each conv (pre-activation), dense concat
        "googlenet": lambda: tv.googlenet(aux_logits=False, init_weights=True),  # inception branches
        "mnasnet": lambda: tv.mnasnet0_5(),
        "convnext_tiny": lambda: tv.convnext_tiny(),  # 7x7 depthwise, channels-last LayerNorm, layer scale
        "swin_t": lambda: tv.swin_t(),  # shifted windows (roll), relative position bias
        "vit": vit,  # patch embedding as a strided conv, class token, encoder blocks
        # segmentation heads: a bilinear resize to the image (F.interpolate), ASPP's cat of 5
        "fcn": lambda: SegmentationOut(seg.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False)),
        "deeplabv3": lambda: SegmentationOut(seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                             aux_loss=False)),
        "lraspp": lambda: SegmentationOut(seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)),
        **hf_vision_families(size),
    }


class SegmentationOut(torch.nn.Module):
    """A torchvision segmentation model as a function of the images: its ``out`` map."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images)["out"]


class Logits(torch.nn.Module):
    """A transformers image classifier as a function of the images: its ``logits``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(pixel_values=images).logits


def hf_vision_families(size: int) -> Dict[str, Callable[[], torch.nn.Module]]:
    """transformers' image classifiers, tiny (2-4 stages of 16-128 channels), random init; none
    when transformers is absent."""
    try:
        import transformers as T
    except ImportError:
        return {}
    vit = dict(image_size=size, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, num_labels=10)
    stages = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10)
    return {
        "hf_vit": lambda: Logits(T.ViTForImageClassification(T.ViTConfig(**vit))),
        "hf_beit": lambda: Logits(T.BeitForImageClassification(T.BeitConfig(  # relative position bias, layer scale
            use_relative_position_bias=True, **vit))),
        "hf_dinov2": lambda: Logits(T.Dinov2ForImageClassification(T.Dinov2Config(  # interpolated positions
            **{**vit, "image_size": 2 * size}))),
        "hf_convnext": lambda: Logits(T.ConvNextForImageClassification(T.ConvNextConfig(**stages))),
        "hf_convnextv2": lambda: Logits(T.ConvNextV2ForImageClassification(T.ConvNextV2Config(**stages))),  # GRN
        "hf_resnet": lambda: Logits(T.ResNetForImageClassification(T.ResNetConfig(embedding_size=16, **stages))),
        "hf_regnet": lambda: Logits(T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=16, groups_width=8, **stages))),
        "hf_swin": lambda: Logits(T.SwinForImageClassification(T.SwinConfig(  # windows of 4 at 8x8 patches
            image_size=size, patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[2, 4], window_size=4,
            num_labels=10))),
        "hf_segformer": lambda: Logits(T.SegformerForImageClassification(T.SegformerConfig(  # reduced-K attention
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8],
            decoder_hidden_size=64, num_labels=10))),
        "hf_mobilevit": lambda: Logits(T.MobileViTForImageClassification(T.MobileViTConfig(  # unfold/fold patches
            image_size=size, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 160],
            num_labels=10))),
        "hf_poolformer": lambda: Logits(T.PoolFormerForImageClassification(T.PoolFormerConfig(  # avg pool token mixer
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10))),
    }


def settled(model: torch.nn.Module, batches: List[torch.Tensor]) -> torch.nn.Module:
    """``model`` with its BatchNorms' running statistics measured on ``batches`` (float32, no
    gradients). Why: at random init the running statistics are (0, 1) whatever the activations
    are, and through a deep inverted-residual net (MobileNetV2, EfficientNet) the logits then
    shrink to ~1e-9-1e-14: every engine's output is noise there, quantized or not. Measured
    statistics keep each layer's output near unit scale, as a trained model's are."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def simulation(model: torch.nn.Module, images: torch.Tensor, precision: str = "int8") -> torch.Tensor:
    """The model's output in eager with every conv / linear fed 8-bit-rounded inputs (per tensor,
    absmax of each call) and 8-bit-rounded weights (per output channel): plain fake quantization,
    written independently of ``compile_backend.quant``. ``precision``: ``int8`` (127 levels a
    sign, round half to even) or ``fp8`` (e4m3fn: absmax to 448, torch's own float8 cast). Why: a
    random-init net may amplify rounding noise layer by layer far more than a trained one; the
    cosine of this simulation to float says how much, so an engine's 8-bit cosine is read against
    it, not against 1 (FP8's 3 mantissa bits give ~4x INT8's noise on Gaussian-like values, so its
    cosines sit lower on these nets)."""
    top = 127.0 if precision == "int8" else 448.0

    def rounded(t: torch.Tensor, dims) -> torch.Tensor:
        scale = t.float().abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / top
        if precision == "int8":
            return ((t.float() / scale).round().clamp(-127, 127) * scale).to(t.dtype)
        return ((t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).to(t.dtype)

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    saved = [m.weight.data for m in layers]
    hooks = [m.register_forward_pre_hook(lambda _m, args: (rounded(args[0], None),) + tuple(args[1:]))
             for m in layers]
    try:
        for m in layers:
            m.weight.data = rounded(m.weight.data, tuple(range(1, m.weight.dim())))
        with torch.no_grad():
            return model(images)
    finally:
        for m, w in zip(layers, saved):
            m.weight.data = w
        for h in hooks:
            h.remove()


def run_family(name: str, make: Callable[[], torch.nn.Module], modes: List[str], dtype: torch.dtype,
               device: str, size: int, batch: int) -> Dict[str, Any]:
    from compile_backend import quant

    row: Dict[str, Any] = {"family": name, "modes": {}}
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = settled(make(), [torch.randn(8, 3, size, size, generator=g) for _ in range(3)])
    model = model.eval().to(device=device, dtype=dtype)
    images = torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)
    calib = [(torch.randn(4, 3, size, size, generator=g).to(device=device, dtype=dtype),) for _ in range(2)]
    row["model"] = type(model).__name__
    with torch.no_grad():
        ref = model(images).float()
    row["int8_simulation_cosine"] = cosine(simulation(model, images, "int8").float(), ref)
    row["fp8_simulation_cosine"] = cosine(simulation(model, images, "fp8").float(), ref)
    def options(mode: str) -> Dict[str, Any]:
        if not MODES[mode]:
            return {}
        qcfg = quant.QuantConfig(min_features=16, **MODES[mode])
        return {"quant": quant.calibrate(model, calib, qcfg, progress=False, use_cache=False)
                if qcfg.activations == "static" else qcfg}

    for mode in modes:
        row["modes"][mode] = compiled_cell(model, lambda fn: fn(images), ref, functools.partial(options, mode))
    return row


def main(argv=None) -> int:
    p = families_parser(__doc__.split("\n")[0], MODES)
    p.set_defaults(dtype="float16")
    p.add_argument("--size", type=int, default=64, help="image pixels a side")
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    known = vision_families(args.size)
    names = chosen_families(p, args.families, known)
    rows = []
    for name in names:
        rows.append(run_family(name, known[name], args.modes, getattr(torch, args.dtype), args.device, args.size,
                               args.batch))
        cells = [f"{m}:{r['cosine']:.4f} {r['graphs']}g {r['quantized']}/{r['layers']}q aten={','.join(r['aten']) or '-'}"
                 + (f" REJECTED {len(r['rejected'])}" if r["rejected"] else "") + ("" if r["repeatable"] else " NOT-REPEATABLE")
                 if "cosine" in r else f"{m}:ERROR {r['error'][:100]}" for m, r in rows[-1]["modes"].items()]
        print(f"[vision_families] {name} (simulations: int8 {rows[-1]['int8_simulation_cosine']:.4f}, "
              f"fp8 {rows[-1]['fp8_simulation_cosine']:.4f}): "
              + " | ".join(cells), flush=True)
    errors = sum("error" in r for row in rows for r in row["modes"].values())
    write_record(args.out, "vision_families", "random init, random images: does each mode compile the family's "
                 "graph, fused and close to eager; not an accuracy claim", rows, errors,
                 dtype=args.dtype, device=args.device, size=args.size, batch=args.batch)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
