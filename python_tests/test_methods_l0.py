"""Constrained and penalised L0: the dual ascent and dual-restart arithmetic by hand, the
log α clamp, controllable density on an MLP trained on scikit-learn's digits (model-wise
and layer-wise), density() reporting, init rescaling, structured purge, the penalised
baseline, argument checks before the model changes, and a bit-exact state_dict
round-trip (noise offsets included)."""
import copy
import gc
import math
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from methods_helpers import train
from sparsekern.methods import ConstrainedL0, PenalizedL0

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
SHIFT = BETA * math.log(-GAMMA / ZETA)  # P(z ≠ 0) = σ(log α − SHIFT)


def p_nonzero(log_alpha: float) -> float:
    return 1.0 / (1.0 + math.exp(-(log_alpha - SHIFT)))


def logit_for(p: float) -> float:
    """log α with P(z ≠ 0) = p."""
    return math.log(p / (1 - p)) + SHIFT


@pytest.fixture
def one_thread():
    # The CPU box is shared: one thread is both faster and steadier for these small models.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def set_log_alpha(method, values):
    with torch.no_grad():
        for (_, layer), v in zip(method.layers, values):
            layer.weight_log_alpha.fill_(v)


def test_dual_ascent_and_restart_arithmetic_by_hand():
    # Toy: layers of 12 and 6 weights, every gate of a layer at one log α, so the expected
    # densities are known in closed form.
    eta, eps = 0.5, 0.4
    method = ConstrainedL0(toy(), eps, dual_lr=eta)
    assert method.multipliers == {"global": 0.0}

    def density(p1, p2):
        return (12 * p1 + 6 * p2) / 18

    # Step 1: infeasible. λ starts at 0, so the penalty is 0 but its defect is recorded.
    set_log_alpha(method, [logit_for(0.9), logit_for(0.6)])
    d1 = density(0.9, 0.6)
    assert float(method.penalty().detach()) == pytest.approx(0.0)
    method.step()
    lam1 = max(0.0, 0.0 + eta * (d1 - eps))
    assert method.multipliers["global"] == pytest.approx(lam1, rel=1e-5)

    # Step 2: still infeasible; the penalty is λ1·(d − ε) and its gradient λ1·P(1−P)/N.
    set_log_alpha(method, [logit_for(0.7), logit_for(0.5)])
    d2 = density(0.7, 0.5)
    penalty = method.penalty()
    assert float(penalty.detach()) == pytest.approx(lam1 * (d2 - eps), rel=1e-5)
    penalty.backward()
    grad = method.layers[0][1].weight_log_alpha.grad
    torch.testing.assert_close(grad, torch.full_like(grad, lam1 * 0.7 * 0.3 / 18), rtol=1e-4, atol=0)
    method.step()
    lam2 = lam1 + eta * (d2 - eps)
    assert method.multipliers["global"] == pytest.approx(lam2, rel=1e-5)

    # Step 3: feasible (d < ε): the dual restart sets λ to 0 at once ...
    set_log_alpha(method, [logit_for(0.3), logit_for(0.2)])
    d3 = density(0.3, 0.2)
    assert d3 < eps
    method.penalty()
    method.step()
    assert method.multipliers["global"] == 0.0

    # ... while without restarts λ only decreases by η·(ε − d), projected to ≥ 0.
    plain = ConstrainedL0(toy(), eps, dual_lr=eta, dual_restarts=False)
    for values, expected in [
        ([logit_for(0.9), logit_for(0.6)], lam1),
        ([logit_for(0.7), logit_for(0.5)], lam2),
        ([logit_for(0.3), logit_for(0.2)], max(0.0, lam2 + eta * (d3 - eps))),
        ([logit_for(0.1), logit_for(0.1)], lam2 + eta * (d3 - eps) + eta * (0.1 - eps)),  # 0.1
        ([logit_for(0.1), logit_for(0.1)], 0.0),  # 0.1 − 0.15 < 0: projected to 0
    ]:
        set_log_alpha(plain, values)
        plain.penalty()
        plain.step()
        assert plain.multipliers["global"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert plain.multipliers["global"] == 0.0


def test_dual_step_uses_the_density_before_the_primal_step():
    # Simultaneous GDA: penalty() sees log α^t, the optimiser moves to log α^(t+1), and
    # step() updates λ with density(log α^t) − ε. Without a penalty() call since the
    # last step, step() falls back to the current density.
    eta, eps = 1.0, 0.5
    method = ConstrainedL0(toy(), eps, dual_lr=eta)
    set_log_alpha(method, [logit_for(0.8), logit_for(0.8)])
    method.penalty()
    set_log_alpha(method, [logit_for(0.6), logit_for(0.6)])  # the "primal step"
    method.step()
    assert method.multipliers["global"] == pytest.approx(eta * (0.8 - eps), rel=1e-5)
    method.step()  # no penalty() in between: the density at the current log α
    assert method.multipliers["global"] == pytest.approx(eta * (0.8 - eps) + eta * (0.6 - eps), rel=1e-5)


def test_layerwise_multipliers_are_independent():
    method = ConstrainedL0(toy(), {"0": 0.5, "2": 0.9}, dual_lr=1.0)
    set_log_alpha(method, [logit_for(0.7), logit_for(0.8)])
    method.penalty()
    method.step()
    lam = method.multipliers
    assert lam["0"] == pytest.approx(0.2, rel=1e-5) and lam["2"] == 0.0
    assert method.targets == pytest.approx({"0": 0.5, "2": 0.9})
    every = ConstrainedL0(toy(), 0.5, layerwise=True, dual_lr=1.0)
    assert list(every.multipliers) == ["0", "2"] and every.targets == {"0": 0.5, "2": 0.5}


def test_log_alpha_is_clamped_after_each_step():
    method = ConstrainedL0(toy(), 0.5)
    with torch.no_grad():
        for _, layer in method.layers:
            la = layer.weight_log_alpha
            la.view(-1)[0], la.view(-1)[1], la.view(-1)[2] = -10.0, 10.0, 0.3
    method.step()
    for _, layer in method.layers:
        la = layer.weight_log_alpha.detach().view(-1)
        assert float(la[0]) == pytest.approx(math.log(0.01))
        assert float(la[1]) == pytest.approx(math.log(100.0))
        assert float(la[2]) == pytest.approx(0.3)
        assert float(la.min()) >= math.log(0.01) - 1e-6 and float(la.max()) <= math.log(100.0) + 1e-6


def test_density_reports_expected_and_eval():
    method = ConstrainedL0(toy(), 0.5)
    set_log_alpha(method, [logit_for(0.7), -3.0])  # layer 2: median gate 0 (log α < β·logit(−γ/(ζ−γ)))
    d = method.density()
    assert d["expected"]["layers"]["0"] == pytest.approx(0.7, rel=1e-5)
    assert d["expected"]["layers"]["2"] == pytest.approx(p_nonzero(-3.0), rel=1e-5)
    assert d["expected"]["global"] == pytest.approx((12 * 0.7 + 6 * p_nonzero(-3.0)) / 18, rel=1e-5)
    # Eval gate: clamp(σ(log α/β)(ζ − γ) + γ, 0, 1) > 0.
    for name, layer in method.layers:
        la = layer.weight_log_alpha.detach()
        median = torch.clamp(torch.sigmoid(la / BETA) * (ZETA - GAMMA) + GAMMA, 0, 1)
        assert d["eval"]["layers"][name] == pytest.approx(float((median > 0).float().mean()))
        assert d["layers"][name] == d["eval"]["layers"][name]
    assert d["eval"]["layers"] == {"0": 1.0, "2": 0.0}
    assert d["eval"]["global"] == pytest.approx(12 / 18)
    assert d["targets"] == {"global": 0.5} and d["multipliers"] == {"global": 0.0}


def test_rescale_init_divides_weights_by_keep_rate():
    base = toy(3)
    weights = [m.weight.detach().clone() for m in base if isinstance(m, nn.Linear)]
    method = ConstrainedL0(base, 0.5, droprate_init=0.2)
    for w, (_, layer) in zip(weights, method.layers):
        torch.testing.assert_close(layer.weight.detach(), w / 0.8)
    plain = ConstrainedL0(toy(3), 0.5, rescale_init=False)
    for w, (_, layer) in zip(weights, plain.layers):
        assert torch.equal(layer.weight.detach(), w)
    # Default droprates: 0.1 unstructured, 0.3 structured (log α ≈ log((1−p)/p)).
    assert plain.droprate_init == 0.1
    structured = ConstrainedL0(toy(), 0.5, structured=True)
    assert structured.droprate_init == 0.3
    mean = float(torch.cat([l.weight_log_alpha.detach().flatten() for _, l in structured.layers]).mean())
    assert mean == pytest.approx(math.log(0.7 / 0.3), abs=0.02)


def test_gate_group_lr_and_no_weight_decay():
    method = ConstrainedL0(toy(), 0.5, gate_lr=6.0)
    weights, gates = method.param_groups(lr=0.1, weight_decay=5e-4)
    assert gates["lr"] == 6.0 and gates["weight_decay"] == 0.0
    assert {id(p) for p in gates["params"]} == {id(l.weight_log_alpha) for _, l in method.layers}
    assert ConstrainedL0(toy(), 0.5).param_groups(lr=0.1)[1]["lr"] == 0.1


def test_expected_l2_uses_detached_gates():
    method = ConstrainedL0(toy(), 0.5, l2_weight=0.1)
    set_log_alpha(method, [logit_for(0.7), logit_for(0.4)])
    l2 = method.penalty()  # λ = 0: only the L2 term
    expected = 0.05 * sum(p * float(layer.weight.detach().double().square().sum())
                          for p, (_, layer) in zip([0.7, 0.4], method.layers))
    assert float(l2.detach()) == pytest.approx(expected, rel=1e-5)
    l2.backward()
    for p, (_, layer) in zip([0.7, 0.4], method.layers):
        assert layer.weight_log_alpha.grad is None or torch.all(layer.weight_log_alpha.grad == 0)
        torch.testing.assert_close(layer.weight.grad, 0.1 * p * layer.weight.detach(), rtol=1e-4, atol=1e-7)


def test_structured_export_purges_gated_neurons():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    method = ConstrainedL0(model, 0.5, structured=True)
    with torch.no_grad():  # drop inputs 0, 1 of the first layer and 5 hidden neurons
        method.layers[0][1].weight_log_alpha[0, :2] = math.log(0.01)
        method.layers[1][1].weight_log_alpha[0, :5] = math.log(0.01)
    exported = method.export(purge=True, example_input=(1, 6))
    small = exported.model
    assert small[2].in_features == 3 and small[0].out_features == 3  # hidden neurons removed
    assert exported.stats["params_after"] < exported.stats["params_before"]
    model.eval()
    x = torch.randn(5, 6)
    torch.testing.assert_close(small(x), model(x))


# ---- controllability on a real (small) problem


def digits():
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def digits_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def train_digits(model, method, epochs, lr=1e-2, gate_lr_betas=(0.0, 0.999), seed=0):
    x, y = digits()
    groups = method.param_groups(lr=lr)
    # No momentum on the gates (Adam with β1 = 0): when a constraint becomes satisfied the
    # restart drops λ to 0 and momentum would carry the density well below the target.
    groups[1]["betas"] = gate_lr_betas
    opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx]) + method.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# The paper's dual lr (1e-4 … 7e-4) is for hundreds of epochs; these runs have ~200 steps,
