"""ops.hard_concrete_masked_weight (weight ⊙ z under unstructured hard-concrete gates, z
never stored): values and gradients against reference.hard_concrete_masked_weight in
float64 and in low precision, the same z as hard_concrete_sample, gradcheck, zero-size and
non-contiguous inputs, what autograd saves, opcheck, torch.compile, bad inputs; and the
modules taking it for unstructured gates."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tolerances
from sparsekern import SparseConv2d, SparseLinear, ops
from sparsekern._extension import HAS_EXTENSION
from sparsekern.ops import reference

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
SHAPES = [(37, 53), (5, 3, 3, 3), (1, 1), (0, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def off(n, device="cpu"):
    """The raw ops' `offset`: a one-element int64 tensor on log_alpha's device."""
    return torch.tensor(n, dtype=torch.int64, device=device)


def pair(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    la = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    return w.to(dtype), la.to(dtype)


def oracle(w, la, seed, offset, training):
    """The reference in float64 from the (possibly rounded) inputs."""
    return reference.hard_concrete_masked_weight(w.double(), la.double(), seed, offset, training, BETA, GAMMA, ZETA)


def run(w, la, seed=7, offset=3, training=True):
    return ops.hard_concrete_masked_weight(w, la, seed, offset, training=training, beta=BETA, gamma=GAMMA, zeta=ZETA)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_reference(shape, training):
    w, la = pair(shape)
    w_eff, l0 = run(w, la, training=training)
    ref_w, ref_l0 = oracle(w, la, 7, 3, training)
    torch.testing.assert_close(w_eff, ref_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l0, ref_l0, rtol=1e-12, atol=1e-12)
    assert w_eff.dtype == torch.float64 and w_eff.shape == shape


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_low_precision_matches_reference(shape, dtype, training):
    # The fused CPU kernels: z in float32 (a few ulp of log/exp from the float64 oracle),
    # w z rounded once to dtype.
    w, la = pair(shape, dtype)
    w_eff, l0 = run(w, la, training=training)
    ref_w, ref_l0 = oracle(w, la, 7, 3, training)
    assert w_eff.dtype == dtype and w_eff.is_contiguous()
    torch.testing.assert_close(w_eff.double(), ref_w, **tolerances(dtype))
    assert l0.dtype == torch.float32
    torch.testing.assert_close(l0.double(), ref_l0, **tolerances(torch.float32, k=8.0 * max(1, la.numel()) ** 0.5))


@pytest.mark.parametrize("training", [True, False])
def test_same_gates_as_hard_concrete_sample(training):
    # In float32 z is exact in the output dtype, so w_eff is w times sample's z bit for bit.
    w, la = pair((37, 53), torch.float32)
    for offset in (0, 1, 2**33 + 5):
        z, l0 = ops.hard_concrete_sample(la, 11, offset, training=training)
        w_eff, l0_masked = run(w, la, 11, offset, training)
        assert torch.equal(w_eff, w * z)
        torch.testing.assert_close(l0_masked, l0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_contiguous_inputs_use_row_major_indices(dtype):
    w, la = pair((53, 37), dtype)
    w_t, la_t = w.t(), la.t()
    assert not w_t.is_contiguous()
    w_eff, l0 = run(w_t, la_t)
    expected, expected_l0 = run(w_t.contiguous(), la_t.contiguous())
    torch.testing.assert_close(w_eff, expected, rtol=0, atol=0)
    torch.testing.assert_close(l0, expected_l0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_reference_autograd(dtype, training):
    w, la = pair((37, 53), dtype)
    g = torch.randn(37, 53, generator=torch.Generator().manual_seed(3), dtype=dtype)

    def grads(fn, w, la):
        w, la = w.clone().requires_grad_(), la.clone().requires_grad_()
        w_eff, l0 = fn(w, la)
        ((w_eff * g).sum() + 0.25 * l0).backward()
        return w.grad, la.grad

    ours = grads(lambda w, la: run(w, la, training=training), w, la)
    ref = grads(lambda w, la: oracle(w, la, 7, 3, training), w.double(), la.double())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, **tolerances(dtype, k=16.0))


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training):
    w, la = pair((4, 5))
    w, la = w.requires_grad_(), la.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, la: run(w, la, training=training), (w, la))


@pytest.mark.parametrize("use", ["w_eff", "l0"])
def test_backward_of_one_output(use):
    w, la = pair((6, 7), torch.float32)
    w, la = w.requires_grad_(), la.requires_grad_()
    w_eff, l0 = run(w, la)
    (w_eff.sum() if use == "w_eff" else l0).backward()
    if use == "l0":
        assert torch.equal(w.grad, torch.zeros_like(w))
        p = torch.sigmoid(la.detach() - BETA * torch.log(torch.tensor(-GAMMA / ZETA)))
        torch.testing.assert_close(la.grad, p * (1 - p))
    else:
        z, _ = ops.hard_concrete_sample(la.detach(), 7, 3)
        torch.testing.assert_close(w.grad, z)


def test_backward_saves_no_weight_sized_temporary():
    # Saved: the inputs (weight, log α: parameters, kept anyway), the output w_eff, which
    # the conv or linear it feeds saves anyway, and the one-element noise offset; no z, no u.
    w, la = pair((6, 7), torch.float32)
    w, la = w.requires_grad_(), la.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        w_eff, l0 = run(w, la)
    big = [t for t in saved if t.numel() > 1]
    assert {t.data_ptr() for t in big} <= {w.data_ptr(), la.data_ptr(), w_eff.data_ptr()}
    assert len(saved) - len(big) == 1  # the offset
    (w_eff.sum() + l0).backward()
    assert w.grad is not None and la.grad is not None


def test_masked_conv_saves_one_weight_sized_tensor_beyond_its_parameters():
    # In training, the layer's autograd keeps weight, log α and one w_eff, shared by the
    # gates' backward and the conv's (which keeps its weight operand in any case).
    layer = SparseConv2d(3, 8, 3, mask="hard_concrete", seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 3, 9, 9)).sum().backward()
    weight_sized = {t.data_ptr() for t in saved if t.shape == layer.weight.shape}
    params = {layer.weight.data_ptr(), layer.weight_log_alpha.data_ptr()}
    assert params <= weight_sized and len(weight_sized - params) == 1


def _backward(g, gl0, w, la, w_eff=None, **kw):
    args = (kw.get("seed", 5), off(kw.get("offset", 9)), kw.get("beta", BETA), kw.get("gamma", GAMMA),
            kw.get("zeta", ZETA), kw.get("training", True))
    return torch.ops.sparsekern.hard_concrete_masked_weight_fused_backward(g, gl0, w, la, *args, w_eff)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the CPU kernels are part of the extension")
@pytest.mark.parametrize("training", [True, False])
def test_backward_from_w_eff_matches_regenerated(training):
    # float32: z read back from w_eff = w z (within 2 ulp) gives the gradients of the
    # backward that regenerates z from the noise, to float32 rounding.
    w, la = pair((41, 97), torch.float32, seed=4)
    g = torch.randn(41, 97, generator=torch.Generator().manual_seed(5))
    w_eff, _ = torch.ops.sparsekern.hard_concrete_masked_weight_fused(w, la, 5, off(9), BETA, GAMMA, ZETA, training)
    z = w_eff / w
    assert ((z > 0) & (z < 1)).sum() > 500 and (z == 0).sum() > 100 and (z == 1).sum() > 100
    for gl0 in (0.0, 0.3):
        gl0 = torch.tensor(gl0)
        for a, b in zip(_backward(g, gl0, w, la, w_eff, training=training), _backward(g, gl0, w, la, training=training)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the CPU kernels are part of the extension")
@pytest.mark.parametrize("gamma", [GAMMA, -0.001])
@pytest.mark.parametrize("gl0", [0.0, 0.3])
def test_regenerated_gates_are_the_forward_s_bit_for_bit(gamma, gl0):
    # grad_w = G z with G = 1 is the regenerated z. Without an L0 gradient the backward
    # used a lone sigmoid where the forward shares one division with P(z != 0)'s: z was
    # 1 ulp off on 256,066 of 2,097,152 gates, and at gamma = -0.001 three clamps flipped.
    w, la = pair((1 << 16,), torch.float32, seed=10)
    w_eff, _ = torch.ops.sparsekern.hard_concrete_masked_weight_fused(w, la, 5, off(9), BETA, gamma, ZETA, True)
    z = torch.ops.sparsekern.hard_concrete_sample_fused(la, 5, off(9), 1, BETA, gamma, ZETA, True)[0]
    grad_w, _ = _backward(torch.ones_like(w), torch.tensor(gl0), w, la, gamma=gamma)  # no w_eff: regenerated
    assert torch.equal(grad_w, z) and torch.equal(w_eff, w * z)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the CPU kernels are part of the extension")
def test_backward_regenerates_blocks_whose_weights_do_not_give_z_back():
    # A 512-value block with one weight of |w| < 2^-76 (w z could be subnormal), inf or
    # NaN regenerates z from the noise: bit for bit the backward without w_eff there.
    n = 512
    w, la = pair((5 * n,), torch.float32, seed=6)
    w[n + 17], w[2 * n + 3], w[3 * n + 400], w[4 * n] = 1e-30, float("inf"), float("nan"), 0.0
    g = torch.randn(5 * n, generator=torch.Generator().manual_seed(7))
    gl0 = torch.tensor(0.2)
    w_eff, _ = torch.ops.sparsekern.hard_concrete_masked_weight_fused(w, la, 5, off(9), BETA, GAMMA, ZETA, True)
    got, regen = _backward(g, gl0, w, la, w_eff), _backward(g, gl0, w, la)
    for a, b in zip(got, regen):
        torch.testing.assert_close(a[n:], b[n:], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(a[:n], b[:n], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the CPU kernels are part of the extension")
@pytest.mark.parametrize("dtype, gamma", [(torch.float16, GAMMA), (torch.bfloat16, GAMMA), (torch.float32, -1e-30)])
def test_backward_ignores_w_eff_where_it_cannot_give_z_back(dtype, gamma):
    # 16-bit w_eff has lost z's precision; with gamma near 0 a gate z > 0 can be as small
    # as the subnormals. Both regenerate, bit for bit the backward without w_eff.
    w, la = pair((37, 53), dtype, seed=8)
    g = torch.randn(37, 53, generator=torch.Generator().manual_seed(9)).to(dtype)
    gl0 = torch.tensor(0.3)
    w_eff, _ = torch.ops.sparsekern.hard_concrete_masked_weight_fused(w, la, 5, off(9), BETA, gamma, ZETA, True)
    for a, b in zip(_backward(g, gl0, w, la, w_eff, gamma=gamma), _backward(g, gl0, w, la, gamma=gamma)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, training", [(torch.float32, True), (torch.float64, False), (torch.bfloat16, True)])
def test_opcheck(dtype, training):
    w, la = pair((5, 7), dtype)
    args = (3, off(4), BETA, GAMMA, ZETA, training)
    torch.library.opcheck(
        torch.ops.sparsekern.hard_concrete_masked_weight.default, (w.requires_grad_(), la.requires_grad_(), *args)
    )
    grad = torch.randn(5, 7, dtype=dtype)
    grad_l0 = torch.tensor(0.5)
    torch.library.opcheck(
        torch.ops.sparsekern.hard_concrete_masked_weight_backward.default,
        (grad, grad_l0, w.detach(), la.detach(), *args),
    )
    if dtype != torch.float64:  # the C++ kernels (float64 runs the torch math)
        torch.library.opcheck(torch.ops.sparsekern.hard_concrete_masked_weight_fused.default, (w, la, *args))
        w_eff, _ = torch.ops.sparsekern.hard_concrete_masked_weight_fused(w.detach(), la.detach(), *args)
        for extra in ((), (w_eff,)):
            torch.library.opcheck(
                torch.ops.sparsekern.hard_concrete_masked_weight_fused_backward.default,
                (grad, grad_l0, w.detach(), la.detach(), *args, *extra),
            )


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ autograd is part of the extension")
@pytest.mark.parametrize("training", [True, False])
def test_eager_autograd_matches_the_op(training):
    w, la = pair((37, 53), torch.float32)
    g = torch.randn(37, 53, generator=torch.Generator().manual_seed(9))

    def result(fn):
        wr, lr = w.clone().requires_grad_(), la.clone().requires_grad_()
        w_eff, l0 = fn(wr, lr)
        ((w_eff * g).sum() + 2.0 * l0).backward()
        return w_eff.detach(), l0.detach(), wr.grad, lr.grad

    eager = result(lambda w, la: run(w, la, 5, 6, training))
    via_op = result(lambda w, la: torch.ops.sparsekern.hard_concrete_masked_weight(w, la, 5, off(6), BETA, GAMMA, ZETA,
                                                                                      training))
    for a, b in zip(eager, via_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_fullgraph_forward_backward():
    def loss(w, la, offset):
        w_eff, l0 = ops.hard_concrete_masked_weight(w, la, 42, offset)
        return (w_eff**2).sum() + 0.01 * l0

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    w0, la0 = pair((6, 4), torch.float32)
    w, la = w0.clone().requires_grad_(), la0.clone().requires_grad_()
    w_e, la_e = w0.clone().requires_grad_(), la0.clone().requires_grad_()
    out, expected = compiled(w, la, 1), loss(w_e, la_e, 1)
    torch.testing.assert_close(out, expected)
    out.backward()
    expected.backward()
    torch.testing.assert_close(w.grad, w_e.grad)
    torch.testing.assert_close(la.grad, la_e.grad)


W, LA = torch.zeros(3, 4), torch.zeros(3, 4)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: ops.hard_concrete_masked_weight([0.0], LA, 0, 0), TypeError, "weight"),
        (lambda: ops.hard_concrete_masked_weight(W, "la", 0, 0), TypeError, "log_alpha"),
        (lambda: ops.hard_concrete_masked_weight(W, torch.zeros(3, 1), 0, 0), ValueError, "log_alpha"),
        (lambda: ops.hard_concrete_masked_weight(W.double(), LA, 0, 0), TypeError, "weight"),
        (lambda: ops.hard_concrete_masked_weight(W, LA, -1, 0), ValueError, "seed"),
        (lambda: ops.hard_concrete_masked_weight(W, LA, 0, 1.0), TypeError, "offset"),
        (lambda: ops.hard_concrete_masked_weight(W, LA, 0, 0, training="yes"), TypeError, "training"),
        (lambda: ops.hard_concrete_masked_weight(W, LA, 0, 0, beta=0.0), ValueError, "beta"),
    ],
)
def test_bad_inputs_raise(call, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        call()


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ kernels are part of the extension")
def test_fused_kernel_rejects_mismatched_inputs():
    fused = torch.ops.sparsekern.hard_concrete_masked_weight_fused
    with pytest.raises(ValueError, match="`weight` must have log_alpha's shape"):
        fused(torch.zeros(3, 4), torch.zeros(4, 3), 0, off(0), BETA, GAMMA, ZETA, True)
    with pytest.raises(ValueError, match="`weight` must have log_alpha's dtype"):
        fused(torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(3, 4), 0, off(0), BETA, GAMMA, ZETA, True)


# --- the modules ----------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_modules_take_the_fused_op(training):
    # Unstructured gates: the layer's output is the masked op of the z that
    # hard_concrete_sample draws at the layer's offset, and the offset advances in training.
    torch.manual_seed(0)
    conv = SparseConv2d(3, 4, 3, padding=1, mask="hard_concrete", seed=3)
    for layer, x, f in (
        (SparseLinear(9, 5, mask="hard_concrete", seed=3), torch.randn(4, 9), F.linear),
        (conv, torch.randn(2, 3, 6, 6), lambda x, w, b: F.conv2d(x, w, b, padding=1)),
    ):
        layer.train(training)
        la = layer.weight_log_alpha
        z = ops.hard_concrete_sample(la.detach(), 3, layer.mask.offset, training=training)[0]
        y = layer(x)
        torch.testing.assert_close(y, f(x, layer.weight * z, layer.bias), rtol=0, atol=0)
        assert layer.mask.offset == (1 if training else 0)
        # The forward's L0 shares a reciprocal with the gate's sigmoid (sigmoid_pair), so
        # it differs from the noise-free op's in the last bits (2 ulp seen on 108 terms).
        torch.testing.assert_close(
            layer.mask.expected_nonzero(layer), ops.hard_concrete_l0(la.detach()), **tolerances(torch.float32)
        )
        y.sum().backward()
        assert layer.weight.grad is not None and la.grad is not None


def test_conv_saves_no_gate_tensor():
    # Forward through an unstructured-gated conv saves, of weight-sized tensors, the two
    # parameters and conv's own w_eff: no z.
    conv = SparseConv2d(4, 6, 3, mask="hard_concrete", seed=1)
    params = {conv.weight.data_ptr(), conv.weight_log_alpha.data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(torch.randn(2, 4, 8, 8)).sum().backward()
    weight_sized = {t.data_ptr() for t in saved if t.shape == conv.weight.shape} - params
    assert len(weight_sized) == 1  # conv's saved w_eff
