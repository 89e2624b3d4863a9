"""What every bench script shares: interleaved timing, the machine's description, and
writing a markdown table to bench/results/."""
from __future__ import annotations

import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                      warmup: int = 2, seed: int = 0) -> dict[str, list[float]]:
    """Seconds of each call of each fn, round by round: every round runs every fn once, in
    an order shuffled per round (seeded), so that drift in the machine's speed, and what
    one fn leaves behind for the next (caches, allocator state), hit them all alike."""
    return {name: [turn[0] for turn in turns]
            for name, turns in interleaved_turns(fns, repeats, device, 1, warmup, seed).items()}


def interleaved_turns(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                      calls: int, warmup: int = 2, seed: int = 0) -> dict[str, list[list[float]]]:
    """Like interleaved_times, but each fn's turn in a round is `calls` back-to-back calls,
    each timed: per fn, one list of `calls` seconds per round. The first call of a turn
    finds the caches as the previous fn left them (cold: another model's weights); the
    later ones find its own (warm: a deployment serving one model request after request)."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"`calls` must be an int >= 1, got {calls!r}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    order = list(fns)
    rng = random.Random(seed)
    times: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            turn = []
            for _ in range(calls):
                sync()
                start = time.perf_counter()
                fns[name]()
                sync()
                turn.append(time.perf_counter() - start)
            times[name].append(turn)
    return times


def gpu_queued_times(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                     calls: int = 10, warmup: int = 2, seed: int = 0) -> tuple[dict[str, list[float]], set[str]]:
    """GPU seconds per call of each fn with the launch overhead taken out: each turn queues
    `calls` back-to-back calls behind a sleep kernel long enough for the CPU to queue them
    all before the GPU reaches the first, and CUDA events time the calls alone. Rounds are
    interleaved and shuffled as in interleaved_times. Returns, per fn, its seconds per call
    in each round, and the fns some turn of which was not queued in time (a host sync
    inside a call, or a recompile): their figures may include idle GPU time."""
    if device.type != "cuda":
        raise ValueError(f"`device` must be a CUDA device for GPU event timing, got {device}")
    for name, value in (("calls", calls), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    with torch.cuda.device(device):
        # CPU time to queue one turn, per fn (the sleep must outlast the slowest).
        queue_s = 0.0
        for fn in fns.values():
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            queue_s = max(queue_s, time.perf_counter() - start)
            torch.cuda.synchronize()
        # The sleep kernel counts clock cycles: calibrate cycles per second on this GPU.
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        torch.cuda.synchronize()
        cycles = int(10_000_000 / (begin.elapsed_time(end) / 1e3) * (2 * queue_s + 2e-3))
        order, rng = list(fns), random.Random(seed)
        times: dict[str, list[float]] = {name: [] for name in fns}
        late: set[str] = set()
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                torch.cuda.synchronize()
                torch.cuda._sleep(cycles)
                begin.record()
                for _ in range(calls):
                    fns[name]()
                end.record()
                if begin.query():  # the GPU woke before the CPU had queued every call
                    late.add(name)
                end.synchronize()
                times[name].append(begin.elapsed_time(end) / 1e3 / calls)
    return times, late


def bootstrap_interval(rounds: list, statistic: Callable[[list], float] = statistics.median,
                       level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval for `statistic` of one run's `rounds` (by default the median of
    per-round values; a round may be a tuple, e.g. (dense time, model time)): the central
    `level` of the statistic over `resamples` resamples of the rounds with replacement
    (seeded). It says how far this run's figure could move with other rounds of the same
    noise."""
    rng = random.Random(seed)
    n = len(rounds)
    values = sorted(statistic(rng.choices(rounds, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return values[int(tail * resamples)], values[min(resamples - 1, int((1.0 - tail) * resamples))]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn over one interleaved run (interleaved_times)."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats, device, warmup).items()}


DEVICE_CHOICES = ("cpu", "cuda", "all")


def bench_devices(choice: str) -> list[torch.device]:
    """The devices a bench script's --device names: cpu, cuda, or all (the CPU, and CUDA
    when there is one)."""
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"--device must be cpu, cuda or all, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    cuda = [torch.device("cuda")] if choice != "cpu" and torch.cuda.is_available() else []
    return ([torch.device("cpu")] if choice != "cuda" else []) + cuda


def add_device_option(parser) -> None:
    """--device for a bench script's argparse parser (read back with parsed_devices)."""
    parser.add_argument("--device", default="all", choices=DEVICE_CHOICES,
                        help="where to run: cpu, cuda, or all (the CPU, and CUDA when present; default)")


def parsed_devices(parser, args) -> list[torch.device]:
    """bench_devices(args.device), or the parser's usage error where it cannot be had."""
    try:
        return bench_devices(args.device)
    except ValueError as e:
        parser.error(str(e))


def result_name(stem: str, device: torch.device) -> str:
    """bench/results file for one device's tables: `stem.md` for the CPU, `stem-cuda.md`
    for the GPU, so a run on one machine never overwrites the other's committed tables."""
    return f"{stem}.md" if device.type == "cpu" else f"{stem}-{device.type}.md"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str, quick: bool = False) -> Path:
    """Writes bench/results/`name`; a --quick smoke run's tables go to bench/results/quick/
    (not committed), so they never replace the committed full-run tables."""
    folder = RESULTS / "quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a reader never sees half a table
    return path
