"""One-shot magnitude pruning + fine-tuning (Han et al. 2015), the baseline METHODS.md
ships beside IMP.

    train the dense model, then
    method = OneShot(model, sparsity=0.9)   # prunes now: exactly round(0.9 · N) weights
    ... fine-tune, calling method.step() after every opt.step() (the masks stay fixed) ...

Global ranking by |w| over every pruned layer, ties in the op's (layer, flat index) order.
Binary masks: pruned weights stay exactly 0 during fine-tuning.
"""
from __future__ import annotations

import torch

from ._magnitude import exclude_classifier, exact_keep_masks, set_masks, total_count
from .base import PruningMethod, check_real


class OneShot(PruningMethod):
    """OneShot(model, sparsity, include=None, exclude=None, ignore_classifier=False)

    Prunes round(sparsity · N) weights by global |w| at construction; the masks stay fixed
    while the model is fine-tuned (module docstring).
    """

    mask_kind = "binary"
    ranks_at_init = True

    def __init__(self, model, sparsity: float, include=None, exclude=None, ignore_classifier: bool = False):
        self.sparsity = check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
        exclude = exclude_classifier(model, exclude, ignore_classifier)
        self.ignore_classifier = ignore_classifier
        super().__init__(model, include=include, exclude=exclude)
        if self._awaiting_values:  # a meta model has no |w| to rank: the masks come from a checkpoint
            return
        with torch.no_grad():
            n_prune = round(self.sparsity * total_count(self.layers))
            set_masks(self.layers, exact_keep_masks([layer.weight for _, layer in self.layers], n_prune))
