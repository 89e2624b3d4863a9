"""The training loop: --resume continues to the same result as an uninterrupted run (after
--stop-after, and after a crash in the middle of an epoch), checkpoints are atomic, and
the plan / lr schedule follow the config."""
import errno
import io
import json
import math
import os
import shlex
import signal
import stat

import pytest
import torch
from run_helpers import one_thread  # noqa: F401  (fixture)

from sparsekern import checkpoint as ckpt
from sparsekern import cli, run_report, train
from sparsekern.train import RunConfig, lr_factor, make_plan

TINY = ["--model", "mlp", "--epochs", "2", "--max-batches", "4", "--batch-size", "32", "--threads", "1",
        "--no-progress"]
RESUMABLE = {
    # hard-concrete noise offsets and the dual variable; the last epoch at a smaller lr
    "l0": ["--density", "0.3", "--milestones", "1"],
    # rounds, the soft reset, the ticket conversion (checkpointed after to_ticket)
    "cs": ["--rounds", "2", "--epochs", "2", "--ticket-epochs", "1"],
    # the method is built between the two epochs
    "oneshot": ["--sparsity", "0.7", "--pretrain-epochs", "1", "--epochs", "1"],
    # momentum state, mask recomputations every step
    "dpf": ["--sparsity", "0.7", "--period", "1"],
}


def comparable(report: dict) -> dict:
    """report.json without wall-clock times and the command lines."""
    out = {k: v for k, v in report.items() if k not in ("timing", "command", "resume_commands")}
    out["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in report["history"]]
    return out


def final_state(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)


def assert_same_run(a, b):
    sa, sb = final_state(a), final_state(b)
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k  # bit for bit
    for k, v in torch.load(a / "exported_state_dict.pt").items():
        assert torch.equal(v, torch.load(b / "exported_state_dict.pt")[k]), k
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert comparable(ra) == comparable(rb)


@pytest.mark.parametrize("method", list(RESUMABLE))
def test_resume_after_stop_equals_uninterrupted(method, tmp_path, capsys):
    args = ["train", "--method", method, *TINY, *RESUMABLE[method]]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*args, "--out", str(a)]) == 0
    assert cli.main([*args, "--out", str(b), "--stop-after", "1"]) == 0
    assert not (b / "report.json").exists() and "continue with --resume" in capsys.readouterr().out
    assert final_state(b)["next_epoch"] == 1
    assert cli.main(["train", "--out", str(b), "--resume"]) == 0
    assert "resumed from" in (b / "log.txt").read_text()
    assert_same_run(a, b)
    # The report keeps the command that started the run, then the resume's.
    report = json.loads((b / "report.json").read_text())
    assert report["command"] == [*args, "--out", str(b), "--stop-after", "1"]
    assert report["resume_commands"] == [["train", "--out", str(b), "--resume"]]
    md = (b / "report.md").read_text()
    first, then = (f"sparsekern {shlex.join(c)}\n" for c in (report["command"], *report["resume_commands"]))
    assert first in md and then in md and md.index(first) < md.index(then)


def test_a_run_started_under_another_default_selection_resumes_on_its_own_layers(tmp_path):
    """The structured modes took every conv before their default became purgeable_layers;
    such a run's config has no include, and its --resume failed ("entries differ"). It
    resumes on the layers its checkpoint holds, to the result of a run that named them."""
    args = ["train", "--method", "dpf", "--mode", "structured", "--sparsity", "0.5", *TINY, "--model", "resnet20",
            "--max-batches", "2", "--period", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*args, "--include", "*", "--out", str(a)]) == 0
    assert cli.main([*args, "--include", "*", "--out", str(b), "--stop-after", "1"]) == 0
    config = json.loads((b / "config.json").read_text())
    del config["method_options"]["include"]  # as a run started before the default changed has it
    (b / "config.json").write_text(json.dumps(config))
    assert cli.main(["train", "--out", str(b), "--resume"]) == 0
    assert "resuming on the checkpoint's" in (b / "log.txt").read_text()
    sa, sb = final_state(a), final_state(b)
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


class Crash(Exception):
    pass


def die_at_step(monkeypatch, n: int, error) -> None:
    """The n-th optimiser step raises `error`, after its update."""
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        result = real_step(self, *a, **k)
        if calls["n"] == n:
            raise error
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)


