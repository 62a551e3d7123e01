"""Weight-only numerics reference (kernels/weight_only_ref.py, issue #20): INT4 pack/unpack
round trips on odd shapes and every group size, scales stored in fp16 and used as stored, zero
groups, outlier groups (the MSE clip), and the W8A16 / W4A16 reference GEMM against the float
GEMM."""
import pytest
import torch

from compile_backend.kernels import weight_only_ref as wo


def _w(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2, 7, 37, 128, 129])
def test_pack_unpack_round_trip(k):
    codes = torch.randint(-8, 8, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    packed = wo.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(wo.unpack_int4(packed, k), codes)


def test_pack_layout_low_nibble_first():
    packed = wo.pack_int4(torch.tensor([[1, -1, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0xF1, 0x07]]  # k=0 low, k=1 high (-1 = 0xF), k=2 low, pad 0


def test_pack_of_a_transposed_view_is_row_major():
    codes = torch.randint(-8, 8, (9, 6), generator=torch.Generator().manual_seed(1), dtype=torch.int8).t()
    packed = wo.pack_int4(codes)
    assert packed.is_contiguous() and torch.equal(wo.unpack_int4(packed, 9), codes)


def test_pack_rejects_out_of_range_and_bad_shapes():
    with pytest.raises(ValueError, match="\\[-8, 7\\]"):
        wo.pack_int4(torch.tensor([[9]], dtype=torch.int8))
    with pytest.raises(ValueError, match="unpack_int4"):
        wo.unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 7)


@pytest.mark.parametrize("group_size", wo.GROUP_SIZES)
@pytest.mark.parametrize("k", [31, 64, 200])
def test_int4_groups_quantize_within_half_a_step(group_size, k):
    w = _w(6, k)
    packed, s = wo.quantize_weight(w, "int4", group_size)
    assert s.dtype == torch.float16 and s.shape == (6, -(-k // group_size))
    codes = wo.unpack_int4(packed, k)
    assert codes.abs().max() <= 7
    err = (wo.dequantize(codes, s, "int4", group_size) - w).abs()
    step = s.float().repeat_interleave(group_size, 1)[:, :k]
    assert (err <= step / 2 + 1e-6).all()  # minmax: nothing clips, rounding only


def test_zero_group_has_scale_zero_and_zero_codes():
    w = _w(2, 64)
    w[1, 32:] = 0.0
    packed, s = wo.quantize_weight(w, "int4", 32)
    assert s[1, 1] == 0 and (wo.unpack_int4(packed, 64)[1, 32:] == 0).all()
    assert torch.isfinite(wo.dequantize(wo.unpack_int4(packed, 64), s, "int4", 32)).all()


def test_mse_clip_gives_up_an_outlier_for_the_rest():
    """A 128-wide group of values in [-1, 1] with one 1.5: clipping the outlier buys resolution
    for the 127 others (the MSE clip takes it); elsewhere the MSE clip is never worse."""
    w = torch.rand(4, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1
    w[:, 5] = 1.5  # an outlier in the first group of each row
    minmax = wo.scales(w, "int4", 128, "minmax")
    mse = wo.scales(w, "int4", 128, "mse")
    assert (mse[:, 0] < minmax[:, 0]).all()

    def err(s):
        return (wo.dequantize(wo.quantize(w, s, "int4", 128), s, "int4", 128) - w).pow(2).reshape(4, 2, 128).sum(-1)

    assert (err(mse) <= err(minmax)).all() and (err(mse)[:, 0] < err(minmax)[:, 0]).all()


@pytest.mark.parametrize("precision,group_size", [("int8", None), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_reference_gemm_is_close_to_the_float_gemm(precision, group_size, dtype):
    x, w, b = _w(3, 200, seed=1).to(dtype), _w(24, 200, seed=2), _w(1, 24, seed=4)[0]
    codes, s = wo.quantize_weight(w, precision, group_size)
    if precision == "int4":
        codes = wo.unpack_int4(codes, 200)
    y = wo.weight_only_mm(x, codes, s, precision, group_size, bias=b.to(dtype))
    ref = x.float() @ w.t() + b
    assert y.dtype == dtype
    cos = torch.nn.functional.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0).item()
    assert cos > (0.9999 if precision == "int8" else 0.99)


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="group_size"):
        wo.scales(_w(2, 8), "int4", 48)
    with pytest.raises(ValueError, match="int8 or int4"):
        wo.scales(_w(2, 8), "fp8")
    with pytest.raises(ValueError, match="minmax or mse"):
        wo.scales(_w(2, 8), "int8", method="awq")
