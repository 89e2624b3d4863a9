"""hard_concrete_masked_weight: a weight under unstructured hard-concrete gates,
w_eff = weight ⊙ z(log α; seed, offset), and the expected L0, from one pass; the backward
gives grad_w and grad log α from one pass, with z regenerated from (seed, offset) or, by
the float32 CPU kernel, read back from w_eff.

Why a fused op: the two-op path (hard_concrete_sample writes z, the masked op multiplies)
stores z, a weight-sized tensor, and the masked op's autograd keeps it until the backward;
its backward writes grad_z for the gates' backward to read. Here z exists only in
registers: autograd saves weight and log α, which are parameters and kept anyway, and the
output w_eff, which the conv or linear it feeds keeps for its own backward anyway
(DESIGN.md: "hard-concrete: from the Philox seed and offset, never a stored u or z").
Structured gates ([out,1,1,1] / [1,in]) are tiny and keep the two-op path.

Reading z back departs from DESIGN.md's "recompute g from the params" (still no stored u
or z): on the CPU the regenerating backward spends most of its time on the Philox noise,
a log and a sigmoid per gate, and z = w_eff / w needs none of them. It is exact to 2 ulp
wherever |w| is not tiny (csrc/cpu/hard_concrete_cpu.cpp, backward_recovered_body, says
when; other blocks regenerate). ResNet-18's 21 gated weights (11.2M gates) one after
another, tuned allocator, 2-core machine, median of 9: 16.8 -> 10.4 ms per backward.
16-bit w_eff has lost z's precision and regenerates; the Triton kernel regenerates too
(on a GPU the noise costs less than reading another tensor).

Paths: CUDA runs the Triton kernels (kernels/hard_concrete.py masked_sample /
masked_backward). On the CPU, float32/float16/bfloat16 run the fused C++ kernels
(csrc/cpu/hard_concrete_cpu.cpp) with their autograd in C++ in eager mode; float64 and
other devices run the torch math. z is the same stream as hard_concrete_sample's for the
same (seed, offset) (log α's flat row-major index), kept in float32 (float64 for float64)
for the product, so w_eff is rounded once, to weight's dtype. w_eff is contiguous.
Oracle: reference.hard_concrete_masked_weight.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._extension import HAS_EXTENSION
from . import hard_concrete as hc
from . import mask_math
from ._library import cpp_op, fake

try:
    from ..kernels.hard_concrete import masked_backward as _triton_backward
    from ..kernels.hard_concrete import masked_sample as _triton_sample
except ImportError:  # no Triton installed: every device runs the torch math
    _triton_sample = _triton_backward = None

Tensor = torch.Tensor


# --- the torch math: float64, devices without a kernel, the C++ ops' fallback ------------


def _forward_torch(weight, log_alpha, seed, offset, beta, gamma, zeta, training):
    acc = hc._acc_dtype(log_alpha.dtype)
    z, l0 = hc._sample_torch(log_alpha.to(acc), seed, offset, 1, beta, gamma, zeta, training)
    return (weight.to(acc) * z).to(weight.dtype).contiguous(), l0


def _backward_torch(grad, grad_l0, weight, log_alpha, seed, offset, beta, gamma, zeta, training, w_eff=None):
    # w_eff (the forward's output) is the C++ kernel's shortcut to z; the math regenerates z.
    acc = hc._acc_dtype(log_alpha.dtype)
    la = log_alpha.to(acc)
    z, _ = hc._sample_torch(la, seed, offset, 1, beta, gamma, zeta, training)
    grad = grad.to(acc)
    grad_la = hc._backward_torch(grad * weight.to(acc), grad_l0, la, seed, offset, 1, beta, gamma, zeta, training)
    return (grad * z).to(weight.dtype).contiguous(), grad_la.to(log_alpha.dtype).contiguous()


_fused_forward = cpp_op("hard_concrete_masked_weight_fused", _forward_torch)
_fused_backward = cpp_op("hard_concrete_masked_weight_fused_backward", _backward_torch)


@fake("sparsekern::hard_concrete_masked_weight_fused")
def _fused_forward_fake(weight, log_alpha, seed, offset, beta, gamma, zeta, training):
    return torch.empty_like(weight, memory_format=torch.contiguous_format), log_alpha.new_empty((), dtype=torch.float32)


@fake("sparsekern::hard_concrete_masked_weight_fused_backward")
def _backward_fake(grad, grad_l0, weight, log_alpha, seed, offset, beta, gamma, zeta, training, w_eff=None):
    # Also the fake of the triton_op's backward below: same arguments, same results.
    fmt = torch.contiguous_format
    return torch.empty_like(weight, memory_format=fmt), torch.empty_like(log_alpha, memory_format=fmt)


def _cpu_fused(weight: Tensor, log_alpha: Tensor) -> bool:
    return hc._fused(log_alpha) and weight.dtype == log_alpha.dtype


def _forward_cpu(weight, log_alpha, seed, offset, beta, gamma, zeta, training):
    if _cpu_fused(weight, log_alpha):
        return _fused_forward(weight, log_alpha, seed, offset, beta, gamma, zeta, training)
    return _forward_torch(weight, log_alpha, seed, offset, beta, gamma, zeta, training)


def _backward_cpu(grad, grad_l0, weight, log_alpha, seed, offset, beta, gamma, zeta, training, w_eff=None):
    if _cpu_fused(weight, log_alpha):
        return _fused_backward(grad, grad_l0, weight, log_alpha, seed, offset, beta, gamma, zeta, training, w_eff)
    return _backward_torch(grad, grad_l0, weight, log_alpha, seed, offset, beta, gamma, zeta, training)


def _triton_path(t: Tensor) -> bool:
    return _triton_sample is not None and t.device.type == "cuda" and t.dtype != torch.float64


# --- the ops ----------------------------------------------------------------------------


@torch.library.triton_op("sparsekern::hard_concrete_masked_weight", mutates_args=())
def _op(
    weight: Tensor, log_alpha: Tensor, seed: int, offset: Tensor, beta: float, gamma: float, zeta: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    # torch.compile runs this body for every device (it bypasses the CPU kernel below).
    if not _triton_path(log_alpha):
        return _forward_cpu(weight, log_alpha, seed, offset, beta, gamma, zeta, training)
    return _triton_sample(weight, log_alpha, seed, offset, beta, gamma, zeta, training)


@torch.library.triton_op("sparsekern::hard_concrete_masked_weight_backward", mutates_args=())
def _backward_op(
    grad: Tensor, grad_l0: Tensor, weight: Tensor, log_alpha: Tensor, seed: int, offset: Tensor,
    beta: float, gamma: float, zeta: float, training: bool, w_eff: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    # w_eff: the forward's output, from which the CPU float32 kernel reads z back (the
    # Triton kernel regenerates it: on a GPU the Philox costs less than another read).
    if not _triton_path(log_alpha):
        return _backward_cpu(grad, grad_l0, weight, log_alpha, seed, offset, beta, gamma, zeta, training, w_eff)
    return _triton_backward(grad, grad_l0, weight, log_alpha, seed, offset, beta, gamma, zeta, training)


_op.register_kernel("cpu")(_forward_cpu)
_backward_op.register_kernel("cpu")(_backward_cpu)


@fake(_op)
def _(weight, log_alpha, seed, offset, beta, gamma, zeta, training):
    w_eff = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return w_eff, log_alpha.new_empty((), dtype=hc._acc_dtype(log_alpha.dtype))


fake(_backward_op)(_backward_fake)


def _setup_context(ctx, inputs, output):
    weight, log_alpha, seed, offset, *args = inputs
    # No z: the output w z, which the conv or linear it feeds saves anyway, gives it back.
    # The offset is saved too: changed in place before the backward, it raises (kept in
    # ctx, it silently regenerated other noise).
    ctx.save_for_backward(weight, log_alpha, output[0], offset)
    ctx.seed, ctx.args = seed, args


def _backward(ctx, grad, grad_l0):
    weight, log_alpha, w_eff, offset = ctx.saved_tensors
    if torch.is_grad_enabled():
        raise RuntimeError(mask_math.NO_HARD_CONCRETE_DOUBLE_BACKWARD)
    if grad is None:  # an output that did not reach the loss contributes zero
        grad = torch.zeros_like(weight)
    if grad_l0 is None:
        grad_l0 = log_alpha.new_zeros((), dtype=hc._acc_dtype(log_alpha.dtype))
    grad_w, grad_la = _backward_op(grad, grad_l0, weight, log_alpha, ctx.seed, offset, *ctx.args, w_eff)
    need_w, need_la = ctx.needs_input_grad[:2]
    return (grad_w if need_w else None, grad_la if need_la else None, None, None) + (None,) * len(ctx.args)


_op.register_autograd(_backward, setup_context=_setup_context)


# --- the public function ----------------------------------------------------------------


def hard_concrete_masked_weight(
    weight: Tensor,
    log_alpha: Tensor,
    seed: int,
    offset: int | Tensor,
    *,
    training: bool = True,
    beta: float = hc.BETA,
    gamma: float = hc.GAMMA,
    zeta: float = hc.ZETA,
) -> tuple[Tensor, Tensor]:
    """(weight ⊙ z, expected L0) for unstructured gates: log_alpha has weight's shape,
    dtype and device; z = hard_concrete_gates(log_alpha, seed, offset, training=...) and
    the expected L0 = hard_concrete_l0(log_alpha), both from one pass and differentiable
    in weight and log_alpha. Saved for the backward: weight, log_alpha and the returned
    weight ⊙ z (which a conv or linear taking it keeps anyway), no z and no noise."""
    beta, gamma, zeta = hc._check(log_alpha, beta, gamma, zeta)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}")
    if weight.shape != log_alpha.shape:
        raise ValueError(
            f"`log_alpha` must have weight's shape {tuple(weight.shape)} (one gate per weight), "
            f"got {tuple(log_alpha.shape)}"
        )
    if weight.dtype != log_alpha.dtype:
        raise TypeError(f"`weight` must have log_alpha's dtype {log_alpha.dtype}, got {weight.dtype}")
    if weight.device != log_alpha.device:
        raise ValueError(f"`weight` must be on log_alpha's device {log_alpha.device}, got {weight.device}")
    seed = hc._check_int("seed", seed, 0)
    offset = hc.offset_tensor(offset, log_alpha)
    if not isinstance(training, bool):
        raise TypeError(f"`training` must be a bool, got {type(training).__name__}")
    return masked_weight_checked(weight, log_alpha, seed, offset, training, beta, gamma, zeta)


def masked_weight_checked(weight, log_alpha, seed, offset, training, beta, gamma, zeta):
    """hard_concrete_masked_weight for arguments already validated (HardConcreteMask's;
    see hard_concrete.sample_checked)."""
    if HAS_EXTENSION and _cpu_fused(weight, log_alpha) and not torch.compiler.is_compiling():
        # Eager CPU: the fused kernels with their autograd in C++ (csrc/eager_autograd.cpp).
        return _fused_forward(weight, log_alpha, seed, offset, beta, gamma, zeta, training)
    return _op(weight, log_alpha, seed, offset, beta, gamma, zeta, training)
