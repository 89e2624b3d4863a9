"""sparsify(): swap a model's nn.Linear / nn.Conv2d for their sparse versions in place."""
from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from typing import Iterable, Iterator, NamedTuple, Union

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

from .._checks import first_few
from ..ops.mask_math import FLOAT_DTYPES
from .attention import SparseMultiheadAttention, projection_names
from .batchnorm import gate_batchnorms
from .masks import make_mask
from .modules import SPARSE_TYPES, SparseConv2d, SparseLinear, carry_hooks
from .transformer import SparseTransformerEncoderLayer

Pattern = Union[str, "re.Pattern[str]"]

SWAPS = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def _unsupported(module: nn.Module) -> bool:
    """Weight layers sparsify cannot swap. Subclasses of Linear/Conv2d are refused too:
    their forward may not use `weight` the way the swap assumes (MultiheadAttention's
    out_proj is a Linear subclass whose weight the attention reads: it is swapped with its
    attention instead)."""
    if isinstance(module, SPARSE_TYPES) or type(module) in SWAPS:
        return False
    return isinstance(module, (nn.Linear, _ConvNd, nn.Bilinear, LazyModuleMixin))


def _reparametrised(module: nn.Module) -> bool:
    """A weight or bias that is not an nn.Parameter: a forward pre-hook recomputes it
    (torch.nn.utils.prune keeps `weight_orig`; the swap then failed halfway, with the
    earlier layers already swapped)."""
    return any(t is not None and not isinstance(t, nn.Parameter) for t in (module.weight, module.bias))


# `self.<path>.weight` / `.bias` used as a tensor, not only for its metadata.
_DIRECT_READ = re.compile(r"self\.((?:\w+\.)*\w+)\.(weight|bias|in_proj_weight|in_proj_bias|[qkv]_proj_weight)\b"
                          r"(?!\s*\.\s*(?:shape|dtype|device|size|ndim|dim|numel|requires_grad)\b)")


@functools.lru_cache(maxsize=None)
def _forward_reads(cls: type) -> frozenset[str]:
    """`p.weight` / `p.bias` for each `self.p.weight` or `self.p.bias` that `cls`'s
    forward (or a `_forward*` method of it) reads as a tensor. Such a parent hands the
    child's dense parameter to some function itself (torchvision's Swin attention passes
    `self.qkv.weight` to shifted_window_attention), so a mask on the child would never be
    applied: training would ignore it and the export would not match the model trained.
    Source that cannot be read (builtins, compiled code) gives nothing."""
    reads = set()
    for name in dir(cls):
        if not (name == "forward" or name.startswith("_forward")):
            continue
        fn = getattr(cls, name, None)
        if not inspect.isfunction(fn) or fn is getattr(nn.Module, name, None):
            continue
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        reads.update(f"{m.group(1)}.{m.group(2)}" for m in _DIRECT_READ.finditer(source))
    return frozenset(reads)


def _bypassed(model: nn.Module, name: str, own_parent: bool = False) -> str | None:
    """Why a mask on layer `name` would be bypassed (an ancestor's forward reads its
    parameters directly), or None. own_parent: the parent is swapped too (an attention's
    projection), so only its ancestors count."""
    parts = name.split(".")
    for i in range(len(parts) - own_parent):
        ancestor = model.get_submodule(".".join(parts[:i]))
        rel = ".".join(parts[i:])
        cls = _retype_target(type(ancestor)) or type(ancestor)  # what it will be once a layer below is sparse
        reads = sorted(r for r in _forward_reads(cls) if r.rpartition(".")[0] == rel)
        if reads:
            return f"{type(ancestor).__name__}.forward reads {' and '.join(f'`self.{r}`' for r in reads)}"
    return None


def _names(names: list[str], shown: int = 3) -> str:
    return first_few([repr(n) for n in names], shown)


