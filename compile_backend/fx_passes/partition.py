"""Partitioner: decides which ATen nodes share one kernel.

Contract (the pipeline relies on it): ``partition(gm) -> list[GroupSpec]``; each node appears in
at most one group; a group's nodes are in graph order and every group can run as one unit
(no node outside the group both consumes a group value and feeds a later group node).
Nodes in no group (views, metadata ops, getitem, mutation epilogues) run as plain ATen calls.

Policy, in priority order (earlier groups claim nodes first):
1. attention: each ``compile_backend.attention`` op alone.
2. gemm / conv: mm, addmm, bmm, baddbmm or convolution (or the quantized ``compile_backend.scaled_mm``
   / ``scaled_conv``) with its epilogue: the fusable element-wise ops computed from its result
   (bias, activation, residual add, scaling, cast; a chain or a DAG such as a tanh GELU that
   reads the result three times), through row-major reshapes (``view``) that the epilogue
   treats as free. A user that also reads another branch of the same shape joins with that
   branch, which the epilogue computes from loads (a straight-through gradient's mask). One-input
   ops ending the epilogue that their readers compute as cheaply stay out (``abs`` read only by
   reductions, a widening cast read by fusable ops): the epilogue stores the narrower value once.
3. reduction: softmax, log-softmax, layer norm, sum/mean/amax/amin/var/std/logsumexp, with their
   element-wise prologue (producers used only by the group) and epilogue; further reductions of
   the same shape over the same dims join (a decomposed RMS or layer norm is one group). The
   epilogue takes values that broadcast to the reduced shape, and values laid over a member's
   dims (a per-channel scale chain on amax's (N,) result, then the (N, K) fake-quantized weight),
   with the one-input producers only they read (a dynamic quantize's fp32 conversion of the row).
4. pool: each max_pool2d_with_indices alone, with the getitems that take its values/indices.
5. pointwise: the remaining fusable element-wise ops (and cats of a few pieces, row gathers:
   embeddings, ``table[indices]``), largest first, grown along their users
   while the output shape stays the group's shape (smaller operands broadcast); a user that also
   reads another branch computed after the group starts joins with that branch (a diamond is one
   kernel). Then the group takes in the free producers whose shape broadcasts to its own, however
   early (a QAT scale chain, 0-d or per channel): computed at every element, stored once.
   A pointwise group computing only a weight-only GEMV's activation (decode rows) then joins
   that GEMV's group as its prologue (``partition_merge.merge_gemv_prologues``); small
   neighbouring pointwise groups sharing no data path become one group of independent parts,
   one launch (``merge_independent_pointwise``).
6. aten: any other op (avg pooling, a cat of more pieces, other indexing, ops no generated kernel
   can express), alone.

Fills (``zeros``, ``ones_like``, ``scalar_tensor``...): each reader gets its own ``aten.full``
(``partition_graph.fills_per_reader``), which joins the reader's group of any kind: a constant
costs no launch and no longer fences the groups around the one shared copy.

Never in a group: views of computed values (except the reshapes above and size-1 reshapes
inside reductions), getitem (except of a grouped multi-output reduction or pooling), mutating
ops (copy_, in-place ops), random ops, placeholders, constants.

Dependency safety: every input a group reads from outside precedes the group's first node in
graph order. That makes the groups acyclic and lets :func:`partition` move each group's nodes
next to each other (still a topological order), so the group can run where its last node is.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

from ..kernels.base import FILL_OPS, axis_index_parts, is_fill, is_view_op, pad_parts, roll_parts  # (imports neither Triton nor any kernel module)
from .partition_graph import (REDUCTIONS, RESHAPES, broadcasts_to, fills_per_reader, gather_operands, hoist_constants,
                              hoist_views, indexed_operands, is_op, is_reshape, make_adjacent, safe, validate)
from .partition_merge import merge_gemv_prologues, merge_independent_pointwise, merge_pointwise_groups

aten = torch.ops.aten
prims = torch.ops.prims

_GEMMS = (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)
_POOLS = (aten.max_pool2d_with_indices, aten.avg_pool2d)
_UNIT_VIEWS = RESHAPES + (aten.unsqueeze, aten.squeeze)
#: the quantized GEMM / convolution ops (compile_backend.ops) anchor groups like their float kinds
#: 8-bit code dtypes (not bool: a mask widened to float stays in its epilogue)
_CODES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
_SCALED = {"scaled_mm": "gemm", "scaled_conv": "conv", "weight_only_linear": "gemm",
           "weight_only_grouped_mm": "grouped_gemm"}


@dataclasses.dataclass
class GroupSpec:
    kind: str  # gemm | grouped_gemm | conv | pointwise | reduction | attention | pool | aten
    nodes: List[fx.Node]
    anchor: Optional[fx.Node] = None

    @property
    def ops(self) -> Tuple[str, ...]:
        """The ATen ops the group covers, in graph order."""
        return tuple(_op_name(n.target) for n in self.nodes)


def partition(gm: fx.GraphModule) -> List[GroupSpec]:
    """Group the nodes of ``gm`` into kernels (and make each group's nodes adjacent)."""
    hoist_constants(gm.graph)
    hoist_views(gm.graph)
    fills_per_reader(gm.graph)
    builder = _Partitioner(gm.graph)
    groups = builder.run()
    make_adjacent(gm.graph, groups)
    return groups


def classify(node: fx.Node) -> Optional[str]:
    """Kind of a single node, or None for nodes that are not kernels (views, metadata)."""
    if node.op != "call_function":
        return None
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return None
    if t.namespace == "compile_backend" and t._opname == "attention":
        return "attention"
    if t.namespace == "compile_backend" and t._opname in _SCALED:
        return _SCALED[t._opname]
    if is_view_op(t) or t._schema.is_mutable:
        return None
    packet = t.overloadpacket
    if packet in _GEMMS:
        return "gemm"
    if packet is aten.convolution:
        return "conv"
    if packet in REDUCTIONS:
        return "reduction"
    if packet in _POOLS:
        return "pool"
    if fusable_pointwise(node) or fusable_cat(node) or fusable_gather(node) or fusable_roll(node) \
            or fusable_axis_index(node) or fusable_pad(node):
        return "pointwise"
    return "aten"


#: element-wise ops PyTorch does not tag ``pointwise`` (2.11 and 2.13), which the code generator
#: computes: untagged, MobileNetV3's hard-swish and a YOLO-style leaky ReLU each ran as an ATen
#: launch between fused kernels (session 37, benchmarks/vision_families.py)
UNTAGGED_ELEMENTWISE = frozenset((aten.hardswish.default, aten.leaky_relu.default, aten.rsub.Tensor,
                                  # an MoE's sorted slot // top_k (the token of each slot), every step
                                  aten.floor_divide.default))


#: pieces a generated cat takes (kernels/pointwise.MAX_CAT_PIECES; one masked load each)
_MAX_CAT_PIECES = 4


def fusable_cat(node: fx.Node) -> bool:
    """``aten.cat`` of at most a few same-dtype, same-rank pieces: a pointwise kernel computes
    it with one masked load per piece (rotary embeddings' ``cat((-x2, x1))`` then joins the
    multiply-adds around it). Only pointwise groups take it (see ``_Partitioner``)."""
    if node.op != "call_function" or node.target is not aten.cat.default:
        return False
    pieces, val = node.args[0], node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(pieces, (list, tuple)) or \
            not 1 <= len(pieces) <= _MAX_CAT_PIECES or val.numel() == 0:
        return False
    return all(isinstance(p, fx.Node) and isinstance(p.meta.get("val"), torch.Tensor)
               and p.meta["val"].dtype == val.dtype and p.meta["val"].dim() == val.dim() for p in pieces)


def fusable_gather(node: fx.Node) -> bool:
    """A row gather (``gather_operands``) of a 2-D float table by integer indices, rows of more
    than one value: a pointwise kernel loads each element's row index, then the table (pointwise
    groups only)."""
    parts = gather_operands(node)
    if parts is None:
        return False
    w, i = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in parts)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point() and w.shape[1] > 1
            and isinstance(i, torch.Tensor) and i.dtype in (torch.int32, torch.int64) and i.numel() > 0)


