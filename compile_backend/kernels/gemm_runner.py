"""Launching generated GEMM kernels: :class:`GemmRunner` (one kernel + config over
(A [B, M, K], B [B, K, N]) views: the grouped-M kernel, its split-K passes, or the persistent TMA
kernel) and :func:`epilogue_only` (a template's epilogue over an accumulator computed elsewhere:
cuBLAS, cuDNN)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import gemm_tma
from .gemm_config import GemmConfig
from .template import triton_cdiv

#: the largest grid dimension 1 (batch) a launch may have
MAX_BATCH = 65535
#: tile of the epilogue-only launch (MODE 2) that follows cuBLAS / cuDNN (32x256 and 16x256
#: were within 5 % of each other and ahead of 64x128, 128x128 in run 2 on an H100)
EPILOGUE_CONFIG = GemmConfig(32, 256, 16, 8, 1, 4, 1)
#: further epilogue tiles the tuner times after cuBLAS, with 32 and 16 values per thread instead
#: of 64: H200 run 3 measured the default tile at 24.6 us for GPT-2's tanh GELU on 4096x3072
#: (2 TB/s; Inductor's standalone GELU kernel: 15.6 us). Register spills of the long epilogue are
#: the suspected cause (not profiled); the tuner picks by measurement either way
EPILOGUE_ALTERNATIVES = (GemmConfig(32, 256, 16, 8, 1, 8, 1), GemmConfig(16, 128, 16, 8, 1, 4, 1),
                         GemmConfig(16, 256, 16, 8, 1, 8, 1))


def epilogue_tile_named(tile: Optional[GemmConfig]):
    """(name suffix, config fields) of a vendor candidate whose epilogue runs on ``tile``
    (None: ``EPILOGUE_CONFIG``, no suffix): the report and the timing cache tell them apart."""
    if tile is None:
        return "", {}
    return f" {tile.block_m}x{tile.block_n} w{tile.num_warps}", {"epilogue_tile": [tile.block_m, tile.block_n, tile.num_warps]}


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
        layout = gemm_tma.tma_layout(a, b) if cfg.tma else None  # alignment is only known at run time
        if layout is not None:
            a_kmajor, b_kmajor = layout
            a_desc, b_desc = gemm_tma.tma_descriptors(a[0], b[0], cfg, a_kmajor, b_kmajor)
            self.compiled = self.tma_kernel[(min(self.num_sms, tiles),)](
                a_desc, b_desc, *io, m, n, k, *strides,
                A_KMAJOR=a_kmajor, B_KMAJOR=b_kmajor, NUM_SMS=self.num_sms, **meta)
            return
        even_k = k % (cfg.block_k * cfg.split_k) == 0
        if cfg.epilogue_split > 1:
            meta["EPI_SPLIT"] = cfg.epilogue_split
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
