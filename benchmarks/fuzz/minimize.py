"""Shrink a failing program while it keeps failing the same way, and print it as a script.

Delta debugging over the op list: drop halves, then quarters, ... then single ops, keeping every
removal after which the case still fails with the same class (and, for crashes, the same
normalised message). Then drop outputs one by one and make inputs contiguous with plain randn
values where that keeps the failure. Every attempt is a full compile, so the number of attempts
is bounded.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from .program import FLOAT_NAMES, Program, describe, render
from .runner import Result, run_case


def same_failure(before: Result, after: Result) -> bool:
    if after.cls != before.cls:
        return False
    if before.cls in ("crash", "fallback", "upstream"):
        return after.signature == before.signature
    return after.signature.split(":")[0] == before.signature.split(":")[0]


def minimize(program: Program, mode: str, validate: bool, failure: Result,
             max_attempts: int = 80) -> Program:
    attempts = [0]

    def fails(p: Optional[Program]) -> bool:
        if p is None or attempts[0] >= max_attempts:
            return False
        attempts[0] += 1
        return same_failure(failure, run_case(p, mode, validate, check_upstream=failure.cls == "upstream"))

    return shrink(program, fails)


def shrink(program: Program, fails: Callable[[Optional[Program]], bool]) -> Program:
    p = program
    chunk = max(1, len(p.ops) // 2)
    while chunk >= 1:
        start = 0
        while start < len(p.ops):
            cand = p.drop(range(start, min(start + chunk, len(p.ops))))
            if cand is not None and len(cand.ops) < len(p.ops) and fails(cand):
                p = cand
            else:
                start += chunk
        chunk //= 2
    for name in list(p.outputs):
        if len(p.outputs) > 1 and fails(p.with_outputs([o for o in p.outputs if o != name])):
            p = p.with_outputs([o for o in p.outputs if o != name])
    for k, inp in enumerate(p.inputs):
        if inp not in p.used_inputs():
            continue
        simple = dataclasses.replace(inp, base_shape=inp.val.shape, view="{b}", layout="contig",
                                     init="randn" if inp.init in ("ties", "uniform") else inp.init)
        if simple != inp and fails(p.with_input(k, simple)):
            p = p.with_input(k, simple)
    return p


REPRO_FOOTER = '''

if __name__ == "__main__":
    import os
    os.environ["TRITON_INTERPRET"] = "{interpret}"  # read by the backend when it builds an engine
    import compile_backend  # noqa: F401  (registers the backend)

    train = {train}
    torch.manual_seed(0)
    eager_model = M().to({dtype}).train(train)
    compiled_model = M().to({dtype}).train(train)
    compiled = torch.compile(compiled_model, backend="compile_backend", options={options!r})

    def run(call, model):
        bases = make_bases()
        for b in bases:
            if train and b.is_floating_point():
                b.requires_grad_(True)
        torch.manual_seed({rng})
        with torch.enable_grad() if train else torch.no_grad():
            outs = call(*views(bases))
        grads = []
        if train:
            g = torch.Generator().manual_seed(5)
            loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum().double()
                       for o in outs if o.is_floating_point() and o.requires_grad)
            loss.backward()
            grads = [b.grad for b in bases if b.is_floating_point()] + [p.grad for p in model.parameters()]
        return outs, grads, [b.detach() for b in bases]

    expected = run(eager_model, eager_model)
    actual = run(compiled, compiled_model)
    for what, e_list, a_list in zip(("output", "grad", "input after call"), expected, actual):
        for i, (e, a) in enumerate(zip(e_list, a_list)):
            if e is None or a is None:
                print(what, i, "eager", e is None and "None", "compiled", a is None and "None")
                continue
            if e.is_complex():
                e, a = torch.view_as_real(e), torch.view_as_real(a)
            diff = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
            print(f"{{what}} {{i}}: {{tuple(e.shape)}} {{e.dtype}} max |compiled - eager| = {{diff:.3g}}",
                  "" if torch.equal(a, e) else "(not bit-equal)")
'''


def repro_script(program: Program, mode: str, validate: bool, result: Result) -> str:
    from .runner import MODES, RNG_SEED

    header = (f"# compile_backend fuzz repro: seed {program.seed}, mode {mode}, validate={validate}\n"
              f"# {result.cls}: {result.message[:300]}\n"
              f"# {describe(program)}\n"
              f"# python -m benchmarks.fuzz --only-seed {program.seed} --mode {mode} --validate {str(validate).lower()}")
    dtype = "torch." + FLOAT_NAMES[program.dtype]
    footer = REPRO_FOOTER.format(interpret=MODES[mode], train=program.train, dtype=dtype,
                                 options={"validate": validate}, rng=RNG_SEED)
    return render(program, header=header) + footer