def test_resume_after_a_crash_mid_epoch_equals_uninterrupted(tmp_path, monkeypatch):
    """The run dies in the 3rd step of epoch 2 (after that step's optimiser update): resume
    restarts epoch 2 from the epoch-1 checkpoint and ends where the uninterrupted run does."""
    args = ["train", "--method", "l0", *TINY, *RESUMABLE["l0"]]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*args, "--out", str(a)]) == 0
    die_at_step(monkeypatch, 4 + 3, Crash)
    with pytest.raises(Crash):
        cli.main([*args, "--out", str(b)])
    monkeypatch.undo()
    assert final_state(b)["next_epoch"] == 1
    assert cli.main(["train", "--out", str(b), "--resume"]) == 0
    assert_same_run(a, b)


def test_ctrl_c_prints_where_the_run_stands_and_it_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 2: one line (no traceback) naming the last checkpoint's epoch and the
    resume command, status 130; the resume ends where the uninterrupted run does."""
    args = ["train", "--method", "l0", *TINY, *RESUMABLE["l0"]]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*args, "--out", str(a)]) == 0
    die_at_step(monkeypatch, 4 + 3, KeyboardInterrupt)
    assert cli.main([*args, "--out", str(b)]) == 130
    monkeypatch.undo()
    assert capsys.readouterr().err == (f"interrupted; the last checkpoint is after epoch 1/2; continue with "
                                       f"--resume: sparsekern train --out {b} --resume\n")
    assert cli.main(["train", "--out", str(b), "--resume"]) == 0
    assert_same_run(a, b)


def test_ctrl_c_before_the_first_checkpoint(tmp_path, monkeypatch, capsys):
    args = ["train", "--method", "dense", *TINY, "--out", str(tmp_path / "run")]
    die_at_step(monkeypatch, 2, KeyboardInterrupt)
    assert cli.main(args) == 130
    monkeypatch.undo()
    assert "interrupted before the first checkpoint: nothing to resume" in capsys.readouterr().err
    # The folder holds that run's config and log: a new run there is refused, not mixed in.
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert "already holds a run (config.json, log.txt) but no checkpoint" in capsys.readouterr().err


def test_a_diverged_epoch_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = train.Trainer.train_epoch
    calls = []

    def second_diverges(self, index, spec):
        result = real(self, index, spec)
        calls.append(index)
        return {**result, "train_loss": math.nan} if len(calls) == 2 else result

    monkeypatch.setattr(train.Trainer, "train_epoch", second_diverges)
    assert cli.main(["train", "--method", "dense", *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "training diverged in epoch 2 (train loss nan)" in err and "last checkpoint is after epoch 1" in err
    assert torch.load(out / ckpt.CHECKPOINT, weights_only=False)["next_epoch"] == 1
    assert not (out / "report.json").exists()


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save(tmp_path, {"epoch": 1, "w": torch.arange(4)})
    ckpt.save(tmp_path, {"epoch": 2, "w": torch.arange(4) * 2})
    before = (tmp_path / ckpt.CHECKPOINT).read_bytes()
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")  # some bytes reach the disk, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tmp_path, {"epoch": 3})
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / ckpt.CHECKPOINT).read_bytes() == before
    assert not (tmp_path / (ckpt.CHECKPOINT + ".tmp")).exists()
    state, path = ckpt.load(tmp_path)
    assert state["epoch"] == 2 and path.name == ckpt.CHECKPOINT
    assert ckpt.load(tmp_path)[0]["w"].tolist() == [0, 2, 4, 6]
    assert torch.load(tmp_path / ckpt.PREVIOUS)["epoch"] == 1


def test_load_falls_back_to_the_previous_checkpoint(tmp_path):
    ckpt.save(tmp_path, {"epoch": 1})
    ckpt.save(tmp_path, {"epoch": 2})
    (tmp_path / ckpt.CHECKPOINT).write_bytes(b"truncated")  # e.g. a disk that lied about fsync
    state, path = ckpt.load(tmp_path)
    assert state["epoch"] == 1 and path.name == ckpt.PREVIOUS
    (tmp_path / ckpt.CHECKPOINT).unlink()  # a crash between the two renames
    assert ckpt.load(tmp_path)[0]["epoch"] == 1
    (tmp_path / ckpt.PREVIOUS).unlink()
    with pytest.raises(FileNotFoundError, match="no readable checkpoint.pt"):
        ckpt.load(tmp_path)


def record_fsyncs_and_renames(monkeypatch, folder) -> list[tuple]:
    """Every os.fsync and os.replace from now on, in order: ("fsync", "file") or
    ("fsync", "folder") (the directory `folder` itself), ("replace", src name, dst name)."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    folder_id = (os.stat(folder).st_dev, os.stat(folder).st_ino)

    def fsync(fd):
        st = os.fstat(fd)
        is_folder = stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == folder_id
        assert is_folder or stat.S_ISREG(st.st_mode), "fsync of another directory"
        events.append(("fsync", "folder" if is_folder else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_save_and_write_atomic_fsync_the_folder_after_renaming(tmp_path, monkeypatch):
    """The rename is a change to the folder, which the temp file's fsync does not make
    durable: without a fsync of the folder after it, a power cut could bring back the old
    file (or checkpoint.pt renamed to -prev and the new one missing)."""
    ckpt.save(tmp_path, {"epoch": 1})
    events = record_fsyncs_and_renames(monkeypatch, tmp_path)
    ckpt.save(tmp_path, {"epoch": 2})
    assert events == [("fsync", "file"), ("replace", ckpt.CHECKPOINT, ckpt.PREVIOUS),
                      ("replace", ckpt.CHECKPOINT + ".tmp", ckpt.CHECKPOINT), ("fsync", "folder")]
    events.clear()
    ckpt.write_atomic(tmp_path / "config.json", lambda f: f.write(b"{}"))
    assert events == [("fsync", "file"), ("replace", "config.json.tmp", "config.json"), ("fsync", "folder")]
    assert ckpt.load(tmp_path)[0]["epoch"] == 2 and (tmp_path / "config.json").read_bytes() == b"{}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced fds through /proc")
def test_make_folder_fsyncs_each_new_folder_into_its_parent(tmp_path, monkeypatch):
    """A run folder whose own entry was never fsynced into its parent can vanish, with its
    checkpoints, in a power cut soon after the run starts: each directory make_folder
    creates is fsynced into its parent, outermost first; existing ones are left alone."""
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpt.make_folder(tmp_path / "runs" / "a")
    assert synced == [str(tmp_path), str(tmp_path / "runs")] and (tmp_path / "runs" / "a").is_dir()
    synced.clear()
    ckpt.make_folder(tmp_path / "runs" / "a")  # exists: nothing to make durable
    assert synced == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced fds through /proc")
def test_each_log_line_is_fsynced_before_the_epochs_checkpoint(tmp_path, monkeypatch):
    """log.txt was appended to and closed, never fsynced: a power cut could keep an epoch's
    checkpoint and lose its log line. Now, when the checkpoint is written, log.txt has been
    fsynced with the epoch's line in it (and the folder once, when log.txt was created)."""
    out = tmp_path / "run"
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, os.fstat(fd).st_size))
        return real_fsync(fd)

    at_save = []
    real_save = train.Trainer.save

    def save(self, **kw):
        log = (out / "log.txt").read_bytes()
        last = [size for path, size in synced if path == str(out / "log.txt")][-1:]
        at_save.append((log.decode().splitlines()[-1], last == [len(log)]))
        return real_save(self, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(train.Trainer, "save", save)
    cfg = RunConfig("dense", "mlp", epochs=2, max_batches=2, batch_size=32)
    train.run(cfg, out, log=lambda s: None)
    assert [(line.split("  ")[0], durable) for line, durable in at_save] == [("epoch 1/2", True), ("epoch 2/2", True)]
    first_line = next(i for i, (path, _) in enumerate(synced) if path == str(out / "log.txt"))
    assert synced[first_line + 1][0] == str(out)  # log.txt's entry in the folder, right after its first line


def test_folder_fsync_is_skipped_where_the_platform_cannot_do_it(tmp_path, monkeypatch):
    """Windows cannot open a directory (PermissionError), some network filesystems refuse
    a directory fsync (EINVAL): the file is written all the same. An I/O error raises."""
    real_open, real_fsync = os.open, os.fsync

    def open_no_folders(path, flags, *a, **k):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", open_no_folders)
    ckpt.write_atomic(tmp_path / "a.txt", lambda f: f.write(b"a"))
    assert (tmp_path / "a.txt").read_bytes() == b"a"
    monkeypatch.setattr(os, "open", real_open)
    for code, raises in ((errno.EINVAL, False), (errno.EIO, True)):
        def fsync(fd, code=code):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(code, os.strerror(code))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        if raises:
            with pytest.raises(OSError, match=os.strerror(code)):
                ckpt.save(tmp_path, {"epoch": 1})
        else:
            ckpt.save(tmp_path, {"epoch": 1})
        assert ckpt.load(tmp_path)[0]["epoch"] == 1  # renamed before the folder's fsync


def test_failed_checkpoint_in_a_run_leaves_it_resumable(tmp_path, monkeypatch):
    """torch.save raising while epoch 2's checkpoint is written: epoch 1's stays valid and
    the run resumes from it to the uninterrupted result."""
    args = ["train", "--method", "dpf", *TINY, *RESUMABLE["dpf"]]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*args, "--out", str(a)]) == 0
    real_save, saves = torch.save, {"n": 0}

    def failing_second_save(obj, f, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:
            f.write(b"garbage")
            raise OSError("interrupted")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_second_save)
    with pytest.raises(OSError):
        cli.main([*args, "--out", str(b)])
    monkeypatch.undo()
    assert ckpt.load(b)[0]["next_epoch"] == 1
    assert cli.main(["train", "--out", str(b), "--resume"]) == 0
    assert_same_run(a, b)


