"""ATen pointwise ops as Triton expressions: one readable line of generated code per op.

Used by the pointwise and reduction code generators and by GEMM/conv templates for fused
epilogues. This module never imports Triton; it only writes Triton source text.

Numerics rule (how a fused chain matches eager, op by op)
---------------------------------------------------------
* Every value lives in the kernel in its *compute type*: fp32 for fp16/bf16/fp32 storage, fp64
  for fp64, the integer type itself for integers, ``tl.int1`` for bool. Loads convert with
  :func:`to_compute`, stores with :func:`to_storage`.
* An op converts its operands to the op's compute type (the compute type of its result dtype,
  or for comparisons of the promoted operand dtype, following torch's type promotion), computes,
  and, when its result dtype (``meta['val'].dtype``) is fp16/bf16, rounds the result to that
  dtype and back (``x.to(tl.float16).to(tl.float32)``): eager writes every intermediate to memory
  in its dtype, so rounding after each op keeps a fused chain equal to eager up to the
  implementations of transcendental functions. ``round_intermediates=False`` skips those roundings
  (faster, slightly more accurate than eager, like Inductor's default).
* Python scalars are literals in the op's compute type (eager's "opmath" for reduced floats),
  except in comparisons, where eager first rounds them to the common (tensor's) dtype like
  any input (``_in_common_dtype``).
* Division and sqrt are IEEE-rounded (``div_rn``, ``sqrt_rn``); fp32 exp is ``cb_exp`` (range
  reduced, ~2 ulp like eager's expf: the hardware exp2(x * log2 e) is off by up to ~|x| ulp);
  rsqrt/log/sin/cos use the hardware approximations (a few ulp, as CUDA's eager kernels do for
  rsqrt); tanh and general pow use small helper functions (``HELPERS``, :mod:`.expr_helpers`)
  built from ``exp``/``log2`` because libdevice is unavailable under the Triton interpreter.
* Dtypes, conversions and literals live in :mod:`.expr_casts` (with ``round`` and ``nan_to_num``):
  bf16 and fp8 rounding is a native round-to-nearest-even conversion on the GPU, integer
  arithmetic under the interpreter (whose conversions truncate or round half up).
* Where eager deviates from the naive formula, eager wins: floor division is exact Python
  floor division (``cb_floordiv``: 1.5 // 0.3 == 4), a pow exponent is first rounded to a
  reduced-float tensor's dtype, Python-scalar kernel arguments are not rounded (wrapped numbers).
* maximum/minimum/clamp propagate NaN like torch; relu(NaN) is NaN; clamp(-0.0, min=0) is -0.0.

API
---
``emit_pointwise(nodes, names, helpers=None, round_intermediates=True) -> list[str]``: for each
FX node in ``nodes`` (graph order) one line ``v_<node> = <expr>``; ``names`` maps every input
node to the Triton variable holding it (compute type) and receives the new names. Helper
functions the lines call are added to ``helpers``; put ``helper_source(<kernel code>)`` in the
generated module: it defines every ``cb_*`` helper the code calls.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

from . import expr_casts as casts
from .expr_helpers import HELPERS, helper_source  # noqa: F401  (the helpers generated code calls)
from .base import FILL_OPS, Unsupported, meta_of
from .expr_casts import (REDUCED_FLOATS, TL_NAMES, compute_dtype, convert, literal, round_to,  # noqa: F401
                         tl_type, to_compute, to_storage)

aten = torch.ops.aten
prims = torch.ops.prims

# ----------------------------------------------------------------------------------- promotion
def _category(dtype: torch.dtype) -> int:
    if dtype == torch.bool:
        return 0
    if dtype.is_floating_point:
        return 2
    if dtype.is_complex:
        return 3
    return 1


def promote(operands: Sequence[Any]) -> torch.dtype:
    """torch's result_type over Vars (tensors, 0-dim or not) and Python scalars."""
    groups: List[Optional[torch.dtype]] = [None, None, None]  # dim tensors, 0-dim tensors, scalars
    for a in operands:
        if isinstance(a, Var):
            dt, g = a.dtype, (2 if a.scalar else 0 if a.ndim > 0 else 1)
        elif isinstance(a, bool):
            dt, g = torch.bool, 2
        elif isinstance(a, int):
            dt, g = torch.int64, 2
        elif isinstance(a, float):
            dt, g = torch.get_default_dtype(), 2
        else:
            continue
        groups[g] = dt if groups[g] is None else torch.promote_types(groups[g], dt)
    result: Optional[torch.dtype] = None
    for dt in groups:  # combine from the highest priority group down
        if dt is None:
            continue
        if result is None:
            result = dt
        elif _category(dt) > _category(result):
            result = torch.promote_types(result, dt)
    if result is None:
        raise Unsupported("no operands to promote")
    return result


