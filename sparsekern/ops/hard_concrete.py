"""Hard-concrete gates (Louizos et al. 2018) for constrained / penalised L0.

One op, sparsekern::hard_concrete_sample, reads log alpha once and writes the gates z and
the expected-L0 sum; hard_concrete_gates and hard_concrete_l0 are its two halves. Its
backward op re-derives the noise u from (seed, offset), so autograd saves only log alpha.

Paths: CUDA runs the Triton kernels (sparsekern/kernels/hard_concrete.py). On the CPU,
float32 / float16 / bfloat16 run fused C++ kernels (csrc/cpu/hard_concrete_cpu.cpp:
sparsekern::hard_concrete_sample_fused and its backward, one pass each, vectorised, on
all threads); float64, the precision the tests use as the oracle, and other devices run
the torch path below (_sample_torch / _backward_torch, ~10 elementwise passes). Why: the
torch path dominated the unstructured L0 training step. On 11,169,152 float32 log alphas
(ResNet-18's weights; the 2-core development machine, medians over 8 paired runs) the
fused kernels take the forward from 266 to 38 ms and the backward from 418 to 38 ms;
over ResNet-18's 21 weight tensors one by one, 192 -> 32 ms and 311 -> 26 ms (details
in the .cpp).

Noise: Philox4x32-10 keyed by `seed`; flat index i takes word i % 4 of the call at counter
(i // 4, offset), identical on all paths (reference.philox_uniform): the Triton kernel
draws it with tl.philox, the CPU paths with the same stream in C++
(csrc/cpu/hard_concrete_cpu.cpp, also behind sparsekern::philox_uniform_). The same
(seed, offset) therefore gives the same gates on CPU and CUDA up to float rounding; every
(offset, i // 4) pair is its own counter, so stepping the offset (e.g. by one per forward)
never reuses noise.

Oracle: reference.hard_concrete_gates / reference.hard_concrete_l0.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _checks
from .._extension import HAS_EXTENSION
from . import mask_math, reference
from ._library import cpp_op, fake
from ..kernels.hard_concrete import backward as _triton_backward
from ..kernels.hard_concrete import sample as _triton_sample

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # METHODS.md; Louizos et al.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT64_MAX = 2**63 - 1


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # z keeps log alpha's dtype; the math and the L0 sum run in float32 (float64 stays).
    return torch.promote_types(dtype, torch.float32)


# --- the torch path: CPU kernel, and the body for every non-CUDA device ----------------


def _philox_reference(out: torch.Tensor, seed: int, offset: torch.Tensor) -> None:
    out.copy_(reference.philox_uniform(out.numel(), seed, offset, out.device).view(out.shape))


# C++ Philox on the CPU (csrc/cpu/hard_concrete_cpu.cpp), the reference where _C is missing.
_philox_op = cpp_op("philox_uniform_", _philox_reference)


@fake("sparsekern::philox_uniform_")
def _philox_fake(out, seed, offset):
    return None


def _uniform(shape, seed: int, offset: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """reference.hard_concrete_uniform, bit for bit; on the CPU the Philox rounds run in
    C++ (the float64 path's noise; the fused kernels draw theirs inline)."""
    if torch.device(device).type != "cpu":
        return reference.hard_concrete_uniform(shape, seed, offset, dtype, device)
    r = torch.empty(shape, dtype=torch.float32)
    _philox_op(r, seed, offset)
    eps = reference.HARD_CONCRETE_EPS
    return eps + (1.0 - 2.0 * eps) * r.to(dtype)


def _logits(x: torch.Tensor, seed: int, offset: torch.Tensor, training: bool) -> torch.Tensor:
    """log α plus the logistic noise log u − log(1 − u) in training; log α in eval."""
    if not training:
        return x
    u = _uniform(x.shape, seed, offset, x.dtype, x.device)
    return x + (torch.log(u) - torch.log(1.0 - u))


def _sample_torch(log_alpha, seed, offset, group_size, beta, gamma, zeta, training):
    log_alpha = log_alpha.contiguous()
    s = torch.sigmoid(_logits(log_alpha.to(_acc_dtype(log_alpha.dtype)), seed, offset, training) / beta)
    z = torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0).to(log_alpha.dtype)
    return z, reference.hard_concrete_l0(log_alpha, group_size, beta, gamma, zeta)


