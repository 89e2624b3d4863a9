"""Attention heads: structured L0's one gate per head (HardConcreteMask inputs_per_gate on
SparseMultiheadAttention's out_proj), PrunedMultiheadAttention against nn.MultiheadAttention
with the same heads zeroed (torch's forward is the oracle, float64, every option and call
form), and purge removing closed heads inside torch's transformer layers and at fx call
sites that do not read the attention weights (torchvision's ViT), exactly."""
import copy
import io
import itertools
import math

import pytest
import torch
import torchvision
from torch import nn

from conftest import tolerances
from methods_helpers import one_thread  # noqa: F401 (fixture)
from sparsekern import methods as M
from sparsekern import ops
from sparsekern.nn import (HardConcreteMask, PrunedMultiheadAttention, SparseConv2d, SparseLinear,
                           SparseMultiheadAttention, export, sparsify)
from sparsekern.nn.heads import closed_heads
from sparsekern.run_report import layer_rows

E, HEADS, D = 12, 4, 3  # embed_dim, heads, head_dim
TOL = tolerances(torch.float64, 64)
KEEP = torch.tensor([True, False, True, True])


def zeroed(attention: nn.MultiheadAttention, keep: torch.Tensor) -> nn.MultiheadAttention:
    """`attention` with the out_proj columns of the heads not in `keep` zeroed (in place)."""
    with torch.no_grad():
        w = attention.out_proj.weight
        w.view(w.shape[0], attention.num_heads, attention.head_dim)[:, ~keep] = 0
    return attention


# ---- one gate per head ------------------------------------------------------------------

def test_structured_l0_gives_out_proj_one_gate_per_head():
    attention = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS), "hard_concrete", structured=True)
    out_proj = attention.out_proj
    assert out_proj.weight_log_alpha.shape == (1, HEADS) and out_proj.mask.inputs_per_gate == D
    assert attention.in_proj.weight_log_alpha.shape == (1, E)  # per input neuron, as any Linear
    with torch.no_grad():
        out_proj.weight_log_alpha[0, 1] = -10.0
    gate = out_proj.mask.gate(out_proj)
    assert gate.shape == (1, E) and gate[0, D:2 * D].eq(0).all() and gate[0, :D].gt(0).all()
    assert out_proj.density() == pytest.approx(3 / 4)
    # Expected L0: each head's gate stands for its E x head_dim weights.
    p = torch.sigmoid(out_proj.weight_log_alpha - (2 / 3) * math.log(0.1 / 1.1))
    torch.testing.assert_close(out_proj.mask.expected_nonzero(out_proj), (E * D * p).sum())
    # An explicit inputs_per_gate wins; unstructured masks are per weight as before.
    explicit = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS), "hard_concrete", structured=True,
                                                   inputs_per_gate=2)
    assert explicit.out_proj.weight_log_alpha.shape == (1, E // 2) == explicit.in_proj.weight_log_alpha.shape
    plain = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS), "hard_concrete")
    assert plain.out_proj.weight_log_alpha.shape == (E, E)


def test_inputs_per_gate_is_checked():
    with pytest.raises(TypeError, match="inputs_per_gate"):
        HardConcreteMask(structured=True, inputs_per_gate=2.0)
    with pytest.raises(ValueError, match="inputs_per_gate"):
        HardConcreteMask(structured=True, inputs_per_gate=0)
    with pytest.raises(ValueError, match="structured=True"):
        HardConcreteMask(inputs_per_gate=2)
    with pytest.raises(ValueError, match="in_features"):
        SparseLinear(7, 3, mask="hard_concrete", structured=True, inputs_per_gate=2)
    with pytest.raises(ValueError, match="Linear"):  # a conv's gates are per output channel
        SparseConv2d(4, 4, 3, mask="hard_concrete", structured=True, inputs_per_gate=2)


def test_grouped_gates_train_like_their_reference():
    # y = x (w ⊙ z)ᵀ + b with z the op's sample for [1, in/k] log α, repeated k times: the
    # gradient of each group's log α sums its k inputs'.
    torch.manual_seed(0)
    layer = SparseLinear(6, 5, dtype=torch.float64, mask="hard_concrete", structured=True, inputs_per_gate=3, seed=7)
    x = torch.randn(4, 6, dtype=torch.float64)
    offset = torch.tensor(layer.mask.offset)
    y = layer(x)
    go = torch.randn_like(y)
    (y * go).sum().backward()
    log_alpha = layer.weight_log_alpha.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    z, _ = ops.hard_concrete_sample(log_alpha, 7, offset, training=True)
    ref = x @ (w * z.repeat_interleave(3, dim=1)).T + layer.bias.detach()
    (ref * go).sum().backward()
    torch.testing.assert_close(y, ref, **TOL)
    torch.testing.assert_close(layer.weight.grad, w.grad, **TOL)
    torch.testing.assert_close(layer.weight_log_alpha.grad, log_alpha.grad, **TOL)


