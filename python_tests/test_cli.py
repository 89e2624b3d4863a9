"""`sparsekern` CLI: --help documents every method option with its default (generated from
the constructors), a tiny end-to-end run per method leaves a complete run folder, bad
arguments fail before anything is written, and `sparsekern bench` collects results."""
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import RUN_FILES, one_thread, write_cifar  # noqa: F401  (fixture)

import sparsekern
from sparsekern import cli, train
from sparsekern import method_options as mo

TINY = ["--model", "mlp", "--data", "digits", "--epochs", "1", "--max-batches", "3", "--batch-size", "32",
        "--threads", "1", "--no-progress"]
METHOD_ARGS = {
    "dense": [],
    "imp": ["--rounds", "2"],
    "oneshot": ["--sparsity", "0.8", "--pretrain-epochs", "1"],
    "gmp": ["--sparsity", "0.8", "--frequency", "1"],
    "dpf": ["--sparsity", "0.8", "--period", "1"],
    "cs": ["--rounds", "2", "--ticket-epochs", "1"],
    "concave": ["--rounds", "2"],
    "l0": ["--density", "0.3"],
    "l0-penalized": ["--lam", "1e-4", "--structured"],
}
EPOCHS = {"dense": 1, "imp": 2, "oneshot": 2, "gmp": 1, "dpf": 1, "cs": 5, "concave": 2, "l0": 1, "l0-penalized": 1}


