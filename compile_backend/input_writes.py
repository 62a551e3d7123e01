"""Inputs written in place: ``copy_(input, value)`` becomes the kernel that makes ``value``
writing straight into the caller's tensor.

An inference graph that updates one of its inputs (HF ``StaticCache``: ``index_copy_`` of the
new key and value into every layer's cache) keeps the write as ``copy_(input, new)`` at its end
(capture keeps input mutations in the graph). Run as such, each step makes a whole new cache in
the arena and then copies it over the input: at the 1.1B decoder's 2048 slots, 44 x 1 MB written
twice and read twice a step, and 44 more launches. Instead the kernel computing ``new`` gets the
input as its ``out=`` tensor (the way the memory plan hands kernels arena views): the copy is
gone and every later reader of ``new`` reads the input, which now holds it.

Conditions (otherwise the ``copy_`` stays an ATen call, still correct):
- the source is an output of one of our kernels that writes into a given tensor with exactly
  the input's layout (``Kernel.supports_out``), not already written elsewhere, not returned
  (a returned value aliasing the input would change with the next call's write);
- every other reader of the input (or of a view of it) runs before that kernel, and nothing else
  writes the input;
- the kernel itself reads the input only element for element: a pointwise kernel whose every use
  of it is an element-wise op of the input's shape (each element is read by the program that
  then writes it; never a broadcast, a shifted ``cat`` piece or a reduction).
Runs on the engine graph after kernels are chosen, beside ``stack_outputs``.

Where ATen makes the new value with an op that has an in-place form writing only part of its
input (``index_copy`` of several slots: HF ``StaticCache``'s prefill), the op runs in place on the
input instead (``index_copy_``: the prompt's slots written, not a whole new cache made and then
copied over the old one), under the same conditions about the input's other readers.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.fx as fx

from .engine import GroupCall
from .fx_passes.rules import aliases_input, is_mutating
from .memory_plan import getitem_index

aten = torch.ops.aten


#: functional ATen ops whose in-place form writes only part of ``self`` (argument 0)
IN_PLACE_FORMS = {aten.index_copy.default: aten.index_copy_.default}


def write_inputs_in_place(graph: fx.Graph) -> List[Tuple[GroupCall, Optional[int], Optional[fx.Node]]]:
    """Rewrite every eligible ``copy_`` of a kernel output into an input, and every ``copy_`` of
    an ATen ``index_copy`` of the input itself into ``index_copy_``. Returns per rewrite (the
    group call, the output index it writes into the input, None) or, for an ATen op now run in
    place, (the group call it replaced, None, the ``op_`` node)."""
    done: List[Tuple[GroupCall, Optional[int], Optional[fx.Node]]] = []
    for node in list(graph.nodes):
        found = _writer_of(node, graph)
        if found is not None:
            producer, k = found
            producer.target.out_views[k] = (node.args[0], None)
            graph.erase_node(node)
            done.append((producer.target, k, None))
        else:
            replaced = _aten_in_place(node, graph)
            if replaced is not None:
                call, written = replaced
                done.append((call, None, written))
    return done


def _copy_into_input(copy: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, int]]:
    """(input, source, output index of the source's group call) of ``copy_(input, getitem(...))``
    at the graph's end (nothing reads it), else None."""
    if copy.op != "call_function" or copy.target is not aten.copy_.default or copy.users or len(copy.args) != 2:
        return None
    dst, src = copy.args
    k = getitem_index(src) if isinstance(src, fx.Node) else None
    if not isinstance(dst, fx.Node) or dst.op != "placeholder" or k is None:  # k: of a group call's outputs
        return None
    return dst, src, k


def _aten_in_place(copy: fx.Node, graph: fx.Graph) -> Optional[Tuple[GroupCall, fx.Node]]:
    """``copy_(x, getitem(aten_group(op(x, ...))))`` -> ``op_(x, ...)`` (``IN_PLACE_FORMS``), the
    readers of the new value reading ``x``; (the group call replaced, the new node), or None."""
    parts = _copy_into_input(copy)
    if parts is None or parts[2] != 0:
        return None
    dst, src, _ = parts
    call_node = src.args[0]
    call = call_node.target
    if not isinstance(call, GroupCall) or call.kernel is None or call.kernel.impl != "aten" or len(call_node.users) != 1:
        return None
    ops = [n for n in call.group.gm.graph.nodes if n.op == "call_function"]
    if len(ops) != 1 or ops[0].target not in IN_PLACE_FORMS:
        return None
    op = ops[0]
    placeholders = call.group.placeholders
    env = dict(zip(placeholders, call_node.args))
    if not op.args or op.args[0] not in env or env[op.args[0]] is not dst or \
            sum(a is dst for a in call_node.args) != 1 or any(u.op == "output" for u in src.users):
        return None
    val = dst.meta.get("val")
    if not isinstance(val, torch.Tensor) or tuple(val.shape) != tuple(op.meta["val"].shape):
        return None
    order = {n: i for i, n in enumerate(graph.nodes)}
    for reader, through_view in _readers(dst):
        if reader in (copy, call_node) and not through_view:
            continue
        if reader is call_node or is_mutating(reader) or order[reader] > order[call_node]:
            return None
    args = fx.node.map_arg(op.args, lambda a: env[a])
    kwargs = fx.node.map_arg(op.kwargs, lambda a: env[a])
    with graph.inserting_before(call_node):
        written = graph.call_function(IN_PLACE_FORMS[op.target], args, kwargs)
    written.meta.update(src.meta)
    src.replace_all_uses_with(written)
    graph.erase_node(copy)
    graph.erase_node(src)
    graph.erase_node(call_node)
    return call, written


def _writer_of(copy: fx.Node, graph: fx.Graph) -> Optional[Tuple[fx.Node, int]]:
    """(group-call node, output index) that may write ``copy``'s source into its destination."""
    parts = _copy_into_input(copy)
    if parts is None:
        return None
    dst, src, k = parts
    producer = src.args[0]
    call = producer.target
    kernel = call.kernel
    dst_val = dst.meta.get("val")
    if kernel is None or kernel.impl == "aten" or not kernel.supports_out or k in call.out_views \
            or k >= len(kernel.out_layouts) or kernel.out_layouts[k] is None or not isinstance(dst_val, torch.Tensor):
        return None
    shape, stride, dtype = kernel.out_layouts[k]
    if (tuple(shape), tuple(stride), dtype) != (tuple(dst_val.shape), tuple(dst_val.stride()), dst_val.dtype):
        return None
    if any(u.op == "output" for u in src.users) or any(getitem_index(u) is None for u in producer.users):
        return None
    order = {n: i for i, n in enumerate(graph.nodes)}
    for reader, through_view in _readers(dst):
        if reader is copy or (reader is producer and not through_view):
            continue
        if reader is producer or is_mutating(reader) or order[reader] > order[producer]:
            return None  # a view read where it writes, another write, or an old value read late
    if not _reads_element_for_element(producer, dst):
        return None
    return producer, k


def _readers(node: fx.Node) -> List[Tuple[fx.Node, bool]]:
    """Every node reading ``node``'s storage, each with whether it reads it through a view."""
    out, todo = [], [(node, False)]
    while todo:
        current, through_view = todo.pop()
        for user in current.users:
            out.append((user, through_view))
            if aliases_input(user) and user.args and user.args[0] is current:
                todo.append((user, True))
    return out


def _reads_element_for_element(producer: fx.Node, dst: fx.Node) -> bool:
    """The kernel reads ``dst`` (if at all) only where it writes the same element."""
    positions = [i for i, a in enumerate(producer.args) if a is dst]
    if not positions:
        return True
    call = producer.target
    if call.group.kind != "pointwise" or len(positions) != 1:
        return False
    placeholder = call.group.placeholders[positions[0]]
    shape = tuple(placeholder.meta["val"].shape)
    for user in placeholder.users:
        val = user.meta.get("val")
        t = user.target
        if user.op != "call_function" or not isinstance(t, torch._ops.OpOverload) \
                or torch.Tag.pointwise not in t.tags or not isinstance(val, torch.Tensor) or tuple(val.shape) != shape:
            return False
    return True


__all__ = ["write_inputs_in_place"]
