"""purge through squeeze-excitation: x * act2(fc2(act1(fc1(pool(x))))) is per-channel, so a
channel of x that is 0, constant into an fc2 row that is zero too, or read by nobody goes
with fc1's input column and fc2's row; a nonzero constant times a varying scale stays.
Multiplies of any other shape still stop the group. Hand-built nets, an MBConv under
structured L0 on its expansion or on its depthwise conv, tiny torchvision models."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import efficientnet, regnet
from torchvision.ops import SqueezeExcitation

from sparsekern import export, sparsify
from sparsekern.methods import ConstrainedL0
from sparsekern.nn import sparse_modules
from run_helpers import close_random_gates, one_thread, tame_batchnorm  # noqa: F401  (one_thread: a fixture)

TOL = dict(rtol=1e-5, atol=1e-6)


class FunctionalSE(nn.Module):
    """Squeeze-excitation written with functions and a method multiply, x.mul(scale)."""

    def __init__(self, channels, squeeze, hard):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.hard = hard

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(self.avgpool(x))))
        return x.mul(F.hardsigmoid(s) if self.hard else torch.sigmoid(s))


def se_net(se):
    return nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        se,
        nn.Conv2d(8, 4, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def make_se(kind, hard):
    if kind == "torchvision":
        return SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid if hard else nn.Sigmoid)
    return FunctionalSE(8, 4, hard)


@torch.no_grad()
def close_se_channels(model):
    """Channel 1: conv 0's row zero, BN → -1, ReLU → 0: x is 0, the product 0.
    Channel 2: conv 0's row zero, BN → +0.5 → ReLU: a nonzero constant k, k · scale varies.
    Channel 3: as 2, and fc2's row zero: scale = act2(bias) constant, k · scale folds.
    Channel 4: neither conv 4 nor fc1 reads it (x varies).
    Channel 5: conv 4 does not read it, fc1 does: it changes fc1's output, stays.
    Channel 6: fc1 does not read it, fc2's row is zero with bias -4: hardsigmoid(-4) = 0,
    so the product is 0 though x varies; sigmoid(-4) is not 0 and conv 4 reads it."""
    for _, m in sparse_modules(model):
        m.weight_mask.fill_(True)
    se = model[3]
    model[0].weight_mask[[1, 2, 3]] = False
    model[1].running_mean[[1, 2, 3]] = 0.0
    model[1].bias[1] = -1.0
    model[1].bias[[2, 3]] = 0.5
    se.fc2.weight_mask[[3, 6]] = False
    se.fc2.bias[6] = -4.0
    model[4].weight_mask[:, [4, 5]] = False
    se.fc1.weight_mask[:, [4, 6]] = False
    return model


@pytest.mark.parametrize("kind", ["torchvision", "functional"])
@pytest.mark.parametrize("hard", [False, True], ids=["sigmoid", "hardsigmoid"])
@torch.no_grad()
def test_purge_slices_a_squeeze_excitation_with_its_channels(kind, hard):
    # The multiply stopped the group: nothing of conv 0 was removed, its 3 zero channels kept.
    torch.manual_seed(0)
    model = close_se_channels(tame_batchnorm(sparsify(se_net(make_se(kind, hard)), mask="binary")))
    x = torch.randn(2, 3, 8, 8)
    purged, stats = export(model, purge=True, example_input=x)
    removed = 4 if hard else 3  # channels 1, 3, 4 (and 6 under hardsigmoid)
    assert stats["removed_channels"]["0"] == removed
    assert stats["kept_zero_channels"]["0"] == 1  # channel 2: a constant times a varying scale
    # fc2's zero rows: 3 went; 6 stays under sigmoid (its scale 0.018 meets a varying x).
    assert stats["kept_zero_channels"].get("3.fc2", 0) == (0 if hard else 1)
    se = purged[3]
    assert purged[0].out_channels == purged[1].num_features == 8 - removed
    assert se.fc1.in_channels == se.fc1.weight.shape[1] == 8 - removed
    assert se.fc2.out_channels == se.fc2.weight.shape[0] == se.fc2.bias.shape[0] == 8 - removed
    assert purged[4].in_channels == 8 - removed
    model.eval(), purged.eval()
    torch.testing.assert_close(purged(x), model(x), **TOL)
    assert stats["params_after"] < stats["params_before"] and stats["macs_after"] < stats["macs_before"]


@torch.no_grad()
def test_zero_channel_and_nonzero_constant_with_both_activations_exact():
    # A larger batch and a bigger image: every kept channel's scale varies; still exact.
    torch.manual_seed(1)
    for hard in (False, True):
        model = close_se_channels(tame_batchnorm(sparsify(se_net(make_se("torchvision", hard)), mask="binary")))
        x = torch.randn(4, 3, 16, 16) * 3
        purged, stats = export(model, purge=True, example_input=x[:1])
        assert stats["removed_channels"] == {"0": 4 if hard else 3}
        model.eval(), purged.eval()
        torch.testing.assert_close(purged(x), model(x), **TOL)


class OtherMultiply(nn.Module):
    """relu(bn(conv0(x))) times some scale, then a 1×1 conv: the scale's shape by `how`."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv0 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.other = nn.Conv2d(3, 8, 1)  # "branch": another group's tensor
        self.gate = nn.Conv2d(8, 8, 1)  # "spatial": a per-pixel gate from x itself
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 1 if how == "one_scale" else 8, 1)
        self.conv = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, inp):
        x = torch.relu(self.bn(self.conv0(inp)))
        extra = 0.0
        if self.how == "branch":
            s = torch.sigmoid(self.other(inp))
        elif self.how == "spatial":
            s = torch.sigmoid(self.gate(x))
        else:
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.avgpool(x)))))
            if self.how == "scale_read_elsewhere":
                extra = s.flatten(1).sum(1, keepdim=True)
        y = self.conv(x * s)
        return self.head(y.mean((2, 3))) + extra


