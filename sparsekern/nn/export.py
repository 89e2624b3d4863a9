"""export(): a plain-PyTorch copy of a sparse model, optionally with zero channels purged."""
from __future__ import annotations

import copy
import sys
import warnings
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .purge import purge_channels
from .attention import SparseMultiheadAttention, projection_names
from .batchnorm import GatedBatchNorm2d
from .heads import PrunedMultiheadAttention
from .modules import SPARSE_TYPES, SparseLinear, carry_hooks
from .transformer import Retyped

# Modules holding sparse layers that bake() turns back into their torch class.
PARENTS = (SparseMultiheadAttention, Retyped)
# Baked with the sparse layers: a plain BatchNorm2d with the conv's eval gate in it.
BAKED = SPARSE_TYPES + (GatedBatchNorm2d,)
# Attention modules: their projections' weights are used by the module itself, not called.
ATTENTION = (nn.MultiheadAttention, PrunedMultiheadAttention)


class Exported(NamedTuple):
    """What export() returns: `model, stats = export(m)` or `export(m).model`."""

    model: nn.Module
    stats: dict


def _swin_attention(m: nn.Module) -> bool:
    """torchvision's Swin attention (or its sparse subclass): it hands its qkv / proj
    weights to a function, so the Linear hooks never see them (swin_t counted 2.96 GMAC
    of torch.utils.flop_counter's 4.49)."""
    swin = sys.modules.get("torchvision.models.swin_transformer")  # loaded if the model has one
    return swin is not None and isinstance(m, (swin.ShiftedWindowAttention, swin.ShiftedWindowAttentionV2))


def is_attention(m: nn.Module) -> bool:
    """An attention whose MACs attention_macs counts (its projections are not called)."""
    return isinstance(m, ATTENTION) or _swin_attention(m)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters once)."""
    _check_model(model)  # public: None raised an AttributeError ('parameters')
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_with_layer_hooks(model: nn.Module, example: torch.Tensor, hook) -> None:
    """One eval-mode forward of `example` with hook(module, inputs, output) on every
    Conv2d / Linear / attention (ATTENTION; inputs: its (query, key) however they were
    passed); the model's mode is restored and the hooks removed afterwards."""
    def attention_hook(m, args, kwargs, out):
        inputs = list(args[:2]) + [kwargs.get(name) for name in ("query", "key")[len(args):]]
        hook(m, tuple(inputs), out)

    handles = []
    for m in model.modules():
        if is_attention(m):
            handles.append(m.register_forward_hook(attention_hook, with_kwargs=True))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def attention_macs(m: nn.Module, inputs, nonzero: bool = False) -> int:
    """Multiply-accumulates of one attention call (ATTENTION) on inputs (query, key): its
    four projections (q, k and v: the in-projection's three row blocks, or its three
    weights) and the two weight-free products softmax(q kᵀ) v over the heads' inner
    features (embed_dim, or a pruned attention's kept heads'). nonzero: the projections
    count only nonzero weights (an exported model's, where masks are baked in). Swin
    attention: swin_macs."""
    if _swin_attention(m):
        return swin_macs(m, inputs[0], nonzero)
    query, key = inputs
    weights = _attention_weights(m)
    q, k, v, out = (int(w.ne(0).sum()) if nonzero else w.numel() for w in weights)
    inner = weights[0].shape[0]
    tokens_q, tokens_k = query.numel() // m.embed_dim, key.numel() // m.kdim  # value has as many as key
    seq_k = key.shape[1 if m.batch_first and key.dim() == 3 else 0]
    seq_k += (m.bias_k is not None) + bool(m.add_zero_attn)  # the extra key/value rows
    return tokens_q * (q + out) + tokens_k * (k + v) + 2 * tokens_q * seq_k * inner


