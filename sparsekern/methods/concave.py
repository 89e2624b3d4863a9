"""Concave regularisers on a relaxed mask (Fracastoro et al.; METHODS.md).

Each masked weight gets m ∈ [0, 1] (init m0 = 1/2), w_eff = m ⊙ θ, and the loss gets
λ·Σ r(m_i) with r(m) = m (ℓ1) or r_ε(m) = log((m+ε)/ε) / log((1+ε)/ε) (log). m is kept in
[0, 1] by projection after every step (the base's step() calls the mask's project()).
At the end of each round the entries with m < α are pruned for good — m = 0 and never
revived — and θ is rewound while m is carried over (Algorithm 1 of the paper).
reparameterization="sigmoid" is the paper's ablation m = σ(β·s) with CS's β schedule:

    method = ConcaveRegularization(model, reparameterization="sigmoid", epochs_per_round=E)
    ... the same loop, with method.end_epoch() after each of the E epochs of a round ...

The relaxed m (the default):

    method = ConcaveRegularization(model, regularizer="log")
    for round in range(3):
        opt = build(method.param_groups(lr=0.1, weight_decay=1e-4))    # fresh each round
        ... train: loss + method.penalty(); opt.step(); method.step() ...
        method.end_round()          # m < α → 0 for good, θ rewound, m carried over
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import ops
from ..nn.masks import S0_MIN
from ..ops import mask_math
from . import schedules
from ._state import check_tensors
from .base import PruningMethod, check_choice, check_epochs_per_round, check_int, check_real, sum_terms

REGULARIZERS = ("l1", "log")
DEFAULT_LAM = {"l1": 3e-6, "log": 1e-6}  # the paper's CIFAR runs
REPARAMETERIZATIONS = ("none", "sigmoid")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class ConcaveRegularization(PruningMethod):
    """ConcaveRegularization(model, *, regularizer="l1", lam=None, eps=0.1, alpha=0.01,
    prune_fraction=None, m0=0.5, reparameterization="none", epochs_per_round=None,
    beta_final=200.0, rewind_iteration=0, include=None, exclude=None)

    regularizer: "l1" (r(m) = m) or "log" (r_ε, normalised so r_ε(1) = 1).
    lam: λ (default 3e-6 for l1, 1e-6 for log, the paper's values; not normalised by the
      number of weights).
    eps: ε of the log regulariser.
    alpha: end-of-round threshold: m < α → 0 for good (ours: 0.01; the paper gives none).
    prune_fraction: the paper's fixed-percentage ablation: instead of the α threshold,
      prune exactly round(prune_fraction · n_alive) of the still-alive entries with the
      smallest m (globally over the layers) each round.
    m0: initial mask value.
    reparameterization: the paper's other ablation (its Fig. 9). "none": m itself is
      learnt, by projected gradient. "sigmoid": m = σ(β·s) with a learnt score s (init
      logit(m0), so m = m0) and β = β_T^(t/T) raised over each round's epochs t = 0..T as in
      Continuous Sparsification; no projection (m is in (0, 1) by construction). Rounds end
      as with m: m < α pruned for good (s = −inf, so m = 0 exactly and its gradient 0), m
      carried over (s ← β_T·s with β back to 1), weights rewound.
    epochs_per_round: T + 1, the end_epoch() calls in a round (needed by "sigmoid" only;
      `sparsekern train` passes --epochs).
    beta_final: β_T of "sigmoid" (the paper: 200).
    """

    mask_kind = "relaxed"
    round_based = True

    def __init__(self, model: nn.Module, *, regularizer: str = "l1", lam: float | None = None,
                 eps: float = 0.1, alpha: float = 0.01, prune_fraction: float | None = None,
                 m0: float = 0.5, reparameterization: str = "none", epochs_per_round: int | None = None,
                 beta_final: float = 200.0, rewind_iteration: int = 0, include=None, exclude=None):
        self.regularizer = check_choice("regularizer", regularizer, REGULARIZERS)
        self.lam = DEFAULT_LAM[regularizer] if lam is None else check_real("lam", lam, low=0.0)
        self.eps = check_real("eps", eps, low=0.0, low_open=True)
        self.alpha = check_real("alpha", alpha, low=0.0, high=1.0)
        self.prune_fraction = None if prune_fraction is None else check_real(
            "prune_fraction", prune_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        self.reparameterization = check_choice("reparameterization", reparameterization, REPARAMETERIZATIONS)
        self.sigmoid = self.reparameterization == "sigmoid"
        # Unused by the relaxed m (sparsekern train passes --epochs to every round-based method).
        if epochs_per_round is not None:
            epochs_per_round = (check_epochs_per_round(epochs_per_round) if self.sigmoid
                                else check_int("epochs_per_round", epochs_per_round, low=1))
        self.epochs_per_round = epochs_per_round
        self.beta_final = check_real("beta_final", beta_final, low=1.0)
        if self.sigmoid:
            if self.epochs_per_round is None:
                raise ValueError("`epochs_per_round` is required with reparameterization='sigmoid': "
                                 "β rises from 1 to beta_final over a round's epochs")
            # logit(m0) ≥ S0_MIN: σ(s0) stays a normal float32 (see masks.S0_MIN).
            m0 = check_real("m0", m0, low=_sigmoid(S0_MIN), high=1.0, high_open=True)
            self.mask_kind = "sigmoid"
            options = {"s0": math.log(m0) - math.log1p(-m0), "scale_init": False, "beta": 1.0, "support": "nonzero"}
        else:
            m0 = check_real("m0", m0, low=0.0, high=1.0)
            options = {"m0": m0}
        self.beta = 1.0
        super().__init__(model, include=include, exclude=exclude, rewind_iteration=rewind_iteration,
                         mask_options=options)
        # Each layer's `weight_alive`: the entries not pruned at a round's end, updated in
        # place by end_round and replaced by load_state_dict, both then calling _sync_alive.
        # Dead entries get no gradient and are re-zeroed after every step, so momentum,
        # weight decay or an optimiser's running state cannot revive them. A buffer of the
        # layer, so model.to(device) moves it with m: a dict of tensors held here stayed on
        # the device the method was attached on, and after model.to("cuda") the forward's
        # gradient masking and end_round's `alive &= m >= α` mixed devices. Not persistent:
        # the model's state_dict keeps its keys, and the method's holds it (extra.alive).
        for _, layer in self.layers:
            layer.register_buffer("weight_alive", torch.ones_like(layer.weight, dtype=torch.bool), persistent=False)
        self._sync_alive()

    @property
    def alive(self) -> dict[str, torch.Tensor]:
        """{layer name: bool tensor of the weight's shape, False where pruned for good}: the
        layers' `weight_alive` buffers themselves, not copies."""
        return {name: layer.weight_alive for name, layer in self.layers}

    def _sync_alive(self) -> None:
        """A layer with a dead entry gets its gradient masked by alive (RelaxedMask.grad_keep:
        a C++ node of the forward's graph, not a Python hook on m, which at batch 32 cost
        ~40 us of interpreter time per layer and step; see csrc/eager_autograd.cpp) and its
        dead entries re-zeroed after each step. A layer with none (all of them in the first
        round) skips both: there is nothing to mask. Sigmoid: a dead entry's score is −inf
        instead: its gate and gradient are exactly 0, and no finite optimiser update moves it."""
        self._dead_layers = []  # the layers, not their buffers: model.to() replaces those
        for _, layer in self.layers:
            alive = layer.weight_alive
            # Meta (a model built under torch.device("meta")): no values to read; all alive at attach.
            has_dead = not alive.is_meta and not bool(alive.all())
            if self.sigmoid:
                if has_dead:
                    with torch.no_grad():
                        layer.weight_score.masked_fill_(~alive, -math.inf)
                continue
            layer.mask.has_dead = has_dead
            if has_dead:
                self._dead_layers.append(layer)

    def _m(self, layer: nn.Module) -> torch.Tensor:
        """m, differentiable (dead entries: no gradient)."""
        if self.sigmoid:
            # In the gate's compute dtype (float32 at least), as the layers' forward and the
            # export form it: a bfloat16 β·s was rounded before the sigmoid, and α-pruning
            # kept entries whose gate in the model was below α.
            s = layer.weight_score
            return torch.sigmoid(self.beta * s.to(mask_math.compute_dtype(s, layer.weight.dtype)))
        return layer.mask.op_mask(layer)[0]

    def _after_epoch(self) -> None:
        if self.sigmoid:
            self._set_beta(schedules.exponential_beta(self.epoch, self.epochs_per_round, self.beta_final))

    def _set_beta(self, beta: float) -> None:
        self.beta = beta
        for _, layer in self.layers:
            layer.mask.set_beta(layer, beta)

    def penalty(self) -> torch.Tensor:
        """λ·Σ r(m) over the masked layers (dead entries have m = 0 and r(0) = 0)."""
        if self.regularizer == "l1":  # Σ m: the layers' forwards computed it (RelaxedMask.l1)
            return self.lam * sum_terms([layer.mask.l1(layer) for _, layer in self.layers])
        terms = []
        for _, layer in self.layers:
            m = self._m(layer)  # dead entries get no gradient from here either
            terms.append(torch.log1p(m / self.eps).sum() / math.log1p(1.0 / self.eps))  # Σ log((m+ε)/ε)/log((1+ε)/ε)
        return self.lam * sum_terms(terms)

    @torch.no_grad()
    def _after_step(self) -> None:
        if self._dead_layers:
            ops.zero_masked_([layer.weight_mask for layer in self._dead_layers],
                             [layer.weight_alive for layer in self._dead_layers])

    @torch.no_grad()
    def _prune_round(self) -> None:
        if self.prune_fraction is None:
            for _, layer in self.layers:
                alive = layer.weight_alive
                alive &= self._m(layer) >= self.alpha
        else:
            self._prune_fraction()
        self._sync_alive()
        self._after_step()
        if self.sigmoid:  # carry m over into the next round, which starts at β = 1
            for _, layer in self.layers:
                layer.weight_score.mul_(self.beta)
            self._set_beta(1.0)

    @torch.no_grad()
    def _prune_fraction(self) -> None:
        # Rank only the alive entries, so dead zeros (ties at 0 with alive ones) never
        # take a slot: exactly round(p · n_alive) alive entries go.
        values = [self._m(layer).detach()[layer.weight_alive] for _, layer in self.layers]
        n_alive = sum(v.numel() for v in values)
        n_prune = ops.n_prune_for(self.prune_fraction, n_alive)
        if n_prune == 0:
            return
        keeps = ops.magnitude_masks(values, n_prune=n_prune)  # m ≥ 0, so |m| = m
        for (_, layer), keep in zip(self.layers, keeps):
            alive = layer.weight_alive
            alive[alive.clone()] = keep

    def density(self) -> dict[str, Any]:
        """The support m ≠ 0 ({"global", "layers"}), plus "alive": the fraction not yet
        pruned for good (alive entries at m = 0 after projection can still come back), and
        with the sigmoid reparameterisation β."""
        report = super().density()
        total = sum(a.numel() for a in self.alive.values())
        report["alive"] = {
            "global": sum(int(a.sum()) for a in self.alive.values()) / total if total else 1.0,
            "layers": {name: float(a.float().mean()) if a.numel() else 1.0 for name, a in self.alive.items()},
        }
        if self.sigmoid:
            report["beta"] = self.beta
        return report

    def _extra_state(self) -> dict[str, Any]:
        alive = {"alive": {name: a.clone() for name, a in self.alive.items()}}
        return {**alive, "beta": self.beta} if self.sigmoid else alive

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        check_tensors("['extra']['alive']", extra["alive"], {name: a.shape for name, a in self.alive.items()})
        if self.sigmoid:
            check_real("state['extra']['beta']", extra["beta"], low=1.0)

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if self.sigmoid:
            self._set_beta(extra["beta"])
        for name, layer in self.layers:
            # On the layer's device, where the forward and step() use it (a model loaded while
            # still on the meta device keeps a meta buffer: the values went nowhere, and step()
            # refuses until a load after to_empty()).
            layer.weight_alive = extra["alive"][name].to(device=layer.weight.device, dtype=torch.bool, copy=True)
        self._sync_alive()
