"""Sparse Swin attention: torchvision's ShiftedWindowAttention(V2) handing its `qkv` and
`proj` layers' masked weights to shifted_window_attention.

torchvision's Swin attention passes self.qkv.weight and self.proj.weight to the attention
function itself, so a mask on those layers would never apply (before sparsify refused them,
DPF and concave trained a swin_t whose export differed from the trained model by 0.28 and
0.13). sparsify changes an attention holding a sparse layer to the subclass here, in
place (same attributes, submodules and state_dict), whose forward differs only in the
weights it passes; export gives torchvision's class back. Imported only when a model has Swin
attention (it imports torchvision).
"""
from __future__ import annotations

from torchvision.models.swin_transformer import (
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    shifted_window_attention,
)

from .attention import weight_and_bias
from .transformer import Retyped


class _SparseSwinAttention(Retyped):
    """What both versions share: the call, with the masked weights."""

    def _attention(self, x, **extra):
        qkv_weight, qkv_bias = weight_and_bias(self.qkv)
        proj_weight, proj_bias = weight_and_bias(self.proj)
        return shifted_window_attention(
            x, qkv_weight, proj_weight, self.get_relative_position_bias(), self.window_size, self.num_heads,
            shift_size=self.shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
            qkv_bias=qkv_bias, proj_bias=proj_bias, training=self.training, **extra,
        )


class SparseShiftedWindowAttention(_SparseSwinAttention, ShiftedWindowAttention):
    dense_type = ShiftedWindowAttention

    def forward(self, x):
        return self._attention(x)


class SparseShiftedWindowAttentionV2(_SparseSwinAttention, ShiftedWindowAttentionV2):
    dense_type = ShiftedWindowAttentionV2

    def forward(self, x):
        return self._attention(x, logit_scale=self.logit_scale)


RETYPED = {ShiftedWindowAttention: SparseShiftedWindowAttention,
           ShiftedWindowAttentionV2: SparseShiftedWindowAttentionV2}
