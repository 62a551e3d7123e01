"""Graph passes over ATen graphs, in the order they run (see README.md in this folder)."""
from __future__ import annotations

import torch.fx as fx

from .base import Pass, PassContext, PassRegistry
from .cleanup import eliminate_dead_code
from .constant_fold import constant_fold
from .partition import GroupSpec, partition
from .precision import lower_precision

REGISTRY = PassRegistry()
REGISTRY.register("lower_precision", inference_only=True)(lower_precision)
REGISTRY.register("constant_fold", inference_only=True)(constant_fold)
REGISTRY.register("eliminate_dead_code")(eliminate_dead_code)


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> dict:
    """Run every registered pass; returns {pass name: matches}."""
    return REGISTRY.run(gm, ctx)


__all__ = ["PassContext", "Pass", "REGISTRY", "run_passes", "partition", "GroupSpec"]