# ------------------------------------------------------------------------------------ lowering
@dataclasses.dataclass(frozen=True)
class Var:
    """An operand inside a kernel: its variable name (compute type), dtype and rank.

    scalar: the variable is a Python number passed as a kernel argument; it promotes and
    converts like a Python scalar literal (no rounding to a reduced float), as in eager.
    """

    name: str
    dtype: torch.dtype
    ndim: int = 1
    scalar: bool = False


def _as(a: Any, dtype: torch.dtype) -> str:
    """Operand ``a`` (Var or Python scalar) in the compute type of ``dtype``."""
    if isinstance(a, Var):
        if a.scalar:  # Triton promotes scalar arguments like literals
            return f"({a.name} != 0)" if dtype == torch.bool and a.dtype != torch.bool else a.name
        return convert(a.name, a.dtype, dtype)
    return literal(a, dtype)


def _div(a: str, b: str, cd: torch.dtype) -> str:
    return f"tl.div_rn({a}, {b})" if cd == torch.float32 else f"{a} / {b}"


def _kw(args: Sequence[Any], kwargs: Dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _binary(fmt: str) -> Callable:
    def lower(args, kwargs, out, helpers):
        return fmt.format(a=_as(args[0], out), b=_as(args[1], out))
    return lower


def _unary_float(fmt: str) -> Callable:
    def lower(args, kwargs, out, helpers):
        if not out.is_floating_point:
            raise Unsupported(f"{fmt} on non-float result {out}")
        return fmt.format(a=_as(args[0], out))
    return lower


def _in_common_dtype(a: Any, dtype: torch.dtype) -> str:
    """Operand ``a`` cast to the common dtype as ATen's TensorIterator casts every input, Python
    scalars included: CPU and CUDA comparisons read the scalar back as ``scalar_t``, so bf16
    ``p > 0.3`` compares with 0.30078125 (via fp32, as c10's Half/BFloat16 take a float).
    Arithmetic differs: CUDA's add/mul/div keep the unrounded scalar in opmath (``_as``)."""
    if isinstance(a, Var) and not a.scalar:
        return convert(a.name, a.dtype, dtype)
    if dtype not in REDUCED_FLOATS:
        return _as(a, dtype)  # fp32/fp64/int literals are exact in their compute type
    if isinstance(a, Var):  # a Python number passed as a kernel argument (fp32, int64 or bool)
        return round_to(f"(tl.zeros([], tl.float32) + {a.name})", dtype)  # a Python float here, interpreted
    rounded = torch.tensor(float(a), dtype=torch.float64).to(torch.float32).to(dtype)
    return literal(float(rounded), dtype)


def _compare(op: str) -> Callable:
    # computed in the common dtype of both operands (torch.result_type), which is a reduced
    # float for an fp16/bf16 tensor against a Python float: both sides are values of it
    def lower(args, kwargs, out, helpers):
        dt = promote(args[:2])
        return f"{_in_common_dtype(args[0], dt)} {op} {_in_common_dtype(args[1], dt)}"
    return lower


def _add(sign: str, reverse: bool = False) -> Callable:
    def lower(args, kwargs, out, helpers):
        a, b = (args[1], args[0]) if reverse else (args[0], args[1])
        alpha = _kw(args, kwargs, 2, "alpha", 1)
        bb = _as(b, out)
        if alpha != 1:
            bb = f"{bb} * {literal(alpha, out)}"
        if out == torch.bool:
            return f"{_as(a, out)} | {bb}"
        return f"{_as(a, out)} {sign} {bb}"
    return lower


def _div_op(args, kwargs, out, helpers):
    mode = kwargs.get("rounding_mode", args[2] if len(args) > 2 else None)
    cd = compute_dtype(out)
    if not cd.is_floating_point:
        if mode != "floor" or cd == torch.bool:
            raise Unsupported(f"integer division with rounding_mode={mode!r}")
        if not isinstance(args[1], Var) and int(args[1]) == 0:
            raise Unsupported("integer division by a literal 0 (eager raises)")
        helpers.add("int_floordiv")  # MoE routing's sorted slot // top_k: the token of each slot
        b = args[1] if isinstance(args[1], Var) else f"tl.full([], {int(args[1])}, {tl_type(cd)})"
        return f"cb_int_floordiv({_as(args[0], out)}, {_as(b, out) if isinstance(b, Var) else b})"
    a, b = _as(args[0], out), _as(args[1], out)
    q = _div(a, b, cd)
    if mode is None:
        return q
    if mode == "floor":
        helpers.add("floordiv")
        if not isinstance(args[1], Var):
            b = f"tl.full([], {b}, {tl_type(cd)})"
        return f"cb_floordiv({a}, {b}, tl.floor({q}))"
    if mode == "trunc":
        helpers.add("trunc")
        return f"cb_trunc({q})"
    raise Unsupported(f"div rounding_mode={mode!r}")


def _pow_scalar_exponent(args, kwargs, out, helpers):
    x, e = _as(args[0], out), args[1]
    if not compute_dtype(out).is_floating_point:
        if e == 2:
            return f"{x} * {x}"
        raise Unsupported(f"integer pow with exponent {e}")
    special = {0: None, 1: "{x}", 2: "{x} * {x}", 3: "{x} * {x} * {x}", 0.5: "tl.sqrt_rn({x})",
               -0.5: "tl.rsqrt({x})", -1: _div("1.0", "{x}", compute_dtype(out)),
               -2: _div("1.0", "({x} * {x})", compute_dtype(out))}
    if e in special:
        if special[e] is None:  # x ** 0 is 1 even for NaN
            return f"tl.full([], 1.0, {tl_type(compute_dtype(out))})"
        return special[e].format(x=x)
    if out in REDUCED_FLOATS:  # eager converts the exponent to the tensor's dtype first
        e = float(torch.tensor(float(e), dtype=out))
    helpers.add("pow")
    return f"cb_pow({x}, {literal(e, out)})"


def _pow_scalar_base(args, kwargs, out, helpers):
    base, e = args[0], _as(args[1], out)
    if not compute_dtype(out).is_floating_point or base <= 0:
        raise Unsupported(f"pow with scalar base {base}")
    return f"tl.exp2({e} * {literal(math.log2(base), out)})"


def _pow_tensor(args, kwargs, out, helpers):
    if not compute_dtype(out).is_floating_point:
        raise Unsupported("integer pow")
    helpers.add("pow")
    return f"cb_pow({_as(args[0], out)}, {_as(args[1], out)})"


def _clamp(args, kwargs, out, helpers):
    lo, hi = _kw(args, kwargs, 1, "min"), _kw(args, kwargs, 2, "max")
    x = _as(args[0], out)
    nan = ", propagate_nan=tl.PropagateNan.ALL" if out.is_floating_point else ""
    for bound, beyond, fn in [(b, c, f) for b, c, f in ((lo, "<", "maximum"), (hi, ">", "minimum")) if b is not None]:
        # eager replaces only values beyond a number bound: clamp(-0.0, min=0) is -0.0
        number = out.is_floating_point and isinstance(bound, (int, float)) and not math.isnan(bound)
        b = _as(bound, out)
        # a nonzero number bound: min/max that keep NaN are one instruction (the quantize
        # chains' +-127 / +-448) where compare-and-select is two; a zero bound keeps the select
        x = f"tl.where({x} {beyond} {b}, {b}, {x})" if number and bound == 0 else f"tl.{fn}({x}, {b}{nan})"
    return x


def _minmax(fn: str) -> Callable:
    def lower(args, kwargs, out, helpers):
        nan = ", propagate_nan=tl.PropagateNan.ALL" if out.is_floating_point else ""
        return f"tl.{fn}({_as(args[0], out)}, {_as(args[1], out)}{nan})"
    return lower


def _where(args, kwargs, out, helpers):
    return f"tl.where({_as(args[0], torch.bool)}, {_as(args[1], out)}, {_as(args[2], out)})"


def _masked_fill(args, kwargs, out, helpers):
    return f"tl.where({_as(args[1], torch.bool)}, {_as(args[2], out)}, {_as(args[0], out)})"


def _gelu(args, kwargs, out, helpers, tanh: str = "tanh"):
    x = _as(args[0], out)
    if kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "tanh":
        helpers.add(tanh)
        return f"0.5 * {x} * (1.0 + cb_{tanh}(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))"
    return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"


def _exp(args, kwargs, out, helpers):
    if not out.is_floating_point:
        raise Unsupported(f"exp on non-float result {out}")
    if compute_dtype(out) != torch.float32:
        return f"tl.exp({_as(args[0], out)})"  # fp64: Triton calls libdevice's exp
    helpers.add("exp")
    return f"cb_exp({_as(args[0], out)})"


def _softplus(args, kwargs, out, helpers):
    # eager: x where beta * x > threshold, else log1p(exp(beta * x)) / beta (Mamba's dt, Jamba)
    if not out.is_floating_point:
        raise Unsupported(f"softplus on non-float result {out}")
    beta, threshold = _kw(args, kwargs, 1, "beta", 1.0), _kw(args, kwargs, 2, "threshold", 20.0)
    x = _as(args[0], out)
    bx = x if beta == 1 else f"({x} * {literal(beta, out)})"
    helpers.update(("log1p", "exp"))
    soft = f"cb_log1p(cb_exp({bx}))" + ("" if beta == 1 else f" / {literal(beta, out)}")
    return f"tl.where({bx} > {literal(threshold, out)}, {x}, {soft})"


def _mish(args, kwargs, out, helpers):
    # eager: x * tanh(softplus(x)) (softplus's default threshold; YOLOv4-style backbones)
    if not out.is_floating_point:
        raise Unsupported(f"mish on non-float result {out}")
    helpers.update(("tanh", "log1p", "exp"))
    x = _as(args[0], out)
    return f"{x} * cb_tanh(tl.where({x} > 20.0, {x}, cb_log1p(cb_exp({x}))))"


def _elu(args, kwargs, out, helpers):
    # eager: x > 0 ? x * scale : alpha * (exp(x * input_scale) - 1) * scale (expm1 there: a tiny
    # negative x keeps its digits, so exp(x) - 1 is computed as expm1 = 2 tanh(x/2) / (1 - tanh(x/2)))
    if not out.is_floating_point:
        raise Unsupported(f"elu on non-float result {out}")
    alpha, scale, in_scale = (_kw(args, kwargs, i, n, 1.0) for i, n in ((1, "alpha"), (2, "scale"),
                                                                          (3, "input_scale")))
    helpers.add("tanh")
    x = _as(args[0], out)
    t = f"cb_tanh({x} * {literal(in_scale / 2, out)})"
    neg = f"{literal(alpha * scale, out)} * (2.0 * {t} / (1.0 - {t}))"
    return f"tl.where({x} > 0, {x} * {literal(scale, out)}, {neg})"


def _constant(value_index: int) -> Callable:
    def lower(args, kwargs, out, helpers):
        value = args[value_index] if len(args) > value_index else kwargs.get("fill_value", kwargs.get("value"))
        if isinstance(value, Var):
            return _as(value, out)  # fill.Tensor with a 0-dim tensor
        return f"tl.full([], {literal(value, out)}, {tl_type(compute_dtype(out))})"
    return lower


def _fixed(value: int) -> Callable:
    def lower(args, kwargs, out, helpers):
        return f"tl.full([], {literal(value, out)}, {tl_type(compute_dtype(out))})"
    return lower


def _float_only(out: torch.dtype, fmt: str, **operands: Any) -> str:
    if not out.is_floating_point:
        raise Unsupported(f"backward op on non-float result {out}")
    return fmt.format(**{k: _as(v, out) for k, v in operands.items()})


def _threshold_backward(args, kwargs, out, helpers):
    # eager: self <= threshold ? 0 : grad (the comparison in self's dtype, like any comparison)
    grad, x, threshold = args[0], args[1], _kw(args, kwargs, 2, "threshold")
    dt = promote([x, threshold])
    return f"tl.where({_in_common_dtype(x, dt)} <= {_in_common_dtype(threshold, dt)}, 0, {_as(grad, out)})"


def _silu_backward(args, kwargs, out, helpers):
    # eager: s = 1 / (1 + exp(-x)); dy * s * (1 + x * (1 - s)); tl.sigmoid as in silu's forward
    helpers.add("silu_grad")
    return _float_only(out, "cb_silu_grad({g}, {x})", g=args[0], x=args[1])


def _gelu_backward(args, kwargs, out, helpers):
    if _kw(args, kwargs, 2, "approximate", "none") == "tanh":
        helpers.update({"gelu_tanh_grad", "tanh"})
        return _float_only(out, "cb_gelu_tanh_grad({g}, {x})", g=args[0], x=args[1])
    # exact GELU's pdf needs exp: cb_exp in fp32 (see the module doc), the libdevice one in fp64
    fp64 = out.is_floating_point and compute_dtype(out) == torch.float64
    helpers.update({"gelu_grad64"} if fp64 else {"gelu_grad", "exp"})
    return _float_only(out, "cb_gelu_grad64({g}, {x})" if fp64 else "cb_gelu_grad({g}, {x})", g=args[0], x=args[1])


def _convert(args, kwargs, out, helpers):
    return _as(args[0], out)


def _logical(op: str) -> Callable:
    def lower(args, kwargs, out, helpers):
        return f"{_as(args[0], torch.bool)} {op} {_as(args[1], torch.bool)}"
    return lower


def _bitwise(op: str) -> Callable:
    def lower(args, kwargs, out, helpers):
        if compute_dtype(out).is_floating_point:
            raise Unsupported("bitwise op on floats")
        return f"{_as(args[0], out)} {op} {_as(args[1], out)}"
    return lower


def _bitwise_not(args, kwargs, out, helpers):
    return f"{_as(args[0], out)} == 0" if out == torch.bool else f"~{_as(args[0], out)}"


def _leaky_relu(args, kwargs, out, helpers):
    x = _as(args[0], out)
    return f"tl.where({x} < 0, {x} * {literal(_kw(args, kwargs, 1, 'negative_slope', 0.01), out)}, {x})"


def _hardtanh(args, kwargs, out, helpers):
    lo, hi = _kw(args, kwargs, 1, "min_val", -1.0), _kw(args, kwargs, 2, "max_val", 1.0)
    return _clamp([args[0], lo, hi], {}, out, helpers)


def _addc(op: str) -> Callable:
    def lower(args, kwargs, out, helpers):
        value = _kw(args, kwargs, 3, "value", 1)
        a, b, c = (_as(x, out) for x in args[:3])
        inner = f"{b} * {c}" if op == "mul" else _div(b, c, compute_dtype(out))
        scale = "" if value == 1 else f"{literal(value, out)} * "
        return f"{a} + {scale}{inner}"
    return lower


def _sign(args, kwargs, out, helpers):
    x = _as(args[0], out)
    return f"({x} > 0).to({tl_type(compute_dtype(out))}) - ({x} < 0).to({tl_type(compute_dtype(out))})"


def _with_helper(name: str, fmt: str) -> Callable:
    def lower(args, kwargs, out, helpers):
        if not out.is_floating_point:
            raise Unsupported(f"{name} on non-float result {out}")
        helpers.add(name)
        return fmt.format(a=_as(args[0], out))
    return lower


# packet -> lowering(args, kwargs, out_dtype, helpers) -> expression in compute(out_dtype)
LOWERINGS: Dict[Any, Callable] = {
    aten.add: _add("+"), aten.sub: _add("-"), aten.rsub: _add("-", reverse=True),
    aten.mul: lambda a, k, o, h: _binary("{a} & {b}" if o == torch.bool else "{a} * {b}")(a, k, o, h), aten.div: _div_op, aten.true_divide: _div_op,
    aten.neg: lambda a, k, o, h: f"-{_as(a[0], o)}",
    aten.abs: lambda a, k, o, h: f"tl.abs({_as(a[0], o)})",
    aten.exp: _exp, aten.exp2: _unary_float("tl.exp2({a})"),
    aten.log: _unary_float("tl.log({a})"), aten.log2: _unary_float("tl.log2({a})"),
    aten.sqrt: _unary_float("tl.sqrt_rn({a})"), aten.rsqrt: _unary_float("tl.rsqrt({a})"),
    aten.reciprocal: lambda a, k, o, h: _div("1.0", _as(a[0], o), compute_dtype(o)) if o.is_floating_point
    else _raise("integer reciprocal"),
    aten.sin: _unary_float("tl.sin({a})"), aten.cos: _unary_float("tl.cos({a})"),
    aten.erf: _unary_float("tl.erf({a})"), aten.sigmoid: _unary_float("tl.sigmoid({a})"),
    aten.tanh: _with_helper("tanh", "cb_tanh({a})"),
    aten.floor: lambda a, k, o, h: f"tl.floor({_as(a[0], o)})" if o.is_floating_point else _as(a[0], o),
    aten.ceil: lambda a, k, o, h: f"tl.ceil({_as(a[0], o)})" if o.is_floating_point else _as(a[0], o),
    aten.trunc: lambda a, k, o, h: _with_helper("trunc", "cb_trunc({a})")(a, k, o, h) if o.is_floating_point
    else _as(a[0], o),
    aten.sign: _sign,
    aten.round: lambda a, k, o, h: casts.round_half_even(_as(a[0], o), o, k, h),
    aten.nan_to_num: lambda a, k, o, h: casts.nan_to_num(
        _as(a[0], o), o, *(_kw(a, k, i, n) for i, n in ((1, "nan"), (2, "posinf"), (3, "neginf")))),
    aten.relu: lambda a, k, o, h: f"tl.where({_as(a[0], o)} < 0, 0, {_as(a[0], o)})",
    aten.silu: _unary_float("{a} * tl.sigmoid({a})"),
    aten.gelu: _gelu, aten.leaky_relu: _leaky_relu, aten.hardtanh: _hardtanh,
    aten.softplus: _softplus, aten.mish: _mish, aten.elu: _elu,
    aten.floor_divide: lambda a, k, o, h: _div_op([a[0], a[1], "floor"], {}, o, h),
    aten.hardsigmoid: _unary_float("tl.minimum(tl.maximum({a} / 6.0 + 0.5, 0.0), 1.0)"),
    aten.hardswish: _unary_float("{a} * tl.minimum(tl.maximum({a} + 3.0, 0.0), 6.0) / 6.0"),
    aten.pow: None,  # overload-dependent, see _lowering_for
    aten.maximum: _minmax("maximum"), aten.minimum: _minmax("minimum"),
    aten.clamp: _clamp, aten.clamp_min: lambda a, k, o, h: _clamp([a[0], a[1], None], {}, o, h),
    aten.clamp_max: lambda a, k, o, h: _clamp([a[0], None, a[1]], {}, o, h),
    aten.where: _where, aten.masked_fill: _masked_fill,
    aten.eq: _compare("=="), aten.ne: _compare("!="), aten.lt: _compare("<"),
    aten.gt: _compare(">"), aten.le: _compare("<="), aten.ge: _compare(">="),
    aten.logical_not: lambda a, k, o, h: f"{_as(a[0], torch.bool)} == 0",
    aten.logical_and: _logical("&"), aten.logical_or: _logical("|"), aten.logical_xor: _logical("^"),
    aten.bitwise_and: _bitwise("&"), aten.bitwise_or: _bitwise("|"), aten.bitwise_xor: _bitwise("^"),
    aten.bitwise_not: _bitwise_not,
    aten._to_copy: _convert, prims.convert_element_type: _convert, aten.clone: _convert,
    aten.fill: _constant(1), aten.full: _constant(1), aten.full_like: _constant(1),
    aten.scalar_tensor: _constant(0), aten.new_full: _constant(2),
    aten.zeros_like: _fixed(0), aten.ones_like: _fixed(1), aten.zeros: _fixed(0), aten.ones: _fixed(1),
    aten.new_zeros: _fixed(0), aten.new_ones: _fixed(1),
    aten.addcmul: _addc("mul"), aten.addcdiv: _addc("div"),
    # backward ops of activations (training graphs), each as eager's CUDA kernel computes it
    aten.threshold_backward: _threshold_backward,
    aten.sigmoid_backward: lambda a, k, o, h: _float_only(o, "{g} * (1.0 - {y}) * {y}", g=a[0], y=a[1]),
    aten.tanh_backward: lambda a, k, o, h: _float_only(o, "{g} * (1.0 - {y} * {y})", g=a[0], y=a[1]),
    aten.silu_backward: _silu_backward, aten.gelu_backward: _gelu_backward,
    # eager: grad * mask * scale, the mask as a number (so 0 * inf is NaN there too)
    aten.native_dropout_backward: lambda a, k, o, h: _float_only(
        o, "{g} * {m} * {s}", g=a[0], m=a[1], s=_kw(a, k, 2, "scale")),
}

#: node meta flag (set by fx_passes.quant_math): this tanh, or tanh-form GELU, feeds only 8-bit
#: quantizes, so it may use the GPU's tanh unit (``cb_tanh_approx``: ``tanh.approx.f32``, relative
#: error <= 2^-10.99, one instruction where ``cb_tanh`` takes ~20) -- an error far below the
#: quantize's own (quant/README.md, "GELU before a quantize")
APPROXIMATE_TANH = "cb_approximate_tanh"
_APPROXIMATED = {aten.tanh.default: _with_helper("tanh_approx", "cb_tanh_approx({a})"),
                 aten.gelu.default: lambda a, k, o, h: _gelu(a, k, o, h, tanh="tanh_approx")}


def _approximated(node: fx.Node, out: torch.dtype):
    """The hardware-tanh lowering of ``node`` when the flag allows it (fp32 compute), else None."""
    if not node.meta.get("cb_approximate_tanh") or compute_dtype(out) != torch.float32:  # APPROXIMATE_TANH
        return None
    return _APPROXIMATED.get(node.target)


# ops whose value does not depend on any tensor operand's elements (they broadcast a constant)
CONSTANT_OPS = FILL_OPS | {aten.fill}

def _lowering_for(target: Any) -> Callable:
    if not isinstance(target, torch._ops.OpOverload):
        raise Unsupported(f"{target} is not an ATen op")
    packet = target.overloadpacket
    if packet is aten.pow:
        overload = target._overloadname
        return {"Tensor_Scalar": _pow_scalar_exponent, "Scalar": _pow_scalar_base,
                "Tensor_Tensor": _pow_tensor}.get(overload) or _raise(f"pow.{overload}")
    if packet not in LOWERINGS:
        raise Unsupported(f"no Triton expression for {target}")
    return LOWERINGS[packet]


def _raise(what: str):
    raise Unsupported(f"no Triton expression for {what}")


def lower(target: Any, args: Sequence[Any], kwargs: Dict[str, Any], out_dtype: torch.dtype,
          helpers: Optional[Set[str]] = None) -> str:
    """Expression (compute type of ``out_dtype``, before rounding) for one op on Vars/scalars."""
    if out_dtype not in TL_NAMES:
        raise Unsupported(f"result dtype {out_dtype}")
    for a in args:
        if isinstance(a, Var) and a.dtype not in TL_NAMES:
            raise Unsupported(f"operand dtype {a.dtype}")
    return _lowering_for(target)(list(args), dict(kwargs), out_dtype, helpers if helpers is not None else set())


def is_supported(node: fx.Node) -> bool:
    return unsupported_reason(node) is None


def unsupported_reason(node: fx.Node) -> Optional[str]:
    """Why ``node`` cannot become a pointwise line, or None. Checks op, dtypes and arguments."""
    try:
        _lowering_for(node.target)
        val = meta_of(node)
        if not isinstance(val, torch.Tensor):
            return f"{node.name} has no tensor meta['val']"
        args = [_var_for(a) if isinstance(a, fx.Node) else a for a in node.args]
        kwargs = {k: (_var_for(v) if isinstance(v, fx.Node) else v) for k, v in node.kwargs.items()}
        lower(node.target, args, kwargs, val.dtype, set())
    except Unsupported as e:
        return str(e)
    return None


def _var_for(node: fx.Node, name: Optional[str] = None) -> Any:
    val = meta_of(node)
    if isinstance(val, torch.Tensor):
        return Var(name or node.name, val.dtype, val.dim())
    if isinstance(val, (bool, int, float)):
        return val if name is None else Var(name, scalar_dtype(val), 0, scalar=True)
    raise Unsupported(f"{node.name} has no usable meta['val']")


def scalar_dtype(v: Any) -> torch.dtype:
    return torch.bool if isinstance(v, bool) else (torch.int64 if isinstance(v, int) else torch.float32)


#: ops whose lowering already yields a value of the result dtype, rounded (``_convert``)
ROUNDS_ITSELF = frozenset({aten._to_copy.default, prims.convert_element_type.default, aten.clone.default})


def _int8_quantize_tail(node: fx.Node) -> Optional[Tuple[fx.Node, int, int]]:
    """(x, low, high) when ``node`` converts ``clamp(round(nan_to_num(x)), low, high)`` to int8,
    all in fp32, with integer bounds within int8's range and nan_to_num's NaN -> 0 and infinities
    beyond the bounds (``quant_ref.quantize_steps``' INT8 tail): ``casts.saturate_to_int8``
    computes the same values in one conversion."""
    def op(a: Any, target) -> bool:
        v = meta_of(a) if isinstance(a, fx.Node) and a.op == "call_function" and a.target == target else None
        return isinstance(v, torch.Tensor) and compute_dtype(v.dtype) == torch.float32

    clamp = node.args[0] if node.args else None
    if not op(clamp, aten.clamp.default) or not op(clamp.args[0], aten.round.default) \
            or not op(clamp.args[0].args[0], aten.nan_to_num.default):
        return None
    low, high = (clamp.args[i] if len(clamp.args) > i else clamp.kwargs.get(k) for i, k in ((1, "min"), (2, "max")))
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and float(b).is_integer()
               and -128 <= b <= 127 for b in (low, high)) or low > high:
        return None
    fix = clamp.args[0].args[0]
    nan, posinf, neginf = (fix.args[i] if len(fix.args) > i else fix.kwargs.get(k)
                           for i, k in ((1, "nan"), (2, "posinf"), (3, "neginf")))
    if nan not in (None, 0, 0.0) or (posinf is not None and posinf < high) or (neginf is not None and neginf > low):
        return None
    x = fix.args[0]
    return (x, int(low), int(high)) if isinstance(x, fx.Node) else None


