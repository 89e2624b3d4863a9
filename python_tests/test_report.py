"""The run report: nonzero-MAC counting, a structured L0 run's purged export (fewer params
and MACs, same outputs), report.json / report.md contents and the PNG plots."""
import json

import pytest
import torch
from run_helpers import one_thread  # noqa: F401  (fixture)
from torch import nn

from sparsekern import plots, train
from sparsekern.run_report import layer_rows, markdown, removed_text, nonzero_macs, nonzero_params, save_exported, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_nonzero_macs_counts_only_nonzero_weights():
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    fc = nn.Linear(12, 4)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(2), nn.Flatten(), fc)
    with torch.no_grad():
        conv.weight[0] = 0          # 18 of 54 weights zero
        conv.weight[1, 0, 0, 0] = 0  # and one more
        fc.weight[:, :6] = 0         # half of the linear weights
    x = torch.randn(1, 2, 5, 5)
    # conv: 25 output positions × 35 nonzero weights; linear: 1 row × 24 nonzero
    assert nonzero_macs(model, x) == 25 * 35 + 24
    assert nonzero_params(model) == 35 + 24 + 4


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory):
    """A structured L0 run whose gates are then set so half of fc2's input neurons (fc1's
    outputs) are closed: the export drops those 150 neurons of fc1."""
    out = tmp_path_factory.mktemp("run") / "l0"
    cfg = train.RunConfig("l0", "mlp", density=0.5, epochs=1, max_batches=3, batch_size=32,
                          method_options={"structured": True})
    trainer = train.Trainer(cfg, out, log=lambda s: None)
    out.mkdir()
    trainer.fit()
    with torch.no_grad():
        trainer.model.fc2.weight_log_alpha[0, :150] = -10.0  # median gate 0
        trainer.model.fc2.weight_log_alpha[0, 150:] = 10.0
    trainer.command = ["train", "--method", "l0"]
    report = write_report(trainer)
    return trainer, report, out


def test_structured_export_is_purged_and_equal(structured_run):
    trainer, report, out = structured_run
    size = report["model_size"]
    assert size["purged"] is True and size["removed_channels"] == {"fc1": 150}
    assert size["dense"] == {"params": 50_610, "macs": 50_200}
    # fc1 loses 150 of 300 output neurons (150·64 weights + 150 biases), fc2 150 of 300 inputs
    assert size["exported"]["params"] == 50_610 - 150 * 64 - 150 - 150 * 100
    assert size["exported"]["macs"] == 50_200 - 150 * 64 - 150 * 100
    assert report["final"]["exported_max_abs_logit_diff"] < 1e-5
    assert report["final"]["exported_test_accuracy"] == report["final"]["test_accuracy"]
    rows = {r["name"]: r for r in report["density"]["layers"]}
    assert rows["fc1"]["exported_shape"] == [150, 64] and rows["fc2"]["exported_shape"] == [100, 150]
    assert rows["fc2"]["density"] == 0.5 and "expected_density" in rows["fc2"]
    program = torch.export.load(out / "exported_model.pt2").module()
    x = torch.randn(3, 1, 8, 8)
    exported = trainer.method.export(purge=True).model.eval()
    torch.testing.assert_close(program(x), exported(x))


def test_report_json_and_markdown(structured_run):
    _, report, out = structured_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["model_size"] == json.loads(json.dumps(report["model_size"]))
    assert on_disk["density"]["method"]["targets"] == {"global": pytest.approx(0.5)}
    for key in ("expected", "eval", "multipliers"):
        assert key in on_disk["density"]["method"]
    md = (out / "report.md").read_text()
    for heading in ("## Result", "## Model size: dense vs exported", "## Per-layer density", "## Per epoch",
                    "## Plots", "## Files"):
        assert heading in md
    assert "| fc1 | hard_concrete | 300x64 | 150x64 |" in md
    assert "| params | 50,610 | 25,860 | 0.511 |" in md
    assert "![l0.png](l0.png)" in md and "Purged (structured channels and heads removed): yes; removed: fc1: 150 channels" in md
    for name in on_disk["plots"]:
        assert (out / name).read_bytes()[:8] == PNG
    assert set(on_disk["plots"]) == {"density_layers.png", "training.png", "l0.png"}


