"""Where a compiled training graph's fake quantization runs, for the report (issue #19: the
fake-quant ops of forward and backward run inside our kernels, not as separate ATen ops).

An op is fake-quant work when it was traced from ``quant/fake_quant.py`` (the straight-through
forward and backward) or from ``kernels/quant_ref.py`` (the numerics reference they call, and the
weight scale ``QATLayer`` computes): every ATen node keeps the source line it came from
(``meta['stack_trace']``). ``mark_fake_quant`` records that as ``meta['fake_quant']`` before the
engine cache stores the graph (stack traces are not stored); the summary reads the mark. A graph
without such ops gets no summary.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch.fx as fx

_SOURCES = (os.path.join("quant", "fake_quant.py"), os.path.join("kernels", "quant_ref.py"))


#: node meta key of the mark (kept by the engine cache: cache/graph_file.STORED_META)
MARK = "fake_quant"


def mark_fake_quant(gm: fx.GraphModule) -> int:
    """Mark the nodes traced from the fake-quant code; returns how many."""
    marked = 0
    for node in gm.graph.nodes:
        trace = node.meta.get("stack_trace") or ""
        if node.op == "call_function" and any(s in trace for s in _SOURCES):
            node.meta[MARK] = True
            marked += 1
    return marked


def is_fake_quant(node: fx.Node) -> bool:
    """A marked op (a group's placeholder keeps its producer's meta: not counted)."""
    return node.op == "call_function" and bool(node.meta.get(MARK))


def fake_quant_placement(graph: fx.Graph) -> Optional[Dict[str, Any]]:
    """{"ops": fake-quant ops in groups, "kernels": {kind: kernels of ours holding some},
    "aten": groups holding some that run in ATen} over the engine graph's group calls; None when
    the graph has no fake quantization."""
    ops, kernels, aten = 0, {}, 0
    for node in graph.nodes:
        call = node.target
        if node.op != "call_function" or not hasattr(call, "group"):
            continue
        n = sum(1 for m in call.group.gm.graph.nodes if is_fake_quant(m))
        if not n:
            continue
        ops += n
        kernel = call.kernel
        if kernel is None or kernel.impl == "aten":
            aten += 1
        else:
            kernels[call.group.kind] = kernels.get(call.group.kind, 0) + 1
    return {"ops": ops, "kernels": dict(sorted(kernels.items())), "aten": aten} if ops else None


__all__ = ["MARK", "mark_fake_quant", "fake_quant_placement", "is_fake_quant"]
