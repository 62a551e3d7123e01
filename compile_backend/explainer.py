"""``compile_backend.explain``: compile a model once, run it, and return what the backend did.

Two things make this more than ``torch.compile(model)(*inputs)``:

* It leaves the user's other compiled models alone. Dynamo keeps its compiled code in caches
  attached to code objects, so ``torch._dynamo.reset()`` would throw away every model compiled
  so far, and compiling ``model`` itself would add an entry to the caches of its ``forward``
  (shared with every other instance of the class, and counted against Dynamo's recompile
  limit). Instead the model is called from a function whose code object is made for this one
  call: Dynamo traces that frame (inlining the model), its cache lives on that code object, and
  it goes away with it. Its name is unique too, because Dynamo keeps per-code state (automatic
  dynamic shapes) keyed by file, line and name. A graph break inside the model is the
  exception: Dynamo then compiles the model's own frames after the break, and those entries stay
  on the model's code (guarded on explain's backend, so they never run for another compile; on
  a torch whose ``torch.compile`` takes ``isolate_recompiles`` they count against no other
  compile's recompile limit either).
* It shows training too. A model in train mode, or one given inputs that require grad, runs
  with autograd on; AOTAutograd then gives a forward graph and a backward graph, and the
  backward graph is compiled only when a backward runs. So when an output requires grad the
  gradients are computed once with ``torch.autograd.grad`` (ones as output gradients): that
  builds the backward engine and reports it, and leaves the ``.grad`` of every tensor as it was.
"""
from __future__ import annotations

import inspect
import itertools
import types
from typing import Any, Callable, List

import torch

from .options import Options
from .report import Report

_calls = itertools.count()
# a graph break inside the model makes Dynamo compile the model's own frames too, which leaves
# entries in the caches of its code; torch 2.13 can keep those in a region of their own that
# counts against no other compile's recompile limit (older torch: they share the default one)
_ISOLATED = ({"isolate_recompiles": True}
             if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {})


def explain(model: Any, *example_inputs: Any, **options: Any) -> Report:
    """Compile ``model`` with these options, run it once on ``example_inputs`` (and its backward
    when it is explained as training), return a Report."""
    from .backend import compile_backend

    Options.from_mapping(options)  # a bad option is the user's error: raise before compiling
    report = Report()

    def backend(gm, inputs):
        return compile_backend(gm, inputs, options=options, report=report)

    entry = private_entry(model)
    compiled = torch.compile(entry, backend=backend, **_ISOLATED)
    # an eval-mode model is explained as inference (frozen weights), a train-mode one or one
    # given inputs that require grad as training (forward and backward graphs)
    training = bool(getattr(model, "training", False)) or any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in _tensors(example_inputs))
    with torch.enable_grad() if training else torch.no_grad():
        out = compiled(*example_inputs)
        if training:
            run_backward(out, model, example_inputs)
    return report


def private_entry(model: Callable) -> Callable:
    """A function calling ``model``, with a code object of its own (see the module docstring)."""
    def call(*args):
        return model(*args)

    name = f"compile_backend_explain_{next(_calls)}"
    code = call.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):  # Python 3.11+
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, call.__globals__, name, None, call.__closure__)


def run_backward(out: Any, model: Any, example_inputs: Any) -> None:
    """Gradients of ``out`` (ones as output gradients) with respect to every leaf that requires
    grad, through ``torch.autograd.grad`` so that no ``.grad`` changes. No-op when no output
    requires grad (all weights frozen, no input requiring grad)."""
    outputs = [t for t in _tensors(out) if t.requires_grad and t.grad_fn is not None]
    if not outputs:
        return
    leaves = [t for t in _tensors(example_inputs) if t.requires_grad]
    if isinstance(model, torch.nn.Module):
        leaves += [p for p in model.parameters() if p.requires_grad]
    if not leaves:
        return
    torch.autograd.grad(outputs, leaves, grad_outputs=[torch.ones_like(t) for t in outputs],
                        allow_unused=True)


def _tensors(value: Any) -> List[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]
