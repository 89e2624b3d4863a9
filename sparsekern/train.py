"""The training loop behind `sparsekern train`, and the run folder it leaves.

A run is a fixed plan of epochs decided up front from the config (see `make_plan`):
dense / gmp / dpf / l0 / l0-penalized train --epochs epochs; imp / cs / concave train
--rounds rounds of --epochs epochs with method.end_round() between rounds (prune, rewind,
fresh optimiser); cs then turns its mask into the binary ticket (method.to_ticket()) and
trains it --ticket-epochs epochs; oneshot trains dense --pretrain-epochs epochs, prunes
(OneShot is built on the trained model) and fine-tunes --epochs epochs.

Every step follows the method API (sparsekern/methods/base.py):
loss = CE + method.penalty(); backward; optimizer.step(); method.step(); and
method.end_epoch() after each epoch. The learning rate is set before every step from
the schedule at the fractional epoch (step in phase / steps per epoch), counting from the
rewind iteration after a rewind, i.e. "the lr schedule advanced to k". A round after a
rewind to k still trains --epochs full epochs, so its last k steps run at the schedule's
final value (clamped), rather than shortening the round's first epoch.

After every epoch — once its end-of-round action is done — the checkpoint is written
atomically (sparsekern.checkpoint) with the model, optimiser, method.state_dict(), the plan
position, the lr step counter, the RNG states, the history and the command lines (a
--resume writes the loaded one again with its own command added before it trains). The
batch order is a function of (seed, epoch) only (sparsekern.data), so `--resume`
reproduces the uninterrupted run bit for bit on CPU (on CUDA, as far as its kernels are
deterministic).

The run folder:
  config.json            the run's configuration (what --resume continues; a --resume that
                         gives a new --data-dir or --threads rewrites it)
  log.txt                one line per epoch
  checkpoint.pt          latest epoch; checkpoint-prev.pt the one before
  report.json, report.md, *.png      sparsekern.run_report / sparsekern.plots
  exported_state_dict.pt the exported plain model's state_dict (torch.save)
  exported_model.pt2     the same model as a torch.export ExportedProgram (eval mode,
                         dynamic batch): torch.export.load(path).module()(x) runs it
                         without sparsekern or the model's Python class
Every file but log.txt is written atomically (NAME.tmp, fsync, rename, fsync of the
folder), report.json last: a run killed at any moment (SIGKILL) leaves no truncated file,
only a stale NAME.tmp, and a report.json means the run is complete. log.txt is appended
to, each line flushed and fsynced (sparsekern.checkpoint.append_line).
"""
from __future__ import annotations

import copy
import glob
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import method_options as mo
from .data import Dataset, load_dataset
from .methods import schedules
from .models import build_model

