"""The generated pointwise kernel's loads at another index than the element's own (see
``pointwise._source``): each reads a group input (a "piece") through its own strides, with the
dims it remaps kept apart from merging by the launcher, so ``i{d}`` is the element's index along
that very dim and ``sizes[d]`` its size.

* A roll: the source at (i - shift) mod size along each rolled dim (Swin's shifted windows).
* A constant pad: the source at i - low along each padded dim, the pad's value outside it (a
  negative low crops); Swin's pad to whole windows, explicit "same" paddings.
* An index by one table a dim (``_unsafe_index``, ``F.interpolate``'s decomposition): the
  element's entry of each table first (a negative one counts from the end, one out of range
  reads 0), then the source there.

Each returns the lines and the variable holding the value in the kernel's compute type. Imports
no Triton (it writes source text).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch.fx as fx

from . import expr, expr_casts
from .base import meta_of


def remapped_loads(plan: Any, sizes: Sequence[int], piece_pats: Dict[fx.Node, Any], table_pats: Dict[fx.Node, Any],
                   roll_dims: Sequence[Sequence[Tuple[int, int]]], pad_dims: Sequence[Sequence[int]],
                   index_dims: Sequence[Sequence[int]]) -> Tuple[List[str], Dict[fx.Node, str]]:
    """The lines of every roll, pad and indexed load of ``plan`` (a ``PointwisePlan``), given the
    merged dims each reads along, and {node: its variable}."""
    lines: List[str] = []
    names: Dict[fx.Node, str] = {}
    for (node, (src, _)), dims in zip(plan.rolls.items(), roll_dims):
        rolled = dict(dims)  # merged dim -> shift
        idx = _index(src, piece_pats, {d: f"((i{d} + {sizes[d] - s}) % {sizes[d]})" for d, s in rolled.items()})
        lines.append(f"# {node.name}: roll, the source read at (i - shift) mod size along {sorted(rolled)}")
        lines.append(f"v_{node.name} = " + _load(src, idx, "mask"))
        names[node] = f"v_{node.name}"
    for (node, (src, dims, value)), merged in zip(plan.pads.items(), pad_dims):
        inside = " & ".join(f"(i{d} >= {lo}) & (i{d} < {lo + n})" for (_, lo, n), d in zip(dims, merged))
        idx = _index(src, piece_pats, {d: f"(i{d} - {lo})" for (_, lo, _), d in zip(dims, merged)})
        lines.append(f"# {node.name}: constant pad, the source read at i - low, {value!r} outside it")
        lines.append(f"v_{node.name} = tl.where({inside}, {_load(src, idx, f'mask & {inside}')}, "
                     f"{expr_casts.literal(value, meta_of(node).dtype)})")
        names[node] = f"v_{node.name}"
    for (node, (src, dims)), merged in zip(plan.indexed.items(), index_dims):
        at, ok = {}, []
        lines.append(f"# {node.name}: the source read at each element's entries of its index tables")
        for (dim, table), d in zip(dims, merged):
            n, j, t = meta_of(src).shape[dim], f"j{d}_{node.name}", f"tab_{table.name}"
            pat = table_pats[table]
            offset = " + ".join(f"i{k} * {t}_st{k}" for k in pat) if pat and pat != "flat" else ("offs" if pat else "0 * offs")
            lines.append(f"{j} = tl.load({t}_ptr + {offset}, mask=mask, other=0).to(tl.int64)")
            lines.append(f"{j} = tl.where({j} < 0, {j} + {n}, {j})")
            at[d] = j
            ok.append(f"({j} >= 0) & ({j} < {n})")
        lines.append(f"v_{node.name} = " + _load(src, _index(src, piece_pats, at), f"mask & {' & '.join(ok)}"))
        names[node] = f"v_{node.name}"
    return lines, names


def _index(src: fx.Node, piece_pats: Dict[fx.Node, Any], remapped: Dict[int, str]) -> str:
    """The source's offset: each dim's index (``remapped``'s expression where given) times its stride."""
    t = f"piece_{src.name}"
    return " + ".join(f"{remapped.get(d, f'i{d}')} * {t}_st{d}" for d in piece_pats[src]) or "0"


def _load(src: fx.Node, idx: str, mask: str) -> str:
    return expr.to_compute(f"tl.load(piece_{src.name}_ptr + {idx}, mask={mask}, "
                           f"other={expr_casts.masked_zero(meta_of(src))})", meta_of(src).dtype)


__all__ = ["remapped_loads"]