def _backward_torch(grad_z, grad_l0, log_alpha, seed, offset, group_size, beta, gamma, zeta, training):
    dtype = _acc_dtype(log_alpha.dtype)
    x = log_alpha.contiguous().to(dtype)
    s = torch.sigmoid(_logits(x, seed, offset, training) / beta)
    y = s * (zeta - gamma) + gamma
    dz = torch.where((y > 0) & (y < 1), (zeta - gamma) / beta * s * (1 - s), 0.0)
    p = torch.sigmoid(x - beta * math.log(-gamma / zeta))
    grad = grad_z.to(dtype) * dz + (grad_l0.to(dtype) * group_size) * p * (1 - p)
    # Contiguous like the fake and the kernels: the product takes grad_z's layout otherwise.
    return grad.to(log_alpha.dtype).contiguous()


# The fused C++ kernels (csrc/cpu/hard_concrete_cpu.cpp) for float32/float16/bfloat16 on
# the CPU; where _C is missing, the torch path above under the same names.
_fused_sample = cpp_op("hard_concrete_sample_fused", _sample_torch)
_fused_backward = cpp_op("hard_concrete_sample_fused_backward", _backward_torch)


@fake("sparsekern::hard_concrete_sample_fused")
def _fused_sample_fake(log_alpha, seed, offset, group_size, beta, gamma, zeta, training):
    return log_alpha.new_empty(log_alpha.shape), log_alpha.new_empty((), dtype=torch.float32)


@fake("sparsekern::hard_concrete_sample_fused_backward")
def _fused_backward_fake(grad_z, grad_l0, log_alpha, seed, offset, group_size, beta, gamma, zeta, training):
    return log_alpha.new_empty(log_alpha.shape)


def _fused(log_alpha: torch.Tensor) -> bool:
    # float64 stays on the torch path: it is the precision the tests use as the oracle.
    return log_alpha.device.type == "cpu" and log_alpha.dtype != torch.float64


def _sample_cpu(log_alpha, seed, offset, group_size, beta, gamma, zeta, training):
    """The op's body for every non-CUDA tensor."""
    if _fused(log_alpha):
        return _fused_sample(log_alpha, seed, offset, group_size, beta, gamma, zeta, training)
    return _sample_torch(log_alpha, seed, offset, group_size, beta, gamma, zeta, training)


def _backward_cpu(grad_z, grad_l0, log_alpha, seed, offset, group_size, beta, gamma, zeta, training):
    if _fused(log_alpha):
        return _fused_backward(grad_z, grad_l0, log_alpha, seed, offset, group_size, beta, gamma, zeta, training)
    return _backward_torch(grad_z, grad_l0, log_alpha, seed, offset, group_size, beta, gamma, zeta, training)


# --- the ops ----------------------------------------------------------------------------


