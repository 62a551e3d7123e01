"""Attention fusion: the explicit chain and the SDPA ATen ops become one ``attention`` op.

The explicit chain, as AOTAutograd writes ``softmax(q @ k^T * scale + mask) @ v``::

    bmm(view(q), view(k^T)) -> view [B,H,Sq,Sk] -> mul/div by scalars (scale, either side)
      -> additive mask | masked_fill(cond, -inf) | where(cond, s, -inf)   (any order, any number)
      -> _softmax(-1) -> clone / eval dropout / cast -> view -> bmm(., view(v)) -> view [B,H,Sq,Dv]

A scalar multiplying q or k before the first bmm joins the scale too. A fully masked row is NaN
after ``aten._softmax`` and zeros after ``_safe_softmax`` or SDPA: a chain with a mask through
``_softmax`` sets the op's ``dead_rows_nan``. Masks that depend only
on constants are evaluated (not baked in) to recognise the causal pattern: a tril keep-mask,
or an additive mask that is 0 on and below the diagonal and -inf (or a value no softmax can
tell from it) above, becomes ``causal=True``. At most one other mask remains, passed as a
bool keep-mask or an additive float mask.

The SDPA ops (``_scaled_dot_product_flash_attention_for_cpu``, ``_flash_attention``,
``_efficient_attention``, ``_cudnn_attention``, ``scaled_dot_product_attention``) map directly
when dropout is 0 and their output 0 is the only one used.

Nothing fires in training graphs, when an intermediate value (scores, probabilities) is used
elsewhere, when a mask widens the scores beyond [B,H,Sq,Sk] (it cannot be expressed), for a
finite masked_fill value on a mask that is not causal (eager then gives fully masked rows a
uniform distribution, which a mask argument cannot reproduce), or for dtypes that disagree.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.compile_backend.attention)
from .base import PassContext
from .rules import (Facts, Rule, apply_rules, call, erase_if_dead, evaluate_constant, is_attention, is_op,
                    propagate_meta, scalar, shape, single_user, tensor_val)

aten = torch.ops.aten

#: a masked_fill value at or below this cannot be told from -inf by a softmax over a row that
#: keeps at least one finite score (exp underflows to exactly 0 in every float dtype)
NEG_INF_LIKE = torch.finfo(torch.float16).min

_RESHAPES = (aten.view, aten._unsafe_view, aten.reshape)
_PASS_THROUGH = (aten.clone, aten.alias)


@dataclasses.dataclass
class _Mask:
    node: fx.Node
    kind: str  # keep (bool, True = attend) | drop (bool, True = masked) | additive
    rank: int  # rank of the scores where it was applied
    fill: float = float("-inf")  # value written where a drop/keep mask masks
    scale: float = 1.0  # scale applied to the scores after an additive mask


@dataclasses.dataclass
class _Match:
    out: fx.Node  # the node whose users get the attention result
    q: fx.Node
    k: fx.Node
    v: fx.Node
    k_is_transposed: bool  # ``k`` is k^T [B,H,D,Sk] and needs a transpose
    batch_heads: Tuple[int, int]  # (B, H); B = 0 when q/k/v are 3-D and need a leading dim
    scale: float
    masks: List[_Mask]
    causal: bool = False
    dead_rows_nan: bool = False  # aten._softmax: a fully masked row is NaN (SDPA's safe softmax: 0)


def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Replace attention chains and SDPA ops with compile_backend.attention; returns how many."""
    if ctx.training:
        return {}
    return apply_rules(gm, ctx, ATTENTION_RULES)


