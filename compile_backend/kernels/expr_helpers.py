"""The ``cb_*`` helper functions our generated kernels call, as source (:mod:`.expr`'s lowerings
name them; :func:`helper_source` puts the ones a kernel calls before it).

``exp``/``tanh``/``pow`` and the activations' backward helpers are built from ``exp``/``log2``
because libdevice is unavailable under the Triton interpreter; ``rint`` and the bf16/fp8
conversions (``expr_casts``) have a GPU and an interpreter variant, chosen by the process's
mode when the source is made. This module imports neither Triton nor :mod:`.expr`.
"""
from __future__ import annotations

from typing import Any

from . import expr_casts as casts
from .base import triton_interpret

HELPERS = {
    "exp": '''
@triton.jit
def cb_exp(x):
    # fp32 exp within ~1.2 ulp (H200; eager's expf too). tl.exp is exp2(x * log2(e)) on the GPU,
    # whose rounded product costs up to ~|x| ulp (32 ulp over [-110, 95]), amplified by mean/std
    # in a layer norm of exp(x). Cody-Waite: n = round(x / ln2), r = x - n * ln2 (ln2 in two
    # parts, exact with fma), exp(x) = exp2(r * log2(e)) * 2**n, 2**n from exponent bits in two
    # halves (no overflow; subnormal results rounded, not flushed). exp(89) = inf, exp(-104) = 0.
    xc = tl.minimum(tl.maximum(x, -104.0), 89.0)
    n = tl.floor(xc * 1.4426950408889634 + 0.5)
    r = tl.fma(n, -0.693145751953125, xc)
    r = tl.fma(n, -1.4286068203094172e-06, r)
    p = tl.exp2(r * 1.4426950408889634)
    ni = n.to(tl.int32)
    h = ni >> 1
    s1 = ((h + 127) << 23).to(tl.float32, bitcast=True)
    s2 = ((ni - h + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, p * s1 * s2)
''',
    "tanh": '''
@triton.jit
def cb_tanh(x):
    # tanh from exp: a short odd series near 0 avoids the cancellation in 1 - exp(-2|x|).
    # The series is x * (...), not |x| * (...), so tanh(-0.0) = -0.0 keeps its sign like eager.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 - x2 * 0.008863235529902197)))))
    return tl.where(ax < 0.25, small, tl.where(x < 0, -big, big))
''',
    "tanh_approx": '''
@triton.jit
def cb_tanh_approx(x):
    # the GPU's tanh unit (MUFU.TANH): relative error <= 2^-10.99, for values only an 8-bit
    # quantize reads (expr.APPROXIMATE_TANH); the interpreter has no PTX: cb_tanh there
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
''',
    "pow": '''
@triton.jit
def cb_pow(x, e):
    # x ** e for float x and e, with torch's sign rule for negative x and integral e
    mag = tl.exp2(e * tl.log2(tl.abs(x)))
    integral = e == tl.floor(e)
    odd = integral & (tl.abs(e - 2.0 * tl.floor(e * 0.5)) == 1.0)
    r = tl.where(x < 0, tl.where(integral, tl.where(odd, -mag, mag), float("nan")), mag)
    return tl.where(e == 0, 1.0, r)
''',
    "floordiv": '''
@triton.jit
def cb_floordiv(a, b, q):
    # Python floor division as eager computes it: q = floor(a / b) may be one too high when the
    # rounded quotient reaches an integer (1.5 / 0.3f); the exact remainder a - q*b tells
    r = tl.fma(-q, b, a)
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1.0, q)
''',
    "silu_grad": '''
@triton.jit
def cb_silu_grad(dy, x):
    s = tl.sigmoid(x)
    return dy * s * (1.0 + x * (1.0 - s))
''',
    "gelu_grad": '''
@triton.jit
def cb_gelu_grad(dy, x):
    # eager: dy * (cdf + x * pdf), cdf = 0.5 (1 + erf(x / sqrt 2)), pdf = exp(-x^2 / 2) / sqrt(2 pi)
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    return dy * (cdf + x * (cb_exp(-0.5 * x * x) * 0.3989422804014327))
''',
    "gelu_grad64": '''
@triton.jit
def cb_gelu_grad64(dy, x):
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    return dy * (cdf + x * (tl.exp(-0.5 * x * x) * 0.3989422804014327))
''',
    "gelu_tanh_grad": '''
@triton.jit
def cb_gelu_tanh_grad(dy, x):
    # eager (tanh approximation): u = sqrt(2/pi) (x + 0.044715 x^3), t = tanh(u),
    # dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2))
    x2 = x * x
    t = cb_tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
    left = 0.5 * x
    right = 1.0 + t
    return dy * (0.5 * right + left * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)))
''',
    "trunc": '''
@triton.jit
def cb_trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))
''',
    "log1p": '''
@triton.jit
def cb_log1p(u):
    # log(1 + u) without losing a tiny u to 1 + u (Goldberg's correction: the rounding of w =
    # 1 + u is divided back out); eager calls log1p, which softplus of very negative x needs
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.where(w == w + 1.0, tl.log(w), tl.log(w) * (u / (w - 1.0))))
''',
    "int_floordiv": '''
@triton.jit
def cb_int_floordiv(a, b):
    # Triton's integer // truncates toward zero (C); torch's floor_divide rounds down
    q = a // b
    return tl.where(((a % b) != 0) & ((a < 0) != (b < 0)), q - 1, q)
''',
}
HELPERS.update(casts.HELPERS)  # cb_rint