def _exclude_hint(refused: list[str], selected: list[str]) -> str:
    """`exclude` patterns ('*.<last two parts>') that match the refused layers and nothing
    else selected, to quote in the error; empty when none is that precise."""
    hints = []
    for name in refused:
        pattern = "*." + ".".join(name.split(".")[-2:]) if name.count(".") >= 2 else name
        matched = [n for n in selected if _matches(pattern, n)]
        if pattern not in hints and matched and set(matched) <= set(refused):
            hints.append(pattern)
    if not hints or not all(any(_matches(h, n) for h in hints) for n in refused):
        return ""
    return f" (e.g. exclude={hints})"


def _patterns(name: str, value) -> list:
    """include/exclude as a list of patterns; a single pattern is accepted as is."""
    if value is None:
        return []
    if isinstance(value, (str, re.Pattern)):
        return [value]
    if isinstance(value, (bytes, bytearray)):  # iterable: its ints were reported as the patterns
        raise TypeError(f"`{name}` must be a pattern or a list of patterns, got {type(value).__name__}")
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a pattern or a list of patterns, got {type(value).__name__}") from None
    for p in items:
        if not isinstance(p, (str, re.Pattern)):
            raise TypeError(f"`{name}` patterns must be str (fnmatch) or re.Pattern, got {type(p).__name__}")
    return items