# ----------------------------------------------------------------------------- explicit chain
def _match_chain(softmax: fx.Node, facts: Facts) -> Optional[_Match]:
    if not is_op(softmax, aten._softmax, aten._safe_softmax):
        return None
    x = softmax.args[0]
    dim = softmax.args[1]
    rank = len(shape(x))
    if dim not in (-1, rank - 1) or rank not in (3, 4):
        return None
    if is_op(softmax, aten._softmax) and softmax.args[2]:
        return None  # half_to_float changes the output dtype
    if is_op(softmax, aten._safe_softmax) and (len(softmax.args) > 2 or softmax.kwargs.get("dtype")):
        return None
    scores = _walk_scores(x, facts)
    if scores is None:
        return None
    bmm1, scale, masks, four_d = scores
    probs = _walk_probs(softmax)
    if probs is None:
        return None
    bmm2, out = probs
    a, b = bmm1.args
    p3, v3 = bmm2.args
    n, sq, d = shape(a)
    sk = shape(b)[2]
    dv = shape(v3)[2]
    if four_d is not None:
        bsz, heads = four_d[0], four_d[1]
        if bsz * heads != n:
            return None
        q, fq = _find_operand(a, (bsz, heads, sq, d))
        kt, fk = _find_operand(b, (bsz, heads, d, sk))
        v, _ = _find_operand(v3, (bsz, heads, sk, dv), scaled=False)
    else:
        bsz, heads = 0, n
        (q, fq), (kt, fk), v = _peel_scale(a), _peel_scale(b), v3
    if q is None or kt is None or v is None:
        return None
    scale *= fq * fk
    k, k_is_t = _untranspose(kt)
    dtypes = {tensor_val(t).dtype for t in (q, k, v)}
    if len(dtypes) != 1 or tensor_val(out).dtype not in dtypes:
        return None
    match = _Match(out, q, k, v, k_is_t, (bsz, heads), scale, masks)
    if not _resolve_masks(match, facts, (sq, sk)):
        return None
    match.dead_rows_nan = bool(match.masks) and is_op(softmax, aten._softmax)
    return match


def _walk_scores(x: fx.Node, facts: Facts):
    """From the softmax input back to the first bmm: (bmm, scale, masks, 4-D shape or None)."""
    scale_after = 1.0  # product of scales met so far (applied after what comes next)
    masks: List[_Mask] = []
    four_d = None
    cur = x
    for _ in range(16):
        if not isinstance(cur, fx.Node) or len(cur.users) != 1:
            return None
        rank = len(shape(cur))
        if is_op(cur, aten.bmm):
            return cur, scale_after, masks, four_d
        if is_op(cur, aten.mul) and len(cur.args) == 2:
            a, b = cur.args
            s, nxt = (scalar(b), a) if scalar(b) is not None else (scalar(a), b)
            if s is None or s <= 0:
                return None
            scale_after *= s
            cur = nxt
        elif cur.target in (aten.div.Tensor, aten.div.Scalar) and scalar(cur.args[1]) is not None:
            s = scalar(cur.args[1])
            if s <= 0:
                return None
            scale_after /= s
            cur = cur.args[0]
        elif is_op(cur, aten.add) and len(cur.args) == 2 and cur.kwargs.get("alpha", 1) == 1:
            chain, mask = _split_chain(cur.args)
            if chain is None or shape(cur) != shape(chain) or not tensor_val(mask).is_floating_point():
                return None
            masks.append(_Mask(mask, "additive", rank, scale=scale_after))
            cur = chain
        elif cur.target is aten.masked_fill.Scalar:
            chain, cond, fill = cur.args
            if shape(cur) != shape(chain) or scalar(fill) is None or fill > NEG_INF_LIKE:
                return None
            masks.append(_Mask(cond, "drop", rank, fill=float(fill)))
            cur = chain
        elif cur.target is aten.where.self:
            cond, a, b = cur.args
            fill_b, fill_a = _fill_value(b, facts), _fill_value(a, facts)
            if fill_b is not None and fill_b <= NEG_INF_LIKE and isinstance(a, fx.Node):
                mask, chain = _Mask(cond, "keep", rank, fill=fill_b), a
            elif fill_a is not None and fill_a <= NEG_INF_LIKE and isinstance(b, fx.Node):
                mask, chain = _Mask(cond, "drop", rank, fill=fill_a), b
            else:
                return None
            if shape(cur) != shape(chain):
                return None
            masks.append(mask)
            cur = chain
        elif is_op(cur, *_RESHAPES):
            src = cur.args[0]
            if rank == 4 and len(shape(src)) == 3 and shape(src)[1:] == shape(cur)[2:]:
                four_d = shape(cur)
            elif shape(src) != shape(cur):
                return None
            cur = src
        elif is_op(cur, aten._to_copy) and set(cur.kwargs) == {"dtype"}:
            cur = cur.args[0]
        else:
            return None
    return None


def _split_chain(args) -> Tuple[Optional[fx.Node], Optional[fx.Node]]:
    """Which operand of an add continues the score chain (the one reaching a bmm)."""
    a, b = args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None, None
    ra, rb = _reaches_bmm(a), _reaches_bmm(b)
    if ra == rb:
        return None, None
    return (a, b) if ra else (b, a)


