"""Hard-concrete gates (Louizos et al. 2018): sampling + expected-L0 partial sums in one
pass, and the backward that re-derives the noise from (seed, offset).

- `sample` / `backward`: the gates z themselves (one gate per log_alpha; group_size scales
  the expected L0 of gates shared by group_size weights each).
- `masked_sample` / `masked_backward`: a weight gated elementwise (log_alpha has the
  weight's shape): w_eff = weight * z from one pass, z never written; the backward gives
  grad_w and grad_log_alpha in one pass, regenerating z from (seed, offset). The same two
  kernels with MASKED set, so the gate math lives once; z stays in the compute dtype for
  the product, so masked_sample(w, la) equals w * sample(la)[0] where z is exact in
  log_alpha's dtype (float32, float64) and is rounded once less in float16/bfloat16.

Noise: Philox4x32-10 keyed by `seed`. Flat index i takes output word i % 4 of the call at
counter (q lo, q hi, offset lo, offset hi), q = i // 4, so one Philox call serves four
elements; the word becomes r in [0, 1) via tl.uint_to_uniform_float and u = eps +
(1 - 2 eps) r. reference.philox_uniform computes the same stream with torch ops. Every
(offset, q) pair is a distinct counter, so consecutive offsets never reuse noise.
Inputs are made contiguous: the index is log_alpha's row-major flat index. The offset is
a one-element int64 tensor on log_alpha's device that the kernels read, not an int
argument: the masks step it every training forward, and torch.compile would recompile
for every new int (a tensor is a graph input).

Math runs in float32 (float64 for float64 log_alpha); beta, gamma, zeta arrive as float32
kernel scalars, so float64 results carry their float32 rounding. The masked products
(weight * z, grad_w_eff * z, grad_w_eff * weight) run in float64 if weight or log_alpha is
float64, else in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

EPS = tl.constexpr(1e-6)  # == reference.HARD_CONCRETE_EPS (checked by the tests)
BLOCK = 1024


@triton.jit
def _uniform(seed, offset, BLOCK: tl.constexpr):
    """r in [0, 1) for this program's BLOCK flat indices (BLOCK a multiple of 4): the
    stream in the module docstring, one Philox call per four indices, its words
    interleaved back into index order."""
    tl.static_assert(BLOCK % 4 == 0, "a block must hold whole Philox calls")
    q = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    off = tl.cast(offset, tl.int64)
    zero = tl.zeros_like(q).to(tl.uint32)
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = zero + (off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    # interleave(a, b) = a0 b0 a1 b1 ...: this gives w0 w1 w2 w3 of q, then of q + 1, ...
    return tl.uint_to_uniform_float(tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3)))


@triton.jit
def _gate(la, seed, offset, beta, gamma, zeta, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    """(s, y): the stretched gate before the clamp is y = s (zeta - gamma) + gamma, with
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta) in training (logistic noise)
    and s = sigmoid(log_alpha / beta) in eval."""
    x = la
    if TRAINING:
        u = EPS + (1.0 - 2.0 * EPS) * _uniform(seed, offset, BLOCK).to(la.dtype)
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
    # tl.cast, not .to(): a scalar argument can arrive as a constexpr (an int equal to 1 is
    # specialised) or, interpreted, as a Python number. (tl.to_tensor did the same, but
    # Triton 3.6, torch 2.11's, does not export it: every launch failed to compile there.)
    beta = tl.cast(beta, compute)
    gamma = tl.cast(gamma, compute)
    zeta = tl.cast(zeta, compute)
    return idx, inb, la, beta, gamma, zeta


@triton.jit
def _clamp01(y):
    return tl.minimum(tl.maximum(y, 0.0), 1.0)


@triton.jit
def _masked_z(y, log_alpha_ptr, MUL_FP64: tl.constexpr):
    """z in the product dtype, not rounded to log_alpha's dtype first: w_eff is rounded
    once (as the CPU kernels and reference.hard_concrete_masked_weight do)."""
    return _clamp01(y).to(tl.float64 if MUL_FP64 else tl.float32)


@triton.jit
def _sample_kernel(
    log_alpha_ptr, weight_ptr, out_ptr, l0_partial_ptr, n, seed, offset_ptr, beta, gamma, zeta,
    MASKED: tl.constexpr, TRAINING: tl.constexpr, FP64: tl.constexpr, MUL_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = z, or weight * z if MASKED (weight_ptr and MUL_FP64 are unused otherwise)."""
    idx, inb, la, beta, gamma, zeta = _load_block(log_alpha_ptr, beta, gamma, zeta, n, FP64, BLOCK)
    _, y = _gate(la, seed, tl.load(offset_ptr), beta, gamma, zeta, TRAINING, BLOCK)
    if MASKED:
        z = _masked_z(y, log_alpha_ptr, MUL_FP64)
        out = tl.load(weight_ptr + idx, mask=inb, other=0.0).to(z.dtype) * z
    else:
        out = _clamp01(y)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=inb)
    # One expected-L0 partial per program, summed by the launcher in a fixed order
    # (float atomics would make the sum run-to-run nondeterministic).
    p = tl.where(inb, _p_nonzero(la, beta, gamma, zeta), 0.0)
    tl.store(l0_partial_ptr + tl.program_id(0), tl.sum(p, axis=0))


