"""The random program generator: 3-15 ops over a broad op set, deterministic from a seed.

Every candidate op is run once, eagerly, on example tensors with the real layouts while the
program is built: that gives its output shape and dtype (no shape algebra to get wrong here)
and drops ops eager itself refuses (wrong channel count, half op missing on CPU) before they
become a skipped case. The op templates themselves are in :mod:`benchmarks.fuzz.ops`.

Numeric care that keeps judgements sharp: comparisons with a threshold (and the masks built
from them) read program inputs only in fp16/bf16, because a computed reduced-precision value
may legitimately round to the other side of a threshold in a fused kernel; in fp32 they may
read anything. Discontinuous ops never see computed values in reduced precision.
"""
from __future__ import annotations

import random
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .program import FLOAT_NAMES, Inp, Op, Program, Val, dtype_map, fill, HELPERS

MAX_NUMEL = 4096
INPUT_NUMEL = 1536
DIMS = (1, 2, 3, 4, 5, 7, 8, 13, 16, 17)
DIM_WEIGHTS = (2, 2, 4, 1, 4, 4, 1, 3, 1, 2)

_HELPER_NS: Dict[str, object] = {"torch": torch}
exec(HELPERS, _HELPER_NS)


class Gen:
    """State while one program is built: the values so far and example tensors for each."""

    def __init__(self, seed: int, dtype: torch.dtype, train: bool):
        self.rng = random.Random(seed)
        self.seed = seed
        self.dtype = dtype
        self.train = train
        self.inputs: List[Inp] = []
        self.ops: List[Op] = []
        self.vals: Dict[str, Val] = {}
        self.env: Dict[str, torch.Tensor] = {}
        self.holder = nn.Module()
        self.gemm_inputs: List[str] = []
        self.dts = dtype_map(dtype)

    # ---- choosing ----------------------------------------------------------------------------
    def shape(self, rank: Optional[int] = None, numel: int = INPUT_NUMEL) -> Tuple[int, ...]:
        rank = rank if rank is not None else self.rng.choice((1, 2, 2, 3, 3, 4))
        for _ in range(50):
            s = tuple(self.rng.choices(DIMS, DIM_WEIGHTS, k=rank))
            if _numel(s) <= numel:
                return s
        return (3,) * rank

    def pick(self, pred: Callable[[Val], bool] = lambda v: True, *, floats: bool = True,
             recent: bool = True) -> Optional[Val]:
        """A value satisfying ``pred``; recent values are likelier, so ops chain."""
        cands = [v for v in self.vals.values()
                 if pred(v) and (not floats or v.dtype.is_floating_point)]
        if not cands:
            return None
        weights = [1 + (3 * k if recent else 0) for k in range(len(cands))]
        return self.rng.choices(cands, weights)[0]

    def pick_or_fresh(self, pred: Callable[[Val], bool], shape_fn: Callable[[], Tuple[int, ...]],
                      fresh_p: float = 0.25) -> Val:
        v = None if self.rng.random() < fresh_p else self.pick(pred)
        return v if v is not None else self.fresh(shape_fn())

    def dim(self, v: Val, negative: bool = True) -> int:
        d = self.rng.randrange(max(1, len(v.shape)))  # 0-d: dim 0, which eager rejects
        return d - len(v.shape) if negative and self.rng.random() < 0.4 else d

    def scalar(self) -> str:
        return self.rng.choice(("0.5", "2.0", "-1.5", "0.1", "3", "0.25", "-0.3"))

    # ---- inputs ------------------------------------------------------------------------------
    def fresh(self, shape: Sequence[int], dtype: Optional[torch.dtype] = None, init: Optional[str] = None,
              layout: Optional[str] = None) -> Val:
        shape = tuple(shape)
        dtype = dtype or self.dtype
        if init is None:
            if dtype == torch.bool:
                init = "mask"
            else:
                inits = ["randn"] * 6 + ["uniform"] + ([] if self.train else ["ties", "ties"])
                init = self.rng.choice(inits)
        if layout is None:
            layout = self.rng.choice(("contig", "contig", "contig", "transposed", "strided", "offset", "expanded"))
        base, view, layout = _layout(self.rng, shape, layout)
        name = f"x{len(self.inputs)}"
        val = Val(name, shape, dtype, leaf=True)
        inp = Inp(val, self.seed % 100000 * 100 + len(self.inputs), base, init, view, layout)
        b = _HELPER_NS[init](base, inp.seed, dtype)
        if self.train and dtype.is_floating_point and init != "mask":
            b.requires_grad_(True)
        self.env[name] = eval(view.format(b="b"), {"b": b})
        self.inputs.append(inp)
        self.vals[name] = val
        return val

    # ---- ops ---------------------------------------------------------------------------------
    def add(self, kind: str, ins: Sequence[Val], code: str, init: str = "", tags: Sequence[str] = (),
            alias: bool = False) -> Optional[Val]:
        """Run the op once on the example tensors; keep it if eager accepts it."""
        index = len(self.ops)
        name = f"v{index}"
        names = [v.name for v in ins]
        dts = self.dts
        try:
            if init:
                exec(fill(init, names, name, index, dts), {"torch": torch, "nn": nn, "F": F, "self": self.holder})
                self.holder.to(self.dtype)
                if self.train:
                    self.holder.train()
            env = dict(self.env)
            grad = torch.enable_grad() if self.train else torch.no_grad()
            with grad, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(fill(code, names, name, index, dts),
                     {"torch": torch, "nn": nn, "F": F, "self": self.holder}, env)
            t = env[name]
        except Exception:
            return None
        if not isinstance(t, torch.Tensor) or t.numel() > MAX_NUMEL or t.numel() == 0:
            return None
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.int64,
                           torch.complex64):
            return None
        if any(t.dtype.is_floating_point and not torch.isfinite(x).all() for x in [t.detach()]):
            tags = tuple(tags) + ("nonfinite",)
        self.env = env
        val = Val(name, tuple(t.shape), t.dtype)
        self.vals[name] = val
        self.ops.append(Op(kind, tuple(names), val, code, init, index, frozenset(tags)))
        return val


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layout(rng: random.Random, shape: Tuple[int, ...], layout: str):
    """(base shape, view template, layout actually used) for a view of ``shape``."""
    r = len(shape)
    if layout == "transposed" and r >= 2:
        i, j = sorted(rng.sample(range(r), 2))
        base = list(shape)
        base[i], base[j] = base[j], base[i]
        return tuple(base), f"{{b}}.transpose({i}, {j})", layout
    if layout in ("strided", "offset") and r >= 1:
        d = rng.randrange(r)
        base = list(shape)
        idx = [":"] * r
        if layout == "strided":
            base[d] = shape[d] * 2
            idx[d] = "::2"
        else:
            base[d] = shape[d] + 1
            idx[d] = "1:"
        return tuple(base), "{b}[" + ", ".join(idx) + "]", layout
    if layout == "expanded" and any(s > 1 for s in shape):
        dims = [d for d in range(r) if shape[d] > 1]
        chosen = rng.sample(dims, rng.randint(1, len(dims)))
        base = tuple(1 if d in chosen else s for d, s in enumerate(shape))
        return base, f"{{b}}.expand{tuple(shape)}", layout
    return tuple(shape), "{b}", "contig"


