"""The structured modes' default layers: DPF(mode="structured") and ConstrainedL0 /
PenalizedL0 with structured=True take the convs purge can slice (purgeable_layers) and
the Linear layers they took before; an explicit include, exclude and ignore_classifier
work as given; unstructured modes are unchanged; an untraceable model falls back with a
warning. The README's ResNet-20 runs: DPF pruned the stem and both shortcuts whole and
ended at 10% accuracy."""
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from run_helpers import one_thread  # noqa: F401  (fixture)
from torch import nn

from sparsekern import cli
from sparsekern.methods import DPF, ConstrainedL0, PenalizedL0
from sparsekern.models import build_model
from sparsekern.nn import GatedBatchNorm2d, purgeable_layers, sparse_modules

CONV1 = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
STRUCTURED = {
    "dpf": lambda m, **kw: DPF(m, 0.5, mode="structured", **kw),
    "l0": lambda m, **kw: ConstrainedL0(m, 0.5, structured=True, **kw),
    "penalized": lambda m, **kw: PenalizedL0(m, 1e-4, structured=True, **kw),
}


def resnet20(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", (3, 8, 8), 10)


def names(method):
    return [n for n, _ in method.layers]


@pytest.mark.parametrize("kind, expected", [
    ("dpf", CONV1),              # the classifier stays dense (ignore_classifier)
    ("l0", CONV1 + ["fc"]),      # a Linear's gates are on its inputs: kept as before
    ("penalized", CONV1 + ["fc"]),
])
def test_resnet20_default_is_the_blocks_first_convs(kind, expected):
    model = resnet20()
    method = STRUCTURED[kind](model)
    assert names(method) == expected
    # The stem, every conv2 and the shortcuts stay plain nn.Conv2d.
    plain = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    assert plain == [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in CONV1]
    assert {"conv1", "layer1.0.conv2", "layer2.0.shortcut.0", "layer3.0.shortcut.0"} <= set(plain)


def test_dpf_structured_sparsity_is_over_the_selected_layers():
    model = resnet20()
    method = DPF(model, 0.5, mode="structured")
    total = sum(layer.weight.numel() for _, layer in method.layers)
    assert total == sum(model.get_submodule(n).weight.numel() for n in CONV1) == 122_112
    pruned = sum(int((~layer.weight_mask).sum()) for _, layer in method.layers)
    channel = max(layer.weight[0].numel() for _, layer in method.layers)
    assert 0.5 * total - channel < pruned <= 0.5 * total
    assert method.history[-1]["density"] == pytest.approx(1 - pruned / total)
    assert set(method.history[-1]["layers"]) == set(CONV1)
    assert model.conv1.weight.ne(0).all()  # the stem: never pruned


def test_l0_structured_constraint_and_density_are_over_the_selected_layers():
    model = resnet20()
    method = ConstrainedL0(model, 0.5, structured=True)
    assert method._group_numel == [122_112 + 640]
    density = method.density()
    assert set(density["layers"]) == set(density["expected"]["layers"]) == set(CONV1 + ["fc"])
    # Only the gated convs' BatchNorms are gated.
    assert [n for n, m in model.named_modules() if isinstance(m, GatedBatchNorm2d)] == [
        n.replace("conv1", "bn1") for n in CONV1]


def test_explicit_include_is_honoured():
    for kind in STRUCTURED:
        model = resnet20()
        method = STRUCTURED[kind](model, include=["conv1", "layer1"])
        want = ["conv1", *[f"layer1.{b}.conv{i}" for b in range(3) for i in (1, 2)]]
        assert names(method) == want, kind


def test_exclude_and_ignore_classifier_still_apply():
    assert names(ConstrainedL0(resnet20(), 0.5, structured=True, exclude=["layer3", "fc"])) == CONV1[:6]
    assert names(DPF(resnet20(), 0.5, mode="structured", ignore_classifier=False)) == CONV1 + ["fc"]
    assert names(DPF(resnet20(), 0.5, mode="structured", exclude="layer1")) == CONV1[3:]


def test_a_per_layer_target_gates_the_layer_it_names():
    # Named by the user: gated even though purge cannot slice it (the stem).
    method = ConstrainedL0(resnet20(), {"conv1": 0.5, "layer2.0.conv1": 0.3}, structured=True)
    assert names(method) == ["conv1", *CONV1, "fc"]
    assert method.group_names == ["conv1", "layer2.0.conv1"]


@pytest.mark.parametrize("make, count", [
    (lambda m: DPF(m, 0.5), 21),                          # global: every conv, the classifier dense
    (lambda m: DPF(m, 0.5, mode="layerwise"), 21),
    (lambda m: ConstrainedL0(m, 0.5), 22),                # unstructured gates: every layer
    (lambda m: PenalizedL0(m, 1e-4), 22),
], ids=["dpf global", "dpf layerwise", "l0 unstructured", "penalized unstructured"])
def test_unstructured_modes_are_unchanged(make, count):
    model = resnet20()
    assert len(names(make(model))) == count


def test_torchvision_resnet18_and_a_linear_only_model():
    model = torchvision.models.resnet18(num_classes=10)
    method = ConstrainedL0(model, 0.5, structured=True)
    assert names(method) == [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)] + ["fc"]
    # No Conv2d: no trace, every Linear as before.
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert names(PenalizedL0(mlp, 1e-4, structured=True)) == ["0", "2"]


