"""Every CUDA kernel in csrc/cuda declares __launch_bounds__ and is launched with exactly
that many threads per block. Without the bound nvcc may give a kernel more registers than
a full block can have: the top-k select kernel got 80-88 per thread, a 1024-thread block
needs at most 64 (65536 per SM), and every launch failed on an H200 ("too many resources
requested for launch"), which no CPU test could see. With the bound nvcc fits the
registers to it; the launches must then not exceed it."""
import re
from pathlib import Path

import pytest

SOURCES = sorted((Path(__file__).resolve().parent.parent / "csrc" / "cuda").glob("*.cu"))
KERNEL = re.compile(r"__global__\s+void\s+(__launch_bounds__\((\w+)\)\s*)?(\w+)\s*\(")
LAUNCH = re.compile(r"(\w+)(?:<[^<>]*>)?<<<\s*[^,]+,\s*(\w+)\s*[,>]")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernels_declare_and_respect_launch_bounds(source):
    text = source.read_text()
    bounds = {m.group(3): m.group(2) for m in KERNEL.finditer(text)}
    assert bounds, f"no __global__ kernels found in {source.name}"
    unbounded = sorted(name for name, b in bounds.items() if b is None)
    assert not unbounded, f"{source.name}: kernels without __launch_bounds__: {unbounded}"
    launches = [(m.group(1), m.group(2)) for m in LAUNCH.finditer(text)]
    assert {name for name, _ in launches} == set(bounds), "a kernel is never launched, or the pattern missed one"
    for name, threads in launches:
        assert threads == bounds[name], f"{name} launched with {threads} threads, bounded by {bounds[name]}"
