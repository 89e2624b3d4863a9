"""DPF: the mask is recomputed exactly every `period` steps to the Zhu–Gupta count, the
backward is straight-through so pruned weights learn and come back, flips/IoU history
matches the masks, layerwise and structured modes, the dense classifier, export, argument
checks and the state round-trip."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from methods_helpers import one_thread  # noqa: F401  (autouse fixture)
from methods_helpers import (assert_roundtrip, assert_untouched, batches, cnn, masks, mlp, pruned, sgd,
                             snapshot, total, train, weights)
from sparsekern.methods import DPF, schedules
from sparsekern.nn import SparseLinear
from sparsekern.ops import reference


def check_history_entry(entry, prev, new, names):
    """flips / IoU / density of one history entry against the masks themselves."""
    inter = sum(int((p & m).sum()) for p, m in zip(prev, new))
    union = sum(int((p | m).sum()) for p, m in zip(prev, new))
    assert entry["flips"] == sum(int((p != m).sum()) for p, m in zip(prev, new))
    assert entry["iou"] == pytest.approx(inter / union)
    assert entry["density"] == pytest.approx(sum(int(m.sum()) for m in new) / sum(m.numel() for m in new))
    for name, p, m in zip(names, prev, new):
        layer = entry["layers"][name]
        assert layer["flips"] == int((p != m).sum())
        assert layer["density"] == pytest.approx(m.float().mean().item())
        assert layer["iou"] == pytest.approx(int((p & m).sum()) / int((p | m).sum()))


def test_mask_recomputed_every_period_to_the_schedule_count():
    model = cnn()
    method = DPF(model, sparsity=0.8, end_iteration=24, period=4, ignore_classifier=False)
    n, names = total(method), [name for name, _ in method.layers]
    assert pruned(method) == 0  # s_0 = 0 under the schedule
    state = {"masks": masks(method), "stale": 0, "flipped": 0}

    def check():
        t, new, old = method.iteration, masks(method), state["masks"]
        target = round(schedules.zhu_gupta(t, final_sparsity=0.8, end=24) * n)
        fresh, _ = reference.magnitude_masks(weights(method), target)  # the mask from |w_t| now
        if t % 4 == 0:
            assert all(torch.equal(m, f) for m, f in zip(new, fresh)) and pruned(method) == target
            check_history_entry(method.history[-1], old, new, names)
            state["flipped"] += method.history[-1]["flips"] > 0
        else:
            assert all(torch.equal(a, b) for a, b in zip(new, old))
            # Not recomputed in between, although |w| has moved on since the last update.
            state["stale"] += not all(torch.equal(m, f) for m, f in zip(old, fresh))
        state["masks"] = new

    train(model, method, sgd(method, lr=0.2), batches(model, 30), each_step=check)
    assert [h["iteration"] for h in method.history] == list(range(0, 31, 4))
    assert state["stale"] > 0 and state["flipped"] > 0  # the checks above had something to catch
    assert pruned(method) == round(0.8 * n)  # s_f held after end_iteration
    assert [h["sparsity"] for h in method.history] == [
        schedules.zhu_gupta(t, final_sparsity=0.8, end=24) for t in range(0, 31, 4)]


@pytest.mark.parametrize("end, period, steps", [(11, 16, 15), (10, 4, 14)])
def test_target_reached_at_end_iteration_whatever_the_period(end, period, steps):
    # "p | t" alone reached the target only when p divided end_iteration: (11, 16) pruned
    # nothing at all (its only update was t = 0, at s_0 = 0).
    model = cnn()
    method = DPF(model, sparsity=0.8, end_iteration=end, period=period, ignore_classifier=False)
    train(model, method, sgd(method), batches(model, steps))
    expected = sorted({t for t in range(0, steps + 1, period)} | {end})
    assert [h["iteration"] for h in method.history] == expected
    assert method.history[expected.index(end)]["sparsity"] == 0.8
    assert pruned(method) == round(0.8 * total(method))


def test_straight_through_gradient_brings_a_pruned_weight_back():
    # One weight of four pruned; the loss only rewards the pruned one, so only the
    # straight-through gradient can grow it past the smallest kept weight.
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 0.1]]))
    method = DPF(model, sparsity=0.25, period=2, ignore_classifier=False)
    layer = model[0]
    assert layer.weight_mask.tolist() == [[True, True, True, False]]
    opt = torch.optim.SGD(method.param_groups(lr=1.0))
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    for step in (1, 2):
        opt.zero_grad()
        (-model(x).sum()).backward()
        assert layer.weight.grad.tolist() == [[0.0, 0.0, 0.0, -1.0]]  # the pruned weight's gradient
        opt.step()
        method.step()
        if step == 1:  # 0.1 → 1.1 > 1.0, but no update at iteration 1
            assert layer.weight_mask.tolist() == [[True, True, True, False]]
    assert layer.weight.tolist() == [[1.0, 2.0, 3.0, pytest.approx(2.1)]]
    assert layer.weight_mask.tolist() == [[False, True, True, True]]  # came back at iteration 2
    assert (method.history[-1]["flips"], method.history[-1]["iou"]) == (2, 0.5)


def test_gradient_is_the_pruned_models_gradient_unmasked():
    model = cnn()
    method = DPF(model, sparsity=0.7)
    x, y = batches(model, 1)[0]
    F.cross_entropy(model(x), y).backward()
    pruned_model = method.export().model  # plain layers holding w̃ = m ⊙ w
    for p in pruned_model.parameters():
        p.requires_grad_(True)
    F.cross_entropy(pruned_model(x), y).backward()
    for (_, layer), dense in zip(method.layers, [pruned_model[0], pruned_model[2]]):
        assert torch.equal(dense.weight, layer.weight * layer.weight_mask)
        torch.testing.assert_close(layer.weight.grad, dense.weight.grad)
        assert (layer.weight.grad[~layer.weight_mask] != 0).any()


def test_classifier_dense_by_default():
    model = cnn()
    fc = model[5]
    method = DPF(model, sparsity=0.5)
    assert model[5] is fc and type(fc) is nn.Linear and [n for n, _ in method.layers] == ["0", "2"]
    assert pruned(method) == round(0.5 * 324)
    assert isinstance(DPF(cnn(), 0.5, ignore_classifier=False).model[5], SparseLinear)


def test_classifier_of_a_model_without_linear_is_its_last_conv():
    # SqueezeNet classifies with a 1x1 conv (torchvision starts it at std 0.01): with no
    # nn.Linear to leave dense, global ranking pruned all of it at sparsity 0.5, and the
    # model output zeros for every input.
    torch.manual_seed(0)
    model = torchvision.models.SqueezeNet("1_1", num_classes=10)
    head = model.classifier[1]
    method = DPF(model, sparsity=0.5)
    assert model.classifier[1] is head and type(head) is nn.Conv2d
    assert "classifier.1" not in dict(method.layers)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).abs().max() > 0
    # Opt-out as before; a model with a Linear keeps it as the classifier.
    assert "classifier.1" in dict(DPF(torchvision.models.SqueezeNet("1_1", num_classes=10), 0.5,
                                      ignore_classifier=False).layers)
    mixed = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 8), nn.Unflatten(1, (8, 1, 1)), nn.Conv2d(8, 2, 1))
    assert [n for n, _ in DPF(mixed, 0.5).layers] == ["0", "4"]

def test_layerwise_exact_count_per_layer():
    model = mlp()
    method = DPF(model, sparsity=0.6, end_iteration=8, period=2, mode="layerwise", ignore_classifier=False)

    def check():
        if method.iteration % 2 == 0:
            s = schedules.zhu_gupta(method.iteration, final_sparsity=0.6, end=8)
            for _, layer in method.layers:
                assert int((~layer.weight_mask).sum()) == round(s * layer.weight.numel())
                expected, _ = reference.magnitude_masks([layer.weight], round(s * layer.weight.numel()))
                assert torch.equal(layer.weight_mask, expected[0])

    train(model, method, sgd(method), batches(model, 10), each_step=check)
    assert [h["iteration"] for h in method.history] == [0, 2, 4, 6, 8, 10]
    assert method.history[-1]["layers"]["0"]["density"] == (640 - round(0.6 * 640)) / 640


@pytest.mark.parametrize("make_model", [cnn, mlp])
def test_structured_prunes_whole_lowest_norm_channels_up_to_the_target(make_model):
    model = make_model()
    method = DPF(model, sparsity=0.5, period=1, mode="structured", ignore_classifier=False)

    def check():
        channels = []  # (norm, size, pruned) for every output channel of every layer
        for _, layer in method.layers:
            m = layer.weight_mask.flatten(1)
            assert (m.all(1) | ~m.any(1)).all()  # each output channel kept or pruned whole
            norms = layer.weight.detach().flatten(1).norm(dim=1)
            channels += [(float(v), m.shape[1], not bool(k)) for v, k in zip(norms, m.any(1))]
        target = round(0.5 * total(method))
        assert pruned(method) <= target
        cut = [c for c in channels if c[2]]
        kept = sorted(c for c in channels if not c[2])
        assert max(c[0] for c in cut) <= kept[0][0]  # the lowest norms went, globally
        assert pruned(method) + kept[0][1] > target  # the next channel would overshoot

    check()
    train(model, method, sgd(method), batches(model, 3), each_step=check)
    assert len(method.history) == 4


def test_export_bakes_the_mask():
    model = cnn()
    method = DPF(model, sparsity=0.6, period=2)
    train(model, method, sgd(method), batches(model, 3))
    exported = method.export().model
    assert all(type(m) is not SparseLinear for m in exported.modules())
    for (_, layer), plain in zip(method.layers, [exported[0], exported[2]]):
        assert torch.equal(plain.weight, layer.weight * layer.weight_mask)
        assert (layer.weight[~layer.weight_mask] != 0).any()  # the dense model keeps its values
    x = batches(model, 1)[0][0]
    torch.testing.assert_close(exported(x), model(x))


@pytest.mark.parametrize("kwargs, error", [
    ({"sparsity": 1.0}, ValueError),
    ({"sparsity": -0.5}, ValueError),
    ({"sparsity": None}, TypeError),
    ({"sparsity": 0.5, "period": 0}, ValueError),
    ({"sparsity": 0.5, "period": 2.0}, TypeError),
    ({"sparsity": 0.5, "mode": "channel"}, ValueError),
    ({"sparsity": 0.5, "mode": None}, TypeError),
    ({"sparsity": 0.5, "end_iteration": 0}, ValueError),
    ({"sparsity": 0.5, "ignore_classifier": "yes"}, TypeError),
    ({"sparsity": 0.5, "exclude": "fc"}, ValueError),
])
def test_bad_arguments_raise_before_the_model_changes(kwargs, error):
    model = cnn()
    before = snapshot(model)
    with pytest.raises(error):
        DPF(model, **kwargs)
    assert_untouched(model, before)


def test_model_without_prunable_layers_is_refused():
    model = nn.Sequential(nn.Flatten())
    before = snapshot(model)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        DPF(model, 0.5)
    assert_untouched(model, before)
    # Only a classifier, kept dense by default: nothing left to prune.
    model = nn.Sequential(nn.Linear(3, 2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d selected"):
        DPF(model, 0.5)
    assert_untouched(model, before)


@pytest.mark.parametrize("mode", ["global", "structured"])
def test_state_dict_round_trip_continues_identically(mode):
    data = batches(cnn(), 14, seed=5)

    def continue_run(model, method, opt):
        train(model, method, opt, data[5:])

    a, b = assert_roundtrip(cnn, lambda m: DPF(m, 0.7, end_iteration=10, period=3, mode=mode), data[:5],
                            continue_run)
    assert [h["iteration"] for h in b.history] == [0, 3, 6, 9, 10, 12]  # 10: end_iteration
    assert b.history == a.history