def _reaches_bmm(node: fx.Node) -> bool:
    cur = node
    for _ in range(16):
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return False
        if is_op(cur, aten.bmm):
            return True
        if is_op(cur, aten.add):
            return any(_reaches_bmm(a) for a in cur.args if isinstance(a, fx.Node))
        if cur.target is aten.where.self:
            return any(_reaches_bmm(a) for a in cur.args[1:] if isinstance(a, fx.Node))
        if not (is_op(cur, aten.mul, aten.div, aten.masked_fill, aten._to_copy, *_RESHAPES)):
            return False
        cur = next((a for a in cur.args if isinstance(a, fx.Node)), None)
    return False


def _fill_value(node: Any, facts: Facts) -> Optional[float]:
    """The value of a scalar fill operand of where(): a number, full([], v) or a 0-dim constant."""
    if scalar(node) is not None:
        return float(node)
    if not isinstance(node, fx.Node) or shape(node) != ():
        return None
    if is_op(node, aten.full) and scalar(node.args[1]) is not None:
        return float(node.args[1])
    if is_op(node, aten.scalar_tensor) and scalar(node.args[0]) is not None:
        return float(node.args[0])
    if facts.constant(node):
        return float(evaluate_constant(facts.gm, node))
    return None


def _walk_probs(softmax: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """From the softmax forward to the second bmm: (bmm, node carrying the result)."""
    cur = softmax
    for _ in range(8):
        user = single_user(cur)
        if user is None:
            return None
        if is_op(user, aten.bmm):
            if user.args[0] is not cur:
                return None
            after = single_user(user)
            if is_op(after, *_RESHAPES) and len(shape(after)) == 4:
                return user, after
            return user, user
        if is_op(user, *_PASS_THROUGH, *_RESHAPES) or (is_op(user, aten._to_copy) and set(user.kwargs) == {"dtype"}):
            pass
        elif is_op(user, aten.expand) and shape(user) == shape(cur):
            pass
        elif is_op(user, aten.dropout) and (not user.args[2] or user.args[1] == 0):
            pass
        elif is_op(user, aten.native_dropout) and (not user.args[2] or user.args[1] == 0):
            out0 = [u for u in user.users if u.args[1] == 0]
            if len(user.users) != 1 or not out0:
                return None
            user = out0[0]
        else:
            return None
        cur = user
    return None


def _peel_scale(node: fx.Node) -> Tuple[fx.Node, float]:
    """``node`` without a scalar multiply/divide in front of it, and that factor."""
    factor = 1.0
    while True:
        if is_op(node, aten.mul) and scalar(node.args[1]) is not None and len(node.users) == 1:
            factor *= node.args[1]
            node = node.args[0]
        elif node.target in (aten.div.Tensor, aten.div.Scalar) and scalar(node.args[1]) is not None \
                and len(node.users) == 1 and node.args[1] != 0:
            factor /= node.args[1]
            node = node.args[0]
        else:
            return node, factor


def _find_operand(node: fx.Node, want: Tuple[int, ...], scaled: bool = True) -> Tuple[Optional[fx.Node], float]:
    """Walk back through reshapes, clones and identity expands (all keep the logical row-major
    order) to the earliest value of shape ``want``: the 4-D operand before matmul flattened it.
    With ``scaled``, scalar factors on the way are peeled off and returned."""
    found, found_factor, factor = None, 1.0, 1.0
    cur = node
    for _ in range(12):
        if scaled:
            cur, f = _peel_scale(cur)
            factor *= f
        if shape(cur) == want:
            found, found_factor = cur, factor
        if is_op(cur, *_RESHAPES, *_PASS_THROUGH) or (is_op(cur, aten.expand) and shape(cur) == shape(cur.args[0])):
            cur = cur.args[0]
            continue
        break
    return found, found_factor


def _untranspose(kt: fx.Node) -> Tuple[fx.Node, bool]:
    """k from k^T when k^T is a transpose of the last two dims, else (k^T, True)."""
    r = len(shape(kt))
    if is_op(kt, aten.transpose) and sorted(d % r for d in kt.args[1:3]) == [r - 2, r - 1]:
        return kt.args[0], False
    if is_op(kt, aten.permute) and list(kt.args[1]) == list(range(r - 2)) + [r - 1, r - 2]:
        return kt.args[0], False
    return kt, True


def _resolve_masks(match: _Match, facts: Facts, seq: Tuple[int, int]) -> bool:
    """Recognise a causal mask; leave at most one other mask. False when inexpressible."""
    rest = []
    for m in match.masks:
        if not match.causal and facts.constant(m.node) and _is_causal(evaluate_constant(facts.gm, m.node), m, seq):
            match.causal = True
            continue
        if m.kind != "additive" and m.fill != float("-inf"):
            return False  # a finite fill on a non-causal mask: fully masked rows would differ
        rest.append(m)
    if len(rest) > 1:
        return False
    match.masks = rest
    return True


def _is_causal(value: Any, m: _Mask, seq: Tuple[int, int]) -> bool:
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[-2:]) != seq:
        return False
    rows = value.reshape(-1, *seq)
    if not bool((rows == rows[:1]).all()):
        return False
    keep_ref = torch.ones(seq, dtype=torch.bool, device=value.device).tril()
    plane = rows[0]
    if m.kind == "keep":
        return plane.dtype == torch.bool and torch.equal(plane, keep_ref)
    if m.kind == "drop":
        return plane.dtype == torch.bool and torch.equal(plane, ~keep_ref)
    if not plane.is_floating_point():
        return False
    return bool((plane[keep_ref] == 0).all()) and bool((plane[~keep_ref] <= NEG_INF_LIKE).all())


