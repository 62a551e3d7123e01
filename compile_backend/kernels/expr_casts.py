"""Dtypes, conversions and literals of the generated code, and the rounding ops that quantization
writes (``round``, ``nan_to_num``): the part of :mod:`.expr` that knows how a value of one
storage dtype becomes another.

* Storage dtypes: fp32/fp64, fp16/bf16 and float8_e4m3fn (``tl.float8e4nv``; quantized
  activations), the integer types (int8 quantized activations among them) and bool.
* Compute types: fp32 for fp16/bf16/fp8 storage (the "reduced floats": every op result of such
  a dtype is rounded to it and back, as eager stores it), the storage type otherwise.
* Rounding to bf16 and fp8 is round-to-nearest-even. The GPU converts natively (fp8: Triton's
  ``cvt.rn.satfinite``: saturates to +-448, NaN stays NaN, as torch 2.13 casts; with a torch
  whose cast turns overflow into NaN the kernels do too, see :func:`fp8_saturates`). The Triton
  interpreter truncates fp32 -> bf16, and its fp32 -> fp8 conversion rounds half up without a
  carry into the exponent and loses NaN; its fp8 -> fp32 reads the NaN code as 480. Under
  ``TRITON_INTERPRET=1`` the ``cb_*`` helpers below therefore convert with integer arithmetic
  (same bits as the GPU).
* ``round`` is round half to even like torch (``cb_rint``/``cb_rint64``: the GPU's ``cvt.rni``;
  under the interpreter the add-and-subtract of 2^23 / 2^52, exact with IEEE
  round-to-nearest-even); ``nan_to_num`` maps NaN / +inf / -inf to the given values or the
  dtype's finite extremes.
  float -> int8 is a plain conversion: the quantize chain rounds and clamps to [-127, 127] first
  (that whole tail, ``clamp(round(nan_to_num(x)))`` then the cast, is one saturating conversion
  to int32 and an integer clamp: ``saturate_to_int8``).

This module imports neither Triton nor :mod:`.expr` (which imports it).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Set

import torch

from .base import Unsupported, triton_interpret

#: the float8 dtype of quantized activations and weights (absent in very old torch builds)
FP8 = getattr(torch, "float8_e4m3fn", None)

TL_NAMES: Dict[torch.dtype, str] = {
    torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32",
    torch.float64: "tl.float64", torch.int8: "tl.int8", torch.uint8: "tl.uint8",
    torch.int16: "tl.int16", torch.int32: "tl.int32", torch.int64: "tl.int64", torch.bool: "tl.int1",
}
if FP8 is not None:
    TL_NAMES[FP8] = "tl.float8e4nv"

#: float storage dtypes computed in fp32 and rounded back after every op
REDUCED_FLOATS = (torch.float16, torch.bfloat16) + ((FP8,) if FP8 is not None else ())


def tl_type(dtype: torch.dtype) -> str:
    if dtype not in TL_NAMES:
        raise Unsupported(f"dtype {dtype} has no Triton type here")
    return TL_NAMES[dtype]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value of storage dtype ``dtype`` is held in inside a kernel."""
    return torch.float32 if dtype in REDUCED_FLOATS else dtype


def to_compute(expr: str, storage: torch.dtype) -> str:
    """Expression converting a loaded value of dtype ``storage`` to its compute type."""
    if storage == FP8:
        return f"cb_from_fp8({expr})"
    return f"{expr}.to(tl.float32)" if storage in REDUCED_FLOATS else expr


def to_storage(expr: str, storage: torch.dtype) -> str:
    """Expression converting a compute-type value to dtype ``storage`` for a store."""
    if storage == torch.bfloat16:
        return f"cb_to_bf16({expr})"
    if storage == FP8:
        return f"cb_to_fp8({expr})"
    return f"{expr}.to({tl_type(storage)})" if storage in REDUCED_FLOATS else expr


