"""The sigmoid-mask L1 Triton kernels (kernels/mask_l1.py), called through their launchers
on small CPU tensors under TRITON_INTERPRET=1 (or on CUDA), against the float64 torch math
(scale * torch.sigmoid(beta * s)).sum() and its autograd gradient: every dtype and several
shapes including one and zero elements, non-contiguous input, a saturated sigmoid, and
determinism.

A small BLOCK makes every shape span several programs with a ragged last one.
"""
import math

import pytest
import torch

from conftest import HAS_CUDA, tolerances
from sparsekern.kernels import mask_l1

pytestmark = pytest.mark.triton

DEV = torch.device("cuda" if HAS_CUDA else "cpu")

SHAPES = [(37, 53), (5, 3, 3, 3), (1,), (0, 7)]
# (beta, scale): beta = 1, moderate, and 200 (beta * s far past where sigmoid saturates in
# float32 and float64). The kernels take beta and scale as float32 scalars, so these are
# exact in float32 (test_beta_and_scale_are_float32 covers values that are not).
PARAMS = [(1.0, 1.0), (2.5, 0.25), (200.0, 3.0)]
GRAD = 0.37
# Under TRITON_INTERPRET=1 a saturated sigmoid's exp(-beta * s) overflows to inf in numpy,
# which warns; sigmoid = 1 / (1 + inf) = 0 is then exact, as on CUDA.
SATURATES = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture(autouse=True)
def small_block(monkeypatch):
    monkeypatch.setattr(mask_l1, "BLOCK", 128)


def scores_like(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=DEV, dtype=dtype)


def reference(s, beta, scale, grad=GRAD):
    """(penalty, grad * dpenalty/ds) from float64 torch autograd on s's values."""
    s64 = s.detach().double().requires_grad_()
    penalty = (scale * torch.sigmoid(beta * s64)).sum()
    (ds,) = torch.autograd.grad(penalty, s64, torch.tensor(grad, dtype=torch.float64, device=DEV))
    return penalty.detach(), ds


def run(s, beta, scale, grad=GRAD):
    grad = torch.tensor(grad, dtype=torch.promote_types(s.dtype, torch.float32), device=DEV)
    return mask_l1.sigmoid_l1(s, beta, scale), mask_l1.sigmoid_l1_backward(grad, s, beta, scale)


@SATURATES
@pytest.mark.parametrize("beta, scale", PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_float64(shape, beta, scale):
    s = scores_like(shape)
    penalty, ds = run(s, beta, scale)
    expected_penalty, expected_ds = reference(s, beta, scale)
    assert penalty.shape == () and penalty.dtype == torch.float64
    assert ds.shape == shape and ds.dtype == torch.float64 and ds.is_contiguous()
    torch.testing.assert_close(penalty, expected_penalty, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ds, expected_ds, rtol=1e-12, atol=1e-12)


@SATURATES
@pytest.mark.parametrize("beta, scale", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_low_precision(shape, dtype, beta, scale):
    # The reference takes the same (rounded) scores, so the penalty's only error is float32
    # arithmetic: a few ulp per sigmoid, and a summation error growing like log2(n).
    s = scores_like(shape, dtype)
    n = s.numel()
    penalty, ds = run(s, beta, scale)
    expected_penalty, expected_ds = reference(s, beta, scale)
    assert penalty.shape == () and penalty.dtype == torch.float32
    assert ds.shape == shape and ds.dtype == dtype
    tol = tolerances(torch.float32, k=8 + math.log2(max(n, 1)))
    tol["atol"] *= scale
    torch.testing.assert_close(penalty.double(), expected_penalty, **tol)
    # The gradient is rounded once to dtype (float32: computed in it, where 1 - sig loses
    # up to an ulp of 1 when sig is near 1); |ds| <= GRAD * scale * beta / 4.
    tol = tolerances(dtype, k=8 if dtype == torch.float32 else 2)
    tol["atol"] *= GRAD * scale * beta
    torch.testing.assert_close(ds.double(), expected_ds, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_non_contiguous(dtype):
    s = scores_like((53, 37), dtype).t()
    assert not s.is_contiguous()
    penalty, ds = run(s, 2.5, 0.25)
    expected_penalty, expected_ds = run(s.contiguous(), 2.5, 0.25)
    assert torch.equal(penalty, expected_penalty)
    assert ds.is_contiguous() and torch.equal(ds, expected_ds)


@SATURATES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_saturated_sigmoid(dtype):
    # beta * s = +-10^4: exp overflows in every dtype, and sigmoid must still be exactly 0
    # or 1 (no inf / inf), the gradient exactly 0.
    s = torch.tensor([-50.0, 50.0, 0.0, 50.0, -50.0] * 60, dtype=dtype, device=DEV)
    penalty, ds = run(s, 200.0, 3.0)
    assert not penalty.isnan() and not ds.isnan().any()
    assert penalty.item() == 3.0 * (120 + 0.5 * 60)
    torch.testing.assert_close(ds.double(), reference(s, 200.0, 3.0)[1], rtol=1e-6, atol=0)
    assert (ds[s != 0] == 0).all()


def test_deterministic():
    s = scores_like((37, 53), torch.float32)
    penalty, ds = run(s, 2.5, 0.25)
    penalty2, ds2 = run(s, 2.5, 0.25)
    assert torch.equal(penalty, penalty2) and torch.equal(ds, ds2)


def test_beta_and_scale_are_float32():
    # Documented: float64 results carry the float32 rounding of beta and scale.
    s = scores_like((37, 53))
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    penalty, ds = run(s, 0.1, 1e-3)
    expected_penalty, expected_ds = reference(s, f32(0.1), f32(1e-3))
    torch.testing.assert_close(penalty, expected_penalty, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ds, expected_ds, rtol=1e-12, atol=1e-12)


def test_grad_of_one_element():
    s = scores_like((5, 3, 3, 3))
    grad = torch.full((1,), GRAD, dtype=torch.float64, device=DEV)
    torch.testing.assert_close(
        mask_l1.sigmoid_l1_backward(grad, s, 2.5, 0.25), reference(s, 2.5, 0.25)[1], rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="one element"):
        mask_l1.sigmoid_l1_backward(torch.ones(2, device=DEV), s, 2.5, 0.25)
