"""The zoo's Llama-style decoder (compile_backend/zoo_llama.py).

Eager: prefill and decode agree with a plain reference written here (complex-number rotary,
KV heads repeated with ``repeat_interleave``, softmax of masked scores) and with each other
(prefill of T tokens then decode of token T+1 gives prefill of T+1 tokens' last logits), rows at
different positions are independent, and the weights load into transformers' LlamaForCausalLM
unchanged. Compiled: both entry points go through ``torch.compile(..., backend="compile_backend",
fullgraph=True)`` under Triton's interpreter and match eager; what runs through ATen is bounded.

Tolerances (rtol = atol): eager vs the reference 1e-5 (fp32, the same math in another order);
compiled vs eager the suite's fp32 1e-4 (tests/helpers.py: fused kernels reorder sums).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import compile_backend
from compile_backend import zoo, zoo_llama
from helpers import assert_same

CFG = zoo_llama.TINY
EAGER_TOL = dict(rtol=1e-5, atol=1e-5)


def sharp_decoder(seed: int = 0) -> zoo_llama.LlamaDecoder:
    """The tiny decoder with q/k projections scaled up: at the zoo's N(0, 0.02) init the scores
    are nearly uniform, and a wrong rotation or mask would barely move the logits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = zoo_llama.LlamaDecoder(CFG).eval()
    with torch.no_grad():
        for layer in decoder.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return decoder


def reference(decoder, ids):
    """Logits at every position of ``ids`` [B, T] (from position 0) and the rotated keys and
    values per layer ``[layers, B, kv_heads, T, head_dim]``, computed the plain way."""
    cfg = decoder.cfg
    b, t = ids.shape
    d, half, group = cfg.head_dim, cfg.head_dim // 2, cfg.heads // cfg.kv_heads
    freq = cfg.rope_theta ** (-2 * torch.arange(half, dtype=torch.float64) / d)
    turn = torch.polar(torch.ones(t, half, dtype=torch.float64), torch.outer(torch.arange(t).double(), freq))

    def rotate(x):  # pair (i, i + d/2) is one complex number, turned by position * freq_i
        z = torch.complex(x[..., :half].double(), x[..., half:].double()) * turn
        return torch.cat((z.real, z.imag), dim=-1).float()

    def rms(norm, x):
        return norm.weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps)

    def heads(x, n):
        return x.view(b, t, n, d).transpose(1, 2)

    x = decoder.embed_tokens.weight[ids]
    future = ~torch.ones(t, t, dtype=torch.bool).tril()
    keys, values = [], []
    for layer in decoder.layers:
        a, m = layer.self_attn, layer.mlp
        h = rms(layer.input_layernorm, x)
        q = rotate(heads(h @ a.q_proj.weight.T, cfg.heads))
        k = rotate(heads(h @ a.k_proj.weight.T, cfg.kv_heads))
        v = heads(h @ a.v_proj.weight.T, cfg.kv_heads)
        keys.append(k)
        values.append(v)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1) @ a.o_proj.weight.T
        h = rms(layer.post_attention_layernorm, x)
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(decoder.norm, x) @ decoder.lm_head.weight.T, torch.stack(keys), torch.stack(values)


def empty_caches(batch):
    return torch.zeros(CFG.cache_shape(batch)), torch.zeros(CFG.cache_shape(batch))


