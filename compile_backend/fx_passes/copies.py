"""Copies no reader needs: a contiguous copy (``clone``, a same-dtype ``_to_copy``, a ``cat`` of
one non-empty operand) whose every reader takes any strides reads the original instead.

Models make copies for eager's sake: ``.contiguous()`` before a kernel that wants dense memory,
or a key/value cache concatenated onto an empty tensor (HF ``DynamicCache``: ``cat([tensor([]),
k], -2)``, a copy of ``k`` per layer: 24 copy kernels, 0.48 ms of GPT-2's 3.2 ms on the H200).
Our kernels (GEMMs, attention, generated pointwise and reduction kernels) read through strides,
so the copy is pure traffic. A copy is dropped only when nothing can tell: its readers, and the
views between it and them, accept the original's layout and produce values laid out exactly as
before (checked on fake tensors); nothing writes either in place; the graph does not return it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx

from .base import PassContext
from .rules import (Facts, Rule, apply_rules, call, erase_if_dead, fake_value, is_attention, is_op, is_view, propagate_meta,
                    same_layout, shape, takes_any_layout, tensor_val)
from .strided_views import compose_view

aten = torch.ops.aten


def drop_copies(gm: fx.GraphModule, ctx: PassContext) -> Dict[str, int]:
    """Apply :data:`COPY_RULES`; returns {rule: matches}."""
    if ctx.training:
        return {}
    return apply_rules(gm, ctx, COPY_RULES)


def _copied(node: fx.Node, gm: fx.GraphModule) -> Optional[fx.Node]:
    """The value ``node`` is a plain copy of (same shape and dtype), or None."""
    if is_op(node, aten.clone):
        src = node.args[0]
    elif is_op(node, aten._to_copy) and set(node.kwargs) <= {"dtype", "memory_format", "layout", "device"}:
        src = node.args[0]
    elif is_op(node, aten.cat):
        tensors, dim = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        full = [t for t in tensors if not _empty_operand(t, dim, gm)]
        src = full[0] if len(full) == 1 else None
    else:
        return None
    if not isinstance(src, fx.Node):
        return None
    a, b = tensor_val(node), tensor_val(src)
    if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return None
    return src


def _empty_operand(t: Any, dim: int, gm: fx.GraphModule) -> bool:
    """An operand cat ignores: no elements along ``dim``, or the legacy 1-D empty tensor."""
    v = tensor_val(t)
    if v is None and isinstance(t, fx.Node) and t.op == "get_attr":  # a lifted constant
        v = getattr(gm, str(t.target), None)
        v = v if isinstance(v, torch.Tensor) else None
    if v is None:
        return False
    if v.dim() == 1 and v.shape[0] == 0:
        return True
    return v.dim() > 0 and v.shape[dim % v.dim()] == 0


def _readers_take_any_layout(node: fx.Node, new: Any, facts: Facts, depth: int = 0) -> bool:
    """Every reader of ``node`` (through views) gives the same result metadata if ``node`` had
    the value ``new``: views must still view it, other readers must take any strides."""
    if depth > 8:
        return False
    for u in node.users:
        if u.op != "call_function" or u in facts.unsafe or not takes_any_layout(u):
            return False
        if is_view(u) and u in facts.outputs:
            return False  # a returned view would alias the original
        try:
            got = fake_value(u, {node: new})
        except Exception:  # a view that cannot view the original's strides
            return False
        if is_view(u):
            if not _readers_take_any_layout(u, got, facts, depth + 1):
                return False
        elif not same_layout(u.meta.get("val"), got):
            return False
    return True


def _match_copy(node: fx.Node, facts: Facts) -> Optional[fx.Node]:
    src = _copied(node, facts.gm)
    if src is None or node in facts.outputs or node in facts.unsafe or src in facts.unsafe:
        return None
    if facts.constant(src) and not same_layout(tensor_val(node), tensor_val(src)):
        return None  # a constant's copy is made once (constant_fold): it costs nothing, its layout may pay
    if same_layout(tensor_val(node), tensor_val(src)):
        return src  # a copy made redundant here (by attention_output_layout, say)
    return src if _readers_take_any_layout(node, tensor_val(src), facts) else None


def _read_original(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> None:
    users = list(node.users)
    node.replace_all_uses_with(src)
    for u in users:  # checked: views still view, other readers keep their result's layout
        u.meta["val"] = fake_value(u)
    propagate_meta(gm.graph, users)


def _reader_perm(node: fx.Node) -> Optional[List[int]]:
    """The dim order ``node`` (a transpose or permute of a 4-D value) reads its input in."""
    if is_op(node, aten.transpose):
        perm = [0, 1, 2, 3]
        a, b = (d % 4 for d in node.args[1:3])
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if is_op(node, aten.permute):
        return [d % 4 for d in node.args[1]]
    return None


def _match_attention_layout(node: fx.Node, facts: Facts) -> Optional[List[int]]:
    """An attention op every reader of which permutes its output the same way, e.g. HF's
    ``transpose(1, 2)`` before flattening the heads, nn.MultiheadAttention's ``permute(2, 0, 1,
    3)``: the op writes that order directly, and the reader's ``.contiguous()`` copy goes."""
    if not is_attention(node) or node.kwargs or (len(node.args) > 7 and node.args[7] is not None):
        return None
    if node in facts.outputs or node in facts.unsafe or not node.users:
        return None
    perms = {tuple(p) if p is not None else None for p in map(_reader_perm, node.users)}
    if len(perms) != 1 or None in perms:
        return None
    (perm,) = perms
    return list(perm) if list(perm) != [0, 1, 2, 3] else None


