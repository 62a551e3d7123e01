"""transformers' LlamaForCausalLM decoding with a StaticCache through the backend (issue #20's
second model, a model no one here wrote): several steps after a prompt match eager token by
token, and the cache update runs in our kernels (index_copy of the decode position became a
select, fused with the key's rotation; the key and value updates one kernel per layer)."""
import pytest
import torch

import compile_backend

transformers = pytest.importorskip("transformers")


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)
    return cfg, transformers.LlamaForCausalLM(cfg).eval()


class Step(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token, position, cache):
        return self.model(token, past_key_values=cache, cache_position=position, use_cache=True).logits[:, -1]


def _counts(cache):
    """Cache layers that count their tokens in a tensor the step writes (transformers >= 5's
    ``cumulative_length``; none before): written in place too, beside the keys and values."""
    return sum(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in getattr(cache, "layers", ()))


def _compiled(module, **options):
    """``torch.compile`` of ``module`` through the backend with a Report of its own: the report
    of the very engine whose outputs a test compares (what ``compile_backend.explain`` returns,
    without building and validating the same graph a second time: explain was a third to half
    of these tests' time under the interpreter)."""
    from compile_backend.backend import compile_backend as backend_fn
    from compile_backend.report import Report

    report = Report()
    return torch.compile(module, backend=lambda gm, inputs: backend_fn(gm, inputs, options=options, report=report)), report


def _generate(cfg, model, step, prompt, steps=3):
    cache = transformers.StaticCache(config=cfg, max_batch_size=prompt.shape[0], max_cache_len=32,
                                     device="cpu", dtype=torch.float32)
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, cache_position=torch.arange(prompt.shape[1]), use_cache=True)
        token, logits = out.logits[:, -1:].argmax(-1), []
        for i in range(steps):
            last = step(token, torch.tensor([prompt.shape[1] + i]), cache)
            logits.append(last)
            token = last.argmax(-1, keepdim=True)
    return (torch.stack(logits) if logits else None), cache


def test_static_cache_decode_matches_eager_and_updates_the_cache_in_our_kernels():
    cfg, model = _model()
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
    eager = Step(model).eval()
    expected, eager_cache = _generate(cfg, model, eager, prompt)
    compiled, report = _compiled(Step(model).eval())
    got, cache = _generate(cfg, model, compiled, prompt)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(cache.layers, eager_cache.layers):  # the caller's cache was written
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)

    # the structure of that step's engine (one graph: the three steps did not recompile)
    fresh = _generate(cfg, model, eager, prompt, steps=0)[1]
    (g,) = report.graphs
    assert {f["op"] for f in g.fallbacks} <= {"aten.embedding"}, g.fallbacks
    updates = [k for k in g.kernels if k["ops"].count("aten.where") >= 2 and k["ops"].count("aten.cat") == 2]
    assert len(updates) == cfg.num_hidden_layers, [(k["kind"], k["ops"]) for k in g.kernels]
    # each layer's key and value caches (and token count) written in place by that kernel: no
    # copy after the call
    assert [w["by"] for w in g.input_writes] == ["kernel"] * (2 * cfg.num_hidden_layers + _counts(fresh)), \
        g.input_writes
    assert all(g.kernels[w["kernel"]]["ops"].count("aten.where") >= 2 for w in g.input_writes)


