"""The direct GEMM op: :func:`gemm` (``act(a @ b * scales + bias) + residual`` in one generated
kernel, also for int8 and fp8 operands) and :func:`gemm_reference`, its semantics in plain
PyTorch. The group builder is :mod:`.gemm`."""
from __future__ import annotations

from typing import Optional

import torch

from . import gemm_template as tpl
from .gemm_config import GemmConfig, heuristic_config
from .gemm_runner import GemmRunner
from .template import FLOAT_DTYPES, QUANT_DTYPES, as3d, dtype_name

aten = torch.ops.aten

#: activations of the direct API; their code comes from expr's op table (no second table)
ACTIVATIONS = {
    "relu": (aten.relu.default, {}), "gelu": (aten.gelu.default, {}),
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}), "silu": (aten.silu.default, {}),
    "tanh": (aten.tanh.default, {}), "sigmoid": (aten.sigmoid.default, {}),
}


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    scale_a: Optional[torch.Tensor] = None,
    scale_b: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    config: Optional[GemmConfig] = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """``act(a @ b * scale_a[:, None] * scale_b[None, :] + bias) + residual`` in one kernel.

    a: [M, K] or [B, M, K]; b: [K, N] or [B, K, N]; any strides. Inputs fp32/fp16/bf16 (fp32
    accumulation), int8 (int32 accumulation) or float8_e4m3fn (fp32 accumulation; sm_89+ on
    GPU). scale_a: fp32 [M] (per row), scale_b: fp32 [N] (per column), bias: [N], residual:
    broadcastable to the output. The epilogue runs in fp32 and rounds once to ``out_dtype``
    (default: a's dtype for floats, int32 for int8 with no epilogue, else fp32).
    """
    out_dtype = _check_direct(a, b, bias, scale_a, scale_b, activation, residual, out_dtype)
    a3, b3 = as3d(a), as3d(b)
    batch, m, n = max(a3.shape[0], b3.shape[0]), a3.shape[1], b3.shape[2]
    a3, b3 = a3.expand(batch, m, a3.shape[2]), b3.expand(batch, b3.shape[1], n)
    int_acc = a.dtype == torch.int8
    out_shape = (m, n) if a.dim() == 2 and b.dim() == 2 else (batch, m, n)
    spec, loads = _direct_epilogue((batch, m, n), out_shape, int_acc, out_dtype, scale_a, scale_b, bias, activation,
                                   residual)
    interpret = a.device.type == "cpu"
    source, name = tpl.render_gemm(spec, tpl.dot_fields(dtype_name(a.dtype), precision, interpret, int_acc))
    kernel = tpl.load_kernel(source, name)
    cfg = config or heuristic_config(m, n, a.shape[-1], batch, a.dtype, interpret=interpret)
    out = torch.empty(out_shape, dtype=out_dtype, device=a.device)
    GemmRunner(kernel, cfg, int_acc)(a3, b3, loads, [as3d(out).expand(batch, m, n)])
    return out


def _direct_epilogue(full, out_shape, int_acc: bool, out_dtype, scale_a, scale_b, bias, activation, residual):
    """The direct op's epilogue: its spec, and the tensors it loads, viewed as ``full``
    (batch, m, n)."""
    _, m, n = full
    loads, lines = [], []
    if int_acc and (out_dtype != torch.int32 or scale_a is not None or scale_b is not None or bias is not None
                    or activation is not None or residual is not None):
        lines.append("acc = acc.to(tl.float32)")

    def load(t3: torch.Tensor) -> str:  # t3 broadcasts to (batch, m, n)
        loads.append(t3.expand(full))
        return f"r{len(loads) - 1}.to(tl.float32)"

    if scale_a is not None:
        lines.append(f"acc = acc * {load(scale_a.reshape(1, m, 1))}")
    if scale_b is not None:
        lines.append(f"acc = acc * {load(scale_b.reshape(1, 1, n))}")
    if bias is not None:
        lines.append(f"acc = acc + {load(bias.reshape(1, 1, n))}")
    helper_src = ""
    if activation is not None:
        from . import expr

        op, kwargs = ACTIVATIONS[activation]
        helpers: set = set()
        lines.append(f"acc = {expr.lower(op, [expr.Var('acc', torch.float32, 2)], kwargs, torch.float32, helpers)}")
        helper_src = expr.helper_source(helpers)
    if residual is not None:
        lines.append(f"acc = acc + {load(as3d(residual.expand(out_shape)))}")
    names = tuple(f"r{i}" for i in range(len(loads)))
    spec = tpl.EpilogueSpec(loads=names, lines=tuple(lines), stores=("acc",), int_acc=int_acc, helpers=helper_src)
    return spec, loads


def _check_direct(a, b, bias, scale_a, scale_b, activation, residual, out_dtype) -> torch.dtype:
    if a.dim() not in (2, 3) or b.dim() not in (2, 3):
        raise ValueError(f"gemm takes 2-D or 3-D operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"gemm: inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"gemm: batch sizes differ: {a.shape[0]} and {b.shape[0]}")
    if a.dtype != b.dtype or a.dtype not in FLOAT_DTYPES + QUANT_DTYPES:
        raise ValueError(f"gemm: operands must share one of {FLOAT_DTYPES + QUANT_DTYPES}, got {a.dtype}, {b.dtype}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"gemm: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    m, n = a.shape[-2], b.shape[-1]
    for name, t, size in (("scale_a", scale_a, m), ("scale_b", scale_b, n), ("bias", bias, n)):
        if t is not None and (t.numel() != size or t.dtype not in FLOAT_DTYPES):
            raise ValueError(f"gemm: {name} must be a float vector of {size} elements, got {tuple(t.shape)} {t.dtype}")
    if out_dtype is None:
        if a.dtype in FLOAT_DTYPES:
            out_dtype = a.dtype
        elif a.dtype == torch.int8 and all(x is None for x in (bias, scale_a, scale_b, activation, residual)):
            out_dtype = torch.int32
        else:
            out_dtype = torch.float32
    if out_dtype not in FLOAT_DTYPES + (torch.int32,):
        raise ValueError(f"gemm: out_dtype must be fp32/fp16/bf16/int32, got {out_dtype}")
    if out_dtype == torch.int32 and a.dtype != torch.int8:
        raise ValueError("gemm: out_dtype int32 needs int8 operands")
    return out_dtype


def gemm_reference(a, b, *, bias=None, scale_a=None, scale_b=None, activation=None, residual=None,
                   out_dtype=None, precision: str = "fp32") -> torch.Tensor:
    """What :func:`gemm` computes, in plain PyTorch (fp64 products, fp32 epilogue)."""
    out_dtype = _check_direct(a, b, bias, scale_a, scale_b, activation, residual, out_dtype)
    if a.dtype == torch.int8:
        acc = torch.matmul(a.to(torch.int64), b.to(torch.int64))
        if out_dtype == torch.int32:
            return acc.to(torch.int32)
        acc = acc.to(torch.float32)
    else:
        acc = torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.float32)
    if scale_a is not None:
        acc = acc * scale_a.float().reshape(-1, 1)
    if scale_b is not None:
        acc = acc * scale_b.float().reshape(-1)
    if bias is not None:
        acc = acc + bias.float().reshape(-1)
    if activation is not None:
        fn = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
              "tanh": torch.tanh, "sigmoid": torch.sigmoid,
              "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[activation]
        acc = fn(acc)
    if residual is not None:
        acc = acc + residual.float()
    return acc.to(out_dtype)
