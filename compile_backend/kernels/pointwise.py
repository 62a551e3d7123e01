"""Generated Triton kernels for fused pointwise groups.

Layers: ``_source`` writes the @triton.jit kernel (one flat loop over the output elements,
one line per ATen op, see ``expr``); ``PointwiseLauncher`` checks inputs, evaluates view ops
of inputs on the host, allocates outputs and launches; ``build_pointwise`` is the builder the
engine calls. ``group.reference`` (plain ATen) is the reference every test compares against.

Indexing: the iteration space is the outputs' shape, walked in the memory order of the first
output (so channels-last outputs are written contiguously). Dims are dropped when of size 1
and merged when every operand is mergeable, so the common all-contiguous case (with
broadcast operands) needs no div/mod at all for the contiguous tensors. Each operand is read
through its own strides (stride 0 for broadcast dims, any non-contiguous layout); sizes and
strides are runtime arguments; sizes are literals in the source (cheap div/mod by constants).
Loads at another index than the element's own, each from a group input and with its dims kept
apart from merging: a cat's pieces (masked, shifted along the cat dim), a row gather's table,
a roll's input (at (i - shift) mod size along each rolled dim: Swin's shifted windows), a
constant pad's (at i - low, its value outside: ``pointwise_loads``), an interpolation's input (``_unsafe_index`` by one index table a dim: each element loads its row /
column there first; a bilinear resize's four loads and lerps are one kernel).
Generated modules are memoised by their source (``launch.load_source``).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from . import expr, expr_casts, pdl
from .base import (Kernel, KernelContext, KernelGroup, Unsupported, axis_index_parts, is_view_op, meta_of, op_name,
                   output_tensor, pad_parts, roll_parts)
from .launch import (PointwiseConfig, load_source, map_nodes, output_order,
                     pointwise_heuristic, strides_for)
from .pointwise_loads import remapped_loads

INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class PointwisePlan:
    """What the group computes, independent of the runtime strides."""

    placeholders: List[fx.Node]
    host_views: List[fx.Node]  # view ops of inputs: evaluated with torch on the host
    compute: List[fx.Node]  # pointwise ops in graph order (only those the outputs need)
    outputs: List[fx.Node]  # the group's outputs as the graph lists them
    stored: List[fx.Node]  # distinct computed outputs (written by the kernel)
    operands: List[fx.Node]  # tensor inputs/host views the kernel reads
    scalars: List[fx.Node]  # scalar inputs the kernel reads
    shape: Tuple[int, ...]  # iteration shape
    order: Tuple[int, ...]  # iteration dims, outermost first (memory order of the largest output)
    # cat nodes: (dim, [(piece, source, chain)]): each piece is a source, or a chain of one-input
    # pointwise ops on one (rotary's ``neg``), read through its cat with masked loads shifted
    # along the cat dim; ``pieces`` are those sources (never loaded at the full output shape)
    cats: Dict[fx.Node, Tuple[int, List[Tuple[fx.Node, fx.Node, List[fx.Node]]]]] = \
        dataclasses.field(default_factory=dict)
    pieces: List[fx.Node] = dataclasses.field(default_factory=list)
    # embedding nodes: (weight, indices), both group inputs: each element loads its row's index
    # (the indices laid over the leading dims) and reads the weight at (index, last dim);
    # ``gathered`` lists those tensors in launch order (weight, indices per gather)
    gathers: Dict[fx.Node, Tuple[fx.Node, fx.Node]] = dataclasses.field(default_factory=dict)
    gathered: List[fx.Node] = dataclasses.field(default_factory=list)
    # roll nodes: (source, ((dim, shift), ...)): the source, a group input of the iteration
    # shape listed among ``pieces``, is loaded at (i - shift) mod size along each rolled dim
    rolls: Dict[fx.Node, Tuple[fx.Node, Tuple[Tuple[int, int], ...]]] = dataclasses.field(default_factory=dict)
    # _unsafe_index nodes by per-dim tables (an interpolation): (source, ((dim, table), ...)); the
    # source is listed among ``pieces``, the tables (integer group inputs, each varying along its
    # dim only) in ``tables``: an element loads its index there, then the source at it
    indexed: Dict[fx.Node, Tuple[fx.Node, Tuple[Tuple[int, fx.Node], ...]]] = dataclasses.field(default_factory=dict)
    tables: List[fx.Node] = dataclasses.field(default_factory=list)
    # constant pads: (source, ((dim, low, source size), ...), value): the source (among
    # ``pieces``) read at i - low along each padded dim, ``value`` outside it
    pads: Dict[fx.Node, Tuple[fx.Node, Tuple[Tuple[int, int, int], ...], Any]] = dataclasses.field(default_factory=dict)

    @property
    def loaded(self) -> List[fx.Node]:
        """Every tensor the kernel reads, in launch order."""
        return self.operands + self.pieces + self.gathered + self.tables


def analyze(group: KernelGroup) -> PointwisePlan:
    """Check the group is a pointwise DAG Triton can run; raise Unsupported with the reason."""
    placeholders, host_views, sources = [], [], set()
    by_node: Dict[fx.Node, str] = {}
    cats: Dict[fx.Node, Tuple[int, List[Tuple[fx.Node, fx.Node, List[fx.Node]]]]] = {}
    gathers: Dict[fx.Node, Tuple[fx.Node, fx.Node]] = {}
    rolls: Dict[fx.Node, Tuple[fx.Node, Tuple[Tuple[int, int], ...]]] = {}
    indexed: Dict[fx.Node, Tuple[fx.Node, Tuple[Tuple[int, fx.Node], ...]]] = {}
    pads: Dict[fx.Node, Tuple[fx.Node, Tuple[Tuple[int, int, int], ...], Any]] = {}
    remapped = {torch.ops.aten.roll.default: (roll_parts, rolls), torch.ops.aten.constant_pad_nd.default: (pad_parts, pads),
                torch.ops.aten._unsafe_index.Tensor: (axis_index_parts, indexed)}
    for node in group.gm.graph.nodes:
        val = meta_of(node)
        if node.op == "placeholder":
            placeholders.append(node)
            if isinstance(val, torch.Tensor):
                sources.add(node)
            elif not isinstance(val, (bool, int, float)) or isinstance(val, torch.SymInt):
                raise Unsupported(f"input {node.name} is neither a tensor nor a Python scalar")
        elif node.op == "call_function":
            if node.target is operator.getitem:
                raise Unsupported("getitem in a pointwise group")
            if is_view_op(node.target):
                if not all(a in sources for a in node.all_input_nodes):
                    raise Unsupported(f"{op_name(node.target)} of a computed value inside a pointwise group")
                host_views.append(node)
                sources.add(node)
                continue
            if node.target is torch.ops.aten.cat.default:
                cats[node] = _cat_pieces(node, sources, by_node)
                by_node[node] = "compute"
                continue
            if node.target in remapped:  # loads at another index (pointwise_loads): of group inputs
                parts_of, into = remapped[node.target]
                parts = parts_of(node)
                tables = [t for _, t in parts[1]] if parts is not None and into is indexed else []
                reads = () if parts is None else (parts[0], *tables)
                if parts is None or any(a not in sources for a in reads):
                    raise Unsupported(f"{op_name(node.target)} of a computed value, or in a form the generator has "
                                      "no load for, inside a pointwise group")
                into[node] = parts
                by_node[node] = "compute"
                continue
            if node.target is torch.ops.aten.embedding.default or (
                    node.target is torch.ops.aten.index.Tensor and len(node.args[1]) == 1):
                gathers[node] = _gather_parts(node, sources)
                by_node[node] = "compute"
                continue
            reason = expr.unsupported_reason(node)
            if reason is not None:
                raise Unsupported(f"{op_name(node.target)}: {reason}")
            by_node[node] = "compute"
        elif node.op not in ("output",):
            raise Unsupported(f"{node.op} node {node.name} in a pointwise group")
    outputs = group.outputs
    for o in outputs:
        if not isinstance(o, fx.Node) or not isinstance(meta_of(o), torch.Tensor):
            raise Unsupported("a group output is not a tensor node")
    needed = _needed(outputs)
    compute = [n for n in group.gm.graph.nodes if n in by_node and n in needed]
    stored = list(dict.fromkeys(o for o in outputs if o in by_node))
    # the iteration shape is the largest output's; a smaller one (a QAT layer's scale, stored
    # beside the fake-quantized tensor computed from it) broadcasts to it and is written once
    big = max(stored, key=lambda o: meta_of(o).numel()) if stored else None
    shape = tuple(meta_of(big).shape) if stored else ()
    for o in stored:
        _check_broadcasts(meta_of(o).shape, shape, f"output {o.name}")
    cats = {c: v for c, v in cats.items() if c in compute}
    chained = {n for _, ps in cats.values() for _, _, chain in ps for n in chain}  # at piece shapes
    for n in compute:
        if n not in chained:
            _check_broadcasts(meta_of(n).shape, shape, n.name)
    gathers = {g: v for g, v in gathers.items() if g in compute}
    rolls = {r: v for r, v in rolls.items() if r in compute}
    indexed = {r: v for r, v in indexed.items() if r in compute}
    pads = {r: v for r, v in pads.items() if r in compute}
    for r in [*rolls, *indexed, *pads]:
        if tuple(meta_of(r).shape) != shape:
            raise Unsupported(f"{r.name}: a roll of another shape than the group's")
    for r, (_, dims) in indexed.items():
        if any(shape[d] == 1 for d, _ in dims):  # a dim of one element is dropped from the iteration
            raise Unsupported(f"{r.name}: an index table for a dim of size 1 into a longer one")
    for r, (_, dims, _) in pads.items():
        if any(shape[d] == 1 for d, _, _ in dims):
            raise Unsupported(f"{r.name}: a pad to a dim of size 1")
    for g in gathers:  # its embedding dim is the iteration's last
        if meta_of(g).dim() == 0 or len(shape) == 0 or meta_of(g).shape[-1] != shape[-1] or shape[-1] < 2:
            raise Unsupported(f"{g.name}: an embedding whose rows do not run along the output's last dim")
    used = [a for n in compute if n not in cats and n not in chained and n not in gathers and n not in rolls
            and n not in indexed and n not in pads for a in n.all_input_nodes]
    operands = [n for n in dict.fromkeys(used) if n in sources]
    scalars = [n for n in dict.fromkeys(used + [a for n in chained for a in n.all_input_nodes])
               if n.op == "placeholder" and n not in sources]
    pieces = list(dict.fromkeys([src for _, ps in cats.values() for _, src, _ in ps] + [src for src, _ in rolls.values()]
                                + [src for src, _ in indexed.values()] + [src for src, _, _ in pads.values()]))
    tables = list(dict.fromkeys(t for _, dims in indexed.values() for _, t in dims))
    if len({(t, d) for _, dims in indexed.values() for d, t in dims}) != len(tables):
        raise Unsupported("an index table read along two dims")
    order = output_order(meta_of(big)) if stored else ()
    gathered = [t for w, i in gathers.values() for t in (w, i)]
    return PointwisePlan(placeholders, host_views, compute, outputs, stored, operands, scalars, shape, order,
                         cats, pieces, gathers, gathered, rolls, indexed, tables, pads)


#: pieces a generated cat takes (each is a masked load per element)
MAX_CAT_PIECES = 4


def _cat_pieces(node: fx.Node, sources: set, computed: Dict[fx.Node, str]):
    """(dim, [(piece, source, chain)]) of ``aten.cat`` in a pointwise group. A piece is an input
    (or a view of one) of the cat's dtype and rank, or a chain of pointwise ops each reading one
    tensor, ending on such an input and read only along the chain (``-x[..., h:]``): its value
    at a shifted index is the chain applied to a shifted load."""
    pieces = node.args[0]
    out = meta_of(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(pieces, (list, tuple)) or not 1 <= len(pieces) <= MAX_CAT_PIECES:
        raise Unsupported(f"cat of {len(pieces) if isinstance(pieces, (list, tuple)) else '?'} pieces "
                          f"(a generated cat takes 1 to {MAX_CAT_PIECES})")
    parts = []
    for p in pieces:
        v = meta_of(p) if isinstance(p, fx.Node) else None
        if not isinstance(v, torch.Tensor) or v.dtype != out.dtype or v.dim() != out.dim():
            raise Unsupported(f"cat piece {getattr(p, 'name', p)} is not a {out.dtype} {out.dim()}-d tensor")
        chain, cur, reader = [], p, node
        while cur not in sources:
            tensors = [a for a in cur.all_input_nodes if isinstance(meta_of(a), torch.Tensor)]
            if cur not in computed or len(tensors) != 1 or set(cur.users) != {reader}:
                raise Unsupported("cat of a computed value inside a pointwise group (only chains of "
                                  "one-input ops on an input, read by the cat alone)")
            chain.append(cur)
            cur, reader = tensors[0], cur
        parts.append((p, cur, chain[::-1]))
    return dim % out.dim(), parts


def _gather_parts(node: fx.Node, sources: set) -> Tuple[fx.Node, fx.Node]:
    """(weight, indices) of ``aten.embedding(weight, indices)`` or ``aten.index.Tensor(table,
    [indices])`` in a pointwise group: both group inputs (or views of them), a 2-D weight and
    integer indices."""
    weight, indices = (node.args[0], node.args[1]) if node.target is torch.ops.aten.embedding.default \
        else (node.args[0], node.args[1][0])
    w, i = meta_of(weight), meta_of(indices)
    if weight not in sources or indices not in sources:
        raise Unsupported("embedding of a computed weight or computed indices inside a pointwise group")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(i, torch.Tensor) or \
            i.dtype not in (torch.int32, torch.int64):
        raise Unsupported("embedding needs a 2-D weight and int32/int64 indices")
    return weight, indices


def _needed(outputs: Sequence[fx.Node]) -> set:
    seen, stack = set(), list(outputs)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _check_broadcasts(shape: Sequence[int], target: Sequence[int], what: str) -> None:
    if len(shape) > len(target) or any(
            s not in (1, t) for s, t in zip(reversed(tuple(shape)), reversed(tuple(target)))):
        raise Unsupported(f"{what} of shape {tuple(shape)} does not broadcast to the output shape {tuple(target)}")


def expanded_strides(t: torch.Tensor, shape: Sequence[int]) -> Tuple[int, ...]:
    """Strides of ``t`` broadcast (right-aligned) to ``shape``: 0 along broadcast dims."""
    _check_broadcasts(t.shape, shape, "input")
    return _broadcast_strides(tuple(t.shape), t.stride(), shape)


def _broadcast_strides(shape: Sequence[int], strides: Sequence[int], target: Sequence[int]) -> Tuple[int, ...]:
    """``strides`` of a tensor of ``shape`` seen at the broadcast ``target`` shape."""
    lead = len(target) - len(shape)
    return tuple(0 if d < lead or shape[d - lead] == 1 else strides[d - lead] for d in range(len(target)))


def collapse(shape: Sequence[int], order: Sequence[int], strides: Sequence[Sequence[int]]):
    """Iteration dims (outer first) after dropping size-1 dims and merging dims every tensor
    walks contiguously; returns (sizes, strides per tensor)."""
    dims = [d for d in order if shape[d] != 1]
    sizes = [shape[d] for d in dims]
    st = [[s[d] for d in dims] for s in strides]
    j = len(sizes) - 1
    while j > 0:
        if all(s[j - 1] == s[j] * sizes[j] for s in st):
            sizes[j - 1] *= sizes[j]
            del sizes[j]
            for s in st:
                s[j - 1] = s[j]
                del s[j]
        j -= 1
    return sizes, [tuple(s) for s in st]


def _pattern(strides: Sequence[int], sizes: Sequence[int]) -> Any:
    """'flat' when the tensor is row-major over the iteration dims, else the dims it moves along."""
    if tuple(strides) == strides_for(sizes, range(len(sizes))) and all(s != 0 for s in strides):
        return "flat"
    return tuple(j for j, s in enumerate(strides) if s != 0)


def _source(plan: PointwisePlan, sizes: Sequence[int], patterns: Sequence[Any], wide: bool,
            round_intermediates: bool = True, cat_dims: Sequence[int] = (), gather_dim: Any = None,
            kept: Sequence[int] = (), roll_dims: Sequence[Sequence[Tuple[int, int]]] = (),
            index_dims: Sequence[Sequence[int]] = (), pad_dims: Sequence[Sequence[int]] = ()) -> str:
    """The Triton module for one layout (see ``PointwiseLauncher._layout``). Sizes are literals:
    div/mod by a constant is a multiply-shift (a mask for powers of two), by a runtime value a
    long division per element. ``kept``: stored outputs ``where(c, a, x)`` written over ``x``
    itself (``keeper_outputs``): stored only where ``c`` holds, ``x`` never loaded."""
    unread = {plan.stored[i].args[2] for i in kept}
    ndims, numel = len(sizes), 1
    for s in sizes:
        numel *= s
    gathered = [f"g{k}_{role}" for k in range(len(plan.gathers)) for role in ("w", "i")]
    tensors = ([f"in_{n.name}" for n in plan.operands] + [f"piece_{n.name}" for n in plan.pieces] + gathered
               + [f"tab_{n.name}" for n in plan.tables] + [f"out{i}" for i in range(len(plan.stored))])
    params = [f"{t}_ptr" for t in tensors] + [f"s_{n.name}" for n in plan.scalars]
    for t, pat in zip(tensors, patterns):
        if pat not in ("flat", "gather"):
            params += [f"{t}_st{j}" for j in pat]
    params += [f"g{k}_w_s{j}" for k in range(len(plan.gathers)) for j in (0, 1)]
    body = ["pid = tl.program_id(0)",
            f"offs = {'pid.to(tl.int64)' if wide else 'pid'} * BLOCK + tl.arange(0, BLOCK)",
            f"mask = offs < {numel}"]
    out_patterns = patterns[len(plan.operands) + len(plan.pieces) + len(gathered) + len(plan.tables):]
    if (any(p != "flat" and p for p in patterns) or any(p != "flat" for p in out_patterns) or plan.cats
            or plan.gathers or plan.rolls or plan.indexed or plan.pads) and ndims > 0:
        body.append("# multi-index over the (merged) iteration dims, outermost first")
        rest = "offs"
        for j in range(ndims - 1, 0, -1):
            body.append(f"i{j} = {rest} % {sizes[j]}")
            body.append(f"r{j} = {rest} // {sizes[j]}")
            rest = f"r{j}"
        body.append(f"i0 = {rest}")

    def offset(t: str, pat: Any) -> str:
        return "offs" if pat == "flat" else " + ".join(f"i{j} * {t}_st{j}" for j in pat)

    names: Dict[fx.Node, str] = {}
    block_values = set()
    for node, t, pat in zip(plan.operands, tensors, patterns):
        dtype = meta_of(node).dtype
        var = f"l_{node.name}"
        if node in unread:  # kept where it is: read by nothing that is stored
            load = f"tl.zeros([BLOCK], dtype={expr_casts.tl_type(dtype)})"
            block_values.add(node)
        elif pat == "flat" or pat:
            load = f"tl.load({t}_ptr + {offset(t, pat)}, mask=mask, other={expr_casts.masked_zero(meta_of(node))})"
            block_values.add(node)
        else:  # broadcast scalar (0-dim or all-stride-0 input): one load per program
            load = f"tl.load({t}_ptr)"
        body.append(f"{var} = {expr.to_compute(load, dtype)}")
        names[node] = var
    for node in plan.scalars:
        names[node] = f"s_{node.name}"
    piece_pats = dict(zip(plan.pieces, patterns[len(plan.operands):]))
    helpers: set = set()
    for (cat, (dim, parts)), j in zip(plan.cats.items(), cat_dims):
        body.append(f"# {cat.name}: cat along dim {dim}, one masked load per piece")
        var, start = f"v_{cat.name}", 0
        for k, (piece, src, chain) in enumerate(parts):
            size = meta_of(piece).shape[dim]
            t = f"piece_{src.name}"
            idx = " + ".join(f"{'(i%d - %d)' % (d, start) if d == j else 'i%d' % d} * {t}_st{d}" for d in piece_pats[src])
            inside = f"(i{j} >= {start}) & (i{j} < {start + size})"
            loaded = f"c_{cat.name}_{k}"
            body.append(f"{loaded} = " + expr.to_compute(
                f"tl.load({t}_ptr + {idx or 0}, mask=mask & {inside}, other={expr_casts.masked_zero(meta_of(src))})",
                meta_of(src).dtype))
            local = {**names, src: loaded}
            body += expr.emit_pointwise(chain, local, helpers, round_intermediates)
            value = local[piece]
            body.append(f"{var} = {value}" if start == 0 else f"{var} = tl.where({inside}, {value}, {var})")
            start += size
        names[cat] = var
        block_values.add(cat)
    table_pats = dict(zip(plan.tables, patterns[len(plan.operands) + len(plan.pieces) + len(gathered):]))
    lines, loaded = remapped_loads(plan, sizes, piece_pats, table_pats, roll_dims, pad_dims, index_dims)
    body += lines
    names.update(loaded)
    block_values.update(loaded)
    gather_pats = patterns[len(plan.operands) + len(plan.pieces):len(plan.operands) + len(plan.pieces) + len(gathered)]
    for k, (node, (weight, _)) in enumerate(plan.gathers.items()):
        rows, ipat = meta_of(weight).shape[0], gather_pats[2 * k + 1]
        body.append(f"# {node.name}: embedding rows gathered by index (an index out of range reads 0)")
        at = f"g{k}_i_ptr + {offset(f'g{k}_i', ipat)}" if ipat == "flat" or ipat else f"g{k}_i_ptr + 0 * offs"
        body.append(f"gi_{node.name} = tl.load({at}, mask=mask, other=0).to(tl.int64)")
        if node.target is torch.ops.aten.index.Tensor:
            # table[i] counts a negative index from the end, as Python does (Falcon picks its
            # key head as qkv[..., [-2], :]); embedding has no such rows (eager raises)
            body.append(f"gi_{node.name} = tl.where(gi_{node.name} < 0, gi_{node.name} + {rows}, gi_{node.name})")
        body.append(f"gok_{node.name} = (gi_{node.name} >= 0) & (gi_{node.name} < {rows})")
        load = (f"tl.load(g{k}_w_ptr + gi_{node.name} * g{k}_w_s0 + i{gather_dim} * g{k}_w_s1, "
                f"mask=mask & gok_{node.name}, other=0)")
        body.append(f"v_{node.name} = {expr.to_compute(load, meta_of(weight).dtype)}")
        names[node] = f"v_{node.name}"
        block_values.add(node)
    chained = {n for _, parts in plan.cats.values() for _, _, chain in parts for n in chain}
    body.append("# one line per ATen op; reduced floats are computed in fp32 and rounded like eager")
    body += expr.emit_pointwise([n for n in plan.compute if n not in plan.cats and n not in chained
                                 and n not in plan.gathers and n not in plan.rolls and n not in plan.indexed
                                 and n not in plan.pads],
                                names, helpers, round_intermediates)
    for node in plan.compute:
        if any(a in block_values for a in node.all_input_nodes):
            block_values.add(node)
    for i, (node, pat) in enumerate(zip(plan.stored, out_patterns)):
        value = names[node] if node in block_values else f"tl.broadcast_to({names[node]}, [BLOCK])"
        # an output smaller than the iteration shape: only the first element along each of its
        # broadcast dims writes (every element computed the same value)
        once = "" if pat == "flat" else "".join(f" & (i{j} == 0)" for j in range(ndims) if j not in pat)
        if i in kept:  # elsewhere the output already holds x, the value the select keeps
            once += f" & ({names[node.args[0]]})"
        body.append(f"tl.store(out{i}_ptr + {offset(f'out{i}', pat) or '0 * offs'}, "
                    f"{expr.to_storage(value, meta_of(node).dtype)}, mask=mask{once})")
    header = ["import triton", "import triton.language as tl", "",
              f"# group ops: {', '.join(op_name(n.target) for n in plan.compute)}"]
    kernel = "\n\n@triton.jit\ndef pointwise_kernel(" + ", ".join(params + ["BLOCK: tl.constexpr"]) + \
        "):\n" + "\n".join("    " + line for line in body) + "\n"
    return "\n".join(header) + expr.helper_source(kernel) + kernel


@dataclasses.dataclass
class _Launch:
    kernel: Any
    source: str
    int_args: Tuple[int, ...]
    numel: int
    out_strides: List[Tuple[int, ...]]


class PointwiseLauncher:
    """Checks inputs, evaluates host views, allocates outputs and launches the kernel."""

    def __init__(self, plan: PointwisePlan, config: PointwiseConfig, device: torch.device, pdl: bool = False):
        self.plan, self.config, self.device, self.pdl = plan, config, device, pdl
        self._launches: Dict[Tuple, _Launch] = {}
        self.keepers = keeper_outputs(plan)
        self.last_compiled: Any = None

    def _layout(self, operands: Sequence[torch.Tensor], kept: Tuple[int, ...] = ()) -> _Launch:
        plan = self.plan
        for node, t in zip(plan.operands, operands):
            want = meta_of(node)
            if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"input {node.name}: kernel built for {want.dtype}{tuple(want.shape)}, "
                                 f"got {t.dtype}{tuple(t.shape)}")
        out_strides = [strides_for(tuple(meta_of(o).shape), output_order(meta_of(o))) for o in plan.stored]
        n_op, n_pc, n_g = len(plan.operands), len(plan.pieces), len(plan.gathered)
        pieces, gathered = operands[n_op:n_op + n_pc], operands[n_op + n_pc:n_op + n_pc + n_g]
        tables = operands[n_op + n_pc + n_g:]
        operands = operands[:n_op]
        # a piece is read at the output's index shifted along its cat dim: its own strides, and
        # one marker per cat dim (stride 1 there, 0 elsewhere) keeps that dim apart when merging;
        # so does one for the last dim when an embedding reads its weight's columns along it
        last = len(plan.shape) - 1
        markers = [tuple(int(d == dim) for d in range(len(plan.shape))) for dim, _ in plan.cats.values()]
        # a rolled dim is kept apart the same way (its size is the modulus)
        rolled = [(dim, shift) for _, dims in plan.rolls.values() for dim, shift in dims]
        markers += [tuple(int(d == dim) for d in range(len(plan.shape))) for dim, _ in rolled]
        looked_up = [dim for _, dims in plan.indexed.values() for dim, _ in dims]  # kept apart too
        markers += [tuple(int(d == dim) for d in range(len(plan.shape))) for dim in looked_up]
        padded = [dim for _, dims, _ in plan.pads.values() for dim, _, _ in dims]
        markers += [tuple(int(d == dim) for d in range(len(plan.shape))) for dim in padded]
        markers += [tuple(int(d == last) for d in range(len(plan.shape)))] if plan.gathers else []
        all_strides = ([expanded_strides(t, plan.shape) for t in operands] + [self._piece_strides(p, t) for p, t in
                                                                               zip(plan.pieces, pieces)]
                       + [self._gathered_strides(t, k % 2 == 0) for k, t in enumerate(gathered)]
                       + [self._table_strides(node, t) for node, t in zip(plan.tables, tables)]
                       + [_broadcast_strides(meta_of(o).shape, st, plan.shape) for o, st in zip(plan.stored, out_strides)]
                       + markers)
        sizes, strides = collapse(plan.shape, plan.order, all_strides)
        marked = [m.index(1) for m in strides[len(strides) - len(markers):]]
        cat_dims, gather_dim = marked[:len(plan.cats)], (marked[-1] if plan.gathers else None)
        merged_rolls, k = [], len(plan.cats)
        for _, dims in plan.rolls.values():
            merged_rolls.append(tuple((marked[k + j], shift) for j, (_, shift) in enumerate(dims)))
            k += len(dims)
        merged_index, merged_pads = [], []
        for _, dims in plan.indexed.values():
            merged_index.append(tuple(marked[k + j] for j in range(len(dims))))
            k += len(dims)
        for _, dims, _ in plan.pads.values():
            merged_pads.append(tuple(marked[k + j] for j in range(len(dims))))
            k += len(dims)
        strides = strides[:len(strides) - len(markers)]
        patterns = [_pattern(s, sizes) for s in strides]
        for i in range(n_op, n_op + n_pc):  # pieces: always indexed by dim
            patterns[i] = tuple(range(len(sizes)))
        for i in range(n_op + n_pc, n_op + n_pc + len(gathered), 2):  # weights: addressed by row and column
            patterns[i] = "gather"
        numel = 1
        for s in plan.shape:
            numel *= s
        reach = max([numel] + [sum((n - 1) * abs(x) for n, x in zip(t.shape, t.stride())) + 1
                               for t in list(operands) + list(pieces) + list(gathered) + list(tables)])
        wide = reach + self.config.block > INT32_MAX
        source = _source(plan, sizes, patterns, wide, cat_dims=cat_dims, gather_dim=gather_dim, kept=kept,
                         roll_dims=merged_rolls, index_dims=merged_index, pad_dims=merged_pads)
        if self.pdl:
            source = pdl.with_entry(source, "pointwise_kernel", after=1)  # after its program id
        int_args = tuple(
            s[j] for s, pat in zip(strides, patterns) if pat not in ("flat", "gather") for j in pat)
        int_args += tuple(x for w in gathered[::2] for x in w.stride())
        return _Launch(load_source(source).pointwise_kernel, source, int_args, numel, out_strides)

    def _gathered_strides(self, t: torch.Tensor, weight: bool) -> Tuple[int, ...]:
        """An embedding's indices at the iteration shape: laid over the dims before the last
        (right-aligned with the embedding's output), 0 along the last; its weight: all 0 (it is
        addressed by the loaded index and the last dim's index, ``_source``)."""
        shape = self.plan.shape
        if weight:
            return (0,) * len(shape)
        lead = len(shape) - 1 - t.dim()
        return tuple(0 if d < lead or d == len(shape) - 1 or t.shape[d - lead] == 1 else t.stride(d - lead)
                     for d in range(len(shape)))

    def _table_strides(self, table: fx.Node, t: torch.Tensor) -> Tuple[int, ...]:
        """An index table's strides at the iteration shape: its stride along the one dim it
        varies in (right-aligned with the other tables of its ``_unsafe_index``), 0 elsewhere."""
        shape = self.plan.shape
        dim = next(d for _, dims in self.plan.indexed.values() for d, tab in dims if tab is table)
        varying = [p for p in range(t.dim()) if t.shape[p] != 1]
        stride = t.stride(varying[0]) if varying else 0
        return tuple(stride if d == dim else 0 for d in range(len(shape)))

    def _piece_strides(self, piece: fx.Node, t: torch.Tensor) -> Tuple[int, ...]:
        """A cat piece's strides at the iteration shape: its own along the cat dim (it is read
        shifted there), 0 along dims it broadcasts over (a cat computed inside a bigger kernel)."""
        shape = self.plan.shape
        dim = next((d for d, parts in self.plan.cats.values() if any(src is piece for _, src, _ in parts)), None)
        if dim is None:  # a roll's source: of the iteration shape (analyze), read through its own strides
            return tuple(t.stride())
        lead = len(shape) - t.dim()
        return tuple(0 if d < lead or (t.shape[d - lead] == 1 and shape[d] != 1 and d - lead != dim)
                     else t.stride(d - lead) for d in range(len(shape)))

    def launch_for(self, operands: Sequence[torch.Tensor], kept: Tuple[int, ...] = ()) -> _Launch:
        key = (tuple((t.dtype, tuple(t.shape), t.stride()) for t in operands), kept)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = self._layout(operands, kept)
        return launch

    def out_layouts(self) -> Tuple[Any, ...]:
        """Per group output, the layout this launcher allocates (None: an input or a view of one)."""
        stored = {o: (tuple(meta_of(o).shape), strides_for(tuple(meta_of(o).shape), output_order(meta_of(o))),
                      meta_of(o).dtype) for o in self.plan.stored}
        return tuple(stored.get(o) for o in self.plan.outputs)

    def prepare(self, inputs: Sequence[Any], out: Optional[Sequence[Any]] = None) -> "Prepared":
        """Everything one launch needs (the outputs allocated), without launching."""
        plan = self.plan
        if len(inputs) != len(plan.placeholders):
            raise ValueError(f"expected {len(plan.placeholders)} inputs, got {len(inputs)}")
        env: Dict[fx.Node, Any] = dict(zip(plan.placeholders, inputs))
        for v in plan.host_views:
            env[v] = v.target(*map_nodes(v.args, env), **map_nodes(v.kwargs, env))
        operands = [env[n] for n in plan.loaded]
        device = operands[0].device if operands else self.device
        launch, args = None, ()
        if plan.stored:
            launch = self.launch_for(operands)
            outs = [output_tensor(out, plan.outputs.index(o), (tuple(meta_of(o).shape), st, meta_of(o).dtype), device)
                    for o, st in zip(plan.stored, launch.out_strides)]
            kept = tuple(i for i, x in self.keepers.items() if _same_memory(outs[i], env[x]))
            if kept:  # an input written in place (a KV cache's slot): the other elements stay as they are
                launch = self.launch_for(operands, kept)
            args = (*operands, *outs, *[env[n] for n in plan.scalars], *launch.int_args)
            env.update(zip(plan.stored, outs))
        programs = triton_cdiv(launch.numel, self.config.block) if launch is not None else 0
        return Prepared(launch, args, programs, tuple(env[o] for o in plan.outputs))

    def __call__(self, *inputs: Any, out: Optional[Sequence[Any]] = None) -> Tuple[Any, ...]:
        ready = self.prepare(inputs, out)
        if ready.programs > 0:
            # the compiled kernel (None under the interpreter): registers/PTX for benchmarks
            self.last_compiled = ready.launch.kernel[(ready.programs,)](
                *ready.args, BLOCK=self.config.block, num_warps=self.config.num_warps, **pdl.launch_kwargs(self.pdl))
        return ready.outputs


def keeper_outputs(plan: PointwisePlan) -> Dict[int, fx.Node]:
    """{stored output index: x} for outputs ``where(c, a, x)`` of an operand ``x`` nothing else in
    the group reads. Written into ``x`` itself (an input updated in place: a KV cache's slot,
    ``input_writes.py``), such an output needs storing only where ``c`` holds, and ``x`` no load:
    one slot's bytes, not the whole cache's read and written. The ``where`` must be read by
    nothing but the store: computed without ``x``, its value is right only where ``c`` holds
    (Falcon's fp16 step also upcasts the updated cache to fp32 in the same group: that copy read
    zeros for every other slot, and its attention a mostly empty cache)."""
    out = {}
    for i, node in enumerate(plan.stored):
        if node.op != "call_function" or node.target is not torch.ops.aten.where.self or len(node.args) != 3:
            continue
        if any(u.op != "output" for u in node.users):
            continue
        c, _, x = node.args
        if isinstance(c, fx.Node) and x in plan.operands and x is not c and len(x.users) == 1 \
                and x not in plan.pieces and x not in plan.gathered and x not in plan.tables \
                and meta_of(x).dtype not in (expr_casts.FP8,) \
                and meta_of(x).dtype == meta_of(node).dtype and tuple(meta_of(x).shape) == tuple(meta_of(node).shape):
            out[i] = x
    return out


def _same_memory(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)


@dataclasses.dataclass
class Prepared:
    """One launch of a pointwise kernel, ready to go: its layout (None: nothing to store), its
    arguments, its programs (0: empty), the group's outputs it will have written."""

    launch: Optional[_Launch]
    args: Tuple[Any, ...]
    programs: int
    outputs: Tuple[Any, ...]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_pointwise(group: KernelGroup, ctx: KernelContext,
                    config: Optional[PointwiseConfig] = None) -> Kernel:
    """Kernel for a pointwise group; ``config=None`` picks the heuristic launch parameters. A
    group of independent parts of different shapes runs as one combined launch
    (:mod:`.pointwise_combo`)."""
    try:
        plan = analyze(group)
    except Unsupported:
        from .pointwise_combo import split_parts

        parts = split_parts(group, joins=_one_kernel)
        if len(parts) < 2:
            raise
        return _build_combo(group, ctx, parts)
    numel = 1
    for s in plan.shape:
        numel *= s
    config = config or pointwise_heuristic(numel)
    launcher = PointwiseLauncher(plan, config, ctx.device, ctx.pdl)
    source = None
    if plan.stored:  # generate (and load) the source for the layout the graph was traced with
        metas = [meta_of(n) for n in plan.loaded]
        source = launcher.launch_for(metas).source
    return Kernel(kind="pointwise", impl="triton", ops=group.ops, fn=launcher,
                  config=dataclasses.asdict(config), source=source,
                  supports_out=bool(plan.stored), out_layouts=launcher.out_layouts())


def _one_kernel(group: KernelGroup) -> bool:
    """Whether the group runs as one plain pointwise kernel (one iteration space)."""
    try:
        analyze(group)
    except Unsupported:
        return False
    return True


def _build_combo(group: KernelGroup, ctx: KernelContext, parts) -> Kernel:
    from .pointwise_combo import MAX_PARTS, ComboLauncher, ComboLaunches, combo_source

    launchers = []
    for part, ins, outs in parts:
        plan = analyze(part)
        numel = 1
        for s in plan.shape:
            numel *= s
        launchers.append((PointwiseLauncher(plan, pointwise_heuristic(numel), ctx.device, ctx.pdl), ins, outs))
    chunks = [launchers[i:i + MAX_PARTS] for i in range(0, len(launchers), MAX_PARTS)]
    combos = [ComboLauncher(chunk, len(group.outputs), ctx.pdl) for chunk in chunks]
    combo = combos[0] if len(combos) == 1 else ComboLaunches(combos)
    sources = [[launcher.launch_for([meta_of(n) for n in launcher.plan.loaded]).source
                for launcher, _, _ in chunk if launcher.plan.stored] for chunk in chunks]
    source = "\n".join(combo_source(s) if len(s) > 1 else "".join(s) for s in sources) \
        if sum(map(len, sources)) > 1 else None
    config = {"combo": len(launchers), "parts": [dataclasses.asdict(l.config) for l, _, _ in launchers]}
    if len(chunks) > 1:
        config["launches"] = len(chunks)
    return Kernel(kind="pointwise", impl="triton", ops=group.ops, fn=combo, config=config,
                  source=source,
                  supports_out=any(l.plan.stored for l, _, _ in launchers), out_layouts=combo.out_layouts())
