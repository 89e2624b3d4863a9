"""The hard-concrete Triton kernels (kernels/hard_concrete.py), called through their
launchers on small CPU tensors under TRITON_INTERPRET=1 (or on CUDA), against the reference:
the Philox stream (bit-identical to reference.philox_uniform), gate values, the expected-L0
partial sums, the backward, determinism, and a smaller-sample check of the distribution;
then the masked variant (masked_sample / masked_backward: weight * z in one pass) against
reference.hard_concrete_gates * weight and against sample() itself.

A small BLOCK makes every shape span several programs with a ragged last one.
"""
import math

import pytest
import torch

from conftest import HAS_CUDA, TRITON_INTERPRET, tolerances
from sparsekern.kernels import hard_concrete as hc
from sparsekern.ops import reference

pytestmark = pytest.mark.triton

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


# The kernels take beta, gamma, zeta as float32 scalars: give the reference the same values.
BETA, GAMMA, ZETA = f32(2 / 3), f32(-0.1), f32(1.1)


def off(n, device=DEV):
    """The launchers' `offset`: a one-element int64 tensor on log_alpha's device."""
    return torch.tensor(n, dtype=torch.int64, device=device)


@pytest.fixture(autouse=True)
def small_block(monkeypatch):
    monkeypatch.setattr(hc, "BLOCK", 256)


def log_alpha_like(shape, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=DEV, dtype=dtype)


def sample(la, seed, offset, group_size=1, training=True):
    return hc.sample(la, seed, off(offset, la.device), group_size, BETA, GAMMA, ZETA, training)


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
    got = hc.backward(grad_z, grad_l0, la.detach(), 3, off(77), 5, BETA, GAMMA, ZETA, training)
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
        return hc.backward(grad_z, grad_l0, la, 17, off(4), 3, BETA, GAMMA, ZETA, ctx.training), None


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
    grad = hc.backward(z, l0, torch.zeros(0, 3, device=DEV), 1, off(1), 4, BETA, GAMMA, ZETA, True)
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


# --- masked_sample / masked_backward: w_eff = weight * z, z never stored ------------------


def masked_sample(w, la, seed, offset, training=True):
    return hc.masked_sample(w, la, seed, off(offset, la.device), BETA, GAMMA, ZETA, training)


def masked_backward(g, gl0, w, la, seed, offset, training=True):
    return hc.masked_backward(g, gl0, w, la, seed, off(offset, la.device), BETA, GAMMA, ZETA, training)


def ref_masked(w, la, seed, offset, training=True):
    return ref_gates(la, seed, offset, training) * w, reference.hard_concrete_l0(la, 1, BETA, GAMMA, ZETA)


SHAPES = [(37, 53), (5, 3, 3, 3), (300,)]