# so λ must grow much faster (and the gates get their own lr, as in the paper).
FAST = dict(dual_lr=2.0, gate_lr=0.02)


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_model_wise_density_reaches_target(one_thread, target):
    model = digits_mlp(0)
    method = ConstrainedL0(model, target, **FAST)
    acc = train_digits(model, method, epochs=15)
    d = method.density()
    assert abs(d["expected"]["global"] - target) <= 0.02, d["expected"]
    assert acc > 0.8  # still a working classifier (train accuracy)


def test_layer_wise_densities_reach_targets(one_thread):
    targets = {"0": 0.3, "2": 0.7, "4": 0.5}
    model = digits_mlp(1)
    method = ConstrainedL0(model, targets, **FAST)
    train_digits(model, method, epochs=15)
    expected = method.density()["expected"]["layers"]
    for name, eps in targets.items():
        assert abs(expected[name] - eps) <= 0.03, (name, expected)


def test_penalized_l0_penalty_and_lambda_controls_density(one_thread):
    method = PenalizedL0(toy(), 1e-2)
    set_log_alpha(method, [logit_for(0.7), logit_for(0.4)])
    assert float(method.penalty().detach()) == pytest.approx(1e-2 * (12 * 0.7 + 6 * 0.4), rel=1e-5)
    # The expected-nonzero count from the mask API, independently summed.
    total = sum(float(l.mask.expected_nonzero(l).detach()) for _, l in method.layers)
    assert float(method.penalty().detach()) == pytest.approx(1e-2 * total, rel=1e-6)

    reached = []
    for lam in (0.0, 1e-4, 1e-3):
        model = digits_mlp(0)
        method = PenalizedL0(model, lam, gate_lr=0.05)
        train_digits(model, method, epochs=3)
        reached.append(method.density()["expected"]["global"])
    assert reached[2] < reached[1] - 0.03 and reached[1] < reached[0] - 0.03, reached