def _rewrite_chain(gm: fx.GraphModule, node: fx.Node, match: _Match) -> None:
    graph = gm.graph
    with graph.inserting_before(match.out):
        q, k, v = match.q, match.k, match.v
        if match.k_is_transposed:
            k = call(graph, aten.transpose.int, (k, -2, -1))
        lead = match.batch_heads[0] == 0
        if lead:
            q, k, v = (call(graph, aten.unsqueeze.default, (t, 0)) for t in (q, k, v))
        mask = _mask_arg(graph, match)
        args = (q, k, v, mask, match.scale, match.causal) + ((True,) if match.dead_rows_nan else ())
        attn = call(graph, torch.ops.compile_backend.attention.default, args)
        result = attn
        if shape(attn) != shape(match.out):
            result = call(graph, aten.view.default, (attn, list(shape(match.out))))
    match.out.replace_all_uses_with(result)
    erase_if_dead(graph, [match.out])
    propagate_meta(graph, [result])


def _mask_arg(graph: fx.Graph, match: _Match) -> Optional[fx.Node]:
    if not match.masks:
        return None
    m = match.masks[0]
    bsz, heads = match.batch_heads
    node = m.node
    ms = shape(node)
    if m.rank == 3 and bsz and len(ms) == 3 and ms[0] != 1:
        node = call(graph, aten.reshape.default, (node, [bsz, heads, *ms[1:]]))
    if m.kind == "drop":
        node = call(graph, aten.logical_not.default, (node,))
    elif m.kind == "additive" and m.scale != 1.0:
        node = call(graph, aten.mul.Tensor, (node, m.scale))
    return node


# ----------------------------------------------------------------------------- SDPA ops
_SDPA_MASK_ARG = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: "attn_mask",
    aten._scaled_dot_product_efficient_attention.default: "attn_bias",
    aten._scaled_dot_product_flash_attention.default: None,
    aten._scaled_dot_product_cudnn_attention.default: "attn_bias",
    aten.scaled_dot_product_attention.default: "attn_mask",
}


