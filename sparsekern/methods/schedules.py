"""Every schedule the methods share, in one place (METHODS.md, "Shared pieces")."""
from __future__ import annotations

import bisect
import math
from typing import Sequence


def zhu_gupta(step: int, *, final_sparsity: float, end: int, start: int = 0,
              initial_sparsity: float = 0.0) -> float:
    """Zhu & Gupta's gradual sparsity: s_t = s_f + (s_i − s_f)(1 − (t − t0)/(T − t0))³ for
    t0 ≤ t ≤ T, s_i before t0 and s_f from T on (T = t0 + n·Δt in the paper's terms)."""
    if end <= start:
        raise ValueError(f"`end` ({end}) must be after `start` ({start})")
    if step <= start:
        return initial_sparsity
    if step >= end:
        return final_sparsity
    frac = 1.0 - (step - start) / (end - start)
    return final_sparsity + (initial_sparsity - final_sparsity) * frac**3


def exponential_beta(epoch: int, epochs: int, beta_final: float) -> float:
    """CS's temperature within a round: β_t = β_T^(t/T) with T = epochs − 1, so β is 1 in
    the round's first epoch and β_T in its last (the code multiplies by
    β_T^(1/(epochs−1)) after each epoch)."""
    if epochs <= 1:
        return beta_final
    return beta_final ** (min(epoch, epochs - 1) / (epochs - 1))


def multistep_lr(base_lr: float, epoch: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """Step decay: base_lr · gamma^(number of milestones ≤ epoch)."""
    return base_lr * gamma ** bisect.bisect_right(sorted(milestones), epoch)


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine annealing from base_lr to 0 over `epochs`."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))
