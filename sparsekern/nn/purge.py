"""Physically removing structured zero channels from a plain (exported) model.

The model is traced with torch.fx to find, for every plain Conv2d (groups=1) or Linear
("producer"), where its output goes. A producer's output channels can be removed only when
every path from it runs through per-channel modules (BatchNorm, elementwise activations,
pooling, dropout, flatten, depthwise convs, squeeze-excitation) into Conv2d/Linear
"consumers" and nowhere else. An add, a cat, any other multiply, a view, a grouped conv or
the model output stops the group, which is what keeps a residual block's output channels
(tied to its shortcut) intact while its inner channels can go. A depthwise conv (groups =
in = out channels: MobileNet's, EfficientNet's, ShuffleNet's) computes channel o from
channel o alone, so it is sliced with the group; a grouped conv or one with a channel
multiplier is not.

Squeeze-excitation (torchvision's SqueezeExcitation in MobileNetV3, EfficientNet, RegNetY;
fx traces into it) is x * act2(fc2(act1(fc1(pool(x))))), pool a global average (or max)
pool and fc1, fc2 unpadded 1×1 convs. fc1 reads the group through the pool (a consumer
like any other: a constant channel's pooled value folds into its bias); the multiply is
per-channel: output channel o is x_o · scale_o, and scale_o comes from fc2's row o alone,
used nowhere else, so fc2's row o (weight and bias) is sliced with the group. A channel of
x that is 0 stays 0 whatever its scale; a nonzero constant k becomes k · scale_o, which
varies with the input (the other channels feed the squeeze), unless fc2's row o is zero too
(scale_o = act2(bias_o), a constant). A multiply of two other tensors (another group's, a
scale not computed from x this way) still stops the group. The multiply stopped every SE
group: a width-0.25 EfficientNet-B0 with 40% of its structured L0 gates closed purged from
328,956 to 274,610 parameters, now to 145,594 (MobileNetV3-small: 72,388, now 42,200 of
119,842).

Channel o of a group is removed when removing it cannot change any consumer's input:
- every consumer ignores it (its input slice of the consumer's weight is all zero), or
- the producer's row o (or a depthwise conv's on the way) is all zero, so the channel
  carries a constant (its bias, then through BatchNorm's running statistics, the
  activations and unpadded depthwise convs) that is 0 where it reaches
  a consumer, or is folded exactly into that consumer's bias (a Linear, or a Conv2d without
  padding; with padding the borders see zeros, not the constant, so the channel stays).
The result equals the input model in eval mode (BatchNorm with running statistics).

torch.fx sees nn.TransformerEncoderLayer / DecoderLayer as leaves, so their feed-forward
hidden units get a pass of their own (_purge_transformer_layers), by the same rules.

Attention heads whose out_proj columns are all zero go too (sparsekern.nn.heads): the
nn.MultiheadAttention becomes a PrunedMultiheadAttention, inside torch's transformer layers
and wherever the fx graph calls one without reading its attention weights.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .heads import PrunedMultiheadAttention, prune_heads, weights_unused
from .._checks import first_few
from .sparsify import sparse_modules

# Per-channel modules a group may pass through, by what they do to a constant channel.
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)  # identity in eval
_CONSTANT_POOL = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.leaky_relu, F.hardsigmoid, F.hardswish,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}
_GLOBAL_POOL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_MULTIPLY = (operator.mul, torch.mul)


def _depthwise(m) -> bool:
    """A plain Conv2d computing output channel o from input channel o alone."""
    return type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels > 1


def _inplace(node: fx.Node, m) -> bool:
    """The node overwrites its input: an inplace module or functional call."""
    if m is not None:
        return bool(getattr(m, "inplace", False))
    return bool(node.kwargs.get("inplace", False)) or node.op == "call_function" and len(node.args) > 1 and node.args[-1] is True


@dataclass
class _Group:
    producer: fx.Node
    layout: str  # "conv": channels at dim 1 with spatial dims after; "linear": last dim
    chain: list = field(default_factory=list)  # intermediate nodes, graph order
    consumers: list = field(default_factory=list)  # (node, flatten factor)
    excitations: dict = field(default_factory=dict)  # the chain's SE multiplies: node -> _Excitation


@dataclass
class _Excitation:
    """x * scale in a squeeze-excitation block, scale = activations(fc2(...))."""
    x: fx.Node  # the multiply's operand that is the group's tensor
    fc2: fx.Node  # the 1×1 conv whose row o makes scale_o; sliced with the group
    activations: list  # the elementwise nodes from fc2 to the multiply, in order


def _module(model: nn.Module, node: fx.Node):
    return model.get_submodule(node.target) if node.op == "call_module" else None


def _shape(node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _flatten_start(node: fx.Node) -> int | None:
    """start_dim of a flatten(x, start_dim) node that flattens to the end, else None."""
    if node.op == "call_function" and node.target is torch.flatten or node.op == "call_method" and node.target == "flatten":
        args = list(node.args[1:]) + [None, None]
        start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
        end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
        return start if end == -1 else None
    return None


class _Tracer(fx.Tracer):
    """fx's tracer, with PrunedMultiheadAttention a leaf like the nn.MultiheadAttention it
    replaces (fx traces into modules outside torch.nn, and its forward branches on the
    input: purging a purged ViT again failed with a TraceError)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) is PrunedMultiheadAttention or super().is_leaf_module(m, qualname)