def _match_sdpa(node: fx.Node, facts: Facts) -> Optional[_Match]:
    if node.target is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], fx.Node):
        op = node.args[0]
        if op.target not in _SDPA_MASK_ARG or op.target is aten.scaled_dot_product_attention.default:
            return None
        # logsumexp etc. read by something (a backward pass); a getitem of them read by nothing
        # does not count: Dynamo's recompiled graphs keep such dead reads (transformers' Mistral
        # decode step after a cache-length recompile left its attention in ATen for it)
        if any(u.args[1] != 0 and u.users for u in op.users):
            return None
    elif node.target is aten.scaled_dot_product_attention.default:
        op = node
    else:
        return None
    args = _schema_args(op)
    if float(args.get("dropout_p", 0.0)) != 0.0:
        return None
    q, k, v = args["query"], args["key"], args["value"]
    if any(len(shape(t)) != 4 for t in (q, k, v)):
        return None
    bsz, heads, sq, d = shape(q)
    _, kv_heads, sk, _ = shape(k)
    # grouped-query attention (``enable_gqa``, or a backend op given fewer k/v heads): query
    # head h reads k/v head h // (heads // kv_heads); the attention op infers it from the shapes
    if shape(k)[0] != bsz or not kv_heads or heads % kv_heads or shape(v)[:3] != (bsz, kv_heads, sk):
        return None
    if kv_heads != heads and not (args.get("enable_gqa", False) or op.target is not aten.scaled_dot_product_attention.default):
        return None
    mask_name = _SDPA_MASK_ARG[op.target]
    mask = args.get(mask_name) if mask_name else None
    masks = []
    if mask is not None:
        try:
            if torch.broadcast_shapes(shape(mask), (bsz, heads, sq, sk)) != (bsz, heads, sq, sk):
                return None
        except RuntimeError:
            return None
        masks.append(_Mask(mask, "keep" if tensor_val(mask).dtype == torch.bool else "additive", 4))
    scale = args.get("scale")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    match = _Match(node, q, k, v, False, (bsz, heads), scale, masks, causal=bool(args.get("is_causal", False)))
    # a mask built from constants (HF models materialise their causal mask when traced) may be
    # the causal pattern: then the kernel skips the masked blocks instead of reading a mask
    return match if _resolve_masks(match, facts, (sq, sk)) else None


def _schema_args(node: fx.Node) -> dict:
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _rewrite_sdpa(gm: fx.GraphModule, node: fx.Node, match: _Match) -> None:
    op = node.args[0] if node.target is operator.getitem else None
    _rewrite_chain(gm, node, match)
    if op is not None and not getattr(op, "_erased", False):
        erase_if_dead(gm.graph, list(op.users) + [op])


# ----------------------------------------------------------------------------- grouped k/v
def _repeated_heads(node: Any) -> Optional[Tuple[fx.Node, int]]:
    """(the [B, Hkv, S, D] tensor, G) when ``node`` repeats each of its heads G times in place
    (HF ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv * G, S, D)``, the
    reshape a copy then a view), the copy read by nothing else; else None."""
    if not isinstance(node, fx.Node) or not (is_op(node, aten.view) or is_op(node, aten._unsafe_view)):
        return None
    copy = node.args[0]
    if not (is_op(copy, aten.clone) or (is_op(copy, aten._to_copy) and set(copy.kwargs) <= {"memory_format"})):
        return None
    expanded = copy.args[0]
    if len(copy.users) != 1 or not is_op(expanded, aten.expand) or not is_op(expanded.args[0], aten.unsqueeze):
        return None
    base = expanded.args[0].args[0]
    if len(shape(base)) != 4 or expanded.args[0].args[1] not in (2, -3):
        return None
    b, heads, s, d = shape(base)
    g = shape(expanded)[2] if len(shape(expanded)) == 5 else 0
    if g < 1 or tuple(shape(expanded)) != (b, heads, g, s, d) or tuple(shape(node)) != (b, heads * g, s, d):
        return None
    return base, g


def _match_repeated_kv(node: fx.Node, facts: Facts) -> Optional[Tuple[fx.Node, fx.Node]]:
    if not is_attention(node) or node.kwargs or node in facts.unsafe:
        return None
    k, v = _repeated_heads(node.args[1]), _repeated_heads(node.args[2])
    if k is None or v is None or k[1] != v[1] or any(n in facts.unsafe for n in (k[0], v[0])):
        return None
    return k[0], v[0]


def _read_grouped_kv(gm: fx.GraphModule, node: fx.Node, kv: Tuple[fx.Node, fx.Node]) -> None:
    old = node.args[1:3]
    node.args = (node.args[0], *kv, *node.args[3:])  # the op maps query head h to k/v head h // G
    erase_if_dead(gm.graph, list(old))


ATTENTION_RULES = (
    Rule("attention_chain", "bmm(q, k^T) -> scale -> masks -> softmax -> (dropout) -> bmm(., v) becomes "
         "one attention op (tril masks become causal=True)", _match_chain, _rewrite_chain),
    Rule("sdpa", "an SDPA ATen op with dropout 0 and only its output used becomes the attention op",
         _match_sdpa, _rewrite_sdpa),
    Rule("grouped_kv", "an attention op reading k and v repeated per query-head group (HF repeat_kv: "
         "expand + copy + view) reads the grouped k and v: no copies", _match_repeated_kv, _read_grouped_kv),
)

__all__ = ["fuse_attention", "ATTENTION_RULES"]
