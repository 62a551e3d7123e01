"""Fake quantization with gradients (quant/fake_quant.py): the forward is the numerics
reference exactly; the straight-through gradient with clipping; the LSQ scale gradient against
its formula and a finite difference; zero, tiny, negative and NaN cases."""
from __future__ import annotations

import math

import pytest
import torch

from compile_backend.kernels import quant_ref
from compile_backend.quant.fake_quant import MIN_SCALE, fake_quantize

PRECISIONS = ("int8", "int4", "fp8")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_is_the_reference(precision, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 13, generator=g) * 3).to(dtype)
    for scale in (torch.tensor(0.05), torch.rand(7, 1, generator=g) * 0.1 + 0.01):
        y = fake_quantize(x, scale, precision)
        assert y.dtype == dtype
        assert torch.equal(y, quant_ref.fake_quantize(x, scale, precision))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_straight_through_gradient_with_clipping(precision):
    qmax = quant_ref.QMAX[precision]
    scale = torch.tensor(0.5)
    x = torch.tensor([0.1, -0.3, qmax * 0.5 - 0.2, qmax * 0.5 + 1.0, -qmax * 0.5 - 1.0, float("nan")],
                     requires_grad=True)
    fake_quantize(x, scale, precision).backward(torch.full((6,), 2.0))
    assert x.grad.tolist() == [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]  # clipped and NaN inputs: no gradient


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_lsq_scale_gradient_formula_per_tensor_and_per_channel(precision):
    qmax = quant_ref.QMAX[precision]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g) * 2
    dy = torch.randn(4, 6, generator=g)
    for shape in ((), (4, 1)):
        scale = torch.full(shape, 0.3, requires_grad=True)
        fake_quantize(x, scale, precision, learn_scale=True).backward(dy)
        v = x / 0.3
        q = quant_ref.quantize(x, torch.tensor(0.3), precision).float()
        dyds = torch.where(v.abs() <= qmax, q - v, q)
        n = x.numel() // max(1, math.prod(shape))
        want = (dy * dyds).sum_to_size(shape) if shape else (dy * dyds).sum()
        torch.testing.assert_close(scale.grad, want / math.sqrt(n * qmax))


def test_lsq_gradient_on_the_grid_and_when_clipped():
    """Two values where the LSQ estimate is exact: one on the grid (q - v = 0: moving s moves y
    by nothing to first order) and one clipped (y = qmax * s, so dy/ds = qmax)."""
    scale = torch.tensor(0.25, requires_grad=True)
    x = torch.tensor([0.5, 100.0])  # on the grid; clipped at qmax = 127 * 0.25 = 31.75
    fake_quantize(x, scale, "int8", learn_scale=True).backward(torch.tensor([1.0, 0.0]))
    assert float(scale.grad) == 0.0
    scale.grad = None
    fake_quantize(x, scale, "int8", learn_scale=True).backward(torch.tensor([0.0, 1.0]))
    assert float(scale.grad) == pytest.approx(127 / math.sqrt(2 * 127))  # times LSQ's 1/sqrt(n qmax)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1e-30])
def test_zero_negative_and_tiny_scales_are_clamped_and_keep_a_gradient(bad):
    scale = torch.tensor(bad, requires_grad=True)
    x = torch.tensor([1e-13, -3.0, 0.0])
    y = fake_quantize(x, scale, "int8", learn_scale=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, quant_ref.fake_quantize(x, torch.tensor(MIN_SCALE), "int8"))
    y.sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)  # straight through the clamp


def test_nan_gradients_stay_nan_and_overflow_saturates():
    scale = torch.tensor(1.0, requires_grad=True)
    x = torch.tensor([1e30, -1e30, 3.0], requires_grad=True)
    y = fake_quantize(x, scale, "fp8", learn_scale=True)
    assert y.tolist() == [448.0, -448.0, 3.0]
    y.backward(torch.tensor([1.0, 1.0, float("nan")]))
    assert math.isnan(x.grad[2]) and x.grad[:2].tolist() == [0.0, 0.0]
    assert math.isnan(float(scale.grad))  # an AMP GradScaler skips such a step


def test_bad_arguments():
    with pytest.raises(ValueError, match="quantized precision"):
        fake_quantize(torch.ones(2), torch.tensor(1.0), "int3")
    with pytest.raises(ValueError, match="does not broadcast"):
        fake_quantize(torch.ones(2, 3), torch.ones(4, 1), "int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("learn", [False, True])
def test_gradients_under_dynamo_equal_eager(dtype, learn):
    """Traced by Dynamo (backend "eager": Dynamo alone), both gradients equal eager's. With torch
    2.11 a Function whose forward returned ``out.to(x.dtype)`` with the dtypes equal (``out``
    itself) had its backward dropped: zero gradients, every QAT model trained through
    torch.compile on the GPU image learned nothing (session 13)."""
    x0 = torch.randn(6, 5).to(dtype) * 3
    s0 = torch.tensor(0.02)

    def grads(compiled):
        torch._dynamo.reset()
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        f = lambda x, s: (fake_quantize(x, s, "int8", learn_scale=learn) * torch.arange(30.0).reshape(6, 5)).sum()  # noqa: E731
        (torch.compile(f, backend="eager") if compiled else f)(x, s).backward()
        return x.grad, s.grad

    (gx, gs), (ex, es) = grads(True), grads(False)
    assert float(ex.float().abs().sum()) > 0
    torch.testing.assert_close(gx, ex)
    if learn:
        torch.testing.assert_close(gs, es)
