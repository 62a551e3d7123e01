"""One strided view of a tensor for what a chain of views reads from a contiguous copy of it.

``y = x.contiguous()`` followed by views (``select``, ``view``, ``transpose``...) reads, element
for element, some function of ``x``'s memory. When that function is affine in the final view's
index, one ``as_strided(x, shape, stride, offset)`` reads the same values without the copy.
Example, nn.MultiheadAttention's packed projection: the [L, B, 3E] output is reordered to
[3, L, B, E] by a ``.contiguous()`` copy and each of q, k, v is then viewed as [B, H, L, D].
No single step can be a view of the uncopied tensor (B and H do not merge there), but the end
result is: strides (3E, D, 3BE, 1).

:func:`compose_view` decides this exactly from shapes and strides alone (no data):

1. The copy's dims are merged where the source's strides allow it (dim ``m`` and ``m+1``
   merge when ``stride[m] == stride[m+1] * size[m+1]``; size-1 dims drop out). Within a
   merged dim, a linear index in the copy moves the source address by a fixed stride.
2. The view's offset is unravelled over the merged dims. Each view dim must step inside
   one merged dim: its stride a multiple of that dim's contiguous stride, below the dim's
   extent.
3. No carry may cross a merged dim. For each merged dim, the offset's index plus every view
   dim's largest step into it must stay below the dim's size.

Under these conditions the copy-linear index to source address map is affine on the view's
whole index range, and the strides follow. Anything else returns None, and the copy stays.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple


def merged_dims(shape: Sequence[int], stride: Sequence[int]) -> List[Tuple[int, int]]:
    """(size, source stride) of the copy's dims, size-1 dims dropped, merged where contiguous
    in the source."""
    dims = [(int(n), int(s)) for n, s in zip(shape, stride) if n != 1]
    out: List[Tuple[int, int]] = []
    for n, s in dims:
        if out and out[-1][1] == s * n:  # the outer dim steps over exactly this one: merge
            out[-1] = (out[-1][0] * n, s)
        else:
            out.append((n, s))
    return out


def compose_view(src_shape: Sequence[int], src_stride: Sequence[int], src_offset: int,
                 view_shape: Sequence[int], view_stride: Sequence[int], view_offset: int,
                 ) -> Optional[Tuple[Tuple[int, ...], int]]:
    """(strides, storage offset) on the source for the view, or None when no single strided
    view of the source reads what the view reads from the source's contiguous copy.

    src_*: the copied tensor (shape, strides, storage offset); view_*: the final view, its
    strides and offset counted in elements of the contiguous copy (offset 0)."""
    if any(s < 0 for s in view_stride) or view_offset < 0:
        return None
    numel = math.prod(int(n) for n in src_shape)
    if math.prod(int(n) for n in view_shape) == 0 or numel == 0:
        return tuple(0 for _ in view_shape), int(src_offset)
    dims = merged_dims(src_shape, src_stride)
    sizes = [n for n, _ in dims]
    linear = [math.prod(sizes[m + 1:]) for m in range(len(dims))]  # contiguous strides of the copy
    index, rest = [], int(view_offset)  # the offset unravelled over the merged dims
    for m in range(len(dims)):
        index.append(rest // linear[m])
        rest %= linear[m]
    if index and index[0] >= sizes[0]:
        return None  # the offset is past the copy's end
    reach = list(index)  # per merged dim: the largest index any view element reaches
    strides = []
    for n, t in zip(view_shape, view_stride):
        n, t = int(n), int(t)
        if t == 0:  # a broadcast dim reads the same elements
            strides.append(0)
            continue
        m = next((m for m in range(len(dims)) if linear[m] <= t < linear[m] * sizes[m]), None)
        if m is None or t % linear[m]:
            if n == 1:  # never stepped: any stride reads the same element
                strides.append(0)
                continue
            return None
        step = t // linear[m]
        reach[m] += (n - 1) * step
        strides.append(step * dims[m][1])
    if any(r >= n for r, n in zip(reach, sizes)):
        return None  # a carry into the next dim: not one stride any more
    offset = int(src_offset) + sum(i * s for i, (_, s) in zip(index, dims))
    return tuple(strides), offset


__all__ = ["compose_view", "merged_dims"]
