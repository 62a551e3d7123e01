"""Capture: lower a Dynamo FX graph to ATen graphs with AOTAutograd.

Inference graphs (no input needs a gradient) come back as one graph; training graphs as a
forward and a backward graph. Each ATen graph is handed to ``compile_aten`` (the pipeline),
which returns a callable taking the graph's flat arguments.

Freezing: in inference, the arguments that are the model's parameters and buffers are marked
*frozen*. The pipeline turns them into constants so passes can fold them (BatchNorm folding,
weight transposes, casts), and checks on every call that they are still the same tensors at the
same version; when one changed (``load_state_dict``, an optimizer step between evaluations) it
refits: the folded constants are recomputed from the new weights before the call runs.

User inputs: for declared dynamic dimensions (``Options.profiles``) an inference graph also
carries, in ``aten_gm.meta[USER_INPUTS_META]``, which of its arguments are the compiled
function's tensor arguments, in signature order (Dynamo orders graph inputs by first use).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .profiles import USER_INPUTS_META

#: ``aten_gm.meta`` key: per graph argument, the parameter's / buffer's fully qualified name
#: (``encoder.layer.0.attention.self.query.weight``) or None; quantization names layers by it
PARAM_NAMES_META = "compile_backend_param_names"

#: ``aten_gm.meta`` key of a training graph: the argument indices whose tensors keep their
#: address from call to call (a forward's parameters and buffers; a backward's saved values,
#: everything but the output gradients), which a CUDA graph reads in place instead of copying
STATIC_INPUTS_META = "compile_backend_static_inputs"

#: ``aten_gm.meta`` key of a training forward: how many of its outputs go back to the caller
#: (AOT's ``num_forward_returns``: user outputs, new values of mutated inputs); the rest are saved
#: for the backward, which autograd drops after it, so a CUDA graph hands those out uncopied
RETURNED_OUTPUTS_META = "compile_backend_returned_outputs"

_graph_ids = itertools.count()


def frozen_mask(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> List[bool]:
    """Which Dynamo graph inputs are module parameters or buffers (candidates for freezing)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mask = []
    for i, value in enumerate(example_inputs):
        if isinstance(value, torch.nn.Parameter):
            mask.append(True)
            continue
        source = ""
        if i < len(placeholders):
            grapharg = placeholders[i].meta.get("grapharg")
            source = str(getattr(grapharg, "source", "")) if grapharg is not None else ""
        mask.append(isinstance(value, torch.Tensor) and "_buffers" in source)
    return mask


