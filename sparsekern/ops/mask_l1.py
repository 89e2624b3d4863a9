"""sigmoid_mask_l1: Continuous Sparsification's L1 penalty on a sigmoid mask,
Σ scale·σ(β·s) over the scores s, differentiable in s.

Why an op: the torch expression `scale * torch.sigmoid(beta * s).sum()` is three passes
forward, writing two score-sized temporaries and saving σ for the backward, and two passes
backward. Over ResNet-18's 11.2M scores (2-core machine) it took 29 ms forward and 11 ms
backward per step; here it is one pass each and autograd saves only s (a parameter).

Paths: CUDA runs the Triton kernels (kernels/mask_l1.py). On the CPU float32 runs the C++
kernels (csrc/cpu/mask_apply_cpu.cpp), with their autograd in C++ in eager mode; other
dtypes run the torch math. The result is 0-dim, float32 (float64 for float64 scores).
Oracle: reference.sigmoid_mask_l1.
"""
from __future__ import annotations

import torch

from .. import _checks
from .._extension import HAS_EXTENSION
from . import mask_math, reference
from ._library import cpp_op, fake

try:
    from ..kernels.mask_l1 import sigmoid_l1 as _triton_forward
    from ..kernels.mask_l1 import sigmoid_l1_backward as _triton_backward
except ImportError:  # no Triton installed: every device runs the torch math
    _triton_forward = _triton_backward = None

Tensor = torch.Tensor
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _forward_torch(scores, beta, scale):
    return reference.sigmoid_mask_l1(scores, beta, scale)


def _backward_torch(grad, scores, beta, scale):
    slope = mask_math.gate_slope(scores, "sigmoid", beta, scale, scores.dtype)  # scale·β·σ(βs)(1 − σ(βs))
    return (grad.to(slope.dtype) * slope).to(scores.dtype)


_cpp_forward = cpp_op("sigmoid_mask_l1", _forward_torch)
_cpp_backward = cpp_op("sigmoid_mask_l1_backward", _backward_torch)


@fake("sparsekern::sigmoid_mask_l1")
def _(scores, beta, scale):
    return scores.new_empty(())


@fake("sparsekern::sigmoid_mask_l1_backward")
def _(grad, scores, beta, scale):
    return torch.empty_like(scores)


def _cpp(scores: Tensor) -> bool:
    # The C++ kernels read memory in order: any dense layout (contiguous, channels_last).
    dense = scores.is_contiguous() or scores.is_contiguous(memory_format=torch.channels_last)
    return scores.device.type == "cpu" and scores.dtype == torch.float32 and dense


def _forward_cpu(scores, beta, scale):
    return _cpp_forward(scores, beta, scale) if _cpp(scores) else _forward_torch(scores, beta, scale)


def _backward_cpu(grad, scores, beta, scale):
    # Contiguous, as the Triton kernel's and the fake's: both paths here keep the scores'
    # layout (a transposed or channels_last gradient), which the fake does not describe.
    out = _cpp_backward(grad, scores, beta, scale) if _cpp(scores) else _backward_torch(grad, scores, beta, scale)
    return out.contiguous()


def _triton_path(t: Tensor) -> bool:
    return _triton_forward is not None and t.device.type == "cuda" and t.dtype != torch.float64


@torch.library.triton_op("sparsekern::sigmoid_mask_l1_op", mutates_args=())
def _op(scores: Tensor, beta: float, scale: float) -> Tensor:
    # torch.compile runs this body for every device (it bypasses the CPU kernel below).
    if not _triton_path(scores):
        return _forward_cpu(scores, beta, scale)
    return _triton_forward(scores, beta, scale)


@torch.library.triton_op("sparsekern::sigmoid_mask_l1_op_backward", mutates_args=())
def _backward_op(grad: Tensor, scores: Tensor, beta: float, scale: float) -> Tensor:
    if not _triton_path(scores):
        return _backward_cpu(grad, scores, beta, scale)
    return _triton_backward(grad, scores, beta, scale)


_op.register_kernel("cpu")(_forward_cpu)
_backward_op.register_kernel("cpu")(_backward_cpu)


@fake(_op)
def _(scores, beta, scale):
    return scores.new_empty((), dtype=_acc(scores.dtype))


@fake(_backward_op)
def _(grad, scores, beta, scale):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    scores, beta, scale = inputs
    ctx.save_for_backward(scores)  # σ is recomputed
    ctx.beta, ctx.scale = beta, scale


def _backward(ctx, grad):
    (scores,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
        slope = mask_math.gate_slope(scores, "sigmoid", ctx.beta, ctx.scale)
        return (grad * slope).to(scores.dtype), None, None
    return _backward_op(grad, scores, ctx.beta, ctx.scale), None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def sigmoid_mask_l1(scores: Tensor, beta: float = 1.0, scale: float = 1.0) -> Tensor:
    """Σ scale·σ(β·scores): the L1 norm of the sigmoid mask g = scale·σ(β·s) (g > 0 for
    scale > 0), as a 0-dim float32 tensor (float64 for float64 scores), differentiable in
    scores with d/ds = scale·β·σ(βs)(1 − σ(βs))."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"`scores` must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype not in _DTYPES:
        raise ValueError(f"`scores` must be floating point (float32/float16/bfloat16/float64), got {scores.dtype}")
    beta = _checks.finite("`beta`", beta)
    scale = _checks.finite("`scale`", scale)
    if HAS_EXTENSION and _cpp(scores) and not torch.compiler.is_compiling():
        # Eager CPU: the C++ kernels with their autograd in C++ (csrc/eager_autograd.cpp).
        return _cpp_forward(scores, beta, scale)
    return _op(scores, beta, scale)
