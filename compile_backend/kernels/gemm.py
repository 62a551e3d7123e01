"""GEMM with a fused epilogue: Triton template, launcher, reference and group builder.

Layers (as every kernel here):

* the @triton.jit kernels, generated from fixed main loops and a per-group epilogue:
  :func:`gemm_template.render_gemm` (grouped-M tile order, any operand strides, batched,
  split-K) and :func:`gemm_template.render_gemm_tma` (persistent, TMA operand loads; 2-D 16-bit
  GEMMs on Hopper: 98-99 % of cuBLAS at 4096^3 fp16 on an H100, benchmarks/notes/gemm.md);
* :func:`gemm` (direct launcher, also for quantized GEMMs) and :class:`GemmRunner` (launches a
  generated kernel for one group and config);
* :func:`gemm_reference`: the direct launcher's semantics in plain PyTorch;
* :func:`build_gemm`: turns a ``gemm`` KernelGroup (mm / addmm / bmm / baddbmm + epilogue chain)
  into a :class:`Kernel`, auto-tuned among template configs, cuBLAS + the epilogue as one Triton
  kernel, and cuBLAS + the group's own ATen epilogue ops.

Numerics: accumulation in fp32 (int32 for int8); fp32 operands use tf32 only when
``Options.precision`` allows it. In group kernels the anchor's result is rounded to its dtype
before the chain, and each chain op rounds as eager does (see ``expr``), so a fused chain equals
eager up to accumulation order.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from . import gemm_template as tpl
from .autotune import Candidate, TuningKey, tuner_for, tuning_level
from .base import Kernel, KernelContext, KernelGroup, Unsupported, meta_of

aten = torch.ops.aten

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None),) if d is not None)
QUANT_DTYPES = (torch.int8,) + FP8_DTYPES
#: the largest grid dimension 1 (batch) a launch may have
MAX_BATCH = 65535
_POW2 = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of the GEMM template (validated: powers of two, sane ranges)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # persistent kernel with TMA operand loads (2-D 16-bit GEMMs, sm_90+)

    def __post_init__(self) -> None:
        if self.tma and self.split_k != 1:
            raise ValueError("GemmConfig: the TMA kernel has no split-K")
        for name in ("block_m", "block_n", "block_k"):
            if getattr(self, name) not in _POW2:
                raise ValueError(f"GemmConfig.{name} must be one of {_POW2}, got {getattr(self, name)}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps must be a power of two <= 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"GemmConfig.num_stages must be in 1..8, got {self.num_stages}")
        if self.split_k not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.split_k must be 1, 2, 4, 8 or 16, got {self.split_k}")
        if self.group_m not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.group_m must be 1, 2, 4, 8 or 16, got {self.group_m}")

    @property
    def name(self) -> str:
        sk = f" sk{self.split_k}" if self.split_k > 1 else ""
        tma = " tma" if self.tma else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages} g{self.group_m}{sk}{tma}"

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------- launching
class GemmRunner:
    """One generated kernel + config: launches it over (A [B,M,K], B [B,K,N]) views.

    ``loads``/``outs`` are tensors already viewed in the (batch, m, n) index space (3-D)."""

    def __init__(self, kernel, config: GemmConfig, int_acc: bool, tma_kernel=None, num_sms: int = 132):
        if config.tma and tma_kernel is None:
            raise ValueError("a TMA config needs the TMA kernel")
        self.kernel, self.config, self.int_acc = kernel, config, int_acc
        self.tma_kernel, self.num_sms = tma_kernel, num_sms
        self.compiled = None  # Triton's compiled kernel of the last launch (registers, PTX)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, loads: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        cfg = self.config
        batch, m, k = a.shape
        n = b.shape[2]
        tiles = triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n)
        io = list(loads) + list(outs)
        strides = [s for t in io for s in t.stride()]
        meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        layout = tma_layout(a, b) if cfg.tma else None  # alignment is only known at run time
        if layout is not None:
            a_kmajor, b_kmajor = layout
            a_desc, b_desc = tma_descriptors(a[0], b[0], cfg, a_kmajor, b_kmajor)
            self.compiled = self.tma_kernel[(min(self.num_sms, tiles),)](
                a_desc, b_desc, *io, m, n, k, *strides,
                A_KMAJOR=a_kmajor, B_KMAJOR=b_kmajor, NUM_SMS=self.num_sms, **meta)
            return
        even_k = k % (cfg.block_k * cfg.split_k) == 0
        if cfg.split_k == 1:
            self.compiled = self.kernel[(tiles, batch, 1)](
                a, b, a, *io, m, n, k, *a.stride(), *b.stride(), 0, 0, 0, 0, *strides,
                MODE=0, SPLIT_K=1, EVEN_K=even_k, **meta)
            return
        ws = torch.empty((cfg.split_k, batch, m, n), device=a.device, dtype=torch.int32 if self.int_acc else torch.float32)
        self.kernel[(tiles, batch, cfg.split_k)](
            a, b, ws, *io, m, n, k, *a.stride(), *b.stride(), *ws.stride(), *strides,
            MODE=1, SPLIT_K=cfg.split_k, EVEN_K=even_k, **meta)
        self.kernel[(tiles, batch, 1)](
            ws, ws, ws, *io, m, n, k, 0, 0, 0, 0, 0, 0, *ws.stride(), *strides,
            MODE=2, SPLIT_K=cfg.split_k, EVEN_K=even_k, **meta)


def tma_layout(a: torch.Tensor, b: torch.Tensor):
    """(a_kmajor, b_kmajor) when TMA can load both operands (a [1, M, K], b [1, K, N]) of a
    2-D 16-bit GEMM, else None. See :func:`tma_layout_of`; this one also checks alignment."""
    if a.shape[0] != 1 or b.shape[0] != 1 or a.data_ptr() % 16 or b.data_ptr() % 16:
        return None
    return tma_layout_of(tuple(a.shape[1:]), a.stride()[1:], tuple(b.shape[1:]), b.stride()[1:], a.dtype, b.dtype)


def tma_layout_of(a_shape, a_stride, b_shape, b_stride, a_dtype, b_dtype):
    """TMA needs one unit-stride dimension and a 16-byte multiple for the other stride. A is
    read as [M, K] (K-major) or through its transpose; B as [K, N] or as B^T [N, K] (K-major:
    a linear layer's weight). Only 16-bit operands (wgmma reads transposed tiles of those)."""
    if a_dtype != b_dtype or a_dtype not in (torch.float16, torch.bfloat16):
        return None
    layout = []
    for shape, stride, kdim in ((a_shape, a_stride, 1), (b_shape, b_stride, 0)):
        if 0 in shape:
            return None
        if stride[kdim] == 1 and stride[1 - kdim] * 2 % 16 == 0:
            layout.append(True)
        elif stride[1 - kdim] == 1 and stride[kdim] * 2 % 16 == 0:
            layout.append(False)
        else:
            return None
    return tuple(layout)


def tma_descriptors(a2: torch.Tensor, b2: torch.Tensor, cfg: GemmConfig, a_kmajor: bool, b_kmajor: bool):
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(t: torch.Tensor, block):  # t has unit stride in its last dimension
        return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], list(block))

    a_desc = desc(a2, (cfg.block_m, cfg.block_k)) if a_kmajor else desc(a2.t(), (cfg.block_k, cfg.block_m))
    b_desc = desc(b2.t(), (cfg.block_n, cfg.block_k)) if b_kmajor else desc(b2, (cfg.block_k, cfg.block_n))
    return a_desc, b_desc


