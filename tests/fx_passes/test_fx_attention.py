"""Attention fusion: explicit chains and SDPA ops become compile_backend.attention with the
right scale / causal / mask, values unchanged; inexpressible or shared chains stay as they are."""
import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compile_backend.fx_passes import total
from compile_backend.fx_passes.attention import fuse_attention
from compile_backend.fx_passes.cleanup_rules import remove_noops
from fx_passes.graphs import check_meta, count, ctx, inference_graph, run, training_graph

B, H, S, D = 2, 3, 5, 4


def _qkv(seq=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, seq, D, generator=g) for _ in range(3)]


def _attention_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.compile_backend.attention.default]


def _fuse(model, *inputs, expect=1, training=False):
    t = inference_graph(model, *inputs)
    remove_noops(t.gm, ctx())
    with torch.no_grad():
        expected = model(*inputs)
    assert total(fuse_attention(t.gm, ctx(training=training))) == expect
    t.gm.graph.lint()
    check_meta(t.gm)
    got = run(t)
    for a, e in zip(got if isinstance(got, (list, tuple)) else [got], expected if isinstance(expected, tuple) else [expected]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    return t


class Chain(nn.Module):
    """softmax(q k^T * scale + mask) v, written out; the variants move the scale around."""

    def __init__(self, variant="mul_after", dropout=0.1):
        super().__init__()
        self.variant = variant
        self.drop = nn.Dropout(dropout)

    def forward(self, q, k, v, mask=None):
        if self.variant == "q_prescaled":
            s = torch.matmul(q * 0.5, k.transpose(-2, -1)) / 2.0
        elif self.variant == "div_after":
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        else:
            s = 0.7 * torch.matmul(q, k.transpose(-2, -1))
        if mask is not None:
            s = s + mask
        return torch.matmul(self.drop(torch.softmax(s, dim=-1)), v)


@pytest.mark.parametrize("variant,scale", [("mul_after", 0.7), ("div_after", 0.5), ("q_prescaled", 0.25)])
def test_explicit_chain_fuses_with_its_scale(variant, scale):
    t = _fuse(Chain(variant).eval(), *_qkv())
    (node,) = _attention_nodes(t.gm)
    q, k, v, mask, got_scale, causal = node.args
    assert mask is None and causal is False and got_scale == pytest.approx(scale)
    assert count(t.gm, "bmm") == 0 and count(t.gm, "_softmax") == 0


def test_additive_padding_mask_is_passed_through():
    mask = torch.zeros(B, 1, 1, S)
    mask[1, ..., 3:] = -10000.0
    t = _fuse(Chain("div_after").eval(), *_qkv(), mask)
    (node,) = _attention_nodes(t.gm)
    assert node.args[3] is not None and node.args[5] is False


class Causal(nn.Module):
    """GPT-2 style: a registered tril buffer, masked_fill with the dtype's min (or -inf)."""

    def __init__(self, fill=None, n=8):
        super().__init__()
        self.fill = fill
        self.register_buffer("tril", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n))

    def forward(self, q, k, v):
        s = q.shape[2]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(D))
        fill = torch.finfo(scores.dtype).min if self.fill is None else self.fill
        scores = scores.masked_fill(~self.tril[:, :, :s, :s], fill)
        return torch.matmul(torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("fill", [None, float("-inf")])
def test_tril_buffer_mask_becomes_causal(fill):
    t = _fuse(Causal(fill).eval(), *_qkv())
    (node,) = _attention_nodes(t.gm)
    assert node.args[3] is None and node.args[5] is True


class BoolMask(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q, k.transpose(-1, -2))
        return torch.matmul(torch.softmax(scores.masked_fill(~keep, self.fill), dim=-1), v)


def test_input_bool_mask_with_neg_inf_fill_becomes_a_keep_mask():
    keep = torch.rand(B, 1, S, S) > 0.3
    keep[..., 0] = True  # every row keeps a key
    t = _fuse(BoolMask(float("-inf")).eval(), *_qkv(), keep)
    (node,) = _attention_nodes(t.gm)
    assert node.args[3].meta["val"].dtype == torch.bool and node.args[5] is False


def test_finite_fill_on_a_non_causal_mask_is_not_fused():
    keep = torch.rand(B, 1, S, S) > 0.3
    keep[0, 0, 1] = False  # a fully masked row: eager gives it a uniform distribution
    _fuse(BoolMask(-1e9).eval(), *_qkv(), keep, expect=0)


class Widening(nn.Module):
    """A mask broadcasting the single query row up to four: not an attention mask."""

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q[:, :, :1], k.transpose(-1, -2))
        return torch.matmul(torch.softmax(scores + mask, dim=-1), v)


