"""Models no one here wrote: factories over the GPU image's ``transformers`` and ``torchvision``.

Each factory takes the runner's arguments (``batch``, ``seed``, ``size``, ``device``) and returns
``(model, inputs)`` with random weights (nothing downloads), so any runner takes them by name:

    python -m benchmarks --model benchmarks.real_models:hf_bert --batch 16 --compare eager,compile_backend

``REAL`` lists them with the packages they need; the suite and the kernel profile skip a model
whose packages are absent (recorded, never silent). HF models return output objects: the
wrapper returns the tensor a user reads (``last_hidden_state`` or ``logits``). Besides the four
models of the FP16 issue, one model per family the engine is checked on: a decoder with
grouped-query attention and rotary embeddings (Llama-style), an encoder with a learned additive
position bias in attention (T5), a depthwise / inverted-residual CNN (MobileNetV3).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class RealModel:
    factory: str  # function name in this module
    packages: Tuple[str, ...]
    default_batch: int
    what: str


REAL: Dict[str, RealModel] = {
    "hf_bert": RealModel("hf_bert", ("transformers",), 16, "transformers BertModel (base), seq 128"),
    "hf_bert_mask": RealModel("hf_bert_mask", ("transformers",), 16,
                              "transformers BertModel (base), seq 128, attention mask (padded rows)"),
    "hf_gpt2": RealModel("hf_gpt2", ("transformers",), 8, "transformers GPT2LMHeadModel, seq 512"),
    "hf_llama": RealModel("hf_llama", ("transformers",), 8, "transformers LlamaForCausalLM, GQA 16/4 heads, rotary, seq 512"),
    "hf_t5_encoder": RealModel("hf_t5_encoder", ("transformers",), 16, "transformers T5EncoderModel (base), relative bias, seq 128"),
    "tv_resnet50": RealModel("tv_resnet50", ("torchvision",), 32, "torchvision resnet50, 224x224"),
    "tv_vit_b_16": RealModel("tv_vit_b_16", ("torchvision",), 32, "torchvision vit_b_16, 224x224"),
    "tv_mobilenet_v3": RealModel("tv_mobilenet_v3", ("torchvision",), 32, "torchvision mobilenet_v3_large, 224x224"),
}


def missing_packages(name: str) -> Tuple[str, ...]:
    """The packages ``name`` needs that are not importable here (empty: it can run)."""
    return tuple(p for p in REAL[name].packages if importlib.util.find_spec(p) is None)


def model_spec(name: str) -> str:
    """The runner's ``--model`` value for ``name`` (``module:function``)."""
    return f"{__name__}:{REAL[name].factory}"


def resolve_case(case: str) -> Tuple[str, int, Optional[str], Optional[str]]:
    """``"hf_bert:16"`` -> (name, batch, the runner's model spec, None), or (name, batch, None,
    why it is skipped) when a real model's packages are absent; zoo names pass through."""
    name, batch = case.rsplit(":", 1)
    if name not in REAL:
        return name, int(batch), name, None
    absent = missing_packages(name)
    if absent:
        return name, int(batch), None, f"{', '.join(absent)} not installed"
    return name, int(batch), model_spec(name), None


def load_case(case: str, size: str, device: str, say: Callable[[str], None]):
    """(name, batch, model, inputs, logits) of ``case`` built with the runner's loader, or None
    (said why) when its packages are absent."""
    from compile_backend.bench.cli import load_model

    name, batch, spec, skipped = resolve_case(case)
    if skipped:
        say(f"{case}: skipped, {skipped}")
        return None
    return (name, batch, *load_model(spec, size, batch, device, 0))