def _decoder(name):
    torch.manual_seed(0)
    cfg = getattr(transformers, name + "Config")(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                                   max_position_embeddings=128)
    if name == "Gemma":
        cfg.head_dim = 16
    return cfg, getattr(transformers, name + "ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("name", ["Qwen2", "Gemma"])
def test_weight_only_decode_of_other_decoders(name, tmp_path, monkeypatch):
    """W4A16 decode of decoders with other blocks (Qwen2: biased Q/K/V; Gemma: a (1 + w) RMS norm,
    a tanh-GELU gate, scaled embeddings): every linear is one fused GEMV with the norm or the
    gated product as its prologue (4 a layer, and the LM head's float GEMV with the final norm),
    the attention is flash-decoding, and the kernels give the emulated path's logits over 2 steps."""
    from compile_backend import quant

    cfg, model = _decoder(name)
    q = quant.QuantConfig(precision="int4", activations=None, group_size=32, min_features=1)
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
    outs = {}
    for interpret in ("0", "1"):  # the emulated path (each op's reference), then the kernels
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        torch._dynamo.reset()
        step, report = _compiled(Step(model).eval(), quant=q, cache_dir=str(tmp_path / interpret))
        outs[interpret] = _generate(cfg, model, step, prompt, steps=2)[0]
    torch._dynamo.reset()
    torch.testing.assert_close(outs["1"], outs["0"], rtol=1e-5, atol=1e-5)
    # the structure of the kernels' engine compared above (one graph: the second step reused it)
    (g,) = report.graphs
    kernels = [k.get("config", {}) for k in g.kernels]
    assert sum(bool(c.get("fused")) for c in kernels) == 4 * cfg.num_hidden_layers + 1, [k["ops"] for k in g.kernels]
    assert sum(bool(c.get("decode")) for c in kernels) == cfg.num_hidden_layers
    assert not g.fallbacks, g.fallbacks


@pytest.mark.parametrize("name", ["Mistral", "Phi3", "Qwen3"])
def test_other_decoders_write_their_caches_in_place(name, tmp_path):
    """Decoders no one here wrote, each with its own attention and cache plumbing: every layer's
    key and value caches written by our kernels into the caller's tensors, the step equal to eager."""
    torch.manual_seed(0)
    cfg = getattr(transformers, name + "Config")(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                                   max_position_embeddings=128, pad_token_id=0)
    model = getattr(transformers, name + "ForCausalLM")(cfg).eval()
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
    expected, eager_cache = _generate(cfg, model, Step(model).eval(), prompt, steps=2)
    compiled, report = _compiled(Step(model).eval(), cache_dir=str(tmp_path))
    got, cache = _generate(cfg, model, compiled, prompt, steps=2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(cache.layers, eager_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
    fresh = _generate(cfg, model, Step(model).eval(), prompt, steps=0)[1]
    # the engines compared above: one a step where the step recompiles (Mistral's sliding-window
    # cache guards on its token count), each writing every cache (no graph break between layers)
    assert report.graphs
    for g in report.graphs:
        assert [w["by"] for w in g.input_writes] == ["kernel"] * (2 * cfg.num_hidden_layers + _counts(fresh)), \
            g.input_writes


def test_generate_with_a_static_cache_through_the_backend(tmp_path):
    """The usual way to compile an HF decoder: ``model.forward`` through the backend, then
    ``generate(cache_implementation="static")``: the same tokens as eager, two graphs (prefill and
    decode), the decode step's caches written by our kernels (the prefill's many-slot
    ``index_copy`` writes through ATen)."""
    from compile_backend.backend import compile_backend as backend_fn
    from compile_backend.options import Options
    from compile_backend.report import Report

    cfg, model = _model()
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    # 3 new tokens: the prefill and two decode steps, the second reusing the first's graph (5
    # tokens ran two more interpreted decode steps that checked nothing new)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static",
                                  pad_token_id=0)
    report = Report()
    model.forward = torch.compile(model.forward, backend=lambda gm, inputs: backend_fn(
        gm, inputs, options=Options(cache_dir=str(tmp_path)), report=report))
    try:
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static",
                                 pad_token_id=0)
    finally:
        del model.forward
    assert torch.equal(got, expected)
    writes = [[w["by"] for w in g.input_writes] for g in report.graphs]
    counts = _counts(transformers.StaticCache(config=cfg, max_batch_size=1, max_cache_len=4, device="cpu",
                                              dtype=torch.float32))
    # the decode step writes every layer's caches (and token count) with its kernels; the prefill
    # its caches (transformers 4: index_copy_ in place; 5: made in the graph at first use)
    assert len(report.graphs) == 2 and all(len(w) <= 2 * cfg.num_hidden_layers + counts for w in writes), writes
    assert ["kernel"] * (2 * cfg.num_hidden_layers + counts) in writes, writes


def test_prefill_writes_its_slots_with_index_copy_in_place(tmp_path):
    """A prompt of several tokens into an initialised StaticCache: each cache's ``index_copy`` of
    the prompt's slots runs as ``index_copy_`` on the caller's cache (no whole new cache made and
    copied back); the logits and the caches equal eager's."""
    cfg, model = _model()
    prompt = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(2))

    def fresh():
        cache = transformers.StaticCache(config=cfg, max_batch_size=1, max_cache_len=32, device="cpu",
                                         dtype=torch.float32)
        with torch.no_grad():  # one token first: the cache's tensors exist before the compiled call
            model(torch.tensor([[7]]), past_key_values=cache, cache_position=torch.arange(1), use_cache=True)
        return cache

    eager_cache, our_cache = fresh(), fresh()
    position = torch.arange(1, 7)
    with torch.no_grad():
        want = Step(model).eval()(prompt, position, eager_cache)
        compiled, report = _compiled(Step(model).eval(), cache_dir=str(tmp_path))
        got = compiled(prompt, position, our_cache)  # its report: the engine compared below
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(our_cache.layers, eager_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)
    (g,) = report.graphs
    by = sorted(w["by"] for w in g.input_writes)
    assert by == sorted(["aten in place"] * 2 * cfg.num_hidden_layers + ["kernel"] * _counts(our_cache)), g.input_writes
    assert all(g.kernels[w["kernel"]]["config"]["in_place"].startswith("aten.index_copy_")
               for w in g.input_writes if w["by"] == "aten in place")
