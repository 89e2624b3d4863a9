"""hard_concrete_gates / hard_concrete_l0 / hard_concrete_sample: values and float64
gradients against the reference, gradcheck, determinism in (seed, offset), the sampling
distribution against its closed forms, the Philox stream, opcheck, torch.compile, bad inputs.

Comparisons use beta, gamma, zeta rounded to float32: the Triton kernel (CUDA) receives
them as float32 scalars, so that is the only way a float64 comparison can be tight there.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import sparsekern
from conftest import tolerances
from sparsekern import ops
from sparsekern._extension import HAS_EXTENSION
from sparsekern.kernels import hard_concrete as hc_kernels
from sparsekern.ops import reference


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


BETA, GAMMA, ZETA = f32(2 / 3), f32(-0.1), f32(1.1)
CONSTS = dict(beta=BETA, gamma=GAMMA, zeta=ZETA)
SHAPES = [(7,), (37, 53), (3, 4, 2, 2)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Gates vs the reference computed in the same dtype (16-bit: float32 math, one rounding).
# float32 is loose because log(1 - u) amplifies a last-bit difference in u near 1 (CUDA
# may fuse eps + (1 - 2 eps) r into an FMA): 1 ulp of u at 1 - 1e-3 moves z by ~3e-5.
GATE_TOL = {
    torch.float64: tolerances(torch.float64, k=64),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: tolerances(torch.float16, k=2),
    torch.bfloat16: tolerances(torch.bfloat16, k=2),
}


def off(n, device="cpu"):
    """The raw ops' `offset`: a one-element int64 tensor on log_alpha's device."""
    return torch.tensor(n, dtype=torch.int64, device=device)


def log_alpha_like(shape, device, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def ref_gates(la, seed, offset, training=True, **consts):
    c = {**CONSTS, **consts}
    return reference.hard_concrete_gates(la, seed, offset, training, c["beta"], c["gamma"], c["zeta"])


def ref_l0(la, group_size=1, **consts):
    c = {**CONSTS, **consts}
    return reference.hard_concrete_l0(la, group_size, c["beta"], c["gamma"], c["zeta"])


# --- values ------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gates_match_reference(device, shape, dtype, training):
    la = log_alpha_like(shape, device, dtype)
    z = ops.hard_concrete_gates(la, 11, 3, training=training, **CONSTS)
    assert z.shape == la.shape and z.dtype == dtype and z.device == la.device and z.is_contiguous()
    torch.testing.assert_close(z, ref_gates(la, 11, 3, training), **GATE_TOL[dtype])
    assert bool(((z >= 0) & (z <= 1)).all())


@pytest.mark.parametrize("group_size", [1, 9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_expected_l0_closed_form(device, dtype, group_size):
    la = log_alpha_like((37, 53), device, dtype)
    l0 = ops.hard_concrete_l0(la, group_size, **CONSTS)
    assert l0.dim() == 0 and l0.dtype == torch.promote_types(dtype, torch.float32)
    # P(z != 0) = 1 - P(z = 0) = sigmoid(log alpha - beta log(-gamma / zeta)), per gate.
    p = torch.sigmoid(la.double() - BETA * math.log(-GAMMA / ZETA))
    rtol = 1e-5 if l0.dtype == torch.float32 else 1e-12  # a float32 sum of 1961 terms
    torch.testing.assert_close(l0.double(), group_size * p.sum(), rtol=rtol, atol=0)
    torch.testing.assert_close(l0, ref_l0(la, group_size), rtol=rtol, atol=0)


def test_sample_returns_both_halves(device):
    la = log_alpha_like((5, 9), device)
    z, l0 = ops.hard_concrete_sample(la, 4, 2, 6, **CONSTS)
    assert torch.equal(z, ops.hard_concrete_gates(la, 4, 2, **CONSTS))
    torch.testing.assert_close(l0, ops.hard_concrete_l0(la, 6, **CONSTS))


def test_eval_gate_formula(device):
    la = torch.tensor([-30.0, -3.0, -0.5, 0.0, 0.7, 2.0, 30.0], dtype=torch.float64, device=device)
    z = ops.hard_concrete_gates(la, 0, 0, training=False, **CONSTS)
    expected = torch.clamp(torch.sigmoid(la / BETA) * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.testing.assert_close(z, expected, **tolerances(torch.float64))
    assert z[0] == 0 and z[-1] == 1 and 0 < z[3] < 1
    # The eval gate ignores seed and offset.
    assert torch.equal(z, ops.hard_concrete_gates(la, 123, 456, training=False, **CONSTS))


def test_default_constants_are_methods_md(device):
    la = log_alpha_like((11,), device, torch.float64)
    expected = reference.hard_concrete_gates(la, 1, 2, True, 2 / 3, -0.1, 1.1)
    torch.testing.assert_close(ops.hard_concrete_gates(la, 1, 2), expected, rtol=1e-6, atol=1e-6)
    assert reference.HARD_CONCRETE_EPS == hc_kernels.EPS == 1e-6


def test_zero_size(device):
    la = torch.zeros(0, 4, device=device, requires_grad=True)
    z, l0 = ops.hard_concrete_sample(la, 1, 1)
    assert z.shape == (0, 4) and l0.item() == 0.0
    (z.sum() + l0).backward()
    assert la.grad.shape == (0, 4)


def test_non_contiguous_input_uses_row_major_indices(device):
    la = log_alpha_like((9, 13), device).t()
    assert not la.is_contiguous()
    assert torch.equal(ops.hard_concrete_gates(la, 5, 6), ops.hard_concrete_gates(la.contiguous(), 5, 6))


# --- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_reference_autograd(device, shape, training):
    la = log_alpha_like(shape, device, torch.float64).requires_grad_()
    g = torch.Generator().manual_seed(1)
    grad_z = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    grad_l0 = 0.37

    z, l0 = ops.hard_concrete_sample(la, 8, 21, 5, training=training, **CONSTS)
    (got,) = torch.autograd.grad((z * grad_z).sum() + grad_l0 * l0, la)
    z_ref = ref_gates(la, 8, 21, training)
    (expected,) = torch.autograd.grad((z_ref * grad_z).sum() + grad_l0 * ref_l0(la, 5), la)
    torch.testing.assert_close(got, expected, **tolerances(torch.float64, k=64))


def test_gradient_is_zero_exactly_where_clamped(device):
    la = torch.linspace(-12, 12, 201, dtype=torch.float64, device=device, requires_grad=True)
    z = ops.hard_concrete_gates(la, 3, 3, **CONSTS)
    (grad,) = torch.autograd.grad(z.sum(), la)
    inside = (z > 0) & (z < 1)
    assert bool(inside.any()) and bool((z == 0).any()) and bool((z == 1).any())
    assert torch.equal(grad > 0, inside) and bool((grad[~inside] == 0).all())


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(device, training):
    la = log_alpha_like((4, 5), device, torch.float64, scale=1.0).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ops.hard_concrete_sample(x, 17, 2, 3, training=training), (la,)
    )
    assert torch.autograd.gradcheck(lambda x: ops.hard_concrete_gates(x, 17, 2, training=training), (la,))
    assert torch.autograd.gradcheck(lambda x: ops.hard_concrete_l0(x, 7), (la,))


def test_backward_saves_log_alpha_and_the_offset_only(device):
    # The noise is regenerated from (seed, offset): neither u nor z may be saved. The
    # one-element offset is saved, so that changing it in place before the backward is an
    # error (kept by reference, it silently regenerated other noise: other gradients).
    la = log_alpha_like((6, 7), device).requires_grad_()
    offset = torch.tensor(2, dtype=torch.int64, device=device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = ops.hard_concrete_gates(la, 1, offset)
    assert len(saved) == 2 and saved[0] is la and saved[1].numel() == 1
    z.sum().backward()
    assert la.grad is not None and bool(la.grad.abs().sum() > 0)
    for sample in (lambda: ops.hard_concrete_gates(la, 1, offset),
                   lambda: ops.hard_concrete_masked_weight(torch.randn(6, 7, device=device), la, 1, offset)[0]):
        out = sample()
        offset.add_(1000)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


# --- the noise ----------------------------------------------------------------------------


def test_deterministic_in_seed_and_offset(device):
    la = log_alpha_like((37, 53), device)
    z = ops.hard_concrete_gates(la, 7, 100)
    assert torch.equal(z, ops.hard_concrete_gates(la, 7, 100))
    assert not torch.equal(z, ops.hard_concrete_gates(la, 7, 101))
    assert not torch.equal(z, ops.hard_concrete_gates(la, 8, 100))
    # Offsets are their own counter words, not shifts of the index: offset 101 must not
    # reuse offset 100's noise one element along (as an "index + offset" scheme would).
    z0 = ops.hard_concrete_gates(la.flatten(), 7, 100)
    z1 = ops.hard_concrete_gates(la.flatten(), 7, 101)
    assert not torch.equal(z1[:-1], z0[1:])
    # Large seeds and offsets use the high counter and key words.
    big = ops.hard_concrete_gates(la, 2**40 + 7, 2**35)
    assert not torch.equal(big, ops.hard_concrete_gates(la, 7, 2**35))
    assert not torch.equal(big, ops.hard_concrete_gates(la, 2**40 + 7, 0))


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32-10: (counter, key) -> output words.
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 2**64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0x299F31D0 << 32) | 0xA4093822,
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        words = reference.philox4x32(*(torch.tensor([c]) for c in counter), key)
        assert [int(w) for w in words] == list(expected)


def test_uniform_range_and_moments():
    r = reference.philox_uniform(10**5, 3, 9)
    assert r.dtype == torch.float32 and bool(((r >= 0) & (r < 1)).all())
    # U(0, 1): mean 1/2, variance 1/12; 4 sigma of the sample mean.
    assert abs(r.double().mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / r.numel())
    u = reference.hard_concrete_uniform((10**5,), 3, 9, torch.float64)
    assert bool(((u > 0) & (u < 1)).all())


# The distribution of z. With L = log u - log(1 - u), L ~ Logistic(0, 1) (CDF sigmoid) for
# u ~ U(0, 1), and s = sigmoid((L + log alpha) / beta). For t in [0, 1):
#   z <= t  <=>  s <= (t - gamma) / (zeta - gamma)  <=>  L <= beta log((t - gamma) / (zeta - t)) - log alpha
# (logit((t - gamma) / (zeta - gamma)) = log((t - gamma) / (zeta - t))), so
#   P(z <= t) = sigmoid(beta log((t - gamma) / (zeta - t)) - log alpha), and in particular
#   P(z = 0) = sigmoid(beta log(-gamma / zeta) - log alpha)              (t = 0)
#   P(z = 1) = 1 - P(z < 1) = sigmoid(log alpha - beta log((1 - gamma) / (zeta - 1)))
#   E[z]     = int_0^1 P(z > t) dt = int_0^1 sigmoid(log alpha - beta log((t - gamma) / (zeta - t))) dt
# Truncating u to (1e-6, 1 - 1e-6) moves these by ~1e-6, far below the 4-sigma bands.


def closed_forms(log_alpha: float, beta=2 / 3, gamma=-0.1, zeta=1.1):
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    p0 = sig(beta * math.log(-gamma / zeta) - log_alpha)
    p1 = sig(log_alpha - beta * math.log((1 - gamma) / (zeta - 1)))
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    tail = torch.sigmoid(log_alpha - beta * torch.log((t - gamma) / (zeta - t)))
    return p0, p1, torch.trapezoid(tail, t).item()


def check_distribution(z: torch.Tensor, log_alpha: float):
    z = z.double().flatten().cpu()
    n = z.numel()
    p0, p1, mean = closed_forms(log_alpha)
    for observed, p in (((z == 0).double().mean().item(), p0), ((z == 1).double().mean().item(), p1)):
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n), (log_alpha, observed, p)
    assert abs(z.mean().item() - mean) < 4 * z.std().item() / math.sqrt(n), (log_alpha, z.mean(), mean)


@pytest.mark.parametrize("log_alpha", [-1.5, 0.5, 2.0])
def test_distribution_over_elements(device, log_alpha):
    la = torch.full((10**5,), log_alpha, device=device)
    check_distribution(ops.hard_concrete_gates(la, 2024, 1), log_alpha)


def test_distribution_over_offsets(device):
    # One small layer sampled at 100 consecutive offsets (what a training loop does).
    la = torch.full((1000,), 0.3, device=device)
    z = torch.stack([ops.hard_concrete_gates(la, 99, k) for k in range(100)])
    check_distribution(z, 0.3)
    # Consecutive offsets are uncorrelated at each gate: 4 sigma of a null correlation.
    corr = torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]).double().cpu())[0, 1]
    assert abs(corr.item()) < 4 / math.sqrt(z[1:].numel())


def test_expected_l0_is_the_mean_nonzero_count(device):
    # hard_concrete_l0 is what the sampled gates count on average.
    la = log_alpha_like((50,), device, scale=1.0)
    nonzero = torch.stack([(ops.hard_concrete_gates(la, 5, k) != 0).double() for k in range(1000)])
    per_sample = nonzero.sum(1)
    se = per_sample.std().item() / math.sqrt(per_sample.numel())
    assert abs(per_sample.mean().item() - ops.hard_concrete_l0(la).item()) < 4 * se


def test_no_host_sync_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("host syncs are only observable on CUDA")
    la = log_alpha_like((37, 53), device).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z, l0 = ops.hard_concrete_sample(la, 1, 2, 4)
        (z.sum() + l0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- torch.library -----------------------------------------------------------------------


# Transposed: the torch path's gradient (float64) took grad_z's layout, not the fake's
# contiguous one, and opcheck's fake-tensor check failed.
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype, training", [(torch.float32, True), (torch.float64, False)])
def test_opcheck(device, dtype, training, transposed):
    la = (log_alpha_like((7, 5), device, dtype).t() if transposed else log_alpha_like((5, 7), device, dtype))
    la = la.requires_grad_()
    torch.library.opcheck(
        torch.ops.sparsekern.hard_concrete_sample.default, (la, 3, off(4, device), 2, BETA, GAMMA, ZETA, training)
    )
    grad_z, grad_l0 = torch.randn_like(la).detach(), torch.tensor(0.5, dtype=dtype, device=device)
    torch.library.opcheck(
        torch.ops.sparsekern.hard_concrete_sample_backward.default,
        (grad_z, grad_l0, la.detach(), 3, off(4, device), 2, BETA, GAMMA, ZETA, training),
    )


def test_compile_fullgraph_forward_backward():
    def loss(log_alpha, weight, offset):
        z, l0 = ops.hard_concrete_sample(log_alpha, 42, offset, weight.shape[1])
        return ((weight * z[:, None]) ** 2).sum() + 0.01 * l0 + ops.hard_concrete_gates(
            log_alpha, 42, offset, training=False
        ).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    weight = torch.randn(6, 4)
    for offset in (0, 1):
        la = log_alpha_like((6,), "cpu").requires_grad_()
        la_eager = la.detach().clone().requires_grad_()
        out, expected = compiled(la, weight, offset), loss(la_eager, weight, offset)
        torch.testing.assert_close(out, expected)
        out.backward()
        expected.backward()
        torch.testing.assert_close(la.grad, la_eager.grad)


# --- bad inputs --------------------------------------------------------------------------

LA = torch.zeros(3)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: ops.hard_concrete_gates([0.0, 1.0], 0, 0), TypeError, "log_alpha"),
        (lambda: ops.hard_concrete_gates(torch.zeros(3, dtype=torch.int64), 0, 0), ValueError, "log_alpha"),
        (lambda: ops.hard_concrete_gates(LA, 1.5, 0), TypeError, "seed"),
        (lambda: ops.hard_concrete_gates(LA, True, 0), TypeError, "seed"),
        (lambda: ops.hard_concrete_gates(LA, -1, 0), ValueError, "seed"),
        (lambda: ops.hard_concrete_gates(LA, 2**63, 0), ValueError, "seed"),
        (lambda: ops.hard_concrete_gates(LA, 0, -3), ValueError, "offset"),
        (lambda: ops.hard_concrete_gates(LA, 0, "1"), TypeError, "offset"),
        (lambda: ops.hard_concrete_gates(LA, 0, 0, training=1), TypeError, "training"),
        (lambda: ops.hard_concrete_gates(LA, 0, 0, beta=0.0), ValueError, "beta"),
        (lambda: ops.hard_concrete_gates(LA, 0, 0, beta=-1.0), ValueError, "beta"),
        (lambda: ops.hard_concrete_gates(LA, 0, 0, beta=float("nan")), ValueError, "beta"),
        (lambda: ops.hard_concrete_gates(LA, 0, 0, beta="2/3"), TypeError, "beta"),
        (lambda: ops.hard_concrete_gates(LA, 0, 0, gamma=0.0), ValueError, "gamma"),
        (lambda: ops.hard_concrete_gates(LA, 0, 0, zeta=1.0), ValueError, "zeta"),
        (lambda: ops.hard_concrete_l0(LA, 0), ValueError, "group_size"),
        (lambda: ops.hard_concrete_l0(LA, 2.0), TypeError, "group_size"),
        (lambda: ops.hard_concrete_l0(LA, 1, gamma=float("inf")), ValueError, "gamma"),
    ],
)
def test_bad_inputs_raise(call, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        call()


def test_offset_may_be_an_int64_tensor():
    # The public op takes the offset as an int or as the one-element int64 tensor the masks
    # keep (on log_alpha's device): the same counter word, so the same (z, l0) bit for bit.
    la = log_alpha_like((37, 53), "cpu")
    z, l0 = ops.hard_concrete_sample(la, 3, 4, 2, **CONSTS)
    z_t, l0_t = ops.hard_concrete_sample(la, 3, torch.tensor(4), 2, **CONSTS)
    assert torch.equal(z, z_t) and torch.equal(l0, l0_t)
    with pytest.raises(TypeError, match="offset"):
        ops.hard_concrete_sample(la, 3, torch.tensor(4.0), 2)
    with pytest.raises(ValueError, match="offset"):
        ops.hard_concrete_sample(la, 3, torch.tensor([4, 5]), 2)
    with pytest.raises(ValueError, match="offset"):
        ops.hard_concrete_sample(la, 3, torch.tensor(-1), 2)


def test_cpu_noise_kernel_matches_reference_stream():
    # The C++ Philox (csrc/cpu/hard_concrete_cpu.cpp) must reproduce reference.philox_uniform
    # bit for bit, including 64-bit seeds/offsets, sizes that end inside a vector or a
    # block, and sizes that split across threads.
    from sparsekern.ops.reference import philox_uniform

    cases = [(1, 0, 0), (33, 5, 6), (513, 1, 2), (1000, 3, 7), (70_001, 2**40 + 5, 2**33 + 9), (0, 1, 1)]
    for numel, seed, offset in cases:
        out = torch.empty(numel)
        torch.ops.sparsekern.philox_uniform_(out, seed, off(offset))
        assert torch.equal(out, philox_uniform(numel, seed, offset))


def test_cpu_noise_kernel_rejects_bad_output():
    with pytest.raises(ValueError, match="float32"):
        torch.ops.sparsekern.philox_uniform_(torch.empty(3, dtype=torch.float64), 0, off(0))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.sparsekern.philox_uniform_(torch.empty(4, 4).t(), 0, off(0))


@pytest.mark.parametrize("numel", [0, 1, 37])
def test_cpu_noise_kernel_opcheck(numel):
    # The one mutating op (out is written in place): its schema's alias annotation, fake
    # and dispatch had no opcheck.
    torch.library.opcheck(torch.ops.sparsekern.philox_uniform_.default, (torch.empty(numel), 3, off(5)))


# --- the fused C++ CPU kernels (csrc/cpu/hard_concrete_cpu.cpp) ---------------------------
# float32 / float16 / bfloat16 on the CPU run sparsekern::hard_concrete_sample_fused and its
# backward. Their oracle is float64 math on the same float32 noise u (the float64 reference
# would draw u in float64, which moves z by up to ~1e-3 where 1 - u < 1e-4): z and the
# gradient through autograd, the expected L0 from reference.hard_concrete_l0.

FUSED_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# float32: the kernels' log/exp are within a few ulp; 16-bit: one rounding of the result.
FUSED_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: tolerances(torch.float16, k=2),
    torch.bfloat16: tolerances(torch.bfloat16, k=2),
}
FUSED = torch.ops.sparsekern.hard_concrete_sample_fused
FUSED_BACKWARD = torch.ops.sparsekern.hard_concrete_sample_fused_backward


def float64_gates(la, seed, offset, training, u=None):
    """z of reference.hard_concrete_gates in float64 for log alpha `la` (float64, may
    require grad), with the float32 noise u of a float32 log alpha."""
    if training:
        if u is None:
            u = reference.hard_concrete_uniform(la.shape, seed, offset, torch.float32)
        u = u.double()
        la = la + (torch.log(u) - torch.log1p(-u))
    s = torch.sigmoid(la / BETA)
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def float64_oracle(la, seed, offset, group_size, training, grad_z, grad_l0):
    """(z, expected L0, d(sum(z grad_z) + grad_l0 L0)/d la), all float64."""
    x = la.detach().double().requires_grad_()
    z = float64_gates(x, seed, offset, training)
    l0 = reference.hard_concrete_l0(x, group_size, BETA, GAMMA, ZETA)
    (grad,) = torch.autograd.grad((z * grad_z.double()).sum() + grad_l0 * l0, x)
    return z.detach(), l0.detach(), grad


def fused_sample_and_grad(la, seed, offset, group_size, training, grad_z, grad_l0):
    la = la.detach().clone().requires_grad_()
    z, l0 = ops.hard_concrete_sample(la, seed, offset, group_size, training=training, **CONSTS)
    torch.autograd.backward([z, l0], [grad_z, torch.tensor(grad_l0)])
    return z.detach(), l0.detach(), la.grad


@pytest.mark.parametrize("group_size", [1, 9])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("shape", [(7,), (37, 53), (3, 4, 2, 2), (130, 301)])
def test_fused_matches_float64_oracle(shape, dtype, training, group_size):
    # (130, 301): 76 blocks of 512 in 3 chunks, so it runs on several threads.
    la = log_alpha_like(shape, "cpu", dtype)
    grad_z = log_alpha_like(shape, "cpu", dtype, seed=1, scale=1.0)
    z, l0, grad = fused_sample_and_grad(la, 8, 21, group_size, training, grad_z, 0.37)
    z64, l0_64, grad64 = float64_oracle(la, 8, 21, group_size, training, grad_z, 0.37)
    assert z.dtype == dtype and z.shape == la.shape and z.is_contiguous()
    assert l0.dtype == torch.float32 and l0.dim() == 0 and grad.dtype == dtype
    torch.testing.assert_close(z.double(), z64, **FUSED_TOL[dtype])
    torch.testing.assert_close(l0.double(), l0_64, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), grad64, **FUSED_TOL[dtype])
    # The public op ran the C++ kernel: its outputs are the kernel's, bit for bit.
    z_op, l0_op = FUSED(la, 8, off(21), group_size, BETA, GAMMA, ZETA, training)
    assert torch.equal(z, z_op) and torch.equal(l0, l0_op)


@pytest.mark.parametrize("training", [True, False])
def test_fused_backward_of_one_output(training):
    # grad_l0 = 0 (only z used) skips the L0 term; grad_z = 0 (only L0 used) keeps it.
    la = log_alpha_like((37, 53), "cpu")
    grad_z = log_alpha_like((37, 53), "cpu", seed=2, scale=1.0)
    _, _, expected_z = float64_oracle(la, 3, 4, 5, training, grad_z, 0.0)
    _, _, expected_l0 = float64_oracle(la, 3, 4, 5, training, torch.zeros_like(grad_z), 2.5)
    x = la.clone().requires_grad_()
    z, _ = ops.hard_concrete_sample(x, 3, 4, 5, training=training, **CONSTS)
    (got_z,) = torch.autograd.grad((z * grad_z).sum(), x)
    _, l0 = ops.hard_concrete_sample(x, 3, 4, 5, training=training, **CONSTS)
    (got_l0,) = torch.autograd.grad(2.5 * l0, x)
    torch.testing.assert_close(got_z.double(), expected_z, **FUSED_TOL[torch.float32])
    torch.testing.assert_close(got_l0.double(), expected_l0, **FUSED_TOL[torch.float32])


def test_fused_noise_is_bit_identical_to_the_reference_stream():
    # log alpha = -(log u - log(1 - u)) puts every gate at s = 1/2, where z depends on u
    # alone: there z agrees with float64 math on reference.hard_concrete_uniform's float32 u
    # to 1e-6 (the kernels' log/exp rounding: ~3e-7). A u rounded once (an FMA fusing
    # eps + (1 - 2 eps) r) or off by one ulp misses that at many gates; checked below.
    n, seed, offset = 2**14, 5, 9
    u = reference.hard_concrete_uniform((n,), seed, offset, torch.float32)
    la = -(torch.log(u.double()) - torch.log1p(-u.double())).float()
    z = ops.hard_concrete_gates(la, seed, offset, **CONSTS)
    expected = float64_gates(la.double(), seed, offset, True, u)
    torch.testing.assert_close(z.double(), expected, rtol=0, atol=1e-6)

    r = reference.philox_uniform(n, seed, offset).double()
    eps, scale = f32(reference.HARD_CONCRETE_EPS), f32(1 - 2 * reference.HARD_CONCRETE_EPS)
    u_fma = (eps + scale * r).float()  # one rounding
    u_next = torch.nextafter(u, torch.tensor(1.0))
    for wrong in (u_fma, u_next):
        moved = (float64_gates(la.double(), seed, offset, True, wrong) - expected).abs()
        assert int((moved > 1e-6).sum()) > 50


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("shape", [(0,), (0, 4)])
def test_fused_zero_size(shape, dtype):
    la = torch.zeros(shape, dtype=dtype, requires_grad=True)
    z, l0 = ops.hard_concrete_sample(la, 1, 1, 3)
    assert z.shape == shape and z.dtype == dtype and l0.dtype == torch.float32 and l0.item() == 0.0
    (z.sum() + l0).backward()
    assert la.grad.shape == shape


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_non_contiguous(dtype):
    base = log_alpha_like((53, 37), "cpu", dtype)
    gbase = log_alpha_like((53, 37), "cpu", dtype, seed=3, scale=1.0)
    for la, grad_z in ((base.t(), gbase.t()), (base[::2, 1:], gbase[::2, 1:])):
        assert not la.is_contiguous() and not grad_z.is_contiguous()
        z, l0, grad = fused_sample_and_grad(la, 4, 5, 2, True, grad_z, 0.5)
        z_c, l0_c, grad_c = fused_sample_and_grad(la.contiguous(), 4, 5, 2, True, grad_z.contiguous(), 0.5)
        assert torch.equal(z, z_c) and torch.equal(l0, l0_c) and torch.equal(grad, grad_c)


@pytest.mark.parametrize("training", [True, False])
def test_fused_non_finite_log_alpha(training):
    la = torch.tensor([float("-inf"), -2.0, 0.5, float("inf"), 3.0])
    z, l0 = FUSED(la, 1, off(2), 1, BETA, GAMMA, ZETA, training)
    assert z[0] == 0 and z[3] == 1 and bool(torch.isfinite(z).all()) and bool(torch.isfinite(l0))
    torch.testing.assert_close(l0.double(), ref_l0(la.double()), rtol=1e-6, atol=0)
    grad = FUSED_BACKWARD(torch.ones(5), torch.tensor(1.0), la, 1, off(2), 1, BETA, GAMMA, ZETA, training)
    assert grad[0] == 0 and grad[3] == 0 and bool(torch.isfinite(grad).all())
    # NaN propagates to its gate, the L0 and its gradient, as on the torch path.
    la[2] = float("nan")
    z, l0 = FUSED(la, 1, off(2), 1, BETA, GAMMA, ZETA, training)
    assert bool(z[2].isnan()) and bool(l0.isnan()) and bool(torch.isfinite(z[[0, 1, 3, 4]]).all())
    grad = FUSED_BACKWARD(torch.ones(5), torch.tensor(1.0), la, 1, off(2), 1, BETA, GAMMA, ZETA, training)
    assert bool(grad[2].isnan()) and bool(torch.isfinite(grad[[0, 1, 3, 4]]).all())


def test_fused_results_do_not_depend_on_the_thread_count():
    la = log_alpha_like((200_003,), "cpu")
    grad_z = log_alpha_like((200_003,), "cpu", seed=4, scale=1.0)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in sorted({1, max(threads, 2)}):
            torch.set_num_threads(t)
            z, l0 = FUSED(la, 6, off(7), 3, BETA, GAMMA, ZETA, True)
            grad = FUSED_BACKWARD(grad_z, torch.tensor(0.3), la, 6, off(7), 3, BETA, GAMMA, ZETA, True)
            results.append((z, l0, grad))
    finally:
        torch.set_num_threads(threads)
    (z1, l01, g1), (z2, l02, g2) = results
    assert torch.equal(z1, z2) and torch.equal(l01, l02) and torch.equal(g1, g2)


ISA_SCRIPT = """
import sys, torch
import sparsekern.ops  # registers the ops
la, grad_z = torch.load(sys.argv[1])
args = (8, torch.tensor(21), 3, *[float(c) for c in sys.argv[3:6]])
ops = torch.ops.sparsekern
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for training in (True, False):
    out[training] = (
        *ops.hard_concrete_sample_fused(la, *args, training),
        ops.hard_concrete_sample_fused_backward(grad_z, torch.tensor(0.37), la, *args, training),
    )