def assert_rounded_once(got, expected):
    """got == expected (torch rounds the same exact float32 product once), except bfloat16
    under TRITON_INTERPRET=1: the interpreter's float32 -> bfloat16 cast truncates where CUDA
    rounds to nearest even, so there allow one bfloat16 ulp."""
    if got.dtype == torch.bfloat16 and TRITON_INTERPRET:
        torch.testing.assert_close(got, expected, rtol=torch.finfo(torch.bfloat16).eps, atol=0)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_sample_float64(shape, training):
    w, la = log_alpha_like(shape, seed=1, scale=1.0), log_alpha_like(shape)
    w_eff, l0 = masked_sample(w, la, 12345, 2**35 + 3, training)
    ref_w, ref_l0 = ref_masked(w, la, 12345, 2**35 + 3, training)
    assert w_eff.dtype == torch.float64 and w_eff.shape == shape and w_eff.is_contiguous()
    torch.testing.assert_close(w_eff, ref_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l0, ref_l0, rtol=1e-12, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_masked_sample_low_precision(shape, dtype, training):
    w, la = log_alpha_like(shape, dtype, seed=1, scale=1.0), log_alpha_like(shape, dtype)
    w_eff, l0 = masked_sample(w, la, 5, 6, training)
    assert w_eff.dtype == dtype and w_eff.shape == shape and l0.dtype == torch.float32
    # The gate tolerances of test_gates_low_precision, scaled by |w| (z's error times w).
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tolerances(dtype, k=2)
    tol["atol"] *= w.abs().max().item()
    ref_w, ref_l0 = ref_masked(w, la, 5, 6, training)
    torch.testing.assert_close(w_eff, ref_w, **tol)
    torch.testing.assert_close(l0, ref_l0, rtol=1e-5, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_masked_sample_is_weight_times_sample(dtype, training):
    # Same gates, same stream, same L0 partials. z stays in the compute dtype (float32,
    # float64) for the product, which is rounded once to weight's dtype: the gates of
    # log_alpha taken to the compute dtype first are the same numbers.
    w, la = log_alpha_like((37, 53), dtype, seed=1), log_alpha_like((37, 53), dtype)
    w_eff, l0 = masked_sample(w, la, 7, 100, training)
    acc = torch.promote_types(dtype, torch.float32)
    z, l0_sample = sample(la.to(acc), 7, 100, 1, training)
    assert_rounded_once(w_eff, (w.to(acc) * z).to(dtype))
    assert torch.equal(l0, l0_sample)


@pytest.mark.parametrize("w_dtype, la_dtype", [
    (torch.float16, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.float64),
])
def test_masked_mixed_dtypes(w_dtype, la_dtype):
    # z from log_alpha exactly as sample() draws it; the product in the wider of the two
    # (at least float32); w_eff and grad_w in weight's dtype, grad_log_alpha in log_alpha's.
    w, la = log_alpha_like((37, 53), w_dtype, seed=1), log_alpha_like((37, 53), la_dtype)
    mul = torch.promote_types(torch.promote_types(w_dtype, la_dtype), torch.float32)
    w_eff, l0 = masked_sample(w, la, 3, 4)
    z, l0_sample = sample(la, 3, 4)
    assert torch.equal(w_eff, (w.to(mul) * z.to(mul)).to(w_dtype)) and torch.equal(l0, l0_sample)
    g = log_alpha_like((37, 53), w_dtype, seed=2)
    gl0 = torch.tensor(0.37, device=DEV)
    grad_w, grad_la = masked_backward(g, gl0, w, la, 3, 4)
    assert grad_w.dtype == w_dtype and grad_la.dtype == la_dtype
    assert torch.equal(grad_w, (g.to(mul) * z.to(mul)).to(w_dtype))
    # grad_log_alpha is backward()'s with grad_z = grad_w_eff * weight (in the product
    # dtype, then log_alpha's compute dtype; backward reads grad_z in that dtype too).
    grad_z = (g.to(mul) * w.to(mul)).to(torch.promote_types(la_dtype, torch.float32))
    expected = hc.backward(grad_z, gl0, la, 3, off(4), 1, BETA, GAMMA, ZETA, True)
    torch.testing.assert_close(grad_la, expected, **tolerances(la_dtype, k=2))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_masked_backward_matches_reference_autograd(shape, training):
    w = log_alpha_like(shape, seed=1, scale=1.0).requires_grad_()
    la = log_alpha_like(shape).requires_grad_()
    g = log_alpha_like(shape, seed=2)
    gl0 = torch.tensor(0.37, dtype=torch.float64, device=DEV)
    grad_w, grad_la = masked_backward(g, gl0, w.detach(), la.detach(), 3, 77, training)
    ref_w, ref_l0 = ref_masked(w, la, 3, 77, training)
    expected_w, expected_la = torch.autograd.grad((ref_w * g).sum() + gl0 * ref_l0, (w, la))
    assert grad_w.shape == grad_la.shape == shape
    torch.testing.assert_close(grad_w, expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_la, expected_la, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_backward_low_precision(dtype):
    shape = (5, 3, 3, 3)
    w, la, g = (log_alpha_like(shape, dtype, seed=s, scale=1.0) for s in (1, 0, 2))
    gl0 = torch.tensor(0.37, device=DEV)
    grad_w, grad_la = masked_backward(g, gl0, w, la, 3, 77)
    assert grad_w.dtype == grad_la.dtype == dtype
    z = sample(la.float(), 3, 77)[0]  # the unrounded gates (see above)
    assert_rounded_once(grad_w, (g.float() * z).to(dtype))
    w64, la64 = w.double().requires_grad_(), la.double().requires_grad_()
    ref_w, ref_l0 = ref_masked(w64, la64, 3, 77)
    _, expected = torch.autograd.grad((ref_w * g.double()).sum() + gl0.double() * ref_l0, (w64, la64))
    # test_gates_low_precision's tolerances (the gradients are O(1) as well).
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tolerances(dtype, k=2)
    torch.testing.assert_close(grad_la.double(), expected, **tol)


class KernelMaskedSample(torch.autograd.Function):
    """masked_sample / masked_backward as one differentiable function, to gradcheck the
    fused backward against finite differences of the fused forward."""

    @staticmethod
    def forward(ctx, w, la, training):
        ctx.save_for_backward(w, la)
        ctx.training = training
        return masked_sample(w, la, 17, 4, training)

    @staticmethod
    def backward(ctx, grad_w_eff, grad_l0):
        w, la = ctx.saved_tensors
        return *masked_backward(grad_w_eff, grad_l0, w, la, 17, 4, ctx.training), None


@pytest.mark.parametrize("training", [True, False])
def test_masked_gradcheck(training):
    w = log_alpha_like((3, 5), seed=1, scale=1.0).requires_grad_()
    la = log_alpha_like((3, 5), scale=1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: KernelMaskedSample.apply(a, b, training), (w, la))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "mixed"])
def test_masked_non_contiguous(layout):
    # Results depend only on the logical tensors: indices are log_alpha's row-major ones.
    if layout == "transposed":
        w, la, g = (log_alpha_like((53, 37), seed=s).t() for s in (1, 0, 2))
    elif layout == "channels_last":
        cl = torch.channels_last
        w, la, g = (log_alpha_like((5, 3, 3, 3), seed=s).to(memory_format=cl) for s in (1, 0, 2))
    else:  # one contiguous, one transposed, one strided slice
        w, la = log_alpha_like((37, 53), seed=1), log_alpha_like((53, 37)).t()
        g = log_alpha_like((37, 106), seed=2)[:, ::2]
    assert not (w.is_contiguous() and la.is_contiguous() and g.is_contiguous())
    gl0 = torch.tensor(0.5, dtype=torch.float64, device=DEV)
    w_eff, l0 = masked_sample(w, la, 9, 10)
    assert w_eff.is_contiguous()
    contiguous = [t.contiguous() for t in (g, w, la)]
    expected_w_eff, expected_l0 = masked_sample(*contiguous[1:], 9, 10)
    assert torch.equal(w_eff, expected_w_eff) and torch.equal(l0, expected_l0)
    torch.testing.assert_close(w_eff, ref_masked(w, la, 9, 10)[0], rtol=1e-12, atol=1e-12)
    grads = masked_backward(g, gl0, w, la, 9, 10)
    for got, expected in zip(grads, masked_backward(contiguous[0], gl0, *contiguous[1:], 9, 10)):
        assert got.is_contiguous() and torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(0, 3), (4, 0, 3, 3)])
def test_masked_zero_size(shape):
    w, la = torch.zeros(shape, device=DEV), torch.zeros(shape, device=DEV)
    w_eff, l0 = masked_sample(w, la, 1, 1)
    assert w_eff.shape == shape and w_eff.dtype == w.dtype and l0.shape == () and l0.item() == 0.0
    grad_w, grad_la = masked_backward(w_eff, l0, w, la, 1, 1)
    assert grad_w.shape == grad_la.shape == shape


def test_masked_shape_mismatch():
    w, la = torch.zeros(3, 4, device=DEV), torch.zeros(4, 3, device=DEV)
    with pytest.raises(ValueError, match="weight has shape"):
        masked_sample(w, la, 1, 1)
    with pytest.raises(ValueError, match="grad_w_eff has shape"):
        masked_backward(w, torch.tensor(0.0, device=DEV), la, la, 1, 1)