def token_ids(batch, length, seed=1):
    return torch.randint(0, CFG.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the zoo entries

def test_zoo_entries_build_run_and_cast():
    assert set(zoo.LLM_NAMES) == {"llama_decode", "llama_decode_inplace", "llama_prefill"} and not set(zoo.LLM_NAMES) & set(zoo.NAMES)
    cache = CFG.cache_shape(2)
    model, (ids, position, k, v) = zoo.get("llama_decode", "tiny")
    assert not model.training and ids.shape == (2, 1) and position.tolist() == [36, 36]
    assert k.shape == v.shape == cache and k[:, :, :, :36].abs().min() > 0 and not k[:, :, :, 36:].any()
    with torch.no_grad():
        logits, new_k, new_v = model(ids, position, k, v)
    assert logits.shape == (2, CFG.vocab) and new_k.shape == new_v.shape == cache and torch.isfinite(logits).all()
    model, (ids, k, v) = zoo.get("llama_prefill", "tiny", batch=3, dtype=torch.float16)
    assert ids.shape == (3, 21) and k.shape == CFG.cache_shape(3) and k.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in model.parameters())
    with torch.no_grad():
        logits, new_k, _ = model(ids, k, v)
    assert logits.shape == (3, CFG.vocab) and logits.dtype == torch.float16 and torch.isfinite(logits).all()
    assert new_k[:, :, :, :21].abs().max() > 0 and not new_k[:, :, :, 21:].any()
    # same seed, same weights and inputs; the global RNG untouched
    state = torch.get_rng_state()
    (m1, x1), (m2, x2) = zoo.get("llama_decode", seed=5), zoo.get("llama_decode", seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(x1, x2))
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_base_sizes_and_parameter_count_on_meta():
    for name in zoo.LLM_NAMES:
        with torch.device("meta"):  # 1.1B parameters: never materialised in the tests
            model = zoo.spec(name, "base").build()
        assert sum(p.numel() for p in model.parameters()) == 1_100_048_384  # TinyLlama-1.1B
        assert zoo.default_batch(name, "base") == 1
    decoder = model.decoder
    assert decoder.lm_head.weight is not decoder.embed_tokens.weight  # untied
    assert (decoder.cfg.hidden, decoder.cfg.layers, decoder.cfg.heads, decoder.cfg.kv_heads,
            decoder.cfg.intermediate, decoder.cfg.vocab, decoder.cfg.max_context) == (
        2048, 22, 32, 4, 5632, 32000, 2048)
    assert not any("rope" in key for key in model.state_dict())  # derived tables, not weights
    ids, position, k, _ = zoo.spec("llama_decode", "base").make_inputs(1, torch.Generator().manual_seed(0))
    assert ids.shape == (1, 1) and position.tolist() == [511] and k.shape == (22, 1, 4, 2048, 64)
    assert k[:, :, :, 510].abs().min() > 0 and not k[:, :, :, 511:].any()


# ----------------------------------------------------------------------------- eager numerics

def test_prefill_matches_reference_and_keeps_later_slots():
    decoder = sharp_decoder()
    ids = token_ids(2, 21)
    # later slots hold something (not zeros), which prefill must leave as it is
    k_cache, v_cache = (torch.randn(CFG.cache_shape(2), generator=torch.Generator().manual_seed(s)) for s in (2, 3))
    ref_logits, ref_k, ref_v = reference(decoder, ids)
    with torch.no_grad():
        logits, new_k, new_v = zoo_llama.LlamaPrefill(decoder)(ids, k_cache, v_cache)
    torch.testing.assert_close(logits, ref_logits[:, -1], **EAGER_TOL)
    torch.testing.assert_close(new_k[:, :, :, :21], ref_k, **EAGER_TOL)
    torch.testing.assert_close(new_v[:, :, :, :21], ref_v, **EAGER_TOL)
    assert torch.equal(new_k[:, :, :, 21:], k_cache[:, :, :, 21:])
    assert torch.equal(new_v[:, :, :, 21:], v_cache[:, :, :, 21:])


