"""Triton kernels for a weight under a mask, elementwise: the conv path.

- `masked_weight`: writes w_eff = w ⊙ g(mask) once, for F.conv2d.
- `masked_weight_backward`: from G = dL/dw_eff gives grad_w and grad_mask in one pass,
  recomputing g from the mask (nothing weight-sized is saved by the forward).

Also home of the per-kind gate math in Triton (`gate`, `gate_slope`, `store_mask_grad`),
which the masked-linear kernels import; ops/mask_math.py is the PyTorch twin.

Layout: the weight is treated as rows × cols = O × R, R = numel / O, over its storage
order. The launchers give every weight-shaped tensor the weight's layout (contiguous or
channels_last; dim 0 is outermost in both), so element (o, r) sits at o*R + r in each.
A hard_concrete gate broadcast along rows and/or columns (z of shape [O,1,1,1], or one
scalar gate) is read through stride 0, and its gradient is reduced inside each tile and
written as one partial per tile, summed afterwards: deterministic, unlike atomics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Kind codes, passed to the kernels as a constexpr so each kind compiles to its own code.
# (tl.constexpr(...) values: the only globals a @triton.jit function may read.)
KIND_CODES = {"binary": 0, "straight_through": 1, "sigmoid": 2, "relaxed": 3, "hard_concrete": 4}
BINARY = tl.constexpr(KIND_CODES["binary"])
STRAIGHT_THROUGH = tl.constexpr(KIND_CODES["straight_through"])
SIGMOID = tl.constexpr(KIND_CODES["sigmoid"])
LEARNABLE = frozenset({"sigmoid", "relaxed", "hard_concrete"})


@triton.jit
def gate(m, beta, scale, KIND: tl.constexpr):
    """g(mask) in float32."""
    if KIND == SIGMOID:
        return scale * tl.sigmoid(beta * m.to(tl.float32))
    else:
        return m.to(tl.float32)


@triton.jit
def gate_slope(m, beta, scale, KIND: tl.constexpr):
    """dg/dmask in float32 for a learnable kind (1 for relaxed and hard_concrete)."""
    if KIND == SIGMOID:
        sig = tl.sigmoid(beta * m.to(tl.float32))
        return (scale * beta) * sig * (1.0 - sig)
    else:
        return tl.full(m.shape, 1.0, tl.float32)


@triton.jit
def apply_gate(w, m, beta, scale, KIND: tl.constexpr):
    """w ⊙ g in w's dtype. Bool masks select instead of multiplying: no float round trip."""
    if KIND == BINARY or KIND == STRAIGHT_THROUGH:
        return tl.where(m != 0, w, tl.zeros_like(w))
    else:
        return (w.to(tl.float32) * gate(m, beta, scale, KIND)).to(w.dtype)


@triton.jit
def weight_grad(acc, m, beta, scale, KIND: tl.constexpr):
    """grad_w from G (float32): G⊙g, except straight-through, whose gradient is G itself."""
    if KIND == STRAIGHT_THROUGH:
        return acc
    elif KIND == BINARY:
        return tl.where(m != 0, acc, 0.0)
    else:
        return acc * gate(m, beta, scale, KIND)