# ---- argument checks and checkpointing


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("args, kwargs, error", [
    ((0.0,), {}, ValueError),
    ((1.5,), {}, ValueError),
    ((-0.1,), {}, ValueError),
    (("0.3",), {}, TypeError),
    ((True,), {}, TypeError),
    (({},), {}, ValueError),
    (({"0": 0.3, "fc9": 0.5},), {}, ValueError),       # unknown layer
    (({"0": 0.3},), {"exclude": ["0"]}, ValueError),   # excluded layer
    (({"1": 0.3},), {}, ValueError),                   # the ReLU: not a sparse layer
    (({"0": 1.2},), {}, ValueError),
    (({0: 0.3},), {}, TypeError),
    ((0.3,), {"dual_lr": -1.0}, ValueError),
    ((0.3,), {"gate_lr": 0.0}, ValueError),
    ((0.3,), {"droprate_init": 1.0}, ValueError),
    ((0.3,), {"l2_weight": -1.0}, ValueError),
    ((0.3,), {"structured": "yes"}, TypeError),
    ((0.3,), {"layerwise": 1}, TypeError),
    ((0.3,), {"dual_restarts": None}, TypeError),
    ((0.3,), {"include": ["nope"]}, ValueError),
    (({"0": 0.3},), {"layerwise": True}, ValueError),  # ignored before: only "0" was constrained
])
def test_constrained_bad_arguments_raise_before_the_model_changes(args, kwargs, error):
    model = toy()
    snap = snapshot(model)
    with pytest.raises(error):
        ConstrainedL0(model, *args, **kwargs)
    after = snapshot(model)
    assert after[0] == snap[0]
    assert all(torch.equal(after[1][k], snap[1][k]) for k in snap[1]) and after[1].keys() == snap[1].keys()