@pytest.mark.parametrize("how", ["branch", "spatial", "one_scale", "scale_read_elsewhere"])
@torch.no_grad()
def test_multiplies_that_are_not_squeeze_excitation_still_stop_the_group(how):
    # Another group's tensor, a per-pixel gate, one scale broadcast over all channels, a
    # scale that something else reads too (slicing fc2 would change what it reads).
    torch.manual_seed(0)
    model = tame_batchnorm(sparsify(OtherMultiply(how), mask="binary"))
    model.conv0.weight_mask[[1, 2]] = False
    model.bn.running_mean[[1, 2]] = 0.0
    model.bn.bias[[1, 2]] = -1.0  # channels 1 and 2 are 0 where they reach the multiply
    x = torch.randn(2, 3, 8, 8)
    purged, stats = export(model, purge=True, example_input=x)
    assert "conv0" not in stats["removed_channels"]
    assert stats["kept_zero_channels"]["conv0"] == 2
    assert purged.conv0.out_channels == 8 and purged.conv.in_channels == 8
    if how != "one_scale":
        assert purged.fc2.out_channels == 8
    model.eval(), purged.eval()
    torch.testing.assert_close(purged(x), model(x), **TOL)


def mbconv(activation):
    """EfficientNet's MBConv without the residual: expand 1×1 → BN → act → depthwise 3×3
    → BN → act → squeeze-excitation → project 1×1 → BN, then a small head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16), activation(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), activation(),
        SqueezeExcitation(16, 4, activation=nn.SiLU),
        nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def close_gates(method, layers, closed):
    with torch.no_grad():
        for name, layer in method.layers:
            if name in layers:
                layer.weight_log_alpha[closed] = -20.0  # median gate 0


@pytest.mark.parametrize("activation", [nn.SiLU, nn.ReLU])
@torch.no_grad()
def test_mbconv_with_gates_on_the_expansion(activation):
    # A closed expansion channel is 0 into the depthwise conv and out of it; the depthwise
    # conv's BatchNorm (plain: its conv has no gates) turns it into k = β - γμ/σ, which
    # the multiply makes vary unless act(k) is 0 (ReLU, k ≤ 0: 5 of the 6 here). SiLU: all 6
    # stay, counted.
    torch.manual_seed(0)
    model = mbconv(activation)
    method = ConstrainedL0(model, 0.5, structured=True, include=["0"])
    tame_batchnorm(model)
    closed = torch.tensor([1, 4, 6, 9, 12, 15])
    close_gates(method, {"0"}, closed)
    bn = model[4]
    k = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    goes = int((activation()(k[closed]) == 0).sum())
    assert goes == (0 if activation is nn.SiLU else 5)  # this seed's BatchNorm
    x = torch.randn(2, 3, 8, 8)
    purged, stats = method.export(purge=True, example_input=x)
    assert stats["removed_channels"].get("0", 0) == goes
    assert stats["kept_zero_channels"]["0"] == len(closed) - goes
    assert purged[6].fc1.in_channels == purged[6].fc2.out_channels == purged[3].out_channels == 16 - goes
    model.eval(), purged.eval()
    torch.testing.assert_close(purged(x), model(x), **TOL)


@pytest.mark.parametrize("activation", [nn.SiLU, nn.ReLU])
@torch.no_grad()
def test_mbconv_with_gates_on_the_depthwise_conv(activation):
    # Its gated BatchNorm outputs 0 for a closed filter, act(0) = 0, and the SE multiply
    # keeps it 0: each closed depthwise channel goes, with its expansion row, fc1's input
    # column, fc2's row and the projection's input column.
    torch.manual_seed(0)
    model = mbconv(activation)
    method = ConstrainedL0(model, 0.5, structured=True, include=["3"])
    tame_batchnorm(model)
    closed = torch.tensor([0, 2, 5, 7, 11])
    close_gates(method, {"3"}, closed)
    x = torch.randn(2, 3, 8, 8)
    purged, stats = method.export(purge=True, example_input=x)
    assert stats["removed_channels"] == {"0": 5} and stats["kept_zero_channels"] == {}
    assert purged[0].out_channels == purged[3].out_channels == purged[3].groups == 11
    assert purged[6].fc1.in_channels == purged[6].fc2.out_channels == purged[7].in_channels == 11
    model.eval(), purged.eval()
    torch.testing.assert_close(purged(x), model(x), **TOL)
    assert stats["params_before"] - stats["params_after"] == 5 * (3 + 2 + 9 + 2 + 4 + 4 + 1 + 8)


def tiny_efficientnet():
    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return efficientnet.EfficientNet(setting, 0.2, num_classes=10, last_channel=last)


def se_blocks(model):
    """(expansion or input conv, depthwise conv, SE, projection) of every block with an SE."""
    blocks = []
    for m in model.modules():
        if isinstance(m, (torchvision.models.mobilenetv3.InvertedResidual, efficientnet.MBConv)):
            layers = [c for c in m.block.modules() if isinstance(c, (nn.Conv2d, SqueezeExcitation))]
            ses = [i for i, c in enumerate(layers) if isinstance(c, SqueezeExcitation)]
            if ses:
                i = ses[0]
                blocks.append((layers[i - 2] if i >= 2 else None, layers[i - 1], layers[i], layers[i + 3]))
    return blocks


@pytest.mark.parametrize("name, builder, max_after", [
    # Before: 119,842 -> 72,388 (every SE block's expansion stayed whole); now 42,200.
    ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10, width_mult=0.25), 45_000),
    # Before: 126,822 -> 69,306; now 38,058.
    ("efficientnet_b0", tiny_efficientnet, 40_000),
])
@torch.no_grad()
def test_structured_l0_purge_shrinks_torchvision_se_blocks(name, builder, max_after):
    torch.manual_seed(0)
    model = builder()
    method = ConstrainedL0(model, 0.5, structured=True, include="*")  # every conv gated, as the README table was measured
    tame_batchnorm(model)
    close_random_gates(method, 0.4)  # median gate 0
    x = torch.randn(2, 3, 32, 32)
    purged, stats = method.export(purge=True, example_input=x)
    before = {id(m): n for n, m in model.named_modules()}
    after = dict(purged.named_modules())
    shrunk = 0
    for expand, dw, se, project in se_blocks(model):
        n_dw, n_se = before[id(dw)], before[id(se)]
        c = after[n_dw].out_channels
        # Sliced together: the depthwise conv, fc1's inputs, fc2's rows, the projection's inputs.
        assert after[n_dw].groups == after[n_dw].in_channels == c
        assert after[f"{n_se}.fc1"].in_channels == after[f"{n_se}.fc2"].out_channels == c
        assert after[f"{n_se}.fc2"].bias.shape == (c,)
        assert after[before[id(project)]].in_channels == c
        if expand is not None:
            assert after[before[id(expand)]].out_channels == c
            shrunk += c < expand.out_channels
    assert shrunk == len([b for b in se_blocks(model) if b[0] is not None]) > 0  # every SE block's expansion
    model.eval(), purged.eval()
    want = model(x)
    torch.testing.assert_close(purged(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert stats["params_after"] < max_after


@pytest.mark.parametrize("group_width", [1, 4])
@torch.no_grad()
def test_structured_l0_purge_of_regnet_y_squeeze_excitation(group_width):
    # RegNetY's block: f.a 1×1 → BN → ReLU → f.b 3×3 → BN → ReLU → SE → f.c 1×1. With
    # group_width 1, f.b is depthwise and f.a shrinks with it and the SE's fc2 (7,762 ->
    # 4,423 parameters; 7,127 while the multiply stopped the group). A grouped f.b (width 4
    # here; torchvision's RegNetY sizes use 8 or more) still stops it before the SE.
    torch.manual_seed(0)
    params = regnet.BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=group_width,
                                                 se_ratio=0.25)
    model = regnet.RegNet(params, num_classes=10, stem_width=8)
    method = ConstrainedL0(model, 0.5, structured=True, include="*")  # every conv gated, as the README table was measured
    tame_batchnorm(model)
    close_random_gates(method, 0.4)  # median gate 0
    x = torch.randn(2, 3, 32, 32)
    purged, stats = method.export(purge=True, example_input=x)
    before, after = dict(model.named_modules()), dict(purged.named_modules())
    for block in ("trunk_output.block1.block1-0", "trunk_output.block2.block2-0"):
        a, b, fc2 = (f"{block}.{n}" for n in ("f.a.0", "f.b.0", "f.se.fc2"))
        if group_width == 1:
            assert after[a].out_channels == after[b].out_channels == after[fc2].out_channels < before[a].out_channels
        else:
            assert a not in stats["removed_channels"] and stats["kept_zero_channels"][a] > 0
            assert after[fc2].out_channels == before[fc2].out_channels
    model.eval(), purged.eval()
    want = model(x)
    torch.testing.assert_close(purged(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert stats["params_after"] < (5_000 if group_width == 1 else stats["params_before"])