def tma_heuristic(m: int, n: int) -> GemmConfig:
    """The TMA config used untuned: the best at 4096^3 and on the LM head in run 2 (H100)."""
    if m >= 1024 and n >= 1024:
        return GemmConfig(128, 256, 64, 8, 1, 8, 3, tma=True)
    return GemmConfig(128, 128, 64, 8, 1, 8, 4, tma=True)


def tma_available(device: torch.device) -> bool:
    """Hopper or later, and a Triton with host-side tensor descriptors."""
    if device.type != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


#: tile of the epilogue-only launch (MODE 2) that follows cuBLAS / cuDNN (32x256 and 16x256
#: were within 5 % of each other and ahead of 64x128, 128x128 in run 2 on an H100)
EPILOGUE_CONFIG = GemmConfig(32, 256, 16, 8, 1, 4, 1)


def epilogue_only(kernel, acc: torch.Tensor, loads, outs, config: Optional[GemmConfig] = None) -> None:
    """Run a template's epilogue over an accumulator computed elsewhere (cuBLAS): MODE 2."""
    config = config or EPILOGUE_CONFIG
    batch, m, n = acc.shape
    tiles = triton_cdiv(m, config.block_m) * triton_cdiv(n, config.block_n)
    io = list(loads) + list(outs)
    strides = [s for t in io for s in t.stride()]
    kernel[(tiles, batch, 1)](
        acc, acc, acc, *io, m, n, 1, 0, 0, 0, 0, 0, 0, 0, *acc.stride(), *strides,
        MODE=2, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=16, GROUP_M=config.group_m,
        SPLIT_K=1, EVEN_K=True, num_warps=config.num_warps, num_stages=1)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def as3d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------- direct API
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
    full = (batch, m, n)
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
    names = [f"r{i}" for i in range(len(loads))]
    spec = tpl.EpilogueSpec(loads=tuple(names), lines=tuple(lines), stores=("acc",), int_acc=int_acc, helpers=helper_src)
    interpret = a.device.type == "cpu"
    source, name = tpl.render_gemm(spec, tpl.dot_fields(dtype_name(a.dtype), precision, interpret, int_acc))
    kernel = tpl.load_kernel(source, name)
    cfg = config or heuristic_config(m, n, a.shape[-1], batch, a.dtype, interpret=interpret)
    out = torch.empty(out_shape, dtype=out_dtype, device=a.device)
    GemmRunner(kernel, cfg, int_acc)(a3, b3, loads, [as3d(out).expand(batch, m, n)])
    return out


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


