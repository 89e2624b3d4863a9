"""sparsify(): which modules it swaps (torchvision resnet18, include/exclude patterns),
torchvision state_dict compatibility both ways, refusing unsupported layers by name and
layers whose parameters a parent's forward reads directly, and checking every argument
before the model changes."""
import re
import warnings

import pytest
import torch
import torchvision
from torch import nn

from sparsekern import export, sparsify
from sparsekern.nn import SparseConv2d, SparseLinear, sparse_modules


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def types_by_name(model):
    return {n: type(m) for n, m in model.named_modules()}


def snapshot(model):
    """Module types and parameter identities: what an aborted sparsify must leave as is."""
    return types_by_name(model), [(n, id(p)) for n, p in model.named_parameters()], list(model.state_dict())


def test_resnet18_swaps_every_conv_and_the_fc():
    model = sparsify(resnet18())
    swapped = dict(sparse_modules(model))
    assert sum(isinstance(m, SparseConv2d) for m in swapped.values()) == 20
    assert [n for n, m in swapped.items() if isinstance(m, SparseLinear)] == ["fc"]
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())


def test_resnet18_exclude_fc():
    model = sparsify(resnet18(), exclude=["fc"])
    assert len(list(sparse_modules(model))) == 20
    assert type(model.fc) is nn.Linear


def test_include_and_exclude_patterns():
    # A pattern naming a container covers everything inside it.
    model = sparsify(resnet18(), include=["layer1"])
    assert sorted(n for n, _ in sparse_modules(model)) == [
        "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"
    ]
    # fnmatch globs, with exclude applied after include.
    model = sparsify(resnet18(), include=["layer*.*.conv*"], exclude=["layer4*"])
    assert len(list(sparse_modules(model))) == 12
    # re.Pattern objects must match the whole name; the 3 downsample convs are "*.downsample.0".
    model = sparsify(resnet18(), include=[re.compile(r"layer\d\.0\.downsample\.\d")], mask="sigmoid")
    assert [n for n, _ in sparse_modules(model)] == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    assert all(m.mask.name == "sigmoid" for _, m in sparse_modules(model))
    # A single pattern need not be wrapped in a list.
    model = sparsify(resnet18(), include="conv1")
    assert [n for n, _ in sparse_modules(model)] == ["conv1"]


def test_options_reach_every_layer_and_parameters_are_shared():
    model = resnet18()
    params = {n: p for n, p in model.named_parameters()}
    sparsify(model, mask="hard_concrete", structured=True, droprate_init=0.3, exclude="fc")
    for n, p in model.named_parameters():
        if not n.endswith("log_alpha"):
            assert p is params[n]  # an optimiser built before sparsify still holds them
    seeds = {m.mask.seed for _, m in sparse_modules(model)}
    assert len(seeds) == 20  # each layer has its own noise stream
    seeded = sparsify(resnet18(), mask="hard_concrete", seed=100)
    assert [m.mask.seed for _, m in sparse_modules(seeded)] == list(range(100, 121))
    assert all(m.mask.structured and m.mask.droprate_init == 0.3 for _, m in sparse_modules(model))


def test_torchvision_state_dict_loads_and_outputs_match_at_init():
    dense = resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    sparse = sparsify(torchvision.models.resnet18(num_classes=10)).eval()
    sparse.load_state_dict(dense.state_dict())  # strict: the mask state stays at init
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x))
    # And back out: an export loads strictly into a plain torchvision model.
    plain = torchvision.models.resnet18(num_classes=10).eval()
    plain.load_state_dict(export(sparse).model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), dense(x))
    # The sparse state_dict is torchvision's plus one mask entry per layer.
    extra = set(sparse.state_dict()) - set(dense.state_dict())
    assert len(extra) == 21 and all(k.endswith(".weight_mask") for k in extra)


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Sequential(nn.Conv1d(4, 4, 1), nn.ConvTranspose2d(4, 4, 2), nn.LazyLinear(3))
        self.fc = nn.Linear(4, 2)


def test_unsupported_layers_are_refused_by_name():
    model = WithUnsupported()
    before = snapshot(model)
    with pytest.raises(TypeError) as err:
        sparsify(model)
    msg = str(err.value)
    for name, cls in [("head.0", "Conv1d"), ("head.1", "ConvTranspose2d"), ("head.2", "LazyLinear")]:
        assert f"'{name}' ({cls})" in msg
    assert "exclude" in msg
    assert snapshot(model) == before
    # Excluding them (or not including them) sparsifies the rest.
    sparsify(model, exclude=["head"])
    assert [n for n, _ in sparse_modules(model)] == ["conv", "fc"]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")  # torch warns on .to(complex)
def test_layers_of_an_unsupported_dtype_are_refused_by_name(dtype):
    """float8 and complex layers: refused with their names before the model changes. They
    failed at the first forward or pruning step instead, with a float8 promotion error or
    the name of an internal op; a complex binary layer even trained until then."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[2].to(dtype)
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"cannot sparsify '2' \({dtype}\).*model.float\(\).*exclude"):
        sparsify(model, mask="hard_concrete")
    assert snapshot(model) == before
    sparsify(model, exclude=["2"])
    assert [n for n, _ in sparse_modules(model)] == ["0"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mask="magnitude"), ValueError, "unknown mask kind"),
        (dict(mask=3), TypeError, "mask kind name"),
        (dict(mask="sigmoid", m0=0.5), TypeError, "takes no option"),
        (dict(mask="relaxed", m0=2.0), ValueError, "m0"),
        (dict(include=["layer9"]), ValueError, "'layer9' matches no module"),
        (dict(exclude=["fc", "classifier"]), ValueError, "'classifier' matches no module"),
        (dict(include=3), TypeError, "include"),
        (dict(include=b"fc"), TypeError, "got bytes"),  # was 'patterns must be str ..., got int'
        (dict(exclude=[nn.Linear]), TypeError, "exclude"),
        (dict(include=["layer1"], exclude=["layer1"]), ValueError, "no nn.Linear or nn.Conv2d selected"),
        (dict(mask="hard_concrete", seed=2**63 - 5), ValueError, "seed"),  # seed + 20 overflows
    ],
)
def test_bad_arguments_leave_the_model_untouched(kwargs, error, match):
    model = resnet18()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        sparsify(model, **kwargs)
    assert snapshot(model) == before


class ReadsChildWeight(nn.Module):
    """A parent whose forward uses its child's parameters itself, as torchvision's Swin
    attention does with qkv and proj: a mask on the child would be bypassed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.nn.functional.linear(x, self.fc.weight, self.fc.bias))


