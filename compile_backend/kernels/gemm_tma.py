"""TMA operand loads of the persistent GEMM kernel (Hopper and later, 2-D GEMMs: 16-bit
operands in either layout, 8-bit operands K-major).

Whether TMA can load a problem's operands (:func:`tma_layout_of` on shapes and strides,
:func:`tma_layout` on tensors, alignment included), the host-side descriptors the kernel takes
(:func:`tma_descriptors`) and whether the device and Triton have them (:func:`tma_available`).
"""
from __future__ import annotations

import torch

from .gemm_config import GemmConfig


def tma_layout(a: torch.Tensor, b: torch.Tensor):
    """(a_kmajor, b_kmajor) when TMA can load both operands (a [1, M, K], b [1, K, N]) of a
    2-D GEMM, else None. See :func:`tma_layout_of`; this one also checks alignment."""
    if a.shape[0] != 1 or b.shape[0] != 1 or a.data_ptr() % 16 or b.data_ptr() % 16:
        return None
    return tma_layout_of(tuple(a.shape[1:]), a.stride()[1:], tuple(b.shape[1:]), b.stride()[1:], a.dtype, b.dtype)


#: operand dtypes TMA loads feed to wgmma: 16-bit in either layout, 8-bit (int8, fp8) only
#: K-major (wgmma reads transposed shared-memory tiles of 16-bit types only)
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)


def tma_layout_of(a_shape, a_stride, b_shape, b_stride, a_dtype, b_dtype):
    """TMA needs one unit-stride dimension and a 16-byte multiple for the other stride. A is
    read as [M, K] (K-major) or through its transpose; B as [K, N] or as B^T [N, K] (K-major:
    a linear layer's weight). 8-bit operands must both be K-major."""
    if a_dtype != b_dtype or a_dtype not in _SIXTEEN_BIT + _EIGHT_BIT:
        return None
    size = 1 if a_dtype in _EIGHT_BIT else 2
    layout = []
    for shape, stride, kdim in ((a_shape, a_stride, 1), (b_shape, b_stride, 0)):
        if 0 in shape:
            return None
        if stride[kdim] == 1 and stride[1 - kdim] * size % 16 == 0:
            layout.append(True)
        elif stride[1 - kdim] == 1 and stride[kdim] * size % 16 == 0 and size == 2:
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


def tma_available(device: torch.device) -> bool:
    """Hopper or later, and a Triton with host-side tensor descriptors."""
    if device.type != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True
