"""What every pruning method shares (DESIGN.md, "Methods"): attaching to a model via
sparsify(), optimiser parameter groups, penalty(), step() / end_epoch() / end_round(),
one rewind mechanism for the round-based methods, density(), state_dict() and export().

Usage (every method):

    method = Method(model, ...)                  # swaps the layers in place
    opt = torch.optim.SGD(method.param_groups(lr=0.1, weight_decay=1e-4), momentum=0.9)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + method.penalty()
        opt.zero_grad(); loss.backward(); opt.step(); method.step()
    method.end_epoch()
    method.end_round()    # round-based methods: prune + rewind; then build a fresh optimiser
    small = method.export(purge=True).model

A method file holds only what is its own: the mask kind, its arguments, and the hooks
`_after_step`, `_after_epoch`, `_prune_round`, `_extra_state` / `_load_extra_state`.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .. import _checks, ops
from ..nn import export as export_model
from ..nn import sparse_modules, sparsify
from ..nn.sparsify import planned_weights
from ..nn.batchnorm import lost_gates
from ..nn.masks import HardConcreteMask, project_layers
from ._state import check_mask_values, check_state


# ---- argument checks shared by every method: TypeError / ValueError naming the argument
def sum_terms(terms: list[torch.Tensor]) -> torch.Tensor:
    """Σ of per-layer 0-dim terms as one stack and one sum: a Python sum adds one op and,
    in the backward, one autograd node per layer (~10 us each, ResNet-20: 22 layers)."""
    if len(terms) > 1 and all(t.dtype == terms[0].dtype and t.device == terms[0].device for t in terms):
        return torch.stack(terms).sum()
    return sum(terms[1:], terms[0])


def check_real(name: str, value, **bounds) -> float:
    return _checks.real(f"`{name}`", value, **bounds)


def check_int(name: str, value, *, low: int = 0) -> int:
    return _checks.integer(f"`{name}`", value, low=low)


def check_epochs_per_round(value) -> int:
    """For β = β_T^(t/T) over a round's epochs t = 0..T (CS, the concave sigmoid ablation):
    at least 2. With one epoch the round trained at β = 1 only, and its s > 0 ticket then
    disagreed with the soft-masked model (a digits MLP: 85.0% masked vs 77.8% exported)."""
    value = check_int("epochs_per_round", value)
    if value < 2:
        raise ValueError(f"`epochs_per_round` must be >= 2, got {value}: β rises from 1 in a round's first "
                         "epoch to beta_final in its last")
    return value


def check_bool(name: str, value) -> bool:
    return _checks.boolean(f"`{name}`", value)


def check_choice(name: str, value, choices) -> str:
    return _checks.choice(f"`{name}`", value, choices)


class PruningMethod:
    """Base class. Subclasses set `mask_kind` (and `round_based`), validate their own
    arguments, then call `super().__init__` — so a bad argument raises before the model
    is touched."""

    mask_kind: str = "binary"
    round_based: bool = False
    default_mask_lr: float | None = None  # None: the mask group uses the weights' lr
    ranks_at_init: bool = False  # ranks |w| in the constructor (OneShot, DPF, GMP)

    def __init__(self, model: nn.Module, *, include=None, exclude=None, rewind_iteration: int = 0,
                 mask_options: dict | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules()):
            raise ValueError("`model` has no nn.Linear or nn.Conv2d layer to prune")
        self.rewind_iteration = check_int("rewind_iteration", rewind_iteration)
        if mask_options is not None and not isinstance(mask_options, dict):
            raise TypeError(f"`mask_options` must be a dict, got {type(mask_options).__name__}")
        # Layers already sparse are taken over as they are (sparsify leaves them), so they
        # must carry this method's kind: another one failed later with an AttributeError
        # (DPF, IMP: after the other layers were swapped; L0, CS, concave: at penalty()).
        other = [f"{name!r} ({layer.mask.name})" for name, layer in sparse_modules(model)
                 if layer.mask.name != self.mask_kind]
        if other:
            raise ValueError(
                f"`model` has sparse layers whose mask kind is not {type(self).__name__}'s {self.mask_kind!r}: "
                f"{_checks.first_few(other)}. Start from a dense model (sparsekern.export(model).model bakes "
                "the masks in).")
        if self.ranks_at_init:
            # NaN / Inf weights (a diverged run): the ranking op raised only after sparsify
            # had swapped the layers, naming its own argument (`tensors`), not the layers.
            bad = [name for name, w in planned_weights(model, include, exclude)
                   if w.device.type != "meta" and not bool(torch.isfinite(w).all())]  # meta: no values
            if bad:
                raise ValueError(f"`model` has NaN or Inf weights in {bad}: magnitude pruning cannot rank them")
        sparsify(model, mask=self.mask_kind, include=include, exclude=exclude, **(mask_options or {}))
        self.model = model
        self.layers: list[tuple[str, nn.Module]] = list(sparse_modules(model))
        # A model built under torch.device("meta") has shapes but no values: the method
        # attaches with its structure, skipping what reads weights (the magnitude rankings
        # at init), and its state comes from a checkpoint once the model is materialised
        # (to_empty, then model.load_state_dict and load_state_dict). step() refuses to
        # train on before that (_check_values).
        self._awaiting_values = self._on_meta()
        self.iteration = 0  # optimiser steps taken (reset to rewind_iteration by a rewind)
        self.epoch = 0      # epochs within the current round
        self.round = 0
        self._rewind_state: dict[str, torch.Tensor] | None = None
        if self.round_based and self.rewind_iteration == 0:
            self._save_rewind_point()

    # ---- optimiser
    def mask_parameters(self) -> list[nn.Parameter]:
        return [p for _, layer in self.layers for p in layer.mask_parameters()]

    def param_groups(self, lr: float, weight_decay: float | None = None, mask_lr: float | None = None,
                     **options) -> list[dict]:
        """Two groups: the model's parameters (lr, weight_decay, options) and the mask
        parameters (own lr — `mask_lr`, else the method's default, else lr — and never
        weight decay). The mask group is left out when the method has none.
        weight_decay None: the weights group takes the optimiser's own (its weight_decay
        argument); a 0.0 default here silently overrode SGD(..., weight_decay=1e-4)."""
        lr = check_real("lr", lr, low=0.0, low_open=True)
        decay = {} if weight_decay is None else {"weight_decay": check_real("weight_decay", weight_decay, low=0.0)}
        if mask_lr is not None:
            mask_lr = check_real("mask_lr", mask_lr, low=0.0, low_open=True)
        masks = self.mask_parameters()
        mask_ids = {id(p) for p in masks}
        groups = [{"params": [p for p in self.model.parameters() if id(p) not in mask_ids],
                   "lr": lr, **decay, "name": "weights", **options}]
        if masks:
            groups.append({"params": masks, "lr": mask_lr or self.default_mask_lr or lr,
                           "weight_decay": 0.0, "name": "masks", **options})
        return groups

    # ---- training hooks
    def penalty(self) -> torch.Tensor:
        """The method's term to add to the loss (0 unless the method regularises)."""
        return self.model_zero()

    def model_zero(self) -> torch.Tensor:
        w = self.layers[0][1].weight
        return torch.zeros((), device=w.device, dtype=w.dtype)

    def _on_meta(self) -> bool:
        return any(layer.weight.is_meta for _, layer in self.layers)

    def _check_values(self) -> None:
        """Raises if the method was attached on the meta device, the model has values now
        (to_empty) and no checkpoint has been loaded since: its masks, rewind point and
        other state were never computed (after to_empty they are uninitialised memory:
        an IMP model trained on at 12% density, masks of garbage)."""
        if self._awaiting_values and not self._on_meta():
            raise RuntimeError(
                f"{type(self).__name__} was attached to a model on the meta device, which has no weight values, "
                "so its state (masks, rewind point, ...) was never computed. After model.to_empty(...), load a "
                "checkpoint (model.load_state_dict, then this method's load_state_dict) before training, or "
                "attach the method to the materialised, initialised model.")

    @torch.no_grad()
    def step(self) -> None:
        """Call after optimizer.step(): projects learnable masks back to their domain,
        keeps binary-masked weights exactly zero (momentum or weight decay could move
        them), runs the method's per-step hook and saves the rewind point when due."""
        self._check_values()
        self.iteration += 1
        if not self._checked_masks_applied:
            self._check_masks_applied()
        project_layers([layer for _, layer in self.layers])
        if self._rewind_probe is not None and self._rewind_stale():
            self._rewind_follow_model()
        self._after_step()  # may change masks: zero binary-masked weights after it
        self._zero_binary_masked()
        if self.round_based and self._rewind_state is None and self.iteration == self.rewind_iteration:
            self._save_rewind_point()

    _checked_masks_applied = False

    def _check_masks_applied(self) -> None:
        """Once, at the first step after a forward applied some layer's mask: warns naming
        the layers whose mask no forward has applied. sparsify refuses the parents it can see
        reading a layer's weight themselves (in their forward's source); one that does it
        elsewhere (a helper method, another module) would train and export a model whose
        masks were never used, and this is how it shows."""
        idle = [name for name, layer in self.layers if not getattr(layer, "_mask_applied", False)]
        if len(idle) == len(self.layers):
            return  # no forward yet (or one that bypassed every mask: not told apart)
        self._checked_masks_applied = True
        lost = lost_gates(self.model)
        if lost:
            warnings.warn(
                f"the gated BatchNorms after {_checks.first_few(lost)} were replaced since sparsify (e.g. by "
                "nn.SyncBatchNorm.convert_sync_batchnorm): a closed channel comes out of the new module as its "
                "shift, and export(purge=True) may have to keep it. Train with the nn.BatchNorm2d layers sparsify "
                "gated.",
                stacklevel=4,
            )
        if idle:
            warnings.warn(
                f"{len(idle)} sparse layer(s) did not apply their mask in any forward so far: {idle[:5]}"
                f"{' ...' if len(idle) > 5 else ''}. Unused layers are harmless; if the model uses their weights some "
                "other way (a parent module passing `.weight` to a function), the masks are bypassed: exclude them.",
                stacklevel=4,  # the caller of step() (through torch.no_grad's wrapper)
            )

    @torch.no_grad()
    def _zero_binary_masked(self) -> None:
        """Pruned weights of binary-masked layers back to exactly 0 (momentum, weight
        decay or a rewind copy can move them)."""
        binary = [layer for _, layer in self.layers if layer.mask.name == "binary"]
        if binary:
            ops.zero_masked_([layer.weight for layer in binary], [layer.weight_mask for layer in binary])

    def end_epoch(self) -> None:
        self.epoch += 1
        self._after_epoch()

    def end_round(self) -> None:
        """Round-based methods: prune, then rewind the weights to the saved iterate and the
        step counter to `rewind_iteration`. Build a fresh optimiser afterwards, with the lr
        schedule advanced to rewind_iteration."""
        if not self.round_based:
            raise TypeError(f"{type(self).__name__} is not round-based: it has no end_round()")
        if self._rewind_state is None:
            raise RuntimeError(
                f"end_round() before the rewind point: iteration {self.iteration} < "
                f"rewind_iteration {self.rewind_iteration}"
            )
        self._prune_round()
        self.rewind()
        self.round += 1
        self.epoch = 0

    def _after_step(self) -> None:
        pass

    def _after_epoch(self) -> None:
        pass

    def _prune_round(self) -> None:
        raise NotImplementedError

    # ---- rewinding (shared by IMP, CS and the concave regularisers)
    def _save_rewind_point(self) -> None:
        """Everything in the model's state_dict but the masks (weights, biases, BN
        statistics), cloned. The masks are told by identity, not by key: a module may name
        its entries its own way (SparseMultiheadAttention's in_proj_weight_mask; built
        from the layer name, that key missed, and every rewind restored the in-projection's
        unpruned mask)."""
        self._rewind_state = {k: v.detach().clone() for k, v in self._rewound().items()}
        self._set_rewind_probe()

    # (key, layer) of the first sparse layer's weight, a rewound entry: step() compares the
    # dtype and device of layer.weight with the saved copy's, to notice a model.to(...)
    # since the rewind point. Read off the layer each time, not held: model.to() gives the
    # weight a new Parameter object when it moves to or from the meta device, or under
    # torch.__future__.set_overwrite_module_params_on_conversion(True); a Parameter held
    # here then never changed, the saved copies stayed on the old device and dtype until
    # end_round(), and the old weight was kept alive.
    _rewind_probe: tuple[str, nn.Module] | None = None

    def _set_rewind_probe(self) -> None:
        layer = self.layers[0][1]
        key = next((k for k, v in self.model.state_dict(keep_vars=True).items()
                    if v is layer.weight and k in self._rewind_state), None)
        self._rewind_probe = None if key is None else (key, layer)

    def _rewind_stale(self) -> bool:
        key, layer = self._rewind_probe
        saved, live = self._rewind_state[key], layer.weight
        return saved.dtype != live.dtype or saved.device != live.device

    def _rewind_follow_model(self) -> None:
        """Casts the rewind point to the dtype and device of the model's entries. A model
        converted after the point was saved (IMP(model) then model.to(torch.bfloat16)), or
        a checkpoint from a float32 run loaded into a bfloat16 model, kept a float32 copy
        of every weight beside the bfloat16 model: twice the rewind point's memory, and
        saved in float32 by state_dict(). The values a rewind writes are the same: copy_
        rounds as .to() does."""
        state = self.model.state_dict(keep_vars=True)
        for k, v in self._rewind_state.items():
            live = state[k]
            if v.dtype != live.dtype or v.device != live.device:
                self._rewind_state[k] = v.to(device=live.device, dtype=live.dtype)

    def _rewound(self) -> dict[str, torch.Tensor]:
        """The model's state_dict entries a rewind restores: all but the masks."""
        masks = {id(getattr(layer, s)) for _, layer in self.layers for s in layer.mask.state_names}
        return {k: v for k, v in self.model.state_dict(keep_vars=True).items() if id(v) not in masks}

    def _rewind_shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self._rewound().items()}

    @torch.no_grad()
    def rewind(self) -> None:
        """Copies the saved iterate back (bit-exact) and re-applies binary masks."""
        self._rewind_follow_model()
        state = self.model.state_dict()
        for k, v in self._rewind_state.items():
            state[k].copy_(v)
        self._zero_binary_masked()
        self.iteration = self.rewind_iteration

    # ---- reporting
    @torch.no_grad()
    def density(self) -> dict[str, Any]:
        """{"global": kept / total over the sparse layers, "layers": {name: density}}."""
        layers, kept, total = {}, 0, 0
        for name, layer in self.layers:
            keep = layer.mask.keep(layer)
            layers[name] = float(keep.float().mean()) if keep.numel() else 1.0
            kept += int(keep.sum())
            total += keep.numel()
        return {"global": kept / total if total else 1.0, "layers": layers}

    def export(self, purge: bool = False, example_input=None):
        """Plain torch modules with the masks baked in (see sparsekern.export)."""
        return export_model(self.model, purge=purge, example_input=example_input)

    # ---- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: counters, mask tensors, hard-concrete
        noise offsets, the rewind point and the method's own state."""
        masks = {f"{name}.{s}": getattr(layer, s).detach().clone()
                 for name, layer in self.layers for s in layer.mask.state_names}
        offsets = {name: (layer.mask.seed, layer.mask.offset) for name, layer in self.layers
                   if isinstance(layer.mask, HardConcreteMask)}
        if self._rewind_state is not None:
            self._rewind_follow_model()
        return {
            "method": type(self).__name__,
            "iteration": self.iteration, "epoch": self.epoch, "round": self.round,
            "rewind_iteration": self.rewind_iteration,
            "masks": masks, "noise": offsets,
            "rewind_state": None if self._rewind_state is None else {k: v.clone() for k, v in self._rewind_state.items()},
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from `state` (see state_dict). Every entry is checked first: a state
        that does not fit this method and model raises, and nothing has changed."""
        self._check_state(state)
        self._load_checked(state)

    @torch.no_grad()
    def _load_checked(self, state: dict[str, Any]) -> None:
        """load_state_dict after _check_state passed."""
        for name, layer in self.layers:
            for s in layer.mask.state_names:
                getattr(layer, s).copy_(state["masks"][f"{name}.{s}"])
            if name in state["noise"]:
                layer.mask.seed, layer.mask.offset = state["noise"][name]
        self.iteration, self.epoch, self.round = state["iteration"], state["epoch"], state["round"]
        self.rewind_iteration = state["rewind_iteration"]
        rewind = state["rewind_state"]  # copied: the caller's dict must not alias ours
        self._rewind_state = None if rewind is None else {k: v.clone() for k, v in rewind.items()}
        if rewind is not None:
            self._rewind_follow_model()
            self._set_rewind_probe()
        else:
            self._rewind_probe = None
        self._load_extra_state(state["extra"])
        # Loaded into a model still on the meta device, the values went nowhere.
        self._awaiting_values = self._on_meta()

    def _check_state(self, state: Any) -> None:
        live = {f"{name}.{s}": getattr(layer, s) for name, layer in self.layers for s in layer.mask.state_names}
        noisy = {name for name, layer in self.layers if isinstance(layer.mask, HardConcreteMask)}
        check_state(self, state, {k: v.shape for k, v in live.items()}, noisy)
        check_mask_values(state["masks"], live)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        """Raises if `extra` (keys already checked) does not fit this method; changes nothing."""

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass
