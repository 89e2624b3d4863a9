"""Registration helpers shared by every C++-backed op.

The C++ schemas live in csrc/sparsekern.cpp. When the extension is missing, the same
schemas are defined here with the reference as the kernel for every device, so fakes,
torch.compile and the public wrappers work unchanged. test_ops_library.py checks that
these strings equal the compiled ones.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

from .._extension import HAS_EXTENSION

CPP_SCHEMAS = {
    "magnitude_threshold": "magnitude_threshold(Tensor[] tensors, int n_prune) -> Tensor",
    "magnitude_masks": "magnitude_masks(Tensor[] tensors, int n_prune) -> (Tensor[], Tensor)",
    "philox_uniform_": "philox_uniform_(Tensor(a!) out, int seed, Tensor offset) -> ()",
    "mask_apply": "mask_apply(Tensor weight, Tensor mask, str kind, float beta, float scale) -> Tensor",
    "mask_apply_backward": "mask_apply_backward(Tensor grad, Tensor weight, Tensor mask, str kind, "
    "float beta, float scale, bool mask_grad) -> (Tensor, Tensor)",
    "zero_masked_": "zero_masked_(Tensor(a!)[] weights, Tensor[] keeps) -> ()",
    "binary_prune_state": "binary_prune_state(Tensor weight, Tensor keep) -> Tensor",
    "binary_grad_mask": "binary_grad_mask(Tensor(a) weight, Tensor keep) -> Tensor(a)",
    "binary_masked_weight": "binary_masked_weight(Tensor(a) weight, Tensor keep) -> Tensor(a)",
    "sigmoid_mask_l1": "sigmoid_mask_l1(Tensor scores, float beta, float scale) -> Tensor",
    "sigmoid_mask_l1_backward": "sigmoid_mask_l1_backward(Tensor grad, Tensor scores, float beta, float scale) -> Tensor",
    "mask_apply_l1": "mask_apply_l1(Tensor weight, Tensor mask, str kind, float beta, float scale) -> (Tensor, Tensor)",
    "mask_apply_l1_backward": "mask_apply_l1_backward(Tensor grad, Tensor grad_l1, Tensor weight, Tensor mask, "
    "str kind, float beta, float scale) -> (Tensor, Tensor)",
    "hard_concrete_sample_fused": (
        "hard_concrete_sample_fused(Tensor log_alpha, int seed, Tensor offset, int group_size, float beta, "
        "float gamma, float zeta, bool training) -> (Tensor, Tensor)"
    ),
    "hard_concrete_sample_fused_backward": (
        "hard_concrete_sample_fused_backward(Tensor grad_z, Tensor grad_l0, Tensor log_alpha, int seed, "
        "Tensor offset, int group_size, float beta, float gamma, float zeta, bool training) -> Tensor"
    ),
    "hard_concrete_masked_weight_fused": (
        "hard_concrete_masked_weight_fused(Tensor weight, Tensor log_alpha, int seed, Tensor offset, float beta, "
        "float gamma, float zeta, bool training) -> (Tensor, Tensor)"
    ),
    "hard_concrete_masked_weight_fused_backward": (
        "hard_concrete_masked_weight_fused_backward(Tensor grad, Tensor grad_l0, Tensor weight, Tensor log_alpha, "
        "int seed, Tensor offset, float beta, float gamma, float zeta, bool training, Tensor? w_eff=None) "
        "-> (Tensor, Tensor)"
    ),
}

# A FRAGMENT, not a DEF: the Triton ops add to the same namespace.
_fallback_lib = None if HAS_EXTENSION else torch.library.Library("sparsekern", "FRAGMENT")


def cpp_op(name: str, reference: Callable) -> torch._ops.OpOverloadPacket:
    """The torch.ops.sparsekern.<name> packet; defines it from the reference if the
    compiled extension is missing."""
    if _fallback_lib is not None:
        _fallback_lib.define(CPP_SCHEMAS[name])
        _fallback_lib.impl(name, reference, "CompositeExplicitAutograd")
    return getattr(torch.ops.sparsekern, name)


def fake(op) -> Callable:
    """Decorator: registers the function as the fake impl of `op` (a "sparsekern::name"
    string or a triton_op), behind a check that every tensor argument is on one device
    (ValueError naming the first one that is not).

    Why: the dispatcher runs the Meta kernel, which is the fake, whenever any argument is
    a meta tensor. Called with the others on the CPU, every op returned the fake's
    uninitialised CPU tensor as its result, silently (mask_apply with a meta mask: values
    like 4e-25 and 2e-18; binary_prune_state: the "state" 94024749947941), where aten ops
    raise. Under torch.compile the same check refuses mixed devices at trace time. The
    public functions in sparsekern.ops check devices themselves; this covers the
    torch.ops.sparsekern.* ops called directly."""
    def register(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            first = None
            for name, value in signature.bind(*args, **kwargs).arguments.items():
                items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
                for i, t in items:
                    if not isinstance(t, torch.Tensor):
                        continue
                    label = name if i is None else f"{name}[{i}]"
                    if first is None:
                        first = (label, t.device)
                    elif t.device != first[1]:
                        raise ValueError(f"`{label}` must be on `{first[0]}`'s device {first[1]}, got {t.device}")
            return fn(*args, **kwargs)

        if isinstance(op, str):
            torch.library.register_fake(op)(checked)
        else:
            op.register_fake(checked)
        return fn
    return register
