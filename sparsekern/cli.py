"""`sparsekern` command line: `sparsekern train ...` and `sparsekern bench ...`.

`python -m sparsekern` runs the same; the console script is sparsekern.cli:main.
Arguments are checked — argparse errors, or a ValueError naming the flag — before the
run folder is created or written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import method_options as mo
from .cpu_allocator import tune_cpu_allocator
from .data import DATASETS
from .models import OWN_MODELS

PROG = "sparsekern"

# Run-control flags: how this invocation behaves, not what the run computes, so --resume
# may change them.
RUN_CONTROL = ("out", "resume", "progress", "stop_after", "malloc_defaults")
# Saved in the run's config, so that a plain --resume reuses them, but they say where the
# data is and how many CPU threads compute, not what the run is: --resume may change them
# (the dataset moved; a busier machine). A new --threads can change the float rounding of
# CPU kernels, no more.
RESUME_MAY_CHANGE = ("data_dir", "threads")


def _defaults() -> dict:
    from .train import RunConfig

    return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(RunConfig)}


def _named(name: str):
    """Gives an argparse type a readable name: argparse reports a type that raises
    ValueError as "invalid <type.__name__> value: 'x'", which would otherwise show the
    function's name (e.g. "invalid _positive_float value")."""
    def rename(parse):
        parse.__name__ = name
        return parse

    return rename


@_named("positive int")
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@_named("non-negative int")
def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fraction(low_open: bool, high_open: bool):
    @_named("fraction")
    def parse(text: str) -> float:
        value = float(text)
        ok = (0.0 < value if low_open else 0.0 <= value) and (value < 1.0 if high_open else value <= 1.0)
        if not ok:
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value}")
        return value

    return parse


@_named("LAYER=D pair")
def _layer_density(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected LAYER=D (a layer name and its density), got {text!r}")
    return name, _fraction(True, False)(value)


@_named("positive float")
def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def train_parser(methods: list[str] | None = None) -> argparse.ArgumentParser:
    """The `train` parser. `methods`: whose options to add (all by default; one when
    --help follows --method X)."""
    from .train import AMP, LR_SCHEDULES, OPTIMIZERS

    d = _defaults()
    shown = methods if methods is not None else list(mo.METHODS)
    p = argparse.ArgumentParser(
        prog=f"{PROG} train",
        description="Train a model with a pruning method on a dataset and leave a run folder: atomic "
                    "checkpoints (resumable), report.json, report.md, PNG plots and the exported model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=mo.method_epilog(shown) + "\n\nmodels:\n" + _indent(_models_help(), 2),
    )
    S = argparse.SUPPRESS  # run settings default to "not given": a new run fills RunConfig's defaults
    what = p.add_argument_group("what to train")
    what.add_argument("--method", choices=list(mo.METHODS), default=S, help="pruning method (required; see below)")
    what.add_argument("--model", default=S, metavar="NAME",
                      help=f"{', '.join(OWN_MODELS)} or a torchvision classification model name (required)")
    what.add_argument("--data", choices=DATASETS, default=S, help=f"dataset (default: {d['data']})")
    what.add_argument("--data-dir", default=S, metavar="PATH",
                      help="cifar10: the folder holding cifar-10-batches-py/ (never downloaded; --resume may give "
                           "a new one)")
    target = what.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=_fraction(False, True), default=S, metavar="S",
                        help="target fraction of pruned weights: the method's sparsity (or target_density = 1 - S)")
    target.add_argument("--density", type=_fraction(True, False), default=S, metavar="D",
                        help="target fraction of kept weights: the method's target_density (or sparsity = 1 - D)")
    target.add_argument("--layer-density", type=_layer_density, nargs="+", default=S, metavar="LAYER=D",
                        help="l0: one expected-density constraint per named layer (ConstrainedL0's target_density "
                             "dict), e.g. --layer-density conv1=0.5 fc=0.2; layers not named are gated but "
                             "unconstrained")

    sched = p.add_argument_group("schedule and optimiser")
    sched.add_argument("--epochs", type=_positive_int, default=S,
                       help=f"epochs (per round for imp/cs/concave; fine-tuning for oneshot) (default: {d['epochs']})")
    sched.add_argument("--rounds", type=_positive_int, default=S,
                       help=f"rounds of the round-based methods imp, cs, concave (default: {d['rounds']})")
    sched.add_argument("--pretrain-epochs", type=_nonnegative_int, default=S,
                       help="oneshot: dense epochs before pruning (default: --epochs)")
    sched.add_argument("--ticket-epochs", type=_nonnegative_int, default=S,
                       help="cs: epochs training the final ticket 1[s > 0] (default: --epochs; 0 exports the "
                            "search's ticket untrained)")
    sched.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help=f"(default: {d['optimizer']})")
    sched.add_argument("--lr", type=_positive_float, default=S, help=f"learning rate (default: {d['lr']})")
    sched.add_argument("--momentum", type=_fraction(False, True), default=S, help=f"SGD momentum (default: {d['momentum']})")
    sched.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S,
                       help=f"SGD Nesterov momentum (default: {d['nesterov']})")
    sched.add_argument("--weight-decay", type=float, default=S,
                       help=f"weight decay of the weights' group; mask parameters never decay (default: {d['weight_decay']})")
    sched.add_argument("--mask-lr", type=_positive_float, default=S,
                       help="lr of the mask parameters: passed to the method's constructor where it takes mask_lr "
                            "(cs: 0.1), else to param_groups(mask_lr=) (default: the method's own, else --lr)")
    sched.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=S,
                       help=f"per-step lr schedule within each phase/round (default: {d['lr_schedule']})")
    sched.add_argument("--milestones", type=_nonnegative_int, nargs="+", default=S, metavar="EPOCH",
                       help="multistep: epochs (within a phase) at which lr *= --gamma (default: 50%% and 75%% "
                            "of the phase's epochs, none below 4 epochs)")
    sched.add_argument("--gamma", type=_fraction(True, False), default=S, help=f"multistep factor (default: {d['gamma']})")
    sched.add_argument("--batch-size", type=_positive_int, default=S, help=f"(default: {d['batch_size']})")
    sched.add_argument("--test-batch-size", type=_positive_int, default=S, help=f"(default: {d['test_batch_size']})")
    sched.add_argument("--seed", type=_nonnegative_int, default=S,
                       help=f"seeds init, data split, batch order, gates (default: {d['seed']})")
    sched.add_argument("--amp", choices=AMP, default=S,
                       help="mixed precision: bf16 runs the forward, loss and penalty (training and evaluation) "
                            "under torch.autocast(bfloat16); weights, gradients and optimiser state stay "
                            f"float32 (default: {d['amp']})")
    sched.add_argument("--device", default=S, help=f"torch device, e.g. cpu, cuda, cuda:1 (default: {d['device']})")
    sched.add_argument("--threads", type=_positive_int, default=S,
                       help="CPU threads for torch (default: torch's choice; 1 is much faster on a busy machine; "
                            "--resume may change it)")

    run = p.add_argument_group("run folder and control")
    run.add_argument("--out", required=True, metavar="DIR", help="run folder, e.g. runs/NAME (required)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint, with its saved configuration "
                          "(other flags, if given, must match it, except --data-dir and --threads)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="tqdm progress bar per epoch (default: when stderr is a terminal)")
    run.add_argument("--max-batches", type=_positive_int, default=S, metavar="N",
                     help="train at most N batches per epoch (tests and smoke runs; part of the run's config)")
    run.add_argument("--stop-after", type=_positive_int, default=None, metavar="N",
                     help="stop after N epochs of this invocation, leaving a resumable run (tests, time-boxed jobs)")
    run.add_argument("--malloc-defaults", action="store_true",
                     help="keep glibc malloc's defaults; otherwise train calls sparsekern.tune_cpu_allocator(), "
                          "which keeps freed tensor memory for reuse instead of page-faulting it in every step")
    mo.add_method_arguments(p, mo.collect_options(shown if methods is not None else None))
    return p


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + ln for ln in text.splitlines())


