"""Run one fuzz case: eager, an fp64 reference, compiled; classify the outcome.

Classes (in the order they are decided):
  eager_error  eager itself raised: not a backend bug, the case is skipped
  crash        the compiled call (or its backward) raised where eager did not
  wrong        a compiled output, gradient, mutated input or buffer differs from eager beyond
               what eager's own error explains (see compare.py)
  upstream     crash or wrong, but backend="aot_eager" fails the same way: Dynamo/AOTAutograd
  fallback     right numbers, but compile_backend warned it ran a graph eagerly (with a reason)
  ok

Random ops (dropout) get the same torch seed right before the eager and the compiled call;
such cases carry the tag ``dropout`` so the summary shows them apart.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
from typing import Any, Dict, List, Optional

import torch

from .compare import Mismatch, check, first_line, normalise
from .program import Program, render

RNG_SEED = 1234
MODES = {"plain": "0", "interpret": "1"}
_FALLBACK = re.compile(r"compile_backend: (?:compiling .*? failed at (?P<op>\S+) \((?P<why>.*)\)|"
                       r"could not lower this graph to ATen \((?P<why2>.*)\))", re.S)


@dataclasses.dataclass
class Result:
    cls: str
    message: str = ""
    signature: str = ""
    fallbacks: List[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def load(source: str) -> Dict[str, Any]:
    ns: Dict[str, Any] = {"__name__": "fuzz_case"}
    exec(compile(source, "<fuzz case>", "exec"), ns)
    return ns


@dataclasses.dataclass
class Side:
    outs: Any
    grads: List[Optional[torch.Tensor]]
    param_grads: Dict[str, Optional[torch.Tensor]]
    bases: List[torch.Tensor]
    buffers: Dict[str, torch.Tensor]


def _snap(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_snap(y) for y in x)
    return x


def _loss_weights(outs) -> List[Optional[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    ws = []
    for o in outs:
        if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad:
            ws.append(torch.randn(o.shape, generator=g))
        else:
            ws.append(None)
    return ws


def run_side(ns: Dict[str, Any], model: torch.nn.Module, call, train: bool,
             dtype: Optional[torch.dtype] = None) -> Side:
    """One call of ``call`` (the model, compiled or not) on fresh inputs, with backward in training.
    ``dtype``: cast float bases to it (the fp64 reference)."""
    bases = ns["make_bases"]()
    if dtype is not None:
        bases = [b.to(dtype) if b.is_floating_point() else b for b in bases]
    if train:
        for b in bases:
            if b.is_floating_point():
                b.requires_grad_(True)
    inputs = ns["views"](bases)
    torch.manual_seed(RNG_SEED)
    with torch.enable_grad() if train else torch.no_grad():
        outs = call(*inputs)
    snap = _snap(outs)
    grads: List[Optional[torch.Tensor]] = []
    pgrads: Dict[str, Optional[torch.Tensor]] = {}
    if train:
        ws = _loss_weights(outs)
        terms = [(o * w.to(o.dtype)).sum().double() for o, w in zip(outs, ws) if w is not None]
        if terms:
            sum(terms).backward()
        grads = [b.grad for b in bases if b.is_floating_point()]
        pgrads = {n: p.grad for n, p in model.named_parameters()}
    return Side(snap, grads, pgrads, [b.detach() for b in bases], {n: b.detach().clone() for n, b in model.named_buffers()})


def compare_sides(actual: Side, expected: Side, ref: Optional[Side], train: bool, call: str,
                  signed_zeros: bool = True) -> None:
    r = ref if ref is not None else Side(None, [], {}, [], {})
    check(actual.outs, expected.outs, r.outs, kind="out", path=f"{call}: out", signed_zeros=signed_zeros)
    if train:
        check(actual.grads, expected.grads, r.grads or None, kind="grad", path=f"{call}: input grad", grad=True)
        names = list(expected.param_grads)
        check([actual.param_grads.get(n) for n in names], [expected.param_grads[n] for n in names],
              [r.param_grads.get(n) for n in names] if ref else None, kind="grad", path=f"{call}: param grad {names}", grad=True)
    else:
        check(actual.bases, expected.bases, r.bases or None, kind="mutation", path=f"{call}: input after call",
              signed_zeros=signed_zeros)
    if call != "call 1":
        return  # buffers (batch-norm running stats) moved again; eager ran once
    names = list(expected.buffers)
    check([actual.buffers.get(n) for n in names], [expected.buffers[n] for n in names],
          [r.buffers.get(n) for n in names] if ref else None, kind="buffer", path=f"{call}: buffers {names}")


def _model(ns, program: Program, dtype: torch.dtype) -> torch.nn.Module:
    m = ns["M"]().to(dtype)
    return m.train() if program.train else m.eval()


def run_case(program: Program, mode: str = "plain", validate: bool = True, *, backend: str = "compile_backend",
             check_upstream: bool = True) -> Result:
    start = time.perf_counter()
    res = _run(program, mode, validate, backend)
    if check_upstream and backend == "compile_backend" and res.cls in ("crash", "wrong"):
        up = _run(program, mode, validate, "aot_eager")
        if up.cls in ("crash", "wrong"):
            res = Result("upstream", res.message, "upstream: " + res.signature, res.fallbacks)
    res.seconds = time.perf_counter() - start
    return res


def _run(program: Program, mode: str, validate: bool, backend: str) -> Result:
    ns = load(render(program))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager's own warnings (std() with one element, ...)
            m_e = _model(ns, program, program.dtype)
            state = {k: v.clone() for k, v in m_e.state_dict().items()}
            eager = run_side(ns, m_e, m_e, program.train)
    except Exception as exc:  # eager refuses the program: not ours to judge
        return Result("eager_error", first_line(exc), "eager_error: " + normalise(first_line(exc)))
    ref = None if "dropout" in program.tags else _reference(program, state)
    os.environ["TRITON_INTERPRET"] = MODES[mode]
    torch._dynamo.reset()
    m_c = _model(ns, program, program.dtype)
    options = {"validate": validate} if backend == "compile_backend" else None
    compiled = torch.compile(m_c, backend=backend, options=options)
    calls = 1 if program.train else 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for call in range(1, calls + 1):
                got = run_side(ns, m_c, compiled, program.train)
                compare_sides(got, eager, ref, program.train, f"call {call}", signed_zeros_defined(program))
        except Mismatch as mm:
            result = Result("wrong", str(mm), f"wrong/{mm.kind}")
        except Exception as exc:
            result = Result("crash", first_line(exc), "crash: " + normalise(first_line(exc)))
        else:
            result = Result("ok")
        finally:
            torch._dynamo.reset()
    result.fallbacks = fallback_reasons(caught)
    if result.cls == "ok" and result.fallbacks:
        result.cls = "fallback"
        result.message = result.fallbacks[0]
        result.signature = "fallback: " + normalise(result.fallbacks[0])
    return result


def signed_zeros_defined(program: Program) -> bool:
    """False for programs with a max/min reduction or an accumulating product (ops.py says why)."""
    from .ops import ACCUMULATING_KINDS

    return "zero_ties" not in program.tags and not ACCUMULATING_KINDS & set(program.kinds)


def _reference(program: Program, state) -> Optional[Side]:
    """The program in fp64 from the same (rounded) weights and inputs; None if fp64 is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ns_ref = load(render(program, reference=True))
            m_r = ns_ref["M"]().double()
            m_r.load_state_dict(state)
            m_r.train(program.train)
            return run_side(ns_ref, m_r, m_r, program.train, dtype=torch.float64)
    except Exception:
        return None


def fallback_reasons(caught) -> List[str]:
    out = []
    for w in caught:
        m = _FALLBACK.search(str(w.message))
        if m:
            why = m.group("why") or m.group("why2") or ""
            out.append(f"at {m.group('op') or 'capture'}: {why.splitlines()[0][:200] if why else ''}")
    return out
