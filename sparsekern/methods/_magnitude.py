"""Magnitude-pruning pieces shared by IMP, OneShot, GradualMagnitude and DPF.

Every global ranking goes through the shared exact top-k op (ops/threshold.py), never
torch.cat + sort. Here live only the two things the public `magnitude_masks` does not
give: an exact *count* (it takes a sparsity fraction, and round(fraction·N) cannot say
"prune all N"), and pruning among the weights a mask still keeps (pruned weights are
exactly 0, so they would win any |w| ranking and must not count).
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from .. import ops
from .base import check_bool


def exact_keep_masks(tensors: list[torch.Tensor], n_prune: int) -> list[torch.Tensor]:
    """Keep-masks with exactly `n_prune` False over all `tensors`, ranked by |x|, ties
    pruned in ascending (tensor index, flat index) order; NaN/Inf weights raise."""
    return ops.magnitude_masks(tensors, n_prune=int(n_prune))


def prune_remaining(weights: list[torch.Tensor], masks: list[torch.Tensor], n_prune: int) -> list[torch.Tensor]:
    """New masks = masks ∧ keep, where keep removes exactly `n_prune` of the weights the
    masks still keep, globally by |w|. The ranking runs on `w[mask]` (a 1-D copy per layer)
    so already-pruned weights are not candidates; boolean indexing keeps flat order, so
    ties break as the op breaks them on the full tensors."""
    remaining = [w.detach()[m] for w, m in zip(weights, masks)]
    n_remaining = sum(r.numel() for r in remaining)
    if not 0 <= n_prune <= n_remaining:
        raise ValueError(f"cannot prune {n_prune} of {n_remaining} remaining weights")
    if n_prune:
        keep = exact_keep_masks(remaining, n_prune)
    else:  # nothing to rank (and possibly nothing remaining at all)
        keep = [torch.ones_like(r, dtype=torch.bool) for r in remaining]
    new = []
    for m, k in zip(masks, keep):
        n = m.clone()
        n[m] = k
        new.append(n)
    return new


def classifier_name(model: nn.Module) -> str | None:
    """Name of the model's last nn.Linear in module order (open_lth's "fc"); in a model
    without one, its last nn.Conv2d (SqueezeNet classifies with a 1×1 conv: with nothing
    left dense, global ranking pruned all of its small-init weights and the model output
    zeros); None if neither."""
    last = {nn.Linear: None, nn.Conv2d: None}
    for n, m in model.named_modules():
        for kind in last:
            if n and isinstance(m, kind):
                last[kind] = n
    return last[nn.Linear] or last[nn.Conv2d]


def exclude_classifier(model, exclude, ignore_classifier: bool):
    """Checks `ignore_classifier`; when True, returns `exclude` plus an exact pattern for
    the classifier (classifier_name; unchanged when there is none). Malformed `exclude` values are
    passed through for sparsify to reject, a non-module `model` for the base."""
    check_bool("ignore_classifier", ignore_classifier)
    if not ignore_classifier or not isinstance(model, nn.Module):
        return exclude
    name = classifier_name(model)
    if name is None:
        return exclude
    pattern = re.compile(re.escape(name))  # exact: the name may contain glob characters
    if exclude is None:
        return [pattern]
    if isinstance(exclude, (str, re.Pattern)):
        return [exclude, pattern]
    try:
        return [*exclude, pattern]
    except TypeError:
        return exclude


@torch.no_grad()
def set_masks(layers, masks: list[torch.Tensor]) -> None:
    """Writes the new masks into the layers; binary-masked weights are zeroed now (the
    base's step() re-zeroes them only after each optimiser step)."""
    for (_, layer), m in zip(layers, masks):
        layer.weight_mask.copy_(m)
        if layer.mask.name == "binary":
            ops.zero_masked_(layer.weight, layer.weight_mask)


def pruned_count(layers) -> int:
    return sum(int((~layer.weight_mask).sum()) for _, layer in layers)


def total_count(layers) -> int:
    return sum(layer.weight.numel() for _, layer in layers)


class HistoryState:
    """Mixin (before PruningMethod in the bases): the method's `history`, a list of dicts
    of Python numbers, saved in and restored from the base's state_dict(); deep-copied
    both ways so a checkpoint never aliases the live list."""

    history: list[dict[str, Any]]

    def _extra_state(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history)}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        # Loaded unchecked, a None history failed only at the next update's append().
        history = extra["history"]
        if not (isinstance(history, list) and all(isinstance(entry, dict) for entry in history)):
            raise TypeError(f"state['extra']['history'] must be a list of dicts, got {type(history).__name__}")

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.history = copy.deepcopy(extra["history"])
