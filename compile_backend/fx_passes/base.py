"""The pass registry and what every pass receives.

A pass is ``fn(gm, ctx) -> int | {rule name: int}``: it rewrites ``gm`` in place and returns
how many times it fired, in total or per rule (passes made of ``rules.Rule`` data return
``apply_rules``'s per-rule counts). The report shows the total under the pass's registered name
and the per-rule counts beside it (``fold_batchnorm.conv_bn: 53``). Passes run in registration
order (see ``fx_passes/__init__.py``); see ``fx_passes/README.md`` for the invariants they keep.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.fx as fx


@dataclasses.dataclass
class PassContext:
    """What a pass may know.

    training: the graph is part of a training step (forward or backward): numerics and
        buffers must stay exactly as eager computes them (no BN folding, no weight caching).
    precision: the Options precision (fp32 | tf32 | fp16 | bf16).
    device: where the graph runs.
    quant: what to quantize (``options["quant"]`` turned into a ``QuantRequest``), or None.
    Frozen weights appear in the graph as ``get_attr`` nodes; anything computed only from them
    can be folded (``constant_fold``) and is recomputed on refit.
    """

    training: bool = False
    precision: str = "fp32"
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    quant: Any = None  # fx_passes.quantize.QuantRequest when options ask for quantization
    # what the passes measured, for the report (the layer speed probes' tuner counters: "probes")
    stats: Dict[str, Any] = dataclasses.field(default_factory=dict)


PassFn = Callable[[fx.GraphModule, PassContext], Union[int, Dict[str, int]]]


def total(counts: Union[int, Mapping[str, int]]) -> int:
    """A pass's total matches, from its int or its per-rule counts."""
    return sum(counts.values()) if isinstance(counts, Mapping) else int(counts)


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    inference_only: bool = False


class PassRegistry:
    """Ordered passes; later issues register more without touching the pipeline."""

    def __init__(self) -> None:
        self._passes: List[Pass] = []

    def register(self, name: str, *, inference_only: bool = False, before: Optional[str] = None):
        def deco(fn: PassFn) -> PassFn:
            p = Pass(name, fn, inference_only)
            if any(q.name == name for q in self._passes):
                raise ValueError(f"pass {name!r} registered twice")
            if before is None:
                self._passes.append(p)
            else:
                idx = [q.name for q in self._passes].index(before)
                self._passes.insert(idx, p)
            return fn

        return deco

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self._passes)

    def run(self, gm: fx.GraphModule, ctx: PassContext, until: Optional[str] = None) -> "PassCounts":
        """Run the passes in order (those before ``until`` only, when given)."""
        counts = PassCounts()
        for p in self._passes:
            if p.name == until:
                break
            if p.inference_only and ctx.training:
                continue
            try:
                counts.add(p.name, p.fn(gm, ctx))
            except Exception as exc:
                if not hasattr(exc, "op"):
                    exc.op = f"pass {p.name}"  # the fallback warning names where it failed
                raise
        gm.graph.lint()
        gm.recompile()
        return counts


@dataclasses.dataclass
class PassCounts:
    """What the passes did: ``totals`` {pass: matches} and ``rules`` {pass: {rule: matches}}
    for the passes that count per rule."""

    totals: Dict[str, int] = dataclasses.field(default_factory=dict)
    rules: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)

    def add(self, name: str, counts: Union[int, Mapping[str, int]]) -> None:
        self.totals[name] = self.totals.get(name, 0) + total(counts)
        if isinstance(counts, Mapping):
            mine = self.rules.setdefault(name, {})
            for rule, n in counts.items():
                mine[rule] = mine.get(rule, 0) + int(n)
