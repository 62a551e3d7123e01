"""Model zoo: the architectures the backend is benchmarked and tested on, defined here.

``get(name, size, batch, dtype, device, seed) -> (model, example_inputs)`` builds a model with
deterministic random weights (no downloads) and inputs that exercise what matters:

* ``mlp``       four wide Linear layers with GELU between (pure GEMM + epilogue)
* ``resnet50``  bottleneck ResNet-50 with BatchNorm (conv + BN folding + residual epilogues)
* ``bert``      BERT-base encoder; attention written out as matmul -> scale -> additive padding
                mask -> softmax -> dropout -> matmul, some tokens padded
* ``gpt2``      GPT-2 small decoder; causal mask through a registered tril buffer + masked_fill
* ``vit``       ViT-B/16; attention through ``F.scaled_dot_product_attention``
* ``llama_decode``, ``llama_decode_inplace``, ``llama_prefill``  a Llama-style decoder (GQA, rotary, SwiGLU) with a static
                KV cache passed in: one decode step, one prompt (``zoo_llama``). In ``LLM_NAMES``,
                not ``NAMES``: they return (logits, caches) and have no dropout, and the suites
                that sweep ``NAMES`` expect one output tensor and dropout

``tiny`` keeps each architecture's code but shrinks widths/depths (mostly non-power-of-two
sizes) so a compile and a run take seconds on a CPU; ``base`` is the real size. Models come
back in ``eval()`` mode; their dropout modules (p=0.1) make train mode differ.

BatchNorm statistics and affine parameters are randomised (not the 0/1 defaults) so that BN
folding is actually exercised: with default statistics a wrong fold could still look right.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import zoo_llama

NAMES = ("mlp", "resnet50", "bert", "gpt2", "vit")
LLM_NAMES = ("llama_decode", "llama_decode_inplace", "llama_prefill")
SIZES = ("tiny", "base")
DROPOUT = 0.1


# ----------------------------------------------------------------------------- MLP

class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, layers: int = 4) -> None:
        super().__init__()
        widths = [in_features] + [hidden] * layers
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < len(self.linears) - 1:
                x = self.dropout(F.gelu(x))
        return x


# ----------------------------------------------------------------------------- ResNet-50

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, stem: int, widths, blocks, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_ch = [], stem
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layer = []
            for j in range(n):
                layer.append(Bottleneck(in_ch, width, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                # Non-trivial statistics so that folding BN into the conv is really tested.
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.1)
        # Damp each residual branch (as zero-init-residual training recipes do, but not to
        # zero) so activations stay in fp16 range through 16 blocks of random weights.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                m.bn3.weight.data.uniform_(0.1, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------- transformers

@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab: int
    max_positions: int
    hidden: int
    heads: int
    layers: int
    intermediate: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")


def _init_transformer(module: nn.Module) -> None:
    """BERT/GPT-2 style init: N(0, 0.02) weights, zero biases, LayerNorm at identity."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertSelfAttention(nn.Module):
    """Written out op by op so the attention-fusion pass has the eager chain to find."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = nn.Dropout(DROPOUT)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(self.head_dim)
        scores = scores + additive_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v)
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)


class BertLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(cfg)
        self.attn_out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.intermediate = nn.Linear(cfg.hidden, cfg.intermediate)
        self.output = nn.Linear(cfg.intermediate, cfg.hidden)
        self.out_norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn_out(self.attention(x, additive_mask))))
        h = F.gelu(self.intermediate(x))
        return self.out_norm(x + self.dropout(self.output(h)))


class Bert(nn.Module):
    """BERT encoder (with embeddings, without pooler/heads): returns the last hidden state."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(2, cfg.hidden)
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.dropout = nn.Dropout(DROPOUT)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))
        self.register_buffer("position_ids", torch.arange(cfg.max_positions), persistent=False)
        _init_transformer(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(self.position_ids[:s])
            + self.token_type_embeddings.weight[0]
        )
        x = self.dropout(self.embed_norm(x))
        # 1 = attend, 0 = padding -> 0 / -10000 added to the scores (the original BERT constant:
        # finite in every dtype, so a fully padded row cannot produce NaN).
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive_mask)
        return x


