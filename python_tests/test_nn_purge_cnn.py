"""purge on torchvision architectures beyond ResNet: a depthwise conv (MobileNet,
EfficientNet, ShuffleNet) is sliced with the conv that feeds it, its own zero rows become
constants, and what purge cannot slice (grouped convs, channel shuffles, cats, residual
adds) stays with its zero channels counted; tiny MobileNetV2/V3, EfficientNet,
ShuffleNetV2, SqueezeNet, DenseNet, RegNetY, ConvNeXt and Swin purge to smaller models with
the outputs unchanged (squeeze-excitation: test_nn_purge_se.py; ViT: test_nn_heads.py)."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import convnext, efficientnet, regnet, swin_transformer

from sparsekern import export, sparsify
from sparsekern.methods import DPF, ConstrainedL0
from sparsekern.nn import sparse_modules
from run_helpers import close_random_gates, one_thread, tame_batchnorm  # noqa: F401  (one_thread: a fixture)

TOL = dict(rtol=1e-5, atol=1e-5)


def depthwise_net(padding=1, groups=8, dw_out=8):
    return nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, dw_out, 3, padding=padding, groups=groups, bias=False), nn.BatchNorm2d(dw_out), nn.ReLU(),
        nn.Conv2d(dw_out, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


@torch.no_grad()
def close_depthwise_channels(model):
    """Channel 1: conv 0's row zero, BN → −1, ReLU → 0 reaches the depthwise conv.
    Channel 2: conv 0's row zero, BN → +0.5: a nonzero constant into the depthwise conv.
    Channel 3: the depthwise conv's own row zero.  Channel 4: conv 6 ignores it."""
    for _, m in sparse_modules(model):
        m.weight_mask.fill_(True)
    model[0].weight_mask[[1, 2]] = False
    model[1].running_mean[[1, 2]] = 0.0
    model[1].bias[1], model[1].bias[2] = -1.0, 0.5
    model[3].weight_mask[3] = False
    model[6].weight_mask[:, 4] = False
    return model


@pytest.mark.parametrize("padding", [1, 0])
@torch.no_grad()
def test_purge_slices_a_depthwise_conv_with_the_conv_feeding_it(padding):
    # The depthwise conv stopped the group: nothing of a MobileNet block's expansion was
    # removed (tiny MobileNetV2 under structured L0, 40% of the gates closed: 32 of 2175).
    torch.manual_seed(0)
    model = close_depthwise_channels(tame_batchnorm(sparsify(depthwise_net(padding), mask="binary")))
    x = torch.randn(2, 3, 8, 8)
    purged, stats = export(model, purge=True, example_input=x)
    # Channel 2's constant 0.5 meets the depthwise conv's zero padding (the borders see
    # less of it) and stays; without padding it is a constant 0.5·Σw and folds into conv 6.
    kept = 3 if padding else 4
    assert stats["removed_channels"] == {"0": kept}
    assert stats["kept_zero_channels"] == ({"0": 1} if padding else {})
    dw = purged[3]
    assert purged[0].out_channels == purged[1].num_features == 8 - kept
    assert dw.in_channels == dw.out_channels == dw.groups == dw.weight.shape[0] == 8 - kept
    assert purged[4].num_features == purged[6].in_channels == 8 - kept
    model.eval(), purged.eval()
    torch.testing.assert_close(purged(x), model(x), **TOL)
    assert stats["params_after"] < stats["params_before"] and stats["macs_after"] < stats["macs_before"]


