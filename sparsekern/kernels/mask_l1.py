"""Continuous Sparsification's L1 penalty on a sigmoid mask (Savarese et al. 2020): for
scores s (any shape), the gate is g = scale * sigmoid(beta * s) and the penalty is sum(g).

- `sigmoid_l1`: the penalty in one pass over the scores, never writing the gates (torch's
  `(scale * torch.sigmoid(beta * s)).sum()` materialises three score-sized temporaries).
- `sigmoid_l1_backward`: dpenalty/ds = grad * scale * beta * sig * (1 - sig), with
  sig = sigmoid(beta * s), in one pass; grad (the penalty's gradient) is read on the
  device, so the backward never syncs the host.

Inputs are made contiguous. Math runs in float32 (float64 for float64 scores); beta and
scale arrive as float32 kernel scalars, so float64 results carry their float32 rounding.
The penalty is returned in the compute dtype, the gradient in scores' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK = 1024


@triton.jit
def _load_block(scores_ptr, beta, scale, n, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's flat indices, their in-bounds mask, sig = sigmoid(beta * s) there,
    and beta and scale, all in the compute dtype (float64 for float64 input, else float32)."""
    compute = tl.float64 if FP64 else tl.float32
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    s = tl.load(scores_ptr + idx, mask=inb, other=0.0).to(compute)
    beta = tl.cast(beta, compute)
    scale = tl.cast(scale, compute)
    return idx, inb, tl.sigmoid(beta * s), beta, scale


@triton.jit
def _forward_kernel(scores_ptr, partial_ptr, n, beta, scale, FP64: tl.constexpr, BLOCK: tl.constexpr):
    _, inb, sig, _, scale = _load_block(scores_ptr, beta, scale, n, FP64, BLOCK)
    # One partial per program, summed by the launcher in a fixed order (float atomics
    # would make the sum run-to-run nondeterministic).
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(inb, scale * sig, 0.0), axis=0))


@triton.jit
def _backward_kernel(
    grad_ptr, scores_ptr, out_ptr, n, beta, scale, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    idx, inb, sig, beta, scale = _load_block(scores_ptr, beta, scale, n, FP64, BLOCK)
    g = tl.load(grad_ptr).to(sig.dtype)
    out = g * scale * beta * sig * (1.0 - sig)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=inb)


def _n_blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def sigmoid_l1(scores: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """sum(scale * sigmoid(beta * scores)) as a 0-dim tensor: float64 for float64 scores,
    else float32."""
    scores = scores.contiguous()
    n = scores.numel()
    acc = torch.promote_types(scores.dtype, torch.float32)
    partials = torch.empty(_n_blocks(n), dtype=acc, device=scores.device)
    if n > 0:
        wrap_triton(_forward_kernel)[(_n_blocks(n),)](
            scores, partials, n, beta, scale, FP64=scores.dtype == torch.float64, BLOCK=BLOCK,
        )
    return partials.sum()


def sigmoid_l1_backward(grad: torch.Tensor, scores: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """d(grad * sigmoid_l1(scores, beta, scale))/d(scores), in scores' shape and dtype
    (contiguous); grad is the penalty's gradient, a one-element tensor on scores' device."""
    if grad.numel() != 1:
        raise ValueError(f"grad must have one element, got shape {tuple(grad.shape)}")
    scores = scores.contiguous()
    n = scores.numel()
    out = torch.empty_like(scores)
    if n > 0:
        wrap_triton(_backward_kernel)[(_n_blocks(n),)](
            grad, scores, out, n, beta, scale, FP64=scores.dtype == torch.float64, BLOCK=BLOCK,
        )
    return out
