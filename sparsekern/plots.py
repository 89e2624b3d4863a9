"""The run report's PNG plots (matplotlib, Agg backend: no display needed), each written
atomically (sparsekern.checkpoint.write_atomic: a killed run leaves no half a PNG)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, also on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import write_atomic  # noqa: E402


def _save(fig, path: Path, **kwargs) -> Path:
    """fig.savefig to `path` atomically, in the format its suffix names (the temp file's
    .tmp suffix would not name one), and closes the figure."""
    fmt = Path(path).suffix[1:] or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=110, **kwargs))
    plt.close(fig)
    return Path(path)


def _phase_starts(history: list[dict]) -> list[tuple[int, str]]:
    """(epoch, label) where a round or phase begins, for vertical separators."""
    out = []
    for prev, cur in zip(history, history[1:]):
        if (prev["phase"], prev["round"]) != (cur["phase"], cur["round"]):
            label = f"round {cur['round'] + 1}" if cur["phase"] == "round" else cur["phase"]
            out.append((cur["epoch"], label))
    return out


def _separators(ax, history) -> None:
    for epoch, label in _phase_starts(history):
        ax.axvline(epoch - 0.5, color="grey", lw=0.8, ls=":")
        ax.text(epoch - 0.45, ax.get_ylim()[1], label, fontsize=7, va="top", color="grey")


def layer_density(rows: list[dict], path: Path, title: str) -> Path:
    """Horizontal bars: each layer's kept fraction (and E[density] for hard-concrete)."""
    names = [r["name"] for r in rows]
    # Room for the names (7-pt text, ~0.06 in a character; vit_b_16's 56-character names
    # were cut off at 7 in) beside a 4.5 in plot.
    width = 4.5 + 0.06 * max((len(n) for n in names), default=0)
    fig, ax = plt.subplots(figsize=(width, 0.28 * len(rows) + 1.8))
    y = range(len(rows))
    ax.barh(list(y), [r["density"] for r in rows], color="tab:blue", label="density (kept / total)")
    if any("expected_density" in r for r in rows):
        ax.scatter([r.get("expected_density", float("nan")) for r in rows], list(y), color="tab:orange",
                   zorder=3, s=14, label="expected density")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("density")
    ax.set_title(title, fontsize=9)
    # Below the axes: inside, it would hide the bars it explains.
    # 0.55 in below the axes whatever their height (a fixed fraction of a tall axes left
    # a wide gap above the legend).
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.55 / (0.28 * len(rows) + 0.6)), ncol=2,
              frameon=False)
    fig.tight_layout()
    return _save(fig, path, bbox_inches="tight")  # the saved image holds every label and the legend


def training_curves(history: list[dict], path: Path, title: str) -> Path:
    """Accuracy (train, test) and density per epoch, rounds / phases marked."""
    epochs = [h["epoch"] for h in history]
    fig, (acc, dens) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    acc.plot(epochs, [h["train_accuracy"] for h in history], marker=".", label="train (running, train mode)")
    acc.plot(epochs, [h["test_accuracy"] for h in history], marker=".", label="test")
    acc.set_ylabel("accuracy")
    acc.set_title(title, fontsize=9)
    acc.legend(fontsize=7)
    _separators(acc, history)
    dens.plot(epochs, [h["density"] for h in history], marker=".", label="density")
    if any("expected_density" in h for h in history):
        dens.plot(epochs, [h.get("expected_density") for h in history], marker=".", label="expected density")
    if any("target_density" in h for h in history):
        dens.plot(epochs, [h.get("target_density") for h in history], ls="--", color="k", label="target")
    dens.set_ylim(0, 1.05)
    dens.set_ylabel("density")
    dens.set_xlabel("epoch")
    dens.legend(fontsize=7)
    _separators(dens, history)
    fig.tight_layout()
    return _save(fig, path)


def l0_curves(history: list[dict], path: Path, title: str) -> Path:
    """Constrained L0: expected density against its target, and the multiplier λ."""
    epochs = [h["epoch"] for h in history]
    fig, (dens, lam) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    layers = list(history[-1].get("layer_targets", {}))
    if layers:  # one constraint per layer: each layer's E[density] against its own target
        for i, g in enumerate(layers):
            color = f"C{i % 10}"
            dens.plot(epochs, [h["layer_expected"][g] for h in history], marker=".", color=color, label=g)
            dens.plot(epochs, [h["layer_targets"][g] for h in history], ls="--", color=color)
            lam.plot(epochs, [h["layer_lambdas"][g] for h in history], marker=".", color=color)
        dens.set_ylabel("expected density (--: target)")
    else:
        dens.plot(epochs, [h["expected_density"] for h in history], marker=".", label="expected density")
        dens.plot(epochs, [h["density"] for h in history], marker=".", label="eval-gate density")
        if any("target_density" in h for h in history):
            dens.plot(epochs, [h.get("target_density") for h in history], ls="--", color="k", label="target")
        dens.set_ylabel("density")
    dens.set_title(title, fontsize=9)
    dens.legend(fontsize=7, ncol=max(1, len(layers) // 8))
    if layers:
        lam.set_ylabel("λ per layer (end of epoch)")
    elif any("lambda" in h for h in history):
        lam.plot(epochs, [h.get("lambda") for h in history], marker=".", color="tab:red")
        lam.set_ylabel("λ (end of epoch)")
    else:
        lam.text(0.5, 0.5, "penalised: fixed λ, no multiplier", ha="center", va="center", transform=lam.transAxes)
    lam.set_xlabel("epoch")
    fig.tight_layout()
    return _save(fig, path)