def sigkilled(args: list[str], arm) -> None:
    """Runs the CLI in a forked child (torch already imported: no 8 s start-up) in which
    arm() has set a trap that SIGKILLs it: no except, finally or atexit runs, as when the
    OOM killer or a scheduler ends a job. Waits for that death."""
    pid = os.fork()
    if pid == 0:
        try:
            arm()
            cli.main(args)
        finally:
            os._exit(3)  # the trap never went off
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not SIGKILLed: {status}"


def sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def trap(owner, name: str, when, *, nth: int = 1, half: bool = False, after: bool = False):
    """arm(): the nth call of owner.name for which when(*args) holds is SIGKILLed: before
    it runs; with half, once the writer (torch.save / torch.export.save (obj, f)) has put
    half its bytes into f; with after, once it has returned."""
    def arm():
        real, seen = getattr(owner, name), [0]

        def wrapper(*a, **k):
            hit = when(*a)
            seen[0] += hit
            if hit and seen[0] == nth and not after:
                if half:
                    buf = io.BytesIO()
                    real(a[0], buf)
                    data = buf.getvalue()[: len(buf.getvalue()) // 2]
                    if hasattr(a[1], "write"):
                        a[1].write(data)
                        a[1].flush()
                    else:
                        open(a[1], "wb").write(data)
                sigkill()
            result = real(*a, **k)
            if hit and seen[0] == nth and after:
                sigkill()
            return result

        setattr(owner, name, wrapper)
    return arm


def into(name: str):
    return lambda obj, f, *a: name in str(getattr(f, "name", f))


PNG = b"\x89PNG\r\n\x1a\n"


def assert_nothing_truncated(out):
    """Every file of the run folder reads back whole (a stale NAME.tmp aside: the next
    write replaces it), and a report.json stands only beside everything it names."""
    for p in out.iterdir():
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".pt":
            torch.load(p, weights_only=False)
        elif p.suffix == ".pt2":
            torch.export.load(p)
        elif p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG and p.read_bytes()[-8:-4] == b"IEND", p.name
        elif p.suffix == ".md":
            assert "## Files" in p.read_text(), p.name  # its last section
    if (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text())
        for name in ["report.md", report["export"]["state_dict"], report["export"]["program"], *report["plots"]]:
            assert (out / name).is_file(), f"report.json without {name}"


def test_sigkill_at_any_point_resumes_to_the_uninterrupted_result(tmp_path):
    """A CS run (2 rounds of 2 epochs, 1 ticket epoch) SIGKILLed again and again, each
    --resume in turn killed at the next point: half-way through writing a checkpoint,
    between its two renames, right after to_ticket, and half-way through each report
    file. No file is ever left truncated, and the last resume ends bit for bit where the
    uninterrupted run does. Before the report was written atomically (report.json first),
    a kill left half an exported_state_dict.pt / exported_model.pt2 and a report.json
    without report.md."""
    args = ["train", "--method", "cs", *TINY, *RESUMABLE["cs"]]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*args, "--out", str(a)]) == 0
    resume = ["train", "--out", str(b), "--resume"]
    ckpt_tmp = into(ckpt.CHECKPOINT + ".tmp")
    kills = [  # (command, trap, epochs in the checkpoint after the kill)
        # epoch 2's checkpoint (after end_round), half written: epoch 1's stays
        ([*args, "--out", str(b)], trap(torch, "save", ckpt_tmp, nth=2, half=True), 1),
        # the 3rd save of this resume (epoch 3's; the 1st records the command): checkpoint.pt renamed to -prev,
        # the new one not yet in place
        (resume, trap(os, "replace", lambda src, dst: str(src).endswith(ckpt.CHECKPOINT + ".tmp"), nth=3), 2),
        # CS's ticket made (after epoch 4), not yet checkpointed
        (resume, trap(train.Trainer, "_after", lambda self, spec: spec.after == "to_ticket", after=True), 3),
        (resume, trap(torch, "save", into("exported_state_dict.pt"), half=True), 5),
        (resume, trap(torch.export, "save", into("exported_model.pt2"), half=True), 5),
        (resume, trap(run_report, "markdown", lambda report: True), 5),  # between the report files
    ]
    for command, arm, saved in kills:
        sigkilled(command, arm)
        assert_nothing_truncated(b)
        assert ckpt.load(b)[0]["next_epoch"] == saved
    assert not (b / "report.json").exists()
    assert cli.main(resume) == 0
    assert_same_run(a, b)
    assert (b / "log.txt").read_text().count("resumed from") == len(kills)
    # Every resume, the killed ones included; the two killed in the report of the finished
    # run (no checkpoint after them) were missing.
    assert json.loads((b / "report.json").read_text())["resume_commands"] == [resume] * len(kills)


