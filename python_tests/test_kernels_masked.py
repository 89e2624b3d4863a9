"""The masked-weight Triton kernels (kernels/masked_linear.py, kernels/masked_conv.py),
called through their launchers on small CPU tensors under TRITON_INTERPRET=1 (or on CUDA),
against the float64 reference: forward, grad_x, grad_w, grad_mask, grad_bias, every kind.

Small blocks (16) make every shape span several tiles with ragged edges; shapes stay ≤ 64
so the interpreter finishes in seconds.
"""
import math

import pytest
import torch

from conftest import HAS_CUDA, tolerances
from sparsekern.kernels import masked_conv as kconv
from sparsekern.kernels import masked_linear as klin
from masked_helpers import make_mask
from sparsekern.ops import mask_math, reference

pytestmark = pytest.mark.triton

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
KINDS = mask_math.KINDS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK3 = (16, 16, 16)


def to64(t):
    return t.detach().to(torch.float64) if t.is_floating_point() else t.detach()


def ref_linear_grads(x, weight, bias, mask, kind, beta, scale, grad_y):
    """float64 autograd of the reference: (y, grad_x, grad_w, grad_mask, grad_bias)."""
    leaves = [to64(t).requires_grad_(t.is_floating_point()) if t is not None else None
              for t in (x, weight, mask, bias)]
    x64, w64, m64, b64 = leaves
    y = reference.masked_linear(x64, w64, b64, m64, kind, beta, scale)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = dict(zip(map(id, wrt), torch.autograd.grad(y, wrt, to64(grad_y))))
    return y.detach(), *(grads.get(id(t)) if t is not None else None for t in (x64, w64, m64, b64))


def close(actual, expected, dtype, k=16.0):
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), **tolerances(dtype, k))


def linear_inputs(kind, dtype, M=19, N=37, K=53, mask_shape=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=gen) / math.sqrt(K)).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    m = make_mask(kind, (N, K), gen, mask_shape)
    gy = (torch.randn(M, N, generator=gen) / math.sqrt(max(M, 1))).to(dtype)
    return [t.to(DEV) for t in (x, w, b, m, gy)]


def test_kind_codes_cover_mask_math():
    assert tuple(kconv.KIND_CODES) == mask_math.KINDS
    assert kconv.LEARNABLE == mask_math.LEARNABLE_KINDS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_linear_forward_and_grads(kind, dtype):
    beta, scale = 1.7, 1.3
    x, w, b, m, gy = linear_inputs(kind, dtype)
    y_ref, gx_ref, gw_ref, gm_ref, gb_ref = ref_linear_grads(x, w, b, m, kind, beta, scale, gy)

    y = klin.masked_matmul(x, w, m, b, kind, beta, scale, block=BLOCK3)
    assert y.dtype == dtype and y.shape == (19, 37)
    close(y, y_ref, dtype)
    gx = klin.masked_matmul(gy, w, m, None, kind, beta, scale, transpose_weight=False, block=BLOCK3)
    close(gx, gx_ref, dtype)
    gw, gm, gb = klin.masked_linear_grad_weight(gy, x, w, m, kind, beta, scale, True, True, block=BLOCK3)
    assert gw.dtype == dtype and gb.dtype == dtype
    close(gw, gw_ref, dtype)
    close(gb, gb_ref, dtype)
    if kind in mask_math.LEARNABLE_KINDS:
        assert gm.shape == m.shape and gm.dtype == m.dtype
        close(gm, gm_ref, dtype)
    else:
        assert gm.numel() == 0


def test_straight_through_grad_reaches_pruned_weights():
    x, w, b, m, gy = linear_inputs("straight_through", torch.float32)
    gw, _, _ = klin.masked_linear_grad_weight(gy, x, w, m, "straight_through", block=BLOCK3)
    gw_bin, _, _ = klin.masked_linear_grad_weight(gy, x, w, m, "binary", block=BLOCK3)
    pruned = ~m
    assert pruned.any() and (gw[pruned] != 0).all()
    assert (gw_bin[pruned] == 0).all()
    torch.testing.assert_close(gw, (gy.t().double() @ x.double()).float(), **tolerances(torch.float32, 16))


