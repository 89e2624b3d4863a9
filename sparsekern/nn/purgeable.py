"""purgeable_layers(): the Conv2d layers whose zeroed output channels export(purge=True)
can remove, found with purge's own group analysis (sparsekern.nn.purge), without
changing or copying the model's weights.

Structured pruning pays off only where purge can slice the channels it zeroes. A
residual block's second conv, its 1×1 shortcut and the stem of a ResNet all feed an add:
their zero channels stay in the exported model, and the structured methods that used to
gate or prune every conv spent their budget there (README, Methods: DPF's global filter
ranking pruned the whole stem and both shortcuts of ResNet-20, which then scored 10%).
The structured methods' default selection (sparsekern.methods._structured) uses this.

Which convs count, from the torch.fx graph purge builds:
- a plain Conv2d (groups = 1, called once, parameters not tied) whose output reaches
  Conv2d / Linear consumers through per-channel modules alone (BatchNorm, elementwise
  activations, pooling, dropout, flatten, depthwise convs): purge's _Purger._group;
- a depthwise conv on such a path (MobileNet's): a zero filter makes its channel a
  constant that purge removes with the group's channel (the expansion conv's and the
  consumers' slices).
An add, a cat, a multiply, a view or reshape, a grouped conv or the model output ends a
group, and its producer is not purgeable. The analysis is structural: whether a zeroed
channel actually goes also depends on the constant it then carries (its bias, a
BatchNorm's shift) being 0 or foldable into the consumer's bias (a Linear or an unpadded
conv); structured L0's gated BatchNorms make it 0, DPF's plain ones may not.

A flatten → Linear step is taken as per-channel (channel o of [N, C, H, W] becomes
features o·HW … (o+1)·HW − 1) when the Linear's in_features is a multiple of C; purge
needs export(..., example_input=...) to learn HW and slice through it (`sparsekern train`
gives one; without it such channels are kept).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from . import purge
from .export import bake


class _Analysis(purge._Purger):
    """purge's _Purger on a shape-less graph: a flatten(x, 1) of a conv's output passes
    as channel-major without the example input's shapes."""

    def _flattened(self, node: fx.Node, start, layout, factor):
        if purge._shape(node.args[0]) is None and start == 1 and layout == "conv":
            return "flat", 0  # factor unknown: only whether the group reaches consumers matters here
        return super()._flattened(node, start, layout, factor)


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` made of plain torch modules (sparse layers, gated BatchNorms and
    retyped parents baked back, as export does) whose parameters and buffers are meta
    tensors: the structure purge traces, at no weight memory and without touching `model`."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return bake(copy.deepcopy(model, memo))


def analyse(model: nn.Module) -> tuple[list[str] | None, str | None]:
    """(purgeable Conv2d names in module order, None), or (None, why) when torch.fx cannot
    trace `model`. A model without a Conv2d gives ([], None) without a trace."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return [], None
    skeleton = _skeleton(model)
    try:
        analysis = _Analysis(skeleton, None)
    except ValueError as e:  # purge's "needs a model torch.fx can trace", the fx error as its cause
        cause = e.__cause__ if e.__cause__ is not None else e
        return None, f"{type(cause).__name__}: {cause}"
    found: set[str] = set()
    for node in analysis.gm.graph.nodes:
        m = purge._module(skeleton, node)
        if type(m) is not nn.Conv2d or analysis._producer_layout(node) is None:
            continue
        group = analysis._group(node)
        if group is None or not group.consumers or not _widths_fit(skeleton, group, m.out_channels):
            continue
        found.add(str(node.target))
        found.update(str(n.target) for n in group.chain if purge._depthwise(purge._module(skeleton, n)))
    names = [name for name, m in skeleton.named_modules() if name in found]
    return names, None


def _widths_fit(skeleton: nn.Module, group, channels: int) -> bool:
    """Every consumer takes the group's channels as its inputs (times the flattened
    spatial size after a flatten): a shape this analysis did not foresee (an unbatched
    conv flattened over its spatial dims) is not purgeable."""
    for node, _ in group.consumers:
        width = purge._module(skeleton, node).weight.shape[1]
        if width % channels:
            return False
    return True


def purgeable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d layers of `model` (nn.Conv2d or SparseConv2d, in module order)
    whose output channels export(purge=True) can remove once they are zero: see the
    module docstring for what counts. Works on a dense or a sparsified model (sparse
    layers count as the plain layers export makes of them) and leaves it unchanged: the
    trace runs on a copy of its structure whose tensors are on the meta device, so no
    weight is copied. Raises ValueError when torch.fx cannot trace the model (the fx error
    is in the message and chained), since then purge removes nothing: callers that want a
    fallback catch it. A model without a Conv2d gives [] without tracing.

        >>> purgeable_layers(resnet20)   # the first conv of each of the 9 blocks
        ['layer1.0.conv1', 'layer1.1.conv1', ..., 'layer3.2.conv1']
    """
    names, why = analyse(model)
    if names is None:
        raise ValueError(f"purgeable_layers needs a model torch.fx can trace ({why})")
    return names
