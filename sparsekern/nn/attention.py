"""SparseMultiheadAttention: nn.MultiheadAttention whose input and output projections are
masked like any other layer, so a ViT prunes fully.

nn.MultiheadAttention keeps its in-projection as bare Parameters (in_proj_weight, the q, k
and v rows stacked; or q_proj_weight, k_proj_weight and v_proj_weight when key or value
has other than embed_dim features) and passes them, with out_proj's weight, to
F.multi_head_attention_forward itself: swapping out_proj alone would never apply its mask.
Here every projection is a sparse layer, a child named `in_proj` (embed_dim →
3·embed_dim), or `q_proj`, `k_proj` and `v_proj`, and `out_proj`, so every method, report
and export sees them as more SparseLinear layers (named `<attention>.in_proj`, ...); the
forward hands their masked weights to the same function nn.MultiheadAttention calls. A
projection left dense is a plain nn.Linear.

state_dict keys stay nn.MultiheadAttention's (`in_proj_weight`, `in_proj_bias`,
`out_proj.weight`, ...), and the in-projection's mask entries follow them
(`in_proj_weight_mask`, `q_proj_weight_log_alpha`, ...): a dense checkpoint loads, and
export() gives back a plain nn.MultiheadAttention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masks import HardConcreteMask, mask_kind_class
from .modules import SparseLinear

# The in-projection children, named as nn.MultiheadAttention names the parameters they
# hold: child `c`'s state_dict entries are `c_<name>` (in_proj_weight, q_proj_weight_mask).
IN_PROJ = "in_proj"
SEPARATE = ("q_proj", "k_proj", "v_proj")
FLAT = (IN_PROJ, *SEPARATE)


def projection_names(module: nn.MultiheadAttention) -> tuple[str, ...]:
    """The sparse layers an attention stands for, in order."""
    return ((IN_PROJ,) if module._qkv_same_embed_dim else SEPARATE) + ("out_proj",)


def weight_and_bias(proj: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(proj, SparseLinear):
        return proj.masked_weight(), proj.bias
    return proj.weight, proj.bias


def _per_input_gates(mask, options: dict) -> bool:
    """Whether `mask` with `options` gates a Linear per input neuron (structured L0)."""
    return isinstance(mask, str) and mask_kind_class(mask) is HardConcreteMask and bool(options.get("structured"))


class SparseMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with sparse projections; build it with from_dense (or let
    sparsify swap it in). Same forward signature and results as nn.MultiheadAttention's
    (without its inference fast path, which reads the dense weights: export() first).
    `in_proj_weight` / `in_proj_bias` (`q_proj_weight`, ...) are the in-projection's dense
    parameters."""

    def __init__(self, *args, **kwargs):
        raise TypeError("build SparseMultiheadAttention with SparseMultiheadAttention.from_dense(attention, ...)")

    @classmethod
    def from_dense(cls, module: nn.MultiheadAttention, mask="binary", *, projections=None,
                   seed: int | None = None, **mask_options) -> "SparseMultiheadAttention":
        """A SparseMultiheadAttention sharing `module`'s parameters (same objects), with a
        fresh mask of kind `mask` on each projection named in `projections` (default: all
        of projection_names(module)); the others stay dense nn.Linear. A hard_concrete
        `seed` seeds the first masked projection, seed + 1 the next, and so on."""
        if type(module) is not nn.MultiheadAttention:
            raise TypeError(f"SparseMultiheadAttention.from_dense needs an nn.MultiheadAttention, got {type(module).__name__}")
        names = projection_names(module)
        if isinstance(projections, str):
            projections = [projections]
        if projections is not None and not (
                isinstance(projections, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in projections)):
            raise TypeError(f"`projections` must be a projection name or a list of them, got {projections!r}")
        chosen = set(names if projections is None else projections)
        if not chosen or not chosen <= set(names):
            raise ValueError(f"`projections` must name some of {list(names)}, got {sorted(chosen)}")
        seeds = iter(range(seed, seed + len(names))) if seed is not None else None
        if module._qkv_same_embed_dim:
            tensors = {IN_PROJ: (module.in_proj_weight, module.in_proj_bias)}
        else:  # the bias stays one in_proj_bias over q, k and v, as there
            tensors = {n: (getattr(module, f"{n}_weight"), None) for n in SEPARATE}
        tensors["out_proj"] = (module.out_proj.weight, module.out_proj.bias)

        children = {}
        for name, (weight, bias) in tensors.items():  # all built first: bad mask options raise here
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            dense.weight, dense.bias = weight, bias
            dense.train(module.training)
            if name in chosen:
                options = dict(mask_options) if seeds is None else {**mask_options, "seed": next(seeds)}
                if name == "out_proj" and _per_input_gates(mask, options):
                    # Its inputs are the heads' outputs, head_dim each: one gate per head
                    # closes a whole head, which purge then removes (q, k, v rows too).
                    options.setdefault("inputs_per_gate", module.head_dim)
                dense = SparseLinear.from_dense(dense, mask, **options)
            children[name] = dense
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                     "batch_first", "head_dim", "add_zero_attn"):
            setattr(new, name, getattr(module, name))
        if not module._qkv_same_embed_dim:
            new.in_proj_bias = module.in_proj_bias
        new.bias_k, new.bias_v = module.bias_k, module.bias_v
        for name, child in children.items():
            setattr(new, name, child)
        return new.train(module.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if self._qkv_same_embed_dim:
            in_w, in_b = weight_and_bias(self.in_proj)
            separate = {}
        else:
            in_w, in_b = None, self.in_proj_bias
            separate = {f"{n}_weight": weight_and_bias(getattr(self, n))[0] for n in SEPARATE}
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
            use_separate_proj_weight=bool(separate), **separate,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def to_dense(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention with each projection's w ⊙ g (eval gate) baked in."""
        def copied(t):
            return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)

        dense = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.out_proj.bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, device="meta",
        )
        for name in projection_names(self):
            proj = getattr(self, name)
            plain = proj.to_dense() if isinstance(proj, SparseLinear) else proj
            if name == "out_proj":
                dense.out_proj.weight, dense.out_proj.bias = copied(plain.weight), copied(plain.bias)
            else:
                setattr(dense, f"{name}_weight", copied(plain.weight))
                if name == IN_PROJ:
                    dense.in_proj_bias = copied(plain.bias)
        if not self._qkv_same_embed_dim:
            dense.in_proj_bias = copied(self.in_proj_bias)
        dense.bias_k, dense.bias_v = copied(self.bias_k), copied(self.bias_v)
        return dense.train(self.training)

    # --- nn.MultiheadAttention's names -------------------------------------------------

    def _flat_children(self) -> list[str]:
        modules = self.__dict__.get("_modules", {})
        return [c for c in FLAT if c in modules]

    def __getattr__(self, name: str):
        # in_proj_weight (q_proj_weight, ...) and the state_dict's in_proj_<mask state>
        # resolve to the child's tensors (the dense weight, as SparseLinear.weight is), so
        # code that reads them, or walks state_dict keys as attribute paths
        # (torch.distributed.checkpoint does), finds what nn.MultiheadAttention would have.
        try:
            return super().__getattr__(name)
        except AttributeError:
            for child in self._flat_children():
                rest = name[len(child) + 1:] if name.startswith(f"{child}_") else None
                if rest is not None and hasattr(self._modules[child], rest):
                    return getattr(self._modules[child], rest)
            raise

    def state_dict(self, *args, **kwargs):
        # Module.state_dict calls each child's state_dict(destination=..., prefix=...), so
        # this runs at any depth; the deprecated positional form is (destination, prefix, keep_vars).
        out = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        dotted = [f"{prefix}{c}." for c in self._flat_children()]
        for k in [k for k in out if k.startswith(prefix)]:  # the last keys written: order kept
            value = out.pop(k)
            child = next((d for d in dotted if k.startswith(d)), None)
            out[k if child is None else f"{child[:-1]}_{k[len(child):]}"] = value
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Runs before the children load, on the dict they are then given: in_proj_<name>
        # becomes in_proj.<name>, where the child SparseLinear / nn.Linear looks for it.
        for child in self._flat_children():
            flat = f"{prefix}{child}_"
            for k in [k for k in state_dict if k.startswith(flat)]:
                state_dict[f"{prefix}{child}.{k[len(flat):]}"] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
