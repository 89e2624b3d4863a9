"""The default layer selection of the structured modes (DPF(mode="structured"),
ConstrainedL0 / PenalizedL0 with structured=True): the convs purge can slice.

A structured mask pays off only where export(purge=True) removes the channels it zeroes.
Gating or pruning every conv spent the budget on convs whose channels feed an add (a
ResNet's stem, every block's second conv and its shortcut), which purge must keep whole,
and which the network cannot lose: on the README's 8-epoch ResNet-20 digits run, DPF's
global ℓ2 filter ranking pruned all 16 channels of the stem and of both 1×1 shortcuts
(kaiming fan-out init gives them the smallest filter norms) and ended at 10% train and
test accuracy. The authors' structured-L0 ResNets gate the first conv of each block only.

So without an `include`, a structured method takes the layers it took before minus the
Conv2d layers sparsekern.nn.purgeable_layers does not list: every Linear (and attention
projection) it selected stays, and `exclude` / ignore_classifier apply as before. An
explicit `include` is used as given.
"""
from __future__ import annotations

import re
import warnings

from torch import nn

from ..nn.purgeable import analyse
from ..nn.sparsify import planned_layer_names


def structured_include(model, include, exclude, *, method: str, keep=()):
    """The `include` a structured method passes to sparsify: `include` when given (or
    when `model` is not a module or has no Conv2d, for the base class to handle as
    before), else exact patterns for planned_layer_names(model, None, exclude) without
    the Conv2d layers purge cannot remove, except those named in `keep` (a per-layer
    target names its layer explicitly). When torch.fx cannot trace `model`, warns (once,
    saying why) and returns None: every layer is selected, as before."""
    if include is not None or not isinstance(model, nn.Module):
        return include
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return include
    names = planned_layer_names(model, None, exclude)  # a bad `exclude` raises here, naming it
    purgeable, why = analyse(model)
    if purgeable is None:
        warnings.warn(
            f"{method}: torch.fx cannot trace {type(model).__name__} ({why}), so the structured default cannot tell "
            "which convs export(purge=True) can slice: every Conv2d and Linear is selected, including convs whose "
            "zero channels purge must keep (a residual block's output, a shortcut) and whose loss can break the "
            "network. Pass `include` to choose the layers.",
            stacklevel=3,
        )
        return None
    modules = dict(model.named_modules())
    keep = {k for k in keep if isinstance(k, str)}
    chosen = [n for n in names
              if not isinstance(modules.get(n), nn.Conv2d) or n in purgeable or n in keep]
    if not chosen:
        raise ValueError(
            f"{method}: none of the layers {names} can be purged once structured-pruned (every Conv2d's output "
            "reaches an add, a cat or the model output, and there is no Linear to prune); pass `include` to choose "
            "layers anyway")
    if chosen == names:
        return None  # the same selection: leave sparsify's default in place
    return [re.compile(re.escape(n)) for n in chosen]