class GPT2Attention(nn.Module):
    """Causal self-attention as an explicit chain with a tril buffer and masked_fill."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.k_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.v_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.c_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_dropout = nn.Dropout(DROPOUT)
        self.resid_dropout = nn.Dropout(DROPOUT)
        n = cfg.max_positions
        self.register_buffer(
            "causal_mask", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n), persistent=False
        )

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(~self.causal_mask[:, :, :s, :s], torch.finfo(scores.dtype).min)
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.resid_dropout(self.c_proj(ctx))


class GPT2Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden)
        self.fc = nn.Linear(cfg.hidden, cfg.intermediate)
        self.proj = nn.Linear(cfg.intermediate, cfg.hidden)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.dropout(self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh")))


class GPT2(nn.Module):
    """GPT-2 decoder with the LM head tied to the token embedding; returns logits."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.dropout = nn.Dropout(DROPOUT)
        self.blocks = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.register_buffer("position_ids", torch.arange(cfg.max_positions), persistent=False)
        _init_transformer(self)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.dropout(self.wte(input_ids) + self.wpe(self.position_ids[:s]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class ViTAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (the other form the fusion sees)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj_dropout = nn.Dropout(DROPOUT)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        ctx = F.scaled_dot_product_attention(
            self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x)),
            dropout_p=DROPOUT if self.training else 0.0,
        )
        return self.proj_dropout(self.proj(ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.attn = ViTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.norm2(x))))))