# ------------------------------------------------------------------------------- configs
#: the tile shapes (block_m, block_n, num_warps, num_stages) of the ``fast`` set, best-known
#: first for large problems on Hopper-class GPUs; block_k comes from the operand width
_FAST_TILES = ((128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (64, 256, 4, 4),
               (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 64, 4, 4), (16, 64, 4, 4))
#: block_k choices per operand width in bytes (64 or 128 bytes of K per row of a tile)
_BLOCK_K = {1: (64, 128), 2: (32, 64), 4: (16, 32)}


def heuristic_config(m: int, n: int, k: int, batch: int, dtype: torch.dtype, interpret: bool = False,
                     sm_count: int = 132, smem_bytes: int = 227 * 1024) -> GemmConfig:
    """One good config without timing (what runs with autotune off): the ``fast`` tile that
    best fills the GPU's multiprocessors with the least wasted tile area."""
    if interpret:  # the interpreter pays per program: few, large tiles
        return GemmConfig(_fit(m, 16, 64), _fit(n, 16, 64), _fit(k, 16, 64), group_m=8, num_warps=4, num_stages=1)
    pool = _fast_pool(m, n, k, _size(dtype), smem_bytes)
    return max(pool, key=lambda c: (round(_efficiency(c, m, n, batch, sm_count), 2), -pool.index(c)))


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fast_pool(m: int, n: int, k: int, size: int, smem_bytes: int) -> List[GemmConfig]:
    bk = _BLOCK_K.get(size, (32,))[-1]
    if k < bk:
        bk = max(16, _fit(k, 16, bk))
    pool = [GemmConfig(bm, bn, bk, 8, 1, w, st) for bm, bn, w, st in _FAST_TILES
            if bm <= max(16, _fit(m, 16, 256)) and bn <= max(64, _fit(n, 32, 256))]
    return [c for c in pool if _smem(c, size) <= smem_bytes] or [GemmConfig(16, 64, 16, 8, 1, 4, 2)]


def _efficiency(cfg: GemmConfig, m: int, n: int, batch: int, sm_count: int) -> float:
    """A rough score of a tile for a problem, in [0, 1]: the fraction of tile area inside the
    problem, times how full the last wave of programs keeps the multiprocessors (one program
    per SM assumed), times the tile's operand reuse (bm*bn/(bm+bn), relative to 128x256)."""
    tm, tn = triton_cdiv(m, cfg.block_m), triton_cdiv(n, cfg.block_n)
    inside = m * n / (tm * cfg.block_m * tn * cfg.block_n)
    tiles = batch * tm * tn * cfg.split_k
    fill = tiles / (triton_cdiv(tiles, sm_count) * sm_count)
    reuse = min(1.0, cfg.block_m * cfg.block_n / (cfg.block_m + cfg.block_n) / (128 * 256 / 384))
    return inside * fill * reuse


def _smem(cfg: GemmConfig, size: int) -> int:
    return (cfg.block_m + cfg.block_n) * cfg.block_k * size * cfg.num_stages


def _fit(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(1, x))))))