def test_every_resume_is_in_the_report_however_it_ended(tmp_path, monkeypatch):
    """A resume that dies before its first checkpoint, or in the report of a run whose
    epochs are all done, is in the report's resume_commands: they were checkpointed only
    with the next epoch, so the report of the resume after it lacked them."""
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "dense", *TINY, "--out", str(out), "--stop-after", "1"]) == 0
    resume = ["train", "--out", str(out), "--resume"]
    # Told apart by their run-control flags.
    mid_epoch, report_after_epoch, report_only = ([*resume, flag] for flag in ("--no-progress", "--malloc-defaults",
                                                                              "--stop-after=5"))
    die_at_step(monkeypatch, 2, Crash)  # epoch 2, before its checkpoint
    with pytest.raises(Crash):
        cli.main(mid_epoch)
    monkeypatch.undo()

    def crash(report):
        raise Crash

    monkeypatch.setattr(run_report, "markdown", crash)
    for command in (report_after_epoch, report_only):  # trains epoch 2, then dies; then only the report
        with pytest.raises(Crash):
            cli.main(command)
    monkeypatch.undo()
    assert ckpt.load(out)[0]["next_epoch"] == 2 and not (out / "report.json").exists()
    assert torch.load(out / ckpt.PREVIOUS, weights_only=False)["next_epoch"] == 1  # the epoch before, kept
    assert cli.main(resume) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resume_commands"] == [mid_epoch, report_after_epoch, report_only, resume]
    assert report["command"][-2:] == ["--stop-after", "1"] and report["epochs_trained"] == 2


