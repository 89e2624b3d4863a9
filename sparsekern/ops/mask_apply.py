"""w_eff = weight ⊙ g(mask) and its backward on the CPU: the C++ kernels
(csrc/cpu/mask_apply_cpu.cpp) where the layout allows, the torch math of mask_math
elsewhere. These are the CPU kernels of masked_conv2d_weight and of masked_linear's weight
side; on CUDA the Triton kernels gate the weight themselves.

Why: the torch math is several passes, and float * bool takes ATen's dynamic-cast loop,
which does not vectorise. On a 512x512x3x3 weight (2.36M values, 2 threads) `w.mul_(m)`
took 1.22 ms against 0.23 ms for zero_masked_; the C++ kernels are one pass each.

Also `zero_masked_(weight, keep)`: weight *= keep in place, what the methods run after
every optimiser step to keep binary-masked weights exactly zero (C++ on CPU float32,
`weight.mul_(keep)` elsewhere).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._extension import HAS_EXTENSION
from . import mask_math
from ._library import cpp_op, fake

Tensor = torch.Tensor


def _apply_reference(weight, mask, kind, beta, scale):
    return mask_math.masked_weight(weight, mask, kind, beta, scale)


def _backward_reference(grad, weight, mask, kind, beta, scale, mask_grad):
    grad_w, grad_m = mask_math.weight_and_mask_grads(grad, weight, mask, kind, beta, scale, mask_grad)
    if grad_w is grad:
        grad_w = grad_w.clone()
    return grad_w, (mask.new_empty(0) if grad_m is None else grad_m)


def _zero_reference(weights, keeps):
    for weight, keep in zip(weights, keeps):
        weight.mul_(keep)


def _prune_state_reference(weight, keep):
    if bool(keep.all()):
        return torch.tensor(2)
    return torch.tensor(1 if bool(((weight == 0) | keep).all()) else 0)


def _apply_l1_reference(weight, mask, kind, beta, scale):
    g = mask_math.gate(mask, kind, beta, scale, weight.dtype)
    return (weight * g).to(weight.dtype), g.sum().float()


def _l1_backward_reference(grad, grad_l1, weight, mask, kind, beta, scale):
    grad_w, grad_m = mask_math.weight_and_mask_grads(grad, weight, mask, kind, beta, scale, True)
    slope = mask_math.gate_slope(mask, kind, beta, scale, weight.dtype)
    grad_m = (grad_m.to(slope.dtype) + grad_l1.to(slope.dtype) * slope).to(mask.dtype)
    return (grad_w.clone() if grad_w is grad else grad_w), grad_m


_apply_op = cpp_op("mask_apply", _apply_reference)
_apply_l1_op = cpp_op("mask_apply_l1", _apply_l1_reference)
_l1_backward_op = cpp_op("mask_apply_l1_backward", _l1_backward_reference)
_backward_op = cpp_op("mask_apply_backward", _backward_reference)
_zero_op = cpp_op("zero_masked_", _zero_reference)
_prune_state_op = cpp_op("binary_prune_state", _prune_state_reference)
_grad_mask_op = cpp_op("binary_grad_mask", lambda weight, keep: weight.alias())
_binary_weight_op = cpp_op("binary_masked_weight", lambda weight, keep: weight * keep)


@fake("sparsekern::mask_apply")
def _(weight, mask, kind, beta, scale):
    return torch.empty_like(weight)


@fake("sparsekern::mask_apply_backward")
def _(grad, weight, mask, kind, beta, scale, mask_grad):
    if mask_grad and kind in mask_math.LEARNABLE_KINDS:
        return torch.empty_like(weight), torch.empty_like(mask)
    return torch.empty_like(weight), mask.new_empty(0)


@fake("sparsekern::mask_apply_l1")
def _(weight, mask, kind, beta, scale):
    return torch.empty_like(weight), weight.new_empty((), dtype=torch.float32)


@fake("sparsekern::mask_apply_l1_backward")
def _(grad, grad_l1, weight, mask, kind, beta, scale):
    return torch.empty_like(weight), torch.empty_like(mask)


@fake("sparsekern::zero_masked_")
def _(weights, keeps):
    return None


@fake("sparsekern::binary_prune_state")
def _(weight, keep):
    return weight.new_empty((), dtype=torch.long)


@fake("sparsekern::binary_grad_mask")
def _(weight, keep):
    return weight.alias()


@fake("sparsekern::binary_masked_weight")
def _(weight, keep):
    return torch.empty_like(weight)


def cpp_layout(weight: Tensor, mask: Tensor, kind: str) -> bool:
    """Whether the C++ kernels take these tensors (see the .cpp header for the layouts)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not (weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)):
        return False
    if mask.dtype != (torch.bool if kind in mask_math.BOOL_KINDS else torch.float32):
        return False
    if mask.shape == weight.shape:
        return mask.stride() == weight.stride()
    rows = weight.shape[0] if weight.dim() else 0
    return (
        kind == "hard_concrete" and mask.dim() == weight.dim() and mask.numel() == rows
        and mask.shape[0] == rows and mask.is_contiguous()
        and (rows <= 1 or weight.stride(0) * rows == weight.numel())
    )