@triton.jit
def _backward_kernel(
    grad_out_ptr, grad_l0_ptr, log_alpha_ptr, weight_ptr, grad_ptr, grad_w_ptr, n,
    seed, offset_ptr, beta, gamma, zeta,
    MASKED: tl.constexpr, TRAINING: tl.constexpr, FP64: tl.constexpr, MUL_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad (log_alpha's) from grad_out = dL/dz, or, if MASKED, from grad_out = dL/dw_eff,
    also writing grad_w (weight_ptr, grad_w_ptr and MUL_FP64 are unused otherwise)."""
    idx, inb, la, beta, gamma, zeta = _load_block(log_alpha_ptr, beta, gamma, zeta, n, FP64, BLOCK)
    # Gradient of the expected L0, already times group_size; read on the device so the
    # backward never syncs the host.
    gl0 = tl.load(grad_l0_ptr).to(la.dtype)
    s, y = _gate(la, seed, tl.load(offset_ptr), beta, gamma, zeta, TRAINING, BLOCK)
    if MASKED:
        z = _masked_z(y, log_alpha_ptr, MUL_FP64)
        g = tl.load(grad_out_ptr + idx, mask=inb, other=0.0).to(z.dtype)
        tl.store(grad_w_ptr + idx, (g * z).to(grad_w_ptr.dtype.element_ty), mask=inb)
        # w_eff = weight * z, so dL/dz = dL/dw_eff * weight.
        gz = (g * tl.load(weight_ptr + idx, mask=inb, other=0.0).to(z.dtype)).to(la.dtype)
    else:
        gz = tl.load(grad_out_ptr + idx, mask=inb, other=0.0).to(la.dtype)
    # dz/dlog_alpha: zero where the clamp is active.
    dz = tl.where((y > 0.0) & (y < 1.0), (zeta - gamma) * s * (1.0 - s) / beta, 0.0)
    p = _p_nonzero(la, beta, gamma, zeta)
    grad = gz * dz + gl0 * p * (1.0 - p)
    tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=inb)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_same_shape(what: str, t: torch.Tensor, log_alpha: torch.Tensor) -> None:
    # The kernels index every tensor by log_alpha's numel: a mismatch would read out of bounds.
    if t.shape != log_alpha.shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, log_alpha {tuple(log_alpha.shape)}")


def _mul_fp64(weight: torch.Tensor, log_alpha: torch.Tensor) -> bool:
    return torch.float64 in (weight.dtype, log_alpha.dtype)


def _launch_sample(log_alpha, weight, seed, offset, beta, gamma, zeta, training):
    """(out, per-program L0 partials): out = z, or weight * z when weight is given; the
    inputs contiguous and of one shape."""
    masked = weight is not None
    n = log_alpha.numel()
    n_blocks = (n + BLOCK - 1) // BLOCK
    out = torch.empty_like(weight if masked else log_alpha)
    partials = torch.empty(n_blocks, dtype=_acc_dtype(log_alpha.dtype), device=log_alpha.device)
    if n > 0:
        wrap_triton(_sample_kernel)[(n_blocks,)](
            log_alpha, weight if masked else log_alpha, out, partials, n, seed, offset, beta, gamma, zeta,
            MASKED=masked, TRAINING=training, FP64=log_alpha.dtype == torch.float64,
            MUL_FP64=masked and _mul_fp64(weight, log_alpha), BLOCK=BLOCK,
        )
    return out, partials


def _launch_backward(grad_out, grad_l0, log_alpha, weight, seed, offset, beta, gamma, zeta, training):
    """(grad log_alpha, grad_w or None): grad_out is z's gradient, or w_eff's when weight
    is given; grad_l0 already times group_size; the inputs contiguous and of one shape."""
    masked = weight is not None
    _check_same_shape("grad_w_eff" if masked else "grad_z", grad_out, log_alpha)
    if grad_l0.numel() != 1:  # the kernel reads its first element
        raise ValueError(f"grad_l0 must have one element, got shape {tuple(grad_l0.shape)}")
    n = log_alpha.numel()
    grad = torch.empty_like(log_alpha)
    grad_w = torch.empty_like(weight) if masked else None
    grad_l0 = grad_l0.to(_acc_dtype(log_alpha.dtype))
    if n > 0:
        wrap_triton(_backward_kernel)[((n + BLOCK - 1) // BLOCK,)](
            grad_out, grad_l0, log_alpha, weight if masked else log_alpha, grad, grad_w if masked else grad, n,
            seed, offset, beta, gamma, zeta,
            MASKED=masked, TRAINING=training, FP64=log_alpha.dtype == torch.float64,
            MUL_FP64=masked and _mul_fp64(weight, log_alpha), BLOCK=BLOCK,
        )
    return grad, grad_w


def sample(
    log_alpha: torch.Tensor, seed: int, offset: torch.Tensor, group_size: int,
    beta: float, gamma: float, zeta: float, training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, expected_l0) from one pass over log_alpha (any device Triton runs on; made
    contiguous, indices are row-major)."""
    z, partials = _launch_sample(log_alpha.contiguous(), None, seed, offset, beta, gamma, zeta, training)
    return z, partials.sum() * group_size


def backward(
    grad_z: torch.Tensor, grad_l0: torch.Tensor, log_alpha: torch.Tensor, seed: int,
    offset: torch.Tensor, group_size: int, beta: float, gamma: float, zeta: float, training: bool,
) -> torch.Tensor:
    """d(loss)/d(log_alpha) given the gradients of sample's two outputs."""
    # dL0/dlog_alpha_j = group_size * p_j (1 - p_j): fold group_size into the scalar here.
    return _launch_backward(grad_z.contiguous(), grad_l0 * group_size, log_alpha.contiguous(), None,
                            seed, offset, beta, gamma, zeta, training)[0]


def masked_sample(
    weight: torch.Tensor, log_alpha: torch.Tensor, seed: int, offset: torch.Tensor,
    beta: float, gamma: float, zeta: float, training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_eff, expected_l0): w_eff = weight * z in weight's dtype (contiguous), z the gates
    sample(log_alpha, seed, offset, 1, ...) draws; expected_l0 as sample returns it for
    group_size 1. One pass; z is never written."""
    _check_same_shape("weight", weight, log_alpha)
    w_eff, partials = _launch_sample(log_alpha.contiguous(), weight.contiguous(), seed, offset, beta, gamma, zeta,
                                     training)
    return w_eff, partials.sum()


def masked_backward(
    grad_w_eff: torch.Tensor, grad_l0: torch.Tensor, weight: torch.Tensor,
    log_alpha: torch.Tensor, seed: int, offset: torch.Tensor, beta: float, gamma: float, zeta: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_w, grad_log_alpha) given the gradients of masked_sample's two outputs:
    grad_w = grad_w_eff * z, and grad_log_alpha is backward()'s with
    grad_z = grad_w_eff * weight and group_size 1. One pass, z regenerated from
    (seed, offset)."""
    _check_same_shape("weight", weight, log_alpha)
    _check_same_shape("grad_w_eff", grad_w_eff, log_alpha)
    grad, grad_w = _launch_backward(grad_w_eff.contiguous(), grad_l0, log_alpha.contiguous(), weight.contiguous(),
                                    seed, offset, beta, gamma, zeta, training)
    return grad_w, grad