@pytest.mark.parametrize("groups, dw_out", [(4, 8), (8, 16)])
@torch.no_grad()
def test_grouped_conv_or_channel_multiplier_stops_the_group(groups, dw_out):
    # A grouped conv mixes channels within a group, a channel multiplier gives each input
    # several outputs: slicing one input channel is not slicing one output. Nothing goes.
    torch.manual_seed(0)
    model = tame_batchnorm(sparsify(depthwise_net(1, groups, dw_out), mask="binary"))
    model[0].weight_mask[[1, 2]] = False
    model[1].running_mean[[1, 2]] = 0.0
    model[1].bias[[1, 2]] = -1.0
    x = torch.randn(2, 3, 8, 8)
    purged, stats = export(model, purge=True, example_input=x)
    assert stats["removed_channels"] == {}
    assert stats["kept_zero_channels"] == {"0": 2}
    assert purged[3].groups == groups and purged[0].out_channels == 8
    model.eval(), purged.eval()
    torch.testing.assert_close(purged(x), model(x), **TOL)


@torch.no_grad()
def test_depthwise_conv_on_the_model_input_counts_its_zero_rows():
    # Its input channels are the model's: its zero rows stay, counted under its name.
    model = sparsify(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 2, 1)), mask="binary")
    model[0].weight_mask[[0, 3]] = False
    x = torch.randn(2, 4, 6, 6)
    purged, stats = export(model, purge=True, example_input=x)
    assert stats["removed_channels"] == {} and stats["kept_zero_channels"] == {"0": 2}
    torch.testing.assert_close(purged.eval()(x), model.eval()(x), **TOL)


def tiny(name):
    if name == "mobilenet_v2":
        return torchvision.models.MobileNetV2(num_classes=10, width_mult=0.25)
    if name == "mobilenet_v3_small":
        return torchvision.models.mobilenet_v3_small(num_classes=10, width_mult=0.25)
    if name == "efficientnet_b0":
        setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
        return efficientnet.EfficientNet(setting, 0.2, num_classes=10, last_channel=last)
    if name == "shufflenet_v2":
        return torchvision.models.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10)
    raise KeyError(name)


@pytest.mark.parametrize("name, sliced, whole", [
    # Expansion 1×1 and the depthwise 3×3 after it.
    ("mobilenet_v2", ["features.2.conv.0.0", "features.2.conv.1.0"], []),
    # Block 1's squeeze-excitation is sliced with the stem and its depthwise conv (its
    # multiply stopped them: they stayed whole); blocks 2 and 3 have none; block 4's
    # expansion goes through its SE; its projection feeds block 5's residual add.
    ("mobilenet_v3_small", ["features.0.0", "features.1.block.0.0", "features.1.block.1.fc2", "features.2.block.0.0",
                            "features.2.block.1.0", "features.4.block.0.0", "features.4.block.1.0"],
     ["features.4.block.3.0"]),
    # Every MBConv has squeeze-excitation: expansion, depthwise conv and fc2's rows shrink
    # together (they stayed whole while the multiply stopped the group), as do the squeeze
    # units and the projection (read by the next expansion). The stem feeds block 1's
    # residual add, so it and block 1's depthwise conv stay.
    ("efficientnet_b0", ["features.2.0.block.0.0", "features.2.0.block.1.0", "features.2.0.block.2.fc2",
                         "features.2.0.block.2.fc1", "features.2.0.block.3.0"],
     ["features.0.0", "features.1.0.block.0.0"]),
    # The stem feeds both branches of the first unit (one through a depthwise conv); the
    # 1×1 → depthwise → 1×1 branch shrinks inside; the channel shuffle stops the rest.
    ("shufflenet_v2", ["conv1.0", "stage2.0.branch2.0", "stage2.0.branch2.3"], ["stage2.0.branch2.5"]),
])
@torch.no_grad()
def test_structured_l0_purge_of_torchvision_depthwise_models(name, sliced, whole):
    torch.manual_seed(0)
    model = tiny(name)
    # Every conv gated (the default gates only those purge can slice): `whole` must stay.
    method = ConstrainedL0(model, 0.5, structured=True, include="*")
    tame_batchnorm(model)
    close_random_gates(method, 0.4)  # median gate 0
    x = torch.randn(2, 3, 32, 32)
    purged, stats = method.export(purge=True, example_input=x)
    before = dict(model.named_modules())
    after = dict(purged.named_modules())
    for layer in sliced:
        assert after[layer].out_channels < before[layer].out_channels, layer
    for layer in whole:
        assert after[layer].out_channels == before[layer].out_channels, layer
        assert stats["kept_zero_channels"][layer] > 0, layer  # it had zero channels, counted
    for n, m in after.items():
        if isinstance(m, nn.Conv2d) and before[n].groups == before[n].in_channels > 1:
            assert m.groups == m.in_channels == m.out_channels, n  # still depthwise
    model.eval(), purged.eval()
    want = model(x)
    torch.testing.assert_close(purged(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert stats["params_after"] < 0.9 * stats["params_before"]


@torch.no_grad()
def test_structured_dpf_purge_of_mobilenet_v2():
    # DPF keeps biases: a pruned filter outputs BN's constant, which ReLU6 may pass on into
    # a padded depthwise conv (kept) or zero (removed). Either way the output is unchanged.
    torch.manual_seed(0)
    model = tiny("mobilenet_v2")
    method = DPF(model, 0.5, mode="structured")
    tame_batchnorm(model)
    x = torch.randn(2, 3, 32, 32)
    purged, stats = method.export(purge=True, example_input=x)
    before = dict(model.named_modules())
    shrunk = [n for n, m in purged.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels < before[n].out_channels]
    assert "features.2.conv.1.0" in shrunk  # a depthwise conv
    model.eval(), purged.eval()
    want = model(x)
    torch.testing.assert_close(purged(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert stats["params_after"] < stats["params_before"]


def other_tiny(name):
    if name == "squeezenet1_1":
        return torchvision.models.squeezenet1_1(num_classes=10), 64
    if name == "densenet":
        return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10), 32
    if name == "regnet_y":
        params = regnet.BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=4, se_ratio=0.25)
        return regnet.RegNet(params, num_classes=10, stem_width=8), 32
    if name == "convnext":
        setting = [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)]
        return convnext.ConvNeXt(setting, num_classes=10), 32
    if name == "swin":
        return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                                window_size=[2, 2], num_classes=10), 32
    raise KeyError(name)


