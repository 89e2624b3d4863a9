"""L0 with hard-concrete gates: constrained (Gallego-Posada et al., NeurIPS 2022) and the
penalised baseline (Louizos et al., 2018); METHODS.md.

Every group of weights (one weight, or a conv output channel / linear input neuron when
structured; an attention's out_proj: the inputs of one head) gets a gate z ~ HardConcrete(log α), sampled once per forward in training
and the median gate in eval. The expected density of a set of layers is
Σ_j size_j·P(z_j ≠ 0) / Σ_j size_j, differentiable in log α.

ConstrainedL0 imposes density_g ≤ ε_g (one constraint for the model, or one per layer)
through the Lagrangian task + Σ_g λ_g (density_g − ε_g): the optimiser descends on the
weights and log α, step() ascends on the multipliers λ (dual restarts by default):

    method = ConstrainedL0(model, 0.3)                  # or {"fc1": 0.2, ...}
    opt = torch.optim.Adam(method.param_groups(lr=1e-3))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + method.penalty()
        opt.zero_grad(); loss.backward(); opt.step(); method.step()
    method.density()["expected"], method.multipliers
    small = method.export(purge=True).model             # structured: channels removed

PenalizedL0 adds λ·Σ E[L0] instead (a fixed trade-off, no control of the density).

Layers: every Conv2d and Linear (an attention's projections), unless `include` /
`exclude` say otherwise. With structured=True and no `include`, the Conv2d layers whose
channels export(purge=True) cannot remove are left dense (sparsekern.nn.purgeable_layers:
a ResNet's stem, every block's second conv and its shortcut, whose outputs meet in an
add; as in the authors' ResNets, each block's first conv is gated), while every Linear is
gated as before; layers a per-layer `target_density` names are gated too. Gates there
only spent the density budget on channels purge keeps: the README's 8-epoch ResNet-20
digits run kept 151 closed conv2 channels and scored 86% train / 80.8% test; now it
removes every closed channel and scores 99% / 96%. A model torch.fx cannot trace warns
and gates every layer.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from ..nn.sparsify import planned_layer_names
from ._state import check_tensor
from ._structured import structured_include
from .base import PruningMethod, check_bool, check_real, sum_terms

DEFAULT_DROPRATE = {True: 0.3, False: 0.1}  # structured / unstructured (METHODS.md)
GLOBAL = "global"  # the group name of the model-wise constraint


class _HardConcreteMethod(PruningMethod):
    """What both L0 methods share: the gates' options, the init rescaling, the expected
    density and the expected-L2 term."""

    mask_kind = "hard_concrete"

    def __init__(self, model: nn.Module, *, structured: bool, droprate_init: float | None, rescale_init: bool,
                 l2_weight: float, gate_lr: float | None, include, exclude):
        structured = check_bool("structured", structured)
        if droprate_init is None:
            droprate_init = DEFAULT_DROPRATE[structured]
        self.droprate_init = check_real("droprate_init", droprate_init, low=0.0, high=1.0,
                                        low_open=True, high_open=True)
        self.rescale_init = check_bool("rescale_init", rescale_init)
        self.l2_weight = check_real("l2_weight", l2_weight, low=0.0)
        if gate_lr is not None:
            self.default_mask_lr = check_real("gate_lr", gate_lr, low=0.0, low_open=True)
        super().__init__(model, include=include, exclude=exclude,
                         mask_options={"structured": structured, "droprate_init": self.droprate_init})
        self.structured = structured
        if self.rescale_init:
            # The authors' code divides the weights by 1 − p, the gates' mean keep rate at
            # init, so E[w ⊙ z] starts near w. Each Parameter once, even if tied.
            seen = set()
            with torch.no_grad():
                for _, layer in self.layers:
                    if id(layer.weight) not in seen:
                        seen.add(id(layer.weight))
                        layer.weight.div_(1.0 - self.droprate_init)

    # ---- expected L0
    def _expected_nonzero(self) -> list[torch.Tensor]:
        """E[#nonzero weights] per layer (0-dim, differentiable in log α).

        Computed once per step: each layer's training forward gets it from the same pass
        over log α as its gates (ops.hard_concrete_sample), and HardConcreteMask.
        expected_nonzero returns that tensor while it is current, so the L0 gradient rides
        the gates' one backward pass too; otherwise (log α changed since, or the forward's
        graph already used by a backward) it is computed afresh. Measured on the CIFAR
        ResNet-18, unstructured (11.2M log α), batch 32, 2 CPU threads, with the fused
        CPU kernels: recomputing it here, a second forward and backward pass over every
        log α, took 26 ms of a 594-646 ms step (4.1-4.4%), more inside a step (a zero
        grad_z tensor for the unused gates, a second gradient to add into log α's); with
        the reuse the step went from 1.26-1.46x to 1.21-1.24x dense (4 interleaved runs
        of 7-15 steps; the machine drifted)."""
        return [layer.mask.expected_nonzero(layer) for _, layer in self.layers]

    def _expected_l2(self) -> torch.Tensor:
        """l2_weight/2 · Σ P(z ≠ 0)·θ² (Louizos' expected L2, used by the authors' code
        instead of optimiser weight decay). P is detached, as in that code: the term
        shrinks the weights only and leaves the gates to the L0 term. Biases are not
        included. With the 1/2, l2_weight means what SGD's weight_decay means."""
        total = self.model_zero()
        if self.l2_weight == 0.0:
            return total
        for _, layer in self.layers:
            mask = layer.mask
            p = torch.sigmoid(layer.weight_log_alpha.detach() - mask.beta * math.log(-mask.gamma / mask.zeta))
            total = total + (mask.expand_gate(p) * layer.weight.square()).sum()  # p (per group) broadcasts over its weights
        return 0.5 * self.l2_weight * total

    @torch.no_grad()
    def density(self) -> dict[str, Any]:
        """{"global", "layers"}: the eval-gate support (median gate > 0, what export keeps);
        "eval": the same, under its own name; "expected": Σ size·P(z ≠ 0) / Σ size,
        globally and per layer."""
        report = super().density()
        nonzero = [float(n) for n in self._expected_nonzero()]
        numel = [layer.weight.numel() for _, layer in self.layers]
        report["eval"] = {"global": report["global"], "layers": dict(report["layers"])}
        report["expected"] = {
            "global": sum(nonzero) / sum(numel) if sum(numel) else 1.0,
            "layers": {name: n / k if k else 1.0 for (name, _), n, k in zip(self.layers, nonzero, numel)},
        }
        return report


class ConstrainedL0(_HardConcreteMethod):
    """ConstrainedL0(model, target_density, *, layerwise=False, structured=False,
    dual_lr=7e-4, dual_restarts=True, gate_lr=None, droprate_init=None, rescale_init=True,
    l2_weight=0.0, include=None, exclude=None)

    target_density: ε in (0, 1]. A float: one model-wise constraint on the expected density
      of all sparse layers together (multiplier "global"), or with layerwise=True the same
      ε for every layer, one constraint each. A dict {layer name: ε}: one constraint per
      named layer; layers not named are gated but unconstrained (structured: the named
      layers are gated even where purge cannot slice them).
    dual_lr: η of the dual ascent (paper: 1e-4 MNIST … 7e-4 CIFAR).
    dual_restarts: λ_g ← 0 whenever density_g ≤ ε_g (the paper's heuristic).
    gate_lr: lr of the log α group (default: the weights' lr; paper: 1.0 ResNet, 6.0 WRN).
    droprate_init: p of log α ~ N(log((1−p)/p), 0.01); default 0.3 structured, 0.1 not.
    rescale_init: divide the weights by 1 − p at init (the authors' code).
    l2_weight: the expected-L2 term with detached gates (see _expected_l2), 0 = off.

    Dual step (simultaneous GDA, Eq. 5 of the paper): step() — called after
    optimizer.step() — updates λ with the densities that penalty() computed in the same
    iteration, i.e. at the parameters *before* the primal step, the point the primal
    gradient was taken at: λ_g ← max(0, λ_g + η (density_g − ε_g)), or 0 with dual restarts
    when density_g ≤ ε_g. If penalty() was not called since the last step(), step() uses
    the densities at the current (post-step) parameters instead.
    """

    def __init__(self, model: nn.Module, target_density, *, layerwise: bool = False, structured: bool = False,
                 dual_lr: float = 7e-4, dual_restarts: bool = True, gate_lr: float | None = None,
                 droprate_init: float | None = None, rescale_init: bool = True, l2_weight: float = 0.0,
                 include=None, exclude=None):
        layerwise = check_bool("layerwise", layerwise)
        if check_bool("structured", structured):
            # The layers named in a per-layer target are gated even where purge cannot
            # slice them: the user asked for them by name.
            include = structured_include(model, include, exclude, method="ConstrainedL0(structured=True)",
                                         keep=target_density if isinstance(target_density, dict) else ())
        targets = self._check_targets(model, target_density, include, exclude)
        if layerwise and isinstance(targets, dict):  # it was ignored: the dict's layers alone are constrained
            raise ValueError("`layerwise` applies to one ε for every layer; a per-layer `target_density` dict "
                             "already constrains each layer it names")
        self.dual_lr = check_real("dual_lr", dual_lr, low=0.0)
        self.dual_restarts = check_bool("dual_restarts", dual_restarts)
        super().__init__(model, structured=structured, droprate_init=droprate_init, rescale_init=rescale_init,
                         l2_weight=l2_weight, gate_lr=gate_lr, include=include, exclude=exclude)
        index = {name: i for i, (name, _) in enumerate(self.layers)}
        if isinstance(targets, dict):
            groups = [(name, [index[name]], targets[name]) for name, _ in self.layers if name in targets]
        elif layerwise:
            groups = [(name, [i], targets) for i, (name, _) in enumerate(self.layers)]
        else:
            groups = [(GLOBAL, list(range(len(self.layers))), targets)]
        self.group_names = [g[0] for g in groups]
        self._group_layers = [g[1] for g in groups]
        self._group_numel = [sum(self.layers[i][1].weight.numel() for i in g[1]) for g in groups]
        w = self.layers[0][1].weight
        dtype = torch.promote_types(w.dtype, torch.float32)  # the dtype of the expected L0
        self._target_values = [g[2] for g in groups]
        self._targets = torch.tensor(self._target_values, dtype=dtype, device=w.device)
        self._lambda = torch.zeros_like(self._targets)   # multipliers start at 0
        self._defect: torch.Tensor | None = None         # density − ε from the last penalty()

    @staticmethod
    def _check_targets(model, target_density, include, exclude):
        if isinstance(target_density, dict):
            if not target_density:
                raise ValueError("`target_density` dict is empty")
            if not isinstance(model, nn.Module):
                raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
            for name, eps in target_density.items():
                if not isinstance(name, str):
                    raise TypeError(f"`target_density` keys must be layer names (str), got {type(name).__name__}")
                check_real(f"target_density[{name!r}]", eps, low=0.0, high=1.0, low_open=True)
            names = planned_layer_names(model, include, exclude)  # before sparsify: a bad name raises first
            unknown = sorted(set(target_density) - set(names))
            if unknown:
                raise ValueError(f"`target_density` names unknown layers {unknown}; the sparse layers are {names}")
            return {name: float(eps) for name, eps in target_density.items()}
        if isinstance(target_density, numbers.Real) and not isinstance(target_density, bool):
            return check_real("target_density", target_density, low=0.0, high=1.0, low_open=True)
        raise TypeError(f"`target_density` must be a float or a dict {{layer name: float}}, "
                        f"got {type(target_density).__name__}")

    # ---- the Lagrangian
    def _group_densities(self) -> torch.Tensor:
        nonzero = self._expected_nonzero()
        return torch.stack([sum_terms([nonzero[i] for i in idx]) / n
                            for idx, n in zip(self._group_layers, self._group_numel)])

    def _on(self, device: torch.device, dtype: torch.dtype) -> None:
        # ε and λ on the device and in the dtype of the expected L0: the model may have been
        # moved or converted after the method was built, or a checkpoint of another dtype
        # loaded. A float64 λ (a float64 run's checkpoint, or model.float() after attaching)
        # made a float32 model's penalty and loss float64; float32 targets in a model
        # converted to float64 were ε rounded (0.3 -> 0.30000001). The targets are made from
        # their values: rounded once, and a method attached on the meta device has no others.
        if self._targets.device != device or self._targets.dtype != dtype:
            self._targets = torch.tensor(self._target_values, dtype=dtype, device=device)
        if self._lambda.device != device or self._lambda.dtype != dtype:
            if self._lambda.is_meta:  # never loaded since to_empty(): λ has no value
                self._check_values()
            self._lambda = self._lambda.to(device=device, dtype=dtype)

    def penalty(self) -> torch.Tensor:
        """Σ_g λ_g (density_g − ε_g) (+ the expected-L2 term): its gradient pushes the
        gates of violated groups down with weight λ_g. Also records density_g − ε_g
        (detached) for the dual step in step()."""
        density = self._group_densities()
        self._on(density.device, density.dtype)
        defect = density - self._targets
        self._defect = defect.detach()
        return (self._lambda * defect).sum() + self._expected_l2()

    @torch.no_grad()
    def _after_step(self) -> None:
        defect = self._defect
        if defect is None:
            density = self._group_densities()
            self._on(density.device, density.dtype)
            defect = density - self._targets
        lam = torch.clamp(self._lambda + self.dual_lr * defect, min=0.0)
        if self.dual_restarts:
            lam = torch.where(defect <= 0, torch.zeros_like(lam), lam)
        self._lambda = lam
        self._defect = None

    @property
    def multipliers(self) -> dict[str, float]:
        """{group name: λ_g}: "global" for the model-wise constraint, else layer names."""
        return dict(zip(self.group_names, self._lambda.tolist()))

    @property
    def targets(self) -> dict[str, float]:
        return dict(zip(self.group_names, self._targets.tolist()))

    def density(self) -> dict[str, Any]:
        report = super().density()
        report["targets"] = self.targets
        report["multipliers"] = self.multipliers
        return report

    # ---- checkpointing
    def _extra_state(self) -> dict[str, Any]:
        return {"groups": list(self.group_names), "multipliers": self._lambda.clone(),
                "defect": None if self._defect is None else self._defect.clone()}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        if extra["groups"] != self.group_names:
            raise ValueError(f"state has constraints {extra['groups']}, this method {self.group_names}")
        check_tensor("['extra']['multipliers']", extra["multipliers"], self._lambda.shape)
        # The dual step keeps λ >= 0; a negative λ rewards violating the constraint, a NaN
        # one turns the penalty and every gate's gradient into NaN.
        multipliers = extra["multipliers"]
        if not (multipliers.is_floating_point() and bool((torch.isfinite(multipliers) & (multipliers >= 0)).all())):
            raise ValueError(f"state['extra']['multipliers'] must be finite floats >= 0, got {multipliers.tolist()}")
        if extra["defect"] is not None:
            check_tensor("['extra']['defect']", extra["defect"], self._lambda.shape)

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        # On log α's device and in the expected L0's dtype, where penalty() computes the
        # densities (the targets may still be on the meta device the method was attached on).
        log_alpha = self.layers[0][1].weight_log_alpha
        device, dtype = log_alpha.device, torch.promote_types(log_alpha.dtype, torch.float32)
        self._lambda = extra["multipliers"].to(device=device, dtype=dtype, copy=True)
        self._defect = None if extra["defect"] is None else extra["defect"].to(device=device, dtype=dtype, copy=True)
        self._on(device, dtype)


class PenalizedL0(_HardConcreteMethod):
    """PenalizedL0(model, lam, *, structured=False, droprate_init=None, rescale_init=True,
    l2_weight=0.0, gate_lr=None, include=None, exclude=None)

    Louizos et al.'s penalised objective: task + λ·Σ E[L0], the expected number of nonzero
    weights summed over the sparse layers (not normalised; the density it reaches depends
    on λ, the data and the schedule — the constrained method's foil). Other arguments as
    in ConstrainedL0.

    lam: λ of the penalty λ·Σ E[L0] (required; not normalised by the number of weights, so
      its scale follows the model's size).
    """

    def __init__(self, model: nn.Module, lam: float, *, structured: bool = False, droprate_init: float | None = None,
                 rescale_init: bool = True, l2_weight: float = 0.0, gate_lr: float | None = None,
                 include=None, exclude=None):
        self.lam = check_real("lam", lam, low=0.0)
        if check_bool("structured", structured):
            include = structured_include(model, include, exclude, method="PenalizedL0(structured=True)")
        super().__init__(model, structured=structured, droprate_init=droprate_init, rescale_init=rescale_init,
                         l2_weight=l2_weight, gate_lr=gate_lr, include=include, exclude=exclude)

    def penalty(self) -> torch.Tensor:
        """λ·Σ E[L0] (+ the expected-L2 term)."""
        return self.lam * sum_terms(self._expected_nonzero()) + self._expected_l2()
