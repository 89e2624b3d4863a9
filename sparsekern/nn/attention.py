"""SparseMultiheadAttention: nn.MultiheadAttention whose input and output projections are
masked like any other layer, so a ViT prunes fully.

nn.MultiheadAttention keeps its in-projection as a bare Parameter (in_proj_weight, the q,
k and v rows stacked) and passes it, with out_proj's weight, to
F.multi_head_attention_forward itself: swapping out_proj alone would never apply its mask.
Here both projections are sparse layers, children `in_proj` (embed_dim → 3·embed_dim) and
`out_proj`, so every method, report and export sees them as two more SparseLinear layers
(named `<attention>.in_proj` / `.out_proj`); the forward hands their masked weights to the
same function nn.MultiheadAttention calls. A projection left dense is a plain nn.Linear.

state_dict keys stay nn.MultiheadAttention's (`in_proj_weight`, `in_proj_bias`,
`out_proj.weight`, `out_proj.bias`), and the in-projection's mask entries follow them
(`in_proj_weight_mask`, `in_proj_weight_log_alpha`, ...): a dense checkpoint loads, and
export() gives back a plain nn.MultiheadAttention.

Only attention whose key and value have embed_dim features (kdim = vdim = embed_dim, the
packed in_proj_weight: every torchvision model's) is supported; sparsify refuses others.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import SparseLinear

IN_PROJ = "in_proj"  # the child's name; its state_dict entries are named in_proj_<name>


def supported(module: nn.MultiheadAttention) -> bool:
    return module._qkv_same_embed_dim


def weight_and_bias(proj: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(proj, SparseLinear):
        return proj.masked_weight(), proj.bias
    return proj.weight, proj.bias


class SparseMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with sparse projections; build it with from_dense (or let
    sparsify swap it in). Same forward signature and results as nn.MultiheadAttention's
    (without its inference fast path, which reads the dense weights: export() first).
    `in_proj_weight` / `in_proj_bias` are the in-projection's dense parameters."""

    in_proj: nn.Linear
    out_proj: nn.Linear

    def __init__(self, *args, **kwargs):
        raise TypeError("build SparseMultiheadAttention with SparseMultiheadAttention.from_dense(attention, ...)")

    @classmethod
    def from_dense(cls, module: nn.MultiheadAttention, mask="binary", *, in_proj: bool = True,
                   out_proj: bool = True, seed: int | None = None, **mask_options) -> "SparseMultiheadAttention":
        """A SparseMultiheadAttention sharing `module`'s parameters (same objects), with a
        fresh mask of kind `mask` on the in-projection and/or the out-projection (the other
        stays a dense nn.Linear). A hard_concrete `seed` seeds in_proj, seed + 1 out_proj."""
        if type(module) is not nn.MultiheadAttention:
            raise TypeError(f"SparseMultiheadAttention.from_dense needs an nn.MultiheadAttention, got {type(module).__name__}")
        if not supported(module):
            raise TypeError("SparseMultiheadAttention needs kdim == vdim == embed_dim (the packed in_proj_weight)")
        if not (in_proj or out_proj):
            raise ValueError("`in_proj` and `out_proj` are both False: nothing to mask")
        seeds = iter(range(seed, seed + 2)) if seed is not None else None

        def layer(weight, bias, sparse):
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            dense.weight, dense.bias = weight, bias
            dense.train(module.training)
            if not sparse:
                return dense
            options = dict(mask_options) if seeds is None else {**mask_options, "seed": next(seeds)}
            return SparseLinear.from_dense(dense, mask, **options)

        # Both built before the module changes: bad mask options raise here.
        new_in = layer(module.in_proj_weight, module.in_proj_bias, in_proj)
        new_out = layer(module.out_proj.weight, module.out_proj.bias, out_proj)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                     "batch_first", "head_dim", "add_zero_attn"):
            setattr(new, name, getattr(module, name))
        new.bias_k, new.bias_v = module.bias_k, module.bias_v
        new.q_proj_weight = new.k_proj_weight = new.v_proj_weight = None
        new.in_proj, new.out_proj = new_in, new_out
        return new.train(module.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        in_w, in_b = weight_and_bias(self.in_proj)
        out_w, out_b = weight_and_bias(self.out_proj)
        batched = query.dim() == 3
        if self.batch_first and batched:
            # As nn.MultiheadAttention: keep `query is key` / `key is value`, which the
            # function uses to project self-attention's input once.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_w, in_b, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, out_w, out_b, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def to_dense(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention with each projection's w ⊙ g (eval gate) baked in."""
        dense = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.in_proj.bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn, batch_first=self.batch_first,
            device="meta",
        )
        def baked(proj):  # (weight, bias) of a projection, its mask baked in
            plain = proj.to_dense() if isinstance(proj, SparseLinear) else proj
            return [None if t is None else nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                    for t in (plain.weight, plain.bias)]

        dense.in_proj_weight, dense.in_proj_bias = baked(self.in_proj)
        dense.out_proj.weight, dense.out_proj.bias = baked(self.out_proj)
        for name in ("bias_k", "bias_v"):
            if (t := getattr(self, name)) is not None:
                setattr(dense, name, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
        return dense.train(self.training)

    # --- nn.MultiheadAttention's names -------------------------------------------------

    def __getattr__(self, name: str):
        # in_proj_weight, in_proj_bias and the state_dict's in_proj_<mask state> resolve to
        # the child's tensors (the dense weight, as SparseLinear.weight is), so code that
        # reads them, or walks state_dict keys as attribute paths (torch.distributed.checkpoint
        # does), finds what nn.MultiheadAttention would have.
        try:
            return super().__getattr__(name)
        except AttributeError:
            child = self.__dict__.get("_modules", {}).get(IN_PROJ)
            rest = name[len(IN_PROJ) + 1:] if name.startswith(f"{IN_PROJ}_") else None
            if child is None or rest is None or not hasattr(child, rest):
                raise
            return getattr(child, rest)


    def state_dict(self, *args, **kwargs):
        # Module.state_dict calls each child's state_dict(destination=..., prefix=...), so
        # this runs at any depth; the deprecated positional form is (destination, prefix, keep_vars).
        out = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        child = f"{prefix}{IN_PROJ}."
        ours = [k for k in out if k.startswith(prefix)]
        for k in ours:  # renamed in place of order: they are the last keys written
            value = out.pop(k)
            out[f"{prefix}{IN_PROJ}_{k[len(child):]}" if k.startswith(child) else k] = value
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Runs before the children load, on the dict they are then given: in_proj_<name>
        # becomes in_proj.<name>, where the child SparseLinear / nn.Linear looks for it.
        flat = f"{prefix}{IN_PROJ}_"
        for k in [k for k in state_dict if k.startswith(flat)]:
            state_dict[f"{prefix}{IN_PROJ}.{k[len(flat):]}"] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