class ViT(nn.Module):
    def __init__(self, cfg: TransformerConfig, image: int, patch: int, num_classes: int) -> None:
        super().__init__()
        if image % patch:
            raise ValueError(f"image size {image} must be a multiple of patch size {patch}")
        tokens = (image // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, cfg.hidden, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, cfg.hidden))
        self.dropout = nn.Dropout(DROPOUT)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.head = nn.Linear(cfg.hidden, num_classes)
        _init_transformer(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.dropout(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# ----------------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build one (name, size): model factory, default batch, input factory."""

    build: Callable[[], nn.Module]
    batch: int
    make_inputs: Callable[[int, torch.Generator], Tuple[torch.Tensor, ...]]
    description: str
    logits: bool = False  # the output's last dim is class/vocabulary logits (top-1 is meaningful)


def _images(size: int) -> Callable:
    return lambda batch, gen: (torch.randn(batch, 3, size, size, generator=gen),)


def _token_ids(vocab: int, seq: int) -> Callable:
    return lambda batch, gen: (torch.randint(0, vocab, (batch, seq), generator=gen),)


def _bert_inputs(vocab: int, seq: int) -> Callable:
    def make(batch: int, gen: torch.Generator):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        # Row i keeps a different number of real tokens (row 0 is unpadded, the last row
        # about half padded), so the mask really varies along the batch.
        lengths = [seq - (i * seq) // (2 * batch) for i in range(batch)]
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        return ids, mask

    return make


_BERT_BASE = TransformerConfig(vocab=30522, max_positions=512, hidden=768, heads=12, layers=12, intermediate=3072)
_BERT_TINY = TransformerConfig(vocab=97, max_positions=40, hidden=48, heads=3, layers=2, intermediate=76)
_GPT2_BASE = TransformerConfig(vocab=50257, max_positions=1024, hidden=768, heads=12, layers=12, intermediate=3072)
_GPT2_TINY = TransformerConfig(vocab=101, max_positions=32, hidden=48, heads=3, layers=2, intermediate=92)
_VIT_BASE = TransformerConfig(vocab=0, max_positions=0, hidden=768, heads=12, layers=12, intermediate=3072)
_VIT_TINY = TransformerConfig(vocab=0, max_positions=0, hidden=48, heads=3, layers=2, intermediate=84)

_SPECS: Dict[Tuple[str, str], Spec] = {
    ("mlp", "base"): Spec(lambda: MLP(4096, 4096), 2048,
                          lambda b, g: (torch.randn(b, 4096, generator=g),), "4 x Linear(4096) + GELU"),
    ("mlp", "tiny"): Spec(lambda: MLP(37, 45), 3,
                          lambda b, g: (torch.randn(b, 37, generator=g),), "4 x Linear(45) + GELU"),
    ("resnet50", "base"): Spec(lambda: ResNet(64, (64, 128, 256, 512), (3, 4, 6, 3), 1000), 32,
                               _images(224), "ResNet-50, 224x224", logits=True),
    ("resnet50", "tiny"): Spec(lambda: ResNet(8, (8, 12, 16, 20), (1, 1, 1, 1), 10), 2,
                               _images(32), "bottleneck ResNet, 1 block per stage, 32x32", logits=True),
    ("bert", "base"): Spec(lambda: Bert(_BERT_BASE), 16, _bert_inputs(_BERT_BASE.vocab, 128),
                           "BERT-base encoder, seq 128, padded"),
    ("bert", "tiny"): Spec(lambda: Bert(_BERT_TINY), 3, _bert_inputs(_BERT_TINY.vocab, 13),
                           "2-layer BERT, hidden 48, seq 13, padded"),
    ("gpt2", "base"): Spec(lambda: GPT2(_GPT2_BASE), 8, _token_ids(_GPT2_BASE.vocab, 512),
                           "GPT-2 small, seq 512", logits=True),
    ("gpt2", "tiny"): Spec(lambda: GPT2(_GPT2_TINY), 2, _token_ids(_GPT2_TINY.vocab, 11),
                           "2-layer GPT-2, hidden 48, seq 11", logits=True),
    ("vit", "base"): Spec(lambda: ViT(_VIT_BASE, 224, 16, 1000), 32, _images(224), "ViT-B/16, 224x224", logits=True),
    ("vit", "tiny"): Spec(lambda: ViT(_VIT_TINY, 40, 8, 10), 2, _images(40), "2-layer ViT, 40x40 / 8", logits=True),
    ("llama_decode", "base"): Spec(lambda: zoo_llama.decode_model(zoo_llama.BASE), 1,
                                   zoo_llama.decode_inputs(zoo_llama.BASE, 512),
                                   "Llama 1.1B (GQA 32/4), one decode step at position 511", logits=True),
    ("llama_decode", "tiny"): Spec(lambda: zoo_llama.decode_model(zoo_llama.TINY), 2,
                                   zoo_llama.decode_inputs(zoo_llama.TINY, 37),
                                   "2-layer Llama, hidden 64, GQA 4/2, decode at position 36", logits=True),
    ("llama_decode_inplace", "base"): Spec(lambda: zoo_llama.decode_in_place_model(zoo_llama.BASE), 1,
                                           zoo_llama.decode_in_place_inputs(zoo_llama.BASE, 512),
                                           "Llama 1.1B (GQA 32/4), one decode step at position 511 into "
                                           "per-layer caches written in place", logits=True),
    ("llama_decode_inplace", "tiny"): Spec(lambda: zoo_llama.decode_in_place_model(zoo_llama.TINY), 2,
                                           zoo_llama.decode_in_place_inputs(zoo_llama.TINY, 37),
                                           "2-layer Llama, hidden 64, GQA 4/2, decode at position 36 into "
                                           "caches written in place", logits=True),
    ("llama_prefill", "base"): Spec(lambda: zoo_llama.prefill_model(zoo_llama.BASE), 1,
                                    zoo_llama.prefill_inputs(zoo_llama.BASE, 2048),
                                    "Llama 1.1B (GQA 32/4), prefill of 2048 tokens", logits=True),
    ("llama_prefill", "tiny"): Spec(lambda: zoo_llama.prefill_model(zoo_llama.TINY), 2,
                                    zoo_llama.prefill_inputs(zoo_llama.TINY, 21),
                                    "2-layer Llama, hidden 64, GQA 4/2, prefill of 21 tokens", logits=True),
}


def spec(name: str, size: str = "tiny") -> Spec:
    if name not in NAMES + LLM_NAMES:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(NAMES + LLM_NAMES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    return _SPECS[(name, size)]


def default_batch(name: str, size: str = "tiny") -> int:
    return spec(name, size).batch


def get(
    name: str,
    size: str = "tiny",
    batch: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
) -> Tuple[nn.Module, Tuple[torch.Tensor, ...]]:
    """Build ``name`` at ``size`` in eval mode with seeded random weights, plus example inputs.

    Floating-point parameters, buffers and inputs are cast to ``dtype``; integer inputs
    (token ids, attention masks) stay int64. The same seed gives the same weights and inputs
    on every call, whatever the global RNG state (which is left untouched).
    """
    s = spec(name, size)
    batch = s.batch if batch is None else int(batch)
    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = s.build()
    inputs = s.make_inputs(batch, torch.Generator().manual_seed(seed + 1))
    model = model.to(device=device, dtype=dtype).eval()
    inputs = tuple(
        t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs
    )
    return model, inputs
