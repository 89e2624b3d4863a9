"""Concave regularisers: m stays in [0, 1] under a large lr, the penalties and the log
regulariser's closed-form gradient, α-pruned entries staying exactly 0 for good, the
fixed-percentage ablation's exact counts, rewinding with m carried over, argument checks
before the model changes, and a bit-exact state_dict round-trip."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods_helpers import small_batches as batches
from methods_helpers import small_mlp as mlp
from methods_helpers import train
from sparsekern.methods import ConcaveRegularization


def masks(method):
    return {name: layer.weight_mask.detach() for name, layer in method.layers}


def set_masks(method, values):
    with torch.no_grad():
        for name, layer in method.layers:
            layer.weight_mask.copy_(values[name])


@pytest.mark.parametrize("regularizer", ["l1", "log"])
def test_mask_stays_in_unit_interval_after_every_step(regularizer):
    model = mlp()
    method = ConcaveRegularization(model, regularizer=regularizer, lam=1e-4)
    # A huge mask lr: every step throws m far outside [0, 1] before the projection.
    opt = torch.optim.SGD(method.param_groups(lr=0.1, mask_lr=500.0), momentum=0.9)
    seen_low = seen_high = False

    def check():
        nonlocal seen_low, seen_high
        for m in masks(method).values():
            assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
            seen_low |= bool((m == 0).any())
            seen_high |= bool((m == 1).any())

    train(model, method, opt, batches(8), each_step=check)
    assert seen_low and seen_high  # the projection was active on both sides


def test_penalty_values():
    model = mlp()
    lam, eps = 2e-3, 0.1
    values = {name: torch.rand_like(layer.weight_mask) for name, layer in ConcaveRegularization(mlp()).layers}
    l1 = ConcaveRegularization(model, regularizer="l1", lam=lam)
    set_masks(l1, values)
    expected = lam * sum(float(v.double().sum()) for v in values.values())
    assert float(l1.penalty().detach()) == pytest.approx(expected, rel=1e-5)

    log = ConcaveRegularization(mlp(), regularizer="log", lam=lam, eps=eps)
    set_masks(log, values)
    expected = lam * sum(math.log((m + eps) / eps) / math.log((1 + eps) / eps)
                         for v in values.values() for m in v.flatten().tolist())
    assert float(log.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    # r_ε(0) = 0 and r_ε(1) = 1.
    set_masks(log, {name: torch.ones_like(v) for name, v in values.items()})
    assert float(log.penalty().detach()) == pytest.approx(lam * sum(v.numel() for v in values.values()), rel=1e-6)


def test_default_lambdas_are_the_papers():
    assert ConcaveRegularization(mlp(), regularizer="l1").lam == 3e-6
    assert ConcaveRegularization(mlp(), regularizer="log").lam == 1e-6


@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_log_regulariser_gradient_matches_closed_form(eps):
    lam = 1e-3
    method = ConcaveRegularization(mlp(), regularizer="log", lam=lam, eps=eps)
    with torch.no_grad():
        for _, layer in method.layers:
            layer.weight_mask.copy_(torch.rand_like(layer.weight_mask))
            layer.weight_mask.view(-1)[0] = 0.0  # the gradient at 0 is finite: λ/(ε log((1+ε)/ε))
    method.penalty().backward()
    for _, layer in method.layers:
        m = layer.weight_mask.detach().double()
        closed_form = lam / ((m + eps) * math.log((1 + eps) / eps))
        torch.testing.assert_close(layer.weight_mask.grad.double(), closed_form, rtol=1e-5, atol=0)


def test_alpha_pruned_entries_stay_zero_across_rounds_and_training():
    model = mlp()
    alpha = 0.01
    method = ConcaveRegularization(model, regularizer="l1", lam=1e-3, alpha=alpha)
    values = {name: torch.rand(layer.weight_mask.shape) for name, layer in method.layers}
    for v in values.values():
        v.view(-1)[::3] = alpha / 2  # a third of the entries below α
        v.view(-1)[1] = alpha        # exactly α is kept (m < α prunes)
    set_masks(method, values)
    dead = {name: v < alpha for name, v in values.items()}
    # One optimiser across the rounds on purpose: momentum gathered before pruning, Adam's
    # running moments and a large lr would all move the pruned entries if they could.
    opt = torch.optim.Adam(method.param_groups(lr=1e-2, mask_lr=0.5))
    method.end_round()
    for name, m in masks(method).items():
        assert torch.equal(method.alive[name], ~dead[name])
        assert torch.all(m[dead[name]] == 0)
        assert torch.equal(m[~dead[name]], values[name][~dead[name]])  # carried over, not rewound
    assert method.density()["alive"]["global"] == pytest.approx(
        sum(int((~d).sum()) for d in dead.values()) / sum(d.numel() for d in dead.values()))

    def check():
        for name, layer in method.layers:
            assert torch.all(layer.weight_mask[dead[name]] == 0), name
            # The hook: no gradient reaches them, so no optimiser state builds up either.
            assert torch.all(layer.weight_mask.grad[dead[name]] == 0), name

    train(model, method, opt, batches(6), each_step=check)
    alive_mid = {name: a.clone() for name, a in method.alive.items()}
    m_mid = {name: m.clone() for name, m in masks(method).items()}
    method.end_round()
    for name, a in method.alive.items():
        assert not torch.any(a & dead[name])  # never revived
        assert torch.equal(a, alive_mid[name] & (m_mid[name] >= alpha))
    train(model, method, opt, batches(6, seed=5), each_step=check)
    for name, m in masks(method).items():
        assert torch.all(m[~method.alive[name]] == 0)


def test_end_round_rewinds_weights_and_carries_the_mask():
    model = mlp()
    method = ConcaveRegularization(model, regularizer="log", lam=1e-3, rewind_iteration=0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("weight_mask")}
    opt = torch.optim.SGD(method.param_groups(lr=0.1, mask_lr=1.0), momentum=0.9)
    train(model, method, opt, batches(6))
    trained_m = {name: m.clone() for name, m in masks(method).items()}
    method.end_round()
    for n, p in model.named_parameters():
        if not n.endswith("weight_mask"):
            assert torch.equal(p, initial[n]), n
    for name, m in masks(method).items():
        expected = torch.where(trained_m[name] < method.alpha, torch.zeros_like(m), trained_m[name])
        assert torch.equal(m, expected)
    assert method.round == 1 and method.iteration == 0


def test_fixed_fraction_ablation_prunes_exactly_that_fraction_of_the_remaining():
    model = mlp()
    method = ConcaveRegularization(model, prune_fraction=0.2, alpha=0.5)  # α unused in this mode
    total = sum(layer.weight_mask.numel() for _, layer in method.layers)
    g = torch.Generator().manual_seed(0)
    for rnd in range(3):
        # Distinct values, some alive entries at exactly 0 (projected, not pruned) to tie
        # with the dead ones: still exactly round(0.2·n_alive) alive entries go.
        values = {}
        for name, layer in method.layers:
            v = torch.rand(layer.weight_mask.shape, generator=g) * method.alive[name]
            v.view(-1)[:2] = 0.0
            values[name] = v
        set_masks(method, values)
        alive_before = {name: a.clone() for name, a in method.alive.items()}
        n_alive = sum(int(a.sum()) for a in alive_before.values())
        method.end_round()
        n_after = sum(int(a.sum()) for a in method.alive.values())
        assert n_after == n_alive - round(0.2 * n_alive)
        # The pruned ones are the smallest m among the alive.
        pruned = torch.cat([values[n][alive_before[n] & ~method.alive[n]] for n in values])
        kept = torch.cat([values[n][method.alive[n]] for n in values])
        assert float(pruned.max()) <= float(kept.min())
        for name, m in masks(method).items():
            assert not torch.any(method.alive[name] & ~alive_before[name])
            assert torch.all(m[~method.alive[name]] == 0)
    assert n_after < total


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("kwargs, error", [
    ({"regularizer": "l2"}, ValueError),
    ({"regularizer": None}, TypeError),
    ({"lam": -1e-6}, ValueError),
    ({"eps": 0.0}, ValueError),
    ({"alpha": 1.5}, ValueError),
    ({"prune_fraction": 1.0}, ValueError),
    ({"prune_fraction": 0.0}, ValueError),
    ({"m0": 2.0}, ValueError),
    ({"rewind_iteration": 1.5}, TypeError),
    ({"exclude": ["missing"]}, ValueError),
])
def test_bad_arguments_raise_before_the_model_changes(kwargs, error):
    model = mlp()
    names, state = snapshot(model)
    with pytest.raises(error):
        ConcaveRegularization(model, **kwargs)
    names_after, state_after = snapshot(model)
    assert names_after == names
    assert state_after.keys() == state.keys() and all(torch.equal(state[k], state_after[k]) for k in state)


def test_model_without_linear_or_conv_raises():
    model = nn.Sequential(nn.Tanh())
    with pytest.raises(ValueError):
        ConcaveRegularization(model)
    assert [type(m) for m in model.modules()] == [nn.Sequential, nn.Tanh]


def _run(model, method, opt, data):
    train(model, method, opt, data[:3])
    method.end_round()
    opt = torch.optim.SGD(method.param_groups(lr=0.1, mask_lr=2.0), momentum=0.9)
    train(model, method, opt, data[3:])
    return model.state_dict(), method.state_dict()


def test_state_dict_round_trip_continues_bit_exactly():
    data = batches(12)
    kwargs = dict(regularizer="log", lam=5e-3, alpha=0.49, rewind_iteration=2)
    model = mlp(0)
    method = ConcaveRegularization(model, **kwargs)
    opt = torch.optim.SGD(method.param_groups(lr=0.1, mask_lr=2.0), momentum=0.9)
    train(model, method, opt, data[:4])
    method.end_round()  # some entries pruned: the alive masks are part of the state
    train(model, method, opt, data[4:6])
    assert any(not bool(a.all()) for a in method.alive.values())
    saved = copy.deepcopy((model.state_dict(), method.state_dict(), opt.state_dict()))

    fresh = mlp(9)
    restored = ConcaveRegularization(fresh, **kwargs)
    fresh.load_state_dict(saved[0])
    restored.load_state_dict(saved[1])
    fresh_opt = torch.optim.SGD(restored.param_groups(lr=0.1, mask_lr=2.0), momentum=0.9)
    fresh_opt.load_state_dict(saved[2])
    for name in method.alive:
        assert torch.equal(restored.alive[name], method.alive[name])

    (state_a, method_a), (state_b, method_b) = _run(model, method, opt, data[6:]), _run(fresh, restored, fresh_opt, data[6:])
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert all(torch.equal(method_a["extra"]["alive"][k], method_b["extra"]["alive"][k]) for k in method_a["extra"]["alive"])
    assert method_a["iteration"] == method_b["iteration"] and method_a["round"] == method_b["round"] == 2


# The relaxed m (l1, log) masks dead entries' gradients with `alive`; the sigmoid
# reparameterisation sets their score to -inf and reads `alive` at each round's end.
VARIANTS = {"l1": {"regularizer": "l1"}, "log": {"regularizer": "log"},
            "sigmoid": {"reparameterization": "sigmoid", "epochs_per_round": 2}}


def _one_round_in(variant):
    """A method one round in, with entries pruned for good (the fixed fraction prunes
    whatever the values of m)."""
    model = mlp()
    method = ConcaveRegularization(model, prune_fraction=0.3, **VARIANTS[variant])
    train(model, method, torch.optim.SGD(method.param_groups(lr=0.1), momentum=0.9), batches(2))
    method.end_round()
    assert not all(bool(a.all()) for a in method.alive.values())
    return model, method


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_alive_follows_the_model_to_another_device(variant):
    """method = ConcaveRegularization(model); model.to("cuda"): the alive masks stayed on
    the device the method was attached on, and the forward masked m's CUDA gradient with a
    CPU tensor (relaxed m), end_round's `alive &= m >= α` mixed devices. The meta device is
    a real move (Module._apply) that needs no GPU; it has no values, so the round ends are
    checked on the CPU with a dtype conversion (the next test)."""
    model, method = _one_round_in(variant)
    model.to("meta")
    assert all(a.is_meta for a in method.alive.values())
    for _, layer in method.layers:
        if not method.sigmoid:
            assert layer.mask.has_dead and layer.mask.grad_keep(layer) is layer.weight_alive
    x, y = batches(1)[0]
    (F.cross_entropy(model(x.to("meta")), y.to("meta")) + method.penalty()).backward()
    method.step()
    assert all(a.is_meta for a in method.alive.values())
    assert all(a.is_meta for a in method.state_dict()["extra"]["alive"].values())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rounds_go_on_after_a_dtype_conversion(variant):
    model, method = _one_round_in(variant)
    dead = {name: ~a.clone() for name, a in method.alive.items()}
    model.to(torch.float64)
    data = [(x.double(), y) for x, y in batches(2)]
    train(model, method, torch.optim.SGD(method.param_groups(lr=0.1), momentum=0.9), data)
    method.end_round()
    for name, layer in method.layers:
        alive = method.alive[name]
        assert alive is layer.weight_alive and alive.dtype == torch.bool
        assert not torch.any(alive & dead[name])  # pruned for good stays pruned
        m = method._m(layer).detach()
        assert m.dtype == torch.float64 and torch.all(m[~alive] == 0)
    assert sum(int((~a).sum()) for a in method.alive.values()) > sum(int(d.sum()) for d in dead.values())


def test_alive_is_not_in_the_models_state_dict():
    # A buffer of each layer, not persistent: checkpoints keep their keys; the method's
    # state_dict holds it, as before.
    model, method = _one_round_in("l1")
    assert sorted(model.state_dict()) == ["0.bias", "0.weight", "0.weight_mask", "2.bias", "2.weight", "2.weight_mask"]
    assert sorted(method.state_dict()["extra"]["alive"]) == ["0", "2"]