class _Purger:
    def __init__(self, model: nn.Module, example: torch.Tensor | None):
        self.model = model
        try:
            self.gm = fx.GraphModule(model, _Tracer().trace(model))
        except Exception as e:  # fx raises many types; the cause is kept
            raise ValueError(
                f"purge needs a model torch.fx can trace ({type(e).__name__}: {e}); export with purge=False"
            ) from e
        if example is not None:
            ShapeProp(self.gm).propagate(example)
        self.calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        self.tied = _tied(model)

    def _exclusive(self, node: fx.Node) -> bool:
        """Called once in the graph and owning untied parameters: safe to slice."""
        m = _module(self.model, node)
        return self.calls[node.target] == 1 and not any(id(p) in self.tied for p in m.parameters(recurse=False))

    def _producer_layout(self, node: fx.Node) -> str | None:
        m = _module(self.model, node)
        if type(m) is nn.Conv2d and m.groups == 1 and self._exclusive(node):
            return "conv"
        if type(m) is nn.Linear and self._exclusive(node):
            return "linear"
        return None

    def _group(self, producer: fx.Node) -> _Group | None:
        """The nodes between `producer` and its consumers, or None if its output escapes."""
        group = _Group(producer, self._producer_layout(producer))
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        stack, seen = [(producer, u, group.layout, 1) for u in producer.users], set()
        while stack:
            source, node, layout, factor = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            excitation = self._excitation(node, source, layout, group)
            if excitation is not None:
                group.excitations[node] = excitation
                group.chain.append(node)
                stack.extend((node, u, layout, factor) for u in node.users)
                continue
            if not node.args or node.args[0] is not source:
                return None  # the group's tensor is not the node's one input (e.g. an add)
            m = _module(self.model, node)
            if self._is_consumer(node, m, layout):
                group.consumers.append((node, factor))
                continue
            passed = self._pass_through(node, m, layout, factor)
            if passed is None or _inplace(node, m) and len(source.users) > 1:
                # In place with other readers: they read the changed tensor, which the graph
                # does not show (a conv feeding ReLU(inplace=True) and another conv had the
                # pre-ReLU constant folded into that conv's bias: off by 0.45).
                return None
            group.chain.append(node)
            stack.extend((node, u, *passed) for u in node.users)
        group.chain.sort(key=order.__getitem__)
        return group

    def _excitation(self, node, source, layout, group) -> _Excitation | None:
        """node = source * scale (either order), scale = act2(fc2(act1(fc1(pool(source))))),
        pool a global pool, fc1 / fc2 unpadded 1×1 convs, fc2 with one output per channel
        of the group and called only here: the squeeze-excitation shape, per-channel.
        Anything else multiplied in (another group's tensor, a scale of some other shape)
        is not, and the caller stops the group there."""
        if layout != "conv" or len(node.args) != 2 or node.kwargs:
            return None
        if not (node.op == "call_function" and node.target in _MULTIPLY or node.op == "call_method" and node.target == "mul"):
            return None
        a, b = node.args
        if (a is source) == (b is source):
            return None  # x * x, or source is not an operand
        scale = b if a is source else a
        activations = []
        while self._elementwise(scale) and len(scale.users) == 1:
            activations.append(scale)
            scale = scale.args[0]
        fc2 = scale
        if not self._squeeze_conv(fc2) or len(fc2.users) != 1:
            return None  # the scale is read elsewhere too: its rows are not the multiply's alone
        if _module(self.model, fc2).out_channels != _module(self.model, group.producer).out_channels:
            return None  # one scale for all channels, or a channel multiplier: not per-channel
        fc1 = fc2.args[0]
        while self._elementwise(fc1):
            fc1 = fc1.args[0]
        if not self._squeeze_conv(fc1):
            return None
        pool = fc1.args[0]
        m = _module(self.model, pool) if isinstance(pool, fx.Node) else None
        if type(m) not in _GLOBAL_POOL or m.output_size not in (1, (1, 1)) or pool.args != (source,) or pool.kwargs:
            return None  # the scale is not computed from the group's own tensor
        return _Excitation(source, fc2, activations[::-1])

    def _elementwise(self, node) -> bool:
        """A single-input elementwise node (the activations of a squeeze-excitation)."""
        if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op == "call_module":
            return type(_module(self.model, node)) in _ELEMENTWISE + _DROPOUT and len(node.args) == 1 and not node.kwargs
        if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS or node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            return not [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        return False

    def _squeeze_conv(self, node) -> bool:
        """An exclusive plain 1×1 conv without padding (a 1×1 input stays 1×1)."""
        if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return False
        m = _module(self.model, node)
        return (type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size == (1, 1) and self._foldable(m)
                and self._exclusive(node))

    def _is_consumer(self, node, m, layout) -> bool:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not self._exclusive(node):
            return False
        if type(m) is nn.Conv2d:
            return layout == "conv" and m.groups == 1
        return type(m) is nn.Linear and (layout == "linear" or layout == "flat")

    def _pass_through(self, node, m, layout, factor):
        """(layout, factor) after a per-channel node, or None if the group cannot pass it."""
        if node.op == "call_module":
            if len(node.args) != 1 or node.kwargs:
                return None
            # Exact types: a subclass may override forward with something not per-channel.
            if type(m) in _ELEMENTWISE + _DROPOUT:
                return layout, factor
            if type(m) is nn.BatchNorm2d and layout == "conv" or type(m) is nn.BatchNorm1d and self._is_2d(node, layout, factor):
                ok = m.track_running_stats and m.running_mean is not None and self._exclusive(node)
                return (layout, factor) if ok else None
            if type(m) in _CONSTANT_POOL + (nn.AvgPool2d,) and layout == "conv":
                return layout, factor
            if _depthwise(m) and layout == "conv":
                # Sliced with the group: it must not be shared with another call.
                return (layout, factor) if self._exclusive(node) else None
            if type(m) is nn.Flatten:
                return self._flattened(node, m.start_dim if m.end_dim == -1 else None, layout, factor)
            return None
        if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS or node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            extra = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
            return None if extra else (layout, factor)
        if _flatten_start(node) is not None:
            return self._flattened(node, _flatten_start(node), layout, factor)
        return None

    def _is_2d(self, node, layout, factor) -> bool:
        shape = _shape(node.args[0])
        return layout in ("linear", "flat") and factor == 1 and shape is not None and len(shape) == 2

    def _flattened(self, node, start, layout, factor):
        """A flatten(x, 1) of [N, C, H, W] maps channel o to features o·HW … (o+1)·HW − 1;
        the spatial size comes from the example input's shapes."""
        shape = _shape(node.args[0])
        if start != 1 or shape is None:
            return None
        if layout == "conv" and len(shape) >= 2:
            spatial = 1
            for s in shape[2:]:
                spatial *= s
            return "flat", spatial
        if layout in ("linear", "flat") and len(shape) == 2:
            return layout, factor
        return None

    # --- the per-channel constants and the decision -------------------------------------

    def _constants(self, group: _Group, weight: torch.Tensor, bias) -> dict:
        """For each node of the group, a float64 [C] tensor: the constant value of each
        channel whose producer row is all zero, NaN for channels that vary."""
        dead = weight.flatten(1).eq(0).all(1)
        c = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        if bias is not None:
            c = bias.detach().to(torch.float64).clone()
        values = {group.producer: torch.where(dead, c, torch.full_like(c, float("nan")))}
        for node in group.chain:
            if node in group.excitations:
                values[node] = self._excite(group.excitations[node], values[group.excitations[node].x])
            else:
                values[node] = self._propagate(node, values[node.args[0]])
        return values

    def _excite(self, excitation: _Excitation, x: torch.Tensor) -> torch.Tensor:
        """The constants of x * scale: 0 where x_o or scale_o is 0, x_o · scale_o where both
        are constant (scale_o is where fc2's row o is all zero: act2(bias_o); structured L0
        gates the bias with the row, so 0.5 after a sigmoid or hardsigmoid), else NaN."""
        fc2 = _module(self.model, excitation.fc2)
        w = fc2.weight.detach()
        s = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if fc2.bias is not None:
            s = fc2.bias.detach().to(torch.float64).clone()
        s = torch.where(w.flatten(1).eq(0).all(1), s, torch.full_like(s, float("nan")))
        for node in excitation.activations:
            s = self._propagate(node, s)
        return torch.where((x == 0) | (s == 0), torch.zeros_like(x), x * s)

    def _propagate(self, node, c: torch.Tensor) -> torch.Tensor:
        m = _module(self.model, node)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out = (c - m.running_mean.double()) / torch.sqrt(m.running_var.double() + m.eps)
            if m.affine:
                out = out * m.weight.detach().double() + m.bias.detach().double()
            return out
        if _depthwise(m):
            w = m.weight.detach().double().flatten(1)
            b = torch.zeros_like(c) if m.bias is None else m.bias.detach().double()
            # Every output tap sees the input constant unless zero padding replaces some of
            # them (the borders then differ from the interior); a zero constant gives the
            # bias everywhere either way. A zero row outputs its bias whatever comes in.
            if m.padding_mode != "zeros" or self._foldable(m):
                out = c * w.sum(1) + b
            else:
                out = torch.where(c == 0, b, torch.nan)
            return torch.where(w.eq(0).all(1), b, out)
        if isinstance(m, nn.AvgPool2d):
            # divisor_override scales a constant by k·k / divisor (ignored, a purge was off by 0.19).
            exact = (m.padding in (0, (0, 0)) or not m.count_include_pad) and m.divisor_override is None
            return c if exact and not m.ceil_mode else torch.where(c == 0, c, torch.nan)
        # Clones: an inplace activation must not overwrite the constants of its input node.
        if type(m) in _ELEMENTWISE:
            return m(c.clone())
        if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            return node.target(c.clone(), *node.args[1:], **node.kwargs)
        if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            return getattr(c.clone(), node.target)()
        return c  # dropout (eval), max/adaptive pooling, flatten: constants stay constant

    def _consumer_slices(self, node, n_channels: int) -> torch.Tensor:
        """The consumer's weight viewed as [out, C, rest]: its input slice per channel."""
        w = _module(self.model, node).weight.detach()
        return w.reshape(w.shape[0], n_channels, -1)

    @staticmethod
    def _foldable(m: nn.Module) -> bool:
        if isinstance(m, nn.Linear):
            return True
        return m.padding == "valid" or (not isinstance(m.padding, str) and all(p == 0 for p in m.padding))

    def attention_heads(self) -> dict:
        """Removes the closed heads of every nn.MultiheadAttention the graph calls once
        without reading its attention weights; {"<attention>.heads": heads removed}."""
        removed = {}
        for node in self.gm.graph.nodes:
            m = _module(self.model, node)
            if type(m) is nn.MultiheadAttention and self.calls[node.target] == 1 and weights_unused(node):
                removed.update(_replace_heads(self.model, str(node.target), self.tied))
        return removed

    def run(self) -> tuple[dict, dict]:
        removed, kept_zero = {}, {}
        for producer in list(self.gm.graph.nodes):
            m = _module(self.model, producer)
            if type(m) not in (nn.Conv2d, nn.Linear):
                continue
            name = str(producer.target)
            group = self._group(producer) if self._producer_layout(producer) is not None else None
            if group is None or not group.consumers:
                # Its output reaches something purge cannot slice (an add, a cat, a grouped
                # conv, the model output): its zero rows stay, and are counted as kept.
                # Uncounted, a model whose every zero channel was of this kind (ShuffleNet:
                # channel shuffles and cats) reported {} for both, as if none were zero.
                n_kept = int(m.weight.detach().flatten(1).eq(0).all(1).sum())
                if n_kept:
                    kept_zero[name] = n_kept
                continue
            n_removed, n_kept = self._purge(group)
            if n_removed:
                removed[name] = n_removed
            if n_kept:
                kept_zero[name] = n_kept
        return removed, kept_zero

    @torch.no_grad()
    def _purge(self, group: _Group) -> tuple[int, int]:
        prod = _module(self.model, group.producer)
        C = prod.weight.shape[0]
        values = self._constants(group, prod.weight, prod.bias)
        dead = ~torch.isnan(values[group.producer])
        removable = torch.ones(C, dtype=torch.bool, device=prod.weight.device)
        if any(_module(self.model, e.fc2).out_channels != C for e in group.excitations.values()):
            return 0, int(dead.sum())  # a shape this analysis did not foresee
        folds = []
        for node, factor in group.consumers:
            m = _module(self.model, node)
            if m.weight.shape[1] != C * factor:  # a shape this analysis did not foresee
                return 0, int(dead.sum())
            slices = self._consumer_slices(node, C)
            ignores = slices.eq(0).all(2).all(0)
            c = values[node.args[0]]
            const = ~torch.isnan(c)
            fold = const & (c != 0) & ~ignores
            ok = ignores | (const & (c == 0)) | (fold if self._foldable(m) else torch.zeros_like(fold))
            removable &= ok
            folds.append((m, slices, c, fold))
        if bool(removable.all()):
            removable[0] = False  # keep one channel: zero-width layers are not worth the edge cases
        keep = ~removable
        if not bool(removable.any()):
            return 0, int(dead.sum())
        for m, slices, c, fold in folds:
            fold = fold & removable
            if bool(fold.any()):
                # The removed constant channel's contribution, summed over the consumer's
                # kernel taps (every tap sees the constant: no padding), moves into its bias.
                delta = (slices[:, fold].double().sum(2) @ c[fold]).to(m.weight.dtype)
                if m.bias is None:
                    m.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=m.weight.requires_grad)
                m.bias.add_(delta)
            shape = m.weight.shape
            w = slices[:, keep].reshape(shape[0], -1, *shape[2:])
            _set_param(m, "weight", w)
            if isinstance(m, nn.Conv2d):
                m.in_channels = w.shape[1]
            else:
                m.in_features = w.shape[1]
        _slice_out(prod, keep)
        for node in group.chain:
            m = _module(self.model, node)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _slice_bn(m, keep)
            elif _depthwise(m):
                _slice_out(m, keep)
                m.in_channels = m.groups = m.out_channels
            elif node in group.excitations:
                # Row o of fc2 makes scale_o, which only multiplies channel o.
                _slice_out(_module(self.model, group.excitations[node].fc2), keep)
        return int(removable.sum()), int((dead & keep).sum())


