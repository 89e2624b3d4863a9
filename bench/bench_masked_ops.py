"""Masked layers, forward + backward: every mask kind against dense nn.Linear / nn.Conv2d
and against torch.nn.utils.prune (a binary mask applied by a forward pre-hook).

Shapes: a weight-bound linear (batch 8 x 4096 -> 4096) and the 3x3 convs of a CIFAR
ResNet (batch 32). One interleaved run per shape; times are medians, ratios are against
the dense layer of the same run. Memory: on CPU, the bytes autograd saves for backward
(counted with saved_tensors_hooks: what a layer adds to training memory beyond its
parameters); on CUDA, the peak allocated during forward + backward.
Writes bench/results/masked_ops.md. GPU targets (checked when CUDA is present): fused
masked linear fwd+bwd <= 1.10x dense, gate sampling >= 80% of copy bandwidth.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, markdown_table, write_result  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern import ops  # noqa: E402

KINDS = ["binary", "straight_through", "sigmoid", "relaxed", "hard_concrete"]
LINEAR = [(8, 4096, 4096)]
CONVS = [(32, 64, 32), (32, 128, 16), (32, 256, 8), (32, 512, 4)]  # (batch, channels, spatial)


def variants(dense: nn.Module) -> dict[str, nn.Module]:
    """The dense layer, torch's pruning hook, and one sparse layer per mask kind (these
    share the dense weights); masks keep half the weights so no kind degenerates to dense."""
    out = {"dense": dense}
    pruned = copy.deepcopy(dense)  # torch.prune re-wires `weight`; keep `dense` plain
    keep = torch.rand(dense.weight.shape, device=dense.weight.device) > 0.5
    prune.custom_from_mask(pruned, "weight", keep)
    out["torch.nn.utils.prune"] = pruned
    cls = sparsekern.SparseLinear if isinstance(dense, nn.Linear) else sparsekern.SparseConv2d
    for kind in KINDS:
        layer = cls.from_dense(dense, mask=kind)
        with torch.no_grad():
            if kind in ("binary", "straight_through"):
                layer.weight_mask.copy_(keep)
            elif kind == "relaxed":
                layer.weight_mask.copy_(keep.float())
        out[kind] = layer
    return out


def fwd_bwd(layer: nn.Module, x: torch.Tensor):
    def run():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    return run


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, parameters and the input excluded (those exist
    anyway): the layer's own activation-memory cost."""
    exclude = {p.data_ptr() for p in layer.parameters()} | {x.data_ptr()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in exclude and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return total


def peak_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(layer, x)()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_shape(name: str, dense: nn.Module, x: torch.Tensor, repeats: int) -> list[list[str]]:
    layers = variants(dense)
    medians = interleaved_medians({k: fwd_bwd(m, x) for k, m in layers.items()}, repeats, x.device)
    memory = peak_bytes if x.is_cuda else saved_bytes
    mem = {k: memory(m, x) for k, m in layers.items()}
    rows = []
    for k, t in medians.items():
        rows.append([name, k, f"{t * 1e3:.2f}", f"{t / medians['dense']:.2f}", f"{mem[k] / 2**20:.1f}"])
    return rows


def gate_sampling_bandwidth(device: torch.device, repeats: int) -> tuple[float, float]:
    """GB/s of hard-concrete gate sampling (read log α, write z) and of a plain copy."""
    log_alpha = torch.randn(64 * 2**20, device=device)
    out = torch.empty_like(log_alpha)
    t = interleaved_medians({
        "gates": lambda: ops.hard_concrete_gates(log_alpha, 0, 1),
        "copy": lambda: out.copy_(log_alpha),
    }, repeats, device)
    moved = 2 * log_alpha.numel() * log_alpha.element_size() / 1e9
    return moved / t["gates"], moved / t["copy"]


def run(device: torch.device, repeats: int) -> str:
    torch.manual_seed(0)
    rows = []
    for batch, n_in, n_out in LINEAR:
        dense = nn.Linear(n_in, n_out, device=device)
        rows += bench_shape(f"linear {batch}x{n_in}->{n_out}", dense, torch.randn(batch, n_in, device=device), repeats)
    for batch, ch, hw in CONVS:
        dense = nn.Conv2d(ch, ch, 3, padding=1, bias=False, device=device)
        x = torch.randn(batch, ch, hw, hw, device=device)
        rows += bench_shape(f"conv3x3 {ch}ch {hw}x{hw} b{batch}", dense, x, repeats)
    mem_col = "peak MiB" if device.type == "cuda" else "saved for backward MiB"
    text = (f"### {device.type.upper()}: {machine(device)}\n\nMedian of {repeats} interleaved fwd+bwd runs.\n\n"
            + markdown_table(["shape", "layer", "median ms", "time / dense", mem_col], rows))
    if device.type == "cuda":
        linear = {r[1]: float(r[3]) for r in rows if r[0].startswith("linear")}
        worst = max(linear[k] for k in KINDS)
        gates, copy = gate_sampling_bandwidth(device, repeats)
        text += (f"\n\nFused masked linear fwd+bwd, worst kind: {worst:.2f}x dense (target <= 1.10: "
                 f"{'met' if worst <= 1.10 else 'NOT met'}). Gate sampling {gates:.0f} GB/s = "
                 f"{gates / copy:.0%} of copy {copy:.0f} GB/s (target >= 80%: {'met' if gates >= 0.8 * copy else 'NOT met'}).")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant (default 7)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    sections = [run(torch.device("cpu"), args.repeats)]
    if torch.cuda.is_available():
        sections.append(run(torch.device("cuda"), args.repeats))
    report = "# Masked layers: forward + backward\n\n" + "\n\n".join(sections) + "\n"
    print(report)
    print(f"written to {write_result('masked_ops.md', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