def _write_in_reader_order(gm: fx.GraphModule, node: fx.Node, perm: List[int]) -> None:
    args = list(node.args) + [False, None][len(node.args) - 6:]  # dead_rows_nan, out_perm defaults
    args[7] = perm
    node.args = tuple(args)
    node.meta["val"] = fake_value(node)
    propagate_meta(gm.graph, [node])


def _match_copy_through_views(node: fx.Node, facts: Facts) -> Optional[Dict[fx.Node, tuple]]:
    """A contiguous copy read only through chains of views whose final views are each one
    strided view of the original (``strided_views.compose_view``), by readers that take any
    strides: {final view: (shape, stride, offset) on the original}. The plain rule refuses
    these because an intermediate view cannot view the original (nn.MultiheadAttention's
    packed q/k/v: ``[3, L, B, E]`` copied, then each viewed ``[L, B*H, D]``)."""
    src = _copied(node, facts.gm)
    copy, orig = tensor_val(node), tensor_val(src)
    if src is None or node in facts.outputs or node in facts.unsafe or src in facts.unsafe or \
            copy is None or orig is None or not copy.is_contiguous() or copy.storage_offset() != 0:
        return None
    finals: Dict[fx.Node, tuple] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        views = [u for u in n.users if u.op == "call_function" and is_view(u)]
        if n is node and len(views) != len(n.users):
            return None  # a direct reader: the plain rule's case (which refused it)
        if views and len(views) != len(n.users):
            return None  # mixed readers of one view: keep it simple, keep the copy
        for u in n.users:
            if u in facts.unsafe or u in facts.outputs:
                return None
        if views:
            stack.extend(views)
            continue
        v = tensor_val(n)
        composed = compose_view(orig.shape, orig.stride(), orig.storage_offset(), v.shape, v.stride(),
                                v.storage_offset()) if v is not None else None
        if composed is None:
            return None
        new = orig.as_strided(v.shape, *composed)
        for u in n.users:  # the readers take strides and produce what they produced before
            if u.op != "call_function" or not takes_any_layout(u):
                return None
            try:
                if not same_layout(u.meta.get("val"), fake_value(u, {n: new})):
                    return None
            except Exception:
                return None
        finals[n] = (list(v.shape), list(composed[0]), composed[1])
    return finals or None