def _tied(model: nn.Module) -> set[int]:
    """ids of the parameters that appear in more than one module: tied, so slicing one
    would untie them."""
    owners = Counter(id(p) for _, m in model.named_modules(remove_duplicate=False) for p in m.parameters(recurse=False))
    return {pid for pid, n in owners.items() if n > 1}


def _set_param(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(m, name)
    setattr(m, name, nn.Parameter(value.contiguous().clone(), requires_grad=old.requires_grad))


def _slice_out(m: nn.Module, keep: torch.Tensor) -> None:
    _set_param(m, "weight", m.weight[keep])
    if m.bias is not None:
        _set_param(m, "bias", m.bias[keep])
    if isinstance(m, nn.Conv2d):
        m.out_channels = int(keep.sum())
    else:
        m.out_features = int(keep.sum())


def _slice_bn(m: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> None:
    if m.affine:
        _set_param(m, "weight", m.weight[keep])
        _set_param(m, "bias", m.bias[keep])
    m.running_mean = m.running_mean[keep].clone()
    m.running_var = m.running_var[keep].clone()
    m.num_features = int(keep.sum())


def purge_channels(model: nn.Module, example: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Removes the removable channels of `model` (a plain model, e.g. from export) in place.

    Returns ({producer name: channels removed}, {producer name: all-zero channels kept
    because their constant output reaches a consumer that cannot absorb it}). `example`
    (an input tensor) gives the shapes a flatten → Linear step needs; without it such
    steps end a group. The model runs once on `example`, in eval mode, without grad.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if example is not None and not isinstance(example, torch.Tensor):
        raise TypeError(f"`example` must be a tensor or None, got {type(example).__name__}")
    sparse = [repr(n) for n, _ in sparse_modules(model)]
    if sparse:
        # It failed in the fx trace of a sparse layer's forward, saying the model cannot be
        # traced, when what it needs is the masks baked in.
        raise ValueError(f"purge_channels needs a plain model; {first_few(sparse)} are still sparse layers: "
                         "use sparsekern.export(model, purge=True), or purge export(model).model")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            removed = _purge_transformer_layers(model)
            if type(model) in _TRANSFORMERS:
                # torch's own transformer as the model: fx sees it whole inside a model
                # (a leaf), and its forward does not trace; nothing for the fx pass.
                return removed, {}
            purger = _Purger(model, example)
            more_removed, kept_zero = purger.run()
            return {**removed, **more_removed, **purger.attention_heads()}, kept_zero
    finally:
        model.train(was_training)


_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_TRANSFORMERS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, *_TRANSFORMER_LAYERS)


def _replace_heads(model: nn.Module, name: str, tied: set[int]) -> dict:
    """Prunes the closed heads of the attention at `name`; {"<name>.heads": count} or {}."""
    new, n = prune_heads(model.get_submodule(name), tied)
    if not n:
        return {}
    model.set_submodule(name, new)
    return {f"{name}.heads": n}


def _purge_transformer_layers(model: nn.Module) -> dict:
    """Every nn.TransformerEncoderLayer / DecoderLayer (torch.fx sees them as leaves): the
    closed heads of its attentions (they are called with need_weights=False) and its
    feed-forward hidden units."""
    tied = _tied(model)
    removed = {}
    layers = [(name, layer) for name, layer in model.named_modules() if type(layer) in _TRANSFORMER_LAYERS]
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        for attention in ("self_attn", "multihead_attn"):
            if hasattr(layer, attention):
                removed.update(_replace_heads(model, prefix + attention, tied))
        removed.update(_purge_feedforward(prefix, layer, tied))
    return removed


def _purge_feedforward(prefix: str, layer: nn.Module, tied: set[int]) -> dict:
    """The hidden units of a transformer layer's feed-forward block,
    linear2(dropout(activation(linear1(x)))). Unit j goes when linear2 ignores it (column
    j all zero), or when linear1's row j is all zero: it then carries activation(bias1[j])
    (dropout is the identity in eval), which moves into linear2's bias. One unit is always
    kept. Reported under `<layer>.linear1`, as the fx pass reports a producer."""
    first, second = layer.linear1, layer.linear2
    if type(first) is not nn.Linear or type(second) is not nn.Linear or any(
            id(p) in tied for m in (first, second) for p in m.parameters(recurse=False)):
        return {}  # swapped for something else, or tied: not ours to slice
    ignored = second.weight.eq(0).all(0)
    constant = first.weight.eq(0).all(1)
    bias = first.bias if first.bias is not None else torch.zeros_like(first.weight[:, 0])
    value = layer.activation(bias)  # each constant unit's output
    removable = ignored | constant
    if bool(removable.all()):
        removable[0] = False
    fold = removable & ~ignored & (value != 0)
    if bool(fold.any()):
        delta = (second.weight[:, fold].double() @ value[fold].double()).to(second.weight.dtype)
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=second.weight.requires_grad)
        second.bias.add_(delta)
    if not bool(removable.any()):
        return {}
    keep = ~removable
    _slice_out(first, keep)
    _set_param(second, "weight", second.weight[:, keep])
    second.in_features = int(keep.sum())
    return {f"{prefix}linear1": int(removable.sum())}
