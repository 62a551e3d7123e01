"""Independent pointwise kernels as one launch (horizontal fusion).

A decode step is launch-bound: at batch 1 most of its kernels touch a few KB, so each costs its
launch, not its bytes. Where two or more small pointwise groups share no data path (a decode
layer's query rotation and its key rotation with the cache updates; the step's rotary-table
gathers, masks and token embedding), the partitioner puts them in one group
(``partition_merge.merge_independent_pointwise``) and this module runs it as one kernel: each
part's generated kernel (``pointwise._source``, unchanged) becomes a device function taking its
program id, and a wrapper hands the programs out: the first part's ``cdiv(numel, BLOCK)``
programs run part 0, the next ones part 1, and so on.

Layers: :func:`split_parts` (the group's connected components, each a pointwise KernelGroup),
:func:`combo_source` (the wrapper around the parts' sources), :class:`ComboLauncher` (prepares
every part with its ``PointwiseLauncher``, launches once), built by ``pointwise.build_pointwise``
when a group has more than one component. The reference is the group's ATen graph.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.fx as fx

from . import pdl
from .base import KernelGroup, Unsupported
from .launch import load_source

#: parts a combined kernel takes (each a branch of the wrapper)
MAX_PARTS = 8


def split_parts(group: KernelGroup, joins: Optional[Callable[[KernelGroup], bool]] = None
                ) -> List[Tuple[KernelGroup, List[int], List[int]]]:
    """The group's connected components (nodes linked through values computed in the group), each
    as (a pointwise KernelGroup, its inputs' indices among the group's, its outputs' indices).
    With ``joins``, components whose values have one shape become one part where ``joins``
    accepts their union (one kernel over that shape): a decoder's per-layer token counts, 22
    ``position + 1`` writes of one element, are one part, not 22 (HF Llama 1.1B on an H100: 25
    parts, more than a combined launch takes, left the whole group to ATen)."""
    gm = group.gm
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "get_attr")]
    parent: Dict[fx.Node, fx.Node] = {n: n for n in calls}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in calls:
        for a in n.all_input_nodes:
            if a in parent and a.op == "call_function":
                parent[find(a)] = find(n)
    roots: Dict[fx.Node, List[fx.Node]] = {}
    for n in calls:
        if n.op == "call_function":
            roots.setdefault(find(n), []).append(n)
    if any(not isinstance(o, fx.Node) or o.op not in ("call_function",) for o in group.outputs):
        raise Unsupported("a combined pointwise group returns an input or a constant as is")
    components = list(roots.values())
    if joins is None:
        return [_part(group, nodes, i) for i, nodes in enumerate(components)]
    by_shape: Dict[Any, List[List[fx.Node]]] = {}
    for nodes in components:
        by_shape.setdefault(_shapes(nodes), []).append(nodes)
    merged: List[List[fx.Node]] = []
    for same in by_shape.values():
        members = set().union(*same)
        union = [n for n in gm.graph.nodes if n in members]
        if len(same) > 1 and joins(_part(group, union, 0)[0]):
            merged.append(union)
        else:
            merged += same
    merged.sort(key=lambda nodes: calls.index(nodes[0]))  # graph order, as the components were
    return [_part(group, nodes, i) for i, nodes in enumerate(merged)]


def _shapes(nodes: List[fx.Node]) -> Tuple[Any, ...]:
    """The shapes a component's values have, as a key (one shape: a candidate for joining)."""
    shapes = {tuple(n.meta["val"].shape) for n in nodes if hasattr(n.meta.get("val"), "shape")}
    return tuple(sorted(shapes)) if len(shapes) == 1 else ("several", id(nodes))


def _part(group: KernelGroup, nodes: List[fx.Node], number: int) -> Tuple[KernelGroup, List[int], List[int]]:
    gm, placeholders, outputs = group.gm, group.placeholders, group.outputs
    members = set(nodes)
    sub = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    inputs = [p for p in placeholders if any(p in n.all_input_nodes for n in nodes)]
    for p in inputs:
        env[p] = sub.placeholder(p.name)
        env[p].meta.update(p.meta)
    for n in gm.graph.nodes:  # constants the part reads, then its nodes, in graph order
        if n.op == "get_attr" and any(n in m.all_input_nodes for m in nodes):
            env[n] = sub.node_copy(n, lambda a: env[a])
        elif n in members:
            env[n] = sub.node_copy(n, lambda a: env[a])
    outs = [i for i, o in enumerate(outputs) if o in members]
    sub.output(tuple(env[outputs[i]] for i in outs))
    part = KernelGroup("pointwise", fx.GraphModule(gm, sub), name=f"{group.name}.{number}")
    return part, [placeholders.index(p) for p in inputs], outs


def combo_source(sources: Sequence[str]) -> str:
    """One module: each part's module with its kernel renamed ``part{i}(pid, ...)`` (program id
    given, not read), then ``combo_kernel`` dispatching program ranges to the parts."""
    chunks, wrapper_params, calls = [], [], []
    for i, src in enumerate(sources):
        match = re.search(r"def pointwise_kernel\((.*?)\):\n    pid = tl\.program_id\(0\)\n", src, re.S)
        if match is None:
            raise Unsupported("a part's kernel source has an unexpected shape")
        params = [p.strip() for p in match.group(1).split(",")]
        if params[-1] != "BLOCK: tl.constexpr":
            raise Unsupported("a part's kernel does not end with its BLOCK")
        chunks.append(src[:match.start()] + f"def part{i}(pid, {match.group(1)}):\n" + src[match.end():])
        names = [f"p{i}_{p}" for p in params[:-1]]
        wrapper_params += names
        calls.append((i, names))
    lines = ["", "@triton.jit",
             "def combo_kernel(" + ", ".join(wrapper_params + [f"N{i}" for i in range(len(sources))]
                                             + [f"BLOCK{i}: tl.constexpr" for i in range(len(sources))]) + "):",
             "    pid = tl.program_id(0)"]
    start = "0"
    for i, names in calls:
        test = "if" if i == 0 else "elif"
        end = f"{start} + N{i}" if i else f"N{i}"
        lines.append(f"    {test} pid < {end}:")
        lines.append(f"        part{i}({'pid' if i == 0 else f'pid - ({start})'}, {', '.join(names + [f'BLOCK{i}'])})")
        start = end
    return "\n\n".join(chunks) + "\n".join(lines) + "\n"


class ComboLauncher:
    """The parts' launchers, prepared per call and launched as one kernel."""

    def __init__(self, parts: Sequence[Tuple[Any, List[int], List[int]]], n_outputs: int, pdl: bool = False) -> None:
        self.parts, self.n_outputs = list(parts), n_outputs  # (PointwiseLauncher, input idx, output idx)
        self.pdl = pdl  # the parts' sources wait first (kernels/pdl.py): the combined kernel launches with PDL
        self._kernels: Dict[Tuple[str, ...], Any] = {}
        self.last_compiled: Any = None

    def out_layouts(self) -> Tuple[Any, ...]:
        layouts: List[Any] = [None] * self.n_outputs
        for launcher, _, outs in self.parts:
            for i, layout in zip(outs, launcher.out_layouts()):
                layouts[i] = layout
        return tuple(layouts)

    def source_for(self, ready: Sequence[Any]) -> Tuple[Any, str]:
        sources = tuple(r.launch.source for r in ready)
        kernel = self._kernels.get(sources)
        if kernel is None:
            source = combo_source(sources)
            kernel = self._kernels[sources] = (load_source(source).combo_kernel, source)
        return kernel

    def __call__(self, *inputs: Any, out: Optional[Sequence[Any]] = None) -> Tuple[Any, ...]:
        results: List[Any] = [None] * self.n_outputs
        ready = []
        for launcher, ins, outs in self.parts:
            part_out = [out[i] for i in outs] if out is not None else None
            r = launcher.prepare([inputs[i] for i in ins], part_out)
            for i, value in zip(outs, r.outputs):
                results[i] = value
            if r.programs > 0:
                ready.append((launcher, r))
        if ready:
            kernel, _ = self.source_for([r for _, r in ready])
            args = [a for _, r in ready for a in r.args]
            counts = [r.programs for _, r in ready]
            blocks = {f"BLOCK{i}": launcher.config.block for i, (launcher, _) in enumerate(ready)}
            warps = max(launcher.config.num_warps for launcher, _ in ready)
            self.last_compiled = kernel[(sum(counts),)](*args, *counts, **blocks, num_warps=warps,
                                                        **pdl.launch_kwargs(self.pdl))
        return tuple(results)


class ComboLaunches:
    """More parts than one combined kernel takes: consecutive launches of at most ``MAX_PARTS``
    parts each (still far fewer than a launch a part, and never the whole group left to ATen)."""

    def __init__(self, launches: Sequence[ComboLauncher]) -> None:
        self.launches = list(launches)

    def out_layouts(self) -> Tuple[Any, ...]:
        layouts = [launch.out_layouts() for launch in self.launches]
        return tuple(next((l[i] for l in layouts if l[i] is not None), None) for i in range(len(layouts[0])))

    def __call__(self, *inputs: Any, out: Optional[Sequence[Any]] = None) -> Tuple[Any, ...]:
        results: List[Any] = [None] * self.launches[0].n_outputs
        for launch in self.launches:
            got = launch(*inputs, out=out)
            for i in (i for _, _, outs in launch.parts for i in outs):
                results[i] = got[i]
        return tuple(results)


__all__ = ["split_parts", "combo_source", "ComboLauncher", "ComboLaunches", "MAX_PARTS"]
