"""purgeable_layers: the Conv2d layers whose zeroed output channels export(purge=True)
removes, checked against purge itself on ResNets, LeNet-5, VGG-11, MobileNetV2,
SqueezeNet, DenseNet and small hand-built cases; dense and sparsified models; fx failures."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from sparsekern import export, sparsify
from sparsekern.methods import DPF, ConstrainedL0
from sparsekern.models import build_model
from sparsekern.nn import purgeable_layers
from sparsekern.nn import purgeable as purgeable_module
from run_helpers import one_thread  # noqa: F401  (one_thread: a fixture)

RESNET20_CONV1 = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]


def convs(model, depthwise=False):
    """Names of the Conv2d layers: groups = 1 ones, or the depthwise ones."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and ((m.groups > 1) if depthwise else (m.groups == 1))]


@torch.no_grad()
def zero_first_channels(model):
    """Output channel 0 of every groups = 1 conv zero (weight and bias), and every other
    bias, BatchNorm shift and running mean 0: a zeroed channel then carries exactly 0 to
    its consumers, and purge removes it wherever it can slice it."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                m.weight[0] = 0.0
            if m.bias is not None:
                m.bias.zero_()
        if isinstance(m, nn.BatchNorm2d):
            m.bias.zero_()
            m.running_mean.zero_()
    return model


def purge_agrees(model, x):
    """purgeable_layers(model) against what export(purge=True) does once channel 0 of
    every conv is zero: removed exactly where listed, kept (and counted) elsewhere."""
    names = purgeable_layers(model)
    zero_first_channels(model.eval())
    stats = export(model, purge=True, example_input=x).stats
    producers = [n for n in names if n in convs(model)]
    assert sorted(n for n in stats["removed_channels"] if n in convs(model)) == sorted(producers)
    assert all(stats["removed_channels"][n] == 1 for n in producers)
    assert sorted(n for n in stats["kept_zero_channels"] if n in convs(model)) == sorted(
        set(convs(model)) - set(producers))
    return names


# ---- the architectures


def test_resnet20_the_blocks_first_convs():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 8, 8), 10)
    names = purge_agrees(model, torch.randn(2, 3, 8, 8))
    # Not the stem (its output is added to layer1.0's), no conv2 (added to the shortcut),
    # no shortcut conv (added to conv2).
    assert names == RESNET20_CONV1


def test_torchvision_resnet18_each_basic_block_conv1():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    blocks = [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert purgeable_layers(model) == blocks
    purge_agrees(model, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name, expected", [
    ("lenet5", ["features.0", "features.3"]),  # features.3: pool → flatten → Linear
    ("vgg11", ["features.0", "features.4", "features.8", "features.11", "features.15", "features.18",
               "features.21", "features.24"]),
])
def test_plain_cnns_every_conv_including_the_one_before_flatten(name, expected):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10)
    assert expected == convs(model)
    assert purge_agrees(model, torch.randn(2, 1, 8, 8)) == expected
    # The last conv's zero channel went through the flatten: the Linear lost its features.
    purged = export(model, purge=True, example_input=torch.randn(2, 1, 8, 8)).model
    last = purged.get_submodule(expected[-1])
    linear = [m for m in purged.modules() if isinstance(m, nn.Linear)][0]
    assert last.out_channels == model.get_submodule(expected[-1]).out_channels - 1
    assert linear.in_features * model.get_submodule(expected[-1]).out_channels == (
        [m for m in model.modules() if isinstance(m, nn.Linear)][0].in_features * last.out_channels)


def test_mobilenet_v2_expansions_through_the_depthwise_convs():
    torch.manual_seed(0)
    model = torchvision.models.MobileNetV2(num_classes=10, width_mult=0.25)
    names = purgeable_layers(model)
    expansions = [f"features.{i}.conv.0.0" for i in range(2, 18)]
    depthwise = [f"features.{i}.conv.1.0" for i in range(2, 18)]
    assert set(expansions) <= set(names) and set(depthwise) <= set(names)
    # At width 0.25 block 1 maps 8 channels to 8 with a residual add: the stem's output
    # reaches it, so neither the stem nor block 1's depthwise conv (in the stem's group).
    assert "features.0.0" not in names and "features.1.conv.0.0" not in names
    assert set(depthwise) | {"features.1.conv.0.0"} == set(convs(model, depthwise=True))
    # A residual block's projection feeds an add; the last 1×1 conv a functional pool.
    residual = [f"features.{i}.conv.2" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]
    assert not set(residual) & set(names) and "features.18.0" not in names
    purge_agrees(copy.deepcopy(model), torch.randn(1, 3, 32, 32))
    # At full width block 1 maps 32 channels to 16, no add: the stem's group runs through
    # its depthwise conv into its projection.
    full = purgeable_layers(torchvision.models.mobilenet_v2())
    assert {"features.0.0", "features.1.conv.0.0", "features.1.conv.1"} <= set(full)


@torch.no_grad()
def test_a_zero_depthwise_filter_removes_its_channel_with_the_group():
    torch.manual_seed(0)
    model = torchvision.models.MobileNetV2(num_classes=10, width_mult=0.25).eval()
    listed = [n for n in purgeable_layers(model) if n in convs(model, depthwise=True)]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.zero_()
            m.running_mean.zero_()
    for name in listed:
        model.get_submodule(name).weight[1] = 0.0
    removed = export(model, purge=True, example_input=torch.randn(1, 3, 32, 32)).stats["removed_channels"]
    # Reported under the conv that feeds each depthwise conv: its block's expansion.
    assert removed == {f"features.{i}.conv.0.0": 1 for i in range(2, 18)}


def test_squeezenet_the_squeeze_convs():
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=10)
    names = purge_agrees(model, torch.randn(1, 3, 64, 64))
    # The expand convs are concatenated; the classifier conv is the model's output.
    assert names == ["features.0"] + [f"features.{i}.squeeze" for i in (3, 4, 6, 7, 9, 10, 11, 12)]


def test_densenet_the_bottlenecks_not_what_is_concatenated():
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)
    names = purge_agrees(model, torch.randn(1, 3, 32, 32))
    assert names == [f"features.denseblock{b}.denselayer{l}.conv1" for b in (1, 2) for l in (1, 2)]


class DenseCat(nn.Module):
    """A DenseNet-like cat: `grow`'s output is concatenated with its input; `bottleneck`
    feeds `grow` alone; `side` is read by a conv and by the cat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bottleneck = nn.Conv2d(4, 8, 1)
        self.grow = nn.Conv2d(8, 4, 3, padding=1)
        self.side = nn.Conv2d(8, 4, 1)
        self.reader = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        h = torch.cat([x, self.grow(torch.relu(self.bottleneck(x)))], 1)
        s = self.side(h)
        return self.head(torch.cat([h, s], 1)) + self.reader(s).sum()


