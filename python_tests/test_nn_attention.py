"""SparseMultiheadAttention: for every mask kind its output and gradients equal
nn.MultiheadAttention's run with w ⊙ g as its projection weights (torch.func.functional_call,
so nn.MultiheadAttention's own forward is the oracle), under every attention option;
state_dict keys, sparsify's selection and refusals, export, MACs, torch.compile, and every
method training a torchvision ViT with its attention pruned."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call

from methods_helpers import one_thread  # noqa: F401 (fixture)
from sparsekern import methods as M
from sparsekern.nn import SparseLinear, SparseMultiheadAttention, count_macs, export, sparse_modules, sparsify
from sparsekern.nn.attention import projection_names
from sparsekern.nn.sparsify import planned_layer_names
from sparsekern.run_report import nonzero_macs
from test_nn_modules import KINDS, STATE_NAME, TOL, kind_and_options, randomize, reference_gate

E, HEADS = 8, 2


def attention(kind, device="cpu", **options):
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(E, HEADS, dtype=torch.float64, device=device, **options)
    if options.get("add_bias_kv"):
        nn.init.normal_(dense.bias_k), nn.init.normal_(dense.bias_v)
    name, opts = kind_and_options(kind)
    sparse = SparseMultiheadAttention.from_dense(copy.deepcopy(dense), name, **opts)
    for proj in projection_names(sparse):
        randomize(getattr(sparse, proj))
    return dense, sparse


def inputs(case, batch_first, device="cpu", kdim=E, vdim=E):
    """(args, kwargs) of one attention call."""
    def x(length, features=E):
        return torch.randn(*((3, length) if batch_first else (length, 3)), features, dtype=torch.float64,
                           device=device)

    q = x(5)
    if case == "self":
        return (q, q, q), {}
    if case == "cross":
        kv = x(4)
        return (q, kv, kv), {"need_weights": False}
    if case == "masks":
        k, v = x(4, kdim), x(4, vdim)
        padding = torch.zeros(3, 4, dtype=torch.float64)
        padding[1, -2:] = float("-inf")
        return (q, k, v), {"key_padding_mask": padding, "attn_mask": torch.randn(5, 4, dtype=torch.float64),
                           "average_attn_weights": False}
    if case == "causal":
        causal = torch.triu(torch.full((5, 5), float("-inf"), dtype=torch.float64), 1)
        return (q, q, q), {"attn_mask": causal, "is_causal": True}
    if case == "unbatched":
        u = torch.randn(5, E, dtype=torch.float64)
        return (u, u, u), {}
    raise ValueError(case)


CONFIGS = [dict(), dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True, add_zero_attn=True),
           dict(kdim=5, vdim=3)]  # the last: q_proj, k_proj and v_proj weights instead of in_proj's
CASES = ["self", "cross", "masks", "causal", "unbatched"]


def check(kind, config, case, training=True, device="cpu"):
    dense, sparse = attention(kind, device, **config)
    sparse.train(training)
    args, kwargs = inputs(case, config.get("batch_first", False), device, config.get("kdim", E), config.get("vdim", E))
    projections = {n: getattr(sparse, n) for n in projection_names(sparse)}
    offsets = {n: getattr(p.mask, "offset", None) for n, p in projections.items()}
    out, weights = sparse(*args, **kwargs)
    go = torch.randn_like(out)
    (out * go).sum().backward()

    leaves, params = {}, {}
    for name, proj in projections.items():
        state = getattr(proj, STATE_NAME[kind])
        w = proj.weight.detach().clone().requires_grad_()
        s = state.detach().clone().requires_grad_(state.is_floating_point())
        w_eff = w * reference_gate(proj, s, offsets[name])
        if kind == "straight_through":  # value w ⊙ m, gradient G
            w_eff = w + (w_eff - w).detach()
        leaves[name] = (w, s)
        params["out_proj.weight" if name == "out_proj" else f"{name}_weight"] = w_eff
        if proj.bias is not None:
            params["out_proj.bias" if name == "out_proj" else f"{name}_bias"] = proj.bias
    dense.train(training)
    ref_out, ref_weights = functional_call(dense, params, args, kwargs)
    (ref_out * go).sum().backward()
    torch.testing.assert_close(out, ref_out, **TOL)
    if ref_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, ref_weights, **TOL)
    mask_grads = []
    for name, proj in projections.items():
        w, s = leaves[name]
        torch.testing.assert_close(proj.weight.grad, w.grad, **TOL)
        state = getattr(proj, STATE_NAME[kind])
        if state.is_floating_point():
            torch.testing.assert_close(state.grad, s.grad, **TOL)
            mask_grads.append(float(state.grad.abs().sum()))
    # Some mask gradient is nonzero (a projection's few structured gates may all saturate).
    assert not mask_grads or max(mask_grads) > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_equals_multihead_attention_with_masked_weights(kind, config, device):
    check(kind, CONFIGS[config], "masks" if "kdim" in CONFIGS[config] else "self", device=device)


@pytest.mark.parametrize("case", CASES[1:])
@pytest.mark.parametrize("kind", ["binary", "hard_concrete"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_every_call_form(kind, case, batch_first):
    check(kind, {"batch_first": batch_first}, case)


@pytest.mark.parametrize("kind", ["sigmoid", "hard_concrete_structured"])
def test_eval_mode_with_dropout(kind):
    check(kind, {"dropout": 0.3}, "masks", training=False)


def test_state_dict_keeps_multihead_attention_keys():
    dense, sparse = attention("hard_concrete")
    keys = list(sparse.state_dict())
    assert keys == ["in_proj_weight", "in_proj_bias", "in_proj_weight_log_alpha",
                    "out_proj.weight", "out_proj.bias", "out_proj.weight_log_alpha"]
    # A dense checkpoint loads strictly; the masks stay as they are.
    log_alpha = sparse.in_proj.weight_log_alpha.detach().clone()
    with torch.no_grad():
        dense.in_proj_weight.mul_(2)
    sparse.load_state_dict(dense.state_dict())
    assert torch.equal(sparse.in_proj.weight, dense.in_proj_weight)
    assert torch.equal(sparse.in_proj.weight_log_alpha, log_alpha)
    # A sparse one round-trips, nested too; the caller's dict is not renamed.
    other = attention("hard_concrete")[1]
    wrapped = nn.Sequential(nn.Identity(), sparse)
    state = wrapped.state_dict()
    assert "1.in_proj_weight_log_alpha" in state
    target = nn.Sequential(nn.Identity(), other)
    target.load_state_dict(state)
    assert "1.in_proj_weight_log_alpha" in state
    for a, b in zip(target.state_dict().values(), state.values()):
        assert torch.equal(a, b)
    # A plain attention takes a sparse checkpoint without the mask entries (strict=False).
    plain = nn.MultiheadAttention(E, HEADS, dtype=torch.float64)
    result = plain.load_state_dict(sparse.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == ["in_proj_weight_log_alpha", "out_proj.weight_log_alpha"]
    assert torch.equal(plain.in_proj_weight, sparse.in_proj.weight)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.fc = nn.Linear(E, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("include, exclude, expected", [
    (None, None, ["attn.in_proj", "attn.out_proj", "fc"]),
    (["*.in_proj"], None, ["attn.in_proj"]),
    (None, ["attn.in_proj", "fc"], ["attn.out_proj"]),
    (["attn"], None, ["attn.in_proj", "attn.out_proj"]),
    (None, ["attn"], ["fc"]),
])
def test_sparsify_selects_each_projection_by_name(include, exclude, expected):
    model = Block()
    x = torch.randn(2, 4, E)
    before = model(x)
    assert planned_layer_names(model, include, exclude) == expected
    sparsify(model, include=include, exclude=exclude)
    assert [n for n, _ in sparse_modules(model)] == expected
    swapped = any(n.startswith("attn.") for n in expected)
    assert isinstance(model.attn, SparseMultiheadAttention) == swapped
    if swapped:  # the projection left dense is a plain nn.Linear
        for proj in ("in_proj", "out_proj"):
            assert type(getattr(model.attn, proj)) is (SparseLinear if f"attn.{proj}" in expected else nn.Linear)
    torch.testing.assert_close(model(x), before)  # binary masks start all ones


def test_sparsify_gives_each_projection_its_own_seed():
    model = nn.Sequential(nn.Linear(E, E), nn.MultiheadAttention(E, HEADS), nn.Linear(E, 2))
    sparsify(model, mask="hard_concrete", seed=10)
    assert [m.mask.seed for _, m in sparse_modules(model)] == [10, 11, 12, 13]


class ReadsInProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS)

    def forward(self, x):
        return self.attn(x, x, x)[0] + F.linear(x, self.attn.in_proj_weight[:E])


def test_attention_whose_parent_reads_its_weights_is_refused():
    model = ReadsInProj()
    with pytest.raises(TypeError, match=r"ReadsInProj.forward reads `self.attn.in_proj_weight`: 'attn.in_proj'\)"
                                        r".* exclude=\['attn.in_proj'\]"):
        sparsify(model)
    assert type(model.attn) is nn.MultiheadAttention
    sparsify(model, exclude=["attn.in_proj"])
    assert [n for n, _ in sparse_modules(model)] == ["attn.out_proj"]


@pytest.mark.parametrize("call, error, match", [
    (lambda: SparseMultiheadAttention.from_dense(nn.Linear(E, E)), TypeError, "nn.MultiheadAttention"),
    (lambda: SparseMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS), projections=[]),
     ValueError, "projections"),
    (lambda: SparseMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS), projections=["q_proj"]),
     ValueError, r"some of \['in_proj', 'out_proj'\], got \['q_proj'\]"),
    (lambda: SparseMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS), "relaxed", m0=2.0), ValueError, "m0"),
    (lambda: SparseMultiheadAttention(E, HEADS), TypeError, "from_dense"),
    (lambda: SparseMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS), projections=3), TypeError,
     "`projections` must be"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_one_projection_by_name():
    sparse = SparseMultiheadAttention.from_dense(nn.MultiheadAttention(E, HEADS), projections="out_proj")
    assert type(sparse.in_proj) is nn.Linear and type(sparse.out_proj) is SparseLinear


def test_bad_mask_options_leave_the_model_untouched():
    model = Block()
    with pytest.raises(ValueError, match="m0"):
        sparsify(model, mask="relaxed", m0=2.0)
    assert type(model.attn) is nn.MultiheadAttention


@pytest.mark.parametrize("kind", KINDS)
def test_export_is_a_plain_multihead_attention_computing_the_same(kind):
    _, sparse = attention(kind, batch_first=True, add_bias_kv=True)
    model = nn.Sequential(sparse).eval()
    exported = export(model).model
    assert type(exported[0]) is nn.MultiheadAttention
    assert list(exported.state_dict()) == ["0.in_proj_weight", "0.in_proj_bias", "0.bias_k", "0.bias_v",
                                           "0.out_proj.weight", "0.out_proj.bias"]
    x = torch.randn(3, 5, E, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(exported[0](x, x, x)[0], sparse(x, x, x)[0], **TOL)
    assert sparse.training is False and type(model[0]) is SparseMultiheadAttention  # model unchanged


def test_copies_and_pickles_compute_the_same():
    _, sparse = attention("hard_concrete")
    sparse.eval()
    x = torch.randn(5, 2, E, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copy.deepcopy(sparse), loaded):
        torch.testing.assert_close(other(x, x, x)[0], sparse(x, x, x)[0])
        assert list(other.state_dict()) == list(sparse.state_dict())


def test_macs_count_the_projections_and_attention_products():
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    tokens = 2 * (4 + 1)  # 4 patches + class token, batch 2
    per_block = tokens * 4 * 16 * 16 + 2 * tokens * 5 * 16 + 2 * tokens * 16 * 32  # projections, q kᵀ and ·v, MLP
    expected = 2 * per_block + 2 * 4 * 16 * 3 * 8 * 8 + 2 * 16 * 5  # two blocks, patch conv, head
    assert count_macs(vit, x) == expected
    sparsify(vit)
    assert count_macs(vit, x) == expected
    attn = vit.encoder.layers[0].self_attention
    with torch.no_grad():
        attn.in_proj.weight_mask[:16] = False  # q rows
        attn.out_proj.weight_mask[:, :4] = False
    dense_head = 2 * 16 * 5  # torchvision zero-initialises the head: nonzero MACs skip it
    assert nonzero_macs(vit, x) == expected - dense_head - tokens * (16 * 16 + 16 * 4)


def tiny_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5)


@pytest.mark.parametrize("kind", ["binary", "hard_concrete"])
def test_compiles_in_one_graph_and_matches_eager(kind):
    torch._dynamo.reset()
    _, sparse = attention(kind, batch_first=True)
    twin = copy.deepcopy(sparse)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    x = torch.randn(3, 5, E, dtype=torch.float64)
    for _ in range(3):  # fresh hard-concrete noise each step, no recompile
        twin.zero_grad(), sparse.zero_grad()  # .grad None at each forward (test_methods_compile: why)
        y, y_ref = compiled(x, x, x)[0], sparse(x, x, x)[0]
        torch.testing.assert_close(y, y_ref, **TOL)
        y.sum().backward(), y_ref.sum().backward()
    torch.testing.assert_close(twin.in_proj.weight.grad, sparse.in_proj.weight.grad, **TOL)
    assert counter.frame_count == 1


VIT_METHODS = {
    "imp": lambda m: M.IMP(m),
    "dpf": lambda m: M.DPF(m, sparsity=0.5, period=2),
    "cs": lambda m: M.ContinuousSparsification(m, epochs_per_round=2),
    "concave": lambda m: M.ConcaveRegularization(m),
    "l0": lambda m: M.ConstrainedL0(m, {"encoder.layers.encoder_layer_0.self_attention.in_proj": 0.3}),
    "l0 structured": lambda m: M.ConstrainedL0(m, 0.5, structured=True),
}


@pytest.mark.parametrize("name", list(VIT_METHODS))
def test_every_method_prunes_a_torchvision_vit_attention_included(name, one_thread):  # noqa: F811 (fixture)
    model = tiny_vit()
    method = VIT_METHODS[name](model)
    layers = [n for n, _ in sparse_modules(model)]
    assert sum(n.endswith((".in_proj", ".out_proj")) for n in layers) == 4
    opt = torch.optim.SGD(method.param_groups(lr=0.1), momentum=0.9)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    attn = model.encoder.layers[0].self_attention
    for _ in range(3):  # the zero-initialised head passes no gradient back in the first step
        loss = F.cross_entropy(model(x), y) + method.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
    assert bool(attn.in_proj.weight.grad.abs().sum() > 0)
    assert {f"encoder.layers.encoder_layer_0.self_attention.{p}" for p in ("in_proj", "out_proj")} <= set(
        method.density()["layers"])
    exported = method.export(example_input=(1, 3, 16, 16)).model
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_state_dict_keys_are_attribute_paths_to_the_same_tensors():
    # What torch.distributed.checkpoint's get_model_state_dict relies on; and
    # in_proj_weight reads as on nn.MultiheadAttention (the dense parameter).
    _, sparse = attention("relaxed", add_bias_kv=True)
    model = nn.Sequential(nn.Linear(E, E), sparse)
    assert sparse.in_proj_weight is sparse.in_proj.weight and sparse.in_proj_bias is sparse.in_proj.bias
    for key, value in model.state_dict(keep_vars=True).items():
        obj = model
        for part in key.split("."):
            obj = getattr(obj, part)
        assert obj is value, key
    with pytest.raises(AttributeError, match="in_proj_nothing"):
        sparse.in_proj_nothing


def test_a_pruning_round_ranks_and_keeps_the_attention_like_any_layer():
    # The rewind once restored every state_dict entry but the masks it named
    # "<layer>.weight_mask": the in-projection's is in_proj_weight_mask, so each IMP round
    # pruned it and the rewind put its unpruned mask back.
    model = tiny_vit()
    method = M.IMP(model)
    before = {n: layer.weight.detach().abs().clone() for n, layer in sparse_modules(model)}
    method.end_round()
    pruned = max(float(before[n][~layer.weight_mask].max()) for n, layer in sparse_modules(model)
                 if not layer.weight_mask.all())
    kept = min(float(before[n][layer.weight_mask].min()) for n, layer in sparse_modules(model)
               if layer.weight_mask.any())
    assert pruned <= kept  # one global magnitude threshold
    densities = method.density()["layers"]
    assert 0.8 < densities["encoder.layers.encoder_layer_0.self_attention.in_proj"] < 0.95


def test_separate_q_k_v_projections_keep_their_keys_count_and_export():
    # kdim / vdim != embed_dim: nn.MultiheadAttention holds q_proj_weight, k_proj_weight
    # and v_proj_weight (and one in_proj_bias) instead of the packed in_proj_weight.
    dense, sparse = attention("binary", kdim=5, vdim=3, batch_first=True)
    assert projection_names(sparse) == ("q_proj", "k_proj", "v_proj", "out_proj")
    assert sorted(sparse.state_dict()) == sorted([*dense.state_dict(), "q_proj_weight_mask", "k_proj_weight_mask",
                                                  "v_proj_weight_mask", "out_proj.weight_mask"])
    sparse.load_state_dict(dense.state_dict())  # strict: a dense checkpoint loads
    for key, value in sparse.state_dict(keep_vars=True).items():
        obj = sparse
        for part in key.split("."):
            obj = getattr(obj, part)
        assert obj is value, key
    sparse.eval()
    (q, k, v), kwargs = inputs("masks", True, kdim=5, vdim=3)
    exported = export(nn.Sequential(sparse)).model[0].eval()
    assert type(exported) is nn.MultiheadAttention and (exported.kdim, exported.vdim) == (5, 3)
    with torch.no_grad():
        torch.testing.assert_close(exported(q, k, v, **kwargs)[0], sparse(q, k, v, **kwargs)[0], **TOL)

    class Cross(nn.Module):
        def __init__(self, attention):
            super().__init__()
            self.attn = attention

        def forward(self, x):
            return self.attn(x, k, v, need_weights=False)[0]

    macs = 15 * E * E + 12 * E * 5 + 12 * E * 3 + 15 * E * E + 2 * 15 * 4 * E  # q, k, v, out; q kᵀ and ·v
    assert count_macs(Cross(exported), q) == macs
    pruned = {n: int((~getattr(sparse, n).weight_mask).sum()) for n in projection_names(sparse)}
    assert nonzero_macs(Cross(sparse), q) == macs - 15 * (pruned["q_proj"] + pruned["out_proj"]) - 12 * (
        pruned["k_proj"] + pruned["v_proj"])


def test_sparsify_names_separate_projections():
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS, kdim=5, vdim=3))
    assert planned_layer_names(model, exclude="*.k_proj") == ["0.q_proj", "0.v_proj", "0.out_proj"]
    sparsify(model, exclude="*.k_proj")
    assert [n for n, _ in sparse_modules(model)] == ["0.q_proj", "0.v_proj", "0.out_proj"]
    assert type(model[0].k_proj) is nn.Linear
