"""A fuzz program: inputs, a list of ops over named values, outputs; rendered as Python source.

A program is data, not code, so the minimiser can drop ops: every op names the values it reads
(``ins``) and the one it defines (``out``); its source is a template whose ``{i0}``, ``{i1}``,
``{o}`` and ``{p}`` (the op's own attribute prefix on the module) are filled in when rendering.
Dtypes in templates are placeholders too (``{float16}``, ``{D}`` for the program's dtype), so
the same program renders once as the case itself and once as an fp64 reference (every float
dtype becomes float64) that only serves to judge how far eager itself is from exact.

The rendered source is self-contained (torch only): it is what the runner executes and what a
failure report prints, so a repro is exactly the code that failed.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FLOAT_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


@dataclasses.dataclass(frozen=True)
class Val:
    """A value of the program: its name, shape and dtype (as found by running the op once)."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    leaf: bool = False  # a program input (compares on it are exact in every dtype)

    def same_type(self, other: "Val") -> bool:
        return self.shape == other.shape and self.dtype == other.dtype


@dataclasses.dataclass(frozen=True)
class Inp:
    """An input: a leaf tensor ``base`` (made from ``seed``) and the view the model receives."""

    val: Val
    seed: int
    base_shape: Tuple[int, ...]
    init: str  # randn | ties | uniform | mask | causal | dead_mask | pad_bias
    view: str  # template over {b}: "{b}", "{b}.transpose(0, 1)", "{b}[:, ::2]", "{b}.expand(3, 5)"
    layout: str  # contig | transposed | strided | offset | expanded (for reports and the minimiser)


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str
    ins: Tuple[str, ...]
    out: Val
    code: str  # forward lines (template)
    init: str = ""  # __init__ lines (template), parameters and buffers under {p}
    index: int = 0  # stable id: names the op's parameters and seeds their initialisation
    tags: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class Program:
    seed: int
    dtype: torch.dtype
    train: bool
    inputs: Tuple[Inp, ...]
    ops: Tuple[Op, ...]
    outputs: Tuple[str, ...]

    @property
    def tags(self) -> frozenset:
        out = frozenset()
        for op in self.ops:
            out |= op.tags
        return out

    @property
    def kinds(self) -> List[str]:
        return [op.kind for op in self.ops]

    def used_inputs(self) -> List[Inp]:
        used = {n for op in self.ops for n in op.ins} | set(self.outputs)
        return [i for i in self.inputs if i.val.name in used]

    def drop(self, indices: Sequence[int]) -> Optional["Program"]:
        """This program without the ops at ``indices``. A reader of a dropped value reads the
        dropped op's first input of the same shape and dtype instead (so dropping ``relu`` from
        ``relu -> linear`` keeps the linear); readers with no such stand-in are dropped too.
        None when no output is left."""
        drop = set(indices)
        subst: Dict[str, Optional[str]] = {i.val.name: i.val.name for i in self.inputs}
        vals = {i.val.name: i.val for i in self.inputs}
        kept = []
        for k, op in enumerate(self.ops):
            ins = tuple(subst.get(n) for n in op.ins)
            if k in drop or any(n is None for n in ins):
                stand_in = None
                for n in ins:
                    if n is not None and vals[n].same_type(op.out):
                        stand_in = n
                        break
                subst[op.out.name] = stand_in
                continue
            op = dataclasses.replace(op, ins=ins)
            kept.append(op)
            subst[op.out.name] = op.out.name
            vals[op.out.name] = op.out
        outs = []
        for n in self.outputs:
            m = subst.get(n)
            if m is not None and m not in outs:
                outs.append(m)
        if not outs:
            return None
        return dataclasses.replace(self, ops=tuple(kept), outputs=tuple(outs))

    def with_outputs(self, outputs: Sequence[str]) -> "Program":
        return dataclasses.replace(self, outputs=tuple(outputs))

    def with_input(self, k: int, inp: Inp) -> "Program":
        inputs = list(self.inputs)
        inputs[k] = inp
        return dataclasses.replace(self, inputs=tuple(inputs))


