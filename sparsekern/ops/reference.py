"""Pure-PyTorch oracles for every op in `sparsekern.ops`, written for clarity.

Tests compare every backend against these; the op layer also falls back to them when
the compiled extension is missing.
"""
from __future__ import annotations

import torch


def magnitude_threshold(tensors: list[torch.Tensor], n_prune: int) -> torch.Tensor:
    """The n_prune-th smallest |x| (1-based) over all tensors, float32, 0-dim.

    0.0 when n_prune == 0; NaN when any value is NaN or Inf.
    """
    flat = torch.cat([t.detach().abs().flatten().float() for t in tensors])
    if not bool(torch.isfinite(flat).all()):
        return torch.tensor(float("nan"), device=flat.device)
    if n_prune == 0:
        return torch.zeros((), device=flat.device)
    return torch.kthvalue(flat, n_prune).values


def magnitude_masks(
    tensors: list[torch.Tensor], n_prune: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Keep-masks with exactly n_prune False: |x| < t pruned, |x| > t kept, and the ties
    |x| == t pruned in ascending (tensor index, flat index) order until n_prune is met."""
    threshold = magnitude_threshold(tensors, n_prune)
    if n_prune == 0 or not bool(torch.isfinite(threshold)):
        return [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in tensors], threshold
    mags = [t.detach().abs().float() for t in tensors]
    ties_to_prune = n_prune - sum(int((m < threshold).sum()) for m in mags)
    masks, ties_before = [], 0
    for m in mags:
        tie = (m == threshold).flatten()
        rank = ties_before + torch.cumsum(tie.long(), 0) - 1  # rank among all ties so far
        keep = (m.flatten() > threshold) | (tie & (rank >= ties_to_prune))
        masks.append(keep.reshape(m.shape))
        ties_before += int(tie.sum())
    return masks, threshold


# --- masked weights (ops/masked_linear.py, ops/masked_conv.py) ------------------------
from .mask_math import gate  # noqa: E402


def masked_weight(
    weight: torch.Tensor, mask: torch.Tensor, kind: str, beta: float = 1.0, scale: float = 1.0
) -> torch.Tensor:
    """w_eff = weight ⊙ g(mask) for a mask kind (table in mask_math), differentiable with
    the kind's gradients: autograd of this expression gives exactly grad_w and grad_mask."""
    if kind == "straight_through":
        # Value weight ⊙ m, gradient G: the pruned part is subtracted as a constant, so
        # the gradient reaches pruned weights unmasked.
        return weight - (weight * ~mask).detach()
    if kind == "binary":
        return weight * mask
    # sigmoid, relaxed, hard_concrete: a float gate (z broadcast; autograd sums its grad).
    return (weight * gate(mask, kind, beta, scale, weight.dtype)).to(weight.dtype)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    kind: str,
    beta: float = 1.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """y = x @ (weight ⊙ g).T + bias."""
    return torch.nn.functional.linear(x, masked_weight(weight, mask, kind, beta, scale), bias)


def masked_conv2d_weight(
    weight: torch.Tensor, mask: torch.Tensor, kind: str, beta: float = 1.0, scale: float = 1.0
) -> torch.Tensor:
    """The conv weight under its mask, w_eff = weight ⊙ g (the module then calls F.conv2d)."""
    return masked_weight(weight, mask, kind, beta, scale)


# --- hard-concrete gates (Louizos et al. 2018) -------------------------------------------
import math  # noqa: E402

# Noise: Philox4x32-10 keyed by the 64-bit seed. Flat row-major element i takes word i % 4
# of the block at counter (q lo, q hi, offset lo, offset hi), q = i // 4: each Philox call
# serves four elements (a call per element, keeping word 0 only, made the gates compute-
# bound: 32% of copy bandwidth on an H200). This is exactly what the Triton kernel draws
# with tl.philox + tl.uint_to_uniform_float, so the CPU and CUDA streams are bit-identical
# and the CPU backward regenerates u from (seed, offset) like the kernel does.

HARD_CONCRETE_EPS = 1e-6  # u ~ U(eps, 1 - eps) keeps log u and log(1 - u) finite

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b):
    """(a*b >> 32, a*b & 0xffffffff) for a constant a < 2^32 and int64 b < 2^32, without
    overflowing int64: a is split into 16-bit halves so each partial product is < 2^48."""
    p_hi, p_lo = b * (a >> 16), b * (a & 0xFFFF)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors or ints holding uint32 words:
    counter (c0, c1, c2, c3), key (seed lo, seed hi). Returns the four output words."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uniform(numel: int, seed: int, offset: int | torch.Tensor, device=None) -> torch.Tensor:
    """float32 r in [0, 1) for flat indices i = 0..numel-1: word i % 4 of
    philox4x32(counter = (q lo, q hi, offset lo, offset hi), seed), q = i // 4, mapped to a
    float as triton.language.uint_to_uniform_float does. offset: an int, or the ops' 0-dim
    int64 tensor (the word arithmetic is the same on either)."""
    q = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32(q & _MASK32, q >> 32, offset & _MASK32, (offset >> 32) & _MASK32, seed)
    word = torch.stack(words, dim=1).reshape(-1)[:numel]  # element 4q + j: word j of block q
    # Triton reads the word as int32 x, maps x < 0 to ~x, and scales by just under 2^-31.
    x = torch.where(word >= 2**31, _MASK32 - word, word)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=device)


