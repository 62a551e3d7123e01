"""Llama-style decoder for the zoo, in plain PyTorch: the shape of an LLM serving step.

Architecture (Llama 2 / TinyLlama): token embedding, ``layers`` pre-norm blocks of RMSNorm ->
grouped-query attention with rotary position embeddings -> residual, RMSNorm -> SwiGLU MLP
(``down(silu(gate(x)) * up(x))``, no biases) -> residual; a final RMSNorm and an untied LM head.
Parameter names are those of transformers' ``LlamaForCausalLM`` without its ``model.`` prefix
(rotary in the same "rotate half" layout), so a Llama checkpoint's weights load as they are.
Attention is ``F.scaled_dot_product_attention`` with ``enable_gqa=True``: ``heads`` query heads,
``kv_heads`` key/value heads, query head h reads KV head ``h // (heads // kv_heads)`` (what
``repeat_interleave(heads // kv_heads, dim=1)`` of the keys and values gives). Not HF's
``repeat_kv`` (expand + reshape), which copies every layer's cache ``heads // kv_heads`` times
per step: at base size that is 8x the cache traffic, a third more bytes than the weights a
decode step reads in fp16. (Our attention fusion does not take ``enable_gqa`` yet, so this
attention runs through ATen; the ``repeat_kv`` form does fuse.)

The KV cache is static and passed in: ``k_cache`` and ``v_cache`` of shape
``[layers, batch, kv_heads, max_context, head_dim]``, one tensor each, so the compiled graph
has a fixed signature whatever the depth. Two entry points, each a module of its own so each
compiles to one static graph (they share one ``LlamaDecoder`` and so its weights):

* ``LlamaDecode(decoder)(input_ids [B, 1], position [B] or [], k_cache, v_cache)``: one new
  token per sequence at ``position`` (per row; a 0-d position serves every row). The new key
  and value go to cache slot ``position``; the token attends to slots ``<= position``.
* ``LlamaDecodeInPlace(decoder)(input_ids [B, 1], position, k_0, v_0, k_1, v_1, ...)``: the same
  step with a cache tensor per layer, written in place (HF ``StaticCache``'s way, what a serving
  loop runs); returns the logits alone. Compiled, the kernel making each new entry writes the
  caller's cache (``input_writes.py``) and a CUDA graph records on the caller's caches.
* ``LlamaPrefill(decoder)(input_ids [B, T], k_cache, v_cache)``: a prompt of T tokens from
  position 0, causal attention among them; cache slots 0..T-1 are filled, later slots keep
  what the given caches held.

Both return ``(logits, new_k_cache, new_v_cache)``: logits ``[B, vocab]`` of the next token
(the last position only: the LM head over all T prompt positions is work generation never
uses), and the caches with the new entries written. The update is functional (new tensors
returned, the inputs untouched), not ``index_copy_`` into the inputs, which compiles but costs
more: AOTAutograd functionalises a write into the view ``k_cache[layer]`` of a graph input as a
``select_scatter`` of the whole 5-d cache, once per layer (22 full copies a step at base size),
and an engine that copies its inputs into static buffers (CUDA-graph replay) must then copy the
result back. Here a decode step writes each cache twice in full (each layer's slice, then the
stack; at base size, batch 1, fp16: 2 x 23 MB per cache, against 2.2 GB of weights read), and
the caller carries the returned caches into the next step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

StepOutput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (logits, new_k_cache, new_v_cache)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_context: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary pairs up its halves)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def cache_shape(self, batch: int) -> Tuple[int, int, int, int, int]:
        return (self.layers, batch, self.kv_heads, self.max_context, self.head_dim)


#: CPU-test size: a compile and a run through Triton's interpreter take seconds
TINY = LlamaConfig(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, max_context=64)
#: TinyLlama-1.1B's shape (1,100,048,384 parameters)
BASE = LlamaConfig(vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632,
                   max_context=2048)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the mean of squares in fp32 (as Llama does): fp16 squares of large activations overflow
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(cfg: LlamaConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[max_context, head_dim]``: position p rotates pair (i, i + head_dim/2) by
    p * theta^(-2i/head_dim) (the "rotate half" layout of Llama's checkpoints)."""
    inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_context, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, heads, S, head_dim]``; cos/sin broadcast to it (``[S, D]`` or ``[B, 1, 1, D]``)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GroupedQueryAttention(nn.Module):
    """Projections and rotary; the caller decides where the new keys/values go and which
    positions each query sees (``attend``)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, heads, self.head_dim).transpose(1, 2)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries ``[B, heads, S, D]``, rotated keys and values ``[B, kv_heads, S, D]``."""
        q = apply_rotary(self._split(self.q_proj(x), self.heads), cos, sin)
        k = apply_rotary(self._split(self.k_proj(x), self.kv_heads), cos, sin)
        return q, k, self._split(self.v_proj(x), self.kv_heads)

    def attend(self, q, k, v, keep_mask=None, causal=False) -> torch.Tensor:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask, is_causal=causal, enable_gqa=True)
        b, _, s, _ = ctx.shape
        return self.o_proj(ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.self_attn = GroupedQueryAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual after attention, then the MLP half of the block."""
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """The weights and both computations; ``LlamaDecode``/``LlamaPrefill`` are what gets compiled."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        cos, sin = rotary_tables(cfg)
        # derived from the config, not learned: kept out of the state dict
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)  # Llama's initializer_range
            elif isinstance(m, RMSNorm):
                # not the all-ones default, so a norm that drops its weight is caught
                m.weight.data.uniform_(0.5, 1.5)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))

    def decode(self, input_ids: torch.Tensor, position: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> StepOutput:
        batch, context = input_ids.shape[0], k_cache.shape[3]
        position = position.reshape(-1, 1).expand(batch, 1)  # [B, 1] whether given [B] or []
        cos = self.rope_cos[position][:, None]  # [B, 1, 1, D]: one rotation per row
        sin = self.rope_sin[position][:, None]
        slots = torch.arange(context, device=position.device)
        is_new_slot = (slots == position)[:, None, :, None]  # [B, 1, context, 1]
        keep_mask = (slots <= position)[:, None, None, :]  # [B, 1, 1, context]
        x = self.embed_tokens(input_ids)
        new_k: List[torch.Tensor] = []
        new_v: List[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
            # slot `position` takes the new entry, the others keep the cache's: a pointwise
            # select (no scatter op), which runs in our generated pointwise kernels
            layer_k = torch.where(is_new_slot, k, k_cache[i])
            layer_v = torch.where(is_new_slot, v, v_cache[i])
            new_k.append(layer_k)
            new_v.append(layer_v)
            x = layer.finish(x, layer.self_attn.attend(q, layer_k, layer_v, keep_mask=keep_mask))
        return self._logits(x[:, -1]), torch.stack(new_k), torch.stack(new_v)

    def decode_in_place(self, input_ids: torch.Tensor, position: torch.Tensor,
                        caches: Sequence[torch.Tensor]) -> torch.Tensor:
        """``decode`` writing each layer's new key and value into the caller's caches (HF
        ``StaticCache``'s way): ``caches`` is (k_0, v_0, k_1, v_1, ...), each [B, kv_heads,
        max_context, head_dim]; returns the logits. One position for every row is HF's
        ``index_copy_``; a position per row is a select written back."""
        batch, context = input_ids.shape[0], caches[0].shape[2]
        shared = position.numel() == 1
        position = position.reshape(-1, 1).expand(batch, 1)
        cos = self.rope_cos[position][:, None]
        sin = self.rope_sin[position][:, None]
        slots = torch.arange(context, device=position.device)
        is_new_slot = (slots == position)[:, None, :, None]
        keep_mask = (slots <= position)[:, None, None, :]
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
            k_cache, v_cache = caches[2 * i], caches[2 * i + 1]
            if shared:
                k_cache.index_copy_(2, position[:1, 0], k)
                v_cache.index_copy_(2, position[:1, 0], v)
            else:
                k_cache.copy_(torch.where(is_new_slot, k, k_cache))
                v_cache.copy_(torch.where(is_new_slot, v, v_cache))
            x = layer.finish(x, layer.self_attn.attend(q, k_cache, v_cache, keep_mask=keep_mask))
        return self._logits(x[:, -1])

    def prefill(self, input_ids: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> StepOutput:
        prompt = input_ids.shape[1]
        cos, sin = self.rope_cos[:prompt], self.rope_sin[:prompt]
        x = self.embed_tokens(input_ids)
        new_k: List[torch.Tensor] = []
        new_v: List[torch.Tensor] = []
        for layer in self.layers:
            q, k, v = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
            new_k.append(k)
            new_v.append(v)
            # the prompt starts at position 0: slots 0..T-1 are exactly these keys, so causal
            # attention over them is attention over the cache (no [T, max_context] mask)
            x = layer.finish(x, layer.self_attn.attend(q, k, v, causal=True))
        # one concatenation per cache: the prompt's entries, then the given cache's later slots
        k_out = torch.cat((torch.stack(new_k), k_cache[:, :, :, prompt:]), dim=3)
        v_out = torch.cat((torch.stack(new_v), v_cache[:, :, :, prompt:]), dim=3)
        return self._logits(x[:, -1]), k_out, v_out


class LlamaDecode(nn.Module):
    """One decode step: ``(input_ids [B, 1], position, k_cache, v_cache)`` -> logits [B, vocab], caches."""

    def __init__(self, decoder: LlamaDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position, k_cache, v_cache) -> StepOutput:
        return self.decoder.decode(input_ids, position, k_cache, v_cache)


class LlamaDecodeInPlace(nn.Module):
    """One decode step into per-layer caches written in place: ``(input_ids [B, 1], position [1]
    or [B], k_0, v_0, k_1, v_1, ...)`` -> (logits [B, vocab],). A serving loop's step: no cache
    is returned or copied, each step writes one slot per cache."""

    def __init__(self, decoder: LlamaDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position, *caches) -> Tuple[torch.Tensor]:
        return (self.decoder.decode_in_place(input_ids, position, caches),)


class LlamaPrefill(nn.Module):
    """A prompt from position 0: ``(input_ids [B, T], k_cache, v_cache)`` -> last logits [B, vocab], caches."""

    def __init__(self, decoder: LlamaDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, k_cache, v_cache) -> StepOutput:
        return self.decoder.prefill(input_ids, k_cache, v_cache)


def decode_model(cfg: LlamaConfig) -> LlamaDecode:
    return LlamaDecode(LlamaDecoder(cfg))


def decode_in_place_model(cfg: LlamaConfig) -> LlamaDecodeInPlace:
    return LlamaDecodeInPlace(LlamaDecoder(cfg))


def prefill_model(cfg: LlamaConfig) -> LlamaPrefill:
    return LlamaPrefill(LlamaDecoder(cfg))


def decode_inputs(cfg: LlamaConfig, context: int) -> Callable:
    """Zoo input factory for a decode step at position ``context - 1``: the token ids, the
    position per row, and caches holding ``context - 1`` earlier entries (random) then zeros."""
    if not 1 <= context <= cfg.max_context:
        raise ValueError(f"decode context {context} must be in 1..{cfg.max_context}")

    def make(batch: int, gen: torch.Generator):
        ids = torch.randint(0, cfg.vocab, (batch, 1), generator=gen)
        position = torch.full((batch,), context - 1, dtype=torch.long)
        caches = []
        for _ in range(2):
            cache = torch.zeros(cfg.cache_shape(batch))
            cache[:, :, :, :context - 1] = torch.randn(cfg.cache_shape(batch)[:3] + (context - 1, cfg.head_dim),
                                                       generator=gen)
            caches.append(cache)
        return (ids, position, *caches)

    return make


def decode_in_place_inputs(cfg: LlamaConfig, context: int) -> Callable:
    """``decode_inputs``'s step as ``LlamaDecodeInPlace`` takes it: the position as one value
    (batch 1) or per row, each layer's key and value cache its own tensor."""
    functional = decode_inputs(cfg, context)

    def make(batch: int, gen: torch.Generator):
        ids, position, k_cache, v_cache = functional(batch, gen)
        caches = [c[i].clone() for i in range(cfg.layers) for c in (k_cache, v_cache)]
        return (ids, position[:1] if batch == 1 else position, *caches)

    return make


def prefill_inputs(cfg: LlamaConfig, prompt: int) -> Callable:
    """Zoo input factory for a prefill of ``prompt`` tokens into empty (zero) caches."""
    if not 1 <= prompt <= cfg.max_context:
        raise ValueError(f"prompt length {prompt} must be in 1..{cfg.max_context}")

    def make(batch: int, gen: torch.Generator):
        ids = torch.randint(0, cfg.vocab, (batch, prompt), generator=gen)
        return (ids, torch.zeros(cfg.cache_shape(batch)), torch.zeros(cfg.cache_shape(batch)))

    return make


__all__ = ["LlamaConfig", "TINY", "BASE", "RMSNorm", "rotary_tables", "apply_rotary", "SwiGLU",
           "GroupedQueryAttention", "DecoderLayer", "LlamaDecoder", "LlamaDecode", "LlamaDecodeInPlace",
           "LlamaPrefill", "decode_model", "decode_in_place_model", "prefill_model", "decode_inputs",
           "decode_in_place_inputs", "prefill_inputs"]
