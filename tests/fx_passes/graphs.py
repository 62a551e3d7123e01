"""Test helper: the ATen graphs the passes see, traced the way the pipeline traces them.

``inference_graph(model, *inputs)`` runs ``torch.compile`` with a recording backend that goes
through :func:`compile_backend.capture.lower` (Dynamo -> AOTAutograd), then specialises and
freezes the ATen graph exactly as ``pipeline.compile_graph`` does before its passes run:
parameters and buffers become ``get_attr`` constants, user inputs stay placeholders, every node
has ``meta['val']``. ``training_graph`` returns the forward graph of a training step (nothing
frozen). ``run`` executes a traced graph on the user inputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence

import torch
import torch.fx as fx

from compile_backend import capture
from compile_backend.fx_passes.base import PassContext, total
from compile_backend.fx_passes.constant_fold import freeze


@dataclasses.dataclass
class Traced:
    gm: fx.GraphModule
    inputs: List[Any]  # what the graph's placeholders take, in order
    role: str


def _trace(model: torch.nn.Module, inputs: Sequence[Any], training: bool) -> Traced:
    import torch._dynamo

    seen: dict = {}

    def compile_aten(aten_gm, *, role, name, frozen):
        seen.setdefault(role, (aten_gm, frozen))

        def run(*args):
            seen.setdefault(role + ".args", list(args))
            return aten_gm(*args)

        return run

    def backend(gm, example_inputs):
        return capture.lower(gm, example_inputs, compile_aten)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    if training:
        compiled(*inputs)
        role = "forward"
    else:
        with torch.no_grad():
            compiled(*inputs)
        role = "inference"
    torch._dynamo.reset()
    aten_gm, frozen = seen[role]
    args = seen[role + ".args"]
    gm = capture.specialize(aten_gm, args)
    bound = freeze(gm, frozen, args) if frozen else {}
    user_args = [a for i, a in enumerate(args) if i not in bound]
    return Traced(gm, user_args, role)


def inference_graph(model: torch.nn.Module, *inputs: Any) -> Traced:
    """The frozen inference ATen graph of ``model`` (switched to eval mode)."""
    return _trace(model.eval(), inputs, training=False)


def training_graph(model: torch.nn.Module, *inputs: Any) -> Traced:
    """The forward ATen graph of a training step of ``model`` (train mode, nothing frozen)."""
    model.train()
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    return _trace(model, inputs, training=True)


def run(traced: Traced, gm: Optional[fx.GraphModule] = None) -> Any:
    gm = gm if gm is not None else traced.gm
    gm.recompile()
    with torch.no_grad():
        out = gm(*traced.inputs)
    return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out


def ctx(training: bool = False, device: str = "cpu", precision: str = "fp32") -> PassContext:
    return PassContext(training=training, precision=precision, device=torch.device(device))


def targets(gm: fx.GraphModule) -> List[str]:
    """The call_function targets of ``gm`` in order, by short name (``addmm``, ``getitem``...)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            t = n.target
            out.append(t._opname if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t)))
    return out


def count(gm: fx.GraphModule, name: str) -> int:
    return targets(gm).count(name)


def checked_run(traced: Traced) -> Any:
    """A rewritten graph linted, its meta checked against fresh propagation, then run."""
    traced.gm.graph.lint()
    check_meta(traced.gm)
    return run(traced)


def rewritten(pass_fn, rule: str, model: torch.nn.Module, *inputs: Any, tol: float = 1e-5):
    """(traced graph, matches of ``rule``) after ``pass_fn`` rewrote ``model``'s inference graph:
    linted, its meta checked, its single output (or outputs) against eager within ``tol``."""
    t = inference_graph(model, *inputs)
    with torch.no_grad():
        expected = model(*inputs)
    n = pass_fn(t.gm, ctx())[rule]
    got = checked_run(t)
    got = got[0] if isinstance(got, (list, tuple)) and len(got) == 1 else got
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    return t, n


def check_meta(gm: fx.GraphModule) -> None:
    """Every tensor node's meta['val'] matches a fresh fake propagation (shape, stride, dtype)."""
    from compile_backend.fx_passes.rules import fake_value

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        old = n.meta.get("val")
        assert old is not None, f"{n.name} has no meta['val']"
        new = fake_value(n)
        _same_meta(old, new, n.name)


