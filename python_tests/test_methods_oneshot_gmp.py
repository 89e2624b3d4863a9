"""OneShot and GradualMagnitude: exact global counts (ties included), fixed / monotone
masks, GMP's counts following the Zhu–Gupta schedule at each update point and only there,
argument checks and state round-trips."""
import pytest
import torch
from torch import nn

from methods_helpers import one_thread  # noqa: F401  (autouse fixture)
from methods_helpers import (assert_roundtrip, assert_untouched, batches, cnn, masks, mlp, pruned,
                             reference_prune_remaining, sgd, snapshot, total, train, weights)
from sparsekern.methods import GradualMagnitude, OneShot, schedules
from sparsekern.ops import reference


@pytest.mark.parametrize("ties", [False, True])
def test_oneshot_prunes_exact_count_then_masks_stay_fixed(ties):
    model = cnn()
    if ties:  # many equal magnitudes, the cut falls inside a tie
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.round(decimals=1))
    dense = [m.weight.detach().clone() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    method = OneShot(model, sparsity=0.7)
    assert pruned(method) == round(0.7 * 1604) == 1123
    expected, _ = reference.magnitude_masks(dense, 1123)
    assert all(torch.equal(m, e) for m, e in zip(masks(method), expected))
    assert all((layer.weight[~layer.weight_mask] == 0).all() for _, layer in method.layers)
    fixed = masks(method)
    train(model, method, sgd(method), batches(model, 4))  # fine-tuning: masks fixed, zeros held
    assert all(torch.equal(m, f) for m, f in zip(masks(method), fixed))
    assert all((layer.weight[~layer.weight_mask] == 0).all() for _, layer in method.layers)


def test_gmp_follows_zhu_gupta_with_monotone_masks():
    model = mlp()
    method = GradualMagnitude(model, sparsity=0.8, start_iteration=2, end_iteration=20, frequency=5,
                              initial_sparsity=0.1)
    n = total(method)
    assert pruned(method) == 0  # the schedule starts at iteration 2
    state = {"masks": masks(method)}

    def check():
        t, new, old = method.iteration, masks(method), state["masks"]
        assert all(not (a & ~b).any() for a, b in zip(new, old))  # a pruned weight never returns
        if t in (2, 7, 12, 17, 20):  # every 5 from the start, and the end itself
            s = schedules.zhu_gupta(t, final_sparsity=0.8, end=20, start=2, initial_sparsity=0.1)
            assert pruned(method) == round(s * n)
            assert all((w[~m] == 0).all() for w, m in zip(weights(method), new))
        else:
            assert all(torch.equal(a, b) for a, b in zip(new, old))
        state["masks"] = new

    train(model, method, sgd(method), batches(model, 24), each_step=check)
    assert [h["iteration"] for h in method.history] == [2, 7, 12, 17, 20]
    assert pruned(method) == round(0.8 * n)
    assert all((layer.weight[~layer.weight_mask] == 0).all() for _, layer in method.layers)


def test_gmp_chooses_new_cuts_among_remaining_by_magnitude():
    # Call the update hook directly on known weights: the new cuts must be the op's exact
    # choice among the remaining weights, pruned zeros not counted again.
    model = cnn()
    method = GradualMagnitude(model, sparsity=0.9, end_iteration=10, frequency=5, initial_sparsity=0.3)
    n = total(method)
    assert pruned(method) == round(0.3 * n)  # start 0: the first update runs at construction
    with torch.no_grad():
        for _, layer in method.layers:
            layer.weight.copy_(layer.weight.round(decimals=1))
    ws, old = weights(method), masks(method)
    method.iteration = 5
    method._after_step()
    s = schedules.zhu_gupta(5, final_sparsity=0.9, end=10, initial_sparsity=0.3)
    expected = reference_prune_remaining(ws, old, round(s * n) - round(0.3 * n))
    assert all(torch.equal(m, e) for m, e in zip(masks(method), expected))


@pytest.mark.parametrize("make, error", [
    (lambda m: OneShot(m, sparsity=1.0), ValueError),
    (lambda m: OneShot(m, sparsity=-0.1), ValueError),
    (lambda m: OneShot(m, sparsity=float("nan")), ValueError),
    (lambda m: OneShot(m, sparsity="0.5"), TypeError),
    (lambda m: OneShot(m, sparsity=0.5, include=["missing"]), ValueError),
    (lambda m: GradualMagnitude(m, sparsity=1.0, end_iteration=10), ValueError),
    (lambda m: GradualMagnitude(m, sparsity=0.5, end_iteration=5, start_iteration=5), ValueError),
    (lambda m: GradualMagnitude(m, sparsity=0.5, end_iteration=10, start_iteration=-1), ValueError),
    (lambda m: GradualMagnitude(m, sparsity=0.5, end_iteration=10, frequency=0), ValueError),
    (lambda m: GradualMagnitude(m, sparsity=0.5, end_iteration=10, initial_sparsity=0.6), ValueError),
    (lambda m: GradualMagnitude(m, sparsity=0.5, end_iteration=10.0), TypeError),
])
def test_bad_arguments_raise_before_the_model_changes(make, error):
    model = cnn()
    before = snapshot(model)
    with pytest.raises(error):
        make(model)
    assert_untouched(model, before)


@pytest.mark.parametrize("make", [lambda m: OneShot(m, 0.5), lambda m: GradualMagnitude(m, 0.5, end_iteration=10)])
def test_model_without_prunable_layers_is_refused(make):
    model = nn.Sequential(nn.ReLU())
    before = snapshot(model)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        make(model)
    assert_untouched(model, before)


def test_state_dict_round_trips():
    data = batches(cnn(), 12, seed=3)

    def continue_run(model, method, opt):
        train(model, method, opt, data[4:])

    assert_roundtrip(cnn, lambda m: OneShot(m, 0.6), data[:4], continue_run)
    # GMP restored mid-schedule keeps pruning at the same points to the same masks.
    a, _ = assert_roundtrip(cnn, lambda m: GradualMagnitude(m, 0.8, end_iteration=10, frequency=3),
                            data[:4], continue_run)
    assert [h["iteration"] for h in a.history] == [0, 3, 6, 9, 10]