def _models_help() -> str:
    from .models import model_help

    return model_help()


def _method_in(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


def _split(ns: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(run config values given, method options given, run-control values)."""
    d = _defaults()
    given = vars(ns)
    config = {k: v for k, v in given.items() if k in d and k != "method_options"}
    if config.get("layer_density") is not None:
        pairs = config["layer_density"]
        config["layer_density"] = dict(pairs)
        if len(config["layer_density"]) != len(pairs):
            raise ValueError("--layer-density names a layer twice")
    control = {k: given.get(k) for k in RUN_CONTROL}
    options = {k: v for k, v in given.items() if k not in d and k not in RUN_CONTROL}
    return config, options, control


def _load_saved_config(out: Path) -> dict:
    path = out / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found (is {out} a sparsekern run folder?)")
    return json.loads(path.read_text())


def _resume_config(out: Path, config: dict, options: dict):
    """The saved config; flags given must agree with it (a resumed run keeps its config),
    except RESUME_MAY_CHANGE's, which replace the saved values."""
    from .train import RunConfig, check_resumable, run_files

    # A run killed in its first epoch: say so, not "config.json not found", and before the
    # flags are compared with the saved config (else a user fixes flags for a run that has
    # nothing to resume). The Trainer checks again for Python users; that costs two stat()s.
    if run_files(out):
        check_resumable(out)
    saved = _load_saved_config(out)
    diffs = [f"--{k.replace('_', '-')} {v!r} (the run has {saved.get(k)!r})" for k, v in config.items()
             if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    saved_opts = saved.get("method_options", {})
    diffs += [f"--{k.replace('_', '-')} {v!r} (the run has {saved_opts.get(k, 'not given')!r})"
              for k, v in options.items() if saved_opts.get(k, object()) != v]
    if diffs:
        raise ValueError("--resume continues a run with its saved configuration; these differ from "
                         f"{out / 'config.json'}: " + "; ".join(diffs))
    saved.update({k: config[k] for k in RESUME_MAY_CHANGE if k in config})
    return RunConfig(**saved)


def _interrupted(trainer, out: Path) -> str:
    """The line printed on Ctrl-C: where the run's last checkpoint is, and how to go on."""
    resume = f"continue with --resume: {PROG} train --out {out} --resume"
    if trainer.saved_epochs is None:  # a resume, stopped while loading its checkpoint
        return f"interrupted; the run's checkpoint is unchanged; {resume}"
    if trainer.saved_epochs == 0:
        return (f"interrupted before the first checkpoint: nothing to resume; start again with another --out, "
                f"or after deleting the run's files in {out}")
    return f"interrupted; the last checkpoint is after epoch {trainer.saved_epochs}/{len(trainer.plan)}; {resume}"


def _refuse_unused(config: dict, options: dict) -> None:
    """ValueError for a flag the run would ignore: given, it says the user expects an effect."""
    from .ops.mask_math import LEARNABLE_KINDS

    # Both set the lr of the gates' group; param_groups(mask_lr=) overrode gate_lr, so
    # `--gate-lr 1.0 --mask-lr 0.5` trained the gates at 0.5 without a word.
    if "mask_lr" in config and "gate_lr" in options:
        raise ValueError(f"--mask-lr and --gate-lr both set the lr of the gates (log α) of --method "
                         f"{config['method']}: give one")

    sgd_only = [f for f in ("momentum", "nesterov") if f in config]
    if config.get("optimizer") == "adam" and sgd_only:
        raise ValueError(f"--{' / --'.join(sgd_only)}: SGD's, unused by --optimizer adam")
    cls = mo.method_class(config["method"])
    if "mask_lr" in config and getattr(cls, "mask_kind", None) not in LEARNABLE_KINDS:
        learnable = [m for m in mo.METHODS if getattr(mo.method_class(m), "mask_kind", None) in LEARNABLE_KINDS]
        raise ValueError(f"--mask-lr: --method {config['method']} has no learnable mask parameters "
                         f"(the methods that do: {', '.join(learnable)})")


def cmd_train(argv: list[str]) -> int:
    from . import train

    method = _method_in(argv)
    focused = [method] if ("-h" in argv or "--help" in argv) and method in mo.METHODS else None
    parser = train_parser(focused)
    ns = parser.parse_args(argv)
    out = Path(ns.out)
    try:
        config, options, control = _split(ns)
        if control["resume"]:
            cfg = _resume_config(out, config, options)
        else:
            missing = [f"--{k}" for k in ("method", "model") if k not in config]
            if missing:
                parser.error(f"the following arguments are required: {', '.join(missing)}")
            _refuse_unused(config, options)
            cfg = train.RunConfig(**config, method_options=options)
        trainer = train.Trainer(cfg, out, resume=control["resume"], progress=control["progress"])
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        per_layer = getattr(ns, "layer_density", None) is not None
        parser.exit(2, f"{parser.prog}: error: {mo.with_flags(str(e), layer_density=per_layer)}\n")
    except KeyboardInterrupt:  # e.g. while the data loads
        print(f"interrupted before the run started; nothing written to {out}", file=sys.stderr)
        return 130
    try:
        if not control["malloc_defaults"]:
            tune_cpu_allocator()
        report = train.execute(trainer, stop_after=control["stop_after"], command=["train", *argv])
    except train.Interrupted as e:
        print(f"{e}: {PROG} train --out {out} --resume")
        return 0
    except train.Diverged as e:
        print(f"{PROG} train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: one line, not a traceback; 130 is the shell's status for a SIGINT death.
        print(_interrupted(trainer, out), file=sys.stderr)
        return 130
    final = report["final"]
    print(f"done: test accuracy {final['test_accuracy']:.4f} (exported {final['exported_test_accuracy']:.4f}), "
          f"density {report['density']['global']:.4f}")
    print(f"report: {out / 'report.md'}  (also report.json, {', '.join(report['plots'])}, exported_model.pt2)")
    return 0


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} bench",
                                description="Run every bench/bench_*.py of the source tree (one subprocess each) and "
                                            "collect their tables in bench/results/README.md.")
    p.add_argument("--quick", action="store_true", help="pass --quick to the scripts that take it (smoke run; tables go to bench/results/quick/, "
                        "leaving the committed ones alone)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts (e.g. step inference)")
    p.add_argument("--bench-dir", type=Path, default=None,
                   help="the bench/ folder (default: the one beside the sparsekern package)")
    return p


def cmd_bench(argv: list[str]) -> int:
    from .bench_runner import run_benches

    parser = bench_parser()
    args = parser.parse_args(argv)
    try:
        return run_benches(args.bench_dir, quick=args.quick, only=args.only)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


COMMANDS = {"train": cmd_train, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog=PROG, description="sparsekern: kernels and pruning methods for training sparse networks.",
        epilog=f"`{PROG} train --help` lists every option, with each method's defaults; "
               f"`{PROG} train --method l0 --help` only that method's.")
    top.add_argument("command", choices=list(COMMANDS), help="train: train a model; bench: run the benchmarks")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # help, or the missing / invalid command error; exits
    return COMMANDS[argv[0]](argv[1:])