def help_text(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_help_lists_every_method_option_with_its_default(capsys):
    text = help_text(capsys, ["train", "--help"])
    for method in mo.METHODS:
        cls = mo.method_class(method)
        assert f" {method}" in text
        if cls is None:
            continue
        assert f"({cls.__name__})" in text
        for p in mo.constructor_parameters(cls):
            flag = "--" + p.name.replace("_", "-")
            if p.name in mo.DERIVED:
                assert f"{p.name} <- {mo.DERIVED[p.name]}" in text
                continue
            assert flag in text, flag
            shown = "required" if p.default is inspect.Parameter.empty else repr(p.default)
            # In the method's section of the epilog ...
            assert f"{flag} {shown}" in text, (method, flag)
            # ... and in the flag's own help, as "method: default" (or "every method: ...").
            if p.name not in mo.RUN_LEVEL:
                assert f"{method}: {shown}" in text or f"every method: {shown}" in text, (method, flag)


def test_help_cites_papers_and_run_options(capsys):
    text = help_text(capsys, ["train", "--help"])
    for cite in ("Frankle & Carbin", "Zhu & Gupta", "Lin et al., ICLR 2020", "Savarese et al., NeurIPS 2020",
                 "Fracastoro et al.", "Gallego-Posada et al., NeurIPS 2022", "Louizos et al. 2018"):
        assert cite in text
    for flag in ("--sparsity", "--density", "--epochs", "--rounds", "--lr", "--momentum", "--weight-decay",
                 "--batch-size", "--seed", "--device", "--out", "--resume", "--max-batches", "--data-dir"):
        assert flag in text
    assert "(default: 0.1)" in text and "(default: 64)" in text  # --lr, --batch-size


def test_help_for_one_method_shows_only_its_options(capsys):
    text = help_text(capsys, ["train", "--method", "dpf", "--help"])
    assert "--period INT" in text and "--mode" in text
    assert "--dual-lr" not in text and "--beta-final" not in text


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "sparsekern", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "bench" in out.stdout


def run_folder_ok(out: Path, method: str) -> dict:
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    # Every file the run wrote is one the "already holds a run" check knows.
    assert {p.name for p in out.iterdir()} <= set(train.RUN_FOLDER_FILES)
    assert (out / "l0.png").is_file() == method.startswith("l0")
    assert (out / "checkpoint-prev.pt").is_file() == (EPOCHS[method] > 1)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["epochs_trained"] == len(report["history"]) == EPOCHS[method]
    assert report["config"]["method"] == method
    assert "## Per-layer density" in (out / "report.md").read_text()
    # The exported program runs without the model's class and agrees with the state_dict.
    program = torch.export.load(out / "exported_model.pt2").module()
    assert program(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert report["export"]["program_max_abs_diff"] < 1e-5
    assert report["final"]["exported_max_abs_logit_diff"] < 1e-4
    assert abs(report["final"]["exported_test_accuracy"] - report["final"]["test_accuracy"]) < 1e-9
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["next_epoch"] == EPOCHS[method] and set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    return report


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_end_to_end_per_method(method, tmp_path, capsys):
    out = tmp_path / "run"
    epochs = ["--epochs", "2"] if method == "cs" else []  # CS: β needs two epochs a round to anneal
    assert cli.main(["train", "--method", method, *METHOD_ARGS[method], *TINY, *epochs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    log = (out / "log.txt").read_text().splitlines()
    assert sum(line.startswith("epoch ") for line in log) == EPOCHS[method]
    report = run_folder_ok(out, method)
    density = report["density"]["global"]
    if method in ("oneshot", "gmp", "dpf"):
        assert abs(density - 0.2) < 0.01  # exact counts; dpf/gmp keep the last layer's rounding
    if method == "imp":
        assert abs(density - 0.8) < 1e-3  # one pruning of 20%
    if method == "dense":
        assert density == 1.0 and report["model_size"]["exported"]["nonzero_params"] == 50_610
    if method == "l0":
        assert "λ" in log[1] and "E[density]" in log[1] and report["final"]["target_density"] == pytest.approx(0.3)
    if method == "cs":
        assert "β" in log[1] and report["history"][-1]["phase"] == "ticket"


def test_l0_per_layer_densities(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "l0", "--layer-density", "fc1=0.5", "fc2=0.25", *TINY,
                     "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["layer_density"] == {"fc1": 0.5, "fc2": 0.25}
    final = report["final"]
    # Each layer against its own target: no mean target beside the global E[density].
    assert "target_density" not in final and final["layer_targets"] == {"fc1": 0.5, "fc2": 0.25}
    assert final["worst_excess"] == pytest.approx(max(final["layer_expected"][g] - eps
                                                      for g, eps in final["layer_targets"].items()))
    assert final["lambda"] == max(final["layer_lambdas"].values())
    log = (out / "log.txt").read_text()
    assert "max layer E[density] − target" in log and "max λ" in log and "target 0.3750" not in log
    assert "per layer: fc1 0.5000, fc2 0.2500" in (out / "report.md").read_text()
    assert (out / "l0.png").stat().st_size > 0
    extra = torch.load(out / "checkpoint.pt", weights_only=False)["method"]["extra"]
    assert list(extra["groups"]) == ["fc1", "fc2"] and extra["multipliers"].shape == (2,)  # fc3: unconstrained


def test_cifar_end_to_end(tmp_path):
    write_cifar(tmp_path / "data", per_batch=4)
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "l0", "--density", "0.5", "--structured", "--model", "lenet5",
                     "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--threads", "1",
                     "--batch-size", "8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model_size"]["dense"]["params"] == 62_006 and report["model_size"]["purged"] is True
    assert report["steps_per_epoch"] == 3  # 20 training images, batches of 8


def fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("args, needles", [
    (["--method", "imp", "--period", "3"], ["--method imp does not take --period", "dpf"]),
    (["--method", "l0-penalized"], ["--method l0-penalized needs --lam"]),
    (["--method", "oneshot"], ["--method oneshot needs --sparsity S or --density D"]),
    (["--method", "gmp", "--sparsity", "1.5"], ["--sparsity", "must be in [0, 1)"]),
    (["--method", "gmp", "--sparsity", "0.5", "--density", "0.5"], ["not allowed with argument --sparsity"]),
    (["--method", "cs", "--sparsity", "0.5"], ["--method cs has no target sparsity"]),
    (["--method", "dpf", "--sparsity", "0.5", "--mode", "bogus"], ["--mode", "invalid choice"]),
    (["--method", "concave", "--alpha", "2"], ["`alpha` (--alpha) must be in [0, 1]"]),
    (["--method", "l0", "--density", "0.5", "--dual-lr", "-1"], ["`dual_lr` (--dual-lr) must be >= 0, got -1.0"]),
    (["--method", "dpf", "--sparsity", "0.5", "--rounds", "2"], ["--rounds applies to the round-based methods"]),
    (["--method", "dense", "--model", "nope"], ["unknown --model 'nope'"]),
    (["--method", "dense", "--data", "cifar10", "--data-dir", "/nonexistent"], ["CIFAR-10 not found", "data_batch_1"]),
    (["--method", "dense", "--data-dir", "/somewhere"], ["--data-dir is for --data cifar10"]),
    (["--method", "dense", "--epochs", "4", "--milestones", "2", "4", "9"],
     ["--milestones 4 9: no phase has that many epochs (the longest has 4)"]),
    (["--method", "dense", "--epochs", "0"], ["--epochs", "must be >= 1"]),
    (["--method", "dense", "--lr", "-1"], ["--lr", "must be > 0"]),
    (["--method", "dense", "--lr", "abc"], ["argument --lr: invalid positive float value: 'abc'"]),
    (["--method", "nope"], ["--method", "invalid choice"]),
    (["--model", "mlp"], ["required: --method"]),
    (["--method", "gmp", "--layer-density", "fc1=0.5"], ["--layer-density is for --method l0"]),
    (["--method", "l0", "--layer-density", "nope=0.5"], ["unknown layers ['nope']"]),
    (["--method", "l0", "--layer-density", "fc1"], ["--layer-density", "expected LAYER=D"]),
    (["--method", "l0", "--layer-density", "fc1=1.5"], ["--layer-density", "must be in (0, 1]"]),
    (["--method", "l0", "--layer-density", "fc1=0.5", "--density", "0.5"], ["not allowed with argument"]),
    (["--method", "l0", "--layer-density", "fc1=0.5", "fc1=0.3"], ["--layer-density names a layer twice"]),
    # The flag given, not --density.
    (["--method", "l0", "--layer-density", "fc9=0.5"], ["`target_density` (--layer-density) names unknown layers"]),
    (["--method", "l0", "--layer-density", "fc1=0.5", "--layerwise"], ["`layerwise` (--layerwise) applies to"]),
    # Ignored by the other methods before.
    (["--method", "dpf", "--sparsity", "0.5", "--ticket-epochs", "2"], ["--ticket-epochs is for --method cs"]),
    (["--method", "imp", "--pretrain-epochs", "2"], ["--pretrain-epochs is for --method oneshot"]),
    (["--method", "dense", "--optimizer", "adam", "--momentum", "0.5"], ["--momentum: SGD's, unused by --optimizer adam"]),
    (["--method", "dense", "--optimizer", "adam", "--nesterov"], ["--nesterov: SGD's"]),
    (["--method", "dpf", "--sparsity", "0.5", "--mask-lr", "0.1"],
     ["--mask-lr: --method dpf has no learnable mask parameters", "cs, concave, l0, l0-penalized"]),
    (["--method", "dense", "--mask-lr", "0.1"], ["--mask-lr: --method dense has no learnable"]),
    # --gate-lr was silently overridden by --mask-lr.
    (["--method", "l0", "--density", "0.5", "--gate-lr", "1.0", "--mask-lr", "0.5"],
     ["--mask-lr and --gate-lr both set the lr of the gates", "--method l0: give one"]),
    (["--method", "dense", "--nesterov", "--momentum", "0"], ["--nesterov needs --momentum > 0"]),
    # Each trained (inf: NaN weights) or died with a traceback after config.json and log.txt were written,
    # or failed naming another argument (scikit-learn's `random_state`).
    (["--method", "dense", "--weight-decay", "inf"], ["--weight-decay must be a finite number >= 0, got inf"]),
    (["--method", "dense", "--seed", str(2**32)], ["--seed must be < 2**32", "got 4294967296"]),
    (["--method", "dense", "--device", "meta"], ["--device meta holds shapes only"]),
    # "`end_iteration` (--end-iteration) must be >= 4, got 2": a flag not given, a value derived.
    (["--method", "gmp", "--sparsity", "0.5", "--epochs", "1", "--max-batches", "2", "--start-iteration", "3"],
     ["--start-iteration 3: the sparsity schedule ends at step 2", "--end-iteration not given", "> 3"]),
    # Accepted: the schedule was cut off where training stopped, far from the target.
    (["--method", "gmp", "--density", "0.2", "--epochs", "1", "--max-batches", "2", "--end-iteration", "3"],
     ["--end-iteration 3: the run trains 2 steps", "<= 2"]),
    (["--method", "dpf", "--sparsity", "0.5", "--epochs", "1", "--max-batches", "2", "--end-iteration", "100000"],
     ["--end-iteration 100000: the run trains 2 steps", "never reach its target"]),
    # A traceback from BatchNorm at the end of the first epoch (a last batch of 1 image over 1x1 maps).
    (["--method", "dense", "--model", "torchvision:resnet18", "--batch-size", "4"],
     ["--batch-size 4: each epoch's last batch holds 1 image (1437 = 359 x 4 + 1)", "Expected more than 1 value"]),
    # A RuntimeError from end_round() / to_ticket() after the first round had trained.
    (["--method", "imp", "--rounds", "2", "--epochs", "1", "--max-batches", "2", "--rewind-iteration", "3"],
     ["--rewind-iteration 3: the first round ends after 2 steps", "<= 2"]),
    (["--method", "cs", "--epochs", "2", "--max-batches", "1", "--rewind-iteration", "3"],
     ["--rewind-iteration 3: the first round ends after 2 steps", "<= 2"]),
])
def test_bad_arguments_fail_before_anything_is_written(args, needles, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", "mlp"] if "--model" not in args else []
    fails(capsys, ["train", *args, *base, "--threads", "1", "--out", str(out)], *needles)
    assert not out.exists()


def test_out_expands_a_home_folder(tmp_path, monkeypatch):
    # Quoted, '~/runs/x' reaches the program as is: it made a folder named '~' here.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--method", "dense", "--model", "mlp", "--epochs", "1", "--max-batches", "1",
                     "--threads", "1", "--out", "~/runs/x"]) == 0
    assert (tmp_path / "home" / "runs" / "x" / "report.json").exists() and not (tmp_path / "~").exists()


def test_existing_run_needs_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "dense", *TINY, "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    fails(capsys, ["train", "--method", "dense", *TINY, "--out", str(out)], "already holds a run", "--resume")
    assert (out / "checkpoint.pt").read_bytes() == before
    fails(capsys, ["train", "--out", str(out), "--resume", "--lr", "0.5"],
          "--lr 0.5 (the run has 0.1)")
    fails(capsys, ["train", "--out", str(tmp_path / "empty"), "--resume"], "empty/config.json not found")


@pytest.mark.parametrize("name", ["config.json", "log.txt", "report.json", "exported_model.pt2"])
def test_a_folder_with_a_runs_files_but_no_checkpoint_is_not_taken_over(name, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("an earlier run's\n")
    fails(capsys, ["train", "--method", "dense", *TINY, "--out", str(out)],
          f"already holds a run ({name}) but no checkpoint")
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "an earlier run's\n"


def test_an_empty_folder_or_one_with_other_files_takes_a_new_run(tmp_path):
    empty, notes = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir()
    notes.mkdir()
    (notes / "README.txt").write_text("my notes\n")
    for out in (empty, notes):
        assert cli.main(["train", "--method", "dense", *TINY, "--out", str(out)]) == 0
        assert json.loads((out / "report.json").read_text())["epochs_trained"] == 1
    assert (notes / "README.txt").read_text() == "my notes\n"


def test_an_unusable_out_fails_before_the_data_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_dataset", lambda *a, **k: pytest.fail("the data was loaded"))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    cases = [(a_file, f"--out {a_file} is a file, not a folder"),
             (a_file / "run", f"--out {a_file / 'run'}: {a_file} is a file, not a folder")]
    if sys.platform.startswith("linux"):  # /proc refuses new entries, even to root
        cases.append((Path("/proc/nope"), "--out /proc/nope: cannot create a folder in /proc ("))
    for out, message in cases:
        err = fails(capsys, ["train", "--method", "dense", *TINY, "--out", str(out)], message)
        assert err.startswith("sparsekern train: error: --out ")
    assert list(tmp_path.iterdir()) == [a_file] and a_file.read_text() == "keep me\n"


def test_resume_may_give_a_new_data_dir_and_threads(tmp_path, monkeypatch, capsys):
    """The config keeps the data folder as an absolute path (a resume from another working
    directory finds it); when the data moves, --resume takes --data-dir (and --threads)."""
    write_cifar(tmp_path / "data", per_batch=4)
    monkeypatch.chdir(tmp_path)
    data, moved = Path.cwd() / "data", Path.cwd() / "moved"
    assert cli.main(["train", "--method", "dense", "--model", "lenet5", "--data", "cifar10", "--data-dir", "data",
                     "--epochs", "2", "--batch-size", "8", "--no-progress", "--out", "run", "--stop-after", "1"]) == 0
    assert json.loads(Path("run/config.json").read_text())["data_dir"] == str(data)
    data.rename(moved)
    monkeypatch.chdir(moved)
    fails(capsys, ["train", "--out", "../run", "--resume"], "CIFAR-10 not found", str(data))
    fails(capsys, ["train", "--out", "../run", "--resume", "--data-dir", ".", "--lr", "0.5"],
          "--lr 0.5 (the run has 0.1)")  # the run's other settings stay fixed
    assert cli.main(["train", "--out", "../run", "--resume", "--data-dir", ".", "--threads", "1"]) == 0
    config = json.loads(Path("../run/config.json").read_text())
    assert config["data_dir"] == str(moved) and config["threads"] == 1  # what the next --resume uses
    report = json.loads(Path("../run/report.json").read_text())
    assert report["epochs_trained"] == 2 and report["config"]["data_dir"] == str(moved)


def test_unknown_command_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["fly"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_bench_runs_every_script_and_writes_the_readme(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_ok.py").write_text(  # writes where common.write_result does
        "import sys, pathlib\n"
        "quick = '--quick' in sys.argv  # takes \"--quick\"\n"
        "p = pathlib.Path(__file__).parent / 'results' / ('quick' if quick else ''); p.mkdir(parents=True, exist_ok=True)\n"
        "(p / 'ok.md').write_text('| a | b |\\n|---|---|\\n| quick | %s |\\n' % quick)\n")
    (bench / "bench_fails.py").write_text("raise SystemExit('target missed')\n")
    assert cli.main(["bench", "--bench-dir", str(bench)]) == 1
    full = bench / "results" / "README.md"
    readme = full.read_text()
    assert "| bench_ok.py | 0 |" in readme and "| bench_fails.py | 1 |" in readme and "target missed" in readme
    assert "| quick | False |" in readme
    # --only: that script's row is renewed, the others' rows stay.
    (bench / "bench_ok.py").write_text((bench / "bench_ok.py").read_text() + "raise SystemExit('now failing')\n")
    assert cli.main(["bench", "--bench-dir", str(bench), "--only", "ok"]) == 1
    readme = full.read_text()
    assert "| bench_fails.py | 1 |" in readme and "now failing" in readme and readme.count("| bench_ok.py |") == 1
    # --quick: a smoke run writes results/quick/ and leaves the committed results alone.
    assert cli.main(["bench", "--bench-dir", str(bench), "--quick", "--only", "ok"]) == 1
    assert full.read_text() == readme and "| quick | False |" in (bench / "results" / "ok.md").read_text()
    quick = (bench / "results" / "quick" / "README.md").read_text()
    assert "--quick (smoke run" in quick and "| quick | True |" in quick
    fails(capsys, ["bench", "--bench-dir", str(bench), "--only", "nope"], "no bench script named ['nope']")


@pytest.mark.parametrize("flag, tuned", [([], True), (["--malloc-defaults"], False)])
def test_train_tunes_the_allocator_unless_asked_not_to(flag, tuned, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: calls.append(1) or True)
    assert cli.main(["train", "--method", "dense", *TINY, *flag, "--out", str(tmp_path / "run")]) == 0
    assert calls == ([1] if tuned else [])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_cpu_allocator_applies_on_glibc():
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert sparsekern.tune_cpu_allocator() is True
    # Still a working allocator: a large tensor allocates, frees and allocates again.
    for _ in range(2):
        assert torch.ones(16 << 20, dtype=torch.uint8).sum().item() == 16 << 20