@pytest.mark.parametrize("mask_shape", [(1, 53), (37, 1), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_hard_concrete_broadcast_gate(mask_shape, dtype):
    x, w, b, z, gy = linear_inputs("hard_concrete", dtype, mask_shape=mask_shape)
    y_ref, gx_ref, gw_ref, gz_ref, _ = ref_linear_grads(x, w, None, z, "hard_concrete", 1.0, 1.0, gy)
    close(klin.masked_matmul(x, w, z, None, "hard_concrete", block=BLOCK3), y_ref, dtype)
    gx = klin.masked_matmul(gy, w, z, None, "hard_concrete", transpose_weight=False, block=BLOCK3)
    close(gx, gx_ref, dtype)
    gw, gz, gb = klin.masked_linear_grad_weight(gy, x, w, z, "hard_concrete", block=BLOCK3)
    assert gz.shape == z.shape and gb.numel() == 0
    close(gw, gw_ref, dtype)
    # A sum over up to 53 products: scale the tolerance with the reduction length.
    close(gz, gz_ref, dtype, k=16.0 * math.sqrt(53))


@pytest.mark.parametrize("kind", ["sigmoid", "binary"])
def test_linear_non_contiguous(kind):
    """Transposed weight and mask, x and grad_y sliced with a column stride."""
    # Sliced after the move: .to(cuda) of a CPU view makes a contiguous copy.
    gen = torch.Generator().manual_seed(3)
    M, N, K = 13, 29, 41
    x = (torch.randn(M, 2 * K, generator=gen) / math.sqrt(K)).to(DEV)[:, ::2]
    w = torch.randn(K, N, generator=gen).to(DEV).t()
    m = make_mask(kind, (K, N), gen).to(DEV).t()
    b = torch.randn(N, generator=gen).to(DEV)
    gy = torch.randn(M, N + 3, generator=gen).to(DEV)[:, 3:]
    assert not (x.is_contiguous() or w.is_contiguous() or m.is_contiguous() or gy.is_contiguous())
    y_ref, gx_ref, gw_ref, gm_ref, gb_ref = ref_linear_grads(x, w, b, m, kind, 0.5, 2.0, gy)
    close(klin.masked_matmul(x, w, m, b, kind, 0.5, 2.0, block=BLOCK3), y_ref, torch.float32)
    gx = klin.masked_matmul(gy, w, m, None, kind, 0.5, 2.0, transpose_weight=False, block=BLOCK3)
    close(gx, gx_ref, torch.float32)
    gw, gm, gb = klin.masked_linear_grad_weight(gy, x, w, m, kind, 0.5, 2.0, True, True, block=BLOCK3)
    close(gw, gw_ref, torch.float32)
    close(gb, gb_ref, torch.float32)
    if gm_ref is not None:
        close(gm, gm_ref, torch.float32)


def test_linear_zero_rows():
    """M = 0: an empty output, and zero weight/mask/bias gradients."""
    x, w, b, m, gy = linear_inputs("relaxed", torch.float32, M=0)
    y = klin.masked_matmul(x, w, m, b, "relaxed", block=BLOCK3)
    assert y.shape == (0, 37)
    gw, gm, gb = klin.masked_linear_grad_weight(gy, x, w, m, "relaxed", 1.0, 1.0, True, True, block=BLOCK3)
    assert (gw == 0).all() and (gm == 0).all() and (gb == 0).all()


def test_linear_default_blocks():
    """The launch configuration the CUDA path uses (one 64-tile here)."""
    x, w, b, m, gy = linear_inputs("sigmoid", torch.float32, M=5, N=7, K=11)
    y_ref, _, gw_ref, gm_ref, _ = ref_linear_grads(x, w, b, m, "sigmoid", 1.0, 1.0, gy)
    close(klin.masked_matmul(x, w, m, b, "sigmoid"), y_ref, torch.float32)
    gw, gm, _ = klin.masked_linear_grad_weight(gy, x, w, m, "sigmoid")
    close(gw, gw_ref, torch.float32)
    close(gm, gm_ref, torch.float32)


# --- conv weight ------------------------------------------------------------------------


def conv_inputs(kind, dtype, shape=(7, 5, 3, 3), mask_shape=None, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    m = make_mask(kind, shape, gen, mask_shape)
    G = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
        if m.shape == w.shape:
            m = m.contiguous(memory_format=torch.channels_last)
    return [t.to(DEV) for t in (w, m, G)]


def ref_weight_grads(w, m, kind, beta, scale, G):
    w64 = to64(w).requires_grad_()
    m64 = to64(m).requires_grad_(m.is_floating_point())
    out = reference.masked_conv2d_weight(w64, m64, kind, beta, scale)
    wrt = [w64] + ([m64] if m64.requires_grad else [])
    grads = torch.autograd.grad(out, wrt, to64(G))
    return out.detach(), grads[0], (grads[1] if len(grads) > 1 else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_conv_weight_forward_and_backward(kind, dtype):
    beta, scale = 2.5, 0.8
    w, m, G = conv_inputs(kind, dtype)
    out_ref, gw_ref, gm_ref = ref_weight_grads(w, m, kind, beta, scale, G)
    out = kconv.masked_weight(w, m, kind, beta, scale, block=(4, 16))
    assert out.dtype == dtype
    close(out, out_ref, dtype, k=8.0)
    gw, gm = kconv.masked_weight_backward(G, w, m, kind, beta, scale, True, block=(4, 16))
    close(gw, gw_ref, dtype, k=8.0)
    if gm_ref is None:
        assert gm.numel() == 0
    else:
        assert gm.shape == m.shape and gm.dtype == m.dtype
        close(gm, gm_ref, dtype, k=8.0)


@pytest.mark.parametrize("mask_shape", [(7, 1, 1, 1), (1, 1, 1, 1), (1, 5, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_weight_hard_concrete_broadcast_gate(mask_shape, channels_last):
    w, z, G = conv_inputs("hard_concrete", torch.float32, mask_shape=mask_shape, channels_last=channels_last)
    out_ref, gw_ref, gz_ref = ref_weight_grads(w, z, "hard_concrete", 1.0, 1.0, G)
    out = kconv.masked_weight(w, z, "hard_concrete", block=(4, 16))
    close(out, out_ref, torch.float32, k=8.0)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    gw, gz = kconv.masked_weight_backward(G, w, z, "hard_concrete", block=(4, 16))
    close(gw, gw_ref, torch.float32, k=8.0)
    assert gz.shape == z.shape
    close(gz, gz_ref, torch.float32, k=16.0)


@pytest.mark.parametrize("kind", ["sigmoid", "straight_through"])
def test_conv_weight_layouts(kind):
    """channels_last weight and mask; a mask and G in another layout than the weight."""
    w, m, G = conv_inputs(kind, torch.float32, shape=(6, 4, 3, 5), channels_last=True)
    out_ref, gw_ref, gm_ref = ref_weight_grads(w, m, kind, 1.5, 1.0, G)
    out = kconv.masked_weight(w, m, kind, 1.5, 1.0, block=(4, 16))
    assert out.is_contiguous(memory_format=torch.channels_last)
    close(out, out_ref, torch.float32, k=8.0)
    gw, gm = kconv.masked_weight_backward(G, w, m.contiguous(), kind, 1.5, 1.0, True, block=(4, 16))
    assert gw.is_contiguous(memory_format=torch.channels_last)
    close(gw, gw_ref, torch.float32, k=8.0)
    if gm_ref is not None:
        close(gm, gm_ref, torch.float32, k=8.0)
    # A sliced (non-dense) weight is made contiguous first.
    w2 = torch.randn(6, 8, 3, 5, device=DEV)[:, ::2]
    close(kconv.masked_weight(w2, m, kind, 1.5, 1.0), ref_weight_grads(w2, m, kind, 1.5, 1.0, G)[0], torch.float32)


def test_conv_weight_zero_size():
    w, m, G = conv_inputs("sigmoid", torch.float32, shape=(0, 3, 3, 3))
    assert kconv.masked_weight(w, m, "sigmoid").shape == (0, 3, 3, 3)
    gw, gm = kconv.masked_weight_backward(G, w, m, "sigmoid")
    assert gw.shape == gm.shape == (0, 3, 3, 3)