def test_a_vit_keeps_every_linear_and_its_attention_heads():
    # The patch embedding's conv is reshaped into tokens (not purgeable): it goes, and
    # every projection and MLP Linear (the out_proj with one gate per head) stays.
    def make():
        return torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                                                    hidden_dim=8, mlp_dim=16, num_classes=3)

    old = names(ConstrainedL0(make(), 0.5, structured=True, include="*"))
    model = make()
    method = ConstrainedL0(model, 0.5, structured=True)
    assert "conv_proj" in old and names(method) == [n for n in old if n != "conv_proj"]
    out_proj = model.encoder.layers[0].self_attention.out_proj
    assert out_proj.weight_log_alpha.numel() == 2  # a gate per head


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.conv(x)  # the stem is not purgeable
        if x.mean() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("kind", list(STRUCTURED))
def test_an_untraceable_model_falls_back_to_every_layer_with_one_warning(kind):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        method = STRUCTURED[kind](Untraceable())
    messages = [str(w.message) for w in rec if "structured default" in str(w.message)]
    assert len(messages) == 1, messages
    assert re.search(r"torch.fx cannot trace Untraceable \(TraceError: .*every Conv2d and Linear is selected.*"
                     r"purge must keep.*Pass `include`", messages[0])
    assert rec[0].filename == __file__  # points at the caller
    assert names(method) == (["stem", "conv"] if kind == "dpf" else ["stem", "conv", "fc"])


def test_an_untraceable_model_with_include_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names(DPF(Untraceable(), 0.5, mode="structured", include="conv")) == ["conv"]


class NothingToPurge(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        return x + self.b(x)


def test_no_purgeable_layer_raises_naming_include():
    model = NothingToPurge()
    with pytest.raises(ValueError, match=r"none of the layers \['a', 'b'\] can be purged.*pass `include`"):
        DPF(model, 0.5, mode="structured", ignore_classifier=False)
    assert not list(sparse_modules(model))  # raised before anything changed
    assert names(DPF(model, 0.5, mode="structured", ignore_classifier=False, include="*")) == ["a", "b"]


def test_bad_exclude_raises_naming_it():
    with pytest.raises(ValueError, match="`exclude` pattern 'nope' matches no module"):
        ConstrainedL0(resnet20(), 0.5, structured=True, exclude="nope")


@torch.no_grad()
def test_dpf_structured_exports_what_it_pruned_and_the_network_still_computes():
    # Before, DPF's global ranking pruned the stem's 16 filters and both shortcuts whole
    # (kaiming fan-out gives them the smallest norms): every input gave the same logits.
    model = resnet20()
    method = DPF(model, 0.5, mode="structured")
    assert type(model.conv1) is nn.Conv2d
    model.eval()
    logits = model(torch.randn(4, 3, 8, 8))
    assert (logits - logits[0]).abs().max() > 1e-4
    exported = method.export(purge=True, example_input=(1, 3, 8, 8))
    # Every pruned channel is a block's conv1: removed, or (plain BatchNorm shift into a
    # padded conv2) kept, never a stem, conv2 or shortcut channel.
    stats = exported.stats
    assert set(stats["removed_channels"]) | set(stats["kept_zero_channels"]) <= set(CONV1)
    assert sum(stats["removed_channels"].values()) > 0


def test_cli_structured_dpf_report_shows_which_layers_are_pruned(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "dpf", "--mode", "structured", "--sparsity", "0.5", "--model", "resnet20",
                     "--data", "digits", "--epochs", "1", "--max-batches", "2", "--batch-size", "16", "--threads", "1",
                     "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    kinds = {row["name"]: row["kind"] for row in report["density"]["layers"]}
    assert [n for n, k in kinds.items() if k != "dense"] == CONV1
    assert kinds["conv1"] == kinds["layer2.0.shortcut.0"] == kinds["layer1.0.conv2"] == "dense"
    table = (out / "report.md").read_text()
    assert "| layer1.0.conv1 | straight_through |" in table and "| layer1.0.conv2 | dense |" in table


def test_default_selection_trains():
    model = resnet20()
    method = ConstrainedL0(model, 0.5, structured=True)
    opt = torch.optim.Adam(method.param_groups(lr=1e-3))
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])) + method.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
    assert purgeable_layers(model) == CONV1