def test_a_cat_stops_the_group():
    torch.manual_seed(0)
    assert purge_agrees(DenseCat(), torch.randn(2, 3, 6, 6)) == ["bottleneck"]


class Shapes(nn.Module):
    """A grouped conv and a conv called twice (neither sliceable), and one whose output
    goes to a grouped conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.twice = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.grouped(torch.relu(self.a(x)))
        x = self.b(self.twice(self.twice(x)))
        return self.fc(x.mean((2, 3)))


def test_grouped_convs_and_convs_called_twice_are_not_purgeable():
    assert purgeable_layers(Shapes()) == []


class Unbatched(nn.Module):
    """A conv on an unbatched [C, H, W] input, flattened from dim 1: the Linear reads
    H·W features of each channel, not C·H·W."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 1), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def test_a_flatten_the_linear_does_not_read_channel_major_is_not_purgeable():
    # Without shapes a flatten(x, 1) of a conv's output passes as channel-major; a Linear
    # whose in_features is not a multiple of the conv's channels shows it was not.
    assert purgeable_layers(Unbatched()) == []
    model = zero_first_channels(Unbatched())
    stats = export(model, purge=True, example_input=torch.randn(2, 4, 4)).stats
    assert stats["removed_channels"] == {} and stats["kept_zero_channels"] == {"conv": 1}


# ---- dense and sparse models, the model left as it was


@pytest.mark.parametrize("make", [
    lambda m: sparsify(m, mask="hard_concrete", structured=True),  # gated BatchNorms too
    lambda m: sparsify(m, mask="binary", include=["layer2"]),
    lambda m: DPF(m, 0.5),
], ids=["l0 structured", "partly binary", "dpf"])
def test_sparsified_models_give_the_same_layers_and_stay_unchanged(make):
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 8, 8), 10)
    make(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    types = [type(m) for m in model.modules()]
    assert purgeable_layers(model) == RESNET20_CONV1
    assert [type(m) for m in model.modules()] == types
    assert all(p is params[n] and p.device.type == "cpu" for n, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = build_model("resnet20", (3, 8, 8), 10)
    assert purgeable_layers(model) == RESNET20_CONV1


def test_the_weights_are_not_copied(monkeypatch):
    # The trace runs on a meta-device skeleton: no tensor of the model is deep-copied.
    seen = []
    original = purgeable_module._Analysis.__init__

    def spy(self, skeleton, example):
        seen.extend(p.device.type for p in skeleton.parameters())
        original(self, skeleton, example)

    monkeypatch.setattr(purgeable_module._Analysis, "__init__", spy)
    purgeable_layers(torchvision.models.resnet18())
    assert seen and set(seen) == {"meta"}


# ---- what it refuses


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > 0:  # data-dependent control flow: fx cannot trace it
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_an_untraceable_model_raises_naming_the_fx_error():
    with pytest.raises(ValueError, match=r"torch.fx can trace \(TraceError: symbolically traced") as info:
        purgeable_layers(Untraceable())
    assert info.value.__cause__ is None or "TraceError" in type(info.value.__cause__).__name__


def test_no_conv_no_trace(monkeypatch):
    def no_trace(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(purgeable_module._Analysis, "__init__", no_trace)
    assert purgeable_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) == []


def test_not_a_module():
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        purgeable_layers([nn.Conv2d(1, 1, 1)])