def _read_through_strided_views(gm: fx.GraphModule, node: fx.Node, finals: Dict[fx.Node, tuple]) -> None:
    src = _copied(node, gm)
    for view, (shape, stride, offset) in finals.items():
        with gm.graph.inserting_before(view):
            strided = call(gm.graph, aten.as_strided.default, (src, shape, stride, offset))
        users = list(view.users)
        view.replace_all_uses_with(strided)
        for u in users:
            u.meta["val"] = fake_value(u)
        propagate_meta(gm.graph, users)
    erase_if_dead(gm.graph, list(finals))  # the views, then the copy, now read by nobody


def _match_slot_write(node: fx.Node, facts: Facts) -> Optional[int]:
    """``index_copy(x, dim, index, src)`` writing one slice (a static KV cache's update at the
    decode position, HF ``StaticCache``): its dim, else None."""
    if not is_op(node, aten.index_copy) or node in facts.unsafe or len(node.args) != 4:
        return None
    x, dim, index, src = node.args
    xv, iv, sv = tensor_val(x), tensor_val(index), tensor_val(src)
    if xv is None or iv is None or sv is None or not isinstance(dim, int) or iv.shape != (1,):
        return None
    dim %= xv.dim()
    if sv.dim() != xv.dim() or sv.shape[dim] != 1 or sv.dtype != xv.dtype:
        return None
    return dim


def _match_slot_put(node: fx.Node, facts: Facts) -> Optional[int]:
    """``index_put(x, [None, ..., index], src)`` (no accumulate) writing one slice by a one-element
    index along one dim (transformers' sliding-window cache once full: ``roll`` then
    ``new_keys[:, :, tensor([-1])] = key_states``, Gemma 2/3, Mistral): its dim, else None."""
    if not is_op(node, aten.index_put) or node in facts.unsafe or len(node.args) < 3:
        return None
    if (node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)) is not False:
        return None
    x, indices, src = node.args[:3]
    given = [i for i, t in enumerate(indices) if t is not None]
    xv, sv = tensor_val(x), tensor_val(src)
    if len(given) != 1 or xv is None or sv is None or sv.dtype != xv.dtype:
        return None
    dim, iv = given[0], tensor_val(indices[given[0]])
    if iv is None or iv.shape != (1,) or iv.dtype not in (torch.int32, torch.int64) or dim >= xv.dim():
        return None
    written = list(xv.shape)
    written[dim] = 1
    try:
        fits = list(torch.broadcast_shapes(tuple(sv.shape), tuple(written))) == written
    except RuntimeError:
        return None
    return dim if fits else None


def _put_into_slot(gm: fx.GraphModule, node: fx.Node, dim: int) -> None:
    # the index counts from the end when negative, as index_put's does
    x, indices, src = node.args[:3]
    with gm.graph.inserting_before(node):
        index = call(gm.graph, aten.remainder.Scalar, (indices[dim], tensor_val(x).shape[dim]))
    _select_into_slot(gm, node, dim, (x, dim, index, src))


def _select_into_slot(gm: fx.GraphModule, node: fx.Node, dim: int, operands=None) -> None:
    # where(arange(n) == index, src, x) along dim: element-wise, so the update runs in (and
    # fuses into) our generated kernels; index_copy ran in ATen, one launch per cache per layer.
    # An index out of range writes nothing here (eager raises).
    x, _, index, src = operands or node.args
    xv = tensor_val(x)
    shape = [1] * xv.dim()
    shape[dim] = xv.shape[dim]
    with gm.graph.inserting_before(node):
        slots = gm.graph.call_function(aten.arange.default, (xv.shape[dim],),
                                       {"dtype": tensor_val(index).dtype, "device": xv.device})
        with torch._guards.detect_fake_mode([xv]) or contextlib.nullcontext():
            slots.meta["val"] = torch.arange(xv.shape[dim], dtype=tensor_val(index).dtype, device=xv.device)
        hit = call(gm.graph, aten.eq.Tensor, (call(gm.graph, aten.view.default, (slots, shape)),
                                              call(gm.graph, aten.view.default, (index, [1] * xv.dim()))))
        select = call(gm.graph, aten.where.self, (hit, src, x))
    node.replace_all_uses_with(select)
    gm.graph.erase_node(node)


