"""SparseLinear and SparseConv2d: nn.Linear / nn.Conv2d whose weight is used through a mask.

`weight` and `bias` keep their names and shapes, so a dense (e.g. torchvision) state_dict
loads into a sparsified model: a dense checkpoint has no mask entries, and loading it
leaves the mask state as it is (at init after sparsify) instead of reporting them missing.
A state_dict from a sparse model has the extra mask entries (weight_mask, weight_score,
weight_log_alpha); to load it into a plain model, export() first (or strict=False).

The forward/backward is the op layer's (sparsekern.ops.masked_linear /
masked_conv2d_weight, hard_concrete_gates, hard_concrete_masked_weight for unstructured
gates, via MaskKind.masked_weight); this file only wires module state to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import mask_apply, mask_math, reference
from .masks import MASK_KINDS, MaskKind, make_mask


def _as_mask(mask, options: dict) -> MaskKind:
    if isinstance(mask, MaskKind):
        if options:
            raise TypeError(f"mask options {sorted(options)} given with a MaskKind instance; set them on it")
        return mask
    return make_mask(mask, **options)


class _SparseMixin:
    """What SparseLinear and SparseConv2d share: the mask, its state_dict handling and the
    conversions. `self.mask` is the MaskKind; its tensors live on the module."""

    mask: MaskKind

    def _attach_mask(self, mask, options: dict) -> None:
        if self.weight.dtype not in mask_math.FLOAT_DTYPES:
            # Here rather than at the first forward, which failed naming an internal op
            # (hard_concrete_masked_weight_fused) or, for a binary mask, ran.
            raise TypeError(f"{type(self).__name__} supports float32, float16, bfloat16 and float64 weights "
                            f"(`dtype`), got {self.weight.dtype}")
        self.mask = _as_mask(mask, options)
        self.mask.attach(self)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # The mask kind's own fix-ups after a blanket conversion (MaskKind.after_apply). The
        # mask is not there yet if _apply runs inside nn.Linear/nn.Conv2d's __init__.
        mask = self.__dict__.get("mask")
        if mask is not None:
            mask.after_apply(self)
        return self

    def mask_parameters(self) -> list[nn.Parameter]:
        """The learnable mask tensors (empty for binary / straight_through)."""
        return self.mask.mask_parameters(self)

    def density(self) -> float:
        """Fraction of weights the mask keeps (see MaskKind.keep)."""
        return self.mask.density(self)

    @torch.no_grad()
    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w ⊙ g, bias ⊙ g for bias-gated kinds else bias) with the deterministic eval gate,
        detached: what the module computes in eval mode, as plain tensors."""
        # w ⊙ g formed in float32 (float64 stays) and rounded once, as the layer's forward
        # does: a 16-bit gate rounded before the product left the exported weights 1 ulp
        # off the model's (bfloat16 sigmoid / hard-concrete: outputs 2-4 ulp apart).
        w = self.weight
        g = self.mask.gate(self, torch.promote_types(w.dtype, torch.float32))
        bias = self.bias
        if bias is not None and self.mask.bias_gated(self):
            bias = (bias * g.reshape(-1)).to(bias.dtype)
        return (w * g).to(w.dtype), None if bias is None else bias.detach()

    def _note_applied(self) -> None:
        # For PruningMethod's check that every layer's mask took part in a forward (a
        # parent reading the weight itself would bypass it). Eager: set once (a module
        # setattr costs 1.3 us, the read 0.1). Compiled: always set, a side effect dynamo
        # replays; reading it there would add a guard that fails once it is set. Not in
        # torch.export, which warns about side effects in the forward.
        if torch.compiler.is_exporting():
            return
        if torch.compiler.is_compiling() or not self.__dict__.get("_mask_applied", False):
            self._mask_applied = True

    def masked_weight(self) -> torch.Tensor:
        """w ⊙ g as a tensor, differentiable as the forward's (in training, a fresh
        hard-concrete sample): for a parent that hands the weight to a function itself
        (SparseMultiheadAttention). Never for a bias-gated layer."""
        self._note_applied()
        w = self.mask.masked_weight(self)
        return w if w is not None else self._gated_weight(*self.mask.op_mask(self))

    def _gated_weight(self, m: torch.Tensor, kw: dict) -> torch.Tensor:
        kind = kw["kind"]
        if mask_apply.eager_cpu(self.weight, m, kind):
            # The mask kind's tensors and constants were checked when set: skip the public
            # op's argument checks (~6 us per layer and step) for its eager CPU path.
            return mask_apply.masked_weight_autograd(self.weight, m, kind, kw.get("beta", 1.0), kw.get("scale", 1.0))
        return self._masked_weight_op(m, kw)

    def _dense_copy(self, dense: nn.Module) -> nn.Module:
        w, b = self.effective_weight()
        dense.weight = nn.Parameter(w.clone(), requires_grad=self.weight.requires_grad)
        if b is not None:
            dense.bias = nn.Parameter(b.clone(), requires_grad=self.bias.requires_grad)
        return dense.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # A dense checkpoint (it has our weight but none of the mask entries) loads with
        # strict=True: the mask state stays as it is. A sparse checkpoint missing only some
        # mask entries is still reported.
        names = [prefix + n for n in self.mask.state_names]
        if prefix + "weight" in state_dict and not any(n in state_dict for n in names):
            missing_keys[:] = [k for k in missing_keys if k not in names]
            # Another mask kind's entries instead of ours: torch only listed them as
            # unexpected keys. The common case is a ContinuousSparsification ticket
            # (binary weight_mask) loaded into a fresh search-phase model (weight_score).
            other = sorted({n for kind in MASK_KINDS.values() for n in kind.state_names}
                           - set(self.mask.state_names))
            found = [prefix + n for n in other if prefix + n in state_dict]
            if found:
                error_msgs.append(
                    f"{found[0]} belongs to another mask kind than this layer's {self.mask.name!r} (its entries: "
                    f"{names}). A checkpoint from a ContinuousSparsification ticket (to_ticket(): binary masks) "
                    "loads into a fresh search-phase model after the method's load_state_dict, which turns the "
                    "layers binary first; other kinds need the method the checkpoint was saved with.")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask={self.mask!r}"


