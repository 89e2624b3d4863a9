"""Triton GEMMs for y = x @ (w ⊙ g).T + b that never write w_eff.

- `masked_matmul`: C = A @ B with B read from the weight and mask through strides and
  gated inside the tile load. The forward (A = x, B = w_effᵀ) and grad_x
  (A = G_y, B = w_eff) are the same kernel with the weight's strides swapped.
- `masked_linear_grad_weight`: the GEMM G_yᵀ @ x, whose epilogue turns the float32
  accumulator (= G = dL/dw_eff tile) into grad_w and grad_mask for the kind, and which
  also sums G_y into the bias gradient on the way (the G_y tiles are loaded anyway).

Tiles follow Triton's matmul tutorial: grouped program order for L2 reuse, float32
accumulation, masked loads at the M/N/K edges, any input strides (transposed weights,
sliced activations; stride 0 for broadcast hard_concrete gates).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .masked_conv import (KIND_CODES, LEARNABLE, apply_gate, check_mask, check_shape, gate_slope, interpreting,
                          store_mask_grad, weight_grad)


@triton.jit
def _tile_ids(pid, n_row_tiles, n_col_tiles, GROUP: tl.constexpr):
    """(row tile, col tile) of program pid in grouped order (Triton tutorial 03): GROUP
    row tiles sweep each column tile together, so its operand stays hot in L2."""
    width = GROUP * n_col_tiles
    first_row = (pid // width) * GROUP
    size = tl.minimum(n_row_tiles - first_row, GROUP)
    row = first_row + (pid % width) % size
    col = (pid % width) // size
    return row, col


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # The interpreter cannot multiply bfloat16 (it holds the raw bits); the operands are
    # already rounded to the input dtype, so a float32 dot of them gives the GPU's result.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _masked_matmul_kernel(
    a_ptr, w_ptr, m_ptr, bias_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_wk, stride_wn, stride_mk, stride_mn, stride_cm, stride_cn,
    beta, scale,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """C[M, N] = A[M, K] @ (W ⊙ g(mask))[K, N], W and mask addressed as [K, N]."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b_in = (kk[:, None] < K) & (rn[None, :] < N)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=b_in, other=0.0)
        m = tl.load(m_ptr + kk[:, None] * stride_mk + rn[None, :] * stride_mn, mask=b_in, other=0)
        # w_eff exists only as this tile, rounded to the input dtype like a stored w_eff.
        b = apply_gate(w, m, beta, scale, KIND).to(a.dtype)
        acc = _dot(a, b, acc, UPCAST, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_in = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=c_in)


