"""Global magnitude threshold over the prunable weights of a ResNet-50.

The prunable weights (every Conv2d and Linear weight: 54 tensors, 25.5M values) of a
randomly initialised torchvision ResNet-50, sparsity 0.9. One interleaved run times
sparsekern's threshold and masks against torch.kthvalue(torch.cat(...)), torch.topk over
the same concatenation, and one read of the data (sum) as the floor; checks the values
are equal; prints the table and writes bench/results/threshold.md. Target on CPU:
sparsekern >= 20x faster than kthvalue + cat. With a GPU the same is run there too (no
target); --device picks. Writes threshold.md (CPU) and threshold-cuda.md (GPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_device_option, interleaved_medians, machine, markdown_table,  # noqa: E402
                    parsed_devices, result_name, write_result)

import sparsekern  # noqa: E402
from sparsekern import ops  # noqa: E402

SPARSITY = 0.9
TARGET_CPU = 20.0


def resnet50_weights(device: torch.device) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    return [m.weight.detach().to(device) for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def run(device: torch.device, repeats: int) -> tuple[str, float]:
    weights = resnet50_weights(device)
    numel = sum(w.numel() for w in weights)
    n_prune = ops.n_prune_for(SPARSITY, numel)

    def cat():
        return torch.cat([w.abs().flatten().float() for w in weights])

    def kthvalue():
        return torch.kthvalue(cat(), n_prune).values

    def topk():
        return torch.topk(cat(), n_prune, largest=False, sorted=False).values.max()

    fns = {
        "sparsekern magnitude_threshold": lambda: ops.magnitude_threshold(weights, SPARSITY, check_finite=False),
        "sparsekern magnitude_masks": lambda: ops.magnitude_masks(weights, SPARSITY, check_finite=False),
        "torch.kthvalue(torch.cat)": kthvalue,
        "torch.topk(torch.cat)": topk,
        "one read (sum), the floor": lambda: [w.sum() for w in weights],
    }
    # Equal values, bit for bit, before any timing.
    ours = ops.magnitude_threshold(weights, SPARSITY)
    expected = kthvalue()
    assert torch.equal(ours, expected), (ours, expected)
    assert torch.equal(topk(), expected)
    masks = ops.magnitude_masks(weights, SPARSITY)
    assert sum(int((~m).sum()) for m in masks) == n_prune

    medians = interleaved_medians(fns, repeats, device)
    base = medians["sparsekern magnitude_threshold"]
    rows = [[name, f"{t * 1e3:.2f}", f"{t / base:.2f}"] for name, t in medians.items()]
    speedup = medians["torch.kthvalue(torch.cat)"] / base
    table = markdown_table(["method", "median ms", "time / sparsekern threshold"], rows)
    text = (
        f"### {device.type.upper()}: {machine(device)}\n\n"
        f"ResNet-50 prunable weights: {len(weights)} tensors, {numel:,} values, sparsity {SPARSITY}, "
        f"median of {repeats} interleaved runs. Threshold = {ours.item():.6g}, equal to kthvalue: yes.\n\n"
        f"{table}\n\n**sparsekern is {speedup:.1f}x faster than torch.kthvalue(torch.cat)**"
    )
    return text, speedup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per method (default 11)")
    add_device_option(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not sparsekern.HAS_EXTENSION:
        print("warning: sparsekern._C is missing; timing the reference fallback", file=sys.stderr)

    status = 0
    for device in parsed_devices(parser, args):
        text, speedup = run(device, args.repeats)
        if device.type == "cpu":
            text += f" (target >= {TARGET_CPU:.0f}x: {'met' if speedup >= TARGET_CPU else 'NOT met'})"
            status |= speedup < TARGET_CPU
        report = "# Global magnitude threshold\n\n" + text + "\n"
        print(report)
        print(f"written to {write_result(result_name('threshold', device), report)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
