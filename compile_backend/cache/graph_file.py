"""FX graphs as plain JSON data, for engine-cache entries (no pickle, no source text to exec).

A graph is a list of nodes in order; each node has its op, name, target, args, kwargs and the
few ``meta`` entries the stages after the passes read (:data:`STORED_META`)::

    {"op": "call_function", "name": "mm_3", "target": "aten.mm.default",
     "args": [{"n": 12}, {"n": 7}], "kwargs": {},
     "meta": {"val": {"tensor": [[16, 768], [768, 1], 0, "float32", "cpu"]}}}

Arguments are JSON scalars (None, bool, int, str) or one-key objects: ``{"n": i}`` the value of
node ``i`` (always an earlier node), ``{"f": hex}`` a float (exact, also inf and nan),
``{"l": [...]}`` / ``{"t": [...]}`` a list / tuple, ``{"dtype": name}``, ``{"device": text}``,
``{"memory_format": name}``, ``{"layout": name}``.

Targets are read back only from a closed set: operator overloads of :data:`OP_NAMESPACES`
(resolved by name through ``torch.ops`` and checked to be an ``OpOverload``) and the Python
functions of :data:`PYTHON_TARGETS`. Everything else is refused when written
(:class:`Unstorable`, the caller re-runs the passes instead) and when read (:class:`BadGraph`):
a stored graph is untrusted input, checked field by field like the rest of an entry.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.fx as fx

GRAPH_FORMAT = 1
#: namespaces whose operator overloads a stored graph may call (ours: compile_backend.attention,
#: scaled_mm, weight_only_linear, registered when fx_passes is imported)
OP_NAMESPACES = ("aten", "prims", "compile_backend")
#: the Python callables a stored graph may call, by the name stored for them
PYTHON_TARGETS: Dict[str, Callable] = {"operator.getitem": operator.getitem}
#: the node meta the partitioner, kernel builders, memory plan and engine read (tests/cache
#: checks that no other key is read there); the rest (stack traces, module stacks) is not kept
STORED_META = ("val", "arg_index", "param_name", "fake_quant", "cb_standalone_why", "cb_approximate_tanh",
               "cb_probe_seeds")
OPS = ("placeholder", "get_attr", "call_function", "output")
MAX_NODES = 1_000_000
MAX_DEPTH = 16
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
_DTYPES = {str(d).split(".", 1)[1]: d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {str(m).split(".", 1)[1]: m for m in (
    torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)}
_LAYOUTS = {str(x).split(".", 1)[1]: x for x in (torch.strided, torch.sparse_coo)}


class Unstorable(Exception):
    """This graph holds something the format cannot store; the message says what."""


class BadGraph(Exception):
    """Stored graph data that is malformed or names something not allowed; the message says what."""


# --------------------------------------------------------------------------- writing
def dump_graph(graph: fx.Graph, meta: bool = True) -> Dict[str, Any]:
    """The graph as JSON-able data; raises Unstorable naming the first node that cannot be stored.
    ``meta`` False leaves node meta out (graphs that are only run, never partitioned or built)."""
    index: Dict[fx.Node, int] = {}
    nodes: List[Dict[str, Any]] = []
    for node in graph.nodes:
        if node.op not in OPS:
            raise Unstorable(f"node {node.name}: op {node.op!r}")
        if not _IDENT.match(node.name):
            raise Unstorable(f"node name {node.name!r}")
        if node.op == "call_function":
            target = target_name(node.target)
        elif node.op in ("placeholder", "get_attr"):
            if not isinstance(node.target, str) or not _IDENT.match(node.target):
                raise Unstorable(f"node {node.name}: target {node.target!r}")
            target = node.target
        else:
            target = None
        nodes.append({
            "op": node.op, "name": node.name, "target": target,
            "args": [_dump_value(a, index, node) for a in node.args],
            "kwargs": {str(k): _dump_value(v, index, node) for k, v in node.kwargs.items()},
            "meta": {k: _dump_value(node.meta[k], index, node, meta=True)
                     for k in STORED_META if meta and k in node.meta},
        })
        index[node] = len(index)
    return {"format": GRAPH_FORMAT, "nodes": nodes}


def target_name(target: Any) -> str:
    """The stored name of a call target; raises Unstorable unless ``resolve_target`` reads it back."""
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)  # "aten.add.Tensor"
    else:
        name = next((n for n, fn in PYTHON_TARGETS.items() if fn is target), None)
        if name is None:
            raise Unstorable(f"call target {getattr(target, '__qualname__', target)!r} is not an operator "
                             "overload or a known function")
    try:
        if resolve_target(name) is not target:
            raise Unstorable(f"call target {name} does not resolve to itself")
    except BadGraph as exc:
        raise Unstorable(str(exc)) from None
    return name


def _dump_value(value: Any, index: Mapping[fx.Node, int], node: fx.Node, meta: bool = False, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise Unstorable(f"node {node.name}: arguments nested deeper than {MAX_DEPTH}")
    if isinstance(value, fx.Node):
        if meta or value not in index:
            raise Unstorable(f"node {node.name}: refers to a node that is not before it")
        return {"n": index[value]}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"f": value.hex()}
    if isinstance(value, (list, tuple)):
        tag = "t" if isinstance(value, tuple) else "l"
        return {tag: [_dump_value(v, index, node, meta, depth + 1) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).split(".", 1)[1]}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format) and str(value).split(".", 1)[1] in _MEMORY_FORMATS:
        return {"memory_format": str(value).split(".", 1)[1]}
    if isinstance(value, torch.layout) and str(value).split(".", 1)[1] in _LAYOUTS:
        return {"layout": str(value).split(".", 1)[1]}
    if meta and isinstance(value, torch.Tensor) and value.layout == torch.strided:
        if any(not isinstance(s, int) for s in (*value.shape, *value.stride(), value.storage_offset())):
            raise Unstorable(f"node {node.name}: symbolic shape")
        # a fake (or meta) tensor stands for a value; a real one is a constant's own value
        fake = value.device.type == "meta" or isinstance(value, torch._subclasses.FakeTensor)
        return {"tensor": [list(value.shape), list(value.stride()), value.storage_offset(),
                           str(value.dtype).split(".", 1)[1], str(value.device), fake]}
    raise Unstorable(f"node {node.name}: a {type(value).__name__} in its {'meta' if meta else 'arguments'}")


# --------------------------------------------------------------------------- reading
def resolve_target(name: Any) -> Callable:
    """The callable a stored target name stands for, from the closed set only; raises BadGraph."""
    if not isinstance(name, str):
        raise BadGraph(f"call target {name!r} is not a name")
    if name in PYTHON_TARGETS:
        return PYTHON_TARGETS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES or not all(_IDENT.match(p) for p in parts) \
            or any(p.startswith("__") for p in parts):  # no dunder attributes of torch.ops objects
        raise BadGraph(f"call target {name!r} is not an allowed operator")
    try:
        overload = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise BadGraph(f"call target {name!r} is not a registered operator") from None
    if not isinstance(overload, torch._ops.OpOverload):
        raise BadGraph(f"call target {name!r} is not an operator overload")
    return overload


def load_graph(data: Any, constants: Mapping[str, Any], fake_mode: Any) -> fx.Graph:
    """An fx.Graph from ``dump_graph``'s data. ``constants``: the values get_attr nodes may name
    (a name outside it is refused); ``fake_mode``: the FakeTensorMode the ``val`` entries are
    made in. Raises BadGraph naming the first problem."""
    if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT or not isinstance(data.get("nodes"), list):
        raise BadGraph(f"not a graph of format {GRAPH_FORMAT}")
    items = data["nodes"]
    if not items or len(items) > MAX_NODES:
        raise BadGraph(f"{len(items)} nodes")
    graph = fx.Graph()
    nodes: List[fx.Node] = []
    names = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"op", "name", "target", "args", "kwargs", "meta"}:
            raise BadGraph(f"node {i}: not a node record")
        op, name, target = item["op"], item["name"], item["target"]
        if op not in OPS or not isinstance(name, str) or not _IDENT.match(name) or name in names:
            raise BadGraph(f"node {i}: bad op or name")
        if (op == "output") != (i == len(items) - 1):
            raise BadGraph("the output node must be the last node, and only it")
        names.add(name)
        if not isinstance(item["args"], list) or not isinstance(item["kwargs"], dict) or not isinstance(item["meta"], dict):
            raise BadGraph(f"node {name}: bad args, kwargs or meta")
        if not all(isinstance(k, str) and _IDENT.match(k) for k in item["kwargs"]):
            raise BadGraph(f"node {name}: a keyword that is not an identifier")  # the engine's source names them
        args = tuple(_load_value(a, nodes, name) for a in item["args"])
        kwargs = {k: _load_value(v, nodes, name) for k, v in item["kwargs"].items()}
        if op == "call_function":
            fn = resolve_target(target)
        elif op == "get_attr":
            if not isinstance(target, str) or target not in constants or args or kwargs:
                raise BadGraph(f"node {name}: get_attr of an unknown constant {target!r}")
            fn = target
        elif op == "placeholder":
            if not isinstance(target, str) or not _IDENT.match(target) or args or kwargs:
                raise BadGraph(f"node {name}: bad placeholder")
            fn = target
        else:
            if target is not None or len(args) != 1 or kwargs:
                raise BadGraph("bad output node")
            fn = "output"
        node = graph.create_node(op, fn, args, kwargs, name=name)
        if node.name != name:
            raise BadGraph(f"node {name}: name not kept")
        for key, value in item["meta"].items():
            if key not in STORED_META:
                raise BadGraph(f"node {name}: meta {key!r}")
            node.meta[key] = _load_meta(value, name, fake_mode, constants.get(target) if op == "get_attr" else None)
        # a frozen weight's get_attr keeps its placeholder's meta (freeze copies it)
        if "arg_index" in node.meta and (op not in ("placeholder", "get_attr") or not _is_int(node.meta["arg_index"])):
            raise BadGraph(f"node {name}: bad arg_index")
        nodes.append(node)
    try:
        graph.lint()
    except Exception as exc:  # fx's own consistency check, on data we did not make ourselves
        raise BadGraph(f"graph does not lint: {exc}") from None
    return graph


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_value(value: Any, nodes: Sequence[fx.Node], where: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise BadGraph(f"node {where}: arguments nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, list) or not isinstance(value, dict) or len(value) != 1:
        raise BadGraph(f"node {where}: bad argument {str(value)[:80]!r}")
    (tag, inner), = value.items()
    if tag == "n":
        if not _is_int(inner) or not 0 <= inner < len(nodes):
            raise BadGraph(f"node {where}: refers to node {inner!r}, not an earlier node")
        return nodes[inner]
    if tag == "f":
        try:
            return float.fromhex(inner)
        except (TypeError, ValueError):
            raise BadGraph(f"node {where}: bad float {inner!r}") from None
    if tag in ("l", "t") and isinstance(inner, list):
        items = [_load_value(v, nodes, where, depth + 1) for v in inner]
        return tuple(items) if tag == "t" else items
    table = {"dtype": _DTYPES, "memory_format": _MEMORY_FORMATS, "layout": _LAYOUTS}.get(tag)
    if table is not None and isinstance(inner, str) and inner in table:
        return table[inner]
    if tag == "device" and isinstance(inner, str) and re.match(r"^(cpu|cuda|meta)(:\d{1,3})?$", inner):
        return torch.device(inner)
    raise BadGraph(f"node {where}: bad argument {str(value)[:80]!r}")


def _load_meta(value: Any, where: str, fake_mode: Any, constant: Any, depth: int = 0) -> Any:
    if isinstance(value, dict) and set(value) == {"tensor"}:
        return _load_tensor(value["tensor"], where, fake_mode, constant)
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("l", "t") and depth < MAX_DEPTH:
        (tag, inner), = value.items()
        if not isinstance(inner, list):
            raise BadGraph(f"node {where}: bad meta")
        items = [_load_meta(v, where, fake_mode, None, depth + 1) for v in inner]
        return tuple(items) if tag == "t" else items
    return _load_value(value, (), where)  # scalars (arg_index, param_name, a SymInt-free int val)


def _load_tensor(fields: Any, where: str, fake_mode: Any, constant: Any) -> torch.Tensor:
    if not isinstance(fields, list) or len(fields) != 6:
        raise BadGraph(f"node {where}: bad tensor meta")
    shape, stride, offset, dtype, device, fake = fields
    if not (isinstance(shape, list) and isinstance(stride, list) and len(shape) == len(stride) <= 64
            and all(_is_int(s) and 0 <= s < 2 ** 48 for s in shape + stride) and _is_int(offset)
            and 0 <= offset < 2 ** 48 and dtype in _DTYPES and isinstance(fake, bool)):
        raise BadGraph(f"node {where}: bad tensor meta")
    device = _load_value({"device": device}, (), where)
    if not fake:  # the constant's own value, as the pass that made it recorded
        if not isinstance(constant, torch.Tensor) or list(constant.shape) != shape or \
                str(constant.dtype).split(".", 1)[1] != dtype:
            raise BadGraph(f"node {where}: meta does not match its constant")
        return constant
    extent = 1 + offset + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    with fake_mode:
        if offset == 0:
            return torch.empty_strided(shape, stride, dtype=_DTYPES[dtype], device=device)
        base = torch.empty(extent, dtype=_DTYPES[dtype], device=device)
        return base.as_strided(shape, stride, offset)


__all__ = ["GRAPH_FORMAT", "STORED_META", "OP_NAMESPACES", "PYTHON_TARGETS", "Unstorable", "BadGraph",
           "dump_graph", "load_graph", "resolve_target", "target_name"]