@triton.jit
def store_mask_grad(
    gm, dst_ptr, rows, cols, pid_row, pid_col, n_rows, n_cols, stride_row, stride_col,
    REDUCE_ROWS: tl.constexpr, REDUCE_COLS: tl.constexpr,
):
    """Writes a [BLOCK_ROWS, BLOCK_COLS] tile of G⊙w⊙g' (the caller zeroes it outside the
    matrix: masked loads with other=0).

    Without reductions it goes to dst[row, col]; a mask broadcast along rows (cols) is
    reduced over the tile's rows (cols) and the partial lands at index pid_row (pid_col)
    of that dimension, so dst is then a float32 [n_row_tiles or n_rows, n_col_tiles or
    n_cols] buffer that the launcher sums."""
    if REDUCE_ROWS and REDUCE_COLS:
        tl.store(dst_ptr + pid_row * stride_row + pid_col * stride_col, tl.sum(tl.sum(gm, 1), 0))
    elif REDUCE_ROWS:
        tl.store(dst_ptr + pid_row * stride_row + cols * stride_col, tl.sum(gm, 0), mask=cols < n_cols)
    elif REDUCE_COLS:
        tl.store(dst_ptr + rows * stride_row + pid_col * stride_col, tl.sum(gm, 1), mask=rows < n_rows)
    else:
        in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        ptrs = dst_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col
        tl.store(ptrs, gm.to(dst_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _masked_weight_kernel(
    w_ptr, m_ptr, out_ptr, O, R, stride_mo, stride_mr, beta, scale,
    KIND: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_bounds = (rows[:, None] < O) & (cols[None, :] < R)
    offs = rows[:, None] * R + cols[None, :]
    w = tl.load(w_ptr + offs, mask=in_bounds)
    m = tl.load(m_ptr + rows[:, None] * stride_mo + cols[None, :] * stride_mr, mask=in_bounds)
    tl.store(out_ptr + offs, apply_gate(w, m, beta, scale, KIND), mask=in_bounds)


@triton.jit
def _masked_weight_backward_kernel(
    g_ptr, w_ptr, m_ptr, grad_w_ptr, grad_m_ptr, O, R,
    stride_mo, stride_mr, stride_gmo, stride_gmr, beta, scale,
    KIND: tl.constexpr, MASK_GRAD: tl.constexpr, REDUCE_O: tl.constexpr, REDUCE_R: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = (pid_o * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    in_bounds = (rows[:, None] < O) & (cols[None, :] < R)
    offs = rows[:, None] * R + cols[None, :]
    G = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + rows[:, None] * stride_mo + cols[None, :] * stride_mr, mask=in_bounds, other=0)
    grad_w = weight_grad(G, m, beta, scale, KIND)
    tl.store(grad_w_ptr + offs, grad_w.to(grad_w_ptr.dtype.element_ty), mask=in_bounds)
    if MASK_GRAD:
        w = tl.load(w_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        gm = G * w * gate_slope(m, beta, scale, KIND)
        store_mask_grad(gm, grad_m_ptr, rows, cols, pid_o, pid_r, O, R, stride_gmo, stride_gmr,
                        REDUCE_O, REDUCE_R)


# --- launchers ------------------------------------------------------------------------


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_shape(what: str, t: torch.Tensor, shape) -> None:
    """The launchers index tensors by the weight's sizes: one of other sizes was read out
    of bounds (raw torch.ops.sparsekern.* calls reach here unchecked)."""
    if t.shape != tuple(shape):
        raise ValueError(f"`{what}` must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_mask(mask: torch.Tensor, weight: torch.Tensor) -> None:
    """mask of weight's shape, or broadcastable to it with weight's number of dims."""
    if mask.shape == weight.shape:  # the common case, first: one comparison
        return
    if mask.dim() != weight.dim() or any(m not in (1, w) for m, w in zip(mask.shape, weight.shape)):
        raise ValueError(f"`mask` must have weight's shape {tuple(weight.shape)} or broadcast to it "
                         f"with as many dims, got {tuple(mask.shape)}")


def weight_format(weight: torch.Tensor) -> torch.memory_format:
    """The layout w_eff and grad_w are produced in: channels_last when the weight is
    (and not also plain contiguous), else contiguous."""
    if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(
        memory_format=torch.channels_last
    ):
        return torch.channels_last
    return torch.contiguous_format


def like_weight(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """t (weight's shape) with exactly weight's strides, copied only when they differ."""
    if t.stride() == weight.stride():
        return t
    return torch.empty_like(weight, dtype=t.dtype).copy_(t)


def _rows_view(weight: torch.Tensor, mask: torch.Tensor):
    """(weight, mask, O, R, mask row/col strides, mask broadcast along rows, along cols)
    with weight in weight_format and a full-shaped mask in the same layout, so flat
    offsets agree (see module docstring)."""
    fmt = weight_format(weight)
    weight = weight.contiguous(memory_format=fmt)
    O = weight.shape[0]
    R = weight.numel() // O if O else 0
    if mask.shape == weight.shape:
        return weight, like_weight(mask, weight), O, R, R, 1, False, False
    bcast_rows = mask.shape[0] == 1 and O != 1
    if all(s == 1 for s in mask.shape[1:]):  # [O or 1, 1, ...]: one gate per row (or one)
        return weight, mask, O, R, 0 if bcast_rows else mask.stride(0), 0, bcast_rows, R != 1
    # Any other broadcast (e.g. a gate per input channel) is materialised in weight's
    # layout; the backward sums its gradient back to the mask's shape.
    return weight, like_weight(mask.expand(weight.shape), weight), O, R, R, 1, False, False


def masked_weight(
    weight: torch.Tensor, mask: torch.Tensor, kind: str, beta: float = 1.0, scale: float = 1.0,
    *, block: tuple[int, int] = (32, 128),
) -> torch.Tensor:
    """w_eff = weight ⊙ g(mask), in weight's dtype and weight_format(weight)."""
    check_mask(mask, weight)
    weight, mask, O, R, smo, smr, _, _ = _rows_view(weight, mask)
    out = torch.empty_like(weight)
    if out.numel() == 0:
        return out
    BO, BR = block
    grid = (triton.cdiv(O, BO), triton.cdiv(R, BR))
    wrap_triton(_masked_weight_kernel)[grid](
        weight, mask, out, O, R, smo, smr, beta, scale,
        KIND=KIND_CODES[kind], BLOCK_O=BO, BLOCK_R=BR,
    )
    return out


def masked_weight_backward(
    grad_w_eff: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, kind: str,
    beta: float = 1.0, scale: float = 1.0, mask_grad: bool = True,
    *, block: tuple[int, int] = (32, 128),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_w, grad_mask) from G = dL/dw_eff in one pass. grad_mask has the mask's shape
    and dtype; it is an empty tensor when not asked for or when `kind` has none."""
    check_mask(mask, weight)
    check_shape("grad_w_eff", grad_w_eff, weight.shape)
    full_mask = mask.shape == weight.shape
    mask_shape, mask_dtype = mask.shape, mask.dtype
    weight, mask_v, O, R, smo, smr, reduce_o, reduce_r = _rows_view(weight, mask)
    G = like_weight(grad_w_eff, weight)
    grad_w = torch.empty_like(weight)
    mask_grad = mask_grad and kind in LEARNABLE
    BO, BR = block
    n_o, n_r = triton.cdiv(O, BO), triton.cdiv(R, BR)
    if not mask_grad:
        grad_m_buf, sgo, sgr = mask.new_empty(0), 0, 0
    elif reduce_o or reduce_r:  # per-tile partials, summed below
        grad_m_buf = weight.new_empty((n_o if reduce_o else O, n_r if reduce_r else R), dtype=torch.float32)
        sgo, sgr = grad_m_buf.stride()
    else:  # full-shaped; an expanded gate's gradient is accumulated in float32, then summed
        grad_m_buf = torch.empty_like(weight, dtype=mask_dtype if full_mask else torch.float32)
        sgo, sgr = R, 1
    if weight.numel() > 0:
        wrap_triton(_masked_weight_backward_kernel)[(n_o, n_r)](
            G, weight, mask_v, grad_w, grad_m_buf, O, R, smo, smr, sgo, sgr, beta, scale,
            KIND=KIND_CODES[kind], MASK_GRAD=mask_grad, REDUCE_O=reduce_o, REDUCE_R=reduce_r,
            BLOCK_O=BO, BLOCK_R=BR,
        )
    elif mask_grad:
        grad_m_buf = grad_m_buf.zero_()
    if not mask_grad or full_mask:
        return grad_w, grad_m_buf
    if reduce_o or reduce_r:
        dims = [d for d, r in ((0, reduce_o), (1, reduce_r)) if r]
        return grad_w, grad_m_buf.sum(dims).reshape(mask_shape).to(mask_dtype)
    return grad_w, _sum_to(grad_m_buf, mask_shape).to(mask_dtype)


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    dims = [d for d, (s, n) in enumerate(zip(shape, t.shape)) if s == 1 and n != 1]
    return (t.sum(dims, keepdim=True) if dims else t).reshape(shape)