def test_expected_l2_covers_each_group_s_weights():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0] = SparseLinear.from_dense(model[0], "hard_concrete", structured=True, inputs_per_gate=3)
    method = M.PenalizedL0(model, 0.0, l2_weight=2.0, rescale_init=False, structured=True)
    layer = model[0]
    p = torch.sigmoid(layer.weight_log_alpha.detach() - (2 / 3) * math.log(0.1 / 1.1)).repeat_interleave(3, dim=1)
    last = model[2]
    p_last = torch.sigmoid(last.weight_log_alpha.detach() - (2 / 3) * math.log(0.1 / 1.1))
    expected = (p * layer.weight.square()).sum() + (p_last * last.weight.square()).sum()
    torch.testing.assert_close(method.penalty(), expected)


# ---- PrunedMultiheadAttention against torch's ----------------------------------------------

CONFIGS = [dict(), dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True, add_zero_attn=True),
           dict(kdim=5, vdim=7), dict(kdim=5, vdim=7, batch_first=True, add_bias_kv=True)]


def pair(**config):
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(E, HEADS, dtype=torch.float64, **config)
    if config.get("add_bias_kv"):
        nn.init.normal_(dense.bias_k), nn.init.normal_(dense.bias_v)
    if dense.in_proj_bias is not None:
        nn.init.normal_(dense.in_proj_bias)
    zeroed(dense.eval(), KEEP)
    return dense, PrunedMultiheadAttention(dense, KEEP).eval()


def calls(config):
    """(args, kwargs) of every call form: self/cross attention, masks of every kind."""
    bf, kdim, vdim = config.get("batch_first", False), config.get("kdim", E), config.get("vdim", E)

    def x(length, features=E):
        return torch.randn(*((2, length) if bf else (length, 2)), features, dtype=torch.float64)

    q, k, v = x(5), x(4, kdim), x(4, vdim)
    padding = torch.tensor([[False, False, True, False], [False] * 4])
    per_head = torch.randn(2 * HEADS, 5, 4, dtype=torch.float64)
    blocked = torch.rand(5, 4) > 0.3  # True: not attended; key 0 always is (no all-blocked row: NaN)
    blocked[:, 0] = False
    forms = [((q, k, v), {}), ((q, k, v), {"key_padding_mask": padding}),
             ((q, k, v), {"attn_mask": per_head, "key_padding_mask": padding.double() * -1e9}),
             ((q, k, v), {"attn_mask": blocked})]
    if kdim == E and vdim == E:
        causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
        forms += [((q, q, q), {}), ((q, q, q), {"attn_mask": causal, "is_causal": True}),
                  ((q, k, k), {"key_padding_mask": padding})]
        u = torch.randn(5, E, dtype=torch.float64)
        forms += [((u, u, u), {"attn_mask": causal}), ((u, u, u), {"key_padding_mask": torch.tensor([0, 0, 0, -1e9, -1e9], dtype=torch.float64)})]
    return forms


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_pruned_attention_equals_torch_s_with_the_heads_zeroed(config):
    dense, pruned = pair(**CONFIGS[config])
    assert pruned.num_heads == 3 and pruned.heads == [0, 2, 3]
    for (args, kwargs), need_weights in itertools.product(calls(CONFIGS[config]), (False, True)):
        if kwargs.get("is_causal") and need_weights:
            continue  # torch needs the mask materialised there; covered without is_causal
        expected, expected_weights = dense(*args, need_weights=need_weights, average_attn_weights=False, **kwargs)
        out, weights = pruned(*args, need_weights=need_weights, average_attn_weights=False, **kwargs)
        torch.testing.assert_close(out, expected, **TOL)
        if need_weights:  # per-head weights: the kept heads' are torch's
            torch.testing.assert_close(weights, expected_weights[..., KEEP, :, :], **TOL)
        else:
            assert weights is None


def test_pruned_attention_averages_its_kept_heads_and_trains():
    dense, pruned = pair(dropout=0.0)
    q = torch.randn(5, 2, E, dtype=torch.float64)
    _, per_head = dense(q, q, q, average_attn_weights=False)
    _, mean = pruned(q, q, q)
    torch.testing.assert_close(mean, per_head[:, KEEP].mean(1), **TOL)
    pruned.train()
    out, _ = pruned(q, q, q, need_weights=False)
    out.sum().backward()
    assert all(p.grad is not None for p in pruned.parameters())


