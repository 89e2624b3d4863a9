"""The hard-concrete Triton kernels (kernels/hard_concrete.py), called through their
launchers on small CPU tensors under TRITON_INTERPRET=1 (or on CUDA), against the reference:
the Philox stream (bit-identical to reference.philox_uniform), gate values, the expected-L0
partial sums, the backward, determinism, and a smaller-sample check of the distribution.

A small BLOCK makes every shape span several programs with a ragged last one.
"""
import math

import pytest
import torch

from conftest import HAS_CUDA, tolerances
from sparsekern.kernels import hard_concrete as hc
from sparsekern.ops import reference

pytestmark = pytest.mark.triton

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


# The kernels take beta, gamma, zeta as float32 scalars: give the reference the same values.
BETA, GAMMA, ZETA = f32(2 / 3), f32(-0.1), f32(1.1)


@pytest.fixture(autouse=True)
def small_block(monkeypatch):
    monkeypatch.setattr(hc, "BLOCK", 256)


def log_alpha_like(shape, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=DEV, dtype=dtype)


def sample(la, seed, offset, group_size=1, training=True):
    return hc.sample(la, seed, offset, group_size, BETA, GAMMA, ZETA, training)


def ref_gates(la, seed, offset, training=True):
    return reference.hard_concrete_gates(la, seed, offset, training, BETA, GAMMA, ZETA)


@pytest.mark.parametrize("seed, offset", [(0, 0), (1, 1), (12345, 2**35 + 3), (2**40 + 7, 16)])
def test_stream_is_the_reference_philox(seed, offset):
    # In float64 the only float32 step is r itself, so agreement to 1e-12 over 1961 gates
    # means the kernel drew exactly reference.philox_uniform's numbers.
    la = log_alpha_like((37, 53))
    z, _ = sample(la, seed, offset)
    torch.testing.assert_close(z, ref_gates(la, seed, offset), rtol=1e-12, atol=1e-12)
    assert hc.EPS == reference.HARD_CONCRETE_EPS


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gates_low_precision(dtype, training):
    la = log_alpha_like((37, 53), dtype)
    z, l0 = sample(la, 5, 6, training=training)
    assert z.dtype == dtype and z.shape == la.shape and l0.dtype == torch.float32
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tolerances(dtype, k=2)
    torch.testing.assert_close(z, ref_gates(la, 5, 6, training), **tol)


@pytest.mark.parametrize("group_size", [1, 27])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_expected_l0_partials(dtype, group_size):
    la = log_alpha_like((37, 53), dtype)
    _, l0 = sample(la, 1, 2, group_size)
    expected = reference.hard_concrete_l0(la, group_size, BETA, GAMMA, ZETA)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(l0, expected, rtol=rtol, atol=0)


def test_eval_mode_ignores_the_noise():
    la = log_alpha_like((300,))
    z, _ = sample(la, 1, 2, training=False)
    expected = torch.clamp(torch.sigmoid(la / BETA) * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(z, sample(la, 9, 9, training=False)[0])


@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_reference_autograd(training):
    la = log_alpha_like((37, 53)).requires_grad_()
    grad_z = log_alpha_like((37, 53), seed=1)
    grad_l0 = torch.tensor(0.37, dtype=torch.float64, device=DEV)
    got = hc.backward(grad_z, grad_l0, la.detach(), 3, 77, 5, BETA, GAMMA, ZETA, training)
    loss = (ref_gates(la, 3, 77, training) * grad_z).sum() + grad_l0 * reference.hard_concrete_l0(
        la, 5, BETA, GAMMA, ZETA
    )
    (expected,) = torch.autograd.grad(loss, la)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class KernelSample(torch.autograd.Function):
    """The two launchers as one differentiable function, to gradcheck the kernel backward
    against finite differences of the kernel forward."""

    @staticmethod
    def forward(ctx, la, training):
        ctx.save_for_backward(la)
        ctx.training = training
        return sample(la, 17, 4, 3, training)

    @staticmethod
    def backward(ctx, grad_z, grad_l0):
        (la,) = ctx.saved_tensors
        return hc.backward(grad_z, grad_l0, la, 17, 4, 3, BETA, GAMMA, ZETA, ctx.training), None


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training):
    la = log_alpha_like((3, 5), scale=1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: KernelSample.apply(x, training), (la,))


def test_deterministic_and_offsets_differ():
    la = log_alpha_like((600,), torch.float32)
    z = sample(la, 7, 100)[0]
    assert torch.equal(z, sample(la, 7, 100)[0])
    other = sample(la, 7, 101)[0]
    assert not torch.equal(z, other) and not torch.equal(z[1:], other[:-1])
    assert not torch.equal(z, sample(la, 8, 100)[0])


def test_zero_size():
    z, l0 = sample(torch.zeros(0, 3, device=DEV), 1, 1, 4)
    assert z.shape == (0, 3) and l0.item() == 0.0
    grad = hc.backward(z, l0, torch.zeros(0, 3, device=DEV), 1, 1, 4, BETA, GAMMA, ZETA, True)
    assert grad.shape == (0, 3)


def test_distribution_small_sample():
    # Closed forms derived in test_ops_hard_concrete.py; 2 * 10^4 samples keep the
    # interpreter fast while the 4-sigma bands stay about 0.01 wide.
    log_alpha, n = 0.5, 20_000
    z, _ = sample(torch.full((n,), log_alpha, device=DEV), 2024, 3)
    z = z.double().cpu()
    p0 = 1 / (1 + math.exp(-(BETA * math.log(-GAMMA / ZETA) - log_alpha)))
    p1 = 1 / (1 + math.exp(-(log_alpha - BETA * math.log((1 - GAMMA) / (ZETA - 1)))))
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    mean = torch.trapezoid(torch.sigmoid(log_alpha - BETA * torch.log((t - GAMMA) / (ZETA - t))), t).item()
    for observed, p in (((z == 0).double().mean().item(), p0), ((z == 1).double().mean().item(), p1)):
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert abs(z.mean().item() - mean) < 4 * z.std().item() / math.sqrt(n)