@triton.jit
def _masked_linear_grad_weight_kernel(
    gy_ptr, x_ptr, w_ptr, m_ptr, gw_ptr, gm_ptr, gb_ptr, M, N, K,
    stride_gym, stride_gyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk,
    stride_gwn, stride_gwk, stride_gmn, stride_gmk, beta, scale,
    KIND: tl.constexpr, MASK_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    REDUCE_N: tl.constexpr, REDUCE_K: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    """acc[N, K] = G_yᵀ @ x over M; epilogue: grad_w, grad_mask (and grad_bias)."""
    pid_n, pid_k = _tile_ids(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mm = (m0 + rm).to(tl.int64)
        gy = tl.load(gy_ptr + mm[None, :] * stride_gym + rn[:, None] * stride_gyn,
                     mask=(rn[:, None] < N) & (mm[None, :] < M), other=0.0)
        x = tl.load(x_ptr + mm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(mm[:, None] < M) & (rk[None, :] < K), other=0.0)
        acc = _dot(gy, x, acc, UPCAST, INPUT_PRECISION)
        if BIAS_GRAD:
            # Only the first column of tiles owns the bias; the others skip the sum.
            if pid_k == 0:
                bias_acc += tl.sum(gy.to(tl.float32), 1)
    tile_in = (rn[:, None] < N) & (rk[None, :] < K)
    m = tl.load(m_ptr + rn[:, None] * stride_mn + rk[None, :] * stride_mk, mask=tile_in, other=0)
    gw = weight_grad(acc, m, beta, scale, KIND)
    tl.store(gw_ptr + rn[:, None] * stride_gwn + rk[None, :] * stride_gwk,
             gw.to(gw_ptr.dtype.element_ty), mask=tile_in)
    if MASK_GRAD:
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=tile_in, other=0.0)
        gm = acc * w.to(tl.float32) * gate_slope(m, beta, scale, KIND)
        store_mask_grad(gm, gm_ptr, rn, rk, pid_n, pid_k, N, K, stride_gmn, stride_gmk,
                        REDUCE_N, REDUCE_K)
    if BIAS_GRAD:
        if pid_k == 0:
            tl.store(gb_ptr + rn, bias_acc.to(gb_ptr.dtype.element_ty), mask=rn < N)


# --- launchers ------------------------------------------------------------------------


def _input_precision(dtype: torch.dtype) -> str:
    # float32 follows torch's matmul setting ("highest" = IEEE, the default; else TF32).
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _blocks(dtype: torch.dtype, rows: int, cols: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_rows, BLOCK_cols, BLOCK_reduce, num_warps, num_stages): 128×128 tiles for
    16-bit inputs with enough rows, 64×64 otherwise (float32 tiles take twice the shared
    memory per stage)."""
    if dtype != torch.float32 and rows >= 128 and cols >= 128:
        return 128, 128, 64, 8, 3
    return 64, 64, 32, 4, 3


def _mask_strides(mask: torch.Tensor) -> tuple[int, int]:
    # Stride 0 along a broadcast (size-1) dimension: a gate per row or column is read in
    # place. (Not mask.expand: a view passed to a kernel reads as a possible mutation of
    # it when torch.compile functionalises the launch.)
    return tuple(st if n != 1 else 0 for n, st in zip(mask.shape, mask.stride()))


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def masked_matmul(
    a: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
    kind: str, beta: float = 1.0, scale: float = 1.0, *, transpose_weight: bool = True,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """a @ (weight ⊙ g)ᵀ + bias (transpose_weight, the forward: a is x [M, in]) or
    a @ (weight ⊙ g) (grad_x: a is G_y [M, out]), in a's dtype. mask may be a
    broadcastable hard_concrete gate; it is read through stride 0."""
    M = a.shape[0]
    check_mask(mask, weight)
    check_shape("a", a, (M, weight.shape[1] if transpose_weight else weight.shape[0]))
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],))
    sm0, sm1 = _mask_strides(mask)
    if transpose_weight:  # B[k, n] = w[n, k]
        N, K = weight.shape
        swk, swn, smk, smn = weight.stride(1), weight.stride(0), sm1, sm0
    else:  # B[k, n] = w[k, n]
        K, N = weight.shape
        swk, swn, smk, smn = weight.stride(0), weight.stride(1), sm0, sm1
    c = a.new_empty((M, N))
    if M == 0 or N == 0:
        return c
    BM, BN, BK, warps, stages = _blocks(a.dtype, M, N)
    if block is not None:
        BM, BN, BK = block
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    wrap_triton(_masked_matmul_kernel)[grid](
        a, weight, mask, bias if bias is not None else c, c, M, N, K,
        a.stride(0), a.stride(1), swk, swn, smk, smn, c.stride(0), c.stride(1), beta, scale,
        KIND=KIND_CODES[kind], HAS_BIAS=bias is not None, UPCAST=_upcast(a.dtype),
        INPUT_PRECISION=_input_precision(a.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP=8, num_warps=warps, num_stages=stages,
    )
    return c


def masked_linear_grad_weight(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, kind: str,
    beta: float = 1.0, scale: float = 1.0, mask_grad: bool = True, bias_grad: bool = False,
    *, block: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_w, grad_mask, grad_bias) from G_y [M, out] and x [M, in], one GEMM.

    grad_w: weight's shape and dtype, contiguous. grad_mask: the mask's shape and dtype
    (a broadcast hard_concrete gate gets the sum over its broadcast dims), empty when not
    asked for or when `kind` has none. grad_bias: [out] in G_y's dtype, empty unless asked.
    """
    M = grad_y.shape[0]
    N, K = weight.shape
    check_mask(mask, weight)
    check_shape("grad_y", grad_y, (M, N))
    check_shape("x", x, (M, K))
    mask_grad = mask_grad and kind in LEARNABLE
    reduce_n = mask.shape[0] == 1 and N != 1
    reduce_k = mask.shape[1] == 1 and K != 1
    sm0, sm1 = _mask_strides(mask)
    BN, BK, BM, warps, stages = _blocks(x.dtype, N, K)
    if block is not None:
        BN, BK, BM = block
    n_n, n_k = triton.cdiv(N, BN), triton.cdiv(K, BK)
    grad_w = weight.new_empty((N, K))
    if not mask_grad:
        grad_m = mask.new_empty(0)
        sgn, sgk = 0, 0
    elif reduce_n or reduce_k:  # float32 per-tile partials, summed below
        grad_m = weight.new_empty((n_n if reduce_n else N, n_k if reduce_k else K), dtype=torch.float32)
        sgn, sgk = grad_m.stride()
    else:
        grad_m = mask.new_empty((N, K))
        sgn, sgk = grad_m.stride()
    grad_b = grad_y.new_empty((N,) if bias_grad else (0,))
    if N > 0 and K > 0:
        wrap_triton(_masked_linear_grad_weight_kernel)[(n_n * n_k,)](
            grad_y, x, weight, mask, grad_w, grad_m, grad_b, M, N, K,
            grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1), sm0, sm1,
            grad_w.stride(0), grad_w.stride(1), sgn, sgk, beta, scale,
            KIND=KIND_CODES[kind], MASK_GRAD=mask_grad, BIAS_GRAD=bias_grad,
            REDUCE_N=reduce_n, REDUCE_K=reduce_k, UPCAST=_upcast(x.dtype),
            INPUT_PRECISION=_input_precision(x.dtype),
            BLOCK_N=BN, BLOCK_K=BK, BLOCK_M=BM, GROUP=8, num_warps=warps, num_stages=stages,
        )
    elif bias_grad:  # no (N, K) tiles to carry the bias sum: K == 0
        grad_b = grad_y.sum(0)
    if mask_grad and (reduce_n or reduce_k):
        if N == 0 or K == 0:
            grad_m.zero_()
        dims = [d for d, r in ((0, reduce_n), (1, reduce_k)) if r]
        grad_m = grad_m.sum(dims, keepdim=True).to(mask.dtype)
    return grad_w, grad_m, grad_b