# Helpers that run differently under TRITON_INTERPRET=1. Triton 3.6's interpreter (torch 2.11)
# computes tl.fma as a product and a sum, each rounded, so the remainder of cb_floordiv could
# round to 0 (bf16 3.0 // 0.3 gave 10, eager 9); Triton 3.9's rounds once. Here fp32 operands
# take the remainder in fp64, where q * b (24 x 24 bits) is exact and a - q * b keeps its sign
# and is 0 only when exact; fp64 operands keep the fma.
_INTERPRETED_HELPERS = {
    **casts.INTERPRETED_HELPERS,  # cb_rint
    "tanh_approx": '''
@triton.jit
def cb_tanh_approx(x):
    return cb_tanh(x)
''',
    "floordiv": '''
@triton.jit
def cb_floordiv(a, b, q):
    if q.dtype == tl.float64:
        r = tl.fma(-q, b, a)
    else:
        r = (tl.zeros_like(q) + a).to(tl.float64) - q.to(tl.float64) * (tl.zeros_like(q) + b).to(tl.float64)
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1.0, q)
''',
}


def helper_source(code_or_names: Any) -> str:
    """Source of the ``cb_*`` helper functions generated code calls, in a fixed order.

    Pass the generated kernel code (a str: the helpers it calls are found in it) or the set of
    helper names that ``lower``/``emit_pointwise`` collected (then the bf16/fp8 conversion helpers,
    which ``round_to``/``to_storage``/``convert`` may use without recording it, are included
    too; unused jit functions cost nothing).
    """
    if isinstance(code_or_names, str):
        code, names = code_or_names, [h for h in sorted(HELPERS) if f"cb_{h}(" in code_or_names]
    else:
        code, names = None, sorted(set(code_or_names))
    table = {**HELPERS, **_INTERPRETED_HELPERS} if triton_interpret() else HELPERS
    names = set(names)
    while True:  # and the helpers those call (cb_gelu_grad calls cb_exp)
        more = {g for h in names for g in HELPERS if g not in names and f"cb_{g}(" in table[h]}
        if not more:
            break
        names |= more
    return casts.conversion_source(code) + "".join(table[h] for h in sorted(names))


__all__ = ["HELPERS", "helper_source"]
