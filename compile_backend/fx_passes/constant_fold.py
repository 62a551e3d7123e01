"""Freezing and constant folding, with a re-runnable constant program for weight refit.

``freeze`` turns the frozen placeholders (model parameters and buffers, in inference) into
``get_attr`` constants. ``constant_fold`` then evaluates every node that depends only on
constants (weight transposes, casts, BatchNorm-folded weights, concatenated QKV weights) once,
stores the results as new constants ``_folded_<i>`` and records the computation as a
:class:`ConstantProgram`. When a frozen weight changes, the engine re-runs that program from the
new weights (refit) instead of recompiling; folded constants own their storage, so a refit
writes into them in place and never into the user's tensors.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from ..kernels.base import is_fill  # (imports neither Triton nor any kernel module)
from .base import PassContext
from .rules import written_placeholders

FROZEN_PREFIX = "_frozen_"
FOLDED_PREFIX = "_folded_"
_PROGRAM = "constant_program"
MAX_GROWTH_BYTES = 1 << 20  # a folded value may hold at most this much more than its sources
_NEVER_FOLD = (torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like)
#: ops whose kernels read an operand through any strides (a GEMM's transposed weight): a view of
#: a constant feeding only these is left a view rather than stored as a copy
_READS_STRIDES = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm)


class ConstantProgram:
    """The folded part of a graph: recomputes every folded constant from the frozen weights."""

    def __init__(self, gm: fx.GraphModule, inputs: List[str], outputs: List[str]):
        self.gm, self.inputs, self.outputs = gm, inputs, outputs

    def run(self, constants: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        with torch.no_grad():
            values = self.gm(*[constants[name] for name in self.inputs])
        return dict(zip(self.outputs, values))


def freeze(gm: fx.GraphModule, frozen: Sequence[bool], args: Sequence[Any],
           names: Optional[Sequence[Optional[str]]] = None) -> Dict[int, str]:
    """Replace frozen placeholders by get_attr constants; returns {arg index: attribute name}.
    ``names`` (the parameters' FQNs, when known) go to each constant's ``meta['param_name']``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mutated = set(written_placeholders(gm.graph))
    bound: Dict[int, str] = {}
    for i, (node, is_frozen) in enumerate(zip(placeholders, frozen)):
        if not is_frozen or not isinstance(args[i], torch.Tensor) or node in mutated:
            continue
        name = f"{FROZEN_PREFIX}{i}"
        gm.register_buffer(name, args[i].detach())  # detach shares storage and version counter
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        if names is not None and i < len(names) and names[i]:
            attr.meta["param_name"] = names[i]
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
        bound[i] = name
    gm.recompile()
    return bound


def constant_fold(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Evaluate nodes computed only from constants once; returns the number of folded nodes.

    A value much larger than the constants it comes from (an embedding looked up with a constant
    index buffer, an expand made real: HF BERT's token-type embeddings give a batch x seq x hidden
    activation) is not folded: it stays a node computed from folded inputs, and the rest folds.
    Nor is a plain view of a constant larger than that allowance that only GEMMs read (it would
    be stored as a copy: a linear's transposed weight); other views fold, so every other kernel
    reads a plain constant."""
    if ctx.training:
        return 0
    graph = gm.graph
    excluded: set = set()
    while True:
        const: Dict[fx.Node, bool] = {}
        for node in graph.nodes:
            const[node] = node.op == "get_attr" or (
                node.op == "call_function" and node not in excluded and _foldable(node, const))
        folded = [n for n in graph.nodes if n.op == "call_function" and const[n]]
        if not folded:
            return 0
        boundary = [n for n in folded if any(not const.get(u, False) or u.op == "output" for u in n.users)]
        boundary = [n for n in boundary if not _is_scalar_val(n)]
        # a fill read as it is stays a node: a kernel computes it for free where a folded one is
        # a tensor in memory it would load (only what is built from fills folds)
        bare = [n for n in boundary if _fill_view(n)]
        if bare:
            excluded.update(bare)
            continue
        sources = [n for n in graph.nodes if n.op == "get_attr" and any(u in folded for u in n.users)]
        program = _extract(gm, sources, folded, boundary)
        values = program.run({s.target: _attr(gm, s.target) for s in sources})
        grown = _grown(gm, boundary, values) + [
            n for n in boundary if _view_of_constant(n) and _nbytes(values[n.name]) > MAX_GROWTH_BYTES
            and all(u.op == "call_function" and getattr(u.target, "overloadpacket", None) in _READS_STRIDES
                    for u in n.users)]
        if not grown:
            break
        excluded.update(grown)
    source_ptrs = {_attr(gm, s.target).untyped_storage().data_ptr() for s in sources
                   if isinstance(_attr(gm, s.target), torch.Tensor)}
    start = len(gm.meta.get(_PROGRAM, []))
    names = []
    for j, node in enumerate(boundary):
        name = f"{FOLDED_PREFIX}{start}_{j}"
        value = values[node.name]
        _set_constant(gm, name, _owned(value, source_ptrs))
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        names.append(name)
    program.outputs = names
    gm.meta.setdefault(_PROGRAM, []).append(program)
    graph.eliminate_dead_code()
    gm.recompile()
    return len(folded)


def constant_programs(gm: fx.GraphModule) -> List[ConstantProgram]:
    return list(gm.meta.get(_PROGRAM, []))


def _foldable(node: fx.Node, const: Dict[fx.Node, bool]) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return False
        if target.overloadpacket in _NEVER_FOLD:
            return False
    elif target is not operator.getitem:
        return False
    return _shape_only_fill(node) or all(const.get(i, False) for i in node.all_input_nodes)


def _shape_only_fill(node: fx.Node) -> bool:
    """A fill (``new_zeros(x, size)``, ``zeros_like(x)``...) of a static shape: its value is no
    function of ``x``'s elements, so it is a constant whatever ``x`` is (Swin's shifted-window
    mask is built on ``x.new_zeros`` by ~20 slice writes a block: all of it folds once)."""
    val = node.meta.get("val")
    return (is_fill(node) and bool(node.all_input_nodes) and isinstance(val, torch.Tensor)
            and val.layout == torch.strided and all(isinstance(s, int) for s in val.shape))


def _fill_view(node: fx.Node) -> bool:
    """``node`` is a fill, or views of one."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.is_view \
            and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node.op == "call_function" and is_fill(node)


def _fill_value(node: fx.Node) -> Any:
    """The value a shape-only fill writes (its op and arguments; see :func:`_shape_only_fill`)."""
    name = node.target.overloadpacket.__name__
    if name in ("zeros_like", "new_zeros"):
        return 0
    if name in ("ones_like", "new_ones"):
        return 1
    index, key = (1, "fill_value") if name == "full_like" else (2, "fill_value")
    return node.kwargs[key] if key in node.kwargs else node.args[index]


def _is_scalar_val(node: fx.Node) -> bool:
    return not isinstance(node.meta.get("val"), torch.Tensor)


def _extract(gm, sources, folded, boundary) -> ConstantProgram:
    sub = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for s in sources:
        env[s] = sub.placeholder(s.target.replace(".", "_"))
    for node in folded:
        if _shape_only_fill(node):  # its tensor argument is not in the program: the same fill, same strides
            val = node.meta["val"]
            blank = sub.call_function(torch.ops.aten.empty_strided.default, (list(val.shape), list(val.stride())),
                                      {"dtype": val.dtype, "device": val.device})
            env[node] = sub.call_function(torch.ops.aten.fill.Scalar, (blank, _fill_value(node)))
        else:
            env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[n] for n in boundary))
    program_gm = fx.GraphModule(gm, sub)
    return ConstantProgram(program_gm, [s.target for s in sources], [n.name for n in boundary])