def swin_macs(m: nn.Module, x: torch.Tensor, nonzero: bool = False) -> int:
    """torchvision's shifted_window_attention on x [B, H, W, C]: H and W padded up to
    window multiples, T tokens in windows of N; qkv and proj on every token, and
    softmax(q kᵀ) v within each window over the C inner features (2·T·N·C)."""
    B, H, W, C = x.shape
    wh, ww = m.window_size
    tokens = B * (-(-H // wh) * wh) * (-(-W // ww) * ww)
    weights = [_used_weight(p) for p in (m.qkv, m.proj)]
    per_token = sum(int(w.ne(0).sum()) if nonzero else w.numel() for w in weights)
    return tokens * per_token + 2 * tokens * wh * ww * C


def _used_weight(proj: nn.Linear) -> torch.Tensor:
    """A projection's weight as its attention uses it in eval mode (a sparse one's masked)."""
    return proj.effective_weight()[0] if isinstance(proj, SparseLinear) else proj.weight


def _attention_weights(m: nn.Module) -> list[torch.Tensor]:
    """The q, k, v and output projection weights as used (masks applied), detached."""
    if isinstance(m, PrunedMultiheadAttention):
        weights = m.projection_weights()
    elif isinstance(m, SparseMultiheadAttention):
        projections = [getattr(m, n) for n in projection_names(m)]
        weights = [_used_weight(p) for p in projections]
    elif m._qkv_same_embed_dim:
        weights = [m.in_proj_weight, m.out_proj.weight]
    else:
        weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight, m.out_proj.weight]
    if len(weights) == 2:  # packed: q, k and v are the row blocks
        weights = [*weights[0].chunk(3), weights[1]]
    return [w.detach() for w in weights]


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of the Conv2d, Linear and MultiheadAttention layers for one
    forward of `example` (the whole batch given), counted with forward hooks in eval mode
    (attention: attention_macs); other layers' (BatchNorm, activations, pooling, the
    residual adds) are not counted."""
    _check_model(model)
    if not isinstance(example, torch.Tensor):  # a shape raised torch's "linear(): argument 'input'" error
        raise TypeError(f"`example` must be a tensor, got {type(example).__name__}")
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if is_attention(m):
            total += attention_macs(m, inputs)
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out.numel() * (m.in_channels // m.groups) * kh * kw
        else:
            total += out.numel() * m.in_features

    forward_with_layer_hooks(model, example, hook)
    return total


def _example(model: nn.Module, example_input) -> torch.Tensor | None:
    """example_input as a tensor: a tensor is used as is, a shape gets zeros with the
    model's first parameter's device and dtype."""
    if example_input is None or isinstance(example_input, torch.Tensor):
        return example_input
    if isinstance(example_input, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in example_input):
        if any(s < 0 for s in example_input):  # torch.zeros raised a RuntimeError not naming it
            raise ValueError(f"`example_input` shape must be sizes >= 0, got {tuple(example_input)}")
        p = next(model.parameters(), None)
        return torch.zeros(tuple(example_input), device=None if p is None else p.device, dtype=None if p is None else p.dtype)
    raise TypeError(f"`example_input` must be a tensor, a shape (tuple of ints) or None, got {type(example_input).__name__}")


def bake(model: nn.Module) -> nn.Module:
    """Replaces every sparse module of `model` in place by its to_dense() (w ⊙ g baked in);
    returns `model`, or the dense module when `model` itself is sparse."""
    if isinstance(model, BAKED + PARENTS):
        return bake(model.to_dense())
    # Attention first: its sparse projections are baked into its dense copy, not replaced.
    # A gated BatchNorm reads its conv's gate, which it holds whether or not that conv
    # was baked already.
    for types in (PARENTS, BAKED):
        dense: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(sparse) -> (sparse, dense)
        for name, module in list(model.named_modules(remove_duplicate=False)):
            if name and isinstance(module, types):
                if id(module) not in dense:
                    dense[id(module)] = (module, module.to_dense())
                    carry_hooks(module, dense[id(module)][1])
                model.set_submodule(name, dense[id(module)][1])
        _retie(dense.values())
    return model


def _retie(pairs) -> None:
    """Layers that shared a weight (or bias) Parameter and bake to equal values share the
    baked one again: each baked its own copy, so a tied pair became two (an MLP with a
    tied 8×8 weight: 80 parameters, 144 after export). Masks that differ bake different
    weights, which stay two."""
    for attr in ("weight", "bias"):
        first: dict[int, nn.Parameter] = {}
        for sparse, baked in pairs:
            source, value = getattr(sparse, attr, None), getattr(baked, attr, None)
            if not isinstance(source, nn.Parameter) or value is None:
                continue
            kept = first.setdefault(id(source), value)
            if kept is not value and kept.requires_grad == value.requires_grad and torch.equal(kept, value):
                setattr(baked, attr, kept)


def export(model: nn.Module, purge: bool = False, example_input=None) -> Exported:
    """A deep copy of `model` made of plain torch modules, with every sparse layer's
    eval-mode effective weight w ⊙ g baked in (g: the mask, σ-gate, relaxed m or median
    hard-concrete gate), so in eval mode it computes what `model` computes. `model` itself
    is not changed. A sigmoid mask's soft gate is never exactly 0; to export CS's binary
    ticket (s > 0), give the model binary masks with that support first.

    purge=True also removes structured zero channels (see sparsekern.nn.purge): conv output
    channels / linear neurons that are all zero, or that no later layer reads, with the
    next layer's inputs and the BatchNorm, depthwise conv and squeeze-excitation in between
    sliced, and residual blocks' output channels kept; and attention heads whose out_proj
    columns are all zero (sparsekern.nn.heads). Needs a torch.fx-traceable model.

    A GatedBatchNorm2d becomes a plain nn.BatchNorm2d with its conv's eval gate baked in
    (GatedBatchNorm2d.to_dense), so its closed channels output 0 and purge removes them.

    example_input: a tensor or a shape; used to count MACs (before/after) and, when
    purging, to learn the spatial size behind a flatten → Linear step.

    Returns Exported(model, stats), stats = {"params_before", "params_after",
    "macs_before", "macs_after" (None without example_input), "removed_channels" and
    "kept_zero_channels" ({layer: count}; kept = all-zero output channels of a Conv2d /
    Linear that stay: their output reaches something purge does not slice (an add, a cat,
    a multiply other than squeeze-excitation's, a reshape, a grouped conv, the model
    output) or a constant that could not be removed exactly (into a padded conv, or times
    a squeeze-excitation's varying scale); "<attention>.heads": attention heads removed,
    see sparsekern.nn.heads)}.
    """
    _check_model(model)
    if not isinstance(purge, bool):
        raise TypeError(f"`purge` must be a bool, got {type(purge).__name__}")
    example = _example(model, example_input)

    exported = bake(copy.deepcopy(model))
    try:  # the first forward of `example`: a shape that does not fit fails here
        macs_before = None if example is None else count_macs(exported, example)
    except (RuntimeError, ValueError) as e:
        # torch's "mat1 and mat2 shapes cannot be multiplied" (RuntimeError), or a BatchNorm's
        # "expected 4D input (got 3D input)" (ValueError) for a shape without its batch dim,
        # which a conv accepts unbatched: neither names the argument.
        raise ValueError(f"`example_input` of shape {tuple(example.shape)} does not fit the model's forward: {e}") from e
    stats = {"params_before": count_params(exported), "macs_before": macs_before}
    removed, kept = purge_channels(exported, example) if purge else ({}, {})
    stats.update(
        params_after=count_params(exported),
        macs_after=None if example is None else count_macs(exported, example),
        removed_channels=removed,
        kept_zero_channels=kept,
    )
    if example is not None:
        # A shape's zeros would hide a bypassed mask behind the biases: random values then.
        probe = example if isinstance(example_input, torch.Tensor) or not example.is_floating_point() else torch.randn(
            example.shape, generator=torch.Generator().manual_seed(0), dtype=example.dtype).to(example.device)
        _warn_if_outputs_differ(model, exported, probe)
    return Exported(exported, stats)


@torch.no_grad()
def _warn_if_outputs_differ(model: nn.Module, exported: nn.Module, example: torch.Tensor) -> None:
    """Compares the two models' eval outputs on `example`. They differ only where a layer's
    mask never applied: its parent passes `.weight` on through a helper or a local alias,
    which sparsify cannot see (such a model's export was 0.36 off, silently). Rounding of
    the baked weights and of purge's folded constants stays orders of magnitude below the
    tolerance (float32: ~1e-6 of the output's scale; bfloat16: up to 0.75 of its eps, 6e-3,
    which tripped a fixed 1e-3 and warned of a bypassed mask on most bfloat16 purges, so
    the tolerance is 4 eps where that exceeds 1e-3)."""
    outputs = []
    for m in (model, exported):
        was_training = m.training
        try:
            outputs.append(m.eval()(example))
        finally:
            m.train(was_training)
    expected, got = outputs
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)) or expected.shape != got.shape:
        return  # not one tensor each: nothing simple to compare
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((got - expected).abs().max()) if expected.numel() else 0.0
    eps = torch.finfo(expected.dtype).eps if expected.is_floating_point() else 0.0
    if diff > max(1e-3, 4 * eps) * (1.0 + scale):
        warnings.warn(
            f"the exported model's output differs from the masked model's by {diff:.3g} (outputs up to {scale:.3g}) on "
            "example_input: some layer's mask was not applied in the forward (a parent module that reads a sparse "
            "layer's .weight through a helper method or an alias bypasses it). Exclude such layers from sparsify.",
            stacklevel=3,
        )
