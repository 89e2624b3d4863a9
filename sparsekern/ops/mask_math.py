"""The mask kinds in plain PyTorch: what each maps its mask parameters to (g), its slope
(dg/dmask), the backward of w_eff = weight ⊙ g, and the argument checks the masked ops share.

This is the single written-down form of the table in DESIGN.md ("Masks"); the references,
the CPU paths and the Triton kernels (sparsekern/kernels/masked_conv.py holds its Triton
twin) all follow it:

| kind             | mask                                  | g            | grad_w | grad_mask            |
|------------------|---------------------------------------|--------------|--------|----------------------|
| binary           | bool, weight's shape                  | m            | G⊙m    | —                    |
| straight_through | bool, weight's shape                  | m            | G      | —                    |
| sigmoid          | float score s, weight's shape         | scale·σ(β·s) | G⊙g    | G⊙w⊙scale·β·σ'(β·s)  |
| relaxed          | float m ∈ [0, 1], weight's shape      | m            | G⊙m    | G⊙w                  |
| hard_concrete    | float gate z, broadcastable to weight | z            | G⊙z    | Σ_broadcast G⊙w      |

G = dL/dw_eff. For hard_concrete the gate z is already sampled (sampling it from log α is
another op; autograd composes the two), so its slope is 1 and its gradient is G⊙w summed
over the dimensions z is broadcast along.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks

KINDS = ("binary", "straight_through", "sigmoid", "relaxed", "hard_concrete")
BOOL_KINDS = frozenset({"binary", "straight_through"})
# Kinds whose mask is a float tensor that can receive a gradient.
LEARNABLE_KINDS = frozenset({"sigmoid", "relaxed", "hard_concrete"})
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def compute_dtype(mask: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    # float32 at least (16-bit gates are computed in float32, as the kernels do), float64
    # when the mask or the weight is.
    dtype = torch.promote_types(weight_dtype, torch.float32)
    return torch.promote_types(mask.dtype, dtype) if mask.is_floating_point() else dtype


def gate(mask: torch.Tensor, kind: str, beta: float = 1.0, scale: float = 1.0,
         weight_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """g for `kind` with the mask's shape, in float32, or float64 if the mask or the
    weight (weight_dtype) is float64."""
    dtype = compute_dtype(mask, weight_dtype)
    if kind == "sigmoid":
        return scale * torch.sigmoid(beta * mask.to(dtype))
    return mask.to(dtype)


def gate_slope(mask: torch.Tensor, kind: str, beta: float = 1.0, scale: float = 1.0,
               weight_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dg/dmask for a learnable `kind`: scale·β·σ(βs)(1−σ(βs)) for sigmoid, 1 otherwise
    (dtype as gate's)."""
    dtype = compute_dtype(mask, weight_dtype)
    if kind == "sigmoid":
        sig = torch.sigmoid(beta * mask.to(dtype))
        return (scale * beta) * sig * (1.0 - sig)
    return torch.ones_like(mask, dtype=dtype)


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, kind: str, beta: float = 1.0,
                  scale: float = 1.0) -> torch.Tensor:
    """w_eff = weight ⊙ g in weight's dtype, values only (the ops register its backward;
    reference.masked_weight is the differentiable oracle)."""
    if kind in BOOL_KINDS:
        return weight * mask
    return (weight * gate(mask, kind, beta, scale, weight.dtype)).to(weight.dtype)