def test_decode_steps_continue_a_prefill():
    """Prefill of T tokens then decode of tokens T+1.. equals prefill of the longer prompt."""
    decoder = sharp_decoder()
    prefill, decode = zoo_llama.LlamaPrefill(decoder), zoo_llama.LlamaDecode(decoder)
    ids, prompt = token_ids(2, 17), 13
    ref_logits, ref_k, ref_v = reference(decoder, ids)
    with torch.no_grad():
        _, k_cache, v_cache = prefill(ids[:, :prompt], *empty_caches(2))
        for pos in range(prompt, ids.shape[1]):
            position = torch.tensor(pos) if pos % 2 else torch.full((2,), pos)  # 0-d and per row
            logits, k_cache, v_cache = decode(ids[:, pos:pos + 1], position, k_cache, v_cache)
            torch.testing.assert_close(logits, ref_logits[:, pos], **EAGER_TOL)
            longer, _, _ = prefill(ids[:, :pos + 1], *empty_caches(2))
            torch.testing.assert_close(logits, longer, **EAGER_TOL)
    torch.testing.assert_close(k_cache[:, :, :, :17], ref_k, **EAGER_TOL)
    torch.testing.assert_close(v_cache[:, :, :, :17], ref_v, **EAGER_TOL)
    assert not k_cache[:, :, :, 17:].any() and not v_cache[:, :, :, 17:].any()


def test_decode_rows_at_different_positions_are_independent():
    decoder = sharp_decoder()
    decode = zoo_llama.LlamaDecode(decoder)
    ids, positions = token_ids(2, 1), [9, 20]
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(CFG.cache_shape(2), generator=gen), torch.randn(CFG.cache_shape(2), generator=gen)
    with torch.no_grad():
        logits, new_k, new_v = decode(ids, torch.tensor(positions), k_cache, v_cache)
        for row, pos in enumerate(positions):
            # alone, with a 0-d position, and with slots past the position scrambled: not read
            k_row, v_row = k_cache[:, row:row + 1].clone(), v_cache[:, row:row + 1].clone()
            k_row[:, :, :, pos:] *= 100
            v_row[:, :, :, pos:] = -v_row[:, :, :, pos:]
            alone, row_k, _ = decode(ids[row:row + 1], torch.tensor(pos), k_row, v_row)
            torch.testing.assert_close(logits[row:row + 1], alone, **EAGER_TOL)
            torch.testing.assert_close(new_k[:, row:row + 1, :, pos], row_k[:, :, :, pos], **EAGER_TOL)
            untouched = [s for s in range(CFG.max_context) if s != pos]
            assert torch.equal(new_k[:, row, :, untouched], k_cache[:, row, :, untouched])
            assert torch.equal(new_v[:, row, :, untouched], v_cache[:, row, :, untouched])


def test_gqa_shares_each_kv_head_with_consecutive_query_heads():
    """Query head h reads KV head h // (heads // kv_heads): repeat_interleave, not repeat."""
    attn = sharp_decoder().layers[0].self_attn
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, CFG.heads, 7, CFG.head_dim, generator=gen)
    k, v = (torch.randn(2, CFG.kv_heads, 7, CFG.head_dim, generator=gen) for _ in range(2))
    group = CFG.heads // CFG.kv_heads

    def explicit(k_heads, v_heads):
        ctx = F.scaled_dot_product_attention(q, k_heads, v_heads, is_causal=True)
        return attn.o_proj(ctx.transpose(1, 2).reshape(2, 7, CFG.hidden))

    with torch.no_grad():
        ours = attn.attend(q, k, v, causal=True)
        torch.testing.assert_close(ours, explicit(k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)),
                                   **EAGER_TOL)
        assert not torch.allclose(ours, explicit(k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)), atol=1e-3)


def test_weights_load_into_transformers_llama():
    """The same function as transformers' LlamaForCausalLM (eager attention) with our weights."""
    transformers = pytest.importorskip("transformers")
    decoder = sharp_decoder()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=CFG.vocab, hidden_size=CFG.hidden, intermediate_size=CFG.intermediate,
        num_hidden_layers=CFG.layers, num_attention_heads=CFG.heads, num_key_value_heads=CFG.kv_heads,
        max_position_embeddings=CFG.max_context, rms_norm_eps=CFG.norm_eps, rope_theta=CFG.rope_theta,
        tie_word_embeddings=False, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {(k if k.startswith("lm_head.") else "model." + k): w for k, w in decoder.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in name for name in missing), (missing, unexpected)
    ids = token_ids(2, 19)
    with torch.no_grad():
        hf_logits = hf(ids).logits
        ours, _, _ = zoo_llama.LlamaPrefill(decoder)(ids, *empty_caches(2))
    torch.testing.assert_close(ours, hf_logits[:, -1], **EAGER_TOL)
    torch.testing.assert_close(reference(decoder, ids)[0], hf_logits, **EAGER_TOL)


