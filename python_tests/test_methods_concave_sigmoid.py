"""The concave method's sigmoid-reparameterisation ablation (Fracastoro et al., Fig. 9):
m = σ(β·s) with CS's β schedule, the penalties on that m, α-pruning to exactly 0 for good,
m carried over a round boundary, the export keeping exactly the alive support, argument
checks and the state round-trip."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods_helpers import _reload, one_thread, train  # noqa: F401
from methods_helpers import small_batches as batches
from methods_helpers import small_mlp as mlp
from sparsekern.methods import ConcaveRegularization, schedules


def method(model, **kwargs):
    kwargs = {"reparameterization": "sigmoid", "epochs_per_round": 3, "beta_final": 10.0, **kwargs}
    return ConcaveRegularization(model, **kwargs)


def sgd(m):
    return torch.optim.SGD(m.param_groups(lr=0.1, mask_lr=0.5), momentum=0.9)


def m_of(cs):
    return {name: torch.sigmoid(cs.beta * layer.weight_score.detach().double()) for name, layer in cs.layers}


@pytest.mark.parametrize("m0", [0.5, 0.2])
def test_forward_is_the_weight_times_sigmoid_of_beta_s(m0):
    model = mlp()
    c = method(model, m0=m0)
    x = batches(1)[0][0].double()
    model.double()
    assert all(torch.allclose(m, torch.full_like(m, m0)) for m in m_of(c).values())
    with torch.no_grad():
        for _, layer in c.layers:
            layer.weight_score.normal_()
    c._set_beta(3.0)
    h = x
    for i, layer in enumerate(model):
        if i % 2 == 0:
            w = layer.weight * torch.sigmoid(3.0 * layer.weight_score)
            h = F.linear(h, w, layer.bias)
        else:
            h = torch.relu(h)
    torch.testing.assert_close(model(x), h)


@pytest.mark.parametrize("regularizer", ["l1", "log"])
def test_penalty_is_lambda_times_r_of_m_with_its_gradient(regularizer):
    model = mlp().double()
    c = method(model, regularizer=regularizer, lam=1e-2, eps=0.1)
    with torch.no_grad():
        for _, layer in c.layers:
            layer.weight_score.normal_()
    c._set_beta(2.0)
    scores = [layer.weight_score for _, layer in c.layers]
    ref_scores = [s.detach().clone().requires_grad_() for s in scores]
    ms = [torch.sigmoid(2.0 * s) for s in ref_scores]
    if regularizer == "l1":
        ref = 1e-2 * sum(m.sum() for m in ms)
    else:
        ref = 1e-2 * sum((torch.log1p(m / 0.1) / math.log1p(1 / 0.1)).sum() for m in ms)
    model(torch.randn(2, 8, dtype=torch.float64))  # the l1 term comes from the last forward
    got = c.penalty()
    torch.testing.assert_close(got, ref)
    got.backward()
    ref.backward()
    for s, r in zip(scores, ref_scores):
        torch.testing.assert_close(s.grad, r.grad)


def test_beta_follows_the_exponential_schedule_and_restarts_each_round():
    model = mlp()
    c = method(model, epochs_per_round=4, beta_final=200.0, alpha=0.0)
    seen = [c.beta]
    for _ in range(3):
        c.end_epoch()
        seen.append(c.beta)
    assert seen == [schedules.exponential_beta(t, 4, 200.0) for t in range(4)]
    assert seen[0] == 1.0 and seen[-1] == pytest.approx(200.0)
    assert all(layer.mask.beta == c.beta for _, layer in c.layers)
    c.end_round()
    assert c.beta == 1.0 and all(layer.mask.beta == 1.0 for _, layer in c.layers)


def test_round_end_prunes_below_alpha_for_good_and_carries_m_over():
    model = mlp()
    c = method(model, alpha=0.4, lam=1e-3)
    init = {k: v.clone() for k, v in model.state_dict().items() if "score" not in k}
    data = batches(6)
    opt = sgd(c)
    for _ in range(3):
        train(model, c, opt, data[:2])
        c.end_epoch()
    before = m_of(c)
    c.end_round()
    after = m_of(c)
    for name, _ in c.layers:
        alive = c.alive[name]
        assert torch.equal(alive, before[name] >= 0.4)
        assert 0 < int(alive.sum()) < alive.numel()  # this run prunes some, keeps some
        assert torch.allclose(after[name][alive], before[name][alive], atol=1e-6)  # m carried over
        assert bool((after[name][~alive] == 0).all())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in init.items())  # weights rewound
    dead = {name: ~a.clone() for name, a in c.alive.items()}
    train(model, c, sgd(c), data[2:])  # momentum and a fresh optimiser revive nothing
    for name, layer in c.layers:
        assert bool((layer.weight_score[dead[name]] == -math.inf).all())
        assert bool((layer.mask.gate(layer)[dead[name]] == 0).all())


def one_round():
    """A model and its method after one 3-epoch round that prunes some entries."""
    model = mlp()
    c = method(model, alpha=0.4, lam=1e-3)
    opt = sgd(c)
    for _ in range(3):
        train(model, c, opt, batches(2))
        c.end_epoch()
    c.end_round()
    return model, c


def test_export_keeps_exactly_the_support_the_density_reports():
    model, c = one_round()
    exported = c.export().model
    linears = [m for m in exported.modules() if isinstance(m, torch.nn.Linear)]
    density = c.density()
    for (name, _), lin in zip(c.layers, linears):
        assert float((lin.weight != 0).float().mean()) == density["layers"][name]
        assert torch.equal(lin.weight != 0, c.alive[name])  # σ(s) ≠ 0 for every alive entry here
    assert density["beta"] == 1.0


def test_fixed_fraction_ablation_composes_with_the_sigmoid():
    model = mlp()
    c = method(model, prune_fraction=0.25)
    train(model, c, sgd(c), batches(2))
    n = sum(a.numel() for a in c.alive.values())
    c.end_round()
    assert sum(int((~a).sum()) for a in c.alive.values()) == round(0.25 * n)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"reparameterization": "tanh"}, ValueError, "reparameterization"),
    ({"epochs_per_round": None}, ValueError, "epochs_per_round"),
    ({"epochs_per_round": 0}, ValueError, "epochs_per_round"),
    ({"epochs_per_round": 1}, ValueError, "epochs_per_round"),
    ({"m0": 0.0}, ValueError, "m0"),
    ({"m0": 1.0}, ValueError, "m0"),
    ({"beta_final": 0.5}, ValueError, "beta_final"),
    ({"beta_final": math.inf}, ValueError, "beta_final"),
])
def test_bad_arguments_raise_before_the_model_changes(kwargs, error, words):
    model = mlp()
    types = [type(m) for m in model.modules()]
    with pytest.raises(error, match=words):
        method(model, **kwargs)
    assert [type(m) for m in model.modules()] == types


def test_state_round_trip_restores_beta_and_the_dead_entries():
    model, c = one_round()
    c.end_epoch()
    state = _reload(c.state_dict())
    fresh_model = mlp(1)
    fresh = method(fresh_model, alpha=0.4, lam=1e-3)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(state)
    assert fresh.beta == c.beta and all(layer.mask.beta == c.beta for _, layer in fresh.layers)
    for (name, a), (_, b) in zip(c.layers, fresh.layers):
        assert torch.equal(a.weight_score, b.weight_score) and torch.equal(c.alive[name], fresh.alive[name])
    x = batches(1)[0][0]
    model.eval(), fresh_model.eval()
    assert torch.equal(model(x), fresh_model(x))


def test_bfloat16_rounds_prune_by_the_gate_the_layers_use():
    """m = σ(β·s) is formed in float32 at least, as the layers' forward, density() and the
    export form the gate. In bfloat16, β·s was rounded first: with β = 150 and the bfloat16
    score s = -251·2^-13, β·s = -4.59595 and m = 0.009992 < α = 0.01 in the layer, but
    -4.59375 and m = 0.01007 in bfloat16, so α-pruning left alive an entry whose gate was
    below α."""
    model = mlp().to(torch.bfloat16)
    c = method(model, alpha=0.01, beta_final=200.0)
    layer = c.layers[0][1]
    with torch.no_grad():
        for _, other in c.layers:
            other.weight_score.fill_(1.0)
        layer.weight_score[0, 0] = -251 * 2.0**-13  # exact in bfloat16
    c._set_beta(150.0)
    gate = layer.mask.gate(layer, torch.float32)[0, 0]
    assert float(gate) < 0.01  # what the model computes with
    c.end_round()
    alive = c.alive[c.layers[0][0]]
    assert not alive[0, 0] and int(alive.sum()) == alive.numel() - 1
    assert layer.weight_score[0, 0] == -math.inf
