"""IMP: exact per-level counts among the remaining weights (ties included), shrinking
masks, bit-exact rewinding (winning and matching tickets), pruned weights held at zero
under momentum + weight decay, ignore_classifier, argument checks, state round-trip."""
import pytest
import torch
from torch import nn

from methods_helpers import one_thread  # noqa: F401  (autouse fixture)
from methods_helpers import (assert_roundtrip, assert_untouched, batches, cnn, masks, mlp, pruned,
                             reference_prune_remaining, sgd, snapshot, total, train, weights)
from sparsekern.methods import IMP
from sparsekern.nn import SparseLinear


@pytest.mark.parametrize("make_model", [cnn, mlp])
@pytest.mark.parametrize("ties", [False, True])
def test_each_level_prunes_round_fraction_of_remaining(make_model, ties):
    model = make_model()
    method = IMP(model, prune_fraction=0.2)
    data = batches(model, 6)
    split_ties = 0  # levels where equal magnitudes fall on both sides of the cut
    for level in range(3):
        train(model, method, sgd(method), data[2 * level:2 * level + 2])
        if ties:  # weights rounded to 1 decimal: hundreds of equal magnitudes, many at 0.0
            with torch.no_grad():
                for _, layer in method.layers:
                    layer.weight.copy_(layer.weight.round(decimals=1))
        before_w, before_m = weights(method), masks(method)
        remaining = total(method) - pruned(method)
        method.end_round()
        after = masks(method)
        n_removed = sum(int(b.sum() - a.sum()) for a, b in zip(after, before_m))
        assert n_removed == round(0.2 * remaining) > 0
        assert all(not (a & ~b).any() for a, b in zip(after, before_m))  # masks only shrink
        # Which weights went: the op's exact rule (|w|, then layer, then flat index) applied
        # to the remaining weights only — a pruned 0.0 must not be counted again.
        expected = reference_prune_remaining(before_w, before_m, round(0.2 * remaining))
        assert all(torch.equal(a, e) for a, e in zip(after, expected))
        newly = torch.cat([w[b & ~a].abs() for w, a, b in zip(before_w, after, before_m)])
        kept = torch.cat([w[a].abs() for w, a in zip(before_w, after)])
        assert newly.max() <= kept.min()
        split_ties += bool(newly.max() == kept.min())
    assert split_ties == (3 if ties else 0)
    remaining = total(method)
    for _ in range(3):
        remaining -= round(0.2 * remaining)
    assert method.density()["global"] == remaining / total(method)
    assert [h["pruned"] for h in method.history] == [
        round(0.2 * r) for r in [h["remaining"] for h in method.history]]


def test_already_pruned_zeros_are_not_counted_again():
    # After a level, zero every kept weight of the first layer: its zeros then come before
    # the already-pruned zeros of later layers in the op's tie order. Ranking all weights
    # and pruning P + k of them would pick first-layer zeros and remove fewer than k new ones.
    model = mlp()
    method = IMP(model)
    method.end_round()
    first = method.layers[0][1]
    with torch.no_grad():
        first.weight.zero_()
    before = masks(method)
    remaining = total(method) - pruned(method)
    assert first.weight.numel() > pruned(method) + round(0.2 * remaining)  # the trap is set
    method.end_round()
    after = masks(method)
    assert sum(int(b.sum() - a.sum()) for a, b in zip(after, before)) == round(0.2 * remaining)
    assert torch.equal(after[0], reference_prune_remaining([first.weight], [before[0]], round(0.2 * remaining))[0])


@pytest.mark.parametrize("k", [0, 3])
def test_rewind_restores_saved_iterate_bit_exactly(k):
    model = cnn()
    method = IMP(model, rewind_iteration=k)
    data = batches(model, 8)
    saved = {}

    def remember():  # the test's own copy of the iterate the method must rewind to
        if method.iteration == k and not saved:
            saved.update({n: p.detach().clone() for n, p in model.named_parameters()})

    if k == 0:
        remember()
    for level in range(2):
        opt = sgd(method)
        train(model, method, opt, data, each_step=remember)
        method.end_round()
        assert method.iteration == k and method.round == level + 1
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                m = model.get_submodule(name.rpartition(".")[0]).weight_mask
                assert torch.equal(p[m], saved[name][m])  # kept: the saved values, bit for bit
                assert (p[~m] == 0).all() and (~m).any()  # pruned: exactly zero
            else:
                assert torch.equal(p, saved[name])


def test_pruned_weights_stay_zero_under_momentum_and_weight_decay():
    model = mlp()
    method = IMP(model)
    data = batches(model, 5)
    for _ in range(2):
        train(model, method, sgd(method), data)
        method.end_round()
    m, start = masks(method), weights(method)
    opt = torch.optim.SGD(method.param_groups(lr=0.5, weight_decay=0.1), momentum=0.9, nesterov=True)
    train(model, method, opt, data * 2)
    for layer_mask, w0, (_, layer) in zip(m, start, method.layers):
        assert torch.equal(layer.weight_mask, layer_mask)
        assert (layer.weight[~layer_mask] == 0).all()
        assert not torch.equal(layer.weight[layer_mask], w0[layer_mask])  # training did move the rest


def test_ignore_classifier_leaves_last_linear_dense():
    model = cnn()
    dense_fc = model[5]
    method = IMP(model, ignore_classifier=True)
    assert model[5] is dense_fc and type(model[5]) is nn.Linear
    assert [n for n, _ in method.layers] == ["0", "2"]
    train(model, method, sgd(method), batches(model, 2))
    method.end_round()
    method.end_round()
    assert (model[5].weight != 0).all()
    assert pruned(method) == 65 + round(0.2 * (324 - 65))  # 324 conv weights only
    # Default: the classifier is pruned with the rest.
    assert isinstance(IMP(cnn()).model[5], SparseLinear)


@pytest.mark.parametrize("kwargs, error", [
    ({"prune_fraction": 0.0}, ValueError),
    ({"prune_fraction": 1.0}, ValueError),
    ({"prune_fraction": -0.2}, ValueError),
    ({"prune_fraction": float("nan")}, ValueError),
    ({"prune_fraction": "0.2"}, TypeError),
    ({"rewind_iteration": -1}, ValueError),
    ({"rewind_iteration": 1.5}, TypeError),
    ({"ignore_classifier": 1}, TypeError),
    ({"exclude": ["nope"]}, ValueError),
])
def test_bad_arguments_raise_before_the_model_changes(kwargs, error):
    model = cnn()
    before = snapshot(model)
    with pytest.raises(error):
        IMP(model, **kwargs)
    assert_untouched(model, before)


def test_model_without_prunable_layers_is_refused():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        IMP(model)
    assert_untouched(model, before)
    with pytest.raises(TypeError):
        IMP("model")


def test_state_dict_round_trip_continues_identically():
    data = batches(cnn(), 9, seed=7)

    def continue_run(model, method, opt):
        # Across the rewind point, a level boundary and a second level.
        train(model, method, opt, data[3:5])
        method.end_round()
        train(model, method, sgd(method), data[5:])
        method.end_round()

    a, _ = assert_roundtrip(cnn, lambda m: IMP(m, rewind_iteration=2), data[:3], continue_run)
    assert len(a.history) == 2 and a.round == 2


def test_nan_weights_raise_instead_of_pruning_nothing():
    # The raw op flags NaN with a NaN threshold and all-keep masks; the method must not
    # silently skip the level.
    model = mlp()
    method = IMP(model)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        method.end_round()
    assert pruned(method) == 0 and method.round == 0
