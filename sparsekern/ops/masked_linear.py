"""masked_linear: y = x @ (weight ⊙ g).T + bias for every mask kind (table in mask_math).

Three torch.library ops, each a `triton_op` whose CUDA body launches the kernels in
kernels/masked_linear.py (w_eff never written) and whose CPU kernel, registered beside
it, is the PyTorch math of mask_math:

- sparsekern::masked_linear(x[M, in], weight, bias?, mask, ...) -> y[M, out]
- sparsekern::masked_linear_grad_input(grad_y, weight, mask, ...) -> grad_x   (same GEMM)
- sparsekern::masked_linear_grad_weight(grad_y, x, weight, mask, ...)
      -> (grad_w, grad_mask, grad_bias)   (one GEMM; mask/bias grads empty unless asked)

The forward saves only its inputs (x, weight, mask); the backward recomputes g.
Oracle: reference.masked_linear. float64 runs the PyTorch math on every device.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import mask_apply, mask_math, reference
from ._library import fake

try:
    from ..kernels.masked_linear import masked_linear_grad_weight, masked_matmul
except ImportError:  # no Triton installed: every device runs the PyTorch math
    masked_matmul = masked_linear_grad_weight = None

Tensor = torch.Tensor


def _triton_path(t: Tensor) -> bool:
    """Where the triton_op bodies launch kernels. Only CUDA tensors reach them in eager
    (CPU has its own registered kernel); under torch.compile the bodies are traced for
    every device, so they fall back to the PyTorch math themselves."""
    return masked_matmul is not None and t.device.type == "cuda" and t.dtype != torch.float64


# --- PyTorch math (the CPU kernels, and the fallback inside the Triton bodies) ----------


def _forward_torch(x, weight, bias, mask, kind, beta, scale):
    return F.linear(x, mask_apply.masked_weight(weight, mask, kind, beta, scale), bias).contiguous()


def _grad_input_torch(grad_y, weight, mask, kind, beta, scale):
    return (grad_y @ mask_apply.masked_weight(weight, mask, kind, beta, scale)).contiguous()


def _grad_weight_torch(grad_y, x, weight, mask, kind, beta, scale, mask_grad, bias_grad):
    # G in float32 (float64 for float64), as the kernel's accumulator, before the gates.
    cdtype = torch.promote_types(x.dtype, torch.float32)
    G = grad_y.to(cdtype).t() @ x.to(cdtype)
    grad_w, grad_m = mask_apply.weight_and_mask_grads(G, weight, mask, kind, beta, scale, mask_grad)
    grad_m = grad_m.contiguous() if grad_m is not None else mask.new_empty(0)
    grad_b = grad_y.sum(0) if bias_grad else grad_y.new_empty(0)
    return grad_w.contiguous(), grad_m, grad_b


# --- the ops --------------------------------------------------------------------------


@torch.library.triton_op("sparsekern::masked_linear", mutates_args=())
def _masked_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, kind: str, beta: float, scale: float
) -> Tensor:
    if not _triton_path(x):
        return _forward_torch(x, weight, bias, mask, kind, beta, scale)
    return masked_matmul(x, weight, mask, bias, kind, beta, scale, transpose_weight=True)


@torch.library.triton_op("sparsekern::masked_linear_grad_input", mutates_args=())
def _grad_input_op(grad_y: Tensor, weight: Tensor, mask: Tensor, kind: str, beta: float, scale: float) -> Tensor:
    if not _triton_path(grad_y):
        return _grad_input_torch(grad_y, weight, mask, kind, beta, scale)
    return masked_matmul(grad_y, weight, mask, None, kind, beta, scale, transpose_weight=False)


@torch.library.triton_op("sparsekern::masked_linear_grad_weight", mutates_args=())
def _grad_weight_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, mask: Tensor, kind: str, beta: float, scale: float,
    mask_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if not _triton_path(x):
        return _grad_weight_torch(grad_y, x, weight, mask, kind, beta, scale, mask_grad, bias_grad)
    return masked_linear_grad_weight(grad_y, x, weight, mask, kind, beta, scale, mask_grad, bias_grad)


_masked_linear_op.register_kernel("cpu")(_forward_torch)
_grad_input_op.register_kernel("cpu")(_grad_input_torch)
_grad_weight_op.register_kernel("cpu")(_grad_weight_torch)


@fake(_masked_linear_op)
def _(x, weight, bias, mask, kind, beta, scale):
    mask_math.check_kind(kind)
    return x.new_empty((x.shape[0], weight.shape[0]))


@fake(_grad_input_op)
def _(grad_y, weight, mask, kind, beta, scale):
    mask_math.check_kind(kind)
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1]))


@fake(_grad_weight_op)
def _(grad_y, x, weight, mask, kind, beta, scale, mask_grad, bias_grad):
    mask_math.check_kind(kind)
    grad_m = mask.new_empty(mask.shape if mask_grad and kind in mask_math.LEARNABLE_KINDS else (0,))
    grad_b = grad_y.new_empty((weight.shape[0],) if bias_grad else (0,))
    return weight.new_empty(weight.shape), grad_m, grad_b


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, kind, beta, scale = inputs
    ctx.save_for_backward(x, weight, mask)  # inputs only: g is recomputed
    ctx.kind, ctx.beta, ctx.scale = kind, beta, scale
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, need_b, need_m = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    need_m = need_m and ctx.kind in mask_math.LEARNABLE_KINDS
    grad_x = grad_w = grad_b = grad_m = None
    if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
        if need_x:
            grad_x = grad_y @ reference.masked_weight(weight, mask, ctx.kind, ctx.beta, ctx.scale)
        if need_w or need_m:
            grad_w, grad_m = mask_math.differentiable_grads(grad_y.t() @ x, weight, mask, ctx.kind, ctx.beta,
                                                            ctx.scale, need_w, need_m)
        grad_b = grad_y.sum(0) if need_b else None
        return grad_x, grad_w, grad_b, grad_m, None, None, None
    if need_x:
        grad_x = _grad_input_op(grad_y, weight, mask, ctx.kind, ctx.beta, ctx.scale)
    if need_w or need_m:
        gw, gm, gb = _grad_weight_op(grad_y, x, weight, mask, ctx.kind, ctx.beta, ctx.scale, need_m, need_b)
        grad_w = gw if need_w else None
        grad_m = gm if need_m else None
        grad_b = gb if need_b else None
    elif need_b:
        grad_b = grad_y.sum(0)
    return grad_x, grad_w, grad_b, grad_m, None, None, None


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, weight, bias, mask, kind, beta, scale, autocast: bool = False):
    kind, beta, scale = mask_math.check_common(weight, mask, kind, beta, scale, weight_dim=2)
    mask_math.check_tensor("x", x)
    if x.dtype != weight.dtype and not autocast:
        raise TypeError(f"`x` must have weight's dtype {weight.dtype}, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"`x` must be on weight's device {weight.device}, got {x.device}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"`x` must have in_features={weight.shape[1]} as its last dimension, got shape {tuple(x.shape)}"
        )
    if bias is not None:
        mask_math.check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"`bias` must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"`bias` must have weight's dtype {weight.dtype}, got {bias.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"`bias` must be on weight's device {weight.device}, got {bias.device}")
    return kind, beta, scale


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    mask: Tensor,
    *,
    kind: str,
    beta: float = 1.0,
    scale: float = 1.0,
) -> Tensor:
    """y = x @ (weight ⊙ g).T + bias, g the mask kind's gate (see mask_math).

    x: [..., in] (any leading dims, possibly none), weight: [out, in], bias: [out] or None,
    all one float dtype (float32/bfloat16/float16/float64). mask: bool [out, in] for
    "binary"/"straight_through"; float [out, in] for "sigmoid" (scores; g = scale·σ(β·s))
    and "relaxed"; for "hard_concrete" the sampled gate z of shape [out, in], [1, in] or
    [out, 1]. Gradients flow to x, weight, bias and (float kinds) the mask, per the table.
    On CUDA the GEMMs gate the weight tiles as they load them; w_eff is never stored.
    """
    # is_autocast_enabled raises for a device type autocast does not know (meta).
    autocast = (isinstance(x, Tensor) and torch.amp.is_autocast_available(x.device.type)
                and torch.is_autocast_enabled(x.device.type))
    kind, beta, scale = _check(x, weight, bias, mask, kind, beta, scale, autocast)
    if mask_apply.eager_cpu(weight, mask, kind):
        # Eager CPU: the GEMMs are oneDNN's either way; only the gate is ours, with its
        # autograd in C++ (see csrc/eager_autograd.cpp for why). Under torch.autocast too:
        # F.linear is then cast as nn.Linear's is.
        return F.linear(x, mask_apply.masked_weight_autograd(weight, mask, kind, beta, scale), bias)
    if autocast or (kind == "hard_concrete" and weight.device.type == "cpu" and not torch.compiler.is_compiling()):
        # torch.autocast runs a linear layer in its low-precision dtype, casting x, weight
        # and bias itself; nn.Linear leaves that to it, and so does this: w_eff is formed
        # in weight's dtype (the gate in float32, as everywhere) and F.linear then runs
        # as autocast runs any linear layer. (Before, the dtype check refused every
        # autocast forward: x came in bfloat16 from the layer before, the weight float32.)
        # The fused CUDA GEMM is not used there: its speed under autocast is unmeasured.
        # hard_concrete on the CPU: a gate per input neuron ([1, in], structured L0),
        # which the C++ kernels do not take: w ⊙ z by torch's own broadcasting mul, whose
        # autograd is this kind's (grad_w = G ⊙ z, grad_z = Σ_rows G ⊙ w). The custom
        # op's Python dispatch cost more than the layer: 300 -> 100 at batch 64, fwd +
        # bwd, 473 vs 140 µs (dense 93 µs).
        return F.linear(x, reference.masked_weight(weight, mask, kind, beta, scale), bias)
    lead = x.shape[:-1]
    # lead.numel(), not -1: with in_features = 0 the -1 was ambiguous and reshape raised.
    y = _masked_linear_op(x.reshape(lead.numel(), x.shape[-1]), weight, bias, mask, kind, beta, scale)
    return y.reshape(*lead, weight.shape[0])
