"""sparsekern.models: output shapes on digits- and CIFAR-shaped inputs, the architectures'
defining sizes, torchvision models by name, and that purge can trace ours."""
import pytest
import torch
from run_helpers import one_thread  # noqa: F401  (fixture)
from torch import fx, nn

from sparsekern.models import OWN_MODELS, BasicBlock, build_model

SHAPES = [(1, 8, 8), (3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", OWN_MODELS)
def test_output_shape(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    for mode in (model.train, model.eval):
        mode()
        assert model(torch.randn(3, *shape)).shape == (3, 10)
    fx.symbolic_trace(model)  # purge (sparsekern.nn.purge) needs a traceable model
    with torch.device("meta"):  # built without memory, e.g. to materialise later (to_empty)
        meta = build_model(name, shape, 10)
    assert n_params(meta) == n_params(model) and all(p.is_meta for p in meta.parameters())


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_mlp_is_lenet_300_100():
    model = build_model("mlp", (1, 8, 8), 10)
    assert [(n, tuple(m.weight.shape)) for n, m in model.named_children() if isinstance(m, nn.Linear)] == [
        ("fc1", (300, 64)), ("fc2", (100, 300)), ("fc3", (10, 100))]


def test_resnet20_layout():
    model = build_model("resnet20", (3, 32, 32), 10)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(blocks) == 9 and len(convs) == 19  # 19 3x3 convs + fc = 20 layers
    shortcuts = [b.shortcut for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(shortcuts) == 2 and all(isinstance(s[0], nn.Conv2d) and s[0].kernel_size == (1, 1) for s in shortcuts)
    assert n_params(model) == 272_474  # 269,722 (option A, He et al.) + 2,752 for the 1x1 shortcuts
    x = torch.randn(2, 3, 32, 32)
    assert model.layer3(model.layer2(model.layer1(model.conv1(x)))).shape == (2, 64, 8, 8)


def test_vgg11_and_resnet18_cifar_variants():
    vgg = build_model("vgg11", (3, 32, 32), 10)
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.modules()) == 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 8
    assert vgg.classifier.in_features == 512
    r18 = build_model("resnet18", (3, 32, 32), 10)
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1) and isinstance(r18.maxpool, nn.Identity)
    assert r18.fc.out_features == 10


def test_torchvision_model_by_name_adapted_to_the_input():
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", (1, 8, 8), 7)
    assert model.features[0][0].in_channels == 1
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    tv = build_model("torchvision:resnet18", (3, 32, 32), 10)
    assert tv.conv1.kernel_size == (7, 7)  # the original stem, unlike our CIFAR resnet18


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="unknown --model 'nope'"):
        build_model("nope", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="--model vit_b_16"):
        build_model("vit_b_16", (1, 8, 8), 10)  # 8x8 is not a multiple of the 16x16 patch