def differentiable_grads(grad_w_eff: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, kind: str,
                         beta: float, scale: float, need_w: bool, need_m: bool
                         ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The backward of w_eff = weight ⊙ g(mask) as differentiable torch ops: for a backward
    with create_graph=True (double backward: Hessian-vector products as in GraSP, penalties
    on weight gradients, MAML), which records the backward so it can be differentiated
    again. The masked ops' backward kernels have no autograd of their own (a double
    backward through them raised, or on the CPU's C++ path silently lost the terms through
    the mask). Same values as weight_and_mask_grads."""
    if kind == "straight_through":
        return (grad_w_eff if need_w else None), None
    g = mask if kind in BOOL_KINDS else gate(mask, kind, beta, scale, weight.dtype)
    grad_w = (grad_w_eff * g).to(weight.dtype) if need_w else None
    grad_m = None
    if need_m and kind in LEARNABLE_KINDS:
        slope = gate_slope(mask, kind, beta, scale, weight.dtype)
        grad_m = (grad_w_eff * weight * slope).sum_to_size(mask.shape).to(mask.dtype)
    return grad_w, grad_m


# The hard-concrete backwards regenerate the noise inside their kernels; a differentiable
# version would need it as a tensor. Refused rather than silently first-order.
NO_HARD_CONCRETE_DOUBLE_BACKWARD = (
    "sparsekern: the hard-concrete gates have no double backward (a backward with create_graph=True that reaches "
    "log alpha, or the weight of an unstructured L0 layer): second-order terms through these gates are not supported")


def broadcast_dims(mask_shape, weight_shape) -> tuple[int, ...]:
    """The dimensions a mask of mask_shape is broadcast along to reach weight_shape."""
    return tuple(d for d, (m, w) in enumerate(zip(mask_shape, weight_shape)) if m == 1 and w != 1)


def weight_and_mask_grads(
    grad_w_eff: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    beta: float,
    scale: float,
    mask_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The backward of w_eff = weight ⊙ g(mask): (grad_w, grad_mask), grad_mask None unless
    mask_grad. grad_w has weight's dtype, grad_mask the mask's dtype and shape. Products
    are formed in float32 (float64 for float64 inputs), then rounded once."""
    if kind in BOOL_KINDS:
        # g is 0/1: G ⊙ m is exact in any dtype, and multiplying by the bool mask skips a
        # weight-sized float copy of it (a 512x512x3x3 conv weight on CPU: fwd+bwd
        # through the op went from 6.3 to 4.2 ms; native autograd takes 4.1 ms).
        grad_w = grad_w_eff if kind == "straight_through" else grad_w_eff * mask
        return grad_w.to(weight.dtype), None
    g = gate(mask, kind, beta, scale, weight.dtype)
    cdtype = g.dtype
    G = grad_w_eff.to(cdtype)
    grad_w = grad_w_eff if kind == "straight_through" else G * g
    grad_m = None
    if mask_grad and kind in LEARNABLE_KINDS:
        gm = G * weight.to(cdtype) * gate_slope(mask, kind, beta, scale, weight.dtype)
        dims = broadcast_dims(mask.shape, weight.shape)
        if dims:
            gm = gm.sum(dims, keepdim=True)
        grad_m = gm.to(mask.dtype)
    return grad_w.to(weight.dtype), grad_m


# --- argument checks shared by masked_linear and masked_conv2d_weight ----------------


def check_kind(kind) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"`kind` must be a str, one of {KINDS}, got {type(kind).__name__}")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    return kind


def check_real(name: str, value) -> float:
    return _checks.finite(f"`{name}`", value)


def check_tensor(name: str, t, *, float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float32/float16/bfloat16/float64, got {t.dtype}")


def check_mask(mask, weight: torch.Tensor, kind: str) -> None:
    """The mask's type, dtype, device and shape for `kind` (see the module table)."""
    check_tensor("mask", mask, float_only=False)
    if mask.device != weight.device:
        raise ValueError(f"`mask` must be on weight's device {weight.device}, got {mask.device}")
    if kind in BOOL_KINDS:
        if mask.dtype != torch.bool:
            raise TypeError(f"`mask` must be a bool tensor for kind={kind!r}, got {mask.dtype}")
    elif mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`mask` must be a float tensor for kind={kind!r}, got {mask.dtype}")
    if kind == "hard_concrete":
        ok = mask.dim() == weight.dim() and all(
            m == w or m == 1 for m, w in zip(mask.shape, weight.shape)
        )
        if not ok:
            raise ValueError(
                f"`mask` for kind='hard_concrete' must have weight's number of dimensions and "
                f"each size 1 or weight's (e.g. {tuple(weight.shape)} or "
                f"{(weight.shape[0],) + (1,) * (weight.dim() - 1)}), got {tuple(mask.shape)}"
            )
    elif mask.shape != weight.shape:
        raise ValueError(
            f"`mask` must have weight's shape {tuple(weight.shape)} for kind={kind!r}, "
            f"got {tuple(mask.shape)}"
        )


def check_common(weight, mask, kind, beta, scale, *, weight_dim: int) -> tuple[str, float, float]:
    """Checks what both masked ops share; returns (kind, beta, scale) normalised."""
    kind = check_kind(kind)
    beta = check_real("beta", beta)
    scale = check_real("scale", scale)
    check_tensor("weight", weight)
    if weight.dim() != weight_dim:
        raise ValueError(f"`weight` must be {weight_dim}-D, got shape {tuple(weight.shape)}")
    check_mask(mask, weight, kind)
    return kind, beta, scale