@pytest.mark.parametrize("name, sliced, whole", [
    # Fire: the squeeze conv feeds the 1×1 and the 3×3 expansion; their cat stops the group.
    ("squeezenet1_1", ["features.3.squeeze"], ["features.3.expand1x1", "features.3.expand3x3"]),
    # A dense layer's bottleneck shrinks; its output joins the cat.
    ("densenet", ["features.denseblock1.denselayer1.conv1"], ["features.denseblock1.denselayer1.conv2"]),
    # The stem feeds two 1×1 convs; a block's first 1×1 feeds the grouped 3×3: stays.
    ("regnet_y", ["stem.0"], ["trunk_output.block1.block1-0.f.a.0", "trunk_output.block1.block1-0.f.b.0"]),
    # The MLP inside each block (channels-last Linears) loses hidden units; the depthwise
    # 7×7 reads the residual stream.
    ("convnext", ["features.1.0.block.3"], ["features.1.0.block.0"]),
    # Swin: the MLP's hidden units; the patch embedding's conv reads into a LayerNorm.
    ("swin", ["features.1.0.mlp.0"], ["features.0.0"]),
])
@torch.no_grad()
def test_structured_l0_purge_of_other_torchvision_cnns(name, sliced, whole):
    torch.manual_seed(0)
    model, size = other_tiny(name)
    method = ConstrainedL0(model, 0.5, structured=True, include="*")  # `whole` too, as above
    tame_batchnorm(model)
    close_random_gates(method, 0.4)  # median gate 0
    x = torch.randn(2, 3, size, size)
    purged, stats = method.export(purge=True, example_input=x)
    for layer in sliced:
        assert stats["removed_channels"][layer] > 0, layer
    for layer in whole:
        assert layer not in stats["removed_channels"] and stats["kept_zero_channels"][layer] > 0, layer
    model.eval(), purged.eval()
    want = model(x)
    torch.testing.assert_close(purged(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert stats["params_after"] < stats["params_before"]