@pytest.mark.parametrize("cls, args", [(ConstrainedL0, (0.5,)), (ConstrainedL0, ({"x": 0.5},)),
                                       (PenalizedL0, (1e-3,))])
def test_model_without_linear_or_conv_raises(cls, args):
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(3))
    snap = snapshot(model)
    with pytest.raises(ValueError):
        cls(model, *args)
    assert snapshot(model)[0] == snap[0]


@pytest.mark.parametrize("kwargs, error", [({"lam": -1.0}, ValueError), ({"lam": "1"}, TypeError),
                                           ({"lam": 1e-3, "droprate_init": 0.0}, ValueError)])
def test_penalized_bad_arguments_raise_before_the_model_changes(kwargs, error):
    model = toy()
    snap = snapshot(model)
    with pytest.raises(error):
        PenalizedL0(model, **kwargs)
    assert snapshot(model)[0] == snap[0]
    assert all(torch.equal(snapshot(model)[1][k], v) for k, v in snap[1].items())


def _steps(model, method, opt, data):
    model.train()
    train(model, method, opt, data)
    return model.state_dict(), method.state_dict()


@pytest.mark.parametrize("cls, args, kwargs", [
    (ConstrainedL0, (0.3,), {"dual_lr": 0.5, "gate_lr": 0.1}),
    (ConstrainedL0, ({"0": 0.3, "2": 0.6},), {"dual_lr": 0.5, "structured": True}),
    (PenalizedL0, (1e-2,), {"l2_weight": 1e-3}),
])
def test_state_dict_round_trip_continues_bit_exactly(cls, args, kwargs):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(8)]
    model = toy(0)
    method = cls(model, *args, **kwargs)
    opt = torch.optim.Adam(method.param_groups(lr=1e-2))
    _steps(model, method, opt, data[:4])
    if cls is ConstrainedL0:
        assert any(v > 0 for v in method.multipliers.values())  # λ is part of the state
    saved = copy.deepcopy((model.state_dict(), method.state_dict(), opt.state_dict()))
    assert saved[1]["noise"] and all(offset > 0 for _, offset in saved[1]["noise"].values())

    fresh = toy(5)  # other weights, other noise seeds: all must come from the checkpoint
    restored = cls(fresh, *args, **kwargs)
    fresh.load_state_dict(saved[0])
    restored.load_state_dict(saved[1])
    fresh_opt = torch.optim.Adam(restored.param_groups(lr=1e-2))
    fresh_opt.load_state_dict(saved[2])

    (state_a, method_a), (state_b, method_b) = _steps(model, method, opt, data[4:]), \
        _steps(fresh, restored, fresh_opt, data[4:])
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert method_a["noise"] == method_b["noise"]
    if cls is ConstrainedL0:
        assert torch.equal(method_a["extra"]["multipliers"], method_b["extra"]["multipliers"])
        assert method.multipliers == restored.multipliers