def _matches(pattern, name: str) -> bool:
    """A pattern matches a module name or any of its ancestors' names, so "layer1" covers
    "layer1.0.conv1". str patterns are fnmatch globs, re.Pattern ones must fullmatch."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if isinstance(pattern, str):
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
        elif pattern.fullmatch(prefix):
            return True
    return False


def _selected(name: str, include: list, exclude: list) -> bool:
    if include and not any(_matches(p, name) for p in include):
        return False
    return not any(_matches(p, name) for p in exclude)


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every SparseLinear / SparseConv2d in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SPARSE_TYPES):
            yield name, module


def sparsify(
    model: nn.Module,
    mask: str = "binary",
    include: Iterable[Pattern] | Pattern | None = None,
    exclude: Iterable[Pattern] | Pattern | None = None,
    **mask_options,
) -> nn.Module:
    """Replaces every selected nn.Linear and nn.Conv2d of `model` by SparseLinear /
    SparseConv2d with mask kind `mask` and `mask_options`, in place, and returns `model`.
    An nn.MultiheadAttention counts as its projections, `<name>.in_proj` (or `.q_proj`,
    `.k_proj`, `.v_proj`) and `<name>.out_proj`, and becomes a SparseMultiheadAttention
    masking the ones selected. A parent whose own forward reads a sparse layer's weight
    (nn.TransformerEncoderLayer, torchvision's Swin attention) changes class in place to
    one that applies the mask (transformer.Retyped).

    A BatchNorm2d that directly and exclusively consumes a structured hard-concrete
    conv's output becomes a GatedBatchNorm2d, in place (same state_dict): a channel the
    conv's gate closes comes out of it as exactly 0, not as the BatchNorm's shift, and its
    running statistics stay (sparsekern.nn.batchnorm; needs a torch.fx-traceable model,
    else it warns and leaves the BatchNorms as they are).

    A layer is selected when it matches some `include` pattern (all layers when include is
    None) and no `exclude` pattern; patterns are matched against module names (see
    _matches); a layer shared under several names is selected when any of them is. A
    hard_concrete `seed` option seeds the first layer and seed + i the i-th. Weights
    and biases are shared, not copied; the layers' forward / backward hooks carry over.
    A layer whose weight is not a plain Parameter (torch.nn.utils.prune, old-style
    weight_norm) is refused. Layers that are already sparse are
    left as they are. Every argument is checked before the model changes: an unknown kind or
    option, a malformed or unused pattern, or a selected layer of an unsupported type
    (Conv1d, ConvTranspose2d, LazyLinear, a Linear subclass, ...) raises and leaves the model
    untouched; exclude such a layer to leave it dense.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    make_mask(mask, **mask_options)  # validates the kind and its options
    plan = _plan(model, include, exclude)
    if mask_options.get("seed") is not None:  # the last layer's seed must be valid too
        make_mask(mask, **{**mask_options, "seed": mask_options["seed"] + plan.new_layers - 1})

    # One sparse module per dense one, so a layer shared by two parents stays shared.
    swapped: dict[int, nn.Module] = {}
    seeds = 0
    for name, module in plan.targets:
        if id(module) not in swapped:
            options = dict(mask_options)
            if options.get("seed") is not None:
                # One seed for the model; each layer gets its own noise stream.
                options["seed"] = mask_options["seed"] + seeds
            if type(module) is nn.MultiheadAttention:
                which = plan.projections[id(module)]
                swapped[id(module)] = SparseMultiheadAttention.from_dense(module, mask, projections=which, **options)
                seeds += len(which)
            else:
                swapped[id(module)] = SWAPS[type(module)].from_dense(module, mask, **options)
                seeds += 1
            carry_hooks(module, swapped[id(module)])
        model.set_submodule(name, swapped[id(module)])
    _retype_parents(model)
    gate_batchnorms(model)
    return model


def _retype_target(cls: type) -> type | None:
    """The class a parent of this class gets once a layer below it is sparse (its own
    forward reads that layer's weights itself; see transformer.Retyped), or None."""
    if cls is nn.TransformerEncoderLayer:
        return SparseTransformerEncoderLayer
    if cls.__module__ == "torchvision.models.swin_transformer":
        from . import swin  # imports torchvision: only for models that have it loaded

        return swin.RETYPED.get(cls)
    return None


def _retype_parents(model: nn.Module) -> None:
    # In place, like the rest of sparsify: the model itself and shared parents included.
    for module in model.modules():
        target = _retype_target(type(module))
        if target is not None and any(isinstance(m, SPARSE_TYPES) for m in module.modules()):
            module.__class__ = target


class _Plan(NamedTuple):
    targets: list  # (name, module) to swap: every name of each chosen layer or attention
    projections: dict  # id(attention) -> the names of its projections to mask
    layer_names: list  # the sparse layers' names after the swap, in module order (first names)
    new_layers: int  # how many sparse layers the swap makes


def _plan(model: nn.Module, include, exclude) -> _Plan:
    """What sparsify(model, include=..., exclude=...) swaps, checked without changing the
    model. An nn.MultiheadAttention `a` stands for its projections, `a.in_proj` (or
    `a.q_proj`, `a.k_proj`, `a.v_proj`) and `a.out_proj` (the names they get), selected by
    those names; it is swapped when any is."""
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    root = {**{k: v.__name__ for k, v in SWAPS.items()}, nn.MultiheadAttention: "SparseMultiheadAttention"}
    if type(model) in root:
        raise TypeError(f"sparsify swaps a model's layers in place and cannot replace the model itself, a "
                        f"{type(model).__name__}: use {root[type(model)]}.from_dense(model)")
    named = list(model.named_modules(remove_duplicate=False))
    attentions = [(n, m) for n, m in named if n and type(m) is nn.MultiheadAttention]
    names = [n for n, _ in named if n] + [f"{n}.{p}" for n, m in attentions for p in projection_names(m)[:-1]]
    for arg, patterns in (("include", include), ("exclude", exclude)):
        for p in patterns:
            if not any(_matches(p, name) for name in names):
                shown = p if isinstance(p, str) else p.pattern
                raise ValueError(f"`{arg}` pattern {shown!r} matches no module of the model")

    projections: dict[int, list[str]] = {}  # id(attention) -> the projections to mask, in order
    for n, m in attentions:
        old = projections.get(id(m), [])  # shared: selected under any of its names
        which = [p for p in projection_names(m) if p in old or _selected(f"{n}.{p}", include, exclude)]
        if which:
            projections[id(m)] = which
    out_projs = {id(m.out_proj) for _, m in attentions}
    selected = [(n, m) for n, m in named if n and id(m) not in out_projs and _selected(n, include, exclude)]
    refused = [f"{n!r} ({type(m).__name__})" for n, m in selected if _unsupported(m)]
    if refused:
        raise TypeError(
            f"sparsify supports nn.Linear, nn.Conv2d and nn.MultiheadAttention only; cannot sparsify "
            f"{', '.join(refused)}. Add them to `exclude` to leave them dense."
        )
    reparametrised = [n for n, m in selected if type(m) in SWAPS and _reparametrised(m)]
    if reparametrised:
        raise ValueError(
            f"sparsify cannot mask {_names(reparametrised)}: their weight or bias is computed from other tensors "
            "each forward (torch.nn.utils.prune, or the old-style weight_norm / spectral_norm hooks), so a mask "
            "on it would be overwritten. Make it a plain parameter first (torch.nn.utils.prune.remove(layer, "
            "'weight'), remove_weight_norm, ...), or add them to `exclude`."
        )
    # Each layer to be masked, by the name it will have.
    layers = [(n, m) for n, m in selected if type(m) in SWAPS]
    for n, m in attentions:
        layers += [(f"{n}.{proj}", m) for proj in projections.get(id(m), [])]
    # Refused here, by name: a float8 or complex layer got as far as the first forward or
    # the first pruning step and failed there, with a promotion error or the name of an
    # internal op (a complex binary layer even trained, until a method ranked its weights).
    odd = [f"{n!r} ({p.dtype})" for n, m in layers
           for p in [next((p for p in m.parameters() if p.dtype not in FLOAT_DTYPES), None)] if p is not None]
    if odd:
        raise TypeError(
            f"sparsify supports float32, float16, bfloat16 and float64 layers; cannot sparsify {first_few(odd)}. "
            "Convert the model first (model.float()), or add them to `exclude` to leave them dense."
        )
    bypassed: dict[str, list[str]] = {}
    for n, m in layers:
        parent, _, proj = n.rpartition(".")
        if type(m) is nn.MultiheadAttention:
            # Read as `<attention>.in_proj_weight` (q_proj_weight, ...) or
            # `<attention>.out_proj.weight` above it.
            why = _bypassed(model, n, own_parent=True) if proj == "out_proj" else _bypassed(model, parent)
        else:
            why = _bypassed(model, n)
        if why is not None:
            bypassed.setdefault(why, []).append(n)
    if bypassed:
        listed = "; ".join(f"{why}: {_names(names)}" for why, names in bypassed.items())
        raise TypeError(
            f"sparsify cannot mask layers whose parameters another module's forward reads directly: the mask "
            f"would be bypassed ({listed}). Add them to `exclude` to leave them dense"
            f"{_exclude_hint([n for names in bypassed.values() for n in names], [n for n, _ in layers])}."
        )
    # A layer shared under several names is swapped at all of them when any is selected,
    # so it stays one shared layer.
    chosen = {id(m) for _, m in layers}
    targets = [(n, m) for n, m in named if n and id(m) in chosen]
    if not targets:
        raise ValueError("sparsify: no nn.Linear or nn.Conv2d selected (already sparse, or excluded)")
    layer_names = []
    for n, m in model.named_modules():
        if id(m) in projections:
            layer_names += [f"{n}.{proj}" for proj in projections[id(m)]]
        elif id(m) in chosen or isinstance(m, SPARSE_TYPES):
            layer_names.append(n)
    new_layers = sum(len(projections[i]) if i in projections else 1 for i in chosen)
    return _Plan(targets, projections, layer_names, new_layers)


def planned_weights(model: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) for each layer planned_layer_names gives, read from the model as it
    is now (an attention's in-projection: its in_proj_weight / q_proj_weight, ...)."""
    weights = []
    for name in _plan(model, include, exclude).layer_names:
        parent, _, last = name.rpartition(".")
        owner = model.get_submodule(parent)
        if type(owner) is nn.MultiheadAttention and last != "out_proj":
            weights.append((name, getattr(owner, f"{last}_weight")))
        else:
            weights.append((name, model.get_submodule(name).weight))
    return weights


def planned_layer_names(model: nn.Module, include=None, exclude=None) -> list[str]:
    """The names the sparse layers of `model` will have after sparsify(model, include=...,
    exclude=...) (the ones already sparse included), without changing the model; raises
    what sparsify would."""
    return _plan(model, include, exclude).layer_names