def _same_meta(old, new, name):
    if isinstance(new, torch.Tensor):
        assert isinstance(old, torch.Tensor), name
        assert tuple(old.shape) == tuple(new.shape), f"{name}: shape {tuple(old.shape)} != {tuple(new.shape)}"
        assert old.dtype == new.dtype, f"{name}: dtype {old.dtype} != {new.dtype}"
        if old.numel() > 1:
            assert _strides(old) == _strides(new), f"{name}: stride {old.stride()} != {new.stride()}"
    elif isinstance(new, (list, tuple)):
        assert isinstance(old, (list, tuple)) and len(old) == len(new), name
        for a, b in zip(old, new):
            _same_meta(a, b, name)


def _strides(t: torch.Tensor):
    # strides of size-1 dims carry no meaning
    return tuple(s for s, n in zip(t.stride(), t.shape) if n != 1)


class Builder:
    """A hand-written ATen graph: placeholders and constants carry fake ``meta['val']``, every
    op gets its ``meta['val']`` the way the passes compute it (``rules.call``)."""

    def __init__(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.mode = FakeTensorMode()
        self.inputs: List[Any] = []

    def input(self, value: torch.Tensor) -> fx.Node:
        node = self.graph.placeholder(f"x{len(self.inputs)}")
        node.meta["val"] = self.mode.from_tensor(value)
        self.inputs.append(value)
        return node

    def const(self, name: str, value: torch.Tensor) -> fx.Node:
        self.root.register_buffer(name, value)
        node = self.graph.get_attr(name)
        node.meta["val"] = self.mode.from_tensor(value)
        return node

    def op(self, target, *args, **kwargs) -> fx.Node:
        from compile_backend.fx_passes.rules import call

        with self.mode:  # ops that read no tensor (zeros, scalar_tensor) find this graph's mode
            return call(self.graph, target, args, kwargs)

    def build(self, *outputs: fx.Node) -> Traced:
        self.graph.output(tuple(outputs))
        return Traced(fx.GraphModule(self.root, self.graph), list(self.inputs), "inference")


def show(gm: fx.GraphModule) -> str:
    """The graph as stable text: inputs x<i>, constants by name, values v<i> in order."""
    names = {}
    lines = []
    inputs = values = 0
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            names[n] = f"x{inputs}"
            inputs += 1
        elif n.op == "get_attr":
            names[n] = n.target
        elif n.op == "call_function":
            names[n] = f"v{values}"
            values += 1
            t = n.target
            op = t._opname if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))
            if isinstance(t, torch._ops.OpOverload) and t.namespace != "aten":
                op = f"{t.namespace}.{op}"
            args = [_fmt(a, names) for a in n.args] + [f"{k}={_fmt(v, names)}" for k, v in n.kwargs.items()]
            lines.append(f"{names[n]} = {op}({', '.join(args)})")
        elif n.op == "output":
            lines.append(f"return {_fmt(n.args[0], names)}")
    return "\n".join(lines)


def _fmt(a, names) -> str:
    if isinstance(a, fx.Node):
        return names[a]
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_fmt(x, names) for x in a) + "]"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, torch.memory_format):
        return str(a).replace("torch.", "")
    return repr(a)


def pass_order():
    """The order the passes are meant to be registered in (see fx_passes/README.md)."""
    from compile_backend.fx_passes.attention import fuse_attention
    from compile_backend.fx_passes.batchnorm import fold_batchnorm
    from compile_backend.fx_passes.cleanup import eliminate_dead_code
    from compile_backend.fx_passes.cleanup_rules import eliminate_common_subexpressions, remove_noops
    from compile_backend.fx_passes.gathers import canonical_gathers
    from compile_backend.fx_passes.constant_fold import constant_fold
    from compile_backend.fx_passes.copies import drop_copies
    from compile_backend.fx_passes.gemm_bias import fold_gemm_bias
    from compile_backend.fx_passes.layout import choose_layout
    from compile_backend.fx_passes.merge_gemms import merge_parallel_gemms
    from compile_backend.fx_passes.row_select import select_rows_first

    return [eliminate_common_subexpressions, remove_noops, canonical_gathers, select_rows_first, fold_batchnorm, fold_gemm_bias, merge_parallel_gemms,
            fuse_attention, choose_layout, drop_copies, constant_fold, eliminate_dead_code]


def run_passes(gm: fx.GraphModule, context: PassContext) -> dict:
    """Every pass in :func:`pass_order` (skipping what the context rules out); {name: count}."""
    counts = {}
    for fn in pass_order():
        counts[fn.__name__] = total(fn(gm, context))
    gm.graph.lint()
    gm.recompile()
    return counts
