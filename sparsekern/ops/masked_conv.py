"""masked_conv2d_weight: the conv weight under its mask, w_eff = weight ⊙ g, which the
module passes to F.conv2d. Every mask kind of mask_math.

Two torch.library ops, each a `triton_op` (CUDA: kernels/masked_conv.py) with the PyTorch
math registered as its CPU kernel:

- sparsekern::masked_conv2d_weight(weight, mask, ...) -> w_eff         (one write)
- sparsekern::masked_conv2d_weight_backward(grad_w_eff, weight, mask, ...)
      -> (grad_w, grad_mask)                                           (one pass)

The forward saves only its inputs (weight, mask), never w_eff or g: the backward
recomputes g, so no weight-sized tensor is kept beyond what conv itself saves.
w_eff and grad_w come out channels_last when the weight is (kernels.masked_conv.weight_format).
Oracle: reference.masked_conv2d_weight. float64 runs the PyTorch math on every device.
"""
from __future__ import annotations

import torch

from . import mask_apply, mask_math
from ._library import fake

try:
    from ..kernels.masked_conv import masked_weight, masked_weight_backward, weight_format
except ImportError:  # no Triton installed: every device runs the PyTorch math
    masked_weight = masked_weight_backward = None

    def weight_format(weight: torch.Tensor) -> torch.memory_format:
        if not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        return torch.contiguous_format


Tensor = torch.Tensor


def _triton_path(t: Tensor) -> bool:
    """Where the triton_op bodies launch kernels (CUDA, not float64); under torch.compile
    the bodies are traced for every device, so elsewhere they run the PyTorch math."""
    return masked_weight is not None and t.device.type == "cuda" and t.dtype != torch.float64


def _forward_torch(weight, mask, kind, beta, scale):
    w_eff = mask_apply.masked_weight(weight, mask, kind, beta, scale)
    return w_eff.contiguous(memory_format=weight_format(weight))


def _backward_torch(grad_w_eff, weight, mask, kind, beta, scale, mask_grad):
    grad_w, grad_m = mask_apply.weight_and_mask_grads(grad_w_eff, weight, mask, kind, beta, scale, mask_grad)
    fmt = weight_format(weight)
    if grad_m is None:
        grad_m = mask.new_empty(0)
    elif grad_m.shape == weight.shape:
        grad_m = grad_m.contiguous(memory_format=fmt)
    else:
        grad_m = grad_m.contiguous()
    grad_w = grad_w.contiguous(memory_format=fmt)
    if grad_w is grad_w_eff:  # straight-through: an op's output may not alias its input
        grad_w = grad_w.clone()
    return grad_w, grad_m


@torch.library.triton_op("sparsekern::masked_conv2d_weight", mutates_args=())
def _masked_weight_op(weight: Tensor, mask: Tensor, kind: str, beta: float, scale: float) -> Tensor:
    if not _triton_path(weight):
        return _forward_torch(weight, mask, kind, beta, scale)
    return masked_weight(weight, mask, kind, beta, scale)


@torch.library.triton_op("sparsekern::masked_conv2d_weight_backward", mutates_args=())
def _backward_op(
    grad_w_eff: Tensor, weight: Tensor, mask: Tensor, kind: str, beta: float, scale: float, mask_grad: bool
) -> tuple[Tensor, Tensor]:
    if not _triton_path(weight):
        return _backward_torch(grad_w_eff, weight, mask, kind, beta, scale, mask_grad)
    return masked_weight_backward(grad_w_eff, weight, mask, kind, beta, scale, mask_grad)


_masked_weight_op.register_kernel("cpu")(_forward_torch)
_backward_op.register_kernel("cpu")(_backward_torch)


@fake(_masked_weight_op)
def _(weight, mask, kind, beta, scale):
    mask_math.check_kind(kind)
    return torch.empty_like(weight, memory_format=weight_format(weight))


@fake(_backward_op)
def _(grad_w_eff, weight, mask, kind, beta, scale, mask_grad):
    mask_math.check_kind(kind)
    fmt = weight_format(weight)
    grad_w = torch.empty_like(weight, memory_format=fmt)
    if not (mask_grad and kind in mask_math.LEARNABLE_KINDS):
        return grad_w, mask.new_empty(0)
    if mask.shape == weight.shape:
        return grad_w, torch.empty_like(weight, dtype=mask.dtype, memory_format=fmt)
    return grad_w, mask.new_empty(mask.shape)


def _setup_context(ctx, inputs, output):
    weight, mask, kind, beta, scale = inputs
    ctx.save_for_backward(weight, mask)  # inputs only: g is recomputed
    ctx.kind, ctx.beta, ctx.scale = kind, beta, scale


def _backward(ctx, grad_w_eff):
    weight, mask = ctx.saved_tensors
    need_w, need_m = ctx.needs_input_grad[:2]
    need_m = need_m and ctx.kind in mask_math.LEARNABLE_KINDS
    if not (need_w or need_m):
        return None, None, None, None, None
    if ctx.kind == "straight_through":  # grad_w = G: nothing to compute, no mask grad
        return grad_w_eff, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
        return mask_math.differentiable_grads(grad_w_eff, weight, mask, ctx.kind, ctx.beta, ctx.scale,
                                              need_w, need_m) + (None, None, None)
    grad_w, grad_m = _backward_op(grad_w_eff, weight, mask, ctx.kind, ctx.beta, ctx.scale, need_m)
    return (grad_w if need_w else None), (grad_m if need_m else None), None, None, None


_masked_weight_op.register_autograd(_backward, setup_context=_setup_context)


def masked_conv2d_weight(
    weight: Tensor, mask: Tensor, *, kind: str, beta: float = 1.0, scale: float = 1.0
) -> Tensor:
    """w_eff = weight ⊙ g for a conv weight [out, in/groups, kh, kw]; the module then
    calls F.conv2d(x, w_eff, ...).

    mask: bool, weight's shape, for "binary"/"straight_through"; float, weight's shape,
    for "sigmoid" (scores; g = scale·σ(β·s)) and "relaxed"; for "hard_concrete" the
    sampled gate z of shape [out, 1, 1, 1] (one per output channel) or weight's shape.
    Gradients reach weight and (float kinds) the mask, per the table in mask_math.
    """
    kind, beta, scale = mask_math.check_common(weight, mask, kind, beta, scale, weight_dim=4)
    if mask_apply.eager_cpu(weight, mask, kind):
        return mask_apply.masked_weight_autograd(weight, mask, kind, beta, scale)
    return _masked_weight_op(weight, mask, kind, beta, scale)
