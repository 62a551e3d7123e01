"""Dead-code elimination (the other clean-up rules live in cleanup_rules.py)."""
from __future__ import annotations

import torch.fx as fx

from .base import PassContext


def eliminate_dead_code(gm: fx.GraphModule, ctx: PassContext) -> int:
    """Remove nodes whose values nobody uses; mutating ops are impure and stay."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    # get_attr constants left without users are dropped from the module too, but not the inputs
    # of the constant programs (refit recomputes folded constants from them: the quantize pass's
    # 0/1 constants feed a weight's scale steps; dropped, the post-pass graph could not be stored)
    from .constant_fold import constant_programs

    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used |= {name for program in constant_programs(gm) for name in program.inputs}
    for name in [k for k in list(gm._buffers) + list(gm._parameters) if k not in used]:
        gm._buffers.pop(name, None)
        gm._parameters.pop(name, None)
    for name in [k for k, v in list(vars(gm).items()) if k.startswith("_folded_") and k not in used]:
        delattr(gm, name)
    return before - len(gm.graph.nodes)