def fusable_roll(node: fx.Node) -> bool:
    """``aten.roll`` along named dims of a static shape (Swin's shifted windows, before and after
    each shifted block's attention): a pointwise kernel loads its input at the rolled index
    (pointwise groups only, its input a group input)."""
    val = node.meta.get("val")
    return roll_parts(node) is not None and isinstance(val, torch.Tensor) and val.numel() > 0


def fusable_pad(node: fx.Node) -> bool:
    """``aten.constant_pad_nd`` of static sizes (Swin's pad to whole windows, explicit "same"
    paddings): a pointwise kernel loads its input at the shifted index, the value outside
    (pointwise groups only, its input a group input)."""
    val = node.meta.get("val")
    return pad_parts(node) is not None and isinstance(val, torch.Tensor) and val.numel() > 0


def fusable_axis_index(node: fx.Node) -> bool:
    """``aten._unsafe_index`` by one index table per trailing dim (``F.interpolate``'s, nearest
    or bilinear: four of them and the lerps are one kernel): a pointwise kernel loads each
    element's row / column from the tables, then the input there (pointwise groups only, the
    input and tables group inputs)."""
    val = node.meta.get("val")
    return axis_index_parts(node) is not None and isinstance(val, torch.Tensor) and val.numel() > 0


def fusable_pointwise(node: fx.Node) -> bool:
    """An element-wise op a generated kernel can compute (checked against the code generator)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable:
        return False
    if torch.Tag.nondeterministic_seeded in t.tags or not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    packet = t.overloadpacket
    if packet is aten._to_copy:
        if not set(node.kwargs) <= {"dtype", "memory_format", "layout", "device"} or not _stays_put(node):
            return False  # device / layout changes are not element-wise work
    elif t is not prims.convert_element_type.default and torch.Tag.pointwise not in t.tags \
            and packet not in FILL_OPS and t not in UNTAGGED_ELEMENTWISE:
        return False
    reason = _codegen_reason(node)
    return reason is None


def _stays_put(node: fx.Node) -> bool:
    """A ``_to_copy`` whose ``layout`` / ``device`` arguments (autocast's casts in AOT backward
    graphs spell both out) keep the strided layout and the input's device: a dtype conversion."""
    src = node.args[0] if node.args else None
    src_val, val = (src.meta.get("val") if isinstance(src, fx.Node) else None), node.meta.get("val")
    if not isinstance(src_val, torch.Tensor) or not isinstance(val, torch.Tensor):
        return False
    layout, device = node.kwargs.get("layout"), node.kwargs.get("device")
    if device is not None:
        device = torch.device(device)  # "cuda" (no index) names the tensor's own device here
        if device.type != src_val.device.type or device.index not in (None, src_val.device.index):
            return False
    return layout in (None, torch.strided) and src_val.layout == torch.strided and val.device == src_val.device


