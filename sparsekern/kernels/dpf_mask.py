"""DPF mask update: keep = |w| > threshold, kept counts and flips against the previous
mask, in one pass per tensor.

One launch per tensor (a network has tens of prunable tensors and DPF updates every few
iterations, so launches are cheap; a pointer table would need a host-to-device copy and
is opaque to torch.compile). Counts are integer atomics into slot t of int64 buffers, so
they are exact and deterministic; the threshold is read from device memory, so nothing
waits on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK = 2048


@triton.jit
def _count(keep, prev_ptr, idx, inb, nnz_ptr, flips_ptr, t):
    """Adds this block's kept count and flips (keep != prev) to slot t."""
    prev = tl.load(prev_ptr + idx, mask=inb, other=0) != 0
    tl.atomic_add(nnz_ptr + t, tl.sum(keep.to(tl.int32), axis=0).to(tl.int64))
    tl.atomic_add(flips_ptr + t, tl.sum((keep != prev).to(tl.int32), axis=0).to(tl.int64))


@triton.jit
def _update_kernel(w_ptr, prev_ptr, threshold_ptr, mask_ptr, nnz_ptr, flips_ptr, t, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    # Compared in float32, as magnitude_threshold ranks |w|; ties and NaN are pruned.
    w = tl.load(w_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    keep = (tl.abs(w) > tl.load(threshold_ptr)) & inb
    tl.store(mask_ptr + idx, keep, mask=inb)
    _count(keep, prev_ptr, idx, inb, nnz_ptr, flips_ptr, t)


@triton.jit
def _flips_kernel(new_ptr, prev_ptr, nnz_ptr, flips_ptr, t, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    keep = tl.load(new_ptr + idx, mask=inb, other=0) != 0
    _count(keep, prev_ptr, idx, inb, nnz_ptr, flips_ptr, t)


def _check_pairs(tensors: list[torch.Tensor], prev_masks: list[torch.Tensor]) -> None:
    # The kernels read prev_masks[t] at every index of tensors[t]: a smaller one was read
    # out of bounds (raw torch.ops.sparsekern.* calls reach here unchecked).
    if len(prev_masks) != len(tensors):
        raise ValueError(f"`prev_masks` must have {len(tensors)} tensors, got {len(prev_masks)}")
    for t, (x, prev) in enumerate(zip(tensors, prev_masks)):
        if prev.shape != x.shape:
            raise ValueError(f"`prev_masks[{t}]` must have shape {tuple(x.shape)}, got {tuple(prev.shape)}")


def _counters(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    device = tensors[0].device
    return (torch.zeros(len(tensors), dtype=torch.int64, device=device),
            torch.zeros(len(tensors), dtype=torch.int64, device=device))


def update(
    weights: list[torch.Tensor], prev_masks: list[torch.Tensor], threshold: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(masks, nnz, flips) for same-shaped weights/prev_masks on one device and a 0-dim
    float32 threshold there."""
    _check_pairs(weights, prev_masks)
    if threshold.numel() != 1:
        raise ValueError(f"`threshold` must have one element, got shape {tuple(threshold.shape)}")
    nnz, flips = _counters(weights)
    masks = []
    for t, (w, prev) in enumerate(zip(weights, prev_masks)):
        mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        n = w.numel()
        if n > 0:
            wrap_triton(_update_kernel)[((n + BLOCK - 1) // BLOCK,)](
                w.contiguous(), prev.contiguous(), threshold, mask, nnz, flips, t, n, BLOCK=BLOCK
            )
        masks.append(mask)
    return masks, nnz, flips


def flips(new_masks: list[torch.Tensor], prev_masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(nnz, flips) for same-shaped bool masks on one device."""
    _check_pairs(new_masks, prev_masks)
    nnz, flips_ = _counters(new_masks)
    for t, (new, prev) in enumerate(zip(new_masks, prev_masks)):
        n = new.numel()
        if n > 0:
            wrap_triton(_flips_kernel)[((n + BLOCK - 1) // BLOCK,)](
                new.contiguous(), prev.contiguous(), nnz, flips_, t, n, BLOCK=BLOCK
            )
    return nnz, flips_