def test_removed_text_names_channels_and_heads():
    assert removed_text({"fc1": 3, "enc.layers.0.self_attn.heads": 2}) == "fc1: 3 channels, enc.layers.0.self_attn: 2 heads"


def test_layer_rows_cover_dense_layers_too():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0] = 0
    rows = layer_rows(model, model)
    assert [(r["name"], r["kind"], r["nonzero"], r["exported_shape"]) for r in rows] == [
        ("0", "dense", 8, [3, 4]), ("2", "dense", 6, [2, 3])]


def test_plots_from_a_history(tmp_path):
    history = [{"epoch": e, "phase": "round", "round": e // 3, "train_accuracy": 0.5, "test_accuracy": 0.6,
                "density": 1 - 0.1 * e, "expected_density": 0.9, "target_density": 0.3, "lambda": 0.1 * e}
               for e in range(1, 7)]
    for fn in (plots.training_curves, plots.l0_curves):
        path = fn(history, tmp_path / f"{fn.__name__}.png", "title")
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    rows = [{"name": "fc", "density": 0.3}, {"name": "conv", "density": 0.7, "expected_density": 0.6}]
    assert plots.layer_density(rows, tmp_path / "d.png", "t").read_bytes()[:8] == PNG


def test_markdown_renders_a_dense_report():
    report = {
        "config": {"method": "dense", "model": "mlp", "data": "digits", "density": None, "sparsity": None},
        "command": ["train"], "final": {"test_accuracy": 0.9, "exported_test_accuracy": 0.9,
                                        "exported_max_abs_logit_diff": 0.0},
        "density": {"global": 1.0, "all_weights": 1.0, "layers": []},
        "model_size": {"dense": {"params": 10, "macs": 20},
                       "exported": {"params": 10, "nonzero_params": 10, "macs": 20, "nonzero_macs": 20},
                       "purged": False, "removed_channels": {}, "kept_zero_channels": {}},
        "epochs_trained": 0, "steps_per_epoch": 1, "timing": {"train_seconds": 0.0}, "history": [],
        "plots": [], "export": {"state_dict": "exported_state_dict.pt", "program_error": "X",
                                "module": "exported_module.pt"},
    }
    md = markdown(report)
    assert "| test accuracy (masked model, eval mode) | 90.00% |" in md and "no torch.export program (X); instead `exported_module.pt`" in md


def test_save_exported_falls_back_to_a_pickled_module(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(2, 4)
    info = save_exported(model, tmp_path, x)
    assert info["program"] == "exported_model.pt2" and info["program_max_abs_diff"] == 0.0
    assert set(torch.load(tmp_path / "exported_state_dict.pt")) == set(model.state_dict())

    def refuse(*a, **k):
        raise RuntimeError("data-dependent control flow\nmore detail")

    monkeypatch.setattr(torch.export, "export", refuse)
    (tmp_path / "x").mkdir()
    info = save_exported(model, tmp_path / "x", x)
    assert info["program_error"] == "RuntimeError: data-dependent control flow" and "program" not in info
    loaded = torch.load(tmp_path / "x" / info["module"], weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))


def test_sparsekern_report_stays_the_function_once_the_run_report_is_imported():
    # This module was sparsekern/report.py: importing it (as every `sparsekern train` run
    # does) rebound sparsekern.report to the module, and the README's
    # sparsekern.report(model) then raised "'module' object is not callable".
    import sparsekern
    import sparsekern.run_report  # noqa: F401

    assert sparsekern.report is sparsekern.nn.report
    assert callable(sparsekern.report)