def test_multipliers_and_targets_follow_the_model_dtype():
    """λ and ε are in the expected L0's dtype whatever the model was built in. A float64
    run's λ (its checkpoint, or model.float() after attaching) stayed float64 and made a
    float32 model's penalty and loss float64; a model converted to float64 after attaching
    compared its densities with ε rounded to float32 (0.30000001)."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(3)]
    model = toy(0).double()
    method = ConstrainedL0(model, 0.3, dual_lr=0.5)
    train(model, method, torch.optim.SGD(method.param_groups(lr=0.1)), [(x.double(), y) for x, y in data])
    assert any(v > 0 for v in method.multipliers.values())
    lam = method.multipliers
    saved = copy.deepcopy(method.state_dict())
    assert saved["extra"]["multipliers"].dtype == torch.float64

    model.float()
    x, y = data[0]
    loss = F.cross_entropy(model(x), y) + method.penalty()
    assert method.penalty().dtype == loss.dtype == torch.float32
    assert method.multipliers == {k: float(torch.tensor(v, dtype=torch.float32)) for k, v in lam.items()}

    # The float64 checkpoint into a float32 model's method.
    other = toy(1)
    restored = ConstrainedL0(other, 0.3, dual_lr=0.5)
    other.load_state_dict(model.state_dict())
    restored.load_state_dict(saved)
    assert restored._lambda.dtype == torch.float32 and restored.penalty().dtype == torch.float32
    train(other, restored, torch.optim.SGD(restored.param_groups(lr=0.1)), data)  # the dual step keeps it
    assert restored._lambda.dtype == torch.float32

    # Attached in float32, converted to float64: ε exact, as if attached there.
    wide = toy(2)
    method = ConstrainedL0(wide, 0.3)
    wide.double()
    assert method.penalty().dtype == torch.float64
    assert method.targets == {"global": 0.3} and method._lambda.dtype == torch.float64


# --- the expected L0 of the gates' forward --------------------------------------------------
# A layer's training forward computes its expected L0 in the same pass as its gates;
# penalty() reuses that tensor while it is current, so the L0 gradient joins the gates' one
# backward pass. Otherwise (log α changed, the graph used or missing) it is recomputed.


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)


def _recompute_always(monkeypatch):
    from sparsekern.nn.masks import HardConcreteMask

    monkeypatch.setattr(HardConcreteMask, "_current_term", lambda self, param, key=None: None)


def _log_alpha_grads(method):
    return [layer.weight_log_alpha.grad.clone() for _, layer in method.layers]


@pytest.mark.parametrize("cls, args, kwargs", [
    (ConstrainedL0, (0.3,), {}),
    (ConstrainedL0, (0.3,), {"structured": True}),
    (PenalizedL0, (1e-2,), {}),
])
def test_penalty_reuses_the_forward_expected_l0(monkeypatch, cls, args, kwargs):
    x, y = _batch()
    model = toy()
    method = cls(model, *args, **kwargs)
    if cls is ConstrainedL0:
        method._lambda.fill_(0.7)  # an active constraint: the L0 term has a gradient
    twin, twin_method = copy.deepcopy((model, method))
    model.train(), twin.train()

    loss = F.cross_entropy(model(x), y)
    nonzero = method._expected_nonzero()
    assert all(n is layer.mask._forward_term.value for n, (_, layer) in zip(nonzero, method.layers))
    (loss + method.penalty()).backward()

    _recompute_always(monkeypatch)  # the twin: same weights, seeds and offsets
    twin_loss = F.cross_entropy(twin(x), y)
    (twin_loss + twin_method.penalty()).backward()
    for got, expected in zip(_log_alpha_grads(method), _log_alpha_grads(twin_method)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_penalty_after_the_gates_backward_recomputes():
    # loss.backward() used the forward's graph; a separate penalty().backward() must not
    # reach into it (it would raise), and gets the L0 gradient alone.
    x, y = _batch(1)
    method = PenalizedL0(toy(), 0.5)
    model = method.model.train()
    F.cross_entropy(model(x), y).backward()
    task_grads = _log_alpha_grads(method)
    penalty = method.penalty()
    assert all(n is not layer.mask._forward_term.value for n, (_, layer) in zip(method._expected_nonzero(), method.layers))
    penalty.backward()
    for task, got, (_, layer) in zip(task_grads, _log_alpha_grads(method), method.layers):
        p = torch.sigmoid(layer.weight_log_alpha.detach() - SHIFT)
        torch.testing.assert_close(got - task, 0.5 * p * (1 - p), rtol=1e-5, atol=1e-8)


def test_penalty_after_log_alpha_changed_recomputes():
    x, _ = _batch(2)
    method = ConstrainedL0(toy(), 0.5)
    method.model.train()(x)
    set_log_alpha(method, [logit_for(0.7), logit_for(0.4)])  # in place, as an optimiser step
    nonzero = method._expected_nonzero()
    assert [float(n.detach()) for n in nonzero] == pytest.approx([12 * 0.7, 6 * 0.4], rel=1e-5)
    with torch.no_grad():  # the no-grad path (density(), the dual step) checks it too
        assert [float(n) for n in method._expected_nonzero()] == pytest.approx([12 * 0.7, 6 * 0.4], rel=1e-5)


def test_penalty_after_a_no_grad_forward_has_a_gradient():
    x, _ = _batch(3)
    method = PenalizedL0(toy(), 1.0)
    with torch.no_grad():
        method.model.train()(x)
    with torch.no_grad():
        reused = method._expected_nonzero()
    assert all(n is not None and not n.requires_grad for n in reused)
    penalty = method.penalty()
    assert penalty.requires_grad
    penalty.backward()
    assert all(layer.weight_log_alpha.grad is not None for _, layer in method.layers)


def test_model_copies_after_a_training_forward():
    # export() and checkpoints deep-copy / pickle the model: the kept graph tensor stays out.
    x, y = _batch(4)
    method = ConstrainedL0(toy(), 0.5)
    model = method.model.train()
    loss = F.cross_entropy(model(x), y) + method.penalty()
    twin = copy.deepcopy(model)
    assert all(m.mask._forward_term is None for m in twin.modules() if hasattr(m, "mask"))
    assert all(m.mask._forward_term is not None for m in model.modules() if hasattr(m, "mask"))
    pickle.loads(pickle.dumps(model))
    exported = method.export().model
    assert not any(hasattr(m, "mask") for m in exported.modules())
    loss.backward()  # the original's graph is intact


def test_kept_expected_l0_does_not_hold_the_previous_gradient():
    # The usual loop: forward, penalty, zero_grad(set_to_none=True), backward. The kept
    # entry must not keep the previous step's .grad alive through that backward.
    x, y = _batch(5)
    method = PenalizedL0(toy(), 1e-2)
    model = method.model.train()
    opt = torch.optim.SGD(method.param_groups(lr=0.1), lr=0.1)
    for _ in range(2):
        loss = F.cross_entropy(model(x), y) + method.penalty()
        previous = [weakref.ref(layer.weight_log_alpha.grad) for _, layer in method.layers
                    if layer.weight_log_alpha.grad is not None]
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(ref() is None for ref in previous)
        loss.backward()
        opt.step()
        method.step()