def test_sigkill_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "dense", *TINY, "--out", str(out)]
    sigkilled(args, trap(torch, "save", into(ckpt.CHECKPOINT), half=True))
    assert_nothing_truncated(out)
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(out), "--resume"])
    # Was "--resume: no checkpoint in <out>".
    assert (f"the run in {out} stopped before its first checkpoint (written after each epoch), so there is "
            f"nothing to resume; start it again with another --out, or after deleting its files (config.json, "
            f"log.txt, checkpoint.pt.tmp)") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(args)
    assert "already holds a run (config.json, log.txt, checkpoint.pt.tmp) but no checkpoint" in capsys.readouterr().err
    again = tmp_path / "again"
    assert cli.main([*args[:-1], str(again)]) == 0
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):  # a finished run whose checkpoints were deleted
        (again / name).unlink()
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(again), "--resume"])
    assert f"the run in {again} has no checkpoint, so there is nothing to resume" in capsys.readouterr().err


def phases(plan):
    return [(s.phase, s.round, s.epoch, s.after) for s in plan]


def test_plans():
    from sparsekern.methods import IMP, ContinuousSparsification, OneShot

    assert phases(make_plan(RunConfig("imp", "mlp", epochs=2, rounds=2), IMP)) == [
        ("round", 0, 0, None), ("round", 0, 1, "end_round"), ("round", 1, 0, None), ("round", 1, 1, None)]
    assert phases(make_plan(RunConfig("cs", "mlp", epochs=1, rounds=2, ticket_epochs=2), ContinuousSparsification)) == [
        ("round", 0, 0, "end_round"), ("round", 1, 0, "to_ticket"), ("ticket", 2, 0, None), ("ticket", 2, 1, None)]
    assert phases(make_plan(RunConfig("oneshot", "mlp", epochs=1, pretrain_epochs=2), OneShot)) == [
        ("pretrain", 0, 0, None), ("pretrain", 0, 1, "prune"), ("finetune", 0, 0, None)]
    assert phases(make_plan(RunConfig("dense", "mlp", epochs=2), None)) == [("train", 0, 0, None), ("train", 0, 1, None)]