@torch.library.triton_op("sparsekern::hard_concrete_sample", mutates_args=())
def _sample_op(
    log_alpha: torch.Tensor, seed: int, offset: torch.Tensor, group_size: int,
    beta: float, gamma: float, zeta: float, training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.compile decomposes a triton_op by calling this body directly, bypassing the
    # CPU kernel registered below, so non-CUDA tensors are routed to the CPU path here too.
    if log_alpha.device.type != "cuda":
        return _sample_cpu(log_alpha, seed, offset, group_size, beta, gamma, zeta, training)
    return _triton_sample(log_alpha, seed, offset, group_size, beta, gamma, zeta, training)


@torch.library.triton_op("sparsekern::hard_concrete_sample_backward", mutates_args=())
def _backward_op(
    grad_z: torch.Tensor, grad_l0: torch.Tensor, log_alpha: torch.Tensor, seed: int,
    offset: torch.Tensor, group_size: int, beta: float, gamma: float, zeta: float, training: bool,
) -> torch.Tensor:
    if log_alpha.device.type != "cuda":
        return _backward_cpu(grad_z, grad_l0, log_alpha, seed, offset, group_size, beta, gamma, zeta, training)
    return _triton_backward(grad_z, grad_l0, log_alpha, seed, offset, group_size, beta, gamma, zeta, training)


_sample_op.register_kernel("cpu")(_sample_cpu)
_backward_op.register_kernel("cpu")(_backward_cpu)


@fake(_sample_op)
def _sample_fake(log_alpha, seed, offset, group_size, beta, gamma, zeta, training):
    z = log_alpha.new_empty(log_alpha.shape)
    return z, log_alpha.new_empty((), dtype=_acc_dtype(log_alpha.dtype))


@fake(_backward_op)
def _backward_fake(grad_z, grad_l0, log_alpha, seed, offset, group_size, beta, gamma, zeta, training):
    return log_alpha.new_empty(log_alpha.shape)


def _setup_context(ctx, inputs, output):
    log_alpha, seed, offset, *args = inputs
    # Never u or z: the backward regenerates them from (seed, offset). The offset is saved
    # (not kept in ctx) so that an in-place change before the backward raises instead of
    # silently regenerating other noise.
    ctx.save_for_backward(log_alpha, offset)
    ctx.seed, ctx.args = seed, args


def _backward(ctx, grad_z, grad_l0):
    log_alpha, offset = ctx.saved_tensors
    if torch.is_grad_enabled():
        raise RuntimeError(mask_math.NO_HARD_CONCRETE_DOUBLE_BACKWARD)
    grad = torch.ops.sparsekern.hard_concrete_sample_backward(grad_z, grad_l0, log_alpha, ctx.seed, offset, *ctx.args)
    return (grad, None, None) + (None,) * len(ctx.args)


_sample_op.register_autograd(_backward, setup_context=_setup_context)


# --- public functions -------------------------------------------------------------------


def _check_real(name, value):
    return _checks.finite(f"`{name}`", value)


def _check_int(name, value, low):
    if isinstance(value, torch.SymInt):  # traced by torch.compile: no range check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    value = int(value)
    if not low <= value <= _INT64_MAX:
        raise ValueError(f"`{name}` must be in [{low}, 2**63 - 1], got {value}")
    return value


def offset_tensor(offset, log_alpha: torch.Tensor) -> torch.Tensor:
    """The ops' `offset`: a one-element int64 tensor on log_alpha's device, which the
    kernels read (an int would make torch.compile recompile whenever it changes, every
    training step). An int is range-checked and converted; a tensor is used as is."""
    if not isinstance(offset, torch.Tensor):
        offset = _check_int("offset", offset, 0)
        return torch.full((), offset, dtype=torch.int64, device=log_alpha.device)
    if offset.dtype != torch.int64:
        raise TypeError(f"`offset` must be an int or an int64 tensor, got a {offset.dtype} tensor")
    if offset.numel() != 1:
        raise ValueError(f"`offset` must have one element, got shape {tuple(offset.shape)}")
    if offset.device != log_alpha.device:
        raise ValueError(f"`offset` must be on log_alpha's device {log_alpha.device}, got {offset.device}")
    # The value is read only where that needs no device sync (CUDA kernels take any bits).
    if offset.device.type == "cpu" and not torch.compiler.is_compiling() and int(offset) < 0:
        raise ValueError(f"`offset` must be >= 0, got {int(offset)}")
    return offset


def _check(log_alpha, beta, gamma, zeta):
    if not isinstance(log_alpha, torch.Tensor):
        raise TypeError(f"`log_alpha` must be a torch.Tensor, got {type(log_alpha).__name__}")
    if log_alpha.dtype not in _DTYPES:
        raise ValueError(
            f"`log_alpha` must be floating point (float32/float16/bfloat16/float64), got {log_alpha.dtype}"
        )
    beta, gamma, zeta = _check_real("beta", beta), _check_real("gamma", gamma), _check_real("zeta", zeta)
    if beta <= 0:
        raise ValueError(f"`beta` (the temperature) must be > 0, got {beta}")
    # The stretch (gamma, zeta) must contain [0, 1] strictly, or z never reaches 0 or 1.
    if gamma >= 0:
        raise ValueError(f"`gamma` must be < 0, got {gamma}")
    if zeta <= 1:
        raise ValueError(f"`zeta` must be > 1, got {zeta}")
    return beta, gamma, zeta


def hard_concrete_sample(
    log_alpha: torch.Tensor,
    seed: int,
    offset: int | torch.Tensor,
    group_size: int = 1,
    *,
    training: bool = True,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, expected_l0) from one pass over log_alpha: hard_concrete_gates and
    hard_concrete_l0 (with `group_size`) together, both differentiable w.r.t. log_alpha.
    offset: an int, or a one-element int64 tensor on log_alpha's device (what
    HardConcreteMask passes: a counter torch.compile traces without recompiling)."""
    beta, gamma, zeta = _check(log_alpha, beta, gamma, zeta)
    seed = _check_int("seed", seed, 0)
    offset = offset_tensor(offset, log_alpha)
    group_size = _check_int("group_size", group_size, 1)
    if not isinstance(training, bool):
        raise TypeError(f"`training` must be a bool, got {type(training).__name__}")
    return sample_checked(log_alpha, seed, offset, group_size, training, beta, gamma, zeta)


def sample_checked(log_alpha, seed, offset, group_size, training, beta, gamma, zeta):
    """hard_concrete_sample for arguments already validated, as HardConcreteMask's are
    (its constants when it was built, seed and offset as it keeps them): the checks took
    ~8 us per layer and step (30% of the call on a ResNet-20 layer)."""
    if HAS_EXTENSION and _fused(log_alpha) and not torch.compiler.is_compiling():
        # Eager CPU: the fused kernels with their autograd in C++ (csrc/eager_autograd.cpp),
        # without the custom-op dispatch in Python; torch.compile traces _sample_op.
        return _fused_sample(log_alpha, seed, offset, group_size, beta, gamma, zeta, training)
    return _sample_op(log_alpha, seed, offset, group_size, beta, gamma, zeta, training)


def hard_concrete_gates(
    log_alpha: torch.Tensor,
    seed: int,
    offset: int | torch.Tensor,
    *,
    training: bool = True,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> torch.Tensor:
    """Hard-concrete gates z in [0, 1], one per element of log_alpha (any shape: one gate
    per group for structured sparsity, or the weight's shape for unstructured).

    training: u ~ U(eps, 1 - eps) (eps = 1e-6) from Philox keyed by (seed, offset, flat
    index), deterministic in (seed, offset); s = sigmoid((log u - log(1 - u) + log_alpha)
    / beta); z = clamp(s (zeta - gamma) + gamma, 0, 1). Use a new offset per forward.
    eval: z = clamp(sigmoid(log_alpha / beta) (zeta - gamma) + gamma, 0, 1), no noise.

    dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta where 0 < z < 1, else 0; the backward
    regenerates u from (seed, offset) rather than saving it. z has log_alpha's dtype
    (computed in float32, float64 for float64 input) and is contiguous.
    """
    return hard_concrete_sample(
        log_alpha, seed, offset, training=training, beta=beta, gamma=gamma, zeta=zeta
    )[0]


def hard_concrete_l0(
    log_alpha: torch.Tensor,
    group_size: int = 1,
    *,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> torch.Tensor:
    """Expected number of nonzero weights, sum_j group_size * P(z_j != 0) with
    P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)): a 0-dim float32 tensor
    (float64 for float64 input), differentiable w.r.t. log_alpha. Divide by
    group_size * log_alpha.numel() for the expected density. This runs hard_concrete_sample
    in eval mode and drops its gates; call hard_concrete_sample directly when the gates are
    needed too, to get both from one pass."""
    return hard_concrete_sample(
        log_alpha, 0, 0, group_size, training=False, beta=beta, gamma=gamma, zeta=zeta
    )[1]
