"""Pure-PyTorch oracles for every op in `sparsekern.ops`, written for clarity.

Tests compare every backend against these; the op layer also falls back to them when
the compiled extension is missing.
"""
from __future__ import annotations

import torch


def magnitude_threshold(tensors: list[torch.Tensor], n_prune: int) -> torch.Tensor:
    """The n_prune-th smallest |x| (1-based) over all tensors, float32, 0-dim.

    0.0 when n_prune == 0; NaN when any value is NaN or Inf.
    """
    flat = torch.cat([t.detach().abs().flatten().float() for t in tensors])
    if not bool(torch.isfinite(flat).all()):
        return torch.tensor(float("nan"), device=flat.device)
    if n_prune == 0:
        return torch.zeros((), device=flat.device)
    return torch.kthvalue(flat, n_prune).values


def magnitude_masks(
    tensors: list[torch.Tensor], n_prune: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Keep-masks with exactly n_prune False: |x| < t pruned, |x| > t kept, and the ties
    |x| == t pruned in ascending (tensor index, flat index) order until n_prune is met."""
    threshold = magnitude_threshold(tensors, n_prune)
    if n_prune == 0 or not bool(torch.isfinite(threshold)):
        return [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in tensors], threshold
    mags = [t.detach().abs().float() for t in tensors]
    ties_to_prune = n_prune - sum(int((m < threshold).sum()) for m in mags)
    masks, ties_before = [], 0
    for m in mags:
        tie = (m == threshold).flatten()
        rank = ties_before + torch.cumsum(tie.long(), 0) - 1  # rank among all ties so far
        keep = (m.flatten() > threshold) | (tie & (rank >= ties_to_prune))
        masks.append(keep.reshape(m.shape))
        ties_before += int(tie.sum())
    return masks, threshold