def _codegen_reason(node: fx.Node) -> Optional[str]:
    try:
        from ..kernels import expr
    except ImportError:  # code generator absent: trust the op tags
        return None
    return expr.unsupported_reason(node)


# ----------------------------------------------------------------------------- the policy
class _Partitioner:
    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.kind = {n: classify(n) for n in self.nodes}
        # cats are "pointwise" for pointwise groups only: GEMM epilogues and reductions have
        # no cat in their code generators
        self.cats = {n for n in self.nodes if self.kind[n] == "pointwise" and n.target is aten.cat.default}
        # ops only generated pointwise kernels compute (no GEMM epilogue, no reduction)
        # rolls, pads and interpolations' indexed loads: their kernel loads the input at another index,
        # so it is a group input and the node no other group's member (each seeds its own group,
        # before everything else)
        self.remapped = {n for n in self.nodes if self.kind[n] == "pointwise"
                      and any(f(n) is not None for f in (roll_parts, axis_index_parts, pad_parts))}
        self.pointwise_only = self.cats | self.remapped | {n for n in self.nodes if self.kind[n] == "pointwise"
                                                        and gather_operands(n) is not None}
        # a gather's table and indices: the code generator loads them from group inputs, so
        # their producers never join the gather's group (OPT's positions, cumsum(mask) + 2,
        # took the whole group to ATen when they did)
        self.gathered = {a for n in self.pointwise_only for a in (indexed_operands(n) or ()) if isinstance(a, fx.Node)}
        self.group_of: Dict[fx.Node, int] = {}
        self.groups: List[GroupSpec] = []

    def run(self) -> List[GroupSpec]:
        for n in self.nodes:
            if self.kind[n] == "attention":
                self._add(GroupSpec("attention", [n], n))
        for n in self.nodes:
            if self.kind[n] in ("gemm", "conv") and n not in self.group_of:
                self._add(GroupSpec(self.kind[n], self._epilogue_chain(n), n))
            elif self.kind[n] == "grouped_gemm":  # experts' GEMMs: the launch alone, no chain
                self._add(GroupSpec("grouped_gemm", [n], n))
        for n in self.nodes:
            if self.kind[n] == "reduction" and n not in self.group_of:
                self._add(GroupSpec("reduction", self._reduction_group(n)))
        for n in self.nodes:
            if self.kind[n] == "pool" and n not in self.group_of:
                # the op returns (values, indices): its getitems make the group's outputs tensors
                self._add(GroupSpec("pool", [n, *self._getitems(n)]))
        for n in self.nodes:
            if n in self.remapped and n not in self.group_of:
                self._add(GroupSpec("pointwise", self._pointwise_group(n)))
        for n in self.nodes:  # cats first: their pieces' one-input chains (-x) join them
            if n in self.cats and n not in self.group_of:
                self._add(GroupSpec("pointwise", self._pointwise_group(n)))
        # largest first: a big group takes in the small values it reads (a layer's scale), see
        # _absorb_small_producers
        for n in sorted(self.nodes, key=lambda n: (-max(_numel(n), 0), self.index[n])):
            if self.kind[n] == "pointwise" and n not in self.group_of:
                self._add(GroupSpec("pointwise", self._pointwise_group(n)))
        self.groups = merge_gemv_prologues(merge_pointwise_groups(self.groups, self.index), self.index)
        self.groups = merge_independent_pointwise(self.groups, self.index)
        self.group_of = {n: i for i, g in enumerate(self.groups) for n in g.nodes}
        for n in self.nodes:
            if self.kind[n] is not None and n not in self.group_of:
                self._add(GroupSpec("aten", [n]))
        self.groups.sort(key=lambda g: self.index[g.nodes[0]])
        return self.groups

    def _add(self, group: GroupSpec) -> None:
        group.nodes.sort(key=self.index.__getitem__)
        for n in group.nodes:
            assert n not in self.group_of, f"{n.name} would be in two groups"
            self.group_of[n] = len(self.groups)
        self.groups.append(group)

    def _free(self, n: fx.Node) -> bool:
        return n not in self.group_of

    def _safe(self, members: Set[fx.Node], extra: Sequence[fx.Node] = ()) -> bool:
        return safe(self.index, members, extra)

    # gemm / conv ------------------------------------------------------------------------
    def _epilogue_chain(self, anchor: fx.Node) -> List[fx.Node]:
        """The anchor and the element-wise ops computed from its result alone (plus outside
        operands that precede it): a chain (bias, activation, residual add) or a DAG such as
        GPT-2's tanh GELU, ``0.5*h*(1+tanh(c*(h+0.044715*h^3)))``, which reads ``h`` three times."""
        members = {anchor}
        numel = _numel(anchor)

        def joins(u: fx.Node) -> bool:
            if not self._free(u) or _numel(u) != numel or _dequantizes(u):
                return False
            if is_reshape(u):
                return u.args[0] in members
            return self.kind[u] == "pointwise" and u not in self.pointwise_only and all(
                _shape(a) == _shape(u) for a in u.all_input_nodes if a in members)

        self._grow(members, joins)
        self._trim_sinks(members, anchor)
        return self._trim_reshapes(members)

    def _trim_sinks(self, members: Set[fx.Node], anchor: fx.Node) -> None:
        """Leave out of an epilogue the one-input ops that end it when their readers' kernels
        compute them as cheaply: read only by reductions (``abs`` of a dynamic quantize's row
        amax: the reduction's prologue), or a widening cast read by fusable ops (a quantize's
        fp32 conversion). The epilogue then stores the narrower value they read, once, instead
        of each of them (a dynamic FP8 MLP layer stored its output as fp32 twice)."""
        changed = True
        while changed:
            changed = False
            for t in sorted(members, key=self.index.__getitem__, reverse=True):
                if t is anchor or any(u in members for u in t.users) or len(t.all_input_nodes) != 1:
                    continue
                # one reader, which can take it in (with several, none could: it would be a
                # kernel of its own)
                if t.all_input_nodes[0] not in members or len(t.users) != 1:
                    continue
                kinds = {self.kind.get(u) for u in t.users}
                widening = is_op(t, (aten._to_copy,)) and _itemsize(t) > _itemsize(t.all_input_nodes[0])
                if kinds == {"reduction"} or (widening and kinds <= {"pointwise", "reduction"}):
                    members.discard(t)
                    changed = True

    def _grow(self, members: Set[fx.Node], joins) -> None:
        """Add users of ``members`` that ``joins`` accepts, each with the producers it needs
        (``_with_producers``), until nothing more joins."""
        changed = True
        while changed:
            changed = False
            for u in sorted({u for m in members for u in m.users}, key=self.index.__getitem__):
                if u in members or not joins(u):
                    continue
                add = self._with_producers(u, members, joins)
                if add:
                    members.update(add)
                    changed = True

    def _with_producers(self, node: fx.Node, members: Set[fx.Node], joins) -> Optional[Set[fx.Node]]:
        """``node`` plus the free producers it reads that are computed after the group starts
        and used only inside it (the other branch of a diamond), or None when that is unsafe."""
        add = {node}
        first = min(self.index[m] for m in members)
        stack = [(node, _shape(node))]  # (a node, the shape its producers must have)
        while stack:
            cur, frame = stack.pop()
            if cur in self.remapped:
                continue  # its input is loaded at another index: a group input, never a member
            for p in cur.all_input_nodes:
                if self._reads_members(p, members | add):
                    return None
                if p in members or p in add:
                    continue
                if self._constant(p):  # a fill of its own reader: any kernel computes it
                    add.add(p)
                    continue
                if self.index[p] < first:
                    continue
                if self.kind.get(p) != "pointwise" or not self._free(p):
                    return None
                if p in self.pointwise_only and not self._pointwise_seeded(members):
                    return None
                if cur in self.cats or (cur is not node and _shape(cur) != _shape(node)):
                    # a cat's piece (and its own producers) has the piece's shape: a chain of
                    # one-input ops read by the cat alone (kernels/pointwise generates those)
                    if not (self._pointwise_seeded(members) and p not in self.cats and list(p.users) == [cur]
                            and len(p.all_input_nodes) == 1 and _shape(p) == (frame if cur is not node and
                                                                              cur not in self.cats else _shape(p))):
                        return None
                    add.add(p)
                    stack.append((p, _shape(p)))
                    continue
                if _shape(p) != frame:
                    return None
                add.add(p)
                stack.append((p, frame))
        inside = members | add
        if any(u not in inside for p in add - {node} for u in p.users):
            return None  # a producer also feeds something outside: it would be a second output
        return add if self._safe(members, add) else None

    def _trim_reshapes(self, members: Set[fx.Node]) -> List[fx.Node]:
        """Drop reshapes that end the group: they are free outside the kernel."""
        changed = True
        while changed:
            changed = False
            for n in list(members):
                if is_reshape(n) and len(members) > 1 and not any(u in members for u in n.users):
                    members.discard(n)
                    changed = True
        return list(members)

    # reductions -------------------------------------------------------------------------
    def _reduction_group(self, anchor: fx.Node) -> List[fx.Node]:
        x_shape, dims = _reduction_frame(anchor)
        members = {anchor} | self._getitems(anchor)
        self._grow_prologue(members, x_shape)
        changed = True
        while changed:
            changed = False
            for n in sorted({u for m in members for u in m.users}, key=self.index.__getitem__):
                if n in members or not self._free(n) or n.op != "call_function":
                    continue
                add = self._reduction_member(n, members, x_shape, dims)
                if add and self._safe(members, add):
                    members.update(add)
                    changed = True
        return self._trim_views(members)

    def _piece_chain(self, piece: fx.Node, cat: fx.Node) -> List[fx.Node]:
        """The free one-input pointwise ops computing ``piece`` of ``cat``, each read by the next
        alone (``neg`` of a slice), down to a node outside them; empty when there are none."""
        chain, cur, reader = [], piece, cat
        while (isinstance(cur, fx.Node) and self.kind.get(cur) == "pointwise" and cur not in self.cats
               and self._free(cur) and list(cur.users) == [reader] and len(cur.all_input_nodes) == 1):
            chain.append(cur)
            cur, reader = cur.all_input_nodes[0], cur
        return chain

    def _reads_members(self, n: fx.Node, members: Set[fx.Node]) -> bool:
        """``n`` is a roll / indexed load whose input (or index table) is in ``members``: the
        kernel loads those at other indices than the element's, from group inputs only."""
        return n in self.remapped and any(a in members for a in indexed_operands(n) or ())

    def _constant(self, p: fx.Node) -> bool:
        """A free fill that reads no tensor (``_fills_per_reader`` made one per reader)."""
        return self._free(p) and is_fill(p) and not p.all_input_nodes

    def _constants_of(self, n: fx.Node) -> List[fx.Node]:
        return [p for p in n.all_input_nodes if self._constant(p)]

    def _pointwise_seeded(self, members: Set[fx.Node]) -> bool:
        """Whether ``members`` is a pointwise group (no anchor of another kind)."""
        return all(self.kind.get(m) in ("pointwise", None) for m in members)

    def _reduction_member(self, n: fx.Node, members, x_shape, dims) -> List[fx.Node]:
        if n in self.pointwise_only:
            return []
        if self.kind[n] == "reduction":
            if _reduction_frame(n) == (x_shape, dims):
                return [n, *self._getitems(n)]
            return []
        if self.kind[n] == "pointwise" and (broadcasts_to(_shape(n), x_shape) or self._rides_on(n, members)):
            return [n, *self._constants_of(n), *self._epilogue_producers(n, members, x_shape)]
        if _is_unit_view(n) and n.args[0] in members:
            return [n]
        return []

    def _epilogue_producers(self, n: fx.Node, members: Set[fx.Node], x_shape) -> List[fx.Node]:
        """The free one-input pointwise producers of epilogue op ``n`` that only ``n`` and the
        group read, of the frame's shape, reading a value from outside (a dynamic quantize's fp32
        conversion of the row the reduction read): computed in the epilogue, not stored apart."""
        return [p for p in n.all_input_nodes
                if p not in members and self._free(p) and self.kind.get(p) == "pointwise" and p not in self.pointwise_only
                and len(p.all_input_nodes) == 1 and p.all_input_nodes[0] not in members
                and _shape(p) == tuple(x_shape) and all(u in members or u is n for u in p.users)]

    def _rides_on(self, n: fx.Node, members: Set[fx.Node]) -> bool:
        """``n`` is laid over the dims of a member value of its own shape (amax's per-row result
        without keepdim, (N,) of an (N, K) row reduction), and reads nothing else but members and
        single values: the reduction kernel knows which X dims those are."""
        tensors = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        return any(a in members and _shape(a) == _shape(n) for a in tensors) and \
            all(a in members or _numel(a) == 1 or self._constant(a) for a in tensors)

    def _grow_prologue(self, members: Set[fx.Node], x_shape) -> None:
        changed = True
        while changed:
            changed = False
            for m in list(members):
                for p in m.all_input_nodes:
                    if p in members or not self._free(p) or self.kind.get(p) != "pointwise" or p in self.pointwise_only:
                        continue
                    if self._constant(p):
                        members.add(p)
                        changed = True
                        continue
                    if _shape(p) != x_shape or any(u not in members for u in p.users):
                        continue
                    if any(a in self.pointwise_only and self._free(a) for a in p.all_input_nodes):
                        continue  # it joins that cat's / embedding's kernel instead: one launch fewer
                    if self._safe(members, [p]):
                        members.add(p)
                        changed = True

    def _getitems(self, n: fx.Node) -> Set[fx.Node]:
        return {u for u in n.users if u.target is operator.getitem}

    def _trim_views(self, members: Set[fx.Node]) -> List[fx.Node]:
        """Drop views that end a group (their value is as cheap to make outside)."""
        members = set(members)
        changed = True
        while changed:
            changed = False
            for n in list(members):
                if _is_unit_view(n) and not any(u in members for u in n.users):
                    members.discard(n)
                    changed = True
        return list(members)

    # pointwise --------------------------------------------------------------------------
    def _pointwise_group(self, seed: fx.Node) -> List[fx.Node]:
        members = {seed}
        shape = _shape(seed)
        if seed in self.cats:
            for p in seed.args[0]:
                chain = self._piece_chain(p, seed)
                if chain and self._safe(members, chain):
                    members.update(chain)
        self._grow(members, lambda n: self._free(n) and self.kind.get(n) == "pointwise" and _shape(n) == shape
                   and not self._reads_members(n, members))
        self._absorb_small_producers(members, shape)
        return list(members)

    def _absorb_small_producers(self, members: Set[fx.Node], shape: Tuple[int, ...]) -> None:
        """Take in the free pointwise producers whose shape broadcasts to the group's, however
        early: a QAT layer's scale chain (0-d, or per channel) is then computed inside the
        fake-quantize kernel that reads it (the code generator evaluates every value at the
        group's shape; one read by others is also stored, at its own shape)."""
        changed = True
        while changed:
            changed = False
            for m in sorted(members, key=self.index.__getitem__):
                for p in m.all_input_nodes:
                    if p in members or not self._free(p) or self.kind.get(p) != "pointwise" or p in self.cats \
                            or p in self.gathered:
                        continue
                    if broadcasts_to(_shape(p), shape) and self._safe(members, [p]):
                        members.add(p)
                        changed = True