@pytest.mark.parametrize("rows,fused", [(4, 0), (1, 1)])
def test_mask_that_widens_the_scores_is_not_fused(rows, fused):
    _fuse(Widening().eval(), *_qkv(), torch.randn(B, H, rows, S), expect=fused)


class ReturnsProbs(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)
        return torch.matmul(p, v), p


def test_chain_whose_probabilities_are_used_elsewhere_is_not_fused():
    _fuse(ReturnsProbs().eval(), *_qkv(), expect=0)


class ThreeD(nn.Module):
    """Single-head attention on 3-D tensors with torch.bmm."""

    def forward(self, q, k, v):
        return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.3, dim=-1), v)


def test_three_d_bmm_chain_fuses():
    q, k, v = (torch.randn(B * H, S, D) for _ in range(3))
    t = _fuse(ThreeD().eval(), q, k, v)
    (node,) = _attention_nodes(t.gm)
    assert node.args[4] == pytest.approx(0.3)


class SDPA(nn.Module):
    def __init__(self, causal=False, scale=None):
        super().__init__()
        self.causal, self.scale = causal, scale

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale)


@pytest.mark.parametrize("causal,scale,with_mask", [(True, None, False), (False, 0.3, True), (False, None, False)])
def test_sdpa_ops_fuse(causal, scale, with_mask):
    mask = torch.randn(B, 1, S, S) if with_mask else None
    args = _qkv() + ([mask] if with_mask else [])
    t = _fuse(SDPA(causal, scale).eval(), *args)
    (node,) = _attention_nodes(t.gm)
    assert node.args[5] is causal
    assert node.args[4] == pytest.approx(scale if scale is not None else 1 / math.sqrt(D))
    assert (node.args[3] is not None) is with_mask


def test_sdpa_op_with_a_dead_read_of_its_logsumexp_fuses():
    # Dynamo's recompiled graphs can keep a getitem of the SDPA op's logsumexp that nothing
    # reads (transformers' Mistral decode step after a cache-length recompile): not a backward
    # pass, so the op still fuses, and the dead read goes with it
    t = inference_graph(SDPA(causal=True).eval(), *_qkv())
    remove_noops(t.gm, ctx())
    (op,) = [n for n in t.gm.graph.nodes if str(n.target).startswith("aten._scaled_dot_product")]
    with t.gm.graph.inserting_after(op):
        t.gm.graph.call_function(operator.getitem, (op, 1))
    assert total(fuse_attention(t.gm, ctx())) == 1
    t.gm.graph.lint()
    assert not [n for n in t.gm.graph.nodes if str(n.target).startswith("aten._scaled_dot_product")]
    assert not [n for n in t.gm.graph.nodes if n.target is operator.getitem]
    torch.testing.assert_close(run(t)[0] if isinstance(run(t), (list, tuple)) else run(t),
                               SDPA(causal=True)(*_qkv()), rtol=1e-5, atol=1e-6)


def test_sdpa_op_whose_logsumexp_is_read_stays():
    t = inference_graph(SDPA(causal=True).eval(), *_qkv())
    remove_noops(t.gm, ctx())
    graph = t.gm.graph
    (op,) = [n for n in graph.nodes if str(n.target).startswith("aten._scaled_dot_product")]
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        lse = graph.call_function(operator.getitem, (op, 1))
    out.args = ((*out.args[0], lse) if isinstance(out.args[0], (list, tuple)) else (out.args[0], lse),)
    assert total(fuse_attention(t.gm, ctx())) == 0


def test_sdpa_with_a_longer_key_sequence():
    q = torch.randn(B, H, 3, D)
    k, v = torch.randn(B, H, 7, D), torch.randn(B, H, 7, D)
    _fuse(SDPA(causal=True).eval(), q, k, v)