def round_to(expr: str, dtype: torch.dtype) -> str:
    """Round a compute-type value to a reduced float dtype and back (what eager's store does)."""
    if dtype == torch.bfloat16:
        return f"cb_round_bf16({expr})"
    if dtype == FP8:
        return f"cb_round_fp8({expr})"
    return f"{expr}.to({tl_type(dtype)}).to(tl.float32)" if dtype in REDUCED_FLOATS else expr


def round_fp8_in_range(expr: str) -> str:
    """Round a compute-type (fp32) value already within +-448 (or NaN) to e4m3fn and back:
    without the overflow guard a NaN-making torch needs (``fp8_saturates``), 3 instructions an
    element in every quantizing epilogue on the GPU image's torch 2.11."""
    return f"cb_round_fp8_in_range({expr})"


def convert(expr: str, src: torch.dtype, dst: torch.dtype) -> str:
    """Convert a value between compute types of storage dtypes ``src`` and ``dst`` (with rounding).

    float -> integer truncates toward zero (the quantize chain rounds and clamps before it)."""
    if dst == torch.bool:
        return expr if src == torch.bool else f"({expr} != 0)"
    cs, cd = compute_dtype(src), compute_dtype(dst)
    out = expr if cs == cd else f"{expr}.to({tl_type(cd)})"
    if dst in REDUCED_FLOATS and src != dst:
        out = round_to(out, dst)  # e.g. fp32 -> fp16, bf16 -> fp16: one rounding, as eager's cast
    return out


def literal(value: Any, dtype: torch.dtype) -> str:
    """A Python scalar as a Triton literal of compute type ``compute_dtype(dtype)``."""
    cd = compute_dtype(dtype)
    if cd == torch.bool:
        return "True" if bool(value) else "False"
    if isinstance(value, bool):
        value = int(value)
    if cd.is_floating_point:
        v = float(value)
        text = 'float("nan")' if math.isnan(v) else (
            ('float("inf")' if v > 0 else '-float("inf")') if math.isinf(v) else repr(v))
        # Python floats become fp32 constants in Triton: keep fp64 exact with an explicit tensor
        return f"tl.full([], {text}, tl.float64)" if cd == torch.float64 else text
    if isinstance(value, float):
        if not value.is_integer():
            raise Unsupported(f"float scalar {value} in an integer op")
        value = int(value)
    return str(int(value))


# ------------------------------------------------------------------------------ rounding ops
def round_half_even(x: str, out: torch.dtype, kwargs: Dict[str, Any], helpers: Set[str]) -> str:
    """``aten.round`` of compute-type operand ``x`` (``round.decimals`` only with 0 decimals)."""
    if kwargs.get("decimals", 0) != 0:
        raise Unsupported(f"round with decimals={kwargs['decimals']}")
    if not out.is_floating_point:
        return x  # integers are already round
    if compute_dtype(out) == torch.float64:
        helpers.add("rint64")
        return f"cb_rint64({x}, 4503599627370496.0)"
    helpers.add("rint")
    return f"cb_rint({x}, 8388608.0)"


def nan_to_num(x: str, out: torch.dtype, nan: Optional[float], posinf: Optional[float],
               neginf: Optional[float]) -> str:
    """``aten.nan_to_num`` of compute-type operand ``x``: NaN -> ``nan`` (default 0), +-inf ->
    ``posinf``/``neginf`` (default: the largest / lowest finite value of ``out``)."""
    if not out.is_floating_point:
        return x
    info = torch.finfo(out)
    nan = 0.0 if nan is None else nan
    posinf = info.max if posinf is None else posinf
    neginf = info.min if neginf is None else neginf
    lit = lambda v: literal(v, out)  # noqa: E731
    if posinf >= info.max and neginf <= info.min:
        # the defaults: +-inf become the extremes, every finite value stays; a min and a max do
        # that in two instructions where two compare-and-selects take four (the INT8 quantize
        # chain runs this per element in the producer's epilogue)
        return f"tl.where({x} != {x}, {lit(nan)}, tl.minimum(tl.maximum({x}, {lit(neginf)}), {lit(posinf)}))"
    return (f"tl.where({x} != {x}, {lit(nan)}, tl.where({x} == {lit(math.inf)}, {lit(posinf)}, "
            f"tl.where({x} == {lit(-math.inf)}, {lit(neginf)}, {x})))")


