"""The models `sparsekern train` builds, sized to the dataset's input shape and classes.

mlp        LeNet-300-100: flatten → 300 → 100 → classes (64-300-100-10 on digits).
lenet5     LeNet-5: conv 6@5x5 → pool → conv 16@5x5 → pool → 120 → 84 → classes. On 32x32
           inputs the classic layout (no padding); smaller inputs get padding 2 where a
           5x5 conv would otherwise eat the map (28x28: conv1, as LeCun's 32x32 framing;
           8x8 digits: both convs).
resnet20   CIFAR ResNet-20 (He et al. 2016, §4.2): 3x3 conv 16 → 3 stages of 3 basic
           blocks (16, 32, 64 channels, stride 2 between stages) → global average pool →
           linear. Shortcuts are option B (1x1 conv + BN where the shape changes,
           identity elsewhere) rather than option A's zero-padded identity: a 1x1 conv is
           a plain module purge can slice, whereas option A's pad-and-subsample lambda is
           opaque to torch.fx. It adds 2,752 parameters (1.0%).
vgg11      CIFAR VGG-11 with BatchNorm (configuration "A" of Simonyan & Zisserman, BN
           after every conv, one linear classifier on the 512 final features, as in the
           CIFAR variants of open_lth / pytorch-cifar). A 2x2 max-pool that would shrink
           the map below 1x1 (8x8 digits) is left out.
resnet18   torchvision's resnet18 adapted to CIFAR: 3x3 stride-1 stem, no max-pool.
NAME       any other torchvision classification model (torchvision.models.list_models;
           `torchvision:NAME` for the originals of resnet18 / vgg11), randomly
           initialised, num_classes set to the dataset's; its first 3-channel conv is
           rebuilt for the dataset's channel count, and vision transformers get the
           dataset's image_size. A model that cannot run on the input shape is refused.

All use modules (nn.ReLU, nn.Flatten, ...) rather than functional calls where it matters
for sparsekern.nn.purge, which traces them with torch.fx.
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict

import torch
from torch import nn

OWN_MODELS = ("mlp", "lenet5", "resnet20", "vgg11", "resnet18")
TORCHVISION_PREFIX = "torchvision:"


class MLP(nn.Sequential):
    """flatten, fc1, relu1, fc2, relu2, fc3 (named, so reports say which layer)."""

    def __init__(self, input_shape, num_classes: int, hidden=(300, 100)):
        layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
        width = math.prod(input_shape)  # not a tensor: under `with torch.device("meta")` it had no value
        for i, h in enumerate(hidden, 1):
            layers[f"fc{i}"], layers[f"relu{i}"] = nn.Linear(width, h), nn.ReLU(inplace=True)
            width = h
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(width, num_classes)
        super().__init__(OrderedDict(layers))


class LeNet5(nn.Module):
    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        c, h, _ = input_shape
        pad1 = 0 if h >= 32 else 2
        h = (h + 2 * pad1 - 4) // 2
        pad2 = 0 if h >= 10 else 2
        h = (h + 2 * pad2 - 4) // 2
        if h < 1:
            raise ValueError(f"lenet5 needs inputs of at least 4x4, got {tuple(input_shape)}")
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * h * h, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:  # option B
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, input_shape, num_classes: int, blocks_per_stage: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        c, h, _ = input_shape
        layers: list[nn.Module] = []
        for v in VGG11_CFG:
            if v == "M":
                if h >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h //= 2
                continue
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c * h * h, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


def cifar_resnet18(input_shape, num_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _replace_stem(model: nn.Module, channels: int) -> None:
    """Rebuilds the first Conv2d that reads 3 channels (the stem, in every torchvision
    classifier) for `channels` inputs, keeping its name so the state_dict keys stay."""
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and m.in_channels == 3:
            new = nn.Conv2d(channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            m.bias is not None, m.padding_mode)
            model.set_submodule(name, new)
            return
    raise ValueError("found no 3-channel Conv2d stem to adapt to the dataset's channels")


def torchvision_model(name: str, input_shape, num_classes: int) -> nn.Module:
    import torchvision

    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)  # one output tensor, not a namedtuple
    if name.startswith("vit_"):
        kwargs["image_size"] = input_shape[1]
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"--model {name}: torchvision cannot build it for inputs {tuple(input_shape)}: {e}") from e
    if input_shape[0] != 3:
        _replace_stem(model, input_shape[0])
    return model


def build_model(name: str, input_shape, num_classes: int) -> nn.Module:
    """The model `name` for inputs [C, H, W] = input_shape and `num_classes` outputs,
    checked by one forward pass in eval mode (so an unusable combination fails before
    training starts)."""
    if not isinstance(name, str):
        raise TypeError(f"`model` must be a str, got {type(name).__name__}")
    own = {"mlp": MLP, "lenet5": LeNet5, "resnet20": ResNet20, "vgg11": VGG11, "resnet18": cifar_resnet18}
    if name in own:
        model = own[name](tuple(input_shape), num_classes)
    else:
        tv = name[len(TORCHVISION_PREFIX):] if name.startswith(TORCHVISION_PREFIX) else name
        if tv not in torchvision_names():
            raise ValueError(
                f"unknown --model {name!r}: expected one of {list(OWN_MODELS)} or a torchvision "
                f"classification model (torchvision.models.list_models(), e.g. mobilenet_v2)"
            )
        model = torchvision_model(tv, input_shape, num_classes)
    check_runs(model, name, input_shape, num_classes)
    return model


@torch.no_grad()
def check_runs(model: nn.Module, name: str, input_shape, num_classes: int) -> None:
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *input_shape))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ValueError(f"--model {name} cannot run on inputs of shape {tuple(input_shape)}: {e}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        raise ValueError(f"--model {name} returned {type(out).__name__} "
                         f"{getattr(out, 'shape', '')}, expected logits of shape (N, {num_classes})")


def model_help() -> str:
    return inspect.cleandoc(__doc__.split("\n\n", 1)[1].split("\n\nAll use")[0])
