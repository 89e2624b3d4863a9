"""Global magnitude threshold and keep-masks: the op shared by IMP, GMP, DPF and the
fixed-percentage ablations (never torch.cat + sort on the hot path).

Kernels: csrc/cpu/magnitude_threshold_cpu.cpp (radix select, per-thread histograms) and
csrc/cuda/magnitude_threshold_cuda.cu (multi-tensor histograms; the result stays on the
device). Oracle: reference.magnitude_threshold / reference.magnitude_masks.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .. import _checks
from . import reference
from ._library import cpp_op, fake

_threshold_op = cpp_op("magnitude_threshold", reference.magnitude_threshold)
_masks_op = cpp_op("magnitude_masks", reference.magnitude_masks)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@fake("sparsekern::magnitude_threshold")
def _threshold_fake(tensors, n_prune):
    return tensors[0].new_empty((), dtype=torch.float32)


@fake("sparsekern::magnitude_masks")
def _masks_fake(tensors, n_prune):
    masks = [t.new_empty(t.shape, dtype=torch.bool) for t in tensors]
    return masks, tensors[0].new_empty((), dtype=torch.float32)


def n_prune_for(sparsity: float, numel: int) -> int:
    """How many elements a sparsity removes: round(sparsity * numel) (Python's round)."""
    return round(sparsity * numel)


def _check(tensors: Iterable[torch.Tensor], sparsity, n_prune) -> tuple[list[torch.Tensor], int]:
    """Validates the public arguments; returns the detached tensors and n_prune."""
    if isinstance(tensors, torch.Tensor):
        raise TypeError("`tensors` must be a list of tensors, not a single tensor (wrap it: [t])")
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"`tensors` must be a list of tensors, got {type(tensors).__name__}") from None
    if not tensors:
        raise ValueError("`tensors` must not be empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`tensors[{i}]` must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(
                f"`tensors[{i}]` must be floating point (float32/float16/bfloat16/float64), got {t.dtype}"
            )
        if t.device != tensors[0].device:
            raise ValueError(
                f"all `tensors` must be on one device: tensors[0] is on {tensors[0].device}, "
                f"tensors[{i}] on {t.device}"
            )
    numel = sum(t.numel() for t in tensors)
    if (sparsity is None) == (n_prune is None):
        raise TypeError("give exactly one of `sparsity` (a fraction) and `n_prune` (an exact count)")
    if n_prune is None:
        n_prune = n_prune_for(_checks.real("`sparsity`", sparsity, low=0.0, high=1.0, high_open=True), numel)
    elif _checks.integer("`n_prune`", n_prune) > numel:
        raise ValueError(f"`n_prune` must be at most the {numel} elements of `tensors`, got {n_prune}")
    return [t.detach() for t in tensors], int(n_prune)


def _raise_if_nonfinite(threshold: torch.Tensor) -> None:
    if threshold.device.type == "meta":  # shapes only, no values to check (item() raised)
        return
    # One device->host read of a single float: the kernels flag NaN/Inf by returning a
    # NaN threshold, so the check costs no extra pass over the weights.
    if bool(torch.isnan(threshold)):
        raise ValueError("`tensors` contain NaN or Inf; a magnitude threshold is undefined")


def magnitude_threshold(
    tensors: Iterable[torch.Tensor], sparsity: float | None = None, *, n_prune: int | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """The global magnitude below which a fraction `sparsity` of all elements lies.

    Returns a 0-dim float32 tensor on the inputs' device, exactly equal to
    ``torch.kthvalue(torch.cat([t.abs().flatten().float() for t in tensors]), n_prune)``
    with ``n_prune = round(sparsity * N)`` (0.0 when n_prune == 0), computed without
    concatenating or sorting. Tensors may have any shapes, strides and float dtypes.
    Instead of `sparsity`, `n_prune` gives the exact count (0 <= n_prune <= N).

    check_finite: raise ValueError on NaN/Inf inputs. On CUDA this reads one float back
    to the host (a sync); pass False on a hot path, and the result is NaN instead.
    """
    tensors, n_prune = _check(tensors, sparsity, n_prune)
    _checks.boolean("`check_finite`", check_finite)
    threshold = _threshold_op(tensors, n_prune)
    if check_finite:
        _raise_if_nonfinite(threshold)
    return threshold


def magnitude_masks(
    tensors: Iterable[torch.Tensor],
    sparsity: float | None = None,
    *,
    n_prune: int | None = None,
    check_finite: bool = True,
    return_threshold: bool = False,
):
    """Keep-masks (True = keep), one bool tensor per input with its shape, with exactly
    round(sparsity * N) False in total: |x| below the global threshold pruned, above it
    kept, ties at it pruned in ascending (tensor index, flat index) order. Instead of
    `sparsity`, `n_prune` gives the exact count of False.

    With return_threshold=True returns (masks, threshold). check_finite as in
    magnitude_threshold (with False, NaN/Inf inputs give a NaN threshold and all-True masks).
    """
    tensors, n_prune = _check(tensors, sparsity, n_prune)
    # Truthy non-bools were taken as True: return_threshold="no" returned (masks, threshold).
    _checks.boolean("`check_finite`", check_finite)
    _checks.boolean("`return_threshold`", return_threshold)
    masks, threshold = _masks_op(tensors, n_prune)
    if check_finite:
        _raise_if_nonfinite(threshold)
    return (masks, threshold) if return_threshold else masks