# ----------------------------------------------------------------------------- helpers
def _dequantizes(node: fx.Node) -> bool:
    """A widening cast of 8-bit codes (a dequantize's first step): it joins the kernel that reads
    the codes, not the one that writes them, which would write the float value back (a residual
    add reading a block input's codes, fx_passes/quant_residual.py)."""
    if not is_op(node, (aten._to_copy,)) or not node.all_input_nodes:
        return False
    src, out = (n.meta.get("val") for n in (node.all_input_nodes[0], node))
    return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype in _CODES
            and out.dtype.is_floating_point)


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}" if target.namespace != "aten" else target._opname
    return getattr(target, "__name__", str(target))


def _is_unit_view(node: fx.Node) -> bool:
    """A reshape that only adds or removes size-1 dims."""
    if not is_op(node, _UNIT_VIEWS) or not isinstance(node.args[0], fx.Node):
        return False
    a, b = _shape(node.args[0]), _shape(node)
    return [s for s in a if s != 1] == [s for s in b if s != 1]


def _shape(node: fx.Node) -> Tuple[int, ...]:
    v = node.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _itemsize(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dtype.itemsize if isinstance(val, torch.Tensor) else 0


def _numel(node: fx.Node) -> int:
    v = node.meta.get("val")
    return v.numel() if isinstance(v, torch.Tensor) else -1




def _reduction_frame(node: fx.Node) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(shape reduced over, sorted reduced dims) of a reduction node."""
    x = node.args[0]
    shape = _shape(x)
    rank = len(shape)
    packet = node.target.overloadpacket
    if packet in (aten._softmax, aten._log_softmax):
        dims = [node.args[1]]
    elif packet is aten.native_layer_norm:
        dims = list(range(rank - len(node.args[1]), rank))
    else:
        dims = _argument(node, "dim")
        if dims is None or dims == []:
            dims = list(range(rank))  # no dim argument (sum.default, var.default): everything
        elif isinstance(dims, int):
            dims = [dims]
    return shape, tuple(sorted(d % rank for d in dims)) if rank else ()


def _argument(node: fx.Node, name: str):
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name == name:
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, arg.default_value if arg.has_default_value() else None)
    return None


__all__ = ["GroupSpec", "partition", "classify", "fusable_pointwise", "fusable_cat", "fusable_gather", "gather_operands", "validate"]
