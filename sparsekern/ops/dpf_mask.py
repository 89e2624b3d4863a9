"""DPF (Lin et al. 2020) mask update: the new keep-masks from a magnitude threshold, with
the per-tensor numbers DPF reports (kept count, flips, IoU with the previous masks).

Two ops, both device-side end to end (no host sync): sparsekern::dpf_mask_update writes
keep = |w| > threshold and counts in the same pass; sparsekern::mask_flips only counts, for
masks made elsewhere, e.g. by magnitude_masks when an exact count under ties is needed.
CUDA: sparsekern/kernels/dpf_mask.py; CPU (and other devices): the reference.
Oracle: reference.dpf_mask_update / reference.mask_flips.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch

from . import reference
from ._library import fake
from ..kernels.dpf_mask import flips as _triton_flips
from ..kernels.dpf_mask import update as _triton_update

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@torch.library.triton_op("sparsekern::dpf_mask_update", mutates_args=())
def _update_op(
    weights: list[torch.Tensor], prev_masks: list[torch.Tensor], threshold: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    # torch.compile decomposes a triton_op by calling this body directly, bypassing the
    # CPU kernel registered below, so non-CUDA tensors are routed to the reference here too.
    if threshold.device.type != "cuda":
        return reference.dpf_mask_update(weights, prev_masks, threshold)
    return _triton_update(weights, prev_masks, threshold)


@torch.library.triton_op("sparsekern::mask_flips", mutates_args=())
def _flips_op(
    new_masks: list[torch.Tensor], prev_masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    if new_masks[0].device.type != "cuda":
        return reference.mask_flips(new_masks, prev_masks)
    return _triton_flips(new_masks, prev_masks)


_update_op.register_kernel("cpu")(reference.dpf_mask_update)
_flips_op.register_kernel("cpu")(reference.mask_flips)


def _counts_fake(tensors):
    return tuple(tensors[0].new_empty((len(tensors),), dtype=torch.int64) for _ in range(2))


@fake(_update_op)
def _update_fake(weights, prev_masks, threshold):
    masks = [w.new_empty(w.shape, dtype=torch.bool) for w in weights]
    return (masks, *_counts_fake(weights))


@fake(_flips_op)
def _flips_fake(new_masks, prev_masks):
    return _counts_fake(new_masks)


def _as_list(name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"`{name}` must be a list of tensors, not a single tensor (wrap it: [t])")
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"`{name}` must be a list of tensors, got {type(tensors).__name__}") from None
    if not tensors:
        raise ValueError(f"`{name}` must not be empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}[{i}]` must be a torch.Tensor, got {type(t).__name__}")
    return tensors


def _check_pairs(
    name: str, tensors: list[torch.Tensor], prev_masks, device: torch.device
) -> list[torch.Tensor]:
    """Validates prev_masks against `tensors` (called `name`): one bool mask of the same
    shape per tensor, everything on `device`."""
    prev_masks = _as_list("prev_masks", prev_masks)
    if len(prev_masks) != len(tensors):
        raise ValueError(
            f"`prev_masks` must have one mask per tensor in `{name}`: got {len(prev_masks)} "
            f"masks for {len(tensors)} tensors"
        )
    for label, group in ((name, tensors), ("prev_masks", prev_masks)):
        for i, t in enumerate(group):
            if t.device != device:
                raise ValueError(
                    f"all tensors must be on one device: `{name}[0]` is on {device}, "
                    f"`{label}[{i}]` on {t.device}"
                )
    for i, (t, m) in enumerate(zip(tensors, prev_masks)):
        if m.dtype != torch.bool:
            raise ValueError(f"`prev_masks[{i}]` must be a bool tensor, got {m.dtype}")
        if m.shape != t.shape:
            raise ValueError(
                f"`prev_masks[{i}]` has shape {tuple(m.shape)}, but `{name}[{i}]` has {tuple(t.shape)}"
            )
    return prev_masks


def dpf_mask_update(
    weights: Iterable[torch.Tensor],
    prev_masks: Iterable[torch.Tensor],
    threshold,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """DPF's periodic mask update in one pass per tensor: returns (masks, nnz, flips).

    masks[t] = |weights[t]| > threshold (bool, contiguous, the weight's shape); |w| is
    compared in float32, as magnitude_threshold ranks it. Ties at the threshold are
    pruned (and NaN weights), so with ties the kept count can fall short of the target
    density; for an exact count build the masks with magnitude_masks and count them with
    mask_flips instead.
    nnz[t] = masks[t].sum() and flips[t] = (masks[t] != prev_masks[t]).sum(), int64 [T].

    IoU of consecutive masks, from the counts alone (nnz_prev is the previous update's nnz):
        IoU = (nnz_prev + nnz - flips) / (nnz_prev + nnz + flips)
    since |A ∩ B| = (|A| + |B| - |A △ B|) / 2 and |A ∪ B| = (|A| + |B| + |A △ B|) / 2
    (mask_iou computes it, 1 when both masks are empty).

    threshold: a 0-dim float32 tensor on the weights' device (e.g. from
    magnitude_threshold), or a Python number. Nothing is read back to the host.
    """
    weights = _as_list("weights", weights)
    device = weights[0].device
    for i, w in enumerate(weights):
        if w.dtype not in _DTYPES:
            raise ValueError(
                f"`weights[{i}]` must be floating point (float32/float16/bfloat16/float64), got {w.dtype}"
            )
    prev_masks = _check_pairs("weights", weights, prev_masks, device)
    if isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
        if math.isnan(threshold):  # |w| > NaN is False everywhere: it pruned every weight
            raise ValueError("`threshold` is NaN")
        threshold = torch.tensor(float(threshold), dtype=torch.float32, device=device)
    if not isinstance(threshold, torch.Tensor):
        raise TypeError(f"`threshold` must be a 0-dim tensor or a number, got {type(threshold).__name__}")
    if threshold.dim() != 0 or threshold.dtype != torch.float32:
        raise ValueError(
            f"`threshold` must be a 0-dim float32 tensor, got shape {tuple(threshold.shape)} "
            f"and dtype {threshold.dtype}"
        )
    if threshold.device != device:
        raise ValueError(f"`threshold` must be on the weights' device {device}, got {threshold.device}")
    return _update_op([w.detach() for w in weights], prev_masks, threshold.detach())


def mask_flips(
    new_masks: Iterable[torch.Tensor], prev_masks: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nnz, flips) for masks built elsewhere (e.g. magnitude_masks, exact under ties):
    nnz[t] = new_masks[t].sum(), flips[t] = (new_masks[t] != prev_masks[t]).sum(), int64
    [T], one pass per mask, no host sync. IoU as in dpf_mask_update."""
    new_masks = _as_list("new_masks", new_masks)
    for i, m in enumerate(new_masks):
        if m.dtype != torch.bool:
            raise ValueError(f"`new_masks[{i}]` must be a bool tensor, got {m.dtype}")
    prev_masks = _check_pairs("new_masks", new_masks, prev_masks, new_masks[0].device)
    return _flips_op(new_masks, prev_masks)


def _count(name: str, value) -> torch.Tensor:
    """A count for mask_iou: a tensor as is, an int as a tensor. Anything else raised
    AttributeError (lists: [1] + [2] concatenated, then had no .double())."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return torch.tensor(int(value))
    raise TypeError(f"`{name}` must be a torch.Tensor or an int, got {type(value).__name__}")


def mask_iou(nnz_prev: torch.Tensor, nnz_new: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Intersection over union of consecutive masks from their counts (float64, per
    tensor): (nnz_prev + nnz_new - flips) / (nnz_prev + nnz_new + flips), 1 where both
    masks are empty. Elementwise; pass the counts summed over tensors for the global IoU."""
    nnz_prev, nnz_new, flips = _count("nnz_prev", nnz_prev), _count("nnz_new", nnz_new), _count("flips", flips)
    total = (nnz_prev + nnz_new).double()
    union = total + flips
    return torch.where(union > 0, (total - flips) / union.clamp(min=1), 1.0)
