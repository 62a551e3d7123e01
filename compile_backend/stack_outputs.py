"""Stacks written in place: ``stack`` of kernel outputs becomes one buffer the kernels write into.

A decode step returns its new KV caches stacked (``torch.stack`` of one cache per layer); each
layer's cache is also read where it is made (attention). Stacked after the fact, every cache is
written twice and read once more (22 layers x 2 x 1 MB at the base decoder's 2048 slots), and
the stack is an ATen launch. Instead the stack's output is allocated before the first of its
pieces is made and each piece's kernel writes its slice of it (``out=``, the way the memory plan
hands kernels arena views): the stack costs nothing and every later reader reads the slice.

Conditions: a group ATen runs holding one ``stack`` along dim 0 (each slice a contiguous piece);
every piece an output of one of our kernels that writes into a given tensor
(``Kernel.supports_out``) with the slice's layout, each piece once; the kernel's outputs read only
through getitems; no piece is itself returned (it would alias the stack, which eager copies).
Anything else stays an ATen stack. Runs on the engine graph after kernels are
chosen, before ATen groups are inlined and before the memory plan (which then treats the pieces
as views of the stack, a value the caller owns).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.fx as fx

from .engine import GroupCall
from .memory_plan import getitem_index

aten = torch.ops.aten


def write_stacks_in_place(graph: fx.Graph) -> List[GroupCall]:
    """Rewrite every eligible stack group (an ATen group holding one ``stack``); returns their
    calls, which no longer run."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    done: List[GroupCall] = []
    for node in list(graph.nodes):
        found = _stack_of(node)
        if found is None:
            continue
        pieces, result = found
        val = result.meta["val"]
        first = min((call for call, _ in pieces), key=order.__getitem__)
        with graph.inserting_before(first):
            buf = graph.call_function(torch.empty, (tuple(val.shape),), {"dtype": val.dtype, "device": val.device})
        buf.meta.update(result.meta)
        for i, (call, k) in enumerate(pieces):
            call.target.out_views[k] = (buf, i)
        result.replace_all_uses_with(buf)
        graph.erase_node(result)
        graph.erase_node(node)
        order = {n: i for i, n in enumerate(graph.nodes)}
        done.append(node.target)
    return done


def _stack_of(node: fx.Node):
    """(pieces as [(group-call node, output index)], the call's one getitem) for a call of an ATen
    group holding one eligible ``stack``; else None."""
    call = node.target
    if node.op != "call_function" or not isinstance(call, GroupCall) or call.kernel is None \
            or call.kernel.impl != "aten" or call.group.ops != ("aten.stack",):
        return None
    stack = next(n for n in call.group.gm.graph.nodes if n.op == "call_function")
    users = list(node.users)
    if len(users) != 1 or getitem_index(users[0]) != 0 or not isinstance(users[0].meta.get("val"), torch.Tensor):
        return None
    arg_of = dict(zip(call.group.placeholders, node.args))
    tensors = stack.args[0]
    dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    val = users[0].meta["val"]
    if not val.is_contiguous() or dim % val.dim() != 0 or not tensors or not all(t in arg_of for t in tensors):
        return None
    out: List[Tuple[fx.Node, int]] = []
    for t in (arg_of[t] for t in tensors):
        k = getitem_index(t) if isinstance(t, fx.Node) else None
        if k is None:
            return None
        producer = t.args[0]
        kernel = producer.target.kernel
        if kernel is None or not kernel.supports_out or k >= len(kernel.out_layouts) or kernel.out_layouts[k] is None:
            return None
        shape, stride, dtype = kernel.out_layouts[k]
        want = tuple(val.shape[1:])
        if tuple(shape) != want or dtype != val.dtype or tuple(stride) != _contiguous(want):
            return None
        if (producer, k) in out or k in producer.target.out_views or \
                any(getitem_index(u) is None for u in producer.users):
            return None
        if any(u.op == "output" for u in t.users):
            return None  # a piece the graph also returns would alias the stack (eager copies it)
        out.append((producer, k))
    return out, users[0]


def _contiguous(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


__all__ = ["write_stacks_in_place"]
