"""export(): plain modules with the masks baked in, equal to the sparse model in eval mode;
purge: structured zero channels physically removed with the outputs unchanged, on a
Conv→BN→ReLU→Conv→BN→Linear net, an MLP and torchvision resnet18 (residuals intact)."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn

from sparsekern import export, sparsify
from sparsekern.nn import SparseConv2d, SparseLinear, count_macs, count_params, purge_channels, sparse_modules

TOL = dict(rtol=1e-5, atol=1e-5)
KIND_OPTIONS = [
    ("binary", {}),
    ("straight_through", {}),
    ("sigmoid", {"beta": 3.0}),
    ("relaxed", {}),
    ("hard_concrete", {}),
    ("hard_concrete", {"structured": True}),
]


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )


def mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


@torch.no_grad()
def randomize(model):
    """Random mask state and BatchNorm statistics, so no output is trivially equal."""
    for _, m in sparse_modules(model):
        (name,) = m.mask.state_names
        t = getattr(m, name)
        t.copy_(torch.rand(t.shape) < 0.7 if t.dtype == torch.bool else 2 * torch.randn(t.shape).abs() - 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_()
            m.bias.normal_()
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def assert_same_eval_output(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), **TOL)


@pytest.mark.parametrize("kind, options", KIND_OPTIONS)
def test_export_equals_masked_model(kind, options):
    torch.manual_seed(0)
    model = randomize(sparsify(convnet(), mask=kind, **options)).eval()
    state = copy.deepcopy(model.state_dict())
    exported, stats = export(model, example_input=(2, 3, 8, 8))
    assert not list(sparse_modules(exported))
    assert all(type(m) is not SparseConv2d and type(m) is not SparseLinear for m in exported.modules())
    assert set(exported.state_dict()) == set(convnet().state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert_same_eval_output(exported, model, x)
    with torch.inference_mode():  # both modes run in inference mode; eval's is the export's
        copy.deepcopy(model).train()(x)  # a copy made here: inference tensors (no version counter)
        torch.testing.assert_close(model.eval()(x), exported(x), **TOL)
    # The source model is not changed.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert isinstance(model[0], SparseConv2d)
    assert stats["params_before"] == stats["params_after"] == n_params(convnet())
    assert stats["macs_before"] == stats["macs_after"] > 0
    assert stats["removed_channels"] == {} and stats["kept_zero_channels"] == {}


def test_export_of_a_single_sparse_layer():
    layer = SparseLinear(3, 2, mask="relaxed")
    exported, _ = export(layer)
    assert type(exported) is nn.Linear
    torch.testing.assert_close(exported.weight, layer.weight.detach() * 0.5)


def test_count_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    macs = count_macs(model, torch.zeros(2, 3, 8, 8))
    assert macs == 2 * (8 * 8 * 8 * 3 * 9 + 8 * 6 * 6 * 2 * 9 + 5 * 288)


@torch.no_grad()
def test_purge_conv_bn_linear():
    torch.manual_seed(0)
    model = randomize(sparsify(convnet(), mask="binary"))
    for _, m in sparse_modules(model):
        m.weight_mask.fill_(True)
    conv0, bn0, conv3 = model[0], model[1], model[3]
    conv0.weight_mask[[1, 3, 5]] = False
    # Dead channels carry the conv bias through BN: (b − μ)/σ·γ + β = β when μ = b.
    bn0.running_mean[[1, 3, 5]] = conv0.bias[[1, 3, 5]]
    bn0.bias[[1, 3, 5]] = torch.tensor([-0.5, -0.1, 0.7])  # relu: 0, 0 and a constant 0.7
    conv3.weight_mask[[0, 2]] = False  # constants again, reaching the Linear: folded
    x = torch.randn(2, 3, 8, 8)

    purged, stats = export(model, purge=True, example_input=x)
    assert_same_eval_output(purged, model, x)
    assert stats["removed_channels"] == {"0": 2, "3": 2}
    # Channel 5's constant 0.7 reaches conv3 with padding=1: the borders see zeros instead,
    # so it cannot be folded and stays.
    assert stats["kept_zero_channels"] == {"0": 1}
    assert (purged[0].out_channels, purged[1].num_features, purged[3].in_channels) == (6, 6, 6)
    assert (purged[3].out_channels, purged[4].running_mean.shape[0], purged[8].in_features) == (4, 4, 4)
    assert stats["params_after"] == n_params(purged) < stats["params_before"]
    assert stats["macs_after"] < stats["macs_before"]


@torch.no_grad()
def test_bfloat16_purge_does_not_warn_of_a_bypassed_mask():
    """A bfloat16 purge folds dead channels' constants into the next layer and rounds
    differently from the masked model, by up to ~1 ulp of the output: the check for a
    bypassed mask (a fixed 1e-3 of the output's scale) warned here, on 13 of 20 seeds."""
    torch.manual_seed(0)
    model = randomize(sparsify(convnet(), mask="binary"))
    for _, m in sparse_modules(model):
        m.weight_mask.fill_(True)
    conv0, bn0 = model[0], model[1]
    conv0.weight_mask[[1, 3, 5]] = False
    bn0.running_mean[[1, 3, 5]] = conv0.bias[[1, 3, 5]]
    bn0.bias[[1, 3, 5]] = torch.tensor([-0.5, -0.1, 0.7])
    model[3].weight_mask[[0, 2]] = False
    model.to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        purged, stats = export(model, purge=True, example_input=x)
    assert stats["removed_channels"] == {"0": 2, "3": 2}
    assert {p.dtype for p in purged.parameters()} == {torch.bfloat16}
    want = model.eval()(x)
    assert float((purged.eval()(x) - want).abs().max()) <= 4 * torch.finfo(torch.bfloat16).eps * float(want.abs().max())


@torch.no_grad()
def test_purge_folds_a_constant_channel_into_an_unpadded_conv():
    model = sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1, bias=False)), mask="binary")
    model[0].weight_mask[2] = False
    model[1].bias[2] = 3.0  # a positive constant after BN and ReLU
    model[1].running_mean[2] = model[0].bias[2]
    x = torch.randn(2, 3, 6, 6)
    purged, stats = export(model, purge=True)
    assert stats["removed_channels"] == {"0": 1}
    assert purged[3].bias is not None  # created for the fold
    assert_same_eval_output(purged, model, x)


