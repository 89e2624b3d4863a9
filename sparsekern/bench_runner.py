"""`sparsekern bench`: runs every bench/bench_*.py in its own subprocess (from the repository
root, with this Python) and writes bench/results/README.md: one status line per script
and the tables the scripts wrote to bench/results/*.md.

The benchmarks live in the source tree, not in the installed package: this needs a
checkout (an editable install finds it beside the package).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path


def bench_dir(given: Path | None = None) -> Path:
    folder = Path(given) if given is not None else Path(__file__).resolve().parent.parent / "bench"
    if not folder.is_dir() or not list(folder.glob("bench_*.py")):
        raise FileNotFoundError(f"no bench/bench_*.py scripts in {folder}: `sparsekern bench` needs a source checkout "
                                "(pass --bench-dir)")
    return folder


def takes_quick(script: Path) -> bool:
    return '"--quick"' in script.read_text()


def run_benches(folder: Path | None = None, *, quick: bool = False, only: list[str] | None = None,
                timeout: float | None = None) -> int:
    folder = bench_dir(folder)
    scripts = sorted(folder.glob("bench_*.py"))
    if only:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in only}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            raise ValueError(f"--only: no bench script named {sorted(unknown)}; have "
                             f"{[s.stem.removeprefix('bench_') for s in scripts]}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    statuses = []
    for script in scripts:
        cmd = [sys.executable, str(script)] + (["--quick"] if quick and takes_quick(script) else [])
        print(f"== {script.name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=folder.parent, text=True, capture_output=True, timeout=timeout)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = None, f"timed out after {timeout}s", f"{e.stdout or ''}{e.stderr or ''}"
        seconds = time.perf_counter() - start
        print(stdout + stderr, flush=True)
        # The script's own last words (its summary, or the error): stdout, else stderr.
        last = [line.strip() for line in (stderr if rc and not stdout.strip() else stdout + stderr).splitlines() if line.strip()]
        # Not the profiler's start/stop chatter (USDT:) nor c10's warnings ([W1203 ...]).
        last = [line for line in last if not line.startswith("USDT:") and not re.match(r"\[W\d{4} ", line)]
        tail = " / ".join(last[-3:]) if rc else ""
        statuses.append((script.name, rc, seconds, tail))
    readme = write_readme(folder / "results" / "quick" if quick else folder / "results", statuses, quick)
    print(f"written to {readme}")
    return 0 if all(rc == 0 for _, rc, _, _ in statuses) else 1


def _status_rows(readme: Path) -> dict[str, str]:
    """The status table's rows in an existing README, by their first cell."""
    if not readme.is_file():
        return {}
    rows = {}
    for line in readme.read_text().splitlines():
        if line.startswith("| bench_"):
            rows[line.split("|")[1].strip()] = line
    return rows


def write_readme(results: Path, statuses: list[tuple], quick: bool) -> Path:
    """results/README.md: the status table, then every table file. Rows of scripts not run
    this time stay as they were (`--only x` rewrote the table with x's row alone, dropping
    the other scripts' and the GPU runs' rows)."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / "README.md"
    rows = _status_rows(path)
    for name, rc, seconds, tail in statuses:
        rows[name] = f"| {name} | {'timeout' if rc is None else rc} | {seconds:.0f} | {tail.replace('|', '/')} |"
    lines = ["# Benchmark results", "",
             "Written by `sparsekern bench`" + (" --quick (smoke run: few repeats)" if quick else "")
             + "; each script also writes its own file below. A nonzero exit means an error or a missed target "
               "(the script's table says which).", "",
             "| script | exit | seconds | last output lines (nonzero exit) |", "|---|---|---|---|"]
    lines += [rows[name] for name in sorted(rows)]
    for md in sorted(results.glob("*.md")):
        if md.name != "README.md":
            lines += ["", f"<!-- {md.name} -->", md.read_text().strip()]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