# The hooks a swapped or exported layer carries over: the same dicts, not copies, so the handles the
# user holds still remove them. Dropped, a pre-hook that scaled a Linear's input silently
# stopped running (the model's output changed by 0.75).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr)
        hooks.update(getattr(new, attr))  # the new module's own, if it has any
        setattr(new, attr, hooks)
    new._is_full_backward_hook = old._is_full_backward_hook


class SparseLinear(_SparseMixin, nn.Linear):
    """nn.Linear with a mask: y = x (w ⊙ g)ᵀ + b.

    SparseLinear(in_features, out_features, bias=True, mask="binary", **mask_options);
    `mask` is a kind name (see sparsekern.nn.masks) or a MaskKind instance. For
    hard_concrete with structured=True the gates are per input neuron."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *, mask="binary", **mask_options):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach_mask(mask, mask_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._note_applied()
        w = self.mask.masked_weight(self)
        if w is not None:
            return F.linear(x, w, self.bias)
        m, kw = self.mask.op_mask(self)
        return ops.masked_linear(x, self.weight, self.bias, m, **kw)

    def _masked_weight_op(self, m: torch.Tensor, kw: dict) -> torch.Tensor:
        # The forward gates inside ops.masked_linear's GEMM and never forms w ⊙ g; a
        # parent that needs it as a tensor gets the torch expression (compiles; autograd
        # gives this kind's gradients).
        return reference.masked_weight(self.weight, m, **kw)

    @classmethod
    def from_dense(cls, module: nn.Linear, mask="binary", **mask_options) -> "SparseLinear":
        """A SparseLinear sharing `module`'s weight and bias Parameters (same objects, so
        dtype, device and optimiser references carry over), with a fresh mask."""
        if type(module) is not nn.Linear:
            raise TypeError(f"SparseLinear.from_dense needs an nn.Linear, got {type(module).__name__}")
        mask = _as_mask(mask, mask_options)  # before building anything: bad options raise here
        # Built on the meta device so no weight is initialised (and no RNG drawn) only to be replaced.
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta", mask="binary")
        del new.weight_mask
        new.weight, new.bias = module.weight, module.bias
        new._attach_mask(mask, {})
        return new.train(module.training)

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with w ⊙ g (eval gate) baked in; new tensors, same dtype/device."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return self._dense_copy(dense)


class SparseConv2d(_SparseMixin, nn.Conv2d):
    """nn.Conv2d with a mask: conv2d(x, w ⊙ g, b) with every Conv2d option (stride, padding
    including 'same'/'valid', padding_mode, dilation, groups, bias). For hard_concrete with
    structured=True there is one gate per output channel and the bias is gated with it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        mask="binary",
        **mask_options,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self._attach_mask(mask, mask_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._note_applied()
        w = self.mask.masked_weight(self)  # never bias-gated
        if w is not None:
            return self._conv_forward(x, w, self.bias)
        m, kw = self.mask.op_mask(self)
        w = self._gated_weight(m, kw)
        bias = self.bias
        if bias is not None and self.mask.bias_gated(self):
            bias = bias * m.reshape(-1)
        return self._conv_forward(x, w, bias)

    def _masked_weight_op(self, m: torch.Tensor, kw: dict) -> torch.Tensor:
        return ops.masked_conv2d_weight(self.weight, m, **kw)

    def _conv_args(self) -> dict:
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode,
        )

    @classmethod
    def from_dense(cls, module: nn.Conv2d, mask="binary", **mask_options) -> "SparseConv2d":
        """A SparseConv2d with `module`'s configuration, sharing its weight and bias
        Parameters, with a fresh mask."""
        if type(module) is not nn.Conv2d:
            raise TypeError(f"SparseConv2d.from_dense needs an nn.Conv2d, got {type(module).__name__}")
        mask = _as_mask(mask, mask_options)
        new = cls(**SparseConv2d._conv_args(module), device="meta", mask="binary")
        del new.weight_mask
        new.weight, new.bias = module.weight, module.bias
        new._attach_mask(mask, {})
        return new.train(module.training)

    def to_dense(self) -> nn.Conv2d:
        """A plain nn.Conv2d with w ⊙ g (and the gated bias) baked in."""
        return self._dense_copy(nn.Conv2d(**self._conv_args(), device="meta"))


SPARSE_TYPES = (SparseLinear, SparseConv2d)