@pytest.mark.parametrize("kind", ["hard_concrete_structured", "binary_rows"])
@torch.no_grad()
def test_purge_mlp(kind):
    torch.manual_seed(0)
    if kind == "binary_rows":
        model = sparsify(mlp(), mask="binary")
        model[0].weight_mask[[0, 5, 7]] = False  # dead rows whose bias relu passes on: folded
        model[4].weight_mask[:, [1, 2]] = False  # layer 2's outputs 1 and 2: nobody reads them
        expected = {"0": 3, "2": 2}
    else:
        model = sparsify(mlp(), mask="hard_concrete", structured=True)  # gates on input neurons
        model[0].weight_log_alpha.fill_(5.0)
        model[2].weight_log_alpha.fill_(5.0)
        model[4].weight_log_alpha.fill_(5.0)
        model[2].weight_log_alpha[0, [0, 5, 7]] = -20.0  # median gate 0: layer 0's outputs unused
        model[4].weight_log_alpha[0, [1, 2]] = -20.0
        model[0].weight_log_alpha[0, 4] = -20.0  # a model input: not removable, still exact
        expected = {"0": 3, "2": 2}
    x = torch.randn(4, 10)
    purged, stats = export(model, purge=True)
    assert stats["removed_channels"] == expected
    assert (purged[0].out_features, purged[2].in_features, purged[2].out_features, purged[4].in_features) == (13, 13, 10, 10)
    assert purged[0].in_features == 10
    assert_same_eval_output(purged, model, x)
    assert n_params(purged) < n_params(mlp())


@torch.no_grad()
def test_purge_resnet18_keeps_residual_shapes():
    torch.manual_seed(0)
    model = randomize(sparsify(torchvision.models.resnet18(num_classes=10), mask="binary"))
    for _, m in sparse_modules(model):
        m.weight_mask.fill_(True)
    inner = {"layer1.0": list(range(10)), "layer2.1": [3, 4], "layer4.0": [0, 100, 511]}
    for block, channels in inner.items():
        b = model.get_submodule(block)
        b.conv1.weight_mask[channels] = False
        b.bn1.running_mean[channels] = 0.0
        b.bn1.bias[channels] = -1.0  # BN(0) < 0, killed by the ReLU
    # Zero rows at a block output and a downsample: tied to the shortcut, never removed.
    model.layer1[1].conv2.weight_mask[[0, 1]] = False
    model.layer2[0].downsample[0].weight_mask[5] = False
    x = torch.randn(2, 3, 32, 32)

    purged, stats = export(model, purge=True, example_input=x)
    assert stats["removed_channels"] == {"layer1.0.conv1": 10, "layer2.1.conv1": 2, "layer4.0.conv1": 3}
    # The zero rows that stay are counted too: they reach the residual add (the stats
    # said nothing of them, as if purge had found no zero channel there).
    assert stats["kept_zero_channels"] == {"layer1.1.conv2": 2, "layer2.0.downsample.0": 1}
    assert purged.layer1[0].conv1.out_channels == 54 and purged.layer1[0].bn1.num_features == 54
    assert purged.layer1[0].conv2.in_channels == 54 and purged.layer1[0].conv2.out_channels == 64
    assert purged.layer1[1].conv2.out_channels == 64 and purged.layer2[0].downsample[0].out_channels == 128
    assert_same_eval_output(purged, model, x)
    # conv1 rows (in × 3 × 3 each) and conv2 input slices (out × 3 × 3 each), BN γ and β.
    removed = 10 * (64 + 64) * 9 + 2 * (128 + 128) * 9 + 3 * (256 + 512) * 9 + 2 * (10 + 2 + 3)
    assert stats["params_before"] - stats["params_after"] == removed
    assert stats["macs_after"] < stats["macs_before"]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.fc(x)
        return x