def candidate_configs(m: int, n: int, k: int, batch: int, dtype: torch.dtype, level: str,
                      sm_count: int = 132, smem_bytes: int = 227 * 1024) -> List[GemmConfig]:
    """Configs to try, heuristic first: ``fast`` at most 8 (the curated tiles that fill the GPU
    best, plus split-K for long-K problems with few output tiles), ``max`` every plausible
    combination of tiles, block_k, warps and stages (a few dozen)."""
    size = _size(dtype)
    first = heuristic_config(m, n, k, batch, dtype, sm_count=sm_count, smem_bytes=smem_bytes)
    if level == "off":
        return [first]
    if level == "fast":
        pool = _fast_pool(m, n, k, size, smem_bytes)
    else:
        pool = []
        big_k = _BLOCK_K.get(size, (32,))[-1]
        for bm in (16, 32, 64, 128, 256):
            for bn in (32, 64, 128, 256):
                if not (bn <= 4 * bm and bm <= 4 * bn and bm * bn <= 128 * 256):
                    continue  # thin or register-hungry tiles never win
                if bm > max(16, _fit(m, 16, 256)) or bn > max(32, _fit(n, 32, 256)):
                    continue
                warps = (8,) if bm * bn >= 128 * 256 else (4, 8) if bm * bn == 128 * 128 else (4,)
                for bk in _BLOCK_K.get(size, (32,)):
                    for st in ((3, 4) if bk == big_k else (4, 5)):
                        pool += [GemmConfig(bm, bn, bk, 8, 1, w, st) for w in warps]
        pool = [c for c in pool if _smem(c, size) <= smem_bytes]
    tiles = batch * triton_cdiv(m, 64) * triton_cdiv(n, 64)
    split = []
    if tiles < sm_count and k >= 1024:  # too few output tiles to fill the GPU, long K
        bk = _BLOCK_K.get(size, (32,))[-1]
        split = [GemmConfig(_fit(m, 16, 64), _fit(n, 32, 64), bk, 8, sk, 4, 4)
                 for sk in (2, 4, 8) if k // sk >= 256]
    ranked = sorted(pool + split, key=lambda c: -round(_efficiency(c, m, n, batch, sm_count), 2))
    out = list(dict.fromkeys([first] + ranked))
    return out[:8] if level == "fast" else out


def device_limits(device: torch.device) -> Tuple[int, int]:
    """(multiprocessors, shared memory per block) of ``device``; H100-like defaults on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
        return props.multi_processor_count, int(smem)
    return 132, 227 * 1024


# ------------------------------------------------------------------------------- group builder
_GEMM_OPS = {"mm": (0, 1, None), "bmm": (0, 1, None), "addmm": (1, 2, 0), "baddbmm": (1, 2, 0)}


def _anchor_node(group: KernelGroup):
    for n in group.gm.graph.nodes:
        if n.name == group.anchor:
            return n
    raise Unsupported(f"anchor {group.anchor!r} not in the group graph")


def build_gemm(group: KernelGroup, ctx: KernelContext) -> Kernel:
    """Kernel for a ``gemm`` group: mm/addmm/bmm/baddbmm followed by its epilogue chain."""
    tuning = gemm_candidates(group, ctx)
    return choose_kernel_of(group, ctx, tuning)


@dataclasses.dataclass
class TemplateTuning:
    """What a template builder hands the tuner: the problem, the candidates, random inputs."""

    kind: str
    key: TuningKey
    candidates: List[Candidate]
    make_inputs: Any
    sources: Dict[str, str]  # impl -> generated source
    out_layouts: Tuple[Any, ...] = ()  # per group output: the layout written (None: passed through)
    writes_out: FrozenSet[str] = frozenset()  # candidates whose runner takes out= (Kernel.supports_out)


def choose_kernel_of(group: KernelGroup, ctx: KernelContext, tuning: TemplateTuning) -> Kernel:
    choice = tuner_for(ctx).choose(tuning.key, tuning.candidates, tuning.make_inputs)
    cand = choice.candidate
    config = dict(cand.config)
    if choice.timings_ms and cand.name in choice.timings_ms:
        config["tuned_ms"] = round(choice.timings_ms[cand.name], 5)
        config["timed"] = f"{len(choice.timings_ms)}/{len(tuning.candidates)}"  # skipped ones failed
    writes_out = cand.name in tuning.writes_out and any(x is not None for x in tuning.out_layouts)
    return Kernel(kind=tuning.kind, impl=cand.impl, ops=group.ops, fn=choice.runner, config=config,
                  source=None if config.get("epilogue") == "aten" else tuning.sources.get("tma" if config.get("tma") else cand.impl),
                  tuned_from_cache=choice.from_cache, supports_out=writes_out,
                  out_layouts=tuning.out_layouts if writes_out else ())


def gemm_candidates(group: KernelGroup, ctx: KernelContext, *, vendor: Optional[bool] = None,
                    configs: Optional[Sequence[GemmConfig]] = None, tma: Optional[bool] = None) -> TemplateTuning:
    """Candidates for a gemm group, heuristic first. ``vendor`` (default: on CUDA) adds cuBLAS +
    a fused epilogue kernel; ``tma`` (default: on Hopper when the operands allow it) adds the
    persistent TMA kernel's configs; ``configs`` replaces the template configs (tests)."""
    anchor = _anchor_node(group)
    op = getattr(getattr(anchor.target, "overloadpacket", None), "__name__", "")
    if op not in _GEMM_OPS:
        raise Unsupported(f"anchor {anchor.target} is not mm/addmm/bmm/baddbmm")
    ia, ib, ibias = _GEMM_OPS[op]
    a_node, b_node = anchor.args[ia], anchor.args[ib]
    alpha = float(anchor.kwargs.get("alpha", 1))
    beta = float(anchor.kwargs.get("beta", 1))
    a_val, b_val, out_val = meta_of(a_node), meta_of(b_node), meta_of(anchor)
    dtype = a_val.dtype
    if dtype not in FLOAT_DTYPES or b_val.dtype != dtype:
        raise Unsupported(f"GEMM operands {dtype}/{b_val.dtype}: the template takes fp32/fp16/bf16")
    batch = a_val.shape[0] if a_val.dim() == 3 else 1
    m, k, n = a_val.shape[-2], a_val.shape[-1], b_val.shape[-1]
    if min(m, n, k) == 0:
        raise Unsupported("empty GEMM")
    anchor_loads = []
    if ibias is not None and beta != 0:  # beta == 0 ignores the bias, NaNs included (as ATen)
        anchor_loads.append(tpl.LoadPlan(anchor.args[ibias], tuple(out_val.shape)))
    plan = tpl.plan_epilogue(group, anchor, "acc_v", anchor_loads)
    from . import expr

    value = "acc" + (f" * {alpha!r}" if alpha != 1 else "")
    if anchor_loads:
        value += f" + x0 * {beta!r}" if beta != 1 else " + x0"
    main_lines = [f"acc_v = {expr.round_to(f'({value})', out_val.dtype)}"]
    interpret = ctx.device.type != "cuda"
    dot = tpl.dot_fields(dtype_name(dtype), ctx.options.precision, interpret, int_acc=False)
    main_src, main_name = tpl.render_gemm(tpl.epilogue_spec(plan, main_lines), dot)
    tma_src, tma_name = tpl.render_gemm_tma(tpl.epilogue_spec(plan, main_lines), dot)
    vendor_skip = len(anchor_loads)  # cuBLAS applies alpha, beta and the bias itself
    vendor_src, vendor_name = tpl.render_gemm(tpl.epilogue_spec(plan, ["acc_v = acc"], skip_loads=vendor_skip), dot)
    fits_template = batch <= MAX_BATCH and max(_numel(meta_of(x)) for x in group.placeholders
                                               if hasattr(meta_of(x), "numel")) < 2**31
    on_cuda = ctx.device.type == "cuda"
    vendor = on_cuda if vendor is None else vendor
    if not fits_template and not vendor:
        raise Unsupported(f"batch {batch} or tensor size beyond the template's 32-bit indexing")

    def operands(env):
        return as3d(env[a_node]), as3d(env[b_node])

    def io(env, skip: int, device, out):
        loads = [as3d(tpl.to_anchor_space(env[lp.source], lp, plan.anchor_shape)) for lp in plan.loads[skip:]]
        outs, views = tpl.allocate_outputs(plan, plan.anchor_shape, device, out)
        return loads, outs, [as3d(v) for v in views]

    def triton_candidate(cfg: GemmConfig) -> Candidate:
        def compile_():
            tma_kernel = tpl.load_kernel(tma_src, tma_name) if cfg.tma else None
            runner = GemmRunner(tpl.load_kernel(main_src, main_name), cfg, False, tma_kernel, sms)

            def run(*inputs, out=None):
                env = tpl.bind_group(plan, group, inputs)
                a3, b3 = operands(env)
                loads, outs, views = io(env, 0, a3.device, out)
                runner(a3, b3, loads, views)
                return tpl.group_outputs(plan, env, outs)

            return _warmed(run, probe)

        return Candidate(f"triton {cfg.name}", {"impl": "triton", **cfg.as_dict()}, compile_, "triton")

    # no chain: every stored value is the anchor's result (or a reshape of it)
    trivial = not plan.chain_ops and all(var == "acc_v" for var, *_ in plan.stores)

    def vendor_candidate() -> Candidate:
        def compile_():
            kernel = None if trivial else tpl.load_kernel(vendor_src, vendor_name)

            def run(*inputs, out=None):  # out= only without ``trivial`` (see writes_out)
                env = tpl.bind_group(plan, group, inputs)
                args = torch.fx.node.map_arg(anchor.args, lambda x: env[x])
                kwargs = torch.fx.node.map_arg(anchor.kwargs, lambda x: env[x])
                acc = anchor.target(*args, **kwargs)  # cuBLAS
                if trivial:
                    return tpl.group_outputs(plan, env, [acc.reshape(shape) for _, shape, *_ in plan.stores])
                loads, outs, views = io(env, vendor_skip, acc.device, out)
                epilogue_only(kernel, as3d(acc), loads, views)
                return tpl.group_outputs(plan, env, outs)

            return _warmed(run, probe)

        return Candidate("cublas" + ("" if trivial else " + triton epilogue"), {"impl": "cublas"}, compile_, "cublas")

    probe = _Probe(group, ctx.device)
    level = tuning_level(ctx.options.autotune)
    sms, smem = device_limits(ctx.device)
    if tma is None:
        tma = batch == 1 and tma_available(ctx.device) and tma_layout_of(
            tuple(a_val.shape[-2:]), a_val.stride()[-2:], tuple(b_val.shape[-2:]), b_val.stride()[-2:],
            a_val.dtype, b_val.dtype) is not None
    # untuned (autotune="off") on CUDA, from run 2 on an H100 (benchmarks/notes/gemm.md): cuBLAS
    # with the group's own ATen epilogue was fastest on the bert/gpt2/mlp shapes; where cuBLAS
    # is slow (a dimension not a multiple of 8, e.g. the 50257-wide LM head: 102 TFLOP/s) the
    # persistent TMA template was 5x faster
    tma_first = tma and vendor and (m % 8 or n % 8 or k % 8)
    candidates: List[Candidate] = []
    if fits_template:
        if configs is None and interpret:
            configs = [heuristic_config(m, n, k, batch, dtype, interpret=True)]
        elif configs is None:
            lvl = "max" if level == "max" else ("off" if level == "off" else "fast")
            configs = candidate_configs(m, n, k, batch, dtype, lvl, sms, smem)
            if tma:
                big = [c for c in configs if c.split_k == 1 and c.block_m >= 64 and c.block_n >= 64]
                tma_configs = [dataclasses.replace(c, tma=True) for c in big[:6 if lvl == "fast" else None]]
                if tma_first or lvl == "off":
                    tma_configs.insert(0, tma_heuristic(m, n))
                configs = list(dict.fromkeys(([] if not tma_first else tma_configs[:1]) + configs + tma_configs))
        candidates += [triton_candidate(c) for c in configs]
    if vendor:
        vendors = [vendor_candidate()]
        if not trivial:  # cuBLAS + the chain as ATen ops (the group's reference itself)
            vendors.insert(0, Candidate("cublas + aten epilogue", {"impl": "cublas", "epilogue": "aten"},
                                        lambda: _warmed(group.reference, probe), "cublas"))
        at = 1 if tma_first and fits_template else 0
        candidates[at:at] = vendors
    key = TuningKey(
        kind="gemm", template=tpl.source_hash(main_src + vendor_src + tma_src),
        shapes=_shapes(group), strides=_strides(group), dtypes=_dtypes(group),
        extra=f"{op} a={alpha} b={beta} {'|'.join(plan.chain_ops)} precision={ctx.options.precision}",
    )
    # template kernels and cuBLAS + epilogue kernel write through allocate_outputs, so take out=
    writes_out = frozenset(c.name for c in candidates if c.impl == "triton" or c.name == "cublas + triton epilogue")
    return TemplateTuning("gemm", key, candidates, probe.make, {"triton": main_src, "cublas": vendor_src, "tma": tma_src},
                          plan.out_layouts, writes_out)


def _shapes(group: KernelGroup) -> Tuple[Tuple[int, ...], ...]:
    return tuple(tuple(getattr(meta_of(p), "shape", ())) for p in group.placeholders)


def _strides(group: KernelGroup) -> Tuple[Tuple[int, ...], ...]:
    return tuple(tuple(meta_of(p).stride()) if isinstance(meta_of(p), torch.Tensor) else () for p in group.placeholders)


def _dtypes(group: KernelGroup) -> Tuple[str, ...]:
    return tuple(str(getattr(meta_of(p), "dtype", type(meta_of(p)).__name__)) for p in group.placeholders)


def _numel(val: Any) -> int:
    return val.numel() if isinstance(val, torch.Tensor) else 0


class _Probe:
    """Random inputs shaped like the group's (same shapes, strides, dtypes) for tuning runs."""

    def __init__(self, group: KernelGroup, device: torch.device):
        self.group, self.device = group, device
        self._first: Optional[Tuple[Any, ...]] = None
        self._lock = threading.Lock()  # candidates compile (and first run) in a thread pool

    def make(self) -> Tuple[Any, ...]:
        return tuple(random_like(meta_of(p), self.device) for p in self.group.placeholders)

    def first(self) -> Tuple[Any, ...]:
        with self._lock:
            if self._first is None:
                self._first = self.make()
            return self._first


def _warmed(run, probe: _Probe):
    """On CUDA a candidate is compiled by running it once (in the tuner's thread pool), which
    also surfaces resource errors at compile time rather than at timing."""
    if probe.device.type == "cuda":
        run(*probe.first())
    return run


def random_like(val: Any, device: torch.device) -> Any:
    """A random tensor with ``val``'s shape, strides (broadcast ones too) and dtype."""
    if not isinstance(val, torch.Tensor):
        return val
    shape, stride, dtype = tuple(val.shape), tuple(val.stride()), val.dtype
    size = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    if dtype.is_floating_point:
        flat = torch.randn(size, device=device).to(dtype)
    elif dtype == torch.bool:
        flat = torch.randint(0, 2, (size,), device=device).bool()
    else:
        flat = torch.randint(-8, 8, (size,), device=device).to(dtype)
    return flat.as_strided(shape, stride)