def hard_concrete_uniform(shape, seed: int, offset: int | torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The u of hard_concrete_gates: eps + (1 - 2 eps) * philox_uniform, in `dtype`."""
    numel = 1
    for size in shape:
        numel *= size
    r = philox_uniform(numel, seed, offset, device).to(dtype)
    return (HARD_CONCRETE_EPS + (1.0 - 2.0 * HARD_CONCRETE_EPS) * r).reshape(shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def hard_concrete_gates(
    log_alpha: torch.Tensor,
    seed: int,
    offset: int | torch.Tensor,
    training: bool = True,
    beta: float = 2.0 / 3.0,
    gamma: float = -0.1,
    zeta: float = 1.1,
) -> torch.Tensor:
    """z = clamp(s (zeta - gamma) + gamma, 0, 1), differentiable in log_alpha through torch
    ops. training: s = sigmoid((log u - log(1 - u) + log_alpha) / beta) with u from
    hard_concrete_uniform(seed, offset); eval: s = sigmoid(log_alpha / beta), no noise.
    Computed in float32 (float64 for float64 input), returned in log_alpha's dtype."""
    x = log_alpha.to(_compute_dtype(log_alpha.dtype))
    if training:
        u = hard_concrete_uniform(x.shape, seed, offset, x.dtype, x.device)
        x = x + (torch.log(u) - torch.log(1.0 - u))
    s = torch.sigmoid(x / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0).to(log_alpha.dtype)


def hard_concrete_l0(
    log_alpha: torch.Tensor,
    group_size: int = 1,
    beta: float = 2.0 / 3.0,
    gamma: float = -0.1,
    zeta: float = 1.1,
) -> torch.Tensor:
    """Expected number of nonzero weights, sum_j group_size * P(z_j != 0) with
    P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)); 0-dim, float32 (float64 for
    float64 input)."""
    x = log_alpha.to(_compute_dtype(log_alpha.dtype))
    return group_size * torch.sigmoid(x - beta * math.log(-gamma / zeta)).sum()


def hard_concrete_masked_weight(
    weight: torch.Tensor,
    log_alpha: torch.Tensor,
    seed: int,
    offset: int | torch.Tensor,
    training: bool = True,
    beta: float = 2.0 / 3.0,
    gamma: float = -0.1,
    zeta: float = 1.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight ⊙ z, expected L0) for unstructured gates (log_alpha of weight's shape): z
    from hard_concrete_gates, kept in the compute dtype (not rounded to a low-precision
    dtype) before the product, which is returned in weight's dtype."""
    z = hard_concrete_gates(log_alpha.to(_compute_dtype(log_alpha.dtype)), seed, offset, training, beta, gamma, zeta)
    w_eff = (weight.to(z.dtype) * z).to(weight.dtype)
    return w_eff, hard_concrete_l0(log_alpha, 1, beta, gamma, zeta)


def sigmoid_mask_l1(scores: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """Σ scale·σ(β·s), Continuous Sparsification's L1 penalty on its mask; 0-dim, float32
    (float64 for float64 scores)."""
    return (scale * torch.sigmoid(beta * scores.to(_compute_dtype(scores.dtype)))).sum()


# --- DPF mask update -----------------------------------------------------------------------


def dpf_mask_update(
    weights: list[torch.Tensor], prev_masks: list[torch.Tensor], threshold: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """keep = |w| > threshold (compared in float32, as magnitude_threshold ranks |w|; ties
    and NaN pruned), with per-tensor kept counts and flips against prev_masks."""
    masks = [w.detach().abs().float().contiguous() > threshold for w in weights]
    nnz, flips = mask_flips(masks, prev_masks)
    return masks, nnz, flips


def mask_flips(
    new_masks: list[torch.Tensor], prev_masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nnz, flips), int64 [T]: True count of each new mask, and positions where it differs
    from the previous mask."""
    nnz = torch.stack([m.sum() for m in new_masks]).to(torch.int64)
    flips = torch.stack([(m != p).sum() for m, p in zip(new_masks, prev_masks)]).to(torch.int64)
    return nnz, flips
