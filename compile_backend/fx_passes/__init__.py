"""Graph passes over ATen graphs, in the order they run (see README.md in this folder)."""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .attention import fuse_attention
from .base import Pass, PassContext, PassCounts, PassRegistry, total
from .batchnorm import fold_batchnorm
from .cleanup import eliminate_dead_code
from .cleanup_rules import eliminate_common_subexpressions, remove_noops
from .constant_fold import constant_fold
from .copies import drop_copies
from .gathers import canonical_gathers
from .gemm_bias import fold_gemm_bias
from .layout import choose_layout
from .merge_gemms import merge_parallel_gemms
from .norms import canonical_norms
from .partition import GroupSpec, partition
from .patchify import patchify_convolutions
from .precision import lower_precision, lower_upcast_attention
from .quantize import quantize
from .row_select import select_rows_first
from .sink_views import sink_views
from .weight_only import with_weight_only

# Order matters: casts from lower_precision would hide conv/GEMM from BN folding and the merge,
# and the attention op it also casts exists only after fuse_attention.
REGISTRY = PassRegistry()
REGISTRY.register("eliminate_common_subexpressions")(eliminate_common_subexpressions)
REGISTRY.register("remove_noops")(remove_noops)
REGISTRY.register("canonical_gathers", inference_only=True)(canonical_gathers)  # rotary spellings the kernels take
REGISTRY.register("canonical_norms")(canonical_norms)  # group norms, 2-norms -> layer norms, sums
REGISTRY.register("select_rows_first")(select_rows_first)
REGISTRY.register("fold_batchnorm", inference_only=True)(fold_batchnorm)
REGISTRY.register("fold_gemm_bias", inference_only=True)(fold_gemm_bias)
REGISTRY.register("patchify_convolutions", inference_only=True)(patchify_convolutions)  # before quantize: a linear then
REGISTRY.register("merge_parallel_gemms", inference_only=True)(merge_parallel_gemms)
REGISTRY.register("fuse_attention", inference_only=True)(fuse_attention)
REGISTRY.register("lower_upcast_attention", inference_only=True)(lower_upcast_attention)  # before quantize
REGISTRY.register("quantize", inference_only=True)(with_weight_only(quantize))  # W8A8, or weight-only
REGISTRY.register("choose_layout", inference_only=True)(choose_layout)
REGISTRY.register("lower_precision", inference_only=True)(lower_precision)
REGISTRY.register("drop_copies", inference_only=True)(drop_copies)
REGISTRY.register("sink_views", inference_only=True)(sink_views)  # after the casts and quantizes exist
REGISTRY.register("constant_fold", inference_only=True)(constant_fold)
REGISTRY.register("eliminate_dead_code")(eliminate_dead_code)


def run_passes(gm: fx.GraphModule, ctx: PassContext, until: Optional[str] = None) -> PassCounts:
    """Run every registered pass (or those before ``until``); returns totals and per-rule counts."""
    return REGISTRY.run(gm, ctx, until)


__all__ = ["PassContext", "Pass", "PassCounts", "REGISTRY", "run_passes", "partition", "GroupSpec", "total"]