def test_pruned_attention_rejects_bad_input():
    dense = nn.MultiheadAttention(E, HEADS)
    with pytest.raises(TypeError, match="attention"):
        PrunedMultiheadAttention(nn.Linear(E, E), KEEP)
    with pytest.raises(ValueError, match="keep"):
        PrunedMultiheadAttention(dense, KEEP[:3])
    with pytest.raises(TypeError, match="keep.*int32"):
        PrunedMultiheadAttention(dense, KEEP.int())
    with pytest.raises(TypeError, match="keep.*list"):
        PrunedMultiheadAttention(dense, KEEP.tolist())
    with pytest.raises(ValueError, match="at least one"):
        PrunedMultiheadAttention(dense, torch.zeros(HEADS, dtype=torch.bool))
    pruned = PrunedMultiheadAttention(dense, KEEP)
    q = torch.randn(5, 2, E)
    with pytest.raises(RuntimeError, match="attn_mask"):
        pruned(q, q, q, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(RuntimeError, match="is_causal"):
        pruned(q, q, q, is_causal=True)


def test_pruned_attention_state_dict_copies_and_pickles():
    dense, pruned = pair()
    sizes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert sizes == {"in_proj_weight": (27, E), "in_proj_bias": (27,), "out_proj.weight": (E, 9), "out_proj.bias": (E,)}
    q = torch.randn(5, 2, E, dtype=torch.float64)
    expected = pruned(q, q, q)[0]
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(pruned), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(other(q, q, q)[0], expected)
    fresh = PrunedMultiheadAttention(nn.MultiheadAttention(E, HEADS, dtype=torch.float64), KEEP)
    fresh.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(fresh.eval()(q, q, q)[0], expected)


# ---- purge ----------------------------------------------------------------------------------

def encoder(norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.1, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)  # torch nests only post-norm


@pytest.mark.parametrize("norm_first", [False, True])
def test_structured_l0_closes_heads_that_purge_removes(norm_first, one_thread):  # noqa: F811 (fixture)
    model = encoder(norm_first)
    method = M.ConstrainedL0(model, 0.5, structured=True)
    opt = torch.optim.SGD(method.param_groups(lr=0.01), lr=0.01)
    x = torch.randn(3, 6, E)
    for _ in range(2):  # it trains with the head gates
        loss = model(x).square().mean() + method.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
    with torch.no_grad():
        model.layers[0].self_attn.out_proj.weight_log_alpha[0, [1, 3]] = -10.0
        model.layers[1].self_attn.out_proj.weight_log_alpha[0, 0] = -10.0
    model.eval()
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    with torch.no_grad():
        expected, expected_padded = model(x), model(x, src_key_padding_mask=padding)
    exported = method.export(purge=True, example_input=x)
    stats = exported.stats
    assert stats["removed_channels"] == {"layers.0.self_attn.heads": 2, "layers.1.self_attn.heads": 1}
    # Each head: q, k, v rows and biases (3·D·(E + 1)) and out_proj columns (E·D).
    assert stats["params_before"] - stats["params_after"] == 3 * (3 * D * (E + 1) + E * D)
    # MACs per head and token (6 tokens, batch 3): q, k, v and out projections, then q·kᵀ and a·v.
    tokens = 3 * 6
    assert stats["macs_before"] - stats["macs_after"] == 3 * (tokens * 4 * E * D + 2 * tokens * 6 * D)
    small = exported.model.eval()
    assert [type(layer.self_attn) for layer in small.layers] == [PrunedMultiheadAttention] * 2
    assert small.layers[0].self_attn.heads == [0, 2]
    nested = []
    small.layers[0].self_attn.register_forward_pre_hook(lambda m, args: nested.append(args[0].is_nested))
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-5)
        # nn.TransformerEncoder's nested-tensor path (eval, padding mask) hands it nested input.
        torch.testing.assert_close(small(x, src_key_padding_mask=padding), expected_padded, rtol=1e-5, atol=1e-5)
    assert nested == [False, not norm_first]


def test_purge_removes_heads_of_decoder_attentions():
    torch.manual_seed(0)
    model = nn.Transformer(E, HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0,
                           batch_first=True)
    zeroed(model.decoder.layers[0].self_attn, KEEP)
    zeroed(model.decoder.layers[0].multihead_attn, torch.tensor([False, False, False, True]))
    model.eval()
    src, tgt = torch.randn(2, 5, E), torch.randn(2, 4, E)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with torch.no_grad():
        expected = model(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    exported = export(model, purge=True)
    assert exported.stats["removed_channels"] == {"decoder.layers.0.self_attn.heads": 1,
                                                  "decoder.layers.0.multihead_attn.heads": 3}
    with torch.no_grad():
        torch.testing.assert_close(exported.model(src, tgt, tgt_mask=causal, tgt_is_causal=True), expected,
                                   rtol=1e-5, atol=1e-6)


class Calls(nn.Module):
    """Attention called as a plain model would: weights ignored, or read."""

    def __init__(self, read_weights: bool):
        super().__init__()
        self.attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, 2)
        self.read_weights = read_weights

    def forward(self, x):
        out, weights = self.attention(x, x, x)
        if self.read_weights:
            out = out + weights.sum(-1, keepdim=True)
        return self.head(out)