def saturate_to_int8(x: str, low: int, high: int, helpers: Set[str]) -> str:
    """An INT8 quantize's tail ``clamp(round(nan_to_num(x)), low, high).to(int8)`` of fp32 ``x``
    (``low``/``high`` integers within int8's range) as one conversion to int32 (round half to
    even; NaN -> 0 and out-of-range values saturate, as PTX converts float to integer:
    ``cvt.rni.s32.f32``) and the bounds as integer min/max. The chain took ~10 instructions an
    element in FFN1's INT8 quantize epilogue, two conversions among them (the round and the
    cast): its epilogue 24.4 -> 15.3 SASS instructions an element (sm_90, kernel_sass; FP8's: 15.9)."""
    helpers.update(("rint", "rint_s32"))  # the interpreter's variant rounds with cb_rint
    return f"tl.minimum(tl.maximum(cb_rint_s32({x}), {low}), {high}).to(tl.int8)"


#: helper functions the rounding ops call (merged into expr_helpers.HELPERS): on the GPU ``round`` is the
#: hardware's round-to-nearest-even, one instruction (NaN, inf and -0.0 as IEEE says, like torch;
#: the INT8 quantize chain rounds every element of a producer's epilogue); ``big`` is unused
#: there, kept so both variants take the same call
HELPERS = {
    "rint": '''
@triton.jit
def cb_rint(x, big):
    return tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
''',
    "rint64": '''
@triton.jit
def cb_rint64(x, big):
    return tl.inline_asm_elementwise("cvt.rni.f64.f64 $0, $1;", "=d,d", [x], dtype=tl.float64, is_pure=True, pack=1)
''',
    "rint_s32": '''
@triton.jit
def cb_rint_s32(x):
    return tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,f", [x], dtype=tl.int32, is_pure=True, pack=1)
''',
}
# the interpreter's round half to even (no PTX there): below ``big`` (2^23 fp32, 2^52 fp64)
# |x| + big rounds to an integer (big is even, so ties go to even) and subtracting big is exact;
# beyond it x is integral (NaN and inf included); x * 0 keeps the sign of a zero result
# (round(-0.3) is -0.0)
_RINT_BY_ARITHMETIC = '''
@triton.jit
def NAME(x, big):
    ax = tl.abs(x)
    t = (ax + big) - big
    r = tl.where(x < 0, -t, t)
    r = tl.where(t == 0, x * 0.0, r)
    return tl.where(ax < big, r, x)
'''
INTERPRETED_HELPERS = {"rint": _RINT_BY_ARITHMETIC.replace("NAME", "cb_rint"),
                       "rint64": _RINT_BY_ARITHMETIC.replace("NAME", "cb_rint64"),
                       # cvt.rni.s32.f32 within int8's range (the callers clamp to it): NaN -> 0,
                       # round half to even
                       "rint_s32": '''
@triton.jit
def cb_rint_s32(x):
    y = tl.where(x != x, 0.0, tl.minimum(tl.maximum(x, -128.0), 127.0))
    return cb_rint(y, 8388608.0).to(tl.int32)
'''}


