"""Attention heads that purge removes whole, and the module that holds fewer of them.

A head h of an nn.MultiheadAttention contributes out_proj.weight[:, h·d:(h+1)·d] @ (its
attention output), d = head_dim. When those columns are all zero — structured L0 closed
the head's gate (SparseMultiheadAttention gives out_proj one gate per head), or any mask
left them zero — the head adds nothing, and its q, k and v rows, its share of the biases
and its out_proj columns can go. nn.MultiheadAttention cannot hold fewer heads than
embed_dim / head_dim, so the result is a PrunedMultiheadAttention: the same forward
signature and, on its kept heads, the same computation as torch's.

Its attention weights (need_weights=True) cover the kept heads only, so purge removes heads
only where nothing reads them: inside torch's transformer layers (they pass
need_weights=False) and at fx call sites whose weights output is unused (torchvision's
ViT: `x, _ = self.self_attention(x, x, x, need_weights=False)`).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .transformer import renested, unnested


class PrunedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with only the heads `keep` marks (bool [num_heads]) of
    `attention`, a plain nn.MultiheadAttention: PrunedMultiheadAttention(attention, keep).

    Parameters as torch names them, narrowed to num_heads · head_dim inner features:
    in_proj_weight [3·inner, embed_dim] (or q/k/v_proj_weight when kdim or vdim differ from
    embed_dim), in_proj_bias, bias_k, bias_v, out_proj (inner → embed_dim). A 3-d attn_mask
    is given as for `attention` (source_num_heads per batch row); the kept heads' slices
    are used. Returned attention weights are the kept heads' (averaged over them).
    torch.fx traces into it (fx keeps only torch.nn's own modules whole) and stops at its
    branch on the input: an fx tool must treat it as a leaf, as purge's tracer does.
    torch.compile and torch.export handle it as is.
    """

    # torch's transformer layers take a fused inference path when this is True, which hands
    # in_proj_weight to a kernel assuming num_heads · head_dim == embed_dim; False turns
    # it off (nn.TransformerEncoderLayer then runs its other path, through this forward).
    # `packed` says whether in_proj_weight holds q, k and v.
    _qkv_same_embed_dim = False

    def __init__(self, attention: nn.MultiheadAttention, keep: torch.Tensor):
        super().__init__()
        if type(attention) is not nn.MultiheadAttention:
            raise TypeError(f"`attention` must be an nn.MultiheadAttention, got {type(attention).__name__}")
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"`keep` must be a bool tensor, got {type(keep).__name__}"
                            + (f" of dtype {keep.dtype}" if isinstance(keep, torch.Tensor) else ""))
        if keep.shape != (attention.num_heads,):
            raise ValueError(f"`keep` must have shape ({attention.num_heads},) (one flag per head), got {tuple(keep.shape)}")
        if not bool(keep.any()):
            raise ValueError("`keep` must keep at least one head")
        d = attention.head_dim
        self.embed_dim, self.kdim, self.vdim = attention.embed_dim, attention.kdim, attention.vdim
        self.head_dim, self.source_num_heads = d, attention.num_heads
        self.heads = [int(h) for h in keep.nonzero().flatten()]
        self.num_heads = len(self.heads)
        self.dropout, self.batch_first, self.add_zero_attn = attention.dropout, attention.batch_first, attention.add_zero_attn
        self.packed = attention._qkv_same_embed_dim
        rows = keep.repeat_interleave(d)  # the kept rows of a q, k or v block
        with torch.no_grad():
            if self.packed:
                self.in_proj_weight = _param(attention.in_proj_weight, rows.repeat(3))
                self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
            else:
                self.in_proj_weight = None
                for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    setattr(self, name, _param(getattr(attention, name), rows))
            self.in_proj_bias = _param(attention.in_proj_bias, rows.repeat(3))
            self.bias_k = _param(attention.bias_k, rows, dim=2)
            self.bias_v = _param(attention.bias_v, rows, dim=2)
            out = attention.out_proj
            # Built on the meta device: no init (and no draw from the RNG) only to be replaced.
            self.out_proj = nn.Linear(self.inner_dim, self.embed_dim, bias=out.bias is not None, device="meta")
            self.out_proj.weight, self.out_proj.bias = _param(out.weight, rows, dim=1), _param(out.bias)
        self.train(attention.training)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def projection_weights(self) -> list[torch.Tensor]:
        """The q, k, v and output projection weights."""
        if self.packed:
            return [*self.in_proj_weight.chunk(3), self.out_proj.weight]
        return [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, self.out_proj.weight]

    def _project(self, query, key, value):
        if self.packed and query is key and key is value:  # self-attention: one GEMM, as torch's
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        w_q, w_k, w_v = self.projection_weights()[:3]
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if query.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, attn_mask)
        batched = query.dim() == 3
        if batched and not self.batch_first:
            same_kv, same_qk = key is value, query is key
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
            key = query if same_qk else key  # keep `is`: self-attention projects once
            value = key if same_kv else value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        out, weights = self._forward_heads(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _forward_heads(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
        # Named _forward*: sparsify reads such methods' source, sees out_proj's weight read
        # here and refuses to mask it (the mask would be bypassed).
        """F.multi_head_attention_forward's computation (torch 2.14) for the kept heads
        (that function needs num_heads · head_dim == embed_dim), on [batch, length,
        features] inputs: heads are views of the projections, not copies, and a
        batch_first caller's input is used as it is. On bench_transformer's encoder with 2
        of 4 heads (16 x 64 tokens, 5 forwards, torch.profiler, 2 cores): 184 ms, 18 of
        them copies; torch's sequence-first steps (the first version): 230 ms, 29 copies."""
        N, L, _ = query.shape
        H, d = self.num_heads, self.head_dim
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA's causal kernel instead of the mask
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._project(query, key, value)  # [N, L or S, H·d]
        S = k.shape[1]
        if attn_mask is not None:  # to [1 or N, 1 or H, L, S]
            if attn_mask.dim() == 2 and attn_mask.shape == (L, S):
                attn_mask = attn_mask[None, None]
            elif attn_mask.dim() == 3 and attn_mask.shape == (N * self.source_num_heads, L, S):
                attn_mask = attn_mask.reshape(N, self.source_num_heads, L, S)[:, self.heads]
            else:
                raise RuntimeError(f"attn_mask must have shape ({L}, {S}) or ({N * self.source_num_heads}, {L}, {S}), "
                                   f"got {tuple(attn_mask.shape)}")
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, None, None, :]  # [N, 1, 1, S]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, -1)], dim=1)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        q, k, v = (t.unflatten(-1, (H, d)).transpose(1, 2) for t in (q, k, v))  # [N, H, length, d]
        if self.add_zero_attn:
            zeros = k.new_zeros((N, H, 1, d))
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        if key_padding_mask is not None:
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            weights = None
        out = out.transpose(1, 2).reshape(N, L, H * d)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), weights

    def _nested_forward(self, query, key, value, key_padding_mask, attn_mask):
        # nn.TransformerEncoder's inference path hands its layers nested self-attention
        # input (padding dropped, no masks): run it padded, masking the padding.
        if not (query is key and key is value) or key_padding_mask is not None or attn_mask is not None:
            raise ValueError("PrunedMultiheadAttention takes nested input only for self-attention without masks")
        padded, padding, lengths = unnested(query)
        x = padded if self.batch_first else padded.transpose(0, 1)
        out, _ = self.forward(x, x, x, key_padding_mask=padding, need_weights=False)
        return renested(out if self.batch_first else out.transpose(0, 1), lengths, query.layout), None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} (heads {self.heads} of "
                f"{self.source_num_heads}), head_dim={self.head_dim}, batch_first={self.batch_first}")


