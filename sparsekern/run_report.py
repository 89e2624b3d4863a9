"""The end of a run: export the model, measure it, and write report.json, report.md,
the plots and the exported model files into the run folder.

The exported model is sparsekern.export(model, purge=..., example_input=...): plain torch
modules with the masks baked in; purged (structured zero channels removed) when the
method is structured (L0 with structured gates, DPF mode=structured). CS exports its
binary ticket. It is saved twice:
  exported_state_dict.pt  torch.save(state_dict): load into the same architecture
                          (a purged model has narrower layers: use the .pt2 instead)
  exported_model.pt2      torch.export.save of the eval-mode ExportedProgram with a dynamic
                          batch dimension: torch.export.load(p).module() runs anywhere torch
                          does, with no sparsekern and no model class. (TorchScript is
                          deprecated; a pickled nn.Module would need this package's classes.)
                          Where torch.export refuses a model, exported_module.pt (the
                          pickled module) is written instead and the report says why.
Both are checked: the .pt2 is loaded back and compared with the exported module, and the
exported module with the masked model, on test inputs.

Every file is written atomically (sparsekern.checkpoint.write_atomic), and report.json
last: a run killed while writing its report (before, exported_model.pt2 was a truncated
zip if torch.export.save was under way, report.json half a JSON text, and report.json
stood without report.md between the two writes) leaves no truncated file, and
report.json only once everything it describes is on disk. --resume writes them again.

Model size, dense vs exported: params and MACs (Conv2d/Linear/attention
multiply-accumulates for one input, sparsekern.nn.count_macs) of the dense architecture and of the exported model, and
the exported model's nonzero params and "nonzero MACs" (each layer's MACs counting only
its nonzero weights: what a kernel that skips zeros would do).
"""
from __future__ import annotations

import json
import math
import platform
import shlex
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from . import plots
from .checkpoint import write_atomic
from .nn import export as export_model
from .nn.export import ATTENTION, attention_macs, forward_with_layer_hooks, is_attention
from .nn.attention import FLAT
from .nn.modules import SPARSE_TYPES
from .nn.report import layer_stats