LR_SCHEDULES = ("multistep", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam")
# Mixed precision: bfloat16 needs no loss scaling (float32's exponent range), so a step
# stays forward, backward, optimizer.step(), method.step(). float16 would need a
# GradScaler, whose skipped steps the methods' step counters would have to follow.
AMP = ("off", "bf16")

# Every file a run writes into its folder (from report.json on: sparsekern.run_report's).
# Any one of them means the folder holds a run, even without a checkpoint (one that died
# in its first epoch, or whose checkpoints were deleted): a new run there would append
# to its log and replace its reports. Other files do not count: a run writes only these
# names, so it never touches them, and a folder the user prepared (a .gitkeep, notes)
# stays usable.
# Each but log.txt is written atomically through NAME.tmp (sparsekern.checkpoint), which a
# killed run may leave behind.
_WRITTEN = ("config.json", ckpt.CHECKPOINT, "report.json", "report.md", "density_layers.png", "training.png",
            "l0.png", "exported_state_dict.pt", "exported_model.pt2", "exported_module.pt")
RUN_FOLDER_FILES = (*_WRITTEN, "log.txt", ckpt.PREVIOUS, *(n + ".tmp" for n in _WRITTEN))


# torch's SGD and Adam default to a loop of per-tensor ops on the CPU (several passes and a
# temporary per parameter); the fused kernels take one pass. Over ResNet-18's 11.2M weights
# (2-core machine) an SGD step took 11.1 ms looped vs 4.6 ms fused, Adam 135 vs 22 ms;
# SGD's result was bit-identical, Adam's within 1 ulp. Fused needs every parameter on a
# device with the kernels and of a floating dtype they take, else the loop stays.
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_ok(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)


@dataclass
class RunConfig:
    """Everything that determines a run's result, plus where its data is (data_dir) and
    how many CPU threads run it (threads), which --resume may change. --resume continues
    with the saved one."""

    method: str
    model: str
    data: str = "digits"
    data_dir: str | None = None
    sparsity: float | None = None
    density: float | None = None
    layer_density: dict[str, float] | None = None  # l0: {layer name: ε}, one constraint each
    epochs: int = 10
    rounds: int = 1
    pretrain_epochs: int | None = None  # oneshot; None: --epochs
    ticket_epochs: int | None = None    # cs; None: --epochs
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    mask_lr: float | None = None
    lr_schedule: str = "multistep"
    milestones: list[int] | None = None  # None: 50% and 75% of a phase's epochs
    gamma: float = 0.1
    batch_size: int = 64
    test_batch_size: int = 512
    max_batches: int | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None: torch's default
    amp: str = "off"  # "bf16": forward, loss and penalty under torch.autocast(bfloat16)
    method_options: dict = field(default_factory=dict)  # the method flags given, by argument name

    def __post_init__(self):
        # Absolute, so that a --resume from another working directory finds the data.
        if self.data_dir is not None:
            self.data_dir = os.path.abspath(os.path.expanduser(self.data_dir))

    def validate(self) -> None:
        """ValueError naming the flag for every out-of-range value."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        mo.method_class(self.method)  # unknown / unavailable method
        need(self.sparsity is None or self.density is None, "give --sparsity or --density, not both")
        need(self.sparsity is None or 0.0 <= self.sparsity < 1.0, f"--sparsity must be in [0, 1), got {self.sparsity}")
        need(self.density is None or 0.0 < self.density <= 1.0, f"--density must be in (0, 1], got {self.density}")
        if self.layer_density is not None:
            need(self.method == "l0", f"--layer-density is for --method l0 (ConstrainedL0), not --method {self.method}")
            need(self.sparsity is None and self.density is None,
                 "give --layer-density or --sparsity/--density, not both")
            need(isinstance(self.layer_density, dict) and len(self.layer_density) > 0,
                 "--layer-density needs at least one LAYER=D")
            for name, d in self.layer_density.items():
                need(isinstance(d, (int, float)) and 0.0 < d <= 1.0, f"--layer-density {name}={d}: D must be in (0, 1]")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        need(self.rounds == 1 or self.method in mo.ROUND_BASED,
             f"--rounds applies to the round-based methods {list(mo.ROUND_BASED)} only, not --method {self.method}")
        for name, method in (("pretrain_epochs", "oneshot"), ("ticket_epochs", "cs")):
            v = getattr(self, name)
            need(v is None or v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
            # Ignored by the other methods; and --milestones was checked against it.
            need(v is None or self.method == method,
                 f"--{name.replace('_', '-')} is for --method {method}, not --method {self.method}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {list(OPTIMIZERS)}")
        need(self.amp in AMP, f"--amp must be one of {list(AMP)}, got {self.amp!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        # torch checks this in SGD's defaults only, not per group: it ran plain SGD.
        need(not (self.optimizer == "sgd" and self.nesterov and self.momentum == 0),
             "--nesterov needs --momentum > 0")
        # inf passed: the first step made every weight NaN, after config.json and log.txt were written.
        need(self.weight_decay >= 0 and math.isfinite(self.weight_decay),
             f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        need(self.mask_lr is None or self.mask_lr > 0, f"--mask-lr must be > 0, got {self.mask_lr}")
        need(self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {list(LR_SCHEDULES)}")
        need(self.milestones is None or all(m >= 0 for m in self.milestones), "--milestones must be >= 0")
        # Epoch indices within a phase: one at or past the longest phase's length never fires.
        longest = max(self.epochs, self.pretrain_epochs or 0, self.ticket_epochs or 0)
        late = [m for m in self.milestones or [] if m >= longest]
        need(not late, f"--milestones {' '.join(map(str, late))}: no phase has that many epochs (the longest has "
                       f"{longest}), so the lr would never decay there")
        need(self.data_dir is None or self.data == "cifar10",
             f"--data-dir is for --data cifar10; --data {self.data} ships with the package")
        need(0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.test_batch_size >= 1, f"--test-batch-size must be >= 1, got {self.test_batch_size}")
        need(self.max_batches is None or self.max_batches >= 1, f"--max-batches must be >= 1, got {self.max_batches}")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        # scikit-learn's split refused it, in a message that named its own `random_state`.
        need(self.data != "digits" or self.seed < 2**32,
             f"--seed must be < 2**32 = {2**32} with --data digits (scikit-learn's train/test split takes 32-bit "
             f"seeds), got {self.seed}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"--device {self.device!r}: {e}") from None
        need(device.type != "cuda" or torch.cuda.is_available(), f"--device {self.device}: CUDA is not available")
        # meta tensors have no values: the run wrote config.json and log.txt, then died in
        # torch.autocast with a traceback.
        need(device.type != "meta", "--device meta holds shapes only, no values: nothing can be trained on it")
        try:
            # A device torch knows by name but cannot use here (mps / xpu in a build without
            # them, cuda:7 on a one-GPU machine) raised a traceback while the model was built.
            torch.empty(0, device=device)
        except Exception as e:  # NotImplementedError, RuntimeError, AssertionError, ... by backend
            raise ValueError(f"--device {self.device}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                             ) from None

    @property
    def target_sparsity(self) -> float | None:
        return self.sparsity if self.density is None else 1.0 - self.density

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class EpochSpec:
    """One epoch of the plan. `after`: what happens once it is trained and evaluated:
    "end_round", "to_ticket" (CS), "prune" (oneshot builds its method) or None."""

    phase: str
    round: int
    epoch: int         # within the phase / round
    phase_epochs: int
    after: str | None = None


def make_plan(cfg: RunConfig, method_cls) -> list[EpochSpec]:
    plan: list[EpochSpec] = []
    if cfg.method == "oneshot":
        pre = cfg.epochs if cfg.pretrain_epochs is None else cfg.pretrain_epochs
        plan += [EpochSpec("pretrain", 0, e, pre) for e in range(pre)]
        if plan:
            plan[-1].after = "prune"
        plan += [EpochSpec("finetune", 0, e, cfg.epochs) for e in range(cfg.epochs)]
        return plan
    if cfg.method in mo.ROUND_BASED:
        for r in range(cfg.rounds):
            plan += [EpochSpec("round", r, e, cfg.epochs) for e in range(cfg.epochs)]
            if r < cfg.rounds - 1:
                plan[-1].after = "end_round"
        ticket = cfg.epochs if cfg.ticket_epochs is None else cfg.ticket_epochs
        if hasattr(method_cls, "to_ticket") and ticket > 0:
            plan[-1].after = "to_ticket"
            plan += [EpochSpec("ticket", cfg.rounds, e, ticket) for e in range(ticket)]
        return plan
    return [EpochSpec("train", 0, e, cfg.epochs) for e in range(cfg.epochs)]


def lr_factor(cfg: RunConfig, epoch: float, phase_epochs: int) -> float:
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        return schedules.cosine_lr(1.0, epoch, phase_epochs)
    return schedules.multistep_lr(1.0, epoch, milestones(cfg, phase_epochs), cfg.gamma)


def milestones(cfg: RunConfig, phase_epochs: int) -> list[int]:
    if cfg.milestones is not None:
        return list(cfg.milestones)
    return [phase_epochs // 2, (3 * phase_epochs) // 4] if phase_epochs >= 4 else []


def is_structured(method) -> bool:
    """Methods whose masks remove whole channels: their export is purged."""
    return bool(getattr(method, "structured", False)) or getattr(method, "mode", None) == "structured"


def method_scalars(method) -> dict:
    """The per-epoch numbers worth logging: density, and where the method has them the
    expected density (L0), the multiplier λ and the target (constrained L0), β (CS), the
    alive fraction (concave)."""
    if method is None:
        return {"density": 1.0}
    d = method.density()
    out = {"density": d["global"]}
    if "expected" in d:
        out["expected_density"] = d["expected"]["global"]
    if "multipliers" in d and d["multipliers"]:
        lams, targets = list(d["multipliers"].values()), list(d["targets"].values())
        if len(lams) == 1:
            out["lambda"], out["target_density"] = lams[0], targets[0]
        else:
            # One constraint per layer: the global E[density] has no single target (the
            # mean of the layers' targets was logged beside it, with the largest λ: a
            # misleading pair), so each layer's E[density], target and λ are kept, and the
            # log line shows the worst layer's excess over its target and the largest λ.
            expected = d["expected"]["layers"]
            out["lambda"] = max(lams)
            out["layer_expected"] = {g: expected[g] for g in d["targets"]}
            out["layer_targets"] = dict(d["targets"])
            out["layer_lambdas"] = dict(d["multipliers"])
            out["worst_excess"] = max(expected[g] - eps for g, eps in d["targets"].items())
    if "beta" in d:
        out["beta"] = d["beta"]
    if "alive" in d:
        out["alive"] = d["alive"]["global"]
    return out


def format_line(entry: dict, total_epochs: int) -> str:
    where = f"epoch {entry['epoch']}/{total_epochs}"
    if entry["phase"] != "train":
        where += f" [{entry['phase']}" + (f" {entry['round'] + 1}" if entry["phase"] == "round" else "") \
                 + f" epoch {entry['phase_epoch'] + 1}]"
    parts = [where, f"loss {entry['train_loss']:.4f}"]
    if entry.get("penalty"):
        parts.append(f"penalty {entry['penalty']:.3g}")
    parts += [f"train acc {entry['train_accuracy']:.4f}", f"test acc {entry['test_accuracy']:.4f}",
              f"density {entry['density']:.4f}"]
    if "expected_density" in entry:
        parts.append(f"E[density] {entry['expected_density']:.4f}")
    if "target_density" in entry:
        parts.append(f"target {entry['target_density']:.4f}")
    if "worst_excess" in entry:
        parts.append(f"max layer E[density] − target {entry['worst_excess']:+.4f}")
    if "lambda" in entry:
        parts.append(("max λ " if "worst_excess" in entry else "λ ") + f"{entry['lambda']:.4g}")
    if "beta" in entry:
        parts.append(f"β {entry['beta']:.4g}")
    parts += [f"lr {entry['lr']:.4g}", f"{entry['seconds']:.1f}s"]
    return "  ".join(parts)


class Diverged(Exception):
    """The loss became NaN or infinite: the run stops before checkpointing that epoch."""


class Interrupted(Exception):
    """Raised by --stop-after: the run stopped early and can be resumed."""


class Trainer:
    """Builds everything for a run (validating every argument before the run folder is
    touched), then trains it epoch by epoch. Use `sparsekern.train.run()`."""

    def __init__(self, cfg: RunConfig, out: Path, *, resume: bool = False, progress: bool | None = None,
                 log: Callable[[str], None] = print):
        # expanduser: as --data-dir; a quoted '~/runs/x' made a folder named '~' in the working directory.
        self.cfg, self.out, self.resume, self.progress, self._print = cfg, Path(out).expanduser(), resume, progress, log
        cfg.validate()
        check_out(self.out)
        if resume:
            check_resumable(self.out)
        found = run_files(self.out)
        if not resume and found:
            if ckpt.exists(self.out):
                raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it, "
                                      "or choose another --out")
            raise FileExistsError(f"{self.out} already holds a run ({', '.join(found)}) but no checkpoint to "
                                  "resume it from; choose another --out, or delete those files")
        self.device = torch.device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.method_cls = mo.method_class(cfg.method)
        _seed_everything(cfg.seed)
        self.data: Dataset = load_dataset(cfg.data, seed=cfg.seed, data_dir=cfg.data_dir)
        self.steps_per_epoch = self.data.num_batches(cfg.batch_size, cfg.max_batches)
        self.plan = make_plan(cfg, self.method_cls)
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes).to(self.device)
        self.example = self.data.example_input(2).to(self.device)
        self._check_last_batch()
        self.method_kwargs, self.param_mask_lr = self._method_kwargs()
        self._check_rewind_point()
        self.method = None
        if self.method_cls is not None:
            if cfg.method == "oneshot" and self.plan[0].phase == "pretrain":
                # Built after pretraining; a throwaway copy checks its arguments now.
                self.method_cls(copy.deepcopy(self.model), **self.method_kwargs)
            else:
                self.method = self.method_cls(self.model, **self.method_kwargs)
        self.optimizer = self._optimizer()
        self.history: list[dict] = []
        self.next_epoch = 0     # index into the plan
        self.phase_step = 0     # the lr schedule's step counter within the phase
        self.elapsed = 0.0
        self.resumed_from: str | None = None
        self.saved_epochs: int | None = None if resume else 0  # epochs in the checkpoint; None: not loaded yet
        self.command: list[str] | None = None  # the command line that started the run
        self.resume_commands: list[list[str]] = []  # then each --resume's

    # ---- construction
    def _method_kwargs(self) -> tuple[dict, float | None]:
        cfg = self.cfg
        given = dict(cfg.method_options)
        if self.method_cls is None:
            mo.method_kwargs(cfg.method, given, sparsity=cfg.target_sparsity, density=cfg.density,
                             layer_density=cfg.layer_density, epochs=cfg.epochs,
                             seed=cfg.seed, end_iteration_default=None, rounds=cfg.rounds)
            if cfg.mask_lr is not None:
                raise ValueError("--mask-lr: --method dense has no mask parameters")
            return {}, None
        phase_epochs = self.plan[-1].phase_epochs
        end = mo.derived_end_iteration(milestones(cfg, phase_epochs) if cfg.lr_schedule == "multistep" else None,
                                       phase_epochs, self.steps_per_epoch)
        # --mask-lr goes to the constructor when it takes one (CS), else to param_groups().
        ctor = {p.name for p in mo.constructor_parameters(self.method_cls)}
        mask_lr = cfg.mask_lr
        if mask_lr is not None and "mask_lr" in ctor:
            given["mask_lr"], mask_lr = mask_lr, None
        kwargs = mo.method_kwargs(cfg.method, given, sparsity=cfg.target_sparsity, density=cfg.density,
                             layer_density=cfg.layer_density,
                                  epochs=cfg.epochs, seed=cfg.seed, end_iteration_default=end, rounds=cfg.rounds)
        start = given.get("start_iteration")
        if "end_iteration" in ctor and "end_iteration" not in given and isinstance(start, int) and start >= end:
            # GMP's check then said "`end_iteration` (--end-iteration) must be >= 4, got 2":
            # a flag the user never gave, and a value they could not see.
            raise ValueError(f"--start-iteration {start}: the sparsity schedule ends at step {end}, before it would "
                             f"start (--end-iteration not given: the step of the second lr decay, else 3/4 of the "
                             f"{phase_epochs * self.steps_per_epoch} training steps); give --end-iteration > {start}")
        steps = phase_epochs * self.steps_per_epoch
        if isinstance(given.get("end_iteration"), int) and given["end_iteration"] > steps:
            # Accepted before: `gmp --density 0.2 --end-iteration 100000` finished far from its
            # target, the schedule cut off where training stopped.
            raise ValueError(f"--end-iteration {given['end_iteration']}: the run trains {steps} steps "
                             f"({phase_epochs} epoch(s) of {self.steps_per_epoch}), so the sparsity schedule would "
                             f"never reach its target; give --end-iteration <= {steps}")
        return kwargs, mask_lr

    def _check_last_batch(self) -> None:
        """ValueError naming --batch-size when an epoch's last batch holds one image and the
        model cannot train on one (a BatchNorm over 1x1 maps: "Expected more than 1 value per
        channel when training"). digits' 1,437 training images in batches of 2 or 4 left one;
        torchvision's resnet18 on digits then died with that traceback at the end of its
        first epoch, after config.json and log.txt were written. The probe is a training-mode
        forward of one image through a copy of the model, under a forked RNG (dropout draws
        must not shift the run's), and only when the last batch is a single image."""
        n, b = len(self.data.train_y), self.cfg.batch_size
        if n <= b or n - (self.steps_per_epoch - 1) * b != 1:  # --max-batches may stop before it
            return
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                copy.deepcopy(self.model).train()(self.example[:1])
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"--batch-size {b}: each epoch's last batch holds 1 image ({n} = {n // b} x {b} + 1), "
                             f"and --model {self.cfg.model} cannot train on a batch of one ({str(e).splitlines()[0]}); "
                             "choose another --batch-size") from None

    def _check_rewind_point(self) -> None:
        """ValueError naming --rewind-iteration when the first rewind (end_round, or CS's
        to_ticket) comes before that step: the weights to rewind to would not exist yet,
        and end_round() raised a RuntimeError after the first round had trained, leaving
        a folder that neither --resume nor a new run could use."""
        first = next((i for i, spec in enumerate(self.plan) if spec.after in ("end_round", "to_ticket")), None)
        k = self.method_kwargs.get("rewind_iteration", 0)
        if first is None or not isinstance(k, int):  # a bad type: the constructor names it
            return
        steps = (first + 1) * self.steps_per_epoch
        if k > steps:
            raise ValueError(f"--rewind-iteration {k}: the first round ends after {steps} steps ({first + 1} "
                             f"epoch(s) of {self.steps_per_epoch}), before the weights of step {k} it would "
                             f"rewind to exist; give --rewind-iteration <= {steps}")

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        extra = {"momentum": cfg.momentum, "nesterov": cfg.nesterov} if cfg.optimizer == "sgd" else {}
        if self.method is None:
            groups = [{"params": list(self.model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                       "name": "weights", **extra}]
        else:
            groups = self.method.param_groups(cfg.lr, cfg.weight_decay, mask_lr=self.param_mask_lr, **extra)
        for g in groups:
            g["initial_lr"] = g["lr"]  # the schedule scales each group's own base lr
        cls = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
        return cls(groups, lr=cfg.lr, fused=_fused_ok(groups))

    # ---- resume
    def load(self) -> None:
        state, path = ckpt.load(self.out, map_location=self.device)
        self.resumed_from = path.name
        if state["method"] is not None and self.method is None:
            self.method = self.method_cls(self.model, **self.method_kwargs)  # oneshot after its prune
        if self.method is not None and state["method"] is not None:
            self._rebuild_on_saved_layers(state["method"])
            # Method first: CS's ticket phase converts the layers the model state then fills.
            self.method.load_state_dict(state["method"])
        self.model.load_state_dict(state["model"])
        self.optimizer = self._optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        self.next_epoch, self.phase_step = state["next_epoch"], state["phase_step"]
        self.elapsed = state["elapsed"]
        self.saved_epochs = self.next_epoch
        # Checkpoints written before the commands were kept have neither.
        self.command, self.resume_commands = state.get("command"), state.get("resume_commands", [])
        ckpt.set_rng_states(state["rng"])
        if self.next_epoch >= len(self.plan):
            self.log(f"resumed from {path}: all {len(self.plan)} epochs are done; writing the report again")
        else:
            self.log(f"resumed from {path} at epoch {self.next_epoch + 1}/{len(self.plan)}")

    def _rebuild_on_saved_layers(self, method_state: dict) -> None:
        """A run whose config gives no include resumes over the layers its checkpoint holds
        masks for. The default selection can change between versions (the structured modes
        took every conv before they defaulted to purgeable_layers), and a run started under
        the old one then failed to resume ("state ['masks'] entries differ"): the model and
        method are built again on the saved layers; the checkpoint then fills them."""
        saved = sorted({key.rsplit(".", 1)[0] for key in method_state.get("masks", {})})
        if "include" in self.cfg.method_options or saved == sorted(name for name, _ in self.method.layers):
            return
        self.log(f"the checkpoint's {len(saved)} sparse layers differ from today's default selection for "
                 f"{self.cfg.method} ({len(self.method.layers)}); resuming on the checkpoint's")
        self.model = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes).to(self.device)
        self.method_kwargs = {**self.method_kwargs, "include": [glob.escape(name) for name in saved]}
        self.method = self.method_cls(self.model, **self.method_kwargs)

    def save(self, *, same_epoch: bool = False) -> None:
        """The checkpoint of the epochs done; same_epoch: the one loaded, written again
        (checkpoint-prev.pt stays the epoch before it)."""
        ckpt.save(self.out, {
            "format": 1,
            "config": self.cfg.to_json(),
            "next_epoch": self.next_epoch,  # epochs of the plan done
            # Where that is, for people reading the file (the plan says it too).
            "position": None if not self.next_epoch else {
                k: getattr(self.plan[self.next_epoch - 1], k) for k in ("phase", "round", "epoch", "after")},
            "phase_step": self.phase_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": None if self.method is None else self.method.state_dict(),
            "rng": ckpt.rng_states(),
            # The batch order is drawn from (seed, epoch): this is all the loader's state.
            "loader": {"seed": self.cfg.seed, "next_epoch": self.next_epoch},
            "history": self.history,
            "elapsed": self.elapsed,
            "command": self.command,
            "resume_commands": self.resume_commands,
        }, keep_previous=same_epoch)
        self.saved_epochs = self.next_epoch

    # ---- the loop
    def log(self, line: str) -> None:
        self._print(line)
        ckpt.append_line(self.out / "log.txt", line)  # durable before the checkpoint that follows it

    def _set_lr(self, spec: EpochSpec) -> float:
        factor = lr_factor(self.cfg, self.phase_step / self.steps_per_epoch, spec.phase_epochs)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def autocast(self):
        """The forward's precision: under --amp bf16, torch.autocast(bfloat16) on the run's
        device (parameters, gradients and optimiser state stay float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16")

    def train_epoch(self, index: int, spec: EpochSpec) -> dict:
        from tqdm import tqdm

        cfg, model, method = self.cfg, self.model, self.method
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        pen_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        batches = self.data.batches(cfg.batch_size, seed=cfg.seed, epoch=index, max_batches=cfg.max_batches)
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {index + 1}/{len(self.plan)}", leave=False,
                   disable=None if self.progress is None else not self.progress, file=sys.stderr)
        lr = 0.0
        for x, y in bar:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            lr = self._set_lr(spec)
            with self.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                total = loss
                if method is not None:
                    penalty = method.penalty()
                    total = loss + penalty
                    pen_sum += penalty.detach().double()
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            if method is not None:
                method.step()
            self.phase_step += 1
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if bar.n % 10 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        steps = max(1, math.ceil(seen / cfg.batch_size))
        return {"train_loss": float(loss_sum) / max(seen, 1), "train_accuracy": int(correct) / max(seen, 1),
                "penalty": float(pen_sum) / steps, "lr": lr}

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict:
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in self.data.test_batches(self.cfg.test_batch_size):
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                logits = model(x).float()  # the loss in float32, as autocast computes training's
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        model.train(was_training)
        return {"test_loss": loss_sum / max(n, 1), "test_accuracy": correct / max(n, 1)}

    def _after(self, spec: EpochSpec) -> None:
        """The plan's action after an epoch; each builds a fresh optimiser."""
        if spec.after is None:
            return
        if spec.after == "prune":
            self.method = self.method_cls(self.model, **self.method_kwargs)
            self.phase_step = 0
        elif spec.after == "end_round":
            self.method.end_round()
            self.phase_step = self.method.rewind_iteration
        elif spec.after == "to_ticket":
            self.method.to_ticket()
            self.phase_step = self.method.rewind_iteration
        self.optimizer = self._optimizer()
        self.log(f"{spec.after.replace('_', ' ')}: density now {method_scalars(self.method)['density']:.4f}")

    def fit(self, stop_after: int | None = None) -> None:
        """Trains the rest of the plan; with stop_after, at most that many epochs (then
        raises Interrupted, leaving a resumable run)."""
        done_here = 0
        while self.next_epoch < len(self.plan):
            if stop_after is not None and done_here >= stop_after:
                raise Interrupted(f"stopped after {done_here} epoch(s) (--stop-after); continue with --resume")
            index = self.next_epoch
            spec = self.plan[index]
            start = time.perf_counter()
            train = self.train_epoch(index, spec)
            test = self.evaluate()
            entry = {"epoch": index + 1, "phase": spec.phase, "round": spec.round, "phase_epoch": spec.epoch,
                     **train, **test, **method_scalars(self.method)}
            if self.method is not None:
                self.method.end_epoch()
            entry["seconds"] = time.perf_counter() - start
            self.elapsed += entry["seconds"]
            self.history.append(entry)
            self.log(format_line(entry, len(self.plan)))
            if not math.isfinite(entry["train_loss"]):
                # Not saved: the checkpoints keep the last finite epochs. A --mask-lr inf run
                # (now refused) went on to print "done" with every number NaN.
                kept = f"its last checkpoint is after epoch {index}" if index else "no checkpoint was written"
                raise Diverged(f"training diverged in epoch {index + 1} (train loss {entry['train_loss']}); that "
                               f"epoch is not checkpointed ({kept}). Start a new run with a lower --lr / --mask-lr")
            self._after(spec)
            self.next_epoch = index + 1
            self.save()
            done_here += 1


def check_out(out: Path) -> None:
    """ValueError naming --out unless `out` is a folder, or one can be created there.
    Called before the data is loaded; leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    # Only trying tells: os.access says yes to root, and to places such as /proc that
    # refuse new entries anyway.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sparsekern-probe-", dir=existing))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create a folder in {existing} ({e.strerror})") from None


def run_files(out: Path) -> list[str]:
    """The RUN_FOLDER_FILES in `out`."""
    return [name for name in RUN_FOLDER_FILES if (Path(out) / name).is_file()]


def check_resumable(out: Path) -> None:
    """FileNotFoundError unless `out` holds a checkpoint. A run killed in its first epoch
    (SIGKILL, a power cut: no Ctrl-C message) left config.json and log.txt: --resume said
    only "no checkpoint in X" (or "config.json not found" when killed while writing it)."""
    if ckpt.exists(out):
        return
    found = run_files(out)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    # What a run writes before its first checkpoint; anything more: checkpoints deleted.
    early = set(found) <= {"config.json", "config.json.tmp", "log.txt", ckpt.CHECKPOINT + ".tmp"}
    why = "stopped before its first checkpoint (written after each epoch)" if early else "has no checkpoint"
    raise FileNotFoundError(f"--resume: the run in {out} {why}, so there is nothing to resume; start it again "
                            f"with another --out, or after deleting its files ({', '.join(found)})")


def write_config(out: Path, cfg: RunConfig) -> None:
    """config.json, atomically (temp file + rename): a --resume rewrites it, and a crash
    half-way must not leave a run that cannot be resumed."""
    ckpt.write_atomic(out / "config.json", lambda f: f.write((json.dumps(cfg.to_json(), indent=2) + "\n").encode()))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def execute(trainer: Trainer, *, stop_after: int | None = None, command: list[str] | None = None) -> dict:
    """Trains (or resumes) the prepared run, then writes the report, plots and exported
    model and returns the report dict. Raises Interrupted after `stop_after` epochs.
    `command`: this invocation's command line, kept in the checkpoint and the report (a
    resumed run's report shows the command that started it, then each --resume)."""
    from .run_report import write_report

    cfg = trainer.cfg
    ckpt.make_folder(trainer.out)
    if trainer.resume:
        trainer.load()
        write_config(trainer.out, cfg)  # its --data-dir / --threads may be new
        if command is not None:
            # Checkpointed before this resume does any work. Appended in memory only, the
            # command reached the disk with the next epoch's checkpoint, so a resume killed
            # before one (in its first epoch, or writing the report of a run whose epochs
            # were all done: no checkpoint follows) was missing from the report of the
            # resume after it. Now every "resumed from" line of log.txt has its command in
            # resume_commands. The loaded epoch written again replaces checkpoint.pt only
            # (checkpoint-prev.pt stays the epoch before); it costs one checkpoint write
            # per resume, and keeps the commands in the one file that --resume reads.
            trainer.resume_commands.append(command)
            trainer.save(same_epoch=True)
    else:
        trainer.command = command
        write_config(trainer.out, cfg)
        trainer.log(f"sparsekern train: {cfg.method} on {cfg.model}/{cfg.data}, {len(trainer.plan)} epochs of "
                    f"{trainer.steps_per_epoch} steps, run folder {trainer.out}")
    trainer.fit(stop_after=stop_after)
    return write_report(trainer)


def run(cfg: RunConfig, out, *, resume: bool = False, progress: bool | None = None, stop_after: int | None = None,
        command: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Python entry point: `sparsekern train` without the argument parsing. Every argument
    is checked (Trainer) before `out` is written."""
    trainer = Trainer(cfg, Path(out), resume=resume, progress=progress, log=log)
    return execute(trainer, stop_after=stop_after, command=command)
