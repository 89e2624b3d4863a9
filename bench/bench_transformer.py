"""Inference: an nn.TransformerEncoder whose feed-forward units and attention heads
structured L0 closed, purged, against the dense encoder, CPU.

The model: 4 encoder layers, d_model 256, 4 heads, 1024 feed-forward units, batch_first,
eval mode, no gradients (torch's fused fast path for the dense model).
ConstrainedL0(structured=True) gates each Linear's inputs, and each attention's out_proj
per head; gates are set closed (log α = -10, no training needed) for 50% or 70% of every
layer's feed-forward units (linear2's inputs) and/or 2 of its 4 heads, and
sparsekern.export(purge=True) removes them (nn/purge.py's pass for torch's transformer
layers; a layer with fewer heads holds a PrunedMultiheadAttention and runs torch's
unfused path, since the fused one needs num_heads · head_dim = d_model). Outputs are
checked against the masked model.
Latency: one interleaved run (bench/common.py interleaved_turns) at 16 x 64 and 1 x 64
tokens, each model's turn in a round two forwards back to back. The second ("warm") is
the steady state of a deployment serving one model request after request, and the
speed-up (median dense time / median purged time, with a 95% bootstrap interval over the
rounds) uses it, as bench_inference.py does. The first finds the caches as another model
left them ("cold", last column; 6 models of 3-13 MiB of weights take turns).

The allocator: glibc malloc tuned by sparsekern.tune_cpu_allocator() (freed buffers kept
for reuse), unless --malloc-defaults. Torch's unfused path, which a layer with fewer heads
runs, allocates more buffers than the fused one; with glibc's defaults it page-faults them
in on every forward: "2/4 heads" alone ran 0.93x and 0.99x dense at 16 x 64 tokens in two
such runs, against 1.12x with the tuned allocator (the dense model's time moved by 3%).
Writes bench/results/transformer.md.
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
from common import bootstrap_interval, interleaved_turns, machine, markdown_table, write_result  # noqa: E402

from sparsekern import methods as M  # noqa: E402
from sparsekern import tune_cpu_allocator  # noqa: E402

LAYERS, D, HEADS, FFN = 4, 256, 4, 1024
# (fraction of feed-forward units closed, fraction of heads closed) per variant
CLOSED = ((0.5, 0.0), (0.7, 0.0), (0.0, 0.5), (0.5, 0.5), (0.7, 0.5))
BATCHES = ((16, 64), (1, 64))


def purged(dense: nn.Module, units: float, heads: float) -> tuple[nn.Module, nn.Module, dict]:
    """(masked model, its purged export, export stats) with fractions `units` of every
    layer's feed-forward units and `heads` of its heads gated off."""
    model = copy.deepcopy(dense)
    method = M.ConstrainedL0(model, 0.5, structured=True)
    with torch.no_grad():
        for layer in model.layers:
            for log_alpha, closed in ((layer.linear2.weight_log_alpha, units),
                                      (layer.self_attn.out_proj.weight_log_alpha, heads)):
                log_alpha[..., : round(closed * log_alpha.shape[-1])] = -10.0
    exported = method.export(purge=True)
    return model.eval(), exported.model.eval(), exported.stats


def speed_up(pairs: list[tuple[float, float]]) -> float:
    """Median dense time over median model time, for rounds of (dense, model) seconds."""
    return statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)


def _name(units: float, heads: float) -> str:
    kept = [f"{round(100 * (1 - units))}% units" if units else "", f"{round(HEADS * (1 - heads))}/{HEADS} heads" if heads else ""]
    return ", ".join(k for k in kept if k)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc malloc's defaults instead of sparsekern.tune_cpu_allocator()")
    args = parser.parse_args()
    tuned = not args.malloc_defaults and tune_cpu_allocator()
    repeats = 5 if args.quick else 31
    torch.manual_seed(0)
    dense = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True), LAYERS,
                                  enable_nested_tensor=False).eval()
    params = sum(p.numel() for p in dense.parameters())
    variants = {_name(units, heads): purged(dense, units, heads) for units, heads in CLOSED}
    rows = []
    with torch.no_grad():
        for batch, tokens in BATCHES:
            x = torch.randn(batch, tokens, D)
            for name, (masked, small, _) in variants.items():
                diff = float((small(x) - masked(x)).abs().max())
                if diff > 1e-4:
                    raise AssertionError(f"{name}: purged output differs from the masked model by {diff}")
            fns = {"dense": lambda: dense(x), **{n: (lambda s=s: s(x)) for n, (_, s, _) in variants.items()}}
            turns = interleaved_turns(fns, repeats, torch.device("cpu"), calls=2)
            for name in fns:
                kept = params if name == "dense" else variants[name][2]["params_after"]
                row = [f"{batch} x {tokens}", name, f"{kept / params:.3f}"]
                for call in (1, 0):  # warm, then cold
                    dense_t, t = ([turn[call] for turn in turns[n]] for n in ("dense", name))
                    pairs = list(zip(dense_t, t))
                    low, high = bootstrap_interval(pairs, speed_up)
                    row += [f"{1e3 * statistics.median(t):.2f}", f"{speed_up(pairs):.2f}x ({low:.2f}–{high:.2f})"]
                rows.append(row)
    doc = __doc__.split("\n\n", 1)[1].strip()
    text = "\n\n".join([
        "# Inference: a purged nn.TransformerEncoder vs dense",
        f"CPU: {machine(torch.device('cpu'))}. Allocator: glibc malloc "
        + ("tuned by sparsekern.tune_cpu_allocator()." if tuned else "with its default settings."), doc,
        markdown_table(["tokens", "model (kept)", "params / dense", "median ms", "speed-up (95% interval)",
                        "cold cache: median ms", "cold cache: speed-up"], rows),
        f"Median of {repeats} interleaved rounds per batch.",
    ]) + "\n"
    path = write_result("transformer.md", text, args.quick)
    print(text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
