"""report(): per-layer and global density of a sparse model, as a dict and a table."""
from __future__ import annotations

import torch
from torch import nn

from .masks import HardConcreteMask
from .sparsify import sparse_modules


class SparsityReport:
    """`layers`: one dict per sparse layer (name, kind, shape, numel, nonzero, density and,
    for hard_concrete, expected_density); `totals`: the same counts over all of them.

    nonzero counts the mask's support (MaskKind.keep): the weights export() leaves
    nonzero, except for sigmoid, whose support is CS's ticket s > 0 while its soft gate
    is never exactly 0. For hard_concrete, density is the eval (median) gate's and
    expected_density the expectation of the training gate's, E[#nonzero] / numel.
    """

    def __init__(self, layers: list[dict]):
        self.layers = layers
        numel = sum(r["numel"] for r in layers)
        nonzero = sum(r["nonzero"] for r in layers)
        self.totals = {"numel": numel, "nonzero": nonzero, "density": nonzero / numel if numel else 1.0}
        if any("expected_density" in r for r in layers):
            # Layers without gates count what they keep, so the figure covers the whole model.
            expected = sum(r.get("expected_nonzero", r["nonzero"]) for r in layers)
            self.totals["expected_density"] = expected / numel if numel else 1.0

    def to_dict(self) -> dict:
        return {"layers": [dict(r) for r in self.layers], "global": dict(self.totals)}

    def table(self) -> str:
        expected = "expected_density" in self.totals
        head = ["layer", "kind", "shape", "numel", "nonzero", "density"] + (["E[density]"] if expected else [])
        rows = [
            [r["name"], r["kind"], "x".join(map(str, r["shape"])), str(r["numel"]), str(r["nonzero"]), f"{r['density']:.4f}"]
            + ([f"{r['expected_density']:.4f}" if "expected_density" in r else ""] if expected else [])
            for r in self.layers
        ]
        t = self.totals
        rows.append(
            ["total", "", "", str(t["numel"]), str(t["nonzero"]), f"{t['density']:.4f}"]
            + ([f"{t['expected_density']:.4f}"] if expected else [])
        )
        widths = [max(len(c) for c in col) for col in zip(head, *rows)]
        numeric = [False, False, False] + [True] * (len(head) - 3)

        def line(cells):
            return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

        sep = "  ".join("-" * w for w in widths)
        return "\n".join([line(head), sep] + [line(r) for r in rows[:-1]] + [sep, line(rows[-1])])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"SparsityReport(layers={len(self.layers)}, density={self.totals['density']:.4f})"


@torch.no_grad()
def layer_stats(name: str, module: nn.Module) -> dict:
    """One report row for a sparse module."""
    w = module.weight
    nonzero = int(module.mask.keep(module).sum())
    row = {
        "name": name,
        "kind": module.mask.name,
        "shape": tuple(w.shape),
        "numel": w.numel(),
        "nonzero": nonzero,
        "density": nonzero / w.numel() if w.numel() else 1.0,
    }
    if isinstance(module.mask, HardConcreteMask):
        expected = float(module.mask.expected_nonzero(module))
        row["expected_nonzero"] = expected
        row["expected_density"] = expected / w.numel() if w.numel() else 1.0
    return row


def report(model: nn.Module) -> SparsityReport:
    """The density report of every SparseLinear / SparseConv2d in `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    return SparsityReport([layer_stats(n or type(m).__name__, m) for n, m in sparse_modules(model)])
