"""Double backward (a backward with create_graph=True, differentiated again: Hessian-vector
products as in GraSP, penalties on weight gradients, MAML) through the masked ops, on both
of their CPU paths: float32 takes the C++ autograd nodes (csrc/eager_autograd.cpp), float64
the ops' Python autograd. Before, the float32 path silently lost the second-order terms
that pass through the mask (d|grad_w|^2/dw off by 50-5700 on these layers) and the float64
path raised. The oracle is autograd through reference.masked_weight in float64. The
hard-concrete gates, whose backward regenerates the noise in its kernel, refuse instead."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tolerances
from masked_helpers import make_mask
from sparsekern import ops
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.ops import mask_math, reference

KINDS = mask_math.KINDS
DTYPES = [torch.float32, torch.float64]


def linear(x, w, m, kind, beta, scale, op):
    if op:
        return ops.masked_linear(x, w, None, m, kind=kind, beta=beta, scale=scale)
    return F.linear(x, reference.masked_weight(w, m, kind, beta, scale))


def conv(x, w, m, kind, beta, scale, op):
    if op:
        return F.conv2d(x, ops.masked_conv2d_weight(w, m, kind=kind, beta=beta, scale=scale), padding=1)
    return F.conv2d(x, reference.masked_weight(w, m, kind, beta, scale), padding=1)


def second_order(fn, tensors, kind, beta, scale, op):
    """d/d(x, w, mask) of Σ (first-order gradients)², the first-order ones taken with
    create_graph=True."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    wrt = [t for t in leaves if t.requires_grad]
    y = fn(*leaves, kind, beta, scale, op)
    first = torch.autograd.grad(y.square().sum(), wrt, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in first), wrt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fn, x_shape, w_shape", [(linear, (3, 7), (5, 7)), (conv, (2, 2, 5, 5), (3, 2, 3, 3))])
def test_masked_ops_double_backward_matches_reference(fn, x_shape, w_shape, kind, dtype):
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(x_shape, generator=gen), torch.randn(w_shape, generator=gen)
    m = make_mask(kind, w_shape, gen)
    if kind == "binary":
        w = w * m  # as the methods keep binary-masked weights
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t
    got = second_order(fn, [cast(t) for t in (x, w, m)], kind, 1.7, 1.3, op=True)
    want = second_order(fn, [t.double() if t.is_floating_point() else t for t in (x, w, m)], kind, 1.7, 1.3, op=False)
    k = 64.0 if fn is linear else 256.0  # the conv's sums are longer: 3x3 taps x channels, twice over
    for name, g, r in zip(["x", "weight", "mask"], got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, **tolerances(dtype, k), msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("kind", ["sigmoid", "relaxed"])
@pytest.mark.parametrize("cls, args, x_shape", [(SparseLinear, (7, 5), (3, 7)),
                                                (SparseConv2d, (2, 3, 3), (2, 2, 5, 5))])
def test_layer_with_its_l1_term_double_backward_matches_reference(cls, args, x_shape, kind):
    """CS and concave layers form w ⊙ g and the gate's L1 in one C++ op (mask_apply_l1),
    and CS's penalty Σ scale·σ(β·s) is sigmoid_mask_l1: both differentiate twice."""
    torch.manual_seed(6)
    layer = cls(*args, mask=kind, bias=False)
    state = layer.weight_score if kind == "sigmoid" else layer.weight_mask
    with torch.no_grad():
        state.copy_(torch.randn_like(state) if kind == "sigmoid" else torch.rand_like(state))
    beta, scale = (layer.mask.beta, layer.mask.scale) if kind == "sigmoid" else (1.0, 1.0)
    x = torch.randn(x_shape)
    params = [layer.weight, state]

    def run(forward):
        y, l1 = forward()
        first = torch.autograd.grad(y.square().sum() + 0.3 * l1, params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), params)

    def sparse():
        l1 = ops.sigmoid_mask_l1(state, beta, scale) if kind == "sigmoid" else layer.mask.l1(layer)
        return layer(x), l1

    def dense():
        w_eff = reference.masked_weight(layer.weight, state, kind, beta, scale)
        y = F.linear(x, w_eff) if cls is SparseLinear else F.conv2d(x, w_eff)
        return y, mask_math.gate(state, kind, beta, scale).sum()

    for name, g, r in zip(["weight", "mask"], run(sparse), run(dense)):
        torch.testing.assert_close(g, r, **tolerances(torch.float32, 64.0), msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("structured", [False, True])
def test_hard_concrete_double_backward_refuses(structured, dtype):
    """A backward with create_graph=True runs the gates' backward in grad mode, to record
    it: there they raise, instead of returning gradients that differentiate as constants.
    A plain backward is unaffected."""
    layer = SparseConv2d(2, 3, 3, mask="hard_concrete", structured=structured, seed=3, dtype=dtype)
    x = torch.randn(2, 2, 5, 5, dtype=dtype)
    params = [layer.weight, layer.weight_log_alpha]
    with pytest.raises(RuntimeError, match="hard-concrete gates have no double backward"):
        torch.autograd.grad(layer(x).square().sum(), params, create_graph=True)
    assert all(g is not None for g in torch.autograd.grad(layer(x).square().sum(), params))