def test_purge_needs_a_traceable_model():
    model = sparsify(Untraceable())
    with pytest.raises(ValueError, match="purge=False"):
        export(model, purge=True)
    assert type(export(model).model.fc) is nn.Linear


def test_bad_export_arguments():
    model = sparsify(mlp())
    with pytest.raises(TypeError, match="model"):
        export("model")
    with pytest.raises(TypeError, match="purge"):
        export(model, purge="yes")
    with pytest.raises(TypeError, match="example_input"):
        export(model, example_input="2x10")
    with pytest.raises(ValueError, match="example_input"):  # torch.zeros' RuntimeError before
        export(model, example_input=(1, -10))
    with pytest.raises(ValueError, match=r"`example_input` of shape \(1, 5\) does not fit"):  # torch's matmul error
        export(model, example_input=(1, 5))


def test_example_input_missing_batch_dim_names_it():
    # A conv takes an unbatched (C, H, W) input, the BatchNorm after it then raises a
    # ValueError ("expected 4D input (got 3D input)"), which export passed on unwrapped:
    # it did not say which argument was wrong.
    model = sparsify(convnet())
    with pytest.raises(ValueError, match=r"`example_input` of shape \(3, 8, 8\) does not fit"):
        export(model, purge=True, example_input=(3, 8, 8))


def test_purge_channels_wants_a_plain_model():
    # A sparse model failed in the fx trace ("purge needs a model torch.fx can trace").
    model = sparsify(mlp(), mask="hard_concrete", structured=True)
    with pytest.raises(ValueError, match=r"still sparse layers: use sparsekern.export\(model, purge=True\)"):
        purge_channels(model, torch.zeros(1, 10))
    with pytest.raises(TypeError, match="example"):
        purge_channels(export(model).model, (1, 10))
    with pytest.raises(TypeError, match="model"):
        purge_channels(None)


def test_bad_count_arguments():
    # Public in sparsekern.nn: None and a shape failed inside (AttributeError, torch's linear()).
    model = mlp()
    with pytest.raises(TypeError, match="model"):
        count_params(None)
    with pytest.raises(TypeError, match="model"):
        count_macs(None, torch.zeros(1, 10))
    with pytest.raises(TypeError, match="example"):
        count_macs(model, (1, 10))


@torch.no_grad()
def test_purge_structured_hard_concrete_convnet():
    torch.manual_seed(0)
    model = randomize(sparsify(convnet(), mask="hard_concrete", structured=True, exclude="8"))
    model[0].weight_log_alpha.fill_(5.0)
    model[3].weight_log_alpha.fill_(5.0)
    model[0].weight_log_alpha[[2, 6]] = -20.0  # median gate 0: weights and bias gated off
    model[1].running_mean[[2, 6]] = 0.0
    model[1].bias[[2, 6]] = -0.3  # BN(0) = β < 0: the ReLU zeroes the channel
    model[3].weight_log_alpha[1] = -20.0  # reaches the Linear as a constant: folded
    x = torch.randn(2, 3, 8, 8)
    purged, stats = export(model, purge=True, example_input=x)
    assert stats["removed_channels"] == {"0": 2, "3": 1}
    assert (purged[0].out_channels, purged[3].in_channels, purged[3].out_channels, purged[8].in_features) == (6, 6, 5, 5)
    assert_same_eval_output(purged, model, x)


def test_exported_program_runs_where_sparsekern_is_not_installed(tmp_path):
    # The torch.export program of a purged model is plain aten: loading and running it
    # imports nothing of sparsekern.
    torch.manual_seed(0)
    model = randomize(sparsify(convnet(), mask="hard_concrete", structured=True)).eval()
    small = export(model, purge=True, example_input=(2, 3, 8, 8)).model.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(small, (x,)), tmp_path / "model.pt2")
    with torch.no_grad():
        torch.save({"x": x, "y": small(x)}, tmp_path / "io.pt")
    code = ("import sys; sys.modules['sparsekern'] = None; import torch; "
            "program = torch.export.load(sys.argv[1]); io = torch.load(sys.argv[2]); "
            "torch.testing.assert_close(program.module()(io['x']), io['y'], rtol=1e-5, atol=1e-5); "
            "assert not any(m.startswith('sparsekern') for m in sys.modules if sys.modules[m] is not None)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt2"), str(tmp_path / "io.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