r = torch.empty(5000)
torch.ops.sparsekern.philox_uniform_(r, 2**40 + 5, torch.tensor(2**33 + 9))
out["philox"] = r
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(not sparsekern.HAS_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_fused_lower_instruction_sets(tmp_path, capability):
    # The kernels follow ATen's CPU capability, so ATEN_CPU_CAPABILITY selects the baseline
    # and AVX2 builds of the loops and the Philox stream on an AVX-512 machine too.
    la = log_alpha_like((61, 67), "cpu")
    grad_z = log_alpha_like((61, 67), "cpu", seed=5, scale=1.0)
    torch.save((la, grad_z), tmp_path / "in.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    paths = [str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    out = subprocess.run(
        [sys.executable, "-c", ISA_SCRIPT, *paths, repr(BETA), repr(GAMMA), repr(ZETA)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    got = torch.load(tmp_path / "out.pt")
    if capability == "avx2" and got["capability"] != "AVX2":
        pytest.skip(f"this CPU has no AVX2 ({got['capability']})")
    assert got["capability"] == capability.upper()
    assert torch.equal(got["philox"], reference.philox_uniform(5000, 2**40 + 5, 2**33 + 9))
    for training in (True, False):
        z, l0, grad = got[training]
        z64, l0_64, grad64 = float64_oracle(la, 8, 21, 3, training, grad_z, 0.37)
        torch.testing.assert_close(z.double(), z64, **FUSED_TOL[torch.float32])
        torch.testing.assert_close(l0.double(), l0_64, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad.double(), grad64, **FUSED_TOL[torch.float32])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_fused_opcheck(dtype, training):
    la = log_alpha_like((5, 7), "cpu", dtype)
    torch.library.opcheck(FUSED.default, (la, 3, off(4), 2, BETA, GAMMA, ZETA, training))
    grad_z = log_alpha_like((5, 7), "cpu", dtype, seed=1)
    for grad_l0 in (torch.tensor(0.5), torch.tensor(0.0)):
        torch.library.opcheck(FUSED_BACKWARD.default, (grad_z, grad_l0, la, 3, off(4), 2, BETA, GAMMA, ZETA, training))


@pytest.mark.skipif(not sparsekern.HAS_EXTENSION, reason="the torch fallback takes any dtype")
def test_fused_rejects_bad_inputs():
    la = torch.zeros(3)
    with pytest.raises(ValueError, match="`log_alpha`"):
        FUSED(la.double(), 0, off(0), 1, BETA, GAMMA, ZETA, True)
    with pytest.raises(ValueError, match="`grad_z`"):
        FUSED_BACKWARD(torch.zeros(4), torch.tensor(1.0), la, 0, off(0), 1, BETA, GAMMA, ZETA, True)
    with pytest.raises(ValueError, match="`grad_z`"):
        FUSED_BACKWARD(
            torch.zeros(3, dtype=torch.float16), torch.tensor(1.0), la, 0, off(0), 1, BETA, GAMMA, ZETA, True
        )
    with pytest.raises(ValueError, match="`grad_l0`"):
        FUSED_BACKWARD(torch.zeros(3), torch.zeros(2), la, 0, off(0), 1, BETA, GAMMA, ZETA, True)
    with pytest.raises(ValueError, match="`group_size`"):
        FUSED(la, 0, off(0), 0, BETA, GAMMA, ZETA, True)


# --- the eager CPU path: the fused kernels with their autograd in C++ ---------------------


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ autograd is part of the extension")
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("use", ["z", "l0", "both"])
def test_eager_autograd_matches_the_op(training, use):
    gen = torch.Generator().manual_seed(5)
    log_alpha = 2 * torch.randn(37, 53, generator=gen)
    weights = torch.randn(37, 53, generator=gen)

    def grad(fn):
        la = log_alpha.clone().requires_grad_()
        z, l0 = fn(la)
        loss = {"z": (z * weights).sum(), "l0": 3.0 * l0, "both": (z * weights).sum() + 3.0 * l0}[use]
        loss.backward()
        return z.detach(), l0.detach(), la.grad

    args = (11, off(4), 6, BETA, GAMMA, ZETA, training)
    eager = grad(lambda la: ops.hard_concrete_sample(la, 11, 4, 6, training=training, beta=BETA, gamma=GAMMA,
                                                     zeta=ZETA))
    via_op = grad(lambda la: torch.ops.sparsekern.hard_concrete_sample(la, *args))
    for a, b in zip(eager, via_op):
        torch.testing.assert_close(a, b, **tolerances(torch.float32))