def _within_fp8_range(a: Any) -> bool:
    """Whether ``a`` is an fp32-computed clamp to bounds within e4m3fn's +-448 (NaN passes
    through it, and converts to NaN with or without the overflow guard)."""
    if not (isinstance(a, fx.Node) and a.op == "call_function" and a.target == aten.clamp.default):
        return False
    val = meta_of(a)
    if not isinstance(val, torch.Tensor) or compute_dtype(val.dtype) != torch.float32:
        return False
    bounds = [a.args[i] if len(a.args) > i else a.kwargs.get(name) for i, name in ((1, "min"), (2, "max"))]
    return all(isinstance(b, (int, float)) and not isinstance(b, bool) and abs(b) <= 448 for b in bounds)


def var_name(node: fx.Node) -> str:
    return f"v_{node.name}"


def emit_pointwise(nodes: Sequence[fx.Node], names: Dict[fx.Node, str], helpers: Optional[Set[str]] = None,
                   round_intermediates: bool = True) -> List[str]:
    """One line per node: ``v_<name> = <expr>``; ``names`` maps inputs to Triton variables.

    Input variables must hold values in their compute type (see module docstring); a tensor
    input whose meta['val'] is a Python scalar (a kernel scalar argument) is treated as a 0-dim
    tensor of the scalar's dtype (bool, int64 or fp32). New names are added to ``names``.
    """
    helpers = helpers if helpers is not None else set()
    lines = []
    for node in nodes:
        val = meta_of(node)
        if not isinstance(val, torch.Tensor):
            raise Unsupported(f"{node.name} has no tensor meta['val']")

        def operand(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a not in names:
                    raise Unsupported(f"{node.name} reads {a.name}, which is not available in the kernel")
                return _var_for(a, names[a])
            if isinstance(a, (list, tuple)) or a is None or isinstance(a, (bool, int, float, str, torch.dtype)):
                return a
            if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
                return a
            raise Unsupported(f"{node.name} has an argument of type {type(a).__name__}")

        args = [operand(a) for a in node.args]
        kwargs = {k: operand(v) for k, v in node.kwargs.items()}
        int8_tail = _int8_quantize_tail(node) if node.target in ROUNDS_ITSELF and val.dtype == torch.int8 else None
        if node.target in ROUNDS_ITSELF and val.dtype == casts.FP8 and _within_fp8_range(node.args[0]):
            expr = casts.round_fp8_in_range(args[0].name)  # a quantize's cast after its clamp
        elif int8_tail is not None and int8_tail[0] in names:  # an INT8 quantize's tail: one conversion
            expr = casts.saturate_to_int8(operand(int8_tail[0]).name, int8_tail[1], int8_tail[2], helpers)
        else:
            lowering = _approximated(node, val.dtype) or (lambda *a: lower(node.target, *a))
            expr = lowering(args, kwargs, val.dtype, helpers)
        # a conversion rounds to its dtype itself (``convert``): rounding again costs a round trip
        # per element that the compiler cannot fold for fp8 (FFN1's quantize epilogue did both)
        if round_intermediates and val.dtype in REDUCED_FLOATS and node.target not in ROUNDS_ITSELF:
            expr = round_to(f"({expr})", val.dtype)
        name = var_name(node)
        lines.append(f"{name} = {expr}")
        names[node] = name
    return lines


# ------------------------------------------------------------------- reductions (used by reduction.py)
REDUCE_HELPERS = '''
@triton.jit
def cb_maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def cb_minimum(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
'''


# kind -> (reduce a [XBLOCK, RBLOCK] tile along the row, combine a loop accumulator with a chunk).
# nanmax/nanmin propagate NaN like torch.amax/amin; max/min (cheaper) serve softmax's row max.
REDUCE_OPS = {
    "sum": ("tl.sum({x}, 1)", "{acc} + {x}"),
    "max": ("tl.max({x}, 1)", "tl.maximum({acc}, {x})"),
    "min": ("tl.min({x}, 1)", "tl.minimum({acc}, {x})"),
    "nanmax": ("tl.reduce({x}, 1, cb_maximum)", "cb_maximum({acc}, {x})"),
    "nanmin": ("tl.reduce({x}, 1, cb_minimum)", "cb_minimum({acc}, {x})"),
}


def reduce_neutral(kind: str, dtype: torch.dtype) -> str:
    """The value masked-out lanes take in a reduction of ``kind`` (compute dtype ``dtype``)."""
    if kind == "sum":
        return "0"
    is_max = kind.endswith("max")
    if dtype.is_floating_point:
        return '-float("inf")' if is_max else 'float("inf")'
    info = torch.iinfo(dtype)
    return str(info.min if is_max else info.max)
