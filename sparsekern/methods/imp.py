"""IMP: iterative magnitude pruning with rewinding (Frankle & Carbin; open_lth), METHODS.md "IMP".

    method = IMP(model, prune_fraction=0.2, rewind_iteration=k)
    for level in range(levels):
        opt = torch.optim.SGD(method.param_groups(lr=0.1, weight_decay=1e-4), momentum=0.9)
        ... train, calling method.step() after every opt.step() ...
        method.end_round()   # prune round(0.2 · remaining), rewind to iteration k

Each level removes exactly round(prune_fraction · n_remaining) of the weights still kept,
globally by |w| over every pruned layer (ties in the op's (layer, flat index) order);
mask_new = mask_old ∧ keep. The base then rewinds bit-exactly to the iterate saved at
`rewind_iteration` (0: the init, a winning ticket; k > 0: a matching ticket) and zeroes
the pruned weights; build a fresh optimiser with the lr schedule advanced to k.
Binary masks: pruned weights get no gradient and the base's step() keeps them exactly 0
under momentum and weight decay.
"""
from __future__ import annotations

from typing import Any

from ._magnitude import HistoryState, exclude_classifier, prune_remaining, pruned_count, set_masks, total_count
from .base import PruningMethod, check_real


class IMP(HistoryState, PruningMethod):
    """IMP(model, prune_fraction=0.2, rewind_iteration=0, include=None, exclude=None,
    ignore_classifier=False)

    Iterative magnitude pruning with rewinding: the module docstring has the usage and
    what each end_round() prunes; `history` holds one entry per level.
    """

    mask_kind = "binary"
    round_based = True

    def __init__(self, model, prune_fraction: float = 0.2, rewind_iteration: int = 0,
                 include=None, exclude=None, ignore_classifier: bool = False):
        self.prune_fraction = check_real("prune_fraction", prune_fraction, low=0.0, high=1.0,
                                         low_open=True, high_open=True)
        # open_lth leaves `fc` dense for VGG / LeNet.
        exclude = exclude_classifier(model, exclude, ignore_classifier)
        self.ignore_classifier = ignore_classifier
        super().__init__(model, include=include, exclude=exclude, rewind_iteration=rewind_iteration)
        # One entry per level: what end_round() pruned and the density it left.
        self.history: list[dict[str, Any]] = []

    def _prune_round(self) -> None:
        total = total_count(self.layers)
        remaining = total - pruned_count(self.layers)
        n_prune = round(self.prune_fraction * remaining)
        weights = [layer.weight for _, layer in self.layers]
        masks = [layer.weight_mask for _, layer in self.layers]
        set_masks(self.layers, prune_remaining(weights, masks, n_prune))
        self.history.append({"round": self.round, "iteration": self.iteration, "remaining": remaining,
                             "pruned": n_prune, "density": (remaining - n_prune) / total})