def dtype_map(dtype: torch.dtype, reference: bool = False) -> Dict[str, str]:
    """Values for the dtype placeholders: the real dtypes, or float64 everywhere."""
    m = {name: "torch.float64" if reference else f"torch.{name}" for name in FLOAT_NAMES.values()}
    m["D"] = "torch.float64" if reference else f"torch.{FLOAT_NAMES[dtype]}"
    return m


def fill(template: str, ins: Sequence[str], out: str, index: int, dtypes: Dict[str, str]) -> str:
    names = {f"i{k}": n for k, n in enumerate(ins)}
    return template.format(o=out, p=f"self.p{index}", pn=f"p{index}", **names, **dtypes)


HELPERS = '''\
def randn(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def uniform(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) + 0.1).to(dtype)


def ties(shape, seed, dtype):
    """Values that meet thresholds exactly: quarters, 0.1/0.3 (rounded to dtype), +-0.0."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.5, -1.0, 1.5, 0.1, -0.1, 0.3, 2.0, -0.0])
    return pool[torch.randint(0, len(pool), shape, generator=g)].to(dtype)


def mask(shape, seed, dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > 0.4
    if m.dim():
        m[..., 0] = True  # no fully masked row
    return m


def dead_mask(shape, seed, dtype=torch.bool):
    """A keep-mask whose first and some other query rows mask every key (SDPA gives such a
    row zeros, softmax over a row of -inf NaN)."""
    g = torch.Generator().manual_seed(seed + 1)
    dead = torch.rand(shape[:-1], generator=g) < 0.3
    dead.view(-1)[0] = True
    return mask(shape, seed) & ~dead[..., None]


def pad_bias(shape, seed, dtype):
    """An additive mask of 0 and -inf, or of 0 and -3.4e38 (about finfo(fp32).min, as padding
    masks are written; -inf once rounded to fp16/bf16), with fully masked rows."""
    fill = -3.4e38 if seed % 2 else float("-inf")
    return torch.zeros(shape).masked_fill(~dead_mask(shape, seed), fill).to(dtype)


def causal(shape, seed, dtype=torch.bool):
    # bottom-right aligned as is_causal with a KV cache, but never a fully masked row
    return torch.ones(shape, dtype=torch.bool).tril(max(0, shape[-1] - shape[-2]))
'''


def render(p: Program, reference: bool = False, header: str = "") -> str:
    """Source defining ``M`` (the model), ``make_bases()`` (leaf inputs) and ``views(bases)``."""
    dts = dtype_map(p.dtype, reference)
    inputs = p.used_inputs()
    lines = [header, "import torch", "import torch.nn as nn", "import torch.nn.functional as F", "", "",
             HELPERS, "", "class M(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    for op in p.ops:
        if op.init:
            lines.append(f"        torch.manual_seed({1000 + op.index})")
            for ln in fill(op.init, op.ins, op.out.name, op.index, dts).splitlines():
                lines.append("        " + ln)
    args = ", ".join(["self"] + [i.val.name for i in inputs])
    lines += ["", f"    def forward({args}):"]
    for op in p.ops:
        for ln in fill(op.code, op.ins, op.out.name, op.index, dts).splitlines():
            lines.append("        " + ln)
    lines.append(f"        return ({', '.join(p.outputs)},)")
    lines += ["", "", "def make_bases():", "    return ["]
    for i in inputs:
        dt = "torch.bool" if i.val.dtype == torch.bool else dts[FLOAT_NAMES[i.val.dtype]]
        lines.append(f"        {i.init}({i.base_shape}, {i.seed}, {dt}),  # {i.val.name}: {i.layout}")
    lines += ["    ]", "", "", "def views(b):", "    return ["]
    for k, i in enumerate(inputs):
        lines.append("        " + i.view.format(b=f"b[{k}]") + ",")
    lines += ["    ]", ""]
    return "\n".join(lines)


def describe(p: Program) -> str:
    ins = ", ".join(f"{i.val.name}{list(i.val.shape)}:{i.layout}/{i.init}" for i in p.used_inputs())
    return (f"dtype={FLOAT_NAMES[p.dtype]} train={p.train} inputs=[{ins}] "
            f"ops=[{', '.join(p.kinds)}] outputs={len(p.outputs)}")