class GQA(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_grouped_query_sdpa_fuses():
    # 6 query heads over 2 k/v heads (Llama-style): the op takes k/v as they are
    q = torch.randn(B, 6, 3, D)
    k, v = torch.randn(B, 2, 7, D), torch.randn(B, 2, 7, D)
    t = _fuse(GQA().eval(), q, k, v, torch.randn(B, 1, 3, 7))
    (node,) = _attention_nodes(t.gm)
    assert node.meta["val"].shape == (B, 6, 3, D)


class RepeatKV(nn.Module):
    """HF Llama's attention: k/v repeated per query-head group (repeat_kv), then plain SDPA."""

    def forward(self, q, k, v):
        def repeat_kv(x, n_rep=3):
            b, h, s, d = x.shape
            return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
        return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), is_causal=True)


def test_repeated_kv_heads_are_read_grouped():
    q = torch.randn(B, 6, 5, D)
    k, v = torch.randn(B, 2, 5, D), torch.randn(B, 2, 5, D)
    t = _fuse(RepeatKV().eval(), q, k, v, expect=2)  # the SDPA fused, then its k/v regrouped
    (node,) = _attention_nodes(t.gm)
    assert shape_of(node.args[1]) == (B, 2, 5, D) and shape_of(node.args[2]) == (B, 2, 5, D)
    assert count(t.gm, "expand") == 0 and count(t.gm, "clone") == 0


def shape_of(node):
    return tuple(node.meta["val"].shape)


def test_training_graphs_are_not_fused():
    t = training_graph(Chain(dropout=0.0), *_qkv())
    assert total(fuse_attention(t.gm, ctx(training=True))) == 0


def _dead_row_keep_mask():
    keep = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[..., 0] = True
    keep[1, 0, 2] = False  # query row 2 of batch 1 sees no key
    return keep


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_row_of_the_explicit_chain_stays_nan(kind):
    """softmax over a row of -inf is NaN in eager (aten._softmax): the fused op is told so
    (dead_rows_nan), where SDPA's safe softmax gives such a row zeros."""
    keep = _dead_row_keep_mask()
    if kind == "bool":
        t = _fuse_nan(BoolMask(float("-inf")).eval(), *_qkv(), keep)
    else:
        bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
        t = _fuse_nan(Chain("div_after").eval(), *_qkv(), bias)
    (node,) = _attention_nodes(t.gm)
    assert node.args[6:] == (True,)


def test_fully_masked_row_of_sdpa_stays_zero():
    t = _fuse(SDPA().eval(), *_qkv(), _dead_row_keep_mask())
    (node,) = _attention_nodes(t.gm)
    assert node.args[6:] == ()
    out = run(t)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert torch.equal(out[1, :, 2], torch.zeros(H, D))


def _fuse_nan(model, *inputs):
    """_fuse for outputs with NaN rows: NaN where eager has NaN, eager's values elsewhere."""
    t = inference_graph(model, *inputs)
    remove_noops(t.gm, ctx())
    with torch.no_grad():
        expected = model(*inputs)
    assert expected.isnan().any()
    assert total(fuse_attention(t.gm, ctx())) == 1
    check_meta(t.gm)
    got = run(t)
    got = got[0] if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    return t


class SDPAConstantMask(nn.Module):
    """How HF decoders look when traced: the causal mask materialised from aranges, as a bool
    keep-mask or an additive where(keep, 0, -inf), broadcast over the batch."""

    def __init__(self, kind, pattern="causal"):
        super().__init__()
        self.kind, self.pattern = kind, pattern

    def forward(self, q, k, v):
        i = torch.arange(S).view(S, 1)
        keep = torch.arange(S) <= i if self.pattern == "causal" else torch.arange(S) >= i
        keep = keep.expand(B, 1, S, S)
        mask = keep if self.kind == "bool" else torch.where(keep, torch.tensor(0.0), torch.tensor(float("-inf")))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_sdpa_constant_causal_mask_becomes_causal(kind):
    t = _fuse(SDPAConstantMask(kind).eval(), *_qkv())
    (node,) = _attention_nodes(t.gm)
    assert node.args[5] is True and node.args[3] is None  # no mask read at run time


def test_sdpa_constant_mask_of_another_pattern_stays_a_mask():
    t = _fuse(SDPAConstantMask("additive", pattern="anti").eval(), *_qkv())
    (node,) = _attention_nodes(t.gm)
    assert node.args[5] is False and node.args[3] is not None