# fp32 <-> bf16 / fp8 (e4m3fn) conversions: native on the GPU, integer arithmetic under the
# interpreter (see the module docstring)
_NATIVE = {
    "bf16": '''
@triton.jit
def cb_round_bf16(x):
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def cb_to_bf16(x):
    return x.to(tl.bfloat16)
''',
    "fp8": '''
@triton.jit
def cb_to_fp8(x):
    return {guard}.to(tl.float8e4nv)


@triton.jit
def cb_round_fp8(x):
    return {guard}.to(tl.float8e4nv).to(tl.float32)


@triton.jit
def cb_round_fp8_in_range(x):
    # x within +-448 or NaN (clamped first, as every quantize is): no overflow guard to pay
    return x.to(tl.float8e4nv).to(tl.float32)


@triton.jit
def cb_from_fp8(x):
    return x.to(tl.float32)
''',
}
_INTERPRETED = {
    "bf16": '''
@triton.jit
def cb_round_bf16(x):
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, u.to(tl.float32, bitcast=True))


@triton.jit
def cb_to_bf16(x):
    return cb_round_bf16(x).to(tl.bfloat16)
''',
    "fp8": '''
@triton.jit
def cb_fp8_bits(x):
    # fp32 -> e4m3fn code (int32 0..255) as this torch's c10 converts: round to nearest even,
    # NaN 0x7F, overflow (beyond 464) {over}; subnormals (< 2^-6) by adding 2^14, whose fp32
    # spacing is the e4m3 subnormal step 2^-9; normals by rebiasing the exponent and rounding
    # the 20 dropped mantissa bits (ties to the even kept bit)
    u = x.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    sub = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    nrm = (a - 0x3BF80001 + ((a >> 20) & 1)) >> 20
    r = tl.where(a < 0x3C800000, sub, tl.minimum(nrm, {over}))
    r = tl.where(a >= 0x43F00000, tl.where(a > 0x7F800000, 0x7F, {over}), r)
    return tl.where(u < 0, r | 0x80, r)


@triton.jit
def cb_fp8_value(b):
    # e4m3fn code (int32 0..255) -> fp32, exactly (NaN for 0x7F / 0xFF)
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    v = tl.where((b & 0x7F) == 0x7F, float("nan"), v)
    return tl.where(b >= 128, -v, v)


@triton.jit
def cb_to_fp8(x):
    return cb_fp8_bits(x).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def cb_round_fp8(x):
    return cb_fp8_value(cb_fp8_bits(x))


@triton.jit
def cb_round_fp8_in_range(x):
    return cb_round_fp8(x)


@triton.jit
def cb_from_fp8(x):
    return cb_fp8_value(x.to(tl.uint8, bitcast=True).to(tl.int32))
''',
}
_CALLS = {"bf16": ("cb_round_bf16(", "cb_to_bf16("),
          "fp8": ("cb_to_fp8(", "cb_round_fp8(", "cb_round_fp8_in_range(", "cb_from_fp8(")}


def conversion_source(code: Optional[str], interpret: Optional[bool] = None) -> str:
    """Source of the conversion helpers ``code`` calls (all of them for None: a caller that
    only knows the helper names of its lines, since round_to/to_storage/convert add calls
    without recording them; unused jit functions cost nothing). ``interpret``: the variant for
    Triton's interpreter or the GPU (default: whichever this process runs)."""
    table = _INTERPRETED if (triton_interpret() if interpret is None else interpret) else _NATIVE
    saturates = fp8_saturates()
    fields = {"over": "0x7E" if saturates else "0x7F",
              "guard": "x" if saturates else 'tl.where(tl.abs(x) > 464.0, float("nan"), x)'}
    return "".join(src.format(**fields) if key == "fp8" else src for key, src in table.items()
                   if code is None or any(call in code for call in _CALLS[key]))


@functools.lru_cache(maxsize=None)
def fp8_saturates() -> bool:
    """This torch casts fp32 beyond the e4m3fn range to +-448 (newer c10) rather than to NaN
    (older): the kernels follow it (the GPU's satfinite conversion saturates; for a NaN-making
    torch values beyond 464, which round past 448, become NaN first). Quantization clamps to
    +-448 before the cast, so its results do not depend on this."""
    return FP8 is not None and bool(torch.isfinite(torch.tensor(1000.0).to(FP8).float()))


def masked_zero(val) -> str:
    """The ``other=`` literal of a masked load of ``val``'s dtype: ``0.0`` for FP8 (compiled
    Triton has no int -> fp8 cast; its interpreter has), else ``0``."""
    return "0.0" if isinstance(val, torch.Tensor) and val.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else "0"