class ReadsOnlyMetadata(ReadsChildWeight):
    def forward(self, x):
        assert x.shape[-1] == self.fc.weight.shape[1] and x.dtype == self.fc.weight.dtype
        return self.out(self.fc(x))


class ReadsNestedPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = ReadsOnlyMetadata()
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.attn(x) + x[..., :2] @ self.attn.out.weight[:, :2].T)


def test_a_layer_whose_parent_reads_its_weight_is_refused():
    model = nn.Sequential(ReadsChildWeight())
    before = snapshot(model)
    with pytest.raises(TypeError) as err:
        sparsify(model)
    msg = str(err.value)
    assert "ReadsChildWeight.forward reads `self.fc.bias` and `self.fc.weight`: '0.fc'" in msg
    assert "bypassed" in msg and "exclude=['*.0.fc']" not in msg  # '0.fc' has one dot: no glob
    assert "'0.out'" not in msg
    assert snapshot(model) == before
    sparsify(model, exclude=["0.fc"])
    assert [n for n, _ in sparse_modules(model)] == ["0.out"]


def test_a_parent_reading_only_metadata_or_calling_the_layer_is_fine():
    model = sparsify(nn.Sequential(ReadsOnlyMetadata()))
    assert [n for n, _ in sparse_modules(model)] == ["0.fc", "0.out"]
    model(torch.randn(3, 4))


def test_an_ancestor_reading_a_nested_path_is_refused():
    model = ReadsNestedPath()
    with pytest.raises(TypeError, match=r"ReadsNestedPath.forward reads `self.attn.out.weight`: 'attn.out'"):
        sparsify(model)
    sparsify(model, exclude=["attn.out"])
    assert [n for n, _ in sparse_modules(model)] == ["attn.fc", "head"]


@pytest.mark.parametrize("layer, use", [(nn.Linear(3, 2), "SparseLinear"), (nn.Conv2d(3, 2, 1), "SparseConv2d"),
                                        (nn.MultiheadAttention(4, 2), "SparseMultiheadAttention")])
def test_a_bare_layer_is_pointed_to_from_dense(layer, use):
    with pytest.raises(TypeError, match=f"cannot replace the model itself.*{use}.from_dense"):
        sparsify(layer)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify(torch.zeros(3))


def test_shared_layer_stays_shared_and_sparse_layers_are_kept():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    sparsify(model, include=["0"])
    assert isinstance(model[0], SparseLinear) and model[0] is model[2]
    first = model[0]
    sparsify(model, mask="relaxed")  # swaps only what is still dense
    assert model[0] is first and model[0].mask.name == "binary" and model[3].mask.name == "relaxed"
    with pytest.raises(ValueError, match="already sparse"):
        sparsify(model)


def test_every_torchvision_classifier_sparsifies_whole():
    # On the meta device (no weights allocated): 65 models in ~7 s. The regnets copy
    # data while initialising, so the two smallest are built for real instead.
    plain = (nn.Linear, nn.Conv2d, nn.MultiheadAttention, nn.TransformerEncoderLayer)
    names = torchvision.models.list_models(module=torchvision.models)
    for name in names:
        if name.startswith("regnet_") and not name.endswith("_400mf"):
            continue
        options = {"weights": None, "num_classes": 10}
        if name in ("googlenet", "inception_v3"):
            options.update(aux_logits=False, init_weights=False)
        with torch.device("cpu" if name.startswith("regnet_") else "meta"):
            model = torchvision.models.get_model(name, **options)
        sparsify(model)
        left = [n for n, m in model.named_modules() if type(m) in plain]
        assert not left, f"{name}: {left[:3]} left dense"
    assert len(names) >= 80  # torchvision 0.29.1 has 80


class ReadsInAHelper(nn.Module):
    """Reads fc's weight in a method sparsify's source check does not look at."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self._mix(x))

    def _mix(self, x):
        return torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)


def test_a_mask_no_forward_applies_is_warned_about_once():
    from sparsekern import methods as M

    model = ReadsInAHelper()
    method = M.DPF(model, sparsity=0.5, ignore_classifier=False)  # head applies its mask
    opt = torch.optim.SGD(method.param_groups(lr=0.1))
    method.step()  # no forward yet: nothing to say
    for expected in (1, 0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            method.step()
        bypassed = [w for w in caught if "did not apply their mask" in str(w.message)]
        assert len(bypassed) == expected
        if expected:
            assert "['fc']" in str(bypassed[0].message) and bypassed[0].filename == __file__


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_a_sparse_model_runs_without_side_effect_warnings(strict):
    # The layers note that their mask ran (for the warning above), except under
    # torch.export, whose strict mode warned about side effects in the forward.
    model = sparsify(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))).eval()
    x = torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, (x,), strict=strict)
    assert not [w for w in caught if "side effect" in str(w.message)]
    torch.testing.assert_close(program.module()(x), model(x))
