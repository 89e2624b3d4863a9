"""Run-folder checkpoints: written atomically, the previous one kept, and every RNG state.

save(): torch.save to `checkpoint.pt.tmp` in the run folder, fsync, then rename
checkpoint.pt → checkpoint-prev.pt and checkpoint.pt.tmp → checkpoint.pt (os.replace, atomic
on POSIX within a filesystem). A crash or error while writing leaves checkpoint.pt as it
was; a crash between the two renames leaves checkpoint-prev.pt (the previous epoch) and
the complete temp file, and load() falls back to checkpoint-prev.pt.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint-prev.pt"


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    # .cpu(): a checkpoint loaded with map_location="cuda" moves these too, and torch
    # takes RNG states as CPU byte tensors only.
    torch.set_rng_state(states["torch"].cpu())
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def save(folder: Path, state: dict) -> Path:
    folder = Path(folder)
    path, tmp = folder / CHECKPOINT, folder / (CHECKPOINT + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave half a file behind
        raise
    if path.exists():
        os.replace(path, folder / PREVIOUS)
    os.replace(tmp, path)
    return path


def load(folder: Path, map_location=None) -> tuple[dict, Path]:
    """The newest readable checkpoint in `folder` (checkpoint.pt, else checkpoint-prev.pt)
    and its path. weights_only=False: the file holds RNG states and numpy arrays, and it
    is this run's own file."""
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            return torch.load(path, map_location=map_location, weights_only=False), path
        except Exception as e:  # a truncated or corrupt file: try the previous one
            errors.append(f"{name}: {type(e).__name__}: {e}")
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise FileNotFoundError(f"no readable {CHECKPOINT} or {PREVIOUS} in {folder}{detail}")


def exists(folder: Path) -> bool:
    return any((Path(folder) / n).is_file() for n in (CHECKPOINT, PREVIOUS))