def masked_weight(weight: Tensor, mask: Tensor, kind: str, beta: float, scale: float) -> Tensor:
    """weight ⊙ g in weight's dtype and memory format (values only; no autograd)."""
    # The masked ops' CPU kernels reach here with `kind` unchecked when called directly
    # (torch.ops.sparsekern.masked_linear): an unknown kind took the float-gate branch.
    mask_math.check_kind(kind)
    if cpp_layout(weight, mask, kind):
        return _apply_op(weight, mask, kind, beta, scale)
    return mask_math.masked_weight(weight, mask, kind, beta, scale)


def weight_and_mask_grads(
    grad: Tensor, weight: Tensor, mask: Tensor, kind: str, beta: float, scale: float, mask_grad: bool
) -> tuple[Tensor, Optional[Tensor]]:
    """mask_math.weight_and_mask_grads: (grad_w, grad_mask or None); grad_w comes out in
    weight's memory format on the C++ path."""
    mask_math.check_kind(kind)  # as in masked_weight
    # Not for an empty weight: an empty grad's strides are arbitrary (expanded: (0, ...)),
    # and under torch.compile the stride comparison below is traced on other strides than
    # the grad has at run time, so the C++ kernel's stride check raised ValueError.
    if grad.dtype == torch.float32 and weight.numel() > 0 and cpp_layout(weight, mask, kind):
        if grad.stride() != weight.stride():  # e.g. a channels_last grad for a contiguous weight
            grad = torch.empty_like(weight).copy_(grad)
        grad_w, grad_m = _backward_op(grad, weight, mask, kind, beta, scale, mask_grad)
        return grad_w, (grad_m if mask_grad and kind in mask_math.LEARNABLE_KINDS else None)
    return mask_math.weight_and_mask_grads(grad, weight, mask, kind, beta, scale, mask_grad)


def eager_cpu(weight: Tensor, mask: Tensor, kind: str) -> bool:
    """Whether masked_weight_autograd takes this call: eager mode (torch.compile traces
    the masked ops, whose autograd is registered in Python), the C++ extension present
    (it holds the autograd) and a layout the C++ kernels take."""
    return HAS_EXTENSION and not torch.compiler.is_compiling() and cpp_layout(weight, mask, kind)


def masked_weight_autograd(weight: Tensor, mask: Tensor, kind: str, beta: float, scale: float) -> Tensor:
    """weight ⊙ g, differentiable w.r.t. weight and (learnable kinds) mask, with the
    autograd in C++ (csrc/eager_autograd.cpp): the masked ops' eager CPU path."""
    return _apply_op(weight, mask, kind, beta, scale)


L1_KINDS = ("sigmoid", "relaxed")