# ----------------------------------------------------------------------------- through the backend

def compiled_with_report(model, fullgraph=False, **options):
    """``torch.compile`` through the backend with a Report of its own: the report of the engine
    a test compares with eager (what ``compile_backend.explain`` gives, without building and
    validating the same graph again under the interpreter: a third of these tests' time)."""
    from compile_backend.backend import compile_backend as backend_fn
    from compile_backend.report import Report

    report = Report()
    return torch.compile(model, fullgraph=fullgraph,
                         backend=lambda gm, inputs: backend_fn(gm, inputs, options=options, report=report)), report


#: what runs through ATen under Triton's interpreter (the backend's report, ``fallbacks``): the
#: token embedding, the rotary gather by position (decode), rotate-half's cat, the cache stack/cat,
#: and SDPA, whose fusion does not take enable_gqa (fx_passes/attention.py)
ATEN_OPS = {"aten.embedding", "aten.index", "aten.cat", "aten.stack",
            "aten._scaled_dot_product_flash_attention_for_cpu"}


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.LLM_NAMES)
def test_entry_point_compiles_fullgraph_and_matches_eager(name):
    model, inputs = zoo.get(name, "tiny")
    with torch.no_grad():
        expected = model(*inputs)  # the in-place entry writes its caches here (the same slot each call)
        before = [t.clone() for t in inputs]
        compiled, report = compiled_with_report(model, fullgraph=True)
        for _ in range(2):
            assert_same(compiled(*inputs), expected)
    for a, b in zip(inputs, before):  # the in-place entry's caches: the same slot, our kernels' rounding
        torch.testing.assert_close(a, b, **EAGER_TOL, msg="inputs written other than eager writes them")

    # the report of the engine compared above (what explain returns, without a second build)
    kernels = [k for g in report.graphs for k in g.kernels]
    assert [g.role for g in report.graphs] == ["inference"]
    gemms = [k for k in kernels if k["kind"] == "gemm"]
    assert gemms and all(k["impl"] == "triton" for k in gemms)
    fallbacks = [f for g in report.graphs for f in g.fallbacks]
    assert all("no kernel of ours covers" in f["reason"] for f in fallbacks), fallbacks
    assert {f["op"] for f in fallbacks} <= ATEN_OPS, fallbacks


@pytest.mark.slow
def test_compiled_generation_loop_matches_eager_without_recompiling():
    decoder = sharp_decoder()
    prefill, decode = zoo_llama.LlamaPrefill(decoder), zoo_llama.LlamaDecode(decoder)
    compiled_prefill = torch.compile(prefill, backend="compile_backend", fullgraph=True)
    compiled_decode = torch.compile(decode, backend="compile_backend", fullgraph=True)
    ids = token_ids(2, 8)
    counters.clear()
    with torch.no_grad():
        eager = prefill(ids, *empty_caches(2))
        ours = compiled_prefill(ids, *empty_caches(2))
        assert_same(ours, eager)
        for pos in range(8, 12):  # greedy: each step feeds eager's argmax to both
            token = eager[0].argmax(-1, keepdim=True)
            eager = decode(token, torch.full((2,), pos), eager[1], eager[2])
            ours = compiled_decode(token, torch.full((2,), pos), ours[1], ours[2])
            assert_same(ours, eager)
    assert counters["stats"]["unique_graphs"] == 2, "one graph per entry point, whatever the position"


