"""ops.sigmoid_mask_l1 (CS's penalty Σ scale·σ(β·s) in one pass): values and gradients
against reference.sigmoid_mask_l1 in float64, the C++ kernels in float32, odd, zero-size and
non-contiguous shapes, saturated β, determinism, what autograd saves, gradcheck, opcheck,
torch.compile, bad inputs; and SigmoidMask.l1 / the CS penalty that use it."""
import math

import pytest
import torch

from conftest import tolerances
from sparsekern import SparseConv2d, ops
from sparsekern._extension import HAS_EXTENSION
from sparsekern.ops import reference

SHAPES = [(37, 53), (5, 3, 3, 3), (1,), (0, 7)]
PARAMS = [(1.0, 1.0), (2.5, 0.25), (200.0, 3.0)]


def scores_like(shape, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def grad_of(fn, s, grad=0.37):
    s = s.clone().requires_grad_()
    (grad * fn(s)).backward()
    return s.grad


@pytest.mark.parametrize("beta, scale", PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(shape, dtype, beta, scale):
    s = scores_like(shape, dtype)
    got = ops.sigmoid_mask_l1(s, beta, scale)
    expected = reference.sigmoid_mask_l1(s.double(), beta, scale)
    assert got.shape == () and got.dtype == torch.promote_types(dtype, torch.float32)
    # The sum's rounding grows like sqrt(n) (float partials added in double).
    k = 8.0 * max(1.0, math.sqrt(s.numel()))
    tol = tolerances(torch.float64) if dtype == torch.float64 else tolerances(torch.float32, k=k)
    torch.testing.assert_close(got.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)
    g = grad_of(lambda x: ops.sigmoid_mask_l1(x, beta, scale), s)
    g_ref = grad_of(lambda x: reference.sigmoid_mask_l1(x, beta, scale), s.double())
    assert g.dtype == dtype and g.shape == shape and not torch.isnan(g).any()
    tol = tolerances(dtype if dtype != torch.float64 else torch.float64, k=16.0)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol["rtol"], atol=tol["atol"] * scale * beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous(dtype):
    s = scores_like((53, 37), dtype).t()
    assert not s.is_contiguous()
    torch.testing.assert_close(ops.sigmoid_mask_l1(s, 2.0, 1.5), ops.sigmoid_mask_l1(s.contiguous(), 2.0, 1.5))
    g = grad_of(lambda x: ops.sigmoid_mask_l1(x, 2.0, 1.5), s)
    torch.testing.assert_close(g, grad_of(lambda x: ops.sigmoid_mask_l1(x, 2.0, 1.5), s.contiguous()))


def test_deterministic_and_thread_count_independent():
    s = scores_like((300_000,), torch.float32)
    first = ops.sigmoid_mask_l1(s, 3.0, 1.2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.sigmoid_mask_l1(s, 3.0, 1.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, ops.sigmoid_mask_l1(s, 3.0, 1.2)) and torch.equal(first, single)


def test_saves_the_scores_only():
    s = scores_like((6, 7), torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.sigmoid_mask_l1(s, 2.0, 1.0)
    assert len(saved) == 1 and saved[0] is s
    out.backward()
    assert s.grad is not None


def test_gradcheck():
    s = scores_like((4, 5), scale=1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.sigmoid_mask_l1(x, 1.7, 0.8), (s,))


# Transposed scores take the torch math, channels_last ones the C++ kernel; both kept the
# scores' layout in the backward while the fake (and the Triton kernel) give a contiguous
# gradient: opcheck's fake-tensor check failed on both.
LAYOUTS = {
    "contiguous": lambda dtype: scores_like((5, 7), dtype),
    "transposed": lambda dtype: scores_like((7, 5), dtype).t(),
    "channels_last": lambda dtype: scores_like((2, 3, 2, 4), dtype).contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, layout):
    s = LAYOUTS[layout](dtype).requires_grad_()
    torch.library.opcheck(torch.ops.sparsekern.sigmoid_mask_l1_op.default, (s, 2.0, 1.5))
    grad = torch.tensor(0.5, dtype=torch.promote_types(dtype, torch.float32))
    torch.library.opcheck(torch.ops.sparsekern.sigmoid_mask_l1_op_backward.default, (grad, s.detach(), 2.0, 1.5))
    if dtype == torch.float32 and layout != "transposed":  # the C++ kernels (dense layouts only)
        torch.library.opcheck(torch.ops.sparsekern.sigmoid_mask_l1.default, (s, 2.0, 1.5))
        torch.library.opcheck(torch.ops.sparsekern.sigmoid_mask_l1_backward.default, (grad, s.detach(), 2.0, 1.5))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ autograd is part of the extension")
def test_eager_autograd_matches_the_op():
    s = scores_like((37, 53), torch.float32)
    eager = grad_of(lambda x: ops.sigmoid_mask_l1(x, 2.0, 1.5), s)
    via_op = grad_of(lambda x: torch.ops.sparsekern.sigmoid_mask_l1_op(x, 2.0, 1.5), s)
    torch.testing.assert_close(eager, via_op, rtol=0, atol=0)


def test_compile_fullgraph():
    def loss(s, beta):
        return ops.sigmoid_mask_l1(beta * s, 1.0, 1.5)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    s0 = scores_like((6, 4), torch.float32)
    beta = torch.tensor(2.0)
    a, b = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    out, expected = compiled(a, beta), loss(b, beta)
    torch.testing.assert_close(out, expected)
    out.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: ops.sigmoid_mask_l1([1.0, 2.0]), TypeError, "scores"),
        (lambda: ops.sigmoid_mask_l1(torch.zeros(3, dtype=torch.int32)), ValueError, "scores"),
        (lambda: ops.sigmoid_mask_l1(torch.zeros(3), beta=float("nan")), ValueError, "beta"),
        (lambda: ops.sigmoid_mask_l1(torch.zeros(3), scale="1"), TypeError, "scale"),
    ],
)
def test_bad_inputs_raise(call, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        call()


def test_sigmoid_mask_l1_is_the_sum_of_the_gates():
    conv = SparseConv2d(3, 4, 3, mask="sigmoid", s0=0.5)
    with torch.no_grad():
        conv.weight_score.normal_()
    conv.mask.set_beta(conv, 3.0)
    torch.testing.assert_close(conv.mask.l1(conv), conv.mask.gate(conv).sum())
    conv.mask.l1(conv).backward()
    s = conv.weight_score.detach()
    sig = torch.sigmoid(3.0 * s)
    torch.testing.assert_close(conv.weight_score.grad, conv.mask.scale * 3.0 * sig * (1 - sig))
