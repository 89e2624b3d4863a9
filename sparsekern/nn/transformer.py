"""SparseTransformerEncoderLayer: nn.TransformerEncoderLayer that always computes through
its layers' own forwards, so the sparse layers sparsify puts inside it are applied.

nn.TransformerEncoderLayer has an inference fast path (eval mode, no gradient needed) that
hands self_attn.in_proj_weight, linear1.weight, ... to one fused kernel itself: a mask on
any of them would be skipped exactly when the model is deployed. sparsify changes an
encoder layer holding a sparse layer to this class, in place (same attributes and
submodules, so the same state_dict and repr), whose forward is nn.TransformerEncoderLayer's
other path; export gives the plain class back, fast path included, once the masks are
baked in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Retyped:
    """Base of the classes sparsify gives a parent, in place (same attributes and
    submodules, so the same state_dict), once a layer below it is sparse, because its own
    forward reads that layer's weights itself; export gives `dense_type` back. from_dense /
    to_dense make a new module sharing the submodules instead."""

    dense_type: type

    def __init__(self, *args, **kwargs):
        raise TypeError(f"build {type(self).__name__} with {type(self).__name__}.from_dense(module)")

    @classmethod
    def from_dense(cls, module: nn.Module):
        if type(module) is not cls.dense_type:
            raise TypeError(f"{cls.__name__}.from_dense needs a {cls.dense_type.__name__}, got {type(module).__name__}")
        return _retyped(module, cls)

    def to_dense(self) -> nn.Module:
        """The same module as a plain `dense_type` (its submodules shared)."""
        return _retyped(self, self.dense_type)


def _retyped(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` with `module`'s attributes: the same submodules, parameters and settings
    (their containers copied, so changing one module's children leaves the other's)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    return new


class SparseTransformerEncoderLayer(Retyped, nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer without the inference fast path; build it with from_dense."""

    dense_type = nn.TransformerEncoderLayer

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        if src.is_nested:
            # nn.TransformerEncoder hands its layers a nested tensor (padding dropped) when
            # it takes its own fast path; the layers' forwards take padded tensors.
            return self._nested_forward(src, src_mask, is_causal)
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype,
        )
        src_mask = F._canonical_mask(
            mask=src_mask, mask_name="src_mask", other_type=None, other_name="", target_type=src.dtype,
            check_other=False,
        )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))

    def _nested_forward(self, src, src_mask, is_causal):
        padded, padding, lengths = unnested(src)
        batch_first = self.self_attn.batch_first  # nn.TransformerEncoder nests only then
        out = self.forward(padded if batch_first else padded.transpose(0, 1), src_mask, padding, is_causal)
        return renested(out if batch_first else out.transpose(0, 1), lengths, src.layout)


def unnested(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A nested [batch, (length), features] tensor as (zero-padded [batch, longest,
    features], key padding mask [batch, longest] (True: padding), lengths)."""
    lengths = [r.shape[0] for r in x.unbind()]
    padded = torch.nested.to_padded_tensor(x, 0.0)
    positions = torch.arange(padded.shape[1], device=padded.device)
    return padded, positions[None, :] >= torch.tensor(lengths, device=padded.device)[:, None], lengths


def renested(padded: torch.Tensor, lengths: list[int], layout) -> torch.Tensor:
    """unnested's inverse: the first lengths[i] rows of each padded[i], nested."""
    return torch.nested.nested_tensor([padded[i, :n] for i, n in enumerate(lengths)], layout=layout)