def generate(seed: int, *, dtype: Optional[torch.dtype] = None, train: Optional[bool] = None,
             n_ops: Optional[int] = None) -> Program:
    """A random program. Everything follows from ``seed``; the keyword arguments pin choices."""
    from .ops import OPS  # the op table

    rng = random.Random(seed)
    if dtype is None:
        dtype = rng.choices((torch.float32, torch.float16, torch.bfloat16), (6, 2, 2))[0]
    if train is None:
        train = rng.random() < 0.3
    n_ops = n_ops if n_ops is not None else rng.randint(3, 15)
    g = Gen(seed, dtype, train)
    for _ in range(rng.randint(1, 2)):
        g.fresh(g.shape())
    kinds = list(OPS)
    weights = [OPS[k][0] for k in kinds]
    made, attempts = 0, 0
    while made < n_ops and attempts < n_ops * 25:
        attempts += 1
        kind = g.rng.choices(kinds, weights)[0]
        if kind == "dropout" and g.rng.random() < 0.5:
            continue  # dropout cases form their own category; keep them a minority
        if OPS[kind][1](g) is not None:
            made += 1
    if not g.ops:
        g.add("relu", [g.pick()], "{o} = torch.relu({i0})")
    return Program(seed, dtype, train, tuple(g.inputs), tuple(g.ops), _outputs(g))


def _outputs(g: Gen) -> Tuple[str, ...]:
    """The last value, up to two other values nobody reads, sometimes one more read one."""
    read = {n for op in g.ops for n in op.ins}
    outs = [g.ops[-1].out.name]
    sinks = [op.out.name for op in g.ops[:-1] if op.out.name not in read]
    g.rng.shuffle(sinks)
    outs += sinks[:2]
    if g.rng.random() < 0.3:
        others = [op.out.name for op in g.ops if op.out.name not in outs]
        if others:
            outs.append(g.rng.choice(others))
    # complex results are compared as view_as_real; integer ones exactly
    return tuple(dict.fromkeys(outs))
