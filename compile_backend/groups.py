"""Group surgery: the partitioned graph rewritten so that each kernel group is one call.

``fuse_groups`` turns the partitioner's groups into a new graph where each group is a single
``GroupCall`` node (placed where its last node was) followed by one getitem per output, and
extracts each group as a standalone ATen graph for the kernel builders (``extract_group``).
After kernels are chosen, ``inline_aten_groups`` puts the groups that ATen runs back into the
graph as plain ATen calls, so they cost no call indirection.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch.fx as fx

from .engine import GroupCall
from .kernels.base import KernelGroup, canonical_names


def fuse_groups(gm: fx.GraphModule, specs) -> Tuple[fx.Graph, List[GroupCall]]:
    """A new graph where each group is one call (placed at its last node) plus getitems."""
    group_of: Dict[fx.Node, int] = {}
    for i, spec in enumerate(specs):
        for n in spec.nodes:
            group_of[n] = i
    last = {i: spec.nodes[-1] for i, spec in enumerate(specs)}
    calls = [GroupCall(i, extract_group(gm, spec, f"g{i}")) for i, spec in enumerate(specs)]
    new = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        i = group_of.get(node)
        if i is None:
            env[node] = new.node_copy(node, lambda n: env[n])
            continue
        if node is not last[i]:
            continue
        spec, call = specs[i], calls[i]
        inputs = _group_inputs(spec.nodes)
        outputs = _group_outputs(spec.nodes)
        call_node = new.call_function(call, tuple(env[x] for x in inputs))
        for k, out in enumerate(outputs):
            env[out] = new.call_function(getitem, (call_node, k))
            env[out].meta.update(out.meta)
    return new, calls


def extract_group(gm: fx.GraphModule, spec, name: str) -> KernelGroup:
    sub = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for x in _group_inputs(spec.nodes):
        env[x] = sub.placeholder(x.name)
        env[x].meta.update(x.meta)
    for n in spec.nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in _group_outputs(spec.nodes)))
    canonical_names(sub)
    # graph constants feeding the group: a kernel may derive a value from one once per version
    constants = frozenset(env[x].name for x in _group_inputs(spec.nodes) if x.op == "get_attr")
    sub_gm = fx.GraphModule(gm, sub)
    anchor = env[spec.anchor].name if spec.anchor is not None else None
    return KernelGroup(kind=spec.kind, gm=sub_gm, anchor=anchor, name=name, constants=constants)


def _group_inputs(nodes: List[fx.Node]) -> List[fx.Node]:
    inside = set(nodes)
    seen: Dict[fx.Node, None] = {}
    for n in nodes:
        for x in n.all_input_nodes:
            if x not in inside:
                seen.setdefault(x)
    return list(seen)


def _group_outputs(nodes: List[fx.Node]) -> List[fx.Node]:
    inside = set(nodes)
    return [n for n in nodes if any(u not in inside for u in n.users)]


def getitem(values, index):
    """A group call's output ``index`` (a named function, so engine sources read well)."""
    return values[index]




def inline_aten_groups(graph: fx.Graph, calls: List[GroupCall]) -> None:
    """Groups that run through ATen go back into the graph as plain ATen calls (no call overhead)."""
    for node in list(graph.nodes):
        call = node.target
        if not isinstance(call, GroupCall) or call.kernel is None or call.kernel.impl != "aten":
            continue
        env: Dict[fx.Node, fx.Node] = {}
        sub_inputs = iter(node.args)
        outs: Tuple[fx.Node, ...] = ()
        with graph.inserting_before(node):
            for sn in call.group.gm.graph.nodes:
                if sn.op == "placeholder":
                    env[sn] = next(sub_inputs)
                elif sn.op == "output":
                    outs = tuple(env[o] for o in sn.args[0])
                else:
                    env[sn] = graph.node_copy(sn, lambda a: env[a])
        for user in list(node.users):
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)


__all__ = ["fuse_groups", "extract_group", "inline_aten_groups", "getitem"]