def masked_weight_l1(weight: Tensor, mask: Tensor, kind: str, beta: float, scale: float
                     ) -> Optional[tuple[Tensor, Tensor]]:
    """(weight ⊙ g, Σ g) for the sigmoid and relaxed kinds, both differentiable in weight
    and mask, from one C++ pass each way (sparsekern::mask_apply_l1): the masked weight and
    the gate's L1 norm (the CS and concave L1 penalties) of one layer's forward, with one
    autograd node. Eager CPU float32 in the C++ kernels' layout only; None elsewhere (use
    the masked op, and sum the gate separately)."""
    if kind in L1_KINDS and eager_cpu(weight, mask, kind) and mask.shape == weight.shape:
        return _apply_l1_op(weight, mask, kind, beta, scale)
    return None


def binary_weight(weight: Tensor, keep: Tensor) -> Optional[Tensor]:
    """weight ⊙ keep (bool keep) for a layer that uses it and lets it go, in eager CPU mode;
    None elsewhere (use the masked op). The C++ op binary_masked_weight decides from one
    read of keep (and of the weight where keep prunes something; binary_prune_state):
    nothing pruned -> the weight itself; every pruned weight exactly zero (±0; the methods
    keep them so) -> the weight aliased, its gradient G ⊙ keep (a C++ autograd node);
    else a new weight ⊙ keep. In the first two cases the layer saves the parameter for its
    backward instead of a weight-sized w_eff. Not for the public masked ops, whose result
    must not alias the weight."""
    if HAS_EXTENSION and weight.device.type == "cpu" and not torch.compiler.is_compiling():
        return _binary_weight_op(weight, keep)
    return None


def grad_masked(t: Tensor, keep: Tensor) -> Tensor:
    """t in value, with gradient G ⊙ keep (bool keep of t's shape): entries where keep is
    False get no gradient. Eager CPU: the C++ node binary_grad_mask (an alias of t, no
    Python in the backward); elsewhere where(keep, t, t.detach()), which compiles."""
    if eager_cpu(t, keep, "binary"):
        return _grad_mask_op(t, keep)
    return torch.where(keep, t, t.detach())


def zero_masked_(weight, keep) -> None:
    """weight *= keep (bool, weight's shape) in place. Also takes equal-length sequences
    of weights and keep-masks and zeroes them all, the C++-kernel pairs in one op call."""
    weights, keeps = (weight, keep) if isinstance(weight, (list, tuple)) else ([weight], [keep])
    if not isinstance(keeps, (list, tuple)) or len(keeps) != len(weights):
        raise TypeError("`keep` must be a sequence of as many tensors as `weight` when `weight` is a sequence")
    for w, k in zip(weights, keeps):  # all checked before anything changes
        for name, t in (("weight", w), ("keep", k)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if k.dtype != torch.bool or k.shape != w.shape:
            raise ValueError(f"`keep` must be a bool tensor of weight's shape {tuple(w.shape)}")
        if k.device != w.device:  # a meta keep was a silent no-op
            raise ValueError(f"`keep` must be on weight's device {w.device}, got {k.device}")
        # What mul_ refuses to write (several elements in one place), refused here, before
        # the C++ kernel has zeroed the other weights of the list.
        if any(st == 0 and n > 1 for st, n in zip(w.stride(), w.shape)):
            raise ValueError("`weight` must not be expanded (a stride-0 view): it cannot be written in place")
    cpp, other = [], []
    for w, k in zip(weights, keeps):
        (cpp if cpp_layout(w, k, "binary") else other).append((w, k))
    with torch.no_grad():
        if cpp:
            cpp_weights = [w for w, _ in cpp]
            _zero_op(cpp_weights, [k for _, k in cpp])
            # The C++ op has no ADInplaceOrView kernel, so nothing bumped the version counter
            # that autograd checks saved tensors against; do it here, as mul_ would.
            torch.autograd.graph.increment_version(cpp_weights)
        for w, k in other:
            w.mul_(k)
