"""Triton source templates for GEMM and implicit-GEMM convolution, with a generated epilogue.

The main loops (pointer-based GEMM with swizzling and split-K; persistent TMA GEMM; implicit-GEMM
convolution) are fixed text; what varies per group is the epilogue, described by an :class:`EpilogueSpec`: tensors to load at the tile's coordinates,
Triton statements computing from ``acc`` (the anchor's accumulator, fp32 or int32) and the
loaded tiles, and the values to store. Every loaded or stored tensor is addressed through its
strides in the anchor's logical index space ([B,] M, N for GEMM; N, C, H, W for convolution),
so broadcasting (a bias, a per-row scale) is just a zero stride.

Generated source is loaded through ``launch.load_source`` (from memory, registered in
``linecache``, since Triton reads a kernel's source through ``inspect``). This module never
imports Triton itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------------- epilogue


@dataclasses.dataclass(frozen=True)
class EpilogueSpec:
    """The part of a kernel after the accumulator is complete.

    loads: variable names; the i-th is loaded (raw dtype) from pointer ``L{i}``.
    lines: Triton statements over ``acc`` and the loaded names.
    stores: variable names; the j-th is stored to pointer ``O{j}``, cast to its element type.
    int_acc: the accumulator is int32 (int8 GEMM); lines see it as is.
    helpers: source of helper functions the lines call, placed at module level.
    """

    loads: Tuple[str, ...] = ()
    lines: Tuple[str, ...] = ()
    stores: Tuple[str, ...] = ("acc",)
    int_acc: bool = False
    helpers: str = ""  # module-level @triton.jit helpers the lines call (expr.helper_source)
    # per load, (varies along the rows, varies along the columns) of the (batch, rows, columns)
    # space, or () for every load a full tile: a bias or a per-column scale is loaded as a
    # [1, BLOCK_N] row, a per-row scale as [BLOCK_M, 1], a per-tensor one as a scalar, instead
    # of a full tile of repeated values (registers: the 128x256 FP8 tile spilled with three)
    load_axes: Tuple[Tuple[bool, bool], ...] = ()
    # per load, the value its masked-off lanes read (``other=``), or () for 0 everywhere: an FP8
    # load takes 0.0 (Triton compiles no int -> fp8 cast; its interpreter does)
    load_zeros: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.stores:
            raise ValueError("an epilogue must store at least one value")
        if self.load_axes and len(self.load_axes) != len(self.loads):
            raise ValueError(f"load_axes needs one entry per load: {self}")
        names = list(self.loads)
        if len(set(names)) != len(names) or any(not n.isidentifier() for n in names + list(self.stores)):
            raise ValueError(f"epilogue names must be distinct identifiers: {self}")


def epilogue_body(spec: EpilogueSpec, offset, mask: str, indent: str, broadcast_load=None) -> list:
    """The epilogue's lines: loads at ``offset(pointer)``, the spec's lines, the stores.
    ``broadcast_load(pointer, rows, columns)``: (offset, mask or None) of a load that varies
    only along the given sides (the template's, for ``spec.load_axes``)."""
    out = []
    for i, name in enumerate(spec.loads):
        zero = spec.load_zeros[i] if spec.load_zeros else "0"
        if broadcast_load is not None and spec.load_axes and spec.load_axes[i] != (True, True):
            off, m = broadcast_load(f"l{i}", *spec.load_axes[i])
            out.append(f"{name} = tl.load(L{i} + {off}" + (f", mask={m}, other={zero})" if m else ")"))
            continue
        out.append(f"{name} = tl.load(L{i} + {offset(f'l{i}')}, mask={mask}, other={zero})")
    out.extend(spec.lines)
    for j, name in enumerate(spec.stores):
        out.append(f"tl.store(O{j} + {offset(f'o{j}')}, {name}.to(O{j}.dtype.element_ty), mask={mask})")
    return [indent + line for line in out]


def io_params(spec: EpilogueSpec, ndim: int) -> Tuple[str, str]:
    """The epilogue's pointer parameters and their ``ndim`` strides each, as source text."""
    ptrs = [f"L{i}" for i in range(len(spec.loads))] + [f"O{j}" for j in range(len(spec.stores))]
    strides = [f"{p.lower()}_s{d}" for p in ptrs for d in range(ndim)]
    return ", ".join(ptrs), ", ".join(strides)


# ---------------------------------------------------------------------------------- GEMM

_GEMM = '''\
import triton
import triton.language as tl
{helpers}

@triton.jit
def {name}(
    A, B, WS, {ptrs},
    M, N, K,
    stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
    ws_sk, ws_sb, ws_sm, ws_sn,
    {strides},
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, EPI_SPLIT: tl.constexpr = 1,
):
    # MODE 0: main loop + epilogue; 1: split-K partial sums into WS; 2: epilogue over WS
    # (the split-K partials summed, or an accumulator computed elsewhere, e.g. by cuBLAS)
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share each column of B while it is in L2
    width = GROUP_M * grid_n
    group_id = pid // width
    group_size = min(grid_m - group_id * GROUP_M, GROUP_M)
    pid_m = group_id * GROUP_M + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if MODE == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_type})
        ws_mask = (rm < M)[:, None] & (rn < N)[None, :]
        ws_ptrs = WS + pid_b * ws_sb + rm[:, None] * ws_sm + rn[None, :] * ws_sn
        for s in range(SPLIT_K):
            acc += tl.load(ws_ptrs + s * ws_sk, mask=ws_mask, other=0).to({acc_type})
    else:
        # rows/columns past the edge read a valid row instead (never stored), so the main
        # loop needs no M/N masks
        ram = rm % M
        rbn = rn % N
        k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_per_split
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = A + pid_b * stride_ab + ram[:, None] * stride_am + (k_lo + rk)[None, :] * stride_ak
        b_ptrs = B + pid_b * stride_bb + (k_lo + rk)[:, None] * stride_bk + rbn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_type})
        for k in range(0, k_per_split, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k_lo - k
                a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other={zero})
                b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other={zero})
            acc = tl.dot({dot_a}, {dot_b}, acc{dot_args})
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if MODE == 1:
        tl.store(WS + pid_k * ws_sk + pid_b * ws_sb + rm[:, None] * ws_sm + rn[None, :] * ws_sn, acc, mask=mask)
    elif EPI_SPLIT == 2:
        # the epilogue over each half of the columns in turn: a long chain (GELU, a quantize)
        # over the whole tile keeps too many values live per thread and spills
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        acc = acc_lo
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
{epilogue}
        acc = acc_hi
        rn = pid_n * BLOCK_N + BLOCK_N // 2 + tl.arange(0, BLOCK_N // 2)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
{epilogue}
    else:
{epilogue}
'''


def dot_fields(operand: str, allow_tf32: bool, interpret: bool, int_acc: bool) -> Dict[str, str]:
    """Template fields for the main loop's dot.

    operand: the operands' dtype name (float32 | float16 | bfloat16 | int8 | float8_e4m3fn).
    fp32 operands use tf32 only when ``allow_tf32`` (``base.allows_tf32(precision)``). The Triton interpreter multiplies
    bf16 operands as raw 16-bit integers (seen on Triton 3.9), so there, and only there, bf16
    tiles are upcast to fp32 before the dot: the products are exact in fp32 either way.
    """
    acc_type = "tl.int32" if int_acc else "tl.float32"
    dot_args = f", out_dtype={acc_type}"
    if operand == "float32":
        dot_args += ", input_precision=" + ("'tf32'" if allow_tf32 else "'ieee'")
    upcast = interpret and operand == "bfloat16"
    return {
        "acc_type": acc_type,
        "dot_args": dot_args,
        "zero": "0" if operand == "int8" else "0.0",
        "dot_a": "a.to(tl.float32)" if upcast else "a",
        "dot_b": "b.to(tl.float32)" if upcast else "b",
    }


def broadcast_load(p: str, rows: bool, columns: bool) -> Tuple[str, Optional[str]]:
    """(offset, mask) in the GEMM templates' (batch, m, n) space of a load varying only along
    ``rows`` / ``columns`` (the batch term is always kept): a [BLOCK_M, 1] column, a
    [1, BLOCK_N] row or a scalar, broadcast by the epilogue's arithmetic and stores."""
    terms = [f"pid_b * {p}_s0"] + ([f"rm[:, None] * {p}_s1"] if rows else []) + ([f"rn[None, :] * {p}_s2"] if columns else [])
    masks = (["(rm < M)[:, None]"] if rows else []) + (["(rn < N)[None, :]"] if columns else [])
    return " + ".join(terms), " & ".join(masks) or None


def render_gemm(spec: EpilogueSpec, dot: Dict[str, str]) -> Tuple[str, str]:
    """Source of a GEMM kernel with ``spec`` as epilogue (``dot``: :func:`dot_fields`) and its
    name. Loads and stores are addressed in the 3-D index space (batch, m, n)."""

    def offset(p: str) -> str:
        return f"pid_b * {p}_s0 + rm[:, None] * {p}_s1 + rn[None, :] * {p}_s2"

    ptrs, strides = io_params(spec, 3)
    body = "\n".join(epilogue_body(spec, offset, "mask", " " * 8, broadcast_load))
    return finish(_GEMM, "gemm", helpers=spec.helpers, ptrs=ptrs, strides=strides, epilogue=body, **dot)


_GEMM_TMA = '''\
import triton
import triton.language as tl
{helpers}

@triton.jit
def {name}(
    A_DESC, B_DESC, {ptrs},
    M, N, K,
    {strides},
    A_KMAJOR: tl.constexpr, B_KMAJOR: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # persistent: NUM_SMS programs walk the output tiles in grouped order; operands arrive
    # through TMA (out-of-bounds reads are zero, so no masks); the epilogue uses pointers.
    # A_KMAJOR: A is [M, K] with unit K stride (else its transpose is); B_KMAJOR: B^T is [N, K]
    # with unit K stride (nn.Linear weights), else B is [K, N] with unit N stride.
    start = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    width = GROUP_M * grid_n
    pid_b = 0
    # the epilogue recomputes its tile from its own counter: the software pipeliner may then
    # overlap the next tile's loads with this tile's epilogue
    tile_c = start - NUM_SMS
    for tile in tl.range(start, grid_m * grid_n, NUM_SMS, flatten=True):
        group_id = tile // width
        group_size = min(grid_m - group_id * GROUP_M, GROUP_M)
        off_m = (group_id * GROUP_M + (tile % width) % group_size) * BLOCK_M
        off_n = ((tile % width) // group_size) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_type})
        for ki in range(k_tiles):
            if A_KMAJOR:
                a = A_DESC.load([off_m, ki * BLOCK_K])
            else:
                a = A_DESC.load([ki * BLOCK_K, off_m]).T
            if B_KMAJOR:
                b = B_DESC.load([off_n, ki * BLOCK_K]).T
            else:
                b = B_DESC.load([ki * BLOCK_K, off_n])
            acc = tl.dot({dot_a}, {dot_b}, acc{dot_args})
        tile_c += NUM_SMS
        group_c = tile_c // width
        size_c = min(grid_m - group_c * GROUP_M, GROUP_M)
        rm = (group_c * GROUP_M + (tile_c % width) % size_c) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = ((tile_c % width) // size_c) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
{epilogue}
'''


def render_gemm_tma(spec: EpilogueSpec, dot: Dict[str, str]) -> Tuple[str, str]:
    """The persistent TMA variant of :func:`render_gemm` (2-D problems, Hopper and later):
    same epilogue, same (batch = 0, m, n) index space for loads and stores."""

    def offset(p: str) -> str:
        return f"pid_b * {p}_s0 + rm[:, None] * {p}_s1 + rn[None, :] * {p}_s2"

    ptrs, strides = io_params(spec, 3)
    body = "\n".join(epilogue_body(spec, offset, "mask", " " * 8, broadcast_load))
    return finish(_GEMM_TMA, "gemm_tma", helpers=spec.helpers, ptrs=ptrs, strides=strides, epilogue=body, **dot)


# ---------------------------------------------------------------------------------- conv

_CONV = '''\
import triton
import triton.language as tl
from compile_backend.kernels.tile_order import grouped_tile
{helpers}

@triton.jit
def {name}(
    X, W, {ptrs},
    M, IH, IW, OH, OW, CG, OCG,
    sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    {strides},
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLAT_K: tl.constexpr,
):
    # implicit GEMM per group g: rows = output pixels (n, oh, ow), columns = output channels
    # of the group, reduction = (kh, kw, input channel) with the channel innermost, so a
    # channels-last input is read along contiguous memory. FLAT_K = CG where a group has few
    # channels (an RGB stem, a depthwise convolution; else 0): K steps over the flattened (kh, kw,
    # channel) index, each element's tap and channel computed (divisions by constants), instead
    # of a step per tap over a mostly masked block
    pid = tl.program_id(0)
    g = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(OCG, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, grid_m, grid_n, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pix = rm % M
    ow = pix % OW
    oh = (pix // OW) % OH
    nb = (pix // OW // OH).to(tl.int64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    oc = g * OCG + rn % OCG
    x_base = X + nb * sx_n + (g * CG) * sx_c
    w_base = W + oc.to(tl.int64) * sw_o
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_type})
    if FLAT_K:
        for k0 in range(0, KH * KW * FLAT_K, BLOCK_K):
            k = k0 + rk
            k_ok = k < KH * KW * FLAT_K
            ck = k % FLAT_K
            kh = k // FLAT_K // KW
            kw = k // FLAT_K % KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            inside = (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW) & k_ok[None, :]
            a = tl.load(x_base[:, None] + ih * sx_h + iw * sx_w + ck[None, :] * sx_c, mask=inside, other={zero})
            b = tl.load(w_base[None, :] + (ck * sw_c + kh * sw_h + kw * sw_w)[:, None], mask=k_ok[:, None],
                        other={zero})
            acc = tl.dot({dot_a}, {dot_b}, acc{dot_args})
    else:
        c_blocks = tl.cdiv(CG, BLOCK_K)
        for it in range(0, KH * KW * c_blocks):
            tap = it // c_blocks
            c0 = (it % c_blocks) * BLOCK_K
            kh = tap // KW
            kw = tap % KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            inside = (ih >= 0) & (ih < IH) & (iw >= 0) & (iw < IW)
            c_ok = (c0 + rk) < CG
            a = tl.load(x_base[:, None] + (ih * sx_h + iw * sx_w)[:, None] + (c0 + rk)[None, :] * sx_c,
                        mask=inside[:, None] & c_ok[None, :], other={zero})
            b = tl.load(w_base[None, :] + (c0 + rk)[:, None] * sw_c + kh * sw_h + kw * sw_w,
                        mask=c_ok[:, None], other={zero})
            acc = tl.dot({dot_a}, {dot_b}, acc{dot_args})
    row_ok = rm < M
    col_ok = rn < OCG
    mask = row_ok[:, None] & col_ok[None, :]
    oc_out = g * OCG + rn
{epilogue}
'''


def conv_offset(p: str) -> str:
    """A convolution epilogue's address of a full [pixels, channels] tile of pointer ``p`` in
    the output's (n, c, h, w) space (the kernel's ``nb``, ``oh``, ``ow``, ``oc_out``)."""
    return f"(nb * {p}_s0 + oh * {p}_s2 + ow * {p}_s3)[:, None] + oc_out[None, :] * {p}_s1"


def conv_broadcast_load(p: str, pixels: bool, channels: bool) -> Tuple[str, Optional[str]]:
    """(offset, mask: the kernel's ``row_ok`` / ``col_ok``) of a load varying along the pixels or the channels only (a spec made with
    ``epilogue_spec(..., broadcast=True, column_dim=1)``): a per-channel vector (a bias,
    per-channel scales) as one [1, BLOCK_N] row, a per-pixel one as a [BLOCK_M, 1] column, a
    scalar as itself, where a full-tile gather each took registers and load instructions per
    element (sm_90: the TMA convolution's INT8 kernel 250 -> 122 registers)."""
    if channels:
        return f"oc_out[None, :] * {p}_s1", "col_ok[None, :]"
    if pixels:
        return f"(nb * {p}_s0 + oh * {p}_s2 + ow * {p}_s3)[:, None]", "row_ok[:, None]"
    return "0", None


def render_conv(spec: EpilogueSpec, dot: Dict[str, str]) -> Tuple[str, str]:
    """Source of an implicit-GEMM 2-D convolution kernel; loads and stores are addressed in the
    output's (n, c, h, w) index space (broadcast loads as such: :func:`conv_broadcast_load`)."""
    ptrs, strides = io_params(spec, 4)
    body = "\n".join(epilogue_body(spec, conv_offset, "mask", " " * 4, conv_broadcast_load))
    return finish(_CONV, "conv", helpers=spec.helpers, ptrs=ptrs, strides=strides, epilogue=body, **dot)


def finish(template: str, kind: str, **fields: str) -> Tuple[str, str]:
    """``template`` filled in, named ``{kind}_{hash}``: (source, name)."""
    # the name carries the hash of everything else, so equal sources get equal names
    digest = hashlib.sha256(template.format(name="KERNEL", **fields).encode()).hexdigest()[:16]
    name = f"{kind}_{digest}"
    return template.format(name=name, **fields), name


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- loading
def load_kernel(source: str, name: str):
    """The @triton.jit function ``name`` of generated ``source`` (imported once per process,
    through the loader the pointwise kernels share)."""
    from .launch import load_source

    return getattr(load_source(source), name)


# ---------------------------------------------------------------------------------- FX epilogue
# A template group is: view-like ops on its inputs (the "prologue", run through ATen: they cost
# nothing), the anchor (GEMM or convolution), then a chain of pointwise ops and reshapes that
# read the anchor's result. The chain becomes the kernel's epilogue; tensors it reads besides
# the anchor's result are loaded at the tile's coordinates.

#: ops that only reshape a chain value (row-major order kept), so the kernel needs no code
_RESHAPES = ("view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "flatten", "alias")


def is_row_major_reshape(node) -> bool:
    """A reshape that keeps its value's row-major order: free in a kernel's index space."""
    packet = getattr(node.target, "overloadpacket", None)
    return packet is not None and packet.__name__ in _RESHAPES


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """A tensor the epilogue reads: ``source`` (a group input or prologue node), optionally
    viewed as ``pre_view``, broadcast to ``shape`` (a reshape of the anchor's shape)."""

    source: object  # fx.Node
    shape: Tuple[int, ...]
    pre_view: Tuple[int, ...] | None = None


@dataclasses.dataclass
class EpiloguePlan:
    """How a group's chain becomes an epilogue, and how to bind it at run time."""

    anchor_shape: Tuple[int, ...]
    prologue: list  # fx nodes run through ATen before the launch
    loads: list  # LoadPlan per loaded tensor, in EpilogueSpec.loads order
    lines: list  # Triton lines (after the anchor's own lines)
    stores: list  # (variable, shape, dtype, stride) per stored value
    outputs: list  # per group output: ("store", j) or ("value", fx node)
    helpers: set
    chain_ops: Tuple[str, ...] = ()
    out_layouts: tuple = ()  # per group output: (shape, stride, dtype) a kernel allocates, or None


def plan_epilogue(group, anchor, anchor_var: str, anchor_loads: Sequence[LoadPlan] = (),
                  operands=frozenset()) -> EpiloguePlan:
    """Analyse ``group`` around its ``anchor`` node; raises Unsupported for what a template
    epilogue cannot express. ``anchor_var`` is the Triton variable holding the anchor's value in
    its compute type; loads in ``anchor_loads`` come first (named ``x0``, ``x1``, ...).
    ``operands``: nodes the kernel computes the anchor's operands from (a fused GEMV's x
    prologue): neither run through ATen nor loaded, so the chain and the group's outputs may not
    read them."""
    import torch
    import torch.fx as fx

    from . import expr
    from .base import Unsupported, meta_of, op_name

    anchor_val = meta_of(anchor)
    anchor_shape = tuple(anchor_val.shape)
    numel = anchor_val.numel()
    nodes = [n for n in group.gm.graph.nodes if n.op == "call_function"]
    downstream = {anchor}
    for n in nodes:
        if any(x in downstream for x in n.all_input_nodes):
            downstream.add(n)
    prologue, side = [], set()
    for n in nodes:
        if n in downstream or n in operands:
            continue
        target = n.target
        if isinstance(target, torch._ops.OpOverload) and target.is_view and not any(a in side for a in n.all_input_nodes):
            prologue.append(n)
            continue
        # an element-wise value the chain reads, computed from loads inside the kernel (the
        # other branch of a diamond: a straight-through gradient's mask from the saved input)
        reason = expr.unsupported_reason(n)
        if reason is not None:
            raise Unsupported(f"{op_name(target)} computes an operand inside the group: {reason}")
        side.add(n)
    for n in side:
        if any(u is anchor or (u.op != "output" and u not in downstream and u not in side) for u in n.users):
            raise Unsupported(f"{op_name(n.target)} computes an operand of the {op_name(anchor.target)} inside "
                              "the group; only views may")
    loads = list(anchor_loads)
    names: Dict[object, str] = {anchor: anchor_var}
    load_lines = []
    loaded_shape: Dict[object, Tuple[int, ...]] = {}

    def load(source, shape) -> None:
        if source in names:
            if loaded_shape.get(source, shape) != shape:
                raise Unsupported(f"{source.name} is read at two different shapes in the epilogue")
            return
        val = meta_of(source)
        if not isinstance(val, torch.Tensor):
            raise Unsupported(f"epilogue operand {source.name} is not a tensor")
        i = len(loads)
        loads.append(LoadPlan(source, shape))
        loaded_shape[source] = shape
        names[source] = f"x{i}"
        load_lines.append(f"x{i} = {expr.to_compute(f'r{i}', val.dtype)}")

    helpers: set = set()
    lines = []
    chain_ops = []
    for n in nodes:
        if (n not in downstream and n not in side) or n is anchor:
            continue
        val = meta_of(n)
        constant = n in side and n.target.overloadpacket in expr.CONSTANT_OPS and not n.all_input_nodes
        if not isinstance(val, torch.Tensor) or (val.numel() != numel and not constant):
            raise Unsupported(f"{n.name} ({op_name(n.target)}) changes the number of elements of the GEMM result")
        if is_row_major_reshape(n) and n.args[0] in downstream:
            names[n] = names[n.args[0]]
            continue
        reason = expr.unsupported_reason(n)
        if reason is not None:
            raise Unsupported(f"epilogue op {op_name(n.target)}: {reason}")
        for x in n.all_input_nodes:
            if x in operands:
                raise Unsupported(f"{n.name} reads {x.name}, a value computed inside the GEMM's prologue")
            if x not in downstream and x not in side:
                load(x, tuple(val.shape))
        lines.extend(expr.emit_pointwise([n], names, helpers))
        chain_ops.append(op_name(n.target))
    stores, outputs, stored = [], [], {}
    for out in group.outputs:
        if out in side or out in operands:
            raise Unsupported(f"{out.name} is computed beside the GEMM and read outside the group")
        if out in downstream:
            if out not in stored:
                val = meta_of(out)
                stored[out] = len(stores)
                stores.append((names[out], tuple(val.shape), val.dtype, tuple(val.stride())))
            outputs.append(("store", stored[out]))
        elif isinstance(out, fx.Node):
            outputs.append(("value", out))
        else:
            raise Unsupported("group output is not a node")
    for i, lp in enumerate(anchor_loads):
        load_lines.insert(i, f"x{i} = {expr.to_compute(f'r{i}', meta_of(lp.source).dtype)}")
    return EpiloguePlan(anchor_shape, prologue, loads, load_lines + lines, stores, outputs, helpers,
                        tuple(chain_ops), _out_layouts(stores, outputs, anchor_shape))


def _out_layouts(stores, outputs, anchor_shape) -> tuple:
    """Stored values keep their reference strides when those reshape to the anchor's shape
    (the kernel writes through that view), else they are allocated dense."""
    import torch

    layouts = []
    for _, shape, dtype, stride in stores:
        try:
            torch.empty_strided(shape, stride, dtype=dtype, device="meta").view(tuple(anchor_shape))
        except RuntimeError:
            stride = torch.empty(shape, dtype=dtype, device="meta").stride()
        layouts.append((tuple(shape), tuple(stride), dtype))
    return tuple(layouts[ref] if kind == "store" else None for kind, ref in outputs)


def epilogue_spec(plan: EpiloguePlan, anchor_lines: Sequence[str], int_acc: bool = False,
                  skip_loads: int = 0, broadcast: bool = False, column_dim: int = -1) -> EpilogueSpec:
    """The kernel epilogue of ``plan`` after ``anchor_lines``; ``skip_loads`` leaves out the
    first anchor loads (when the anchor's value comes from cuBLAS with its bias applied).
    ``broadcast``: loads broadcast along the rows or the columns are loaded as such
    (:func:`load_sides`; for runners that view the anchor's space as (batch, rows, columns)
    with ``template.as3d``: the GEMM and scaled-GEMM builders; ``column_dim`` 1: the columns are
    a convolution's output channels in its (n, c, h, w) space, the TMA convolution's)."""
    from . import expr, expr_casts

    n = len(plan.loads)
    return EpilogueSpec(
        loads=tuple(f"r{i}" for i in range(skip_loads, n)),
        lines=tuple(plan.lines[skip_loads:n]) + tuple(anchor_lines) + tuple(plan.lines[n:]),
        stores=tuple(s[0] for s in plan.stores),
        int_acc=int_acc,
        helpers=expr.helper_source(plan.helpers),
        load_axes=tuple(load_sides(lp, plan.anchor_shape, column_dim) for lp in plan.loads[skip_loads:])
        if broadcast else (),
        load_zeros=tuple(expr_casts.masked_zero(getattr(lp.source, "meta", {}).get("val"))
                         for lp in plan.loads[skip_loads:]),
    )



def load_sides(lp: LoadPlan, anchor_shape: Sequence[int], column_dim: int = -1) -> Tuple[bool, bool]:
    """(varies along the rows, varies along the columns) of a load in a 2-D or 3-D anchor's
    space: the columns are the last dim, the rows every other one (a batch dim included, so
    a load varying by batch alone counts as varying along the rows); with ``column_dim`` 1, in
    a 4-D (n, c, h, w) space, the columns are c. From the broadcast alone (a stride 0 after
    ``expand``), which holds whatever the run-time tensor's strides."""
    import torch

    val = getattr(lp.source, "meta", {}).get("val")
    if val is None or len(anchor_shape) not in ((2, 3) if column_dim == -1 else (4,)):
        return (True, True)
    t = torch.empty(tuple(val.shape), device="meta")
    try:
        if lp.pre_view is not None:
            t = t.view(lp.pre_view)
        t = t.expand(lp.shape).view(tuple(anchor_shape))
    except RuntimeError:  # run through a copy: a full tile
        return (True, True)
    varies = [size > 1 and stride != 0 for size, stride in zip(t.shape, t.stride())]
    column = varies.pop(column_dim)
    return any(varies), column


def bind_group(plan: EpiloguePlan, group, inputs: Sequence[object]) -> Dict[object, object]:
    """Values of the group's placeholders and prologue nodes for one call."""
    import torch.fx as fx

    env = dict(zip(group.placeholders, inputs))
    for n in plan.prologue:
        args = fx.node.map_arg(n.args, lambda x: env[x])
        kwargs = fx.node.map_arg(n.kwargs, lambda x: env[x])
        env[n] = n.target(*args, **kwargs)
    return env


def to_anchor_space(t, plan_load: LoadPlan, anchor_shape: Sequence[int]):
    """View of ``t`` broadcast to the anchor's logical shape (a copy only when no view exists)."""
    if plan_load.pre_view is not None:
        t = t.view(plan_load.pre_view)
    t = t.expand(plan_load.shape)
    try:
        return t.view(tuple(anchor_shape))
    except RuntimeError:
        return t.reshape(tuple(anchor_shape))


def allocate_outputs(plan: EpiloguePlan, anchor_shape: Sequence[int], device, out=None) -> Tuple[list, list]:
    """Output tensors (as the group returns them; the caller's where ``out``, one entry per group
    output, gives one) and their views in the anchor's shape."""
    from .base import output_tensor

    outs, views = [], []
    for j in range(len(plan.stores)):
        i = plan.outputs.index(("store", j))
        t = output_tensor(out, i, plan.out_layouts[i], device)
        outs.append(t)
        views.append(t.view(tuple(anchor_shape)))
    return outs, views


def group_outputs(plan: EpiloguePlan, env: Dict[object, object], stored: Sequence[object]) -> tuple:
    return tuple(stored[ref] if kind == "store" else env[ref] for kind, ref in plan.outputs)