def nonzero_params(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


@torch.no_grad()
def nonzero_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of the Conv2d / Linear / MultiheadAttention layers counting only nonzero
    weights: for an output of O channels, each output position costs the nonzero weights
    of its channel's row (attention: sparsekern.nn.export.attention_macs)."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if is_attention(m):
            total += attention_macs(m, inputs, nonzero=True)
            return
        rows = m.weight.reshape(m.weight.shape[0], -1).ne(0).sum(1)  # nonzero weights per output channel
        if isinstance(m, nn.Conv2d):
            total += int(out.shape[0] * out.shape[2] * out.shape[3] * rows.sum())
        else:
            total += int(out.numel() // out.shape[-1] * rows.sum())

    forward_with_layer_hooks(model, example, hook)
    return total


@torch.no_grad()
def layer_rows(model: nn.Module, exported: nn.Module) -> list[dict]:
    """One row per Conv2d / Linear of the trained model, sparse or left dense, with its
    shape in the exported model (narrower where purged)."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(m, SPARSE_TYPES):
            row = layer_stats(name, m)
        else:
            nz = int((m.weight != 0).sum())
            row = {"name": name, "kind": "dense", "shape": tuple(m.weight.shape), "numel": m.weight.numel(),
                   "nonzero": nz, "density": nz / m.weight.numel()}
        parent, _, child = name.rpartition(".")
        try:
            if child in FLAT and isinstance(exported.get_submodule(parent), ATTENTION):
                row["exported_shape"] = tuple(getattr(exported.get_submodule(parent), f"{child}_weight").shape)
            else:
                row["exported_shape"] = tuple(exported.get_submodule(name).weight.shape)
        except AttributeError:
            row["exported_shape"] = None
        rows.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()})
    return rows


def _target_text(target: float | None, per_layer: dict | None) -> str:
    if per_layer:
        return "per layer: " + ", ".join(f"{name} {eps:.4f}" for name, eps in per_layer.items())
    return "-" if target is None else f"{target:.4f}"


def removed_text(removed: dict[str, int]) -> str:
    """export stats' removed_channels as a sentence: "<layer>: N channels" per layer,
    "<attention>: N heads" for its "<attention>.heads" entries."""
    return ", ".join(f"{name[:-len('.heads')]}: {n} heads" if name.endswith(".heads") else f"{name}: {n} channels"
                     for name, n in removed.items())


def _cs_ticket_needed(method) -> bool:
    return hasattr(method, "export_ticket") and not getattr(method, "ticket", True)


def export_run(trainer) -> tuple[nn.Module, dict]:
    """The exported model and its stats; purge for structured methods (falls back to no
    purge, recorded, if the model cannot be traced)."""
    from .train import is_structured

    method, example = trainer.method, trainer.example[:1]  # one input: MACs per input
    purge = method is not None and is_structured(method)
    note = None
    try:
        if method is None:
            exported, stats = export_model(trainer.model, purge=purge, example_input=example)
        elif _cs_ticket_needed(method):
            # CS without ticket training (--ticket-epochs 0): its binary mask 1[s > 0], scaled
            # by 1/σ(s0) as the search's gate is in its β → ∞ limit.
            exported, stats = method.export_ticket(purge=purge, example_input=example, scaled=True)
        else:
            exported, stats = method.export(purge=purge, example_input=example)
    except ValueError as e:
        if not purge:
            raise
        note = f"purge failed, exported without it: {e}"
        exported, stats = method.export(purge=False, example_input=example)
        purge = False
    stats = dict(stats, purged=purge)
    if note:
        stats["note"] = note
    return exported.eval(), stats


@torch.no_grad()
def save_exported(exported: nn.Module, out: Path, example: torch.Tensor) -> dict:
    """exported_state_dict.pt and exported_model.pt2; returns what was written and checked."""
    info: dict = {"state_dict": "exported_state_dict.pt"}
    state = exported.state_dict()
    write_atomic(out / info["state_dict"], lambda f: torch.save(state, f))
    try:
        program = torch.export.export(exported, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        write_atomic(out / "exported_model.pt2", lambda f: torch.export.save(program, f))
        loaded = torch.export.load(out / "exported_model.pt2").module()
        info["program"] = "exported_model.pt2"
        info["program_max_abs_diff"] = float((loaded(example) - exported(example)).abs().max())
    except Exception as e:  # torch.export refuses some models: keep a pickled module instead
        info["program_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        write_atomic(out / "exported_module.pt", lambda f: torch.save(exported, f))
        info["module"] = "exported_module.pt"
    return info


def _method_history(method):
    history = getattr(method, "history", None)
    if not isinstance(history, list):
        return None
    try:
        return json.loads(json.dumps(history))
    except TypeError:
        return None


def write_report(trainer) -> dict:
    start = time.perf_counter()
    out, cfg, model, method = trainer.out, trainer.cfg, trainer.model, trainer.method
    exported, stats = export_run(trainer)
    files = save_exported(exported, out, trainer.example[:2])

    masked_eval = trainer.evaluate()
    exported_eval = trainer.evaluate(exported)
    model.eval()
    with torch.no_grad():
        x = next(trainer.data.test_batches(64))[0].to(trainer.device)
        diff = float((exported(x) - model(x)).abs().max())
    model.train()

    example1 = trainer.example[:1]
    rows = layer_rows(model, exported)
    final = dict(trainer.history[-1]) if trainer.history else {}
    final.pop("seconds", None)
    method_density = None if method is None else method.density()
    size = {
        # stats' "before" is the baked copy ahead of purging: the dense architecture.
        "dense": {"params": stats["params_before"], "macs": stats["macs_before"]},
        "exported": {"params": stats["params_after"], "nonzero_params": nonzero_params(exported),
                     "macs": stats["macs_after"], "nonzero_macs": nonzero_macs(exported, example1)},
        "purged": stats["purged"],
        "removed_channels": stats["removed_channels"],
        "kept_zero_channels": stats["kept_zero_channels"],
    }
    if "note" in stats:
        size["note"] = stats["note"]
    report = {
        "sparsekern_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {platform.system()}, device {cfg.device}",
        "command": trainer.command,  # the command line that started the run
        "resume_commands": trainer.resume_commands,  # then each --resume's, in order
        "config": cfg.to_json(),
        "steps_per_epoch": trainer.steps_per_epoch,
        "epochs_trained": len(trainer.history),
        "final": {
            **final,
            "test_accuracy": masked_eval["test_accuracy"],
            "test_loss": masked_eval["test_loss"],
            "exported_test_accuracy": exported_eval["test_accuracy"],
            "exported_max_abs_logit_diff": diff,
        },
        "density": {
            "global": 1.0 if method is None else method_density["global"],
            "layers": rows,
            "method": _jsonable(method_density),
            "all_weights": _all_weight_density(rows),
        },
        "model_size": size,
        "export": files,
        "history": trainer.history,
        "method_history": _method_history(method),
        "timing": {"train_seconds": trainer.elapsed},
    }
    plot_files = write_plots(report, out)
    report["plots"] = plot_files
    report["timing"]["report_seconds"] = time.perf_counter() - start
    # report.json last: the sign that the run is complete (see the module's docstring).
    write_atomic(out / "report.md", lambda f: f.write(markdown(report).encode()))
    write_atomic(out / "report.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    return report


def _all_weight_density(rows: list[dict]) -> float:
    numel = sum(r["numel"] for r in rows)
    return sum(r["nonzero"] for r in rows) / numel if numel else 1.0


def _jsonable(obj):
    if obj is None:
        return None
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_plots(report: dict, out: Path) -> list[str]:
    cfg = report["config"]
    title = f"{cfg['method']} · {cfg['model']} · {cfg['data']}"
    written = [plots.layer_density(report["density"]["layers"], out / "density_layers.png", title).name]
    if report["history"]:
        written.append(plots.training_curves(report["history"], out / "training.png", title).name)
        if any("expected_density" in h for h in report["history"]):
            written.append(plots.l0_curves(report["history"], out / "l0.png", title).name)
    return written


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    cfg, final, size = report["config"], report["final"], report["model_size"]
    dense, exp = size["dense"], size["exported"]
    lines = [f"# sparsekern run: {cfg['method']} on {cfg['model']} / {cfg['data']}", ""]
    commands = ([report["command"]] if report.get("command") else []) + report.get("resume_commands", [])
    if commands:
        lines += ["```", *("sparsekern " + shlex.join(c) for c in commands), "```", ""]
    target = cfg["density"] if cfg["density"] is not None else (None if cfg["sparsity"] is None else 1 - cfg["sparsity"])
    lines += [
        "## Result", "",
        _table(["", "value"], [
            ["test accuracy (masked model, eval mode)", _pct(final["test_accuracy"])],
            ["test accuracy (exported model)", _pct(final["exported_test_accuracy"])],
            ["max abs logit difference, exported vs masked", f"{final['exported_max_abs_logit_diff']:.3g}"],
            ["train accuracy (last epoch, running)", _pct(final["train_accuracy"]) if "train_accuracy" in final else "-"],
            ["density of the pruned layers", f"{report['density']['global']:.4f}"],
            ["target density", _target_text(target, cfg.get("layer_density"))],
            ["density of all Conv2d/Linear weights", f"{report['density']['all_weights']:.4f}"],
            *([["expected density (L0)", f"{final['expected_density']:.4f}"]] if "expected_density" in final else []),
            *([["largest multiplier λ (L0, one per layer)" if "worst_excess" in final else "multiplier λ (L0)",
                f"{final['lambda']:.4g}"]] if "lambda" in final else []),
            *([["largest excess of a layer's expected density over its target",
                f"{final['worst_excess']:+.4f}"]] if "worst_excess" in final else []),
            ["epochs", f"{report['epochs_trained']} × {report['steps_per_epoch']} steps"],
            ["training time", f"{report['timing']['train_seconds']:.1f} s"],
        ]), "",
        "## Model size: dense vs exported", "",
        _table(["", "dense", "exported", "exported / dense"], [
            ["params", f"{dense['params']:,}", f"{exp['params']:,}", f"{exp['params'] / dense['params']:.3f}"],
            ["nonzero params", f"{dense['params']:,}", f"{exp['nonzero_params']:,}",
             f"{exp['nonzero_params'] / dense['params']:.3f}"],
            ["MACs (1 input)", f"{dense['macs']:,}", f"{exp['macs']:,}", f"{exp['macs'] / dense['macs']:.3f}"],
            ["nonzero MACs", f"{dense['macs']:,}", f"{exp['nonzero_macs']:,}",
             f"{exp['nonzero_macs'] / dense['macs']:.3f}"],
        ]), "",
        f"Purged (structured channels and heads removed): {'yes' if size['purged'] else 'no'}"
        + (f"; removed: {removed_text(size['removed_channels'])}" if size["removed_channels"] else "")
        + (f"; all-zero channels kept: {size['kept_zero_channels']}" if size["kept_zero_channels"] else "")
        + (f". {size['note']}" if "note" in size else "") + ".", "",
        "## Per-layer density", "",
    ]
    rows = report["density"]["layers"]
    expected = any("expected_density" in r for r in rows)
    lines.append(_table(
        ["layer", "kind", "shape", "exported shape", "numel", "nonzero", "density"] + (["E[density]"] if expected else []),
        [[r["name"], r["kind"], "x".join(map(str, r["shape"])),
          "x".join(map(str, r["exported_shape"])) if r["exported_shape"] else "-",
          f"{r['numel']:,}", f"{r['nonzero']:,}", f"{r['density']:.4f}"]
         + ([f"{r['expected_density']:.4f}" if "expected_density" in r else ""] if expected else [])
         for r in rows]))
    lines += ["", "## Per epoch", ""]
    hist = report["history"]
    extra = [k for k in ("expected_density", "target_density", "worst_excess", "lambda", "beta", "alive")
             if any(k in h for h in hist)]
    lines.append(_table(
        ["epoch", "phase", "train loss", "train acc", "test acc", "density", *extra, "lr", "s"],
        [[h["epoch"], h["phase"] + (f" {h['round'] + 1}" if h["phase"] == "round" else ""),
          f"{h['train_loss']:.4f}", _pct(h["train_accuracy"]), _pct(h["test_accuracy"]), f"{h['density']:.4f}",
          *[(f"{h[k]:.4g}" if k in h and not math.isnan(h[k]) else "") for k in extra],
          f"{h['lr']:.4g}", f"{h['seconds']:.1f}"] for h in hist]))
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    files = report["export"]
    lines += ["", "## Files", "",
              f"- `{files['state_dict']}`: the exported model's state_dict (torch.save)"]
    if "program" in files:
        lines.append(f"- `{files['program']}`: torch.export program, eval mode, dynamic batch — "
                     f"`torch.export.load('{files['program']}').module()(x)`; max |diff| on reload "
                     f"{files['program_max_abs_diff']:.3g}")
    else:
        lines.append(f"- no torch.export program ({files.get('program_error')}); instead `{files['module']}`, "
                     "the pickled nn.Module: `torch.load(path, weights_only=False)`, needs the model's classes")
    lines += ["- `checkpoint.pt` / `checkpoint-prev.pt`: the last two epochs (resume with `--resume`)",
              "- `config.json`, `log.txt`, `report.json`"]
    return "\n".join(lines) + "\n"
