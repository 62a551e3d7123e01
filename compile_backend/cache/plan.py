"""Engine plans on disk: what a cold compile decided, so a warm process only rebuilds it.

An entry (``cache.EngineCache``, keyed by ``cache.CacheKey``) holds an engine's *plan*:

- ``meta["groups"]``: per kernel group, in graph order, its name, kind, ops, the implementation
  chosen, its configuration, the sha256 of its generated source, and the fallback entries when
  ATen runs it;
- ``meta["tuning"]``: every tuning decision the build used (the timing-cache records), so a warm
  build times nothing even when the timing cache itself was pruned;
- ``files``: the generated Triton source of each kernel and the engine's own Python source,
  kept for inspection and for checking that a rebuild generated the same code; and
  ``graph.json``, the graph the fx passes made, as data (``post_pass.py``, ``graph_file.py``);
- tensors: only constants the passes made from no weight (weights, and everything folded from
  them, are bound at load: the refit path).

Nothing read from an entry is ever executed as code: a warm build reads the stored post-pass
graph (ATen operators and a closed set of functions, checked node by node) instead of running
the passes (when it was not stored or is refused, the passes run as on a cold start and the
report says why), regenerates each kernel's source, checks its sha256 against the plan, and
takes the stored decision (tuned winner, validation verdict, ATen fallback) instead of searching
again. A group whose regenerated source differs from the plan is built and validated as on a
cold start, and the report says so. The pass code is in the key through ``source_hash`` (every
``.py`` file of the package, fx_passes included), so a changed pass never reads an old graph.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from ..kernels.base import sha256
from .entry import Artifacts
from ..capture import PARAM_NAMES_META
from .key import CacheKey, tensor_digest

log = logging.getLogger("compile_backend")

PLAN_FORMAT = 2  # 2: entries carry the post-pass graph


def graph_text(aten_gm: fx.GraphModule, role: str, frozen: Optional[Sequence[bool]]) -> str:
    """Canonical text of the ATen graph: its code (ops, arguments, wiring), which inputs are
    frozen weights, the role, and the contents of constants baked into the graph (not weights)."""
    from ..kernels.select import BUILDERS  # which builders may serve each group kind

    parts = [f"plan-format={PLAN_FORMAT}", f"role={role}",
             "frozen=" + "".join("1" if f else "0" for f in (frozen or ())),
             "builders=" + json.dumps(BUILDERS, sort_keys=True), aten_gm.code]
    for node in aten_gm.graph.nodes:
        if node.op == "get_attr":
            value: Any = aten_gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                parts.append(f"const {node.target} {tensor_digest([value])}")
    return "\n".join(parts)


def cache_key(aten_gm, args, *, role, frozen, options, device):
    text = graph_text(aten_gm, role, frozen)
    quant = getattr(options, "quant", None)
    if quant is not None:  # quantized layers are looked up by parameter name
        text += "\nparam-names=" + json.dumps(aten_gm.meta.get(PARAM_NAMES_META))
    return CacheKey.create(text, list(args), options, device=device,
                           calibration_hash=None if quant is None else f"{type(quant).__name__}:{quant.digest()}")


@dataclasses.dataclass
class Plan:
    """The decisions of one engine build: per group name, and the tuning records it used."""

    groups: Dict[str, Dict[str, Any]]
    tuning: Dict[str, Dict[str, Any]]

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Optional["Plan"]:
        if meta.get("plan_format") != PLAN_FORMAT or not isinstance(meta.get("groups"), list):
            return None
        groups = {g["name"]: g for g in meta["groups"] if isinstance(g, dict) and "name" in g}
        tuning = meta.get("tuning") if isinstance(meta.get("tuning"), dict) else {}
        return cls(groups, dict(tuning))

    def decision(self, group_name: str) -> Optional[Dict[str, Any]]:
        return self.groups.get(group_name)


class PlanTimings:
    """Timing-cache front for one build: serves tuning records from a loaded plan first, then
    from the on-disk timing cache, and remembers every record the build used (for the entry).

    It has the ``get``/``put`` interface the tuner expects of ``TimingCache``."""

    def __init__(self, backing: Any = None, plan: Optional[Plan] = None):
        self.backing = backing
        self.seed = dict(plan.tuning) if plan is not None else {}
        self.used: Dict[str, Dict[str, Any]] = {}
        self.from_plan = 0

    @staticmethod
    def _id(key: Mapping[str, Any], env: Mapping[str, str]) -> str:
        return hashlib.sha256(json.dumps([dict(key), dict(env)], sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: Mapping[str, Any], env: Mapping[str, str]) -> Optional[Dict[str, Any]]:
        ident = self._id(key, env)
        record = self.seed.get(ident)
        if record is not None:
            self.from_plan += 1
        elif self.backing is not None:
            record = self.backing.get(key, env)
        if record is not None:
            self.used[ident] = _plain(record)
        return dict(record) if record is not None else None

    def put(self, key: Mapping[str, Any], env: Mapping[str, str], record: Mapping[str, Any]) -> None:
        self.used[self._id(key, env)] = _plain({**dict(record), "key": dict(key)})
        if self.backing is not None:
            self.backing.put(key, env, record)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def artifacts(calls: Sequence[Any], fallbacks: Mapping[str, List[Dict[str, str]]],
              timings: PlanTimings, engine_source: str):
    """The entry for a finished cold build: the plan as meta, sources as files, no tensors."""
    files = {"engine.py": engine_source.encode()}
    groups = []
    for call in calls:
        kernel = call.kernel
        source = getattr(kernel, "source", None)
        if source is not None:
            files[f"{call.group.name}.py"] = source.encode()
        groups.append({
            "name": call.group.name, "kind": call.group.kind, "ops": list(call.group.ops),
            "impl": kernel.impl, "config": _plain(kernel.config), "source_sha256": sha256(source),
            "fallbacks": list(fallbacks.get(call.group.name, [])),
        })
    meta = {"plan_format": PLAN_FORMAT, "groups": groups, "tuning": timings.used}
    return Artifacts(files=files, tensors={}, meta=meta)