def lower(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    compile_aten: Callable[..., Callable],
) -> Callable:
    """Run AOTAutograd over ``gm`` and compile each resulting ATen graph with ``compile_aten``.

    ``compile_aten(aten_gm, role=..., name=..., frozen=...)`` gets the ATen graph, its role
    (inference | forward | backward), a readable name, and for inference the frozen mask.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graph_id = next(_graph_ids)
    mask = frozen_mask(gm, example_inputs)
    inputs = user_inputs(gm, example_inputs)
    names = param_names(gm)

    def compiler(role: str):
        def compile_one(aten_gm: fx.GraphModule, aot_args: Sequence[Any]) -> Callable:
            n_placeholders = sum(1 for n in aten_gm.graph.nodes if n.op == "placeholder")
            # AOT keeps Dynamo's argument order in inference; if it ever adds arguments
            # (subclasses, tokens) the mask no longer lines up, so nothing is frozen.
            frozen: Optional[List[bool]] = None
            if role == "inference" and n_placeholders == len(mask) and any(mask):
                frozen = mask
            if role == "inference" and n_placeholders == len(mask) and inputs is not None:
                aten_gm.meta[USER_INPUTS_META] = inputs
            if role == "inference" and n_placeholders == len(names):
                aten_gm.meta[PARAM_NAMES_META] = names
            if role != "inference":
                aten_gm.meta[STATIC_INPUTS_META] = static_inputs(aten_gm, role, mask)
            returned = returned_outputs() if role == "forward" else None
            if returned is not None:
                aten_gm.meta[RETURNED_OUTPUTS_META] = returned
            fn = compile_aten(aten_gm, role=role, name=f"graph{graph_id}.{role}", frozen=frozen)
            return make_boxed_func(fn)

        return compile_one

    return aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        decompositions=training_decompositions(),
        # an inference graph's writes into its inputs (a KV cache's update) stay in the graph as
        # copy_ nodes, so our kernels can write the input in place (input_writes.py); without
        # it AOT returns each new value and copies it over the input after the call
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def static_inputs(aten_gm: fx.GraphModule, role: str, mask: Sequence[bool]) -> frozenset:
    """A training graph's arguments at a stable address: the forward's parameters and buffers
    (Dynamo's order, when AOT added no argument), the backward's saved values (AOT names the
    output gradients ``tangents_*``; RNG seeds are per call)."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if role == "forward":
        return frozenset(i for i, m in enumerate(mask) if m) if len(placeholders) == len(mask) else frozenset()
    per_call = ("tangents", "bwd_seed", "bwd_base_offset")
    # tensors only: a dynamic graph's backward also takes the sizes it saved
    return frozenset(i for i, n in enumerate(placeholders)
                     if not n.name.startswith(per_call) and isinstance(n.meta.get("val"), torch.Tensor))


def returned_outputs() -> Optional[int]:
    """The forward being compiled: its outputs that AOT returns to the caller (the first ones;
    None when AOT's metadata does not say)."""
    context = torch._guards.TracingContext.try_get()
    n = getattr(getattr(context, "fw_metadata", None), "num_forward_returns", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


#: backward ops no kernel of ours runs as such, but whose decompositions (a sum over the row,
#: element-wise ops) one reduction kernel of ours runs: left whole, each ran in ATen. Not
#: native_layer_norm_backward: its decomposition became 8 kernels (row and column sums of a
#: recomputed x_hat), against ATen's 2-3
_DECOMPOSED = ("_softmax_backward_data", "_log_softmax_backward_data")


def training_decompositions() -> dict:
    """{op: decomposition} that AOTAutograd applies while tracing (backward graphs only: these
    ops appear nowhere else)."""
    from torch._decomp import get_decompositions

    return get_decompositions([getattr(torch.ops.aten, name) for name in _DECOMPOSED])


def user_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Optional[List[Tuple[int, str]]]:
    """(graph input index, argument name) of each tensor argument of the compiled function, in
    its signature order (``*args`` items as ``name[i]``); None when the traced frame is not the
    user's function (a graph resumed after a graph break) or Dynamo gives no source information."""
    code = _root_code()
    if code is None or code.co_name.startswith("torch_dynamo_resume_in_"):
        return None
    n_named = code.co_argcount + code.co_kwonlyargcount
    positional = list(code.co_varnames[:code.co_argcount])
    keyword_only = list(code.co_varnames[code.co_argcount:n_named])
    varargs = code.co_varnames[n_named] if code.co_flags & inspect.CO_VARARGS else None
    order = {name: pos for pos, name in enumerate(positional + [varargs] + keyword_only) if name}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        name, item = _argument(source)
        if name not in order or (item is not None) != (name == varargs):
            continue  # an attribute, a global, a tensor inside a container argument
        label = name if item is None else f"{name}[{item}]"
        found.append(((order[name], item or 0), i, label))
    return [(i, label) for _, i, label in sorted(found)]


def param_names(gm: fx.GraphModule) -> List[Optional[str]]:
    """Per Dynamo graph input, the FQN of the module parameter or buffer it is, else None."""
    out: List[Optional[str]] = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        out.append(_attribute_path(source))
    return out


_PATH_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def _attribute_path(source: Any) -> Optional[str]:
    """"enc.0.weight" for Dynamo's source ``L['self']._modules['enc']._modules['0']._parameters['weight']``."""
    try:
        text = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
    except Exception:  # a source kind without a name: no path
        return None
    if not isinstance(text, str) or not ("_parameters[" in text or "_buffers[" in text):
        return None
    root = re.match(r"^[LG]\['[^']+'\]", text)
    if root is None:
        return None
    rest, parts, pos = text[root.end():], [], 0
    for m in _PATH_PART.finditer(rest):
        if m.start() != pos:
            return None  # something the pattern does not understand: no name rather than a wrong one
        parts.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return ".".join(parts) if pos == len(rest) and parts else None


def _argument(source: Any) -> Tuple[Optional[str], Optional[int]]:
    """("x", None) for Dynamo's source of a local ``x``; ("args", 2) for ``args[2]``."""
    if type(source).__name__ == "LocalSource":
        return getattr(source, "local_name", None), None
    base, index = getattr(source, "base", None), getattr(source, "index", None)
    if type(source).__name__ == "GetItemSource" and type(base).__name__ == "LocalSource" \
            and isinstance(index, int):
        return getattr(base, "local_name", None), index
    return None, None


def _root_code() -> Any:
    """The code object of the frame Dynamo is compiling (the first one it traced)."""
    try:
        from torch._guards import TracingContext

        context = TracingContext.try_get()
        traced = getattr(context, "traced_code", None) if context is not None else None
        return traced[0] if traced else None
    except Exception:  # private API: without it profiles do not apply, nothing else changes
        return None


def is_symbolic(gm: fx.GraphModule) -> bool:
    """True when the graph's shapes are symbolic (Dynamo marked a dimension dynamic)."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape):
            return True
    return False


def specialize(gm: fx.GraphModule, args: Sequence[Any]) -> fx.GraphModule:
    """A copy of ``gm`` with concrete shapes: engines are built per concrete input shape. A
    graph whose recorded input layouts differ from the real inputs' is traced again from them:
    AOT's metadata can disagree with the kernels' (on the CPU, BatchNorm of bf16 input under
    autocast saves fp32 statistics that the backward graph records as bf16): its values' metadata
    is propagated again from the real inputs (every other meta entry kept), so passes and the
    stored graph's check see what runs."""
    if not is_symbolic(gm):
        copy = _copy(gm)
        if not _inputs_match(gm, args):
            from .kernels.base import propagate_fake

            propagate_fake(copy, args)
        return copy
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(*flat):
        return torch.fx.Interpreter(gm).run(*flat)

    needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    with contextlib.nullcontext() if needs_grad else torch.no_grad():
        return make_fx(run, tracing_mode="fake")(*args)


def _inputs_match(gm: fx.GraphModule, args: Sequence[Any]) -> bool:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, arg in zip(placeholders, args):
        val = node.meta.get("val")
        if isinstance(arg, torch.Tensor) and isinstance(val, torch.Tensor) and (
                tuple(val.shape), tuple(val.stride()), val.dtype) != (tuple(arg.shape), tuple(arg.stride()), arg.dtype):
            return False
    return True


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    import copy

    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph)
    return new


__all__ = ["lower", "frozen_mask", "param_names", "PARAM_NAMES_META", "STATIC_INPUTS_META", "static_inputs", "RETURNED_OUTPUTS_META", "returned_outputs", "user_inputs", "specialize", "is_symbolic"]