def parse_peers(text: str, known: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(requested peers in order, the unknown ones) from a comma-separated list."""
    requested = [s.strip() for s in text.split(",") if s.strip()]
    return requested, [s for s in requested if s not in known]


class Output(torch.nn.Module):
    """An HF model returning the tensor a user reads: logits when it has them, else the last
    hidden state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, *args):
        out = self.m(*args)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _gen(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _ids(batch: int, seq: int, vocab: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def _images(batch: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=gen).to(device)


def _tiny(size: str) -> bool:
    return size == "tiny"  # a smoke test of the plumbing on a CPU: small configs


def hf_bert(batch: Optional[int] = None, seed: int = 0, size: str = "base", device="cpu", seq: int = 128):
    import transformers

    gen = _gen(seed)
    cfg = transformers.BertConfig(**({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                      "intermediate_size": 128} if _tiny(size) else {}))
    model = Output(transformers.BertModel(cfg)).eval()
    return model, (_ids(batch or REAL["hf_bert"].default_batch, seq, cfg.vocab_size, gen, device),)


def hf_bert_mask(batch: Optional[int] = None, seed: int = 0, size: str = "base", device="cpu", seq: int = 128):
    """``hf_bert`` with an attention mask (issue #18's BERT case): each sequence keeps a random
    length in [seq/2, seq], the rest is padding (mask 0)."""
    model, (ids,) = hf_bert(batch, seed, size, device, seq)
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(seq // 2, seq + 1, (ids.shape[0], 1), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths).to(torch.int64)
    return model, (ids, mask.to(device))


def hf_gpt2(batch: Optional[int] = None, seed: int = 0, size: str = "base", device="cpu",
            seq: Optional[int] = None):
    import transformers

    gen = _gen(seed)
    cfg = transformers.GPT2Config(**({"n_layer": 2, "n_embd": 64, "n_head": 4} if _tiny(size) else {}))
    model = Output(transformers.GPT2LMHeadModel(cfg)).eval()
    seq = seq or (32 if _tiny(size) else 512)
    return model, (_ids(batch or REAL["hf_gpt2"].default_batch, seq, cfg.vocab_size, gen, device),)


def hf_llama(batch: Optional[int] = None, seed: int = 0, size: str = "base", device="cpu"):
    import transformers

    gen = _gen(seed)
    dims = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000) if _tiny(size) else
            dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000))
    cfg = transformers.LlamaConfig(max_position_embeddings=2048, **dims)
    model = Output(transformers.LlamaForCausalLM(cfg)).eval()
    seq = 32 if _tiny(size) else 512
    return model, (_ids(batch or REAL["hf_llama"].default_batch, seq, cfg.vocab_size, gen, device),)


def hf_t5_encoder(batch: Optional[int] = None, seed: int = 0, size: str = "base", device="cpu"):
    import transformers

    gen = _gen(seed)
    cfg = transformers.T5Config(**({"num_layers": 2, "d_model": 64, "d_ff": 128, "num_heads": 4, "d_kv": 16}
                                   if _tiny(size) else {"num_layers": 12, "d_model": 768, "d_ff": 3072,
                                                        "num_heads": 12, "d_kv": 64}))
    model = Output(transformers.T5EncoderModel(cfg)).eval()
    return model, (_ids(batch or REAL["hf_t5_encoder"].default_batch, 128, cfg.vocab_size, gen, device),)


def _torchvision(name: str, batch: Optional[int], seed: int, device, prepare: Callable = lambda m: m):
    import torchvision

    gen = _gen(seed)
    model = prepare(getattr(torchvision.models, name)(weights=None)).eval()
    key = {"resnet50": "tv_resnet50", "vit_b_16": "tv_vit_b_16", "mobilenet_v3_large": "tv_mobilenet_v3"}[name]
    return model, (_images(batch or REAL[key].default_batch, gen, device),)


def random_vit_head(vit: torch.nn.Module) -> torch.nn.Module:
    """torchvision initialises ViT's classifier to zeros: every logit is 0 and no cosine or
    top-1 agreement is defined. A random head makes the output comparable."""
    with torch.no_grad():
        torch.nn.init.normal_(vit.heads.head.weight, std=0.02)
    return vit


def tv_resnet50(batch: Optional[int] = None, seed: int = 0, size: str = "base", device="cpu"):
    return _torchvision("resnet50", batch, seed, device)


def tv_vit_b_16(batch: Optional[int] = None, seed: int = 0, size: str = "base", device="cpu"):
    return _torchvision("vit_b_16", batch, seed, device, random_vit_head)


def tv_mobilenet_v3(batch: Optional[int] = None, seed: int = 0, size: str = "base", device="cpu"):
    return _torchvision("mobilenet_v3_large", batch, seed, device)