def test_decode_step_kernels_per_layer():
    """Launches of one tiny decode step (2 layers): per layer the merged Q/K/V GEMM with the
    norm before it, the query's rotation, one kernel for the key rotation and both cache
    updates, attention, the output projection (+ residual, + the next norm's square), the
    gate/up GEMM with its norm, the down projection with SwiGLU's product. Session 5: 34
    groups; session 6: 28 (the key's rotation inside the cache update, the key and value
    updates one kernel, the two masks one, the rotary tables' gathers one, the token embedding
    in our kernels); session 7: 22 (the norms and SwiGLU are the fused decode GEMVs' prologues,
    kernels/gemv.py, as is the final norm of the LM head), then 17: the query's rotation runs
    in one launch with the key's rotation and the cache updates, and the step's table gathers,
    masks and token embedding in one (independent parts of a combined kernel)."""
    model, inputs = zoo.get("llama_decode", "tiny")
    report = compile_backend.explain(model.eval(), *inputs)
    (g,) = report.graphs
    assert len(g.kernels) <= 17, [(k["kind"], k["ops"]) for k in g.kernels]
    fused = [k["ops"] for k in g.kernels if k.get("config", {}).get("fused")]
    assert len(fused) == 3 * CFG.layers + 1, fused  # Q/K/V, gate/up, down per layer; the LM head
    attention = [k for k in g.kernels if k["kind"] == "attention"]
    assert len(attention) == CFG.layers and all(k["config"].get("decode") for k in attention)  # flash-decoding
    assert not g.fallbacks, g.fallbacks  # the returned caches' stacks are written in place
    # per layer one launch for both rotations and both cache updates (independent parts of one
    # combined kernel: kernels/pointwise_combo.py)
    updates = [k for k in g.kernels if k["ops"].count("aten.where") >= 2 and k["ops"].count("aten.cat") == 2]
    assert len(updates) == CFG.layers, [(k["kind"], k["ops"]) for k in g.kernels]


@pytest.mark.parametrize("batch", [1, 2])  # one position for all rows (index_copy_), one per row (select)
def test_in_place_decode_equals_the_functional_step_and_writes_caches_in_our_kernels(batch, tmp_path):
    """``LlamaDecodeInPlace`` computes the functional step's logits and leaves in its per-layer
    caches what the functional step returns; compiled, each layer's key/value update kernel
    writes the caller's caches (no copy after the call), equal to eager over three steps."""
    decoder = sharp_decoder()
    functional, in_place = zoo_llama.LlamaDecode(decoder).eval(), zoo_llama.LlamaDecodeInPlace(decoder).eval()
    make = zoo_llama.decode_in_place_inputs(CFG, 30)
    ids, position, *caches = make(batch, torch.Generator().manual_seed(3))
    assert position.shape == ((1,) if batch == 1 else (batch,))
    k5, v5 = torch.stack(caches[0::2]), torch.stack(caches[1::2])
    mine = [c.clone() for c in caches]
    with torch.no_grad():
        want, new_k, new_v = functional(ids, position, k5, v5)
        (got,) = in_place(ids, position, *mine)
    torch.testing.assert_close(got, want, **EAGER_TOL)
    for i in range(CFG.layers):
        torch.testing.assert_close(mine[2 * i], new_k[i], **EAGER_TOL)
        torch.testing.assert_close(mine[2 * i + 1], new_v[i], **EAGER_TOL)

    compiled, report = compiled_with_report(in_place, fullgraph=True, cache_dir=str(tmp_path))
    eager_caches, our_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    with torch.no_grad():
        for step in range(3):  # three tokens: each step writes the next slot
            pos = position + step
            (e,) = in_place(ids, pos, *eager_caches)
            (o,) = compiled(ids, pos, *our_caches)
            torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)
            for a, b in zip(our_caches, eager_caches):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    (g,) = report.graphs  # the engine compared above (one graph: the three positions reused it)
    assert [w["by"] for w in g.input_writes] == ["kernel"] * 2 * CFG.layers, g.input_writes
    assert len({w["input"] for w in g.input_writes}) == 2 * CFG.layers  # every cache, once
