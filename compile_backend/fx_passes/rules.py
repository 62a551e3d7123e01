"""Rewrite rules as data, and the graph utilities every rewrite pass shares.

A :class:`Rule` is a pattern (``match(node, ctx)`` returns what it found, or None), a
replacement (``rewrite(gm, node, found)`` edits the graph so that ``node``'s users read the new
value) and a one-line comment saying what it does. :func:`apply_rules` walks the graph until no
rule fires and returns how many times each fired ({rule name: count}). Passes keep their rules in a module-level
tuple so the list of rewrites can be read (and tested) on its own.

The helpers keep the invariants of README.md: new nodes get ``meta['val']`` from fake-tensor
propagation (:func:`call`), nodes whose storage something writes are never rewritten
(:func:`unsafe_aliases`), and rewrites that change a value's strides refresh the metadata of
everything downstream (:func:`refresh_meta`).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..kernels.base import is_view_op
from .base import PassContext

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    comment: str  # one line: what the rule does
    match: Callable[[fx.Node, "Facts"], Optional[Any]]
    rewrite: Callable[[fx.GraphModule, fx.Node, Any], None]


class Facts:
    """What rules may ask about the graph, computed lazily once per sweep."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.gm, self.ctx = gm, ctx
        self.constant = Constness()
        self._unsafe: Optional[Set[fx.Node]] = None
        self._outputs: Optional[Set[fx.Node]] = None

    @property
    def unsafe(self) -> Set[fx.Node]:
        """Nodes sharing storage with something written in place."""
        if self._unsafe is None:
            self._unsafe = unsafe_aliases(self.gm.graph)
        return self._unsafe

    @property
    def outputs(self) -> Set[fx.Node]:
        """Nodes the graph returns."""
        if self._outputs is None:
            self._outputs = users_of_outputs(self.gm.graph)
        return self._outputs


def apply_rules(gm: fx.GraphModule, ctx: PassContext, rules: Sequence[Rule],
                max_rounds: int = 8) -> Dict[str, int]:
    """Apply ``rules`` to every node until none fires (at most ``max_rounds`` sweeps); returns
    {rule name: matches}, every rule listed (0 when it never fired)."""
    counts = {rule.name: 0 for rule in rules}
    for _ in range(max_rounds):
        fired = 0
        facts = Facts(gm, ctx)
        for node in list(gm.graph.nodes):
            if _erased(node) or node.op != "call_function":
                continue
            for rule in rules:
                found = rule.match(node, facts)
                if found is None:
                    continue
                rule.rewrite(gm, node, found)
                erase_if_dead(gm.graph, [node])
                counts[rule.name] += 1
                fired += 1
                break
        if not fired:
            break
    return counts


