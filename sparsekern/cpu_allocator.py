"""tune_cpu_allocator(): keep freed tensor memory in the process for reuse (glibc malloc).

Why: torch's CPU allocator is glibc malloc. By default glibc returns a freed block above
its (dynamic) mmap threshold to the OS, and trims the heap top once more than 128 KiB of it
is free, so a training step that frees and re-allocates the same activation and gradient
buffers page-faults them in again every step. The masked layers allocate a few more
weight-sized buffers per step (w_eff, the mask's gradient), so they pay more of it. With
the threshold raised to glibc's maximum (32 MiB) and the trim threshold to 1 GiB, buffers
are reused from the heap. ResNet-18, batch 32, 2-core machine, interleaved medians (noisy:
±5% between runs): dense 471 -> 431 ms and CS 1.12 -> 1.05x dense in one pair of runs.
jemalloc / tcmalloc reuse memory like this by design; PyTorch's CPU performance guide
suggests them.

Why not mmap off altogether (M_MMAP_MAX = 0), which reuses blocks above 32 MiB too: it took
a 4096x4096 nn.Linear at batch 8 (64 MiB weight, fwd + bwd) from 38.1 to 15.6 ms, but made
the ResNet-18 step ratios worse in two paired runs (IMP 1.04 -> 1.08-1.09x dense, L0
1.10-1.13 -> 1.15-1.19x, CS 1.03-1.05 -> 1.09-1.14x).

`sparsekern train` and bench/bench_step.py call this (each has a switch to keep the
defaults); library users may call it themselves. It changes process-wide allocator
settings, so importing sparsekern never does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: HEAP_MAX_SIZE / 2 on 64-bit
TRIM_THRESHOLD = 1 << 30


def tune_cpu_allocator() -> bool:
    """Sets glibc's M_MMAP_THRESHOLD (32 MiB) and M_TRIM_THRESHOLD (1 GiB) for this
    process. Returns whether both were applied: False off Linux or without glibc's
    mallopt (e.g. musl), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