def _set_constant(gm: fx.GraphModule, name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        gm.register_buffer(name, value)
    else:
        setattr(gm, name, value)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _owned(value: Any, source_ptrs: set) -> Any:
    """Folded constants own their memory so a refit can update them in place."""
    if not isinstance(value, torch.Tensor):
        return value
    if value._base is not None or value.untyped_storage().data_ptr() in source_ptrs:
        return value.clone()
    return value


def _grown(gm: fx.GraphModule, boundary: List[fx.Node], values: Dict[str, Any]) -> List[fx.Node]:
    """Boundary nodes whose folded value would hold more than ``MAX_GROWTH_BYTES`` beyond the
    constants it is computed from (folding them trades a cheap op for memory)."""
    grown = []
    for node in boundary:
        value = values[node.name]
        if not isinstance(value, torch.Tensor):
            continue
        in_bytes = sum(_nbytes(_attr(gm, a.target)) for a in _source_attrs(node))
        if _nbytes(value) > in_bytes + MAX_GROWTH_BYTES:
            grown.append(node)
    return grown


def _view_of_constant(node: fx.Node) -> bool:
    """``node`` is views all the way down to one constant (a linear's ``t(weight)``): folding
    it would store a copy of the weight beside the weight; as a node it costs nothing per call
    (and the kernels read any strides)."""
    while node.op == "call_function":
        target = node.target
        alias = isinstance(target, torch._ops.OpOverload) and (
            target.is_view or target.overloadpacket is torch.ops.aten._unsafe_view)  # not *_copy ops
        if not (alias and len(node.all_input_nodes) == 1):
            return False
        node = node.all_input_nodes[0]
    return node.op == "get_attr"


def _source_attrs(node: fx.Node) -> set:
    seen, stack, attrs = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            attrs.add(n)
        stack.extend(n.all_input_nodes)
    return attrs


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


