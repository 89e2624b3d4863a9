"""Masked layers, forward + backward: every mask kind against dense nn.Linear / nn.Conv2d
and against torch.nn.utils.prune (a binary mask applied by a forward pre-hook).

Shapes: a weight-bound linear (batch 8 x 4096 -> 4096) and the 3x3 convs of a CIFAR
ResNet (batch 32). One interleaved run per shape; times are medians, ratios are against
the dense layer of the same run. Memory: on CPU, the bytes autograd saves for backward
(counted with saved_tensors_hooks: what a layer adds to training memory beyond its
parameters); on CUDA, the peak allocated during forward + backward.
On CUDA the linear is also timed in bfloat16, and each layer twice: wall time of one
synchronised call (launch overhead included) and GPU time of calls queued back to back
behind a sleep kernel (the kernels alone; gpu_queued_times). The GPU targets are judged
on the GPU time: fused masked linear fwd+bwd <= 1.10x dense, gate sampling >= 80% of copy
bandwidth. Writes bench/results/masked_ops.md (CPU) and masked_ops-cuda.md (GPU).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_device_option, gpu_queued_times, interleaved_medians, machine,  # noqa: E402
                    markdown_table, parsed_devices, result_name, write_result)

import sparsekern  # noqa: E402
from sparsekern import ops  # noqa: E402

KINDS = ["binary", "straight_through", "sigmoid", "relaxed", "hard_concrete"]
LINEAR = [(8, 4096, 4096)]
CONVS = [(32, 64, 32), (32, 128, 16), (32, 256, 8), (32, 512, 4)]  # (batch, channels, spatial)
QUEUED_CALLS = 10  # fwd+bwd calls per turn of the GPU-time measurement (gpu_queued_times)


def linear_name(batch: int, n_in: int, n_out: int, dtype: torch.dtype) -> str:
    return f"linear {batch}x{n_in}->{n_out} {str(dtype).removeprefix('torch.')}"


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


def bench_layers(name: str, dense: nn.Module, x: torch.Tensor, repeats: int) -> list[list[str]]:
    layers = variants(dense)
    fns = {k: fwd_bwd(m, x) for k, m in layers.items()}
    medians = interleaved_medians(fns, repeats, x.device)
    if x.is_cuda:
        gpu, late = gpu_queued_times(fns, repeats, x.device, QUEUED_CALLS)
        gpu = {k: statistics.median(t) for k, t in gpu.items()}
        mem = {k: peak_bytes(m, x) for k, m in layers.items()}
        return [[name, k, f"{gpu[k] * 1e6:.1f}" + (" (late)" if k in late else ""),
                 f"{gpu[k] / gpu['dense']:.2f}", f"{t * 1e6:.1f}", f"{t / medians['dense']:.2f}",
                 f"{mem[k] / 2**20:.1f}"] for k, t in medians.items()]
    mem = {k: saved_bytes(m, x) for k, m in layers.items()}
    return [[name, k, f"{t * 1e3:.2f}", f"{t / medians['dense']:.2f}", f"{mem[k] / 2**20:.1f}"]
            for k, t in medians.items()]


def gate_sampling_bandwidth(device: torch.device, repeats: int) -> tuple[float, float]:
    """GB/s of hard-concrete gate sampling (read log α, write z) and of a plain copy, GPU
    time (gpu_queued_times)."""
    log_alpha = torch.randn(64 * 2**20, device=device)
    out = torch.empty_like(log_alpha)
    times, _ = gpu_queued_times({
        "gates": lambda: ops.hard_concrete_gates(log_alpha, 0, 1),
        "copy": lambda: out.copy_(log_alpha),
    }, repeats, device, calls=4)
    moved = 2 * log_alpha.numel() * log_alpha.element_size() / 1e9
    return moved / statistics.median(times["gates"]), moved / statistics.median(times["copy"])


def run(device: torch.device, repeats: int) -> tuple[str, bool]:
    """This device's section and whether its targets (GPU only) are met. A shape that
    raises is reported in its row (traceback on stderr) and fails the run; the others
    still run: one GPU session may be the only chance to measure them."""
    torch.manual_seed(0)
    rows, errors = [], []

    def measured(name, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - reported in the table and the exit status
            traceback.print_exc()
            errors.append(f"{name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
            return None

    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for batch, n_in, n_out in LINEAR:
        for dtype in dtypes:
            dense = nn.Linear(n_in, n_out, device=device, dtype=dtype)
            x = torch.randn(batch, n_in, device=device, dtype=dtype)
            name = linear_name(batch, n_in, n_out, dtype)
            rows += measured(name, bench_layers, name, dense, x, repeats) or []
    for batch, ch, hw in CONVS:
        dense = nn.Conv2d(ch, ch, 3, padding=1, bias=False, device=device)
        x = torch.randn(batch, ch, hw, hw, device=device)
        name = f"conv3x3 {ch}ch {hw}x{hw} b{batch}"
        rows += measured(name, bench_layers, name, dense, x, repeats) or []
    text = f"### {device.type.upper()}: {machine(device)}\n\n"
    if errors:
        text += "**Errors** (no rows for these; tracebacks on stderr): " + "; ".join(errors) + "\n\n"
    if device.type != "cuda":
        return text + f"Median of {repeats} interleaved fwd+bwd runs.\n\n" + markdown_table(
            ["shape", "layer", "median ms", "time / dense", "saved for backward MiB"], rows), not errors
    text += (f"Medians of {repeats} interleaved rounds. GPU time: {QUEUED_CALLS} fwd+bwd calls queued "
             "behind a sleep kernel, timed with CUDA events (the kernels alone; \"late\": some turn was not "
             "queued before the GPU reached it, so it may hold idle time); wall: one call, synchronised "
             "before and after (launch overhead included).\n\n"
             + markdown_table(["shape", "layer", "GPU us / call", "GPU / dense", "wall us / call", "wall / dense",
                               "peak MiB"], rows))
    verdicts = []
    for dtype in dtypes:
        prefix = linear_name(*LINEAR[0], dtype)
        ratios = {r[1]: float(r[3]) for r in rows if r[0] == prefix and r[1] in KINDS}
        if not ratios:
            continue  # its error row says why
        worst = max(ratios, key=ratios.get)
        met = ratios[worst] <= 1.10
        verdicts.append(met)
        text += (f"\n\nFused masked linear fwd+bwd, {prefix.removeprefix('linear ')}: worst kind {worst} "
                 f"{ratios[worst]:.2f}x dense GPU time, best {min(ratios.values()):.2f}x (target <= 1.10: "
                 f"{'met' if met else 'NOT met'}).")
    bandwidth = measured("gate sampling", gate_sampling_bandwidth, device, repeats)
    if bandwidth is None:
        return text + f"\n\nGate sampling: {errors[-1]}", False
    gates, copy_bw = bandwidth
    verdicts.append(gates >= 0.8 * copy_bw)
    text += (f" Gate sampling {gates:.0f} GB/s = {gates / copy_bw:.0%} of copy {copy_bw:.0f} GB/s "
             f"(target >= 80%: {'met' if verdicts[-1] else 'NOT met'}).")
    return text, all(verdicts) and not errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant (default 7)")
    add_device_option(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    status = 0
    for device in parsed_devices(parser, args):
        text, met = run(device, args.repeats)
        report = "# Masked layers: forward + backward\n\n" + text + "\n"
        print(report)
        print(f"written to {write_result(result_name('masked_ops', device), report)}")
        status |= not met
    return status


if __name__ == "__main__":
    sys.exit(main())
