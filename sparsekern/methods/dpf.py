"""DPF: dynamic pruning with feedback (Lin et al., ICLR 2020), METHODS.md "DPF".

    steps_per_epoch = len(loader)
    method = DPF(model, sparsity=0.9, end_iteration=second_lr_decay_epoch * steps_per_epoch)
    opt = torch.optim.SGD(method.param_groups(lr=0.1, weight_decay=1e-4), momentum=0.9, nesterov=True)
    ... train, calling method.step() after every opt.step() ...
    sparse = method.export().model          # w̃_T = m ⊙ w_T

Forward uses w̃ = m ⊙ w; the backward is straight-through (mask kind "straight_through":
grad_w = G unmasked), so the dense w keeps learning at pruned coordinates and a pruned
weight comes back once it outgrows a kept one. The mask is recomputed from |w| at
construction (iteration 0) and whenever the step counter is a multiple of `period`
(Algorithm 1: "if p | t") or equals end_iteration (so the target is reached there
whatever the period), with target sparsity

    s_t = schedules.zhu_gupta(t, final_sparsity=sparsity, end=end_iteration)   (s_i = 0, t0 = 0)

held at `sparsity` from end_iteration on. The paper reaches s_f at the second lr decay:
pass end_iteration = (epoch of the second decay) × (steps per epoch). end_iteration=None
prunes to `sparsity` from the first mask on (a constant target).

Modes (every count is of weights in the pruned layers, N in total):
- "global" (paper default): exactly round(s_t·N) weights pruned, ranked by |w| across all
  layers with the shared op (ties in its (layer, flat index) order).
- "layerwise": exactly round(s_t·n_l) pruned in each layer l (the paper's Figure 9 ablation).
- "structured": whole output channels (dim 0 of the weight: conv filters, linear output
  neurons), ranked globally by their plain ℓ2 norm (with the standard fan-in-scaled inits
  filter norms are comparable across layers, so no normalisation, as in SFP / the paper's
  "ℓ2-norm based filter selection"). Channels are pruned in ascending norm order (ties by
  layer then channel index) for as long as the pruned weight count stays ≤ round(s_t·N):
  the achieved sparsity never exceeds the target and falls short of it by less than the
  next channel's size. A BatchNorm2d right after a selected conv is gated by its
  filters (gate_batchnorms=True, the default; sparsekern.nn.batchnorm): a pruned filter's
  BatchNorm channel outputs 0 and keeps its running statistics, its γ and β masked with
  the filter and trained straight through like its weights, so export(purge=True) removes
  the channel. The authors' code keeps the BatchNorm plain (gate_batchnorms=False): its
  pruned channels output the constant relu(β), which purge has to keep, and the README's
  8-epoch ResNet-20 digits run kept 74 (gated, over three seeds: +0.2 to +2.2 points of
  test accuracy, 0.31-0.34 of dense's MACs exported instead of 0.58-0.62). Biases stay
  dense, so a pruned channel without such a BatchNorm still outputs its bias.

Layers: every Conv2d and Linear except the last Linear (ignore_classifier=True), which
for the paper's ResNets / WideResNets is exactly "all conv layers; the last FC, biases
and BN dense"; a model without a Linear (SqueezeNet) keeps its last Conv2d dense instead.
Pass ignore_classifier=False to prune the classifier too. "structured" without an
`include` leaves out the convs whose channels export(purge=True) cannot remove
(sparsekern.nn.purgeable_layers: on a ResNet the stem, every block's second conv and the
shortcuts, whose outputs meet in an add; each block's first conv stays): ranked with the
others, the stem's and the 1×1 shortcuts' filters (the smallest norms under kaiming
fan-out init) were pruned whole, and the README's 8-epoch ResNet-20 digits run ended at
10% train and test accuracy (now 98% / 96%). The sparsity is then over the selected
layers. An explicit `include` is used as given; a model torch.fx cannot trace warns and
takes every layer.

Each update appends to `method.history`: {"iteration", "sparsity" (target s_t),
"density" (achieved, global), "flips" (coordinates whose mask changed, global), "iou"
(|m_prev ∧ m| / |m_prev ∨ m|, global), "layers": {name: {"density", "flips", "iou"}}}.
The first entry compares with the all-keep mask the layers start with.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..nn.batchnorm import gate_batchnorms as gate_batchnorms_of
from ._magnitude import HistoryState, exact_keep_masks, exclude_classifier, set_masks
from ._structured import structured_include
from .base import PruningMethod, check_bool, check_choice, check_int, check_real
from .schedules import zhu_gupta

MODES = ("global", "layerwise", "structured")


class DPF(HistoryState, PruningMethod):
    """DPF(model, sparsity, end_iteration=None, period=16, mode="global", include=None,
    exclude=None, ignore_classifier=True, gate_batchnorms=True)

    Dynamic pruning with feedback: the module docstring has the usage, the schedule, the
    modes and the `history` entries.
    """

    mask_kind = "straight_through"
    ranks_at_init = True

    def __init__(self, model, sparsity: float, end_iteration: int | None = None, period: int = 16,
                 mode: str = "global", include=None, exclude=None, ignore_classifier: bool = True,
                 gate_batchnorms: bool = True):
        self.sparsity = check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
        self.end_iteration = None if end_iteration is None else check_int("end_iteration", end_iteration, low=1)
        self.period = check_int("period", period, low=1)
        self.mode = check_choice("mode", mode, MODES)
        self.gate_batchnorms = check_bool("gate_batchnorms", gate_batchnorms)
        exclude = exclude_classifier(model, exclude, ignore_classifier)
        self.ignore_classifier = ignore_classifier
        if self.mode == "structured":
            include = structured_include(model, include, exclude, method="DPF(mode='structured')")
        super().__init__(model, include=include, exclude=exclude)
        if self.mode == "structured" and self.gate_batchnorms:
            for _, layer in self.layers:
                layer.mask.whole_channels = True
            gate_batchnorms_of(model)
        self.history: list[dict[str, Any]] = []
        if not self._awaiting_values:  # a meta model has no |w| to rank (its history had no counts to read)
            self._update_mask()  # t = 0: Algorithm 1 computes the first mask before any step

    def target_sparsity(self, iteration: int) -> float:
        if self.end_iteration is None:
            return self.sparsity
        return zhu_gupta(iteration, final_sparsity=self.sparsity, end=self.end_iteration)

    def _after_step(self) -> None:
        # Also at end_iteration, as GMP does: with only "p | t" the target is reached only
        # if p divides end_iteration. A 15-step run (end 11, p = 16) exported the dense
        # model of its t = 0 mask, and mlp / 2 epochs of digits (end 35) ended at 0.2002
        # density for a 0.2 target.
        if self.iteration % self.period == 0 or self.iteration == self.end_iteration:
            self._update_mask()

    # ---- the three ways to pick the mask
    def _global(self, weights: list[torch.Tensor], s: float) -> list[torch.Tensor]:
        return ops.magnitude_masks(weights, s)

    def _layerwise(self, weights: list[torch.Tensor], s: float) -> list[torch.Tensor]:
        return [ops.magnitude_masks([w], s)[0] for w in weights]

    def _structured(self, weights: list[torch.Tensor], s: float) -> list[torch.Tensor]:
        norms = [w.detach().float().flatten(1).norm(dim=1) for w in weights]
        sizes = [w[0].numel() for w in weights]
        target = round(s * sum(w.numel() for w in weights))

        def prune_channels(k: int) -> tuple[int, list[torch.Tensor]]:
            # The k lowest-norm channels (the op's exact top-k, so the sets for growing k
            # are nested and the pruned weight count is monotone in k).
            keep = exact_keep_masks(norms, k)
            return int(sum((~m).sum() * size for size, m in zip(sizes, keep))), keep  # one host read

        # Largest k whose pruned weight count fits the target: binary search over k with
        # the op (log2(#channels) calls over a vector of channel norms).
        lo, hi = 0, sum(n.numel() for n in norms) if target else 0
        keep = [torch.ones_like(n, dtype=torch.bool) for n in norms]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            count, masks = prune_channels(mid)
            if count <= target:
                lo, keep = mid, masks
            else:
                hi = mid - 1
        return [k.view(-1, *[1] * (w.dim() - 1)).expand(w.shape).clone() for k, w in zip(keep, weights)]

    @torch.no_grad()
    def _update_mask(self) -> None:
        s = self.target_sparsity(self.iteration)
        weights = [layer.weight for _, layer in self.layers]
        prev = [layer.weight_mask.clone() for _, layer in self.layers]
        pick = {"global": self._global, "layerwise": self._layerwise, "structured": self._structured}[self.mode]
        new = pick(weights, s)
        nnz_prev = torch.stack([m.sum() for m in prev]).to(torch.int64)
        nnz, flips = ops.mask_flips(new, prev)
        iou = ops.mask_iou(nnz_prev, nnz, flips)
        iou_all = ops.mask_iou(nnz_prev.sum(), nnz.sum(), flips.sum())
        set_masks(self.layers, new)
        nnz_l, flips_l, iou_l = nnz.tolist(), flips.tolist(), iou.tolist()
        layers = {}
        for i, (name, layer) in enumerate(self.layers):
            numel = layer.weight.numel()
            layers[name] = {"density": nnz_l[i] / numel if numel else 1.0, "flips": flips_l[i], "iou": iou_l[i]}
        total = sum(layer.weight.numel() for _, layer in self.layers)
        self.history.append({
            "iteration": self.iteration, "sparsity": s,
            "density": sum(nnz_l) / total if total else 1.0,
            "flips": sum(flips_l), "iou": float(iou_all), "layers": layers,
        })
