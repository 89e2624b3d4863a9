"""What swapping layers (sparsify) and baking / purging them (export) must not lose or get
wrong: the user's hooks, weight tying, a reparametrised weight refused before anything
changes, and two purge cases whose constants the fx graph does not show (AvgPool2d's
divisor_override, an in-place activation with another reader)."""
import warnings

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from conftest import tolerances
from methods_helpers import assert_untouched, snapshot
from sparsekern import export, sparsify


def test_sparsify_and_export_keep_the_layers_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    pre = model[0].register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    post = model[2].register_forward_hook(lambda m, args, out: seen.append(out.shape) or out + 1.0)
    x = torch.randn(3, 4)
    expected = model(x)
    sparsify(model)
    torch.testing.assert_close(model(x), expected)
    exported = export(model).model
    torch.testing.assert_close(exported(x), expected)
    assert len(seen) == 3
    pre.remove(), post.remove()  # the user's handles still remove them from the sparse layers
    model(x)
    assert len(seen) == 3 and not model[0]._forward_pre_hooks


def tied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    return model


def test_export_keeps_weight_tying_when_the_masks_agree():
    model = sparsify(tied())
    assert model[0].weight is model[2].weight
    exported = export(model, example_input=(2, 8))
    assert exported.model[0].weight is exported.model[2].weight
    assert exported.stats["params_before"] == exported.stats["params_after"] == 64 + 8 + 8
    x = torch.randn(2, 8)
    torch.testing.assert_close(exported.model(x), model(x))
    # Different masks bake different weights: two parameters, each right.
    with torch.no_grad():
        model[0].weight_mask[0, 0] = False
    exported = export(model).model
    assert exported[0].weight is not exported[2].weight and exported[0].weight[0, 0] == 0 != exported[2].weight[0, 0]
    torch.testing.assert_close(exported(x), model(x))


def test_a_reparametrised_weight_is_refused_before_anything_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    torch_prune.random_unstructured(model[1], "weight", 0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'1'.*torch.nn.utils.prune"):
        sparsify(model)
    assert_untouched(model, before)
    sparsify(model, exclude="1")
    assert type(model[1]) is nn.Linear


def check_purge(model, x, removed):
    model.eval()
    with torch.no_grad():
        expected = model(x)
        exported = export(model, purge=True, example_input=x)
        torch.testing.assert_close(exported.model(x), expected, **tolerances(torch.float64, k=64))
    assert exported.stats["removed_channels"] == removed


@pytest.mark.parametrize("divisor_override", [None, 1, 3])
def test_purge_folds_constants_through_avg_pool_only_when_it_averages(divisor_override):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.AvgPool2d(2, divisor_override=divisor_override),
                          nn.Conv2d(8, 4, 2)).double()
    sparsify(model)
    with torch.no_grad():
        model[0].weight_mask[[1, 3]] = False  # constant channels: their bias
    # Averaging keeps a constant; a divisor_override scales it by 4 / divisor (it was
    # folded unscaled, off by 0.19), so those channels stay.
    check_purge(model, torch.randn(2, 3, 8, 8, dtype=torch.float64), {"0": 2} if divisor_override is None else {})


class InPlaceFork(nn.Module):
    def __init__(self, inplace):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        y = self.c1(x)
        a = self.c2(self.act(y))  # in place: c3 below then reads relu(y), not y
        return a + self.c3(y)


@pytest.mark.parametrize("inplace", [False, True])
def test_purge_keeps_channels_an_in_place_activation_shares(inplace):
    torch.manual_seed(0)
    model = InPlaceFork(inplace).double()
    with torch.no_grad():
        model.c1.bias.fill_(-1.0)  # the closed channels' constant: -1, 0 after the ReLU
    sparsify(model)
    with torch.no_grad():
        model.c1.weight_mask[[0, 1]] = False
    check_purge(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), {} if inplace else {"c1": 2})


class Alias(nn.Module):
    """Reads its layer's weight through a local alias: sparsify cannot see it."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        fc = self.fc
        return self.out(torch.nn.functional.linear(x, fc.weight, fc.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: its own tolerance, 4 eps
@pytest.mark.parametrize("example", [(3, 4), "tensor"])
def test_export_warns_when_a_mask_was_bypassed(example, dtype):
    torch.manual_seed(0)
    model = sparsify(Alias()).to(dtype)
    example = torch.randn(3, 4, dtype=dtype) if example == "tensor" else example
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all masks keep everything: the outputs agree
        export(model, example_input=example)
    with torch.no_grad():
        model.fc.weight_mask[:2] = False  # never applied: the forward reads fc.weight
    with pytest.warns(UserWarning, match="output differs from the masked model's"):
        export(model, example_input=example)
    called = sparsify(Called()).to(dtype)  # the same masks, the layer called: its mask applies
    called.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(called, example_input=example)


class Called(Alias):
    def forward(self, x):
        return self.out(self.fc(x))
