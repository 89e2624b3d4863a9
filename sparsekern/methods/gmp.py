"""Gradual magnitude pruning (Zhu & Gupta 2017; DPF's "Incremental" baseline), METHODS.md "IMP".

    method = GradualMagnitude(model, sparsity=0.9, end_iteration=T, frequency=100)
    ... train, calling method.step() after every opt.step() ...

At every update point t (start_iteration, start_iteration + frequency, ... up to
end_iteration, and end_iteration itself) the total pruned count is raised to exactly
round(s_t · N) with s_t = schedules.zhu_gupta(t, final_sparsity=sparsity,
end=end_iteration, start=start_iteration, initial_sparsity=initial_sparsity). The new
weights to prune are chosen among the remaining ones by |w| (global, the shared op), so
masks are monotone: a pruned weight never comes back. Binary masks keep it exactly 0.
The update for start_iteration = 0 happens at construction.
"""
from __future__ import annotations

from typing import Any

import torch

from ._magnitude import HistoryState, exclude_classifier, prune_remaining, pruned_count, set_masks, total_count
from .base import PruningMethod, check_int, check_real
from .schedules import zhu_gupta


class GradualMagnitude(HistoryState, PruningMethod):
    """GradualMagnitude(model, sparsity, end_iteration, start_iteration=0, frequency=100,
    initial_sparsity=0.0, include=None, exclude=None, ignore_classifier=False)

    Zhu & Gupta's cubic schedule from initial_sparsity at start_iteration to sparsity at
    end_iteration, updated every `frequency` steps, masks monotone (module docstring);
    `history` holds one entry per update.
    """

    mask_kind = "binary"
    ranks_at_init = True

    def __init__(self, model, sparsity: float, end_iteration: int, start_iteration: int = 0,
                 frequency: int = 100, initial_sparsity: float = 0.0, include=None, exclude=None,
                 ignore_classifier: bool = False):
        self.sparsity = check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
        # s_i ≤ s_f keeps the schedule non-decreasing, which monotone masks need.
        self.initial_sparsity = check_real("initial_sparsity", initial_sparsity, low=0.0, high=self.sparsity)
        self.start_iteration = check_int("start_iteration", start_iteration)
        self.end_iteration = check_int("end_iteration", end_iteration, low=self.start_iteration + 1)
        self.frequency = check_int("frequency", frequency, low=1)
        exclude = exclude_classifier(model, exclude, ignore_classifier)
        self.ignore_classifier = ignore_classifier
        super().__init__(model, include=include, exclude=exclude)
        # One entry per update point: iteration, target sparsity, achieved density.
        self.history: list[dict[str, Any]] = []
        if not self._awaiting_values:  # a meta model has no |w| to rank
            self._after_step()  # the update at iteration 0 when the schedule starts there

    def target_sparsity(self, iteration: int) -> float:
        return zhu_gupta(iteration, final_sparsity=self.sparsity, end=self.end_iteration,
                         start=self.start_iteration, initial_sparsity=self.initial_sparsity)

    def is_update(self, iteration: int) -> bool:
        if not self.start_iteration <= iteration <= self.end_iteration:
            return False
        return (iteration - self.start_iteration) % self.frequency == 0 or iteration == self.end_iteration

    @torch.no_grad()
    def _after_step(self) -> None:
        t = self.iteration
        if not self.is_update(t):
            return
        s = self.target_sparsity(t)
        total = total_count(self.layers)
        # Only the difference to the target is pruned, among the remaining weights.
        n_prune = max(0, round(s * total) - pruned_count(self.layers))
        weights = [layer.weight for _, layer in self.layers]
        masks = [layer.weight_mask for _, layer in self.layers]
        set_masks(self.layers, prune_remaining(weights, masks, n_prune))
        pruned = pruned_count(self.layers)
        self.history.append({"iteration": t, "sparsity": s, "pruned": pruned, "density": 1.0 - pruned / total})
