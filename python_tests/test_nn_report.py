"""report(): per-layer and global density for every mask kind, hard-concrete expected and
eval-gate density, the dict form and the table."""
import json
import math

import pytest
import torch
from torch import nn

from sparsekern import report, sparsify
from sparsekern.nn import SparsityReport


def net():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))


@torch.no_grad()
def test_binary_counts():
    model = sparsify(net(), mask="binary")
    model[0].weight_mask[:2] = False  # 36 of 72 conv weights pruned
    model[3].weight_mask[0, 0] = False
    r = report(model)
    d = r.to_dict()
    assert [row["name"] for row in d["layers"]] == ["0", "3"]
    conv, fc = d["layers"]
    assert conv == {"name": "0", "kind": "binary", "shape": (4, 2, 3, 3), "numel": 72, "nonzero": 36, "density": 0.5}
    assert (fc["numel"], fc["nonzero"]) == (12, 11)
    assert d["global"] == {"numel": 84, "nonzero": 47, "density": 47 / 84}
    json.dumps(d)  # plain types only


@pytest.mark.parametrize(
    "kind, options, nonzero_of",
    [
        ("straight_through", {}, lambda m: int(m.weight_mask.sum())),
        ("sigmoid", {}, lambda m: int((m.weight_score > 0).sum())),  # CS's ticket: s > 0
        ("relaxed", {}, lambda m: int((m.weight_mask != 0).sum())),
    ],
)
@torch.no_grad()
def test_support_of_each_kind(kind, options, nonzero_of):
    torch.manual_seed(0)
    model = sparsify(net(), mask=kind, **options)
    for m in (model[0], model[3]):
        (name,) = m.mask.state_names
        t = getattr(m, name)
        if t.dtype == torch.bool:
            t.copy_(torch.rand(t.shape) < 0.5)
        else:  # scores of both signs; relaxed m clamped to [0, 1] with some exact zeros
            t.copy_(torch.randn(t.shape).clamp(max=1.0, min=0.0 if kind == "relaxed" else None))
    rows = report(model).layers
    assert [r["nonzero"] for r in rows] == [nonzero_of(model[0]), nonzero_of(model[3])]
    assert all(r["kind"] == kind and "expected_density" not in r for r in rows)


@pytest.mark.parametrize("structured", [False, True])
@torch.no_grad()
def test_hard_concrete_expected_and_eval_density(structured):
    torch.manual_seed(0)
    model = sparsify(net(), mask="hard_concrete", structured=structured)
    for m in (model[0], model[3]):
        m.weight_log_alpha.copy_(3 * torch.randn(m.weight_log_alpha.shape))
    r = report(model)
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    total_expected = 0.0
    for row, m in zip(r.layers, (model[0], model[3])):
        la = m.weight_log_alpha.expand(m.weight.shape)  # every weight with its group's gate
        p_nonzero = torch.sigmoid(la - beta * math.log(-gamma / zeta))
        assert row["expected_density"] == pytest.approx(float(p_nonzero.mean()), rel=1e-5)
        z_eval = (torch.sigmoid(la / beta) * (zeta - gamma) + gamma).clamp(0, 1)
        assert row["nonzero"] == int((z_eval > 0).sum()) and row["density"] == row["nonzero"] / row["numel"]
        total_expected += float(p_nonzero.sum())
    assert r.totals["expected_density"] == pytest.approx(total_expected / 84, rel=1e-5)


def test_table():
    model = sparsify(net(), mask="hard_concrete", include=["0"])
    sparsify(model, mask="binary")
    r = report(model)
    assert isinstance(r, SparsityReport) and str(r) == r.table()
    lines = r.table().splitlines()
    assert lines[0].split() == ["layer", "kind", "shape", "numel", "nonzero", "density", "E[density]"]
    assert lines[2].split()[:5] == ["0", "hard_concrete", "4x2x3x3", "72", "72"]
    assert lines[3].split() == ["3", "binary", "3x4", "12", "12", "1.0000"]  # no gates, no E[density]
    assert lines[-1].split()[:3] == ["total", "84", "84"]
    assert "E[density]" not in report(sparsify(net())).table()


def test_model_without_sparse_layers():
    r = report(net())
    assert r.layers == [] and r.totals == {"numel": 0, "nonzero": 0, "density": 1.0}
    with pytest.raises(TypeError, match="nn.Module"):
        report("net")
