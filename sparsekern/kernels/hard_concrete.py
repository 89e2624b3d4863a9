"""Hard-concrete gates (Louizos et al. 2018): sampling + expected-L0 partial sums in one
pass, and the backward that re-derives the noise from (seed, offset).

Noise: Philox4x32-10 keyed by `seed`, counter (flat index lo, flat index hi, offset lo,
offset hi); the first output word becomes r in [0, 1) via tl.uint_to_uniform_float and
u = eps + (1 - 2 eps) r. reference.philox_uniform computes the same stream with torch ops.
Every (offset, index) pair is a distinct counter, so consecutive offsets never reuse noise.

Math runs in float32 (float64 for float64 log_alpha); beta, gamma, zeta arrive as float32
kernel scalars, so float64 results carry their float32 rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

EPS = tl.constexpr(1e-6)  # == reference.HARD_CONCRETE_EPS (checked by the tests)
BLOCK = 1024


@triton.jit
def _uniform(seed, offset, idx):
    """r in [0, 1) for int64 flat indices idx: the stream in the module docstring."""
    off = tl.to_tensor(offset).to(tl.int64)
    zero = tl.zeros_like(idx).to(tl.uint32)
    c0 = (idx & 0xFFFFFFFF).to(tl.uint32)
    c1 = (idx >> 32).to(tl.uint32)
    c2 = zero + (off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    word, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(word)


@triton.jit
def _gate(la, seed, offset, idx, beta, gamma, zeta, TRAINING: tl.constexpr):
    """(s, y): the stretched gate before the clamp is y = s (zeta - gamma) + gamma, with
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta) in training (logistic noise)
    and s = sigmoid(log_alpha / beta) in eval."""
    x = la
    if TRAINING:
        u = EPS + (1.0 - 2.0 * EPS) * _uniform(seed, offset, idx).to(la.dtype)
        x = x + (tl.log(u) - tl.log(1.0 - u))
    s = tl.sigmoid(x / beta)
    return s, s * (zeta - gamma) + gamma


@triton.jit
def _p_nonzero(la, beta, gamma, zeta):
    """P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))."""
    return tl.sigmoid(la - beta * tl.log(-gamma / zeta))


@triton.jit
def _load_block(ptr, beta, gamma, zeta, n, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's flat indices, their in-bounds mask, log_alpha there, and the three
    constants, all in the compute dtype (float64 for float64 input, else float32)."""
    compute = tl.float64 if FP64 else tl.float32
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    la = tl.load(ptr + idx, mask=inb, other=0.0).to(compute)
    beta = tl.to_tensor(beta).to(compute)
    gamma = tl.to_tensor(gamma).to(compute)
    zeta = tl.to_tensor(zeta).to(compute)
    return idx, inb, la, beta, gamma, zeta


@triton.jit
def _sample_kernel(
    log_alpha_ptr, z_ptr, l0_partial_ptr, n, seed, offset, beta, gamma, zeta,
    TRAINING: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    idx, inb, la, beta, gamma, zeta = _load_block(log_alpha_ptr, beta, gamma, zeta, n, FP64, BLOCK)
    _, y = _gate(la, seed, offset, idx, beta, gamma, zeta, TRAINING)
    z = tl.minimum(tl.maximum(y, 0.0), 1.0)
    tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=inb)
    # One expected-L0 partial per program, summed by the launcher in a fixed order
    # (float atomics would make the sum run-to-run nondeterministic).
    p = tl.where(inb, _p_nonzero(la, beta, gamma, zeta), 0.0)
    tl.store(l0_partial_ptr + tl.program_id(0), tl.sum(p, axis=0))


@triton.jit
def _backward_kernel(
    grad_z_ptr, grad_l0_ptr, log_alpha_ptr, grad_ptr, n, seed, offset, beta, gamma, zeta,
    TRAINING: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    idx, inb, la, beta, gamma, zeta = _load_block(log_alpha_ptr, beta, gamma, zeta, n, FP64, BLOCK)
    gz = tl.load(grad_z_ptr + idx, mask=inb, other=0.0).to(la.dtype)
    # Gradient of the expected L0, already times group_size; read on the device so the
    # backward never syncs the host.
    gl0 = tl.load(grad_l0_ptr).to(la.dtype)
    s, y = _gate(la, seed, offset, idx, beta, gamma, zeta, TRAINING)
    # dz/dlog_alpha: zero where the clamp is active.
    dz = tl.where((y > 0.0) & (y < 1.0), (zeta - gamma) * s * (1.0 - s) / beta, 0.0)
    p = _p_nonzero(la, beta, gamma, zeta)
    grad = gz * dz + gl0 * p * (1.0 - p)
    tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=inb)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def sample(
    log_alpha: torch.Tensor, seed: int, offset: int, group_size: int,
    beta: float, gamma: float, zeta: float, training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, expected_l0) from one pass over log_alpha (any device Triton runs on; made
    contiguous, indices are row-major)."""
    log_alpha = log_alpha.contiguous()
    n = log_alpha.numel()
    n_blocks = (n + BLOCK - 1) // BLOCK
    z = torch.empty_like(log_alpha)
    partials = torch.empty(n_blocks, dtype=_acc_dtype(log_alpha.dtype), device=log_alpha.device)
    if n > 0:
        wrap_triton(_sample_kernel)[(n_blocks,)](
            log_alpha, z, partials, n, seed, offset, beta, gamma, zeta,
            TRAINING=training, FP64=log_alpha.dtype == torch.float64, BLOCK=BLOCK,
        )
    return z, partials.sum() * group_size


def backward(
    grad_z: torch.Tensor, grad_l0: torch.Tensor, log_alpha: torch.Tensor, seed: int,
    offset: int, group_size: int, beta: float, gamma: float, zeta: float, training: bool,
) -> torch.Tensor:
    """d(loss)/d(log_alpha) given the gradients of sample's two outputs."""
    log_alpha = log_alpha.contiguous()
    grad_z = grad_z.contiguous()
    n = log_alpha.numel()
    grad = torch.empty_like(log_alpha)
    # dL0/dlog_alpha_j = group_size * p_j (1 - p_j): fold group_size into the scalar here.
    grad_l0 = (grad_l0 * group_size).to(_acc_dtype(log_alpha.dtype))
    if n > 0:
        n_blocks = (n + BLOCK - 1) // BLOCK
        wrap_triton(_backward_kernel)[(n_blocks,)](
            grad_z, grad_l0, log_alpha, grad, n, seed, offset, beta, gamma, zeta,
            TRAINING=training, FP64=log_alpha.dtype == torch.float64, BLOCK=BLOCK,
        )
    return grad