# ----------------------------------------------------------------------------- node tests
def is_op(node: Any, *packets: Any) -> bool:
    """``node`` calls one of ``packets`` (overload packets like aten.view, or exact overloads)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    packet = t.overloadpacket if isinstance(t, torch._ops.OpOverload) else None
    return any(t is p or (packet is not None and packet is p) for p in packets)


def is_attention(node: Any) -> bool:
    """``node`` calls the fused attention op ``compile_backend::attention`` (ops.py)."""
    from .. import ops  # noqa: F401  (registers the op; light: no Triton)

    return isinstance(node, fx.Node) and node.target is torch.ops.compile_backend.attention.default


def is_view(node: fx.Node) -> bool:
    """``node``'s output re-indexes its input's values (view ops, ``_unsafe_view``, the
    functional ``*_copy`` views, getitem of a view op); see ``kernels.base.is_view_op``."""
    if node.op != "call_function":
        return False
    t = node.target
    if t is operator.getitem:
        src = node.args[0]
        return isinstance(src, fx.Node) and is_view(src)
    return is_view_op(t)


def aliases_input(node: fx.Node) -> bool:
    """``node``'s output may share storage with its first input: every view above, plus the
    views that only flip a bit (``_conj``, ``_neg_view``), which still alias."""
    t = node.target
    return is_view(node) or (node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.is_view)


def is_mutating(node: fx.Node) -> bool:
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable


def is_pure(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    t = node.target
    if t is operator.getitem:
        return True
    return isinstance(t, torch._ops.OpOverload) and not t._schema.is_mutable


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> tuple:
    v = tensor_val(node)
    return tuple(v.shape) if v is not None else ()


def single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def users_of_outputs(graph: fx.Graph) -> Set[fx.Node]:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return set(out.all_input_nodes)


class Constness:
    """Which nodes depend only on frozen constants (``get_attr``) through pure ops."""

    def __init__(self) -> None:
        self._memo: Dict[fx.Node, bool] = {}

    def __call__(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return True
        if node in self._memo:
            return self._memo[node]
        stack = [node]
        while stack:  # iterative: weight subgraphs can be deep
            n = stack.pop()
            if n in self._memo:
                continue
            if n.op == "get_attr":
                self._memo[n] = True
                continue
            if not is_pure(n) or (isinstance(n.target, torch._ops.OpOverload)
                                  and torch.Tag.nondeterministic_seeded in n.target.tags):
                self._memo[n] = False
                continue
            pending = [a for a in n.all_input_nodes if a not in self._memo]
            if pending:
                stack.append(n)
                stack.extend(pending)
            else:
                self._memo[n] = all(self._memo[a] for a in n.all_input_nodes)
        return self._memo[node]


def unsafe_aliases(graph: fx.Graph) -> Set[fx.Node]:
    """Nodes sharing storage (through views) with something a mutating op writes."""
    parent: Dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    written: List[fx.Node] = []
    for node in graph.nodes:
        if aliases_input(node) and node.args and isinstance(node.args[0], fx.Node):
            parent[find(node)] = find(node.args[0])
        if is_mutating(node):
            schema = node.target._schema
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is None or not arg.alias_info.is_write:
                    continue
                a = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if isinstance(a, fx.Node):
                    written.append(a)
            written.append(node)
    if not written:
        return set()
    bad_roots = {find(w) for w in written}
    return {n for n in graph.nodes if find(n) in bad_roots}


def written_placeholders(graph: fx.Graph) -> List[fx.Node]:
    """The graph's inputs some op writes, directly or through a view (a KV cache's update, kept
    in inference graphs as ``copy_(input, new)``): never frozen, never run on the caller's tensor
    while building, and borrowed, not copied, by a CUDA graph."""
    unsafe = unsafe_aliases(graph)
    return [n for n in graph.nodes if n.op == "placeholder" and n in unsafe]


# ----------------------------------------------------------------------------- building nodes
_fallback_mode = None


def _fake_mode(values: Iterable[Any]):
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    global _fallback_mode
    mode = detect_fake_mode(list(values))
    if mode is None:
        if _fallback_mode is None:
            _fallback_mode = FakeTensorMode(allow_non_fake_inputs=True)
        mode = _fallback_mode
    return mode


def fake_value(node: fx.Node, env: Optional[Dict[fx.Node, Any]] = None) -> Any:
    """``node``'s output computed on fake tensors from its inputs' ``meta['val']`` (or, for the
    inputs in ``env``, the values given there: what the node would give if they changed)."""
    from torch._subclasses.fake_tensor import FakeTensor

    env = env or {}
    args = fx.node.map_arg(node.args, lambda n: env[n] if n in env else n.meta["val"])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n] if n in env else n.meta["val"])
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    mode = _fake_mode(leaves)

    def to_fake(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            return mode.from_tensor(x)
        return x

    args, kwargs = pytree.tree_map(to_fake, (args, kwargs))
    with mode:
        return node.target(*args, **kwargs)


def call(graph: fx.Graph, target: Any, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """A new call_function node at the graph's insertion point, with ``meta['val']`` set."""
    node = graph.call_function(target, tuple(args), dict(kwargs or {}))
    node.meta["val"] = fake_value(node)
    return node


def to_float(graph: fx.Graph, node: fx.Node) -> fx.Node:
    v = tensor_val(node)
    if v is not None and v.dtype == torch.float32:
        return node
    return call(graph, aten._to_copy.default, (node,), {"dtype": torch.float32})


