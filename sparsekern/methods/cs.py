"""Continuous Sparsification (Savarese et al., NeurIPS 2020; METHODS.md).

Every masked weight gets a score s (init s0); the soft mask is g = scale·σ(β·s) with
scale = 1/σ(s0) when `scale_init` (so g = 1 at init). The loss gets λ·Σ g over the masked
layers. Within a round β follows β_T^(t/T) per epoch; between rounds the scores are
soft-reset and the weights rewound. The search ends with the binary mask 1[s > 0] and a
ticket trained from the rewound weights:

    method = ContinuousSparsification(model, epochs_per_round=E, rewind_iteration=k)
    for round in range(R):
        opt = build(method.param_groups(lr=0.1, weight_decay=1e-4))    # fresh each round
        for epoch in range(E):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y) + method.penalty()
                opt.zero_grad(); loss.backward(); opt.step(); method.step()
            method.end_epoch()              # anneals β
        if round < R - 1:
            method.end_round()              # soft reset of s, β ← 1, weights rewound
    method.to_ticket()                      # binary masks 1[s > 0], weights rewound
    ... train the ticket with the same loop (penalty() is 0 now) ...
    small = method.export().model

CS cannot hit an exact sparsity: λ, s0 and the number of rounds only steer it. Read the
achieved density from density() (the support s > 0).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..nn import export as export_model
from ..nn import sparse_modules
from ..nn.export import Exported
from ..nn.masks import S0_MIN, BinaryMask
from . import schedules
from ._state import check_mask_values, check_state
from .base import PruningMethod, check_bool, check_choice, check_epochs_per_round, check_real, sum_terms

SOFT_RESETS = ("paper", "code")


@torch.no_grad()
def _binarize(layer: nn.Module) -> None:
    """Turns a sigmoid-masked layer into a binary-masked one with support s > 0, in place
    (same module object, same weight Parameter; the score Parameter is dropped)."""
    keep = layer.weight_score.detach() > 0
    del layer.weight_score
    layer.mask = BinaryMask()
    layer.mask.attach(layer)
    layer.weight_mask.copy_(keep)


class ContinuousSparsification(PruningMethod):
    """ContinuousSparsification(model, *, epochs_per_round, lam=1e-8, s0=0.0,
    beta_final=200.0, soft_reset="paper", scale_init=True, mask_lr=0.1,
    rewind_iteration=0, include=None, exclude=None)

    lam: λ of the penalty λ·Σ scale·σ(β·s) — the authors' code sums the mask *with* its
      1/σ(s0) scale and does not normalise by the number of weights (λ = 1e-8 there).
    s0: initial score (code default 0.0; a negative s0, e.g. −0.1, gives sparser tickets).
    beta_final: β_T, the temperature reached in the round's last epoch.
    epochs_per_round: T + 1, the number of end_epoch() calls in a round (β = β_T^(t/T)).
    soft_reset: "paper" s ← min(β_T·s, s0) between rounds (the soft mask σ(s) at β = 1
      then equals the round's final σ(β_T·s) wherever s < s0), or "code" s ← min(s, s0)
      (the authors' code resets β to 1 before its prune()).
    scale_init: divide the gate by σ(s0) so it starts at 1.
    mask_lr: lr of the score group (code: SGD lr 0.1; never weight-decayed).
    rewind_iteration: the optimiser step the weights are rewound to (0: initial weights;
      the code rewinds to epoch 2).
    include / exclude: layer patterns, as in sparsify() (the code masks the 3×3 convs only).
    """

    mask_kind = "sigmoid"
    round_based = True
    default_mask_lr = 0.1

    def __init__(self, model: nn.Module, *, epochs_per_round: int, lam: float = 1e-8, s0: float = 0.0,
                 beta_final: float = 200.0, soft_reset: str = "paper", scale_init: bool = True,
                 mask_lr: float = 0.1, rewind_iteration: int = 0, include=None, exclude=None):
        self.lam = check_real("lam", lam, low=0.0)
        s0 = check_real("s0", s0, low=S0_MIN)
        # β_T < 1 would soften the mask over a round: the opposite of the continuation path.
        self.beta_final = check_real("beta_final", beta_final, low=1.0)
        self.epochs_per_round = check_epochs_per_round(epochs_per_round)
        self.soft_reset = check_choice("soft_reset", soft_reset, SOFT_RESETS)
        scale_init = check_bool("scale_init", scale_init)
        self.default_mask_lr = check_real("mask_lr", mask_lr, low=0.0, low_open=True)
        self.s0 = s0
        self.beta = 1.0
        self.ticket = False  # True after to_ticket(): binary masks, no penalty, no rounds
        super().__init__(model, include=include, exclude=exclude, rewind_iteration=rewind_iteration,
                         mask_options={"s0": s0, "scale_init": scale_init, "beta": 1.0})

    # ---- the temperature
    def _set_beta(self, beta: float) -> None:
        self.beta = beta
        if not self.ticket:
            for _, layer in self.layers:
                layer.mask.set_beta(layer, beta)

    def _after_epoch(self) -> None:
        if not self.ticket:
            self._set_beta(schedules.exponential_beta(self.epoch, self.epochs_per_round, self.beta_final))

    # ---- the loss term
    def penalty(self) -> torch.Tensor:
        """λ·Σ_layers Σ scale·σ(β·s): the authors' code sums the gates as the layers use
        them, scale included. 0 in the ticket phase (the code's term is a constant there)."""
        if self.ticket or self.lam == 0.0:
            return self.model_zero()
        return self.lam * sum_terms([layer.mask.l1(layer) for _, layer in self.layers])

    # ---- between rounds
    @torch.no_grad()
    def _prune_round(self) -> None:
        if self.ticket:
            raise RuntimeError("end_round() after to_ticket(): the search is over")
        # The paper multiplies by the temperature the round ended at (β_T after a full round).
        factor = self.beta if self.soft_reset == "paper" else 1.0
        for _, layer in self.layers:
            s = layer.weight_score
            s.copy_(torch.clamp(s * factor, max=self.s0))
        self._set_beta(1.0)

    # ---- the result of the search
    @torch.no_grad()
    def final_mask(self) -> dict[str, torch.Tensor]:
        """{layer name: bool tensor 1[s > 0]}: CS's binary mask (in the ticket phase, the
        binary masks the ticket trains with)."""
        if self.ticket:
            return {name: layer.weight_mask.clone() for name, layer in self.layers}
        return {name: layer.weight_score.detach() > 0 for name, layer in self.layers}

    @torch.no_grad()
    def to_ticket(self) -> None:
        """Ends the search and starts ticket training: every layer's sigmoid mask becomes a
        binary mask with support s > 0 (in place: same modules, same weight Parameters),
        and the weights are rewound to `rewind_iteration` with that mask applied
        (w_eff = w ⊙ 1[s > 0]; grad_w = G ⊙ mask, so pruned weights never move). Build a
        fresh optimiser afterwards: the score Parameters are gone. No soft reset happens
        here. Counts as the end of a round (round += 1, epoch = 0)."""
        if self.ticket:
            raise RuntimeError("to_ticket() was already called")
        if self._rewind_state is None:
            raise RuntimeError(f"to_ticket() before the rewind point: iteration {self.iteration} < "
                               f"rewind_iteration {self.rewind_iteration}")
        for _, layer in self.layers:
            _binarize(layer)
        self.ticket = True
        self.beta = 1.0
        self.rewind()  # copies θ_k back and multiplies by the binary masks
        self.round += 1
        self.epoch = 0

    def export_ticket(self, purge: bool = False, example_input=None, *, scaled: bool = False) -> Exported:
        """Plain torch modules computing w ⊙ 1[s > 0] with the *current* weights, leaving
        this method and its model unchanged (export() of a search-phase model would bake
        the soft gate scale·σ(β·s) instead). scaled=True multiplies by scale = 1/σ(s0) as
        the authors' ticket forward does, so the exported model matches the search model's
        β → ∞ limit. In the ticket phase this is export() (`scaled` has no effect)."""
        check_bool("scaled", scaled)
        if self.ticket:
            return self.export(purge=purge, example_input=example_input)
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for _, layer in sparse_modules(model):
                if layer.mask.name == "sigmoid":
                    scale = layer.mask.scale
                    _binarize(layer)
                    if scaled:
                        layer.weight.mul_(scale)
        return export_model(model, purge=purge, example_input=example_input)

    def density(self) -> dict[str, Any]:
        """The support s > 0 (1[mask] in the ticket phase): {"global", "layers"}, plus β.
        Read it at the end of a round: with s0 ≤ 0 every score starts (and, after a soft
        reset, every kept score restarts) at s0, so the support is empty there although the
        soft gate of those weights is 1."""
        report = super().density()
        report["beta"] = self.beta
        return report

    # ---- checkpointing
    def _extra_state(self) -> dict[str, Any]:
        return {"beta": self.beta, "ticket": self.ticket}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        check_real("state['extra']['beta']", extra["beta"], low=1.0)
        check_bool("state['extra']['ticket']", extra["ticket"])
        if self.ticket and not extra["ticket"]:
            raise ValueError("state is from the search phase, this method is in the ticket phase")

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._set_beta(extra["beta"])

    def _check_state(self, state: Any) -> None:
        if not self._ticket_state(state):
            return super()._check_state(state)
        # The layers will be binarized first: the state holds a binary mask per layer.
        masks = {f"{name}.weight_mask": layer.weight.shape for name, layer in self.layers}
        check_state(self, state, masks, noisy=set())
        check_mask_values(state["masks"], {k: torch.empty((), dtype=torch.bool) for k in masks})

    def _ticket_state(self, state: Any) -> bool:
        """A ticket-phase state for this search-phase method."""
        return (not self.ticket and isinstance(state, dict) and isinstance(state.get("extra"), dict)
                and state["extra"].get("ticket") is True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A ticket-phase checkpoint holds binary masks: convert the fresh search-phase
        # layers first (once the whole state has passed its checks) so the mask entries
        # line up (their values are then copied in).
        self._check_state(state)
        if self._ticket_state(state):
            for _, layer in self.layers:
                _binarize(layer)
            self.ticket = True
        self._load_checked(state)  # checked once, above