def _match_filled_by_slices(node: fx.Node, facts: Facts) -> Optional[tuple]:
    """(dim, [(start, end, value), ...] in order) of a chain of ``slice_scatter`` s along one dim
    whose regions tile the whole dim (DeepSeek-V3's keys: ``new_empty`` then ``k[..., :a].copy_(x)``
    and ``k[..., a:].copy_(y)``): the base's values are never read, the result is a cat."""
    if not is_op(node, aten.slice_scatter) or node in facts.unsafe:
        return None
    out = tensor_val(node)
    if out is None or out.dim() == 0:
        return None
    pieces, dim, cur = [], None, node
    while is_op(cur, aten.slice_scatter) and len(pieces) <= 16:
        args = list(cur.args) + [None] * (6 - len(cur.args))
        d = cur.kwargs.get("dim", args[2] if args[2] is not None else 0) % out.dim()
        start, end = cur.kwargs.get("start", args[3]), cur.kwargs.get("end", args[4])
        if cur.kwargs.get("step", args[5] if args[5] is not None else 1) != 1 or (dim is not None and d != dim) \
                or cur in facts.unsafe:
            break
        dim, size = d, out.shape[d]
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None else (end + size if end < 0 else end)
        pieces.append((max(0, min(start, size)), max(0, min(end, size)), cur.args[1]))
        cur = cur.args[0]
    pieces = sorted(p for p in pieces if p[1] > p[0])
    if not pieces or pieces[0][0] != 0 or pieces[-1][1] != out.shape[dim] or \
            any(a[1] != b[0] for a, b in zip(pieces, pieces[1:])):
        return None
    return dim, pieces


def _filled_as_cat(gm: fx.GraphModule, node: fx.Node, found: tuple) -> None:
    dim, pieces = found
    out, graph = tensor_val(node), gm.graph
    parts = []
    with graph.inserting_before(node):
        for start, end, value in pieces:
            region = list(out.shape)
            region[dim] = end - start
            if is_op(value, aten.copy) and len(value.args) >= 2:  # copy(dst, src): src as dst's shape and dtype
                value = value.args[1]  # (read without dst, so the chain of scatters dies)
            if list(shape(value)) != region:
                value = call(graph, aten.expand.default, (value, region))
            if tensor_val(value).dtype != out.dtype:
                value = call(graph, aten._to_copy.default, (value,), {"dtype": out.dtype})
            parts.append(value)
        y = call(graph, aten.cat.default, (parts, dim)) if len(parts) > 1 else \
            call(graph, aten.clone.default, (parts[0],), {"memory_format": torch.contiguous_format})
    node.replace_all_uses_with(y)


COPY_RULES = (
    Rule("slot_write_as_select", "an index_copy of one slice (a static KV cache's update) is a "
         "where(arange == index, src, x): element-wise, in our kernels", _match_slot_write, _select_into_slot),
    Rule("slot_put_as_select", "an index_put of one slice by a one-element index (a full sliding-window "
         "cache's update) is a where(arange == index mod size, src, x), as slot_write_as_select",
         _match_slot_put, _put_into_slot),
    Rule("slices_filling_as_cat", "slice_scatters along one dim whose regions tile it (a new_empty filled by "
         "slice copies: DeepSeek-V3's keys) are a cat of the written values", _match_filled_by_slices, _filled_as_cat),
    Rule("attention_output_layout", "an attention op whose readers all permute its output the same "
         "way writes it in that order", _match_attention_layout, _write_in_reader_order),
    Rule("copy_into_any_layout", "a contiguous copy (clone, same-dtype cast, cat of one non-empty "
         "operand) whose readers take any strides: they read the original", _match_copy, _read_original),
    Rule("copy_through_strided_views", "a contiguous copy read through views that end as one strided "
         "view of the original each: readers take that view of the original", _match_copy_through_views,
         _read_through_strided_views),
)