def test_lr_schedules():
    cfg = RunConfig("dense", "mlp", epochs=8, lr_schedule="multistep", gamma=0.1)
    assert [lr_factor(cfg, e, 8) for e in (0, 3.99, 4, 5.99, 6, 7.5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cfg = RunConfig("dense", "mlp", epochs=8, lr_schedule="multistep", milestones=[1])
    assert lr_factor(cfg, 0.5, 8) == 1 and lr_factor(cfg, 1, 8) == pytest.approx(0.1)
    cfg = RunConfig("dense", "mlp", epochs=4, lr_schedule="cosine")
    assert lr_factor(cfg, 0, 4) == 1 and lr_factor(cfg, 2, 4) == pytest.approx(0.5) and lr_factor(cfg, 4, 4) == 0
    assert lr_factor(RunConfig("dense", "mlp", lr_schedule="constant"), 99, 4) == 1


def test_lr_after_a_rewind_continues_from_the_rewind_iteration(tmp_path):
    """IMP rewinding to iteration k: the next round's lr schedule starts at step k."""
    cfg = RunConfig("imp", "mlp", epochs=1, rounds=2, max_batches=4, batch_size=32, lr_schedule="cosine",
                    method_options={"rewind_iteration": 2})
    trainer = train.Trainer(cfg, tmp_path / "run", log=lambda s: None)
    trainer.out.mkdir()
    with pytest.raises(train.Interrupted):
        trainer.fit(stop_after=1)  # round 1, then end_round(): prune + rewind to step 2
    assert trainer.phase_step == 2 and trainer.method.iteration == 2
    lr = trainer._set_lr(trainer.plan[1])  # the first step of round 2: 2 of 4 steps into the cosine
    assert lr == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))


def test_rewind_iteration_may_be_the_first_rounds_last_step_not_later(tmp_path):
    """The weights of step k must exist when the first round ends: k = the round's last
    step rewinds there; k one step later is refused before anything is written (it raised
    a RuntimeError from end_round() after the first round had trained)."""
    cfg = RunConfig("imp", "mlp", epochs=1, rounds=2, max_batches=4, batch_size=32,
                    method_options={"rewind_iteration": 4})
    trainer = train.Trainer(cfg, tmp_path / "run", log=lambda s: None)
    trainer.out.mkdir()
    with pytest.raises(train.Interrupted):
        trainer.fit(stop_after=1)
    assert trainer.method.iteration == 4 and trainer.phase_step == 4
    cfg.method_options["rewind_iteration"] = 5
    with pytest.raises(ValueError, match=r"--rewind-iteration 5: the first round ends after 4 steps"):
        train.Trainer(cfg, tmp_path / "never-written", log=lambda s: None)
    assert not (tmp_path / "never-written").exists()