def _param(t: torch.Tensor | None, keep: torch.Tensor | None = None, dim: int = 0) -> nn.Parameter | None:
    """A new Parameter: t's slices `keep` along `dim` (all of t without keep)."""
    if t is None:
        return None
    kept = t.detach() if keep is None else t.detach().index_select(dim, keep.nonzero().flatten().to(t.device))
    return nn.Parameter(kept.clone(), requires_grad=t.requires_grad)


def _pad_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


def closed_heads(attention: nn.MultiheadAttention) -> torch.Tensor:
    """bool [num_heads]: the heads whose out_proj columns are all zero (they add nothing).
    A plain nn.MultiheadAttention only: a SparseMultiheadAttention's out_proj.weight is
    the dense weight, not what its mask leaves (export it first)."""
    if type(attention) is not nn.MultiheadAttention:
        raise TypeError(f"`attention` must be a plain nn.MultiheadAttention, got {type(attention).__name__}")
    w = attention.out_proj.weight.detach()
    return w.reshape(w.shape[0], attention.num_heads, attention.head_dim).eq(0).all(2).all(0)


def prune_heads(attention: nn.Module, tied: set[int]) -> tuple[nn.Module, int]:
    """(the attention without its closed heads, how many went). One head always stays.
    Anything but a plain nn.MultiheadAttention with untied parameters (`tied`: ids), or
    one with nothing to remove, comes back as it is."""
    if type(attention) is not nn.MultiheadAttention or any(id(p) in tied for p in attention.parameters()):
        return attention, 0
    closed = closed_heads(attention)
    if bool(closed.all()):
        closed[0] = False
    if not bool(closed.any()):
        return attention, 0
    return PrunedMultiheadAttention(attention, ~closed), int(closed.sum())


def weights_unused(node: fx.Node) -> bool:
    """Whether an fx call of an attention never reads its attention weights: it passes
    need_weights=False, or nothing uses its output [1]."""
    need = node.kwargs.get("need_weights", node.args[4] if len(node.args) > 4 else True)
    if need is False:
        return True
    return all(u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users)
               for u in node.users)