@pytest.mark.parametrize("read_weights", [False, True])
def test_fx_purge_removes_heads_only_where_the_weights_are_unused(read_weights):
    torch.manual_seed(0)
    model = Calls(read_weights)
    zeroed(model.attention, KEEP)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        expected = model.eval()(x)
    exported = export(model, purge=True, example_input=x)
    assert exported.stats["removed_channels"] == ({} if read_weights else {"attention.heads": 1})
    assert isinstance(exported.model.attention, nn.MultiheadAttention if read_weights else PrunedMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(x), expected, rtol=1e-5, atol=1e-6)


def test_tied_or_shared_attention_keeps_its_heads():
    torch.manual_seed(0)
    attention = zeroed(nn.MultiheadAttention(E, HEADS, batch_first=True), KEEP)
    model = nn.Transformer(E, HEADS, num_encoder_layers=2, num_decoder_layers=0, dim_feedforward=8,
                           batch_first=True).encoder
    for layer in model.layers:
        layer.self_attn = attention  # one attention in two places
    assert export(model, purge=True).stats["removed_channels"] == {}


def test_all_heads_closed_keeps_one():
    torch.manual_seed(0)
    model = Calls(False)
    zeroed(model.attention, torch.zeros(HEADS, dtype=torch.bool))
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        expected = model.eval()(x)
    exported = export(model, purge=True, example_input=x)
    assert exported.stats["removed_channels"] == {"attention.heads": HEADS - 1}
    with torch.no_grad():
        torch.testing.assert_close(exported.model(x), expected, rtol=1e-5, atol=1e-6)


def tiny_vit():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=HEADS,
                                               hidden_dim=E * 2, mlp_dim=16, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero
    return vit


def test_vit_heads_purge_compile_and_export(one_thread):  # noqa: F811 (fixture)
    vit = tiny_vit()
    method = M.ConstrainedL0(vit, 0.5, structured=True)
    with torch.no_grad():
        for name, layer in method.layers:
            if name.endswith("self_attention.out_proj"):
                layer.weight_log_alpha[0, ::2] = -10.0
    vit.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = vit(x)
    exported = method.export(purge=True, example_input=x)
    assert exported.stats["removed_channels"] == {f"encoder.layers.encoder_layer_{i}.self_attention.heads": 2
                                                  for i in range(2)}
    small = exported.model.eval()
    rows = {r["name"]: r for r in layer_rows(vit, small)}
    assert rows["encoder.layers.encoder_layer_0.self_attention.in_proj"]["exported_shape"] == [3 * E, 2 * E]
    assert rows["encoder.layers.encoder_layer_0.self_attention.out_proj"]["exported_shape"] == [2 * E, E]
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.compile(small, fullgraph=True)(x), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(small, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
    # Purging the purged model again (iterative pruning): its PrunedMultiheadAttention is a
    # leaf of purge's trace, as the nn.MultiheadAttention was (fx traced into it and failed).
    again = export(small, purge=True, example_input=x)
    assert again.stats["params_after"] == again.stats["params_before"] == exported.stats["params_after"]
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), expected, rtol=1e-5, atol=1e-5)


def test_sparsify_refuses_a_pruned_attention_s_out_proj():
    # Its forward reads out_proj's weight itself: a mask there would be bypassed.
    model = Calls(False)
    model.attention = PrunedMultiheadAttention(model.attention, KEEP)
    with pytest.raises(TypeError, match=r"exclude=\['attention.out_proj'\]"):
        sparsify(model, "binary")
    sparsify(model, "binary", exclude="attention.out_proj")
    assert isinstance(model.head, SparseLinear) and type(model.attention.out_proj) is nn.Linear


def test_closed_heads_reads_out_proj_columns():
    attention = zeroed(nn.MultiheadAttention(E, HEADS), KEEP)
    assert closed_heads(attention).tolist() == (~KEEP).tolist()
    with pytest.raises(TypeError, match="attention.*SparseMultiheadAttention"):
        closed_heads(SparseMultiheadAttention.from_dense(attention, "binary"))
