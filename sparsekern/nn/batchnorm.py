"""GatedBatchNorm2d: the BatchNorm after a channel-gated conv, run on the open channels only
and scaled by the gates.

A structured hard-concrete conv zeroes a closed channel (z = 0, weights and bias), but the
BatchNorm after it turned that zero into its shift β: in training the channel's batch
mean and variance are 0, so x̂ = 0 and the output is β_c; in eval its running statistics
have decayed towards 0 and the output is β_c again. The closed channel kept feeding the
network a learned constant, and after a ReLU that constant entered a zero-padded 3×3
conv, where it cannot be folded into a bias exactly, so export(purge=True) had to keep
the channel: `sparsekern train --method l0 --structured --model resnet20 --data digits
--density 0.5 --epochs 8 --include '*' ...` (README: every conv gated) removed 121 closed
channels of the blocks' conv1 layers and kept 129 (now all of them go: 151 removed, no conv1
channel kept; 116,076 exported parameters instead of 174,312).

Gallego-Posada et al.'s code runs such a BatchNorm on the open channels alone; this one
does too: for the channels the conv's gate closed in this forward the output is exactly 0
and their running statistics stay as they were. Two changes of ours, both measured on that
run (8 epochs; before the gated BatchNorm: 58% train, 18.9% eval test accuracy):
- the output is z·BN(y): the gate scales the normalised channel (γ·z, β·z). A BatchNorm
  normalises away the z the conv's weights carry, so with an ungated output (the
  authors') log α's task gradient came through eps alone and the gates followed the
  constraint blindly: it undershot its 0.5 target (E[density] 0.36) and train accuracy
  stayed at 63%. Now: 86% train, E[density] 0.45;
- the running statistics are those of the ungated conv output y (the input is z·y): each
  forward hands the op z·μ and z²·σ². Gathered from z·y under sampled gates they did not
  fit eval's median gates: eval accuracy 9.7% while batch statistics gave 70.6%. Now the
  eval accuracy is 80.8%, the exported model's the same.
Which gates follow the conv's mode: training, the z it sampled in this forward (the mask
keeps it, C values in the autograd graph, for its BatchNorm; a checkpoint's recompute
draws the same z); eval, the median gate, a function of log α, as export bakes it. One
F.batch_norm call with weight·z and bias·z (a closed channel: x̂·0 + 0 = 0, no extra pass
over the activations) and C-sized work on the statistics: +1.7 to +3.8% on a 67-77 ms
ResNet-20 step (batch 32, 2 cores; three ad-hoc runs of 40 interleaved steps against plain
BatchNorms).

sparsify() gates every nn.BatchNorm2d that directly and exclusively consumes a structured
hard-concrete SparseConv2d's output (or a whole-channel straight-through one's: DPF's
structured mode, below), found by tracing the model with torch.fx
(gate_batchnorms), changing its class in place: same attributes, parameters, buffers and
state_dict keys. Its conv is held as a plain attribute (a one-element tuple), not a
submodule, so named_modules() and state_dict() are unchanged; deepcopy and pickling copy
it along with the model. export() gives a plain nn.BatchNorm2d back with the eval gate
baked in (to_dense), which purge then sees as a constant-0 channel and removes. The
BatchNorm's parameters are not gated parameters: density, report() and the L0 penalty
count the conv's weights only, as before.

BatchNorm1d after a structured SparseLinear is not gated: a Linear's structured gates are
on its inputs, and its output features are never zeroed as a whole.

DPF's structured mode prunes whole filters by their ℓ2 norm, with a straight-through
backward. Its BatchNorms are gated the same way (z ∈ {0, 1}: a filter with no weight kept
is closed), so a pruned filter is removed with its BatchNorm channel: the gradient at that
pruned model is 0 for the filter's weights (γ·0 in the BatchNorm) and for its γ and β.
(Passing γ's and β's gradients on unmasked, as DPF does the weights', changed nothing
behind a ReLU, whose gradient at 0 is 0, and its autograd node cost 30 us per BatchNorm
of a ResNet-20 step; the gated BatchNorm adds ~70 us to a stage-3 one's 470.) The
authors' code keeps a plain BatchNorm, whose pruned channels output the constant relu(β):
`sparsekern train --model resnet20 --data digits --epochs 8 --optimizer adam --lr 3e-3
--weight-decay 0 --method dpf --mode structured --sparsity 0.5` kept 74 such channels in
the purged export. Seeds 0, 1, 2 (1 thread), plain → gated: test accuracy 95.6 / 95.6 /
95.3% → 97.8 / 95.8 / 96.7%, exported parameters 174,138 / 175,158 / 167,652 → 127,904
/ 128,480 / 128,492, MACs 0.58-0.62 → 0.31-0.34 of dense's. A pruned filter's weights
get no gradient then (a plain BatchNorm passed them γ/√eps times its output's gradient
where relu(β) > 0), but fewer masks changed (62,208 weights flipped
over the run, not 113,616) and the run did better. DPF(gate_batchnorms=False) keeps the
authors' plain BatchNorms.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._checks import first_few
from .attention import SparseMultiheadAttention
from .heads import PrunedMultiheadAttention
from .modules import SPARSE_TYPES, SparseConv2d
from .transformer import Retyped, _retyped


class GatedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that outputs exactly 0 for the channels its conv closed in this
    forward and leaves their running_mean / running_var as they were; an open channel's
    output is z·BN(y), its running statistics those of the ungated conv output y (the
    module docstring says why). sparsify() makes these; build one yourself with
    GatedBatchNorm2d.from_dense(batchnorm, conv)."""

    dense_type = nn.BatchNorm2d
    _gated_by: tuple  # (conv,): a plain attribute, not a submodule

    def __init__(self, *args, **kwargs):
        raise TypeError("build GatedBatchNorm2d with GatedBatchNorm2d.from_dense(batchnorm, conv)")

    @classmethod
    def from_dense(cls, module: nn.BatchNorm2d, conv: nn.Module) -> "GatedBatchNorm2d":
        """A GatedBatchNorm2d sharing `module`'s parameters and buffers, gated by `conv`
        (a SparseConv2d whose mask gates whole output channels: structured hard-concrete,
        or straight-through with whole_channels)."""
        _check_pair(module, conv)
        return _gate(_retyped(module, cls), conv)

    @property
    def conv(self) -> nn.Module:
        """The conv whose gates this BatchNorm follows."""
        return self._gated_by[0]

    def channel_gates(self) -> torch.Tensor:
        """[num_features]: the gate z the conv multiplies each channel by in its current
        forward (sampled in training, differentiable in log α; the median gate in eval;
        0: closed)."""
        conv = self._gated_by[0]
        return conv.mask.channel_gates(conv)

    def open_channels(self) -> torch.Tensor:
        """bool [num_features]: the channels the conv passes in its current forward."""
        return self.channel_gates().detach() != 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        gates = self.channel_gates()
        z = gates.detach()
        binary = self._gated_by[0].mask.name == "straight_through"  # DPF's whole-channel masks: z ∈ {0, 1}
        # The output is z·BN(y): the gate scales the normalised channel (γ·z, β·z), so a
        # closed one is exactly 0 (x̂·0 + 0, no extra pass over the activations) and log α
        # learns from the task through it. The z the conv's weights carry is normalised
        # away: with the output ungated, as in the authors' code, a gate's task gradient
        # came only through eps, and the 8-epoch digits run (README) ended at 63% train
        # accuracy, its constraint undershot (E[density] 0.36 for a 0.5 target).
        if self.affine:
            scale = gates.to(self.weight.dtype)
            weight, bias = self.weight * scale, self.bias * scale
        else:
            stats = self.running_mean if self.running_mean is not None else input
            weight, bias = gates.to(stats.dtype), None
        # The rest is nn.BatchNorm2d.forward (torch 2.x), with the running statistics kept
        # as those of the ungated conv output (below) and the closed channels' left as they were.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_stats = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_stats else None
        running_var = self.running_var if use_stats else None
        if running_mean is None:
            return F.batch_norm(input, None, None, weight, bias, bn_training, factor, self.eps)
        # The input is z·y (y: the ungated conv output). Batch statistics do not see z (BN
        # is scale invariant), but running statistics gathered from z·y under sampled z
        # and then used under eval's median gate did: after 8 epochs of structured L0 on
        # ResNet-20 (README) every eval accuracy was near chance (9.7-18.9%) while batch
        # statistics gave 70-80%. So the buffers hold y's statistics, and each forward
        # hands the op this forward's z·μ and z²·σ², which is what z·y has: train and eval
        # normalise the same way whatever z is (a median gate of 1 leaves them unchanged).
        zs = z.to(running_mean.dtype)
        z2 = zs if binary else zs * zs
        mean, var = running_mean * zs, running_var * z2
        if not bn_training:
            return F.batch_norm(input, mean, var, weight, bias, False, factor, self.eps)
        # The update goes into these copies, and only the open channels' into the buffers,
        # divided by z again: the op's autograd keeps the statistics it was given (at their
        # version after its own update), so changing those afterwards made the backward
        # raise. A z whose square underflows (below 1e-19 in float32) updates nothing.
        out = F.batch_norm(input, mean, var, weight, bias, True, factor, self.eps)
        with torch.no_grad():
            upd = z2 > 0  # where it is not, the division's inf or NaN is not selected
            if binary:  # nothing to divide by: 3 ops of the 7 (each ~5 us on 2 cores, 9 BatchNorms a step)
                torch.where(upd, mean, running_mean, out=running_mean)
                torch.where(upd, var, running_var, out=running_var)
            else:
                running_mean.copy_(torch.where(upd, mean / zs, running_mean))
                running_var.copy_(torch.where(upd, var / z2, running_var))
        return out

    @torch.no_grad()
    def to_dense(self) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d computing what this one computes in eval mode after its
        conv's export (w ⊙ z, z the median gate): γ·z, β·z and the running statistics
        z·μ, z²·σ² (a closed channel: output 0). Without affine parameters it gets them,
        γ = z and β = 0: nothing else scales a channel by z. New tensors where they
        change, shared ones elsewhere."""
        conv = self._gated_by[0]
        z = conv.mask.eval_channel_gates(conv)  # whatever the modes
        dense = _retyped(self, nn.BatchNorm2d)
        del dense.__dict__["_gated_by"]
        if self.affine:
            zw = z.to(self.weight.dtype)
            dense.weight = nn.Parameter(self.weight.detach() * zw, requires_grad=self.weight.requires_grad)
            dense.bias = nn.Parameter(self.bias.detach() * zw, requires_grad=self.bias.requires_grad)
        else:
            dtype = self.running_mean.dtype if self.running_mean is not None else z.dtype
            dense.affine = True
            dense.weight = nn.Parameter(z.to(dtype).clone())
            dense.bias = nn.Parameter(torch.zeros_like(dense.weight))
        if self.running_mean is not None:
            zs = z.to(self.running_mean.dtype)
            dense.running_mean = self.running_mean * zs
            dense.running_var = self.running_var * (zs * zs)
        # Without running statistics, the batch statistics of z·y normalise it as y's.
        return dense

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gated"


def _gate(bn: nn.BatchNorm2d, conv: nn.Module) -> GatedBatchNorm2d:
    """`bn` (already of this class, or nn.BatchNorm2d changed in place) gated by `conv`."""
    bn.__class__ = GatedBatchNorm2d
    # object.__setattr__: Module.__setattr__ would not register a tuple anyway, but a
    # plain attribute says so; a tuple, not a weakref, so deepcopy maps it to the copy's conv.
    object.__setattr__(bn, "_gated_by", (conv,))
    conv.mask.batchnorm_gated = True
    return bn


def _check_pair(module, conv) -> None:
    if type(module) is not nn.BatchNorm2d:
        raise TypeError(f"GatedBatchNorm2d.from_dense needs an nn.BatchNorm2d (`module`), got {type(module).__name__}")
    if not isinstance(conv, SparseConv2d):
        raise TypeError(f"`conv` must be a SparseConv2d, got {type(conv).__name__}")
    if not conv.mask.gates_output_channels(conv):
        raise ValueError(f"`conv`'s mask ({conv.mask!r}) does not gate whole output channels; a BatchNorm can be "
                         "gated only by a structured hard-concrete conv or a whole-channel straight-through one "
                         "(DPF's structured mode)")
    if module.num_features != conv.out_channels:
        raise ValueError(f"`module` has {module.num_features} features, `conv` {conv.out_channels} output channels")


class _Tracer(fx.Tracer):
    """fx's tracer with the sparse layers, the parents sparsify retypes, the attentions
    and gated BatchNorms as leaves: their forwards read mask state fx cannot trace, and
    the pairing needs only where their outputs go."""

    LEAVES = (*SPARSE_TYPES, SparseMultiheadAttention, Retyped, PrunedMultiheadAttention, GatedBatchNorm2d)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.LEAVES) or super().is_leaf_module(m, qualname)


def gate_batchnorms(model: nn.Module) -> list[str]:
    """Gates, in place, every nn.BatchNorm2d of `model` whose input is the output of a
    SparseConv2d whose mask gates whole output channels (structured hard-concrete, DPF's
    whole-channel straight-through) and nothing else's: the conv's output goes to that
    BatchNorm alone, and each is called once. Returns the names of the BatchNorms gated now. Found with a torch.fx trace; a
    model fx cannot trace is left as it is, with one warning."""
    convs = {id(m) for m in model.modules() if isinstance(m, SparseConv2d) and m.mask.gates_output_channels(m)}
    if not convs or not any(_normalisation(m) for m in model.modules()):
        return []  # nothing to pair: no trace (models of Linear layers, CNNs without BatchNorm)
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types; the reason is in the warning
        warnings.warn(
            f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}), so the BatchNorms after its "
            "channel-gating convs (structured L0, structured DPF) are not gated: a closed channel still comes out "
            "of its BatchNorm as the shift β (and its running statistics keep updating), and export(purge=True) may "
            "have to keep it.",
            stacklevel=3,
        )
        return []
    modules = dict(model.named_modules(remove_duplicate=False))
    calls: dict[int, int] = {}  # by module, not name: a layer registered twice is one layer
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(modules[node.target])] = calls.get(id(modules[node.target]), 0) + 1
    gated, missed = [], []
    for node in graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if conv is None or id(conv) not in convs or calls[id(conv)] != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = modules.get(user.target) if user.op == "call_module" else None
        if not isinstance(bn, (nn.BatchNorm2d, GatedBatchNorm2d)) and _normalisation(bn):
            missed.append(f"{user.target} ({type(bn).__name__})")
        if (type(bn) is not nn.BatchNorm2d or calls[id(bn)] != 1 or user.args != (node,) or user.kwargs
                or bn.num_features != conv.out_channels):
            continue
        _gate(bn, conv)
        gated.append(str(user.target))
    if missed:
        warnings.warn(
            f"not gated, as only nn.BatchNorm2d is: {first_few(missed)} after channel-gating convs (structured L0, "
            "structured DPF); a "
            "closed channel comes out of them as their shift and export(purge=True) may have to keep it. Train "
            "with nn.BatchNorm2d there (SyncBatchNorm is not gated, before sparsify or after).",
            stacklevel=3,
        )
    return gated


def lost_gates(model: nn.Module) -> list[str]:
    """Names of the convs whose GatedBatchNorm2d is no longer in `model` (replaced after
    sparsify, e.g. by nn.SyncBatchNorm.convert_sync_batchnorm, which builds plain
    SyncBatchNorms from every BatchNorm): their closed channels come out of the new module
    as its shift again."""
    held = {id(m.conv) for m in model.modules() if isinstance(m, GatedBatchNorm2d)}
    return [name for name, m in model.named_modules()
            if isinstance(m, SparseConv2d) and m.mask.batchnorm_gated and id(m) not in held]


def _normalisation(m) -> bool:
    """A normalisation layer that would turn a closed (all-zero) channel into its shift:
    any BatchNorm (SyncBatchNorm, subclasses), InstanceNorm, or torchvision's
    FrozenBatchNorm2d (detection backbones; not a torch class, so known by name)."""
    return isinstance(m, nn.modules.batchnorm._NormBase) or type(m).__name__ == "FrozenBatchNorm2d"