def test_the_last_batch_probe_leaves_the_model_and_the_rng_alone(tmp_path):
    """digits' 1,437 images in batches of 4 leave a last batch of 1: the model is probed
    with one image in training mode. A model that can take it (no BatchNorm over 1x1 maps)
    trains as before: the probe runs on a copy (BatchNorm statistics unchanged) under a
    forked RNG (dropout's draw does not shift the run's)."""
    cfg = RunConfig("dense", "mlp", batch_size=4)
    trainer = train.Trainer(cfg, tmp_path / "never-written", log=lambda s: None)
    trainer.model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(64, 10))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    trainer._check_last_batch()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    with pytest.raises(ValueError, match=r"--batch-size 4: each epoch's last batch holds 1 image"):
        train.Trainer(RunConfig("dense", "torchvision:resnet18", batch_size=4), tmp_path / "never-written")
    train.Trainer(RunConfig("dense", "torchvision:resnet18", batch_size=4, max_batches=3), tmp_path / "never-written")
    assert not (tmp_path / "never-written").exists()


def test_method_kwargs_come_from_flags_and_the_run(tmp_path):
    never = tmp_path / "never-written"
    cfg = RunConfig("gmp", "mlp", density=0.25, epochs=8, max_batches=10, milestones=[4, 6],
                    method_options={"frequency": 5})
    trainer = train.Trainer(cfg, never, log=lambda s: None)
    assert trainer.method_kwargs == {"frequency": 5, "sparsity": 0.75, "end_iteration": 60}
    cfg = RunConfig("l0", "mlp", density=0.3, method_options={"structured": True})
    assert train.Trainer(cfg, never).method_kwargs == {"structured": True, "target_density": 0.3}
    cfg = RunConfig("imp", "mlp", sparsity=0.36, rounds=3)
    assert train.Trainer(cfg, never).method_kwargs["prune_fraction"] == pytest.approx(0.2)
    assert list(tmp_path.iterdir()) == []  # a Trainer writes nothing until it runs


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
@pytest.mark.parametrize("method", ["dense", "cs"])
def test_the_optimizer_is_fused(optimizer, method, tmp_path):
    """One pass per parameter: the looped CPU SGD took 2.4x and Adam 6.2x as long on
    ResNet-18's weights."""
    cfg = RunConfig(method, "mlp", optimizer=optimizer)
    opt = train.Trainer(cfg, tmp_path / "never-written").optimizer
    assert type(opt).__name__.lower() == optimizer and len(opt.param_groups) == (1 if method == "dense" else 2)
    assert all(g["fused"] for g in opt.param_groups)


def test_fused_only_where_torch_has_the_kernels():
    real = [{"params": [torch.nn.Parameter(torch.ones(2))]}]
    assert train._fused_ok(real)
    assert not train._fused_ok([{"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))]}])
    assert not train._fused_ok([{"params": [torch.nn.Parameter(torch.ones(2, device="meta"))]}])
    assert not train._fused_ok([{"params": []}])


def test_amp_bf16_runs_the_forward_in_bfloat16_and_resumes_exactly(tmp_path, capsys):
    args = ["train", "--method", "l0", *TINY, "--density", "0.3", "--amp", "bf16"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main([*args, "--out", str(a)]) == 0
    assert cli.main([*args, "--out", str(b), "--stop-after", "1"]) == 0
    assert cli.main(["train", "--out", str(b), "--resume"]) == 0
    assert_same_run(a, b)
    assert all(v.dtype != torch.bfloat16 for v in final_state(a)["model"].values())  # weights stay float32

    seen = []
    for amp in train.AMP:
        cfg = RunConfig("l0", "mlp", density=0.3, epochs=1, max_batches=2, amp=amp)
        trainer = train.Trainer(cfg, tmp_path / amp, log=lambda s: None)
        dtypes = set()
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
        trainer.out.mkdir()
        trainer.fit()
        assert dtypes == {torch.bfloat16 if amp == "bf16" else torch.float32}  # training and evaluation
        assert isinstance(trainer.history[0]["test_loss"], float)
        seen.append(trainer.history[0]["train_loss"])
    assert seen[0] != seen[1]

    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "dense", *TINY, "--amp", "fp16", "--out", str(tmp_path / "c")])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--amp"):
        RunConfig("dense", "mlp", amp="fp16").validate()
