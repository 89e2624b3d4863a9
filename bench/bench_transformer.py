"""Inference: an nn.TransformerEncoder whose feed-forward units structured L0 closed,
purged, against the dense encoder, CPU.

The model: 4 encoder layers, d_model 256, 4 heads, 1024 feed-forward units, batch_first,
eval mode, no gradients (torch's fused fast path for both). ConstrainedL0(structured=True)
gates each Linear's inputs; its gates on linear2's inputs (the feed-forward units) are set
closed for 50% or 70% of the units (log α = -10, no training needed), and
sparsekern.export(purge=True) removes them (nn/purge.py's pass for torch's transformer
layers). The attention is left as it is. Outputs are checked against the masked model.
Latency: one interleaved run (bench/common.py interleaved_times) at 16 x 64 and 1 x 64
tokens; speed-up = median dense time / median purged time, with a 95% bootstrap interval
over the rounds. Writes bench/results/transformer.md.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bootstrap_interval, interleaved_times, machine, markdown_table, write_result  # noqa: E402

from sparsekern import methods as M  # noqa: E402

LAYERS, D, HEADS, FFN = 4, 256, 4, 1024
CLOSED = (0.5, 0.7)
BATCHES = ((16, 64), (1, 64))


def purged(dense: nn.Module, closed: float) -> tuple[nn.Module, nn.Module, dict]:
    """(masked model, its purged export, export stats) with `closed` of every layer's
    feed-forward units gated off."""
    model = copy.deepcopy(dense)
    method = M.ConstrainedL0(model, 0.5, structured=True)
    with torch.no_grad():
        for layer in model.layers:
            log_alpha = layer.linear2.weight_log_alpha
            log_alpha[..., : round(closed * log_alpha.shape[-1])] = -10.0
    exported = method.export(purge=True)
    return model.eval(), exported.model.eval(), exported.stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    repeats = 5 if args.quick else 31
    torch.manual_seed(0)
    dense = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True), LAYERS,
                                  enable_nested_tensor=False).eval()
    params = sum(p.numel() for p in dense.parameters())
    variants = {f"{round(100 * (1 - c))}% units": purged(dense, c) for c in CLOSED}
    rows = []
    with torch.no_grad():
        for batch, tokens in BATCHES:
            x = torch.randn(batch, tokens, D)
            for name, (masked, small, _) in variants.items():
                diff = float((small(x) - masked(x)).abs().max())
                if diff > 1e-4:
                    raise AssertionError(f"{name}: purged output differs from the masked model by {diff}")
            fns = {"dense": lambda: dense(x), **{n: (lambda s=s: s(x)) for n, (_, s, _) in variants.items()}}
            times = interleaved_times(fns, repeats, torch.device("cpu"))
            base = statistics.median(times["dense"])
            for name in fns:
                t = statistics.median(times[name])
                kept = params if name == "dense" else variants[name][2]["params_after"]
                pairs = list(zip(times["dense"], times[name]))
                low, high = bootstrap_interval(pairs, lambda r: statistics.median(a for a, _ in r)
                                               / statistics.median(b for _, b in r))
                rows.append([f"{batch} x {tokens}", name, f"{kept / params:.3f}", f"{1e3 * t:.2f}",
                             f"{base / t:.2f}x ({low:.2f}–{high:.2f})"])
    doc = __doc__.split("\n\n", 1)[1].strip()
    text = "\n\n".join([
        "# Inference: a purged nn.TransformerEncoder vs dense", f"CPU: {machine(torch.device('cpu'))}.", doc,
        markdown_table(["tokens", "model (feed-forward units kept)", "params / dense", "median ms",
                        "speed-up (95% interval)"], rows),
        f"Median of {repeats} interleaved rounds per batch.",
    ]) + "\n"
    path = write_result("transformer.md", text)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