def to_dtype(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    v = tensor_val(node)
    if v is not None and v.dtype == dtype:
        return node
    return call(graph, aten._to_copy.default, (node,), {"dtype": dtype})


def replace(old: fx.Node, new: fx.Node) -> None:
    """Route every user of ``old`` to ``new``; ``new`` keeps its own metadata."""
    old.replace_all_uses_with(new)


def erase_if_dead(graph: fx.Graph, nodes: Iterable[fx.Node]) -> int:
    """Erase pure nodes without users, then their inputs that became dead the same way."""
    stack = list(nodes)
    erased = 0
    while stack:
        n = stack.pop()
        if _erased(n) or n.users or not is_pure(n):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased += 1
        stack.extend(inputs)
    return erased


def _erased(node: fx.Node) -> bool:
    return bool(getattr(node, "_erased", False))


def sort_topologically(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, moving as few as possible."""
    placed: Set[fx.Node] = set()
    order: List[fx.Node] = []
    for root in list(graph.nodes):
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n in placed:
                continue
            if expanded:
                placed.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            for a in reversed(n.all_input_nodes):
                if a not in placed:
                    stack.append((a, False))
    prev = None
    for n in order:
        if prev is not None and n.prev is not prev:
            prev.append(n)
        prev = n


def refresh_meta(gm: fx.GraphModule, start: Optional[fx.Node] = None) -> None:
    """Recompute ``meta['val']`` of every call_function node (from ``start`` on, if given)."""
    active = start is None
    for node in gm.graph.nodes:
        if node is start:
            active = True
        if active and node.op == "call_function":
            node.meta["val"] = fake_value(node)


def scalar(x: Any) -> Optional[float]:
    """``x`` as a Python number when it is one (bools excluded)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return x


def same_layout(a: Any, b: Any) -> bool:
    """Two meta values agree on shape, strides, storage offset and dtype."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
                and a.storage_offset() == b.storage_offset())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_layout(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor)


# ATen ops known to take inputs of any strides. A rewrite that changes a value's strides (a
# column slice of a merged GEMM, say) leaves these alone; any other consumer was traced with the
# old layout and may not take another at run time (``native_group_norm`` asserts a contiguous
# input), so it gets a contiguous copy in front of it. Pointwise ops (``Tag.pointwise``),
# reductions (``Tag.reduction``) and views are stride-agnostic too.
LAYOUT_AGNOSTIC = frozenset({
    aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten._softmax, aten._log_softmax,
    aten.native_layer_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
    aten.native_batch_norm, aten.cat, aten.clone, aten._to_copy, aten.copy, aten.copy_,
    aten.max_pool2d_with_indices, aten.avg_pool2d, aten.constant_pad_nd, aten.split_with_sizes,
    aten.split, aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
    aten.index_select, aten.embedding, aten.cumsum,
})


def takes_any_layout(node: fx.Node) -> bool:
    t = node.target
    if t is operator.getitem or is_view(node):
        return True
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if t.namespace == "compile_backend" or torch.Tag.pointwise in t.tags or torch.Tag.reduction in t.tags:
        return True  # our own ops (attention) take strides as they come
    return t.overloadpacket in LAYOUT_AGNOSTIC


def _dense(v: Any) -> bool:
    return v.is_contiguous() or (v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last))


def propagate_meta(graph: fx.Graph, changed: Iterable[fx.Node]) -> int:
    """Recompute ``meta['val']`` downstream of ``changed`` until values stop changing.

    A view that cannot view its input's new layout (a channel slice flattened with its batch
    dim, say) gets a contiguous copy of that input in front of it, as ``reshape`` would make;
    so does a consumer outside :data:`LAYOUT_AGNOSTIC` that now reads a non-dense value.
    Returns the number of copies inserted.
    """
    index = {n: i for i, n in enumerate(graph.nodes)}
    moved = set(changed)
    pending = {u for n in moved for u in n.users}
    copies = 0

    def copy_in_front(node: fx.Node, src: fx.Node) -> None:
        nonlocal copies
        with graph.inserting_before(node):
            copy = call(graph, aten.clone.default, (src,), {"memory_format": torch.contiguous_format})
        node.replace_input_with(src, copy)
        index[copy] = index[node] - 0.5
        copies += 1

    while pending:
        node = min(pending, key=lambda n: index.get(n, -1))
        pending.discard(node)
        if node.op != "call_function":
            continue
        if not takes_any_layout(node):
            for src in node.all_input_nodes:
                v = tensor_val(src)
                if src in moved and v is not None and not _dense(v):
                    copy_in_front(node, src)
        try:
            new = fake_value(node)
        except Exception:  # a view refusing the new strides (RuntimeError under fake mode)
            if not is_view(node) or not isinstance(node.args[0], fx.Node):
                raise
            copy_in_front(node, node.args[0])
            new = fake_value(node)
        if same_layout(node.meta.get("val"), new):
            continue
        node.meta["val"] = new
        moved.add(node)
        pending.update(node.users)
    return copies


def evaluate_constant(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The real value of a node computed only from constants (to inspect it, e.g. whether a
    mask is causal; rewrites must not bake such values into the graph: refit would miss them)."""
    env: Dict[fx.Node, Any] = {}

    def value(n: fx.Node) -> Any:
        stack = [n]
        while stack:
            cur = stack[-1]
            if cur in env:
                stack.pop()
                continue
            if cur.op == "get_attr":
                obj: Any = gm
                for part in cur.target.split("."):
                    obj = getattr(obj, part)
                env[cur] = obj
                stack.pop()
                continue
            missing = [a for a in cur.all_input_nodes if a not in env]
            if missing:
                stack.extend(missing)
                continue
            args = fx.node.map_arg(cur.args, env.__getitem__)
            kwargs = fx.node.map_arg(cur.kwargs, env.__getitem__)
            with torch.no_grad():
                env[cur] = cur.target(*args, **kwargs)
            stack.pop()
        return env[n]

    return value(node)
