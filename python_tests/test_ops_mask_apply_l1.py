"""sparsekern::mask_apply_l1 — (w ⊙ g, Σ g) for the sigmoid and relaxed kinds from one
pass, with its C++ autograd — against the float64 torch math on odd, zero-size and
channels_last shapes, each output's gradient alone and both together, determinism, opcheck,
the layouts it refuses; and the layers and penalties that reuse the forward's Σ g (CS's
SigmoidMask.l1, concave's RelaxedMask.l1): same gradients as recomputing it, recomputed
when it no longer stands, never deep-copied."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tolerances
from methods_helpers import cnn, batches
from sparsekern._extension import HAS_EXTENSION
from sparsekern.methods import ConcaveRegularization, ContinuousSparsification
from sparsekern.nn.masks import RelaxedMask, SigmoidMask
from sparsekern.ops import mask_apply, mask_math

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="an eager-CPU op of the C++ extension")

OP = torch.ops.sparsekern.mask_apply_l1
BACKWARD = torch.ops.sparsekern.mask_apply_l1_backward
SHAPES = [(37, 53), (5, 3, 3, 3), (1,), (0, 7)]
CASES = [("sigmoid", 1.0, 1.0), ("sigmoid", 2.5, 1.7), ("sigmoid", 200.0, 2.0), ("relaxed", 1.0, 1.0)]


def case(kind, shape, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    m = 2.0 * torch.randn(shape, generator=g) if kind == "sigmoid" else torch.rand(shape, generator=g)
    if channels_last:
        w, m = (t.contiguous(memory_format=torch.channels_last) for t in (w, m))
    return w, m, torch.randn(shape, generator=g)


def reference(weight, mask, kind, beta, scale):
    """The float64 oracle: (w ⊙ g, Σ g), differentiable."""
    g = mask_math.gate(mask, kind, beta, scale, torch.float64)
    return weight * g, g.sum()


def run(fn, w, m, G, c_l1):
    """Both outputs and the gradients of Σ G ⊙ w_eff + c_l1 · Σ g."""
    w, m = w.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
    w_eff, l1 = fn(w, m)
    ((w_eff * G).sum() + c_l1 * l1).backward()
    return w_eff.detach(), l1.detach(), w.grad, m.grad


@pytest.mark.parametrize("c_l1", [0.0, 0.63])
@pytest.mark.parametrize("kind, beta, scale", CASES)
@pytest.mark.parametrize("shape, channels_last", [(s, False) for s in SHAPES] + [((6, 5, 3, 3), True)])
def test_matches_float64_math(shape, channels_last, kind, beta, scale, c_l1):
    w, m, G = case(kind, shape, channels_last=channels_last)
    got = run(lambda a, b: OP(a, b, kind, beta, scale), w, m, G, c_l1)
    expected = run(lambda a, b: reference(a, b, kind, beta, scale), w.double(), m.double(), G.double(), c_l1)
    assert got[0].stride() == w.stride() and got[1].shape == () and got[1].dtype == torch.float32
    assert got[2].stride() == w.stride() and got[3].stride() == m.stride()
    tol = tolerances(torch.float32)
    # Σ g: float partials added in double, rounding grows like sqrt(n).
    k_sum = 8.0 * max(1.0, math.sqrt(w.numel()))
    for name, a, b, k in zip(("w_eff", "l1", "grad_w", "grad_mask"), got, expected, (8.0, k_sum, 8.0, 16.0)):
        tol = tolerances(torch.float32, k=k)
        size = scale * max(1.0, beta) * (1.0 + c_l1)
        torch.testing.assert_close(a.double(), b, rtol=tol["rtol"], atol=tol["atol"] * size, msg=name)


@pytest.mark.parametrize("kind", ["sigmoid", "relaxed"])
def test_one_output_alone(kind):
    # An output that does not reach the loss contributes no gradient (its grad is undefined).
    w, m, G = case(kind, (7, 5))
    for use in ("w_eff", "l1"):
        w1, m1 = w.clone().requires_grad_(), m.clone().requires_grad_()
        w_eff, l1 = OP(w1, m1, kind, 2.0, 1.5)
        ((w_eff * G).sum() if use == "w_eff" else 0.7 * l1).backward()
        w2, m2 = w.double().requires_grad_(), m.double().requires_grad_()
        r_eff, r_l1 = reference(w2, m2, kind, 2.0, 1.5)
        ((r_eff * G.double()).sum() if use == "w_eff" else 0.7 * r_l1).backward()
        expected_w = torch.zeros_like(w2) if w2.grad is None else w2.grad  # Σ g does not involve w
        torch.testing.assert_close(w1.grad.double(), expected_w, **tolerances(torch.float32))
        torch.testing.assert_close(m1.grad.double(), m2.grad, **tolerances(torch.float32, k=16.0))


def test_one_autograd_node_and_grads_only_what_requires_grad():
    w, m, _ = case("sigmoid", (6, 4))
    s = m.clone().requires_grad_()
    w_eff, l1 = OP(w, s, "sigmoid", 2.0, 1.0)
    assert w_eff.grad_fn is l1.grad_fn and "MaskApplyL1" in w_eff.grad_fn.name()
    (w_eff.sum() + l1).backward()
    assert w.grad is None and s.grad is not None
    with torch.no_grad():
        w_eff, l1 = OP(w, s, "sigmoid", 2.0, 1.0)
    assert w_eff.grad_fn is None and l1.grad_fn is None


def test_deterministic_and_thread_count_independent():
    w, m, _ = case("sigmoid", (300_000,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(w, m, "sigmoid", 3.0, 1.2)
        torch.set_num_threads(2)
        two = OP(w, m, "sigmoid", 3.0, 1.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("kind", ["sigmoid", "relaxed"])
def test_opcheck(kind):
    w, m, G = case(kind, (7, 5, 3, 3))
    torch.library.opcheck(OP.default, (w, m, kind, 2.0, 1.5))
    torch.library.opcheck(BACKWARD.default, (G, torch.tensor(0.3), w, m, kind, 2.0, 1.5))


def test_refuses_what_it_does_not_take():
    w, m, G = case("relaxed", (6, 4))
    with pytest.raises(ValueError, match="kind"):
        OP(w, m.bool(), "binary", 1.0, 1.0)
    with pytest.raises(ValueError, match="kind"):
        OP(w, m, "hard_concrete", 1.0, 1.0)
    with pytest.raises(TypeError, match="weight"):
        OP(w.double(), m, "relaxed", 1.0, 1.0)
    with pytest.raises(ValueError, match="strides"):
        OP(w, m.t().contiguous().t(), "relaxed", 1.0, 1.0)
    with pytest.raises(ValueError, match="grad_l1"):
        BACKWARD(G, torch.ones(2), w, m, "relaxed", 1.0, 1.0)


def test_python_entry_is_none_where_the_kernels_do_not_apply():
    w, m, _ = case("sigmoid", (6, 4))
    assert mask_apply.masked_weight_l1(w, m, "sigmoid", 1.0, 1.0) is not None
    assert mask_apply.masked_weight_l1(w.double(), m.double(), "sigmoid", 1.0, 1.0) is None
    assert mask_apply.masked_weight_l1(w.t(), m.t(), "sigmoid", 1.0, 1.0) is None  # not a C++ layout
    assert mask_apply.masked_weight_l1(w, m[:1], "relaxed", 1.0, 1.0) is None      # not elementwise
    assert mask_apply.masked_weight_l1(w, m > 0, "binary", 1.0, 1.0) is None


# ---- the layers and penalties that reuse the forward's Σ g --------------------------------
def _cs(model):
    return ContinuousSparsification(model, epochs_per_round=3, lam=0.05, s0=0.3)


def _concave(model):
    return ConcaveRegularization(model, lam=0.05)


def _mask_grads(method):
    return [p.grad.clone() for p in method.mask_parameters()]


@pytest.mark.parametrize("make", [_cs, _concave])
def test_penalty_reuses_the_forward_term_with_the_same_gradients(monkeypatch, make):
    model = cnn()
    method = make(model)
    twin, twin_method = copy.deepcopy((model, method))
    (x, y), = batches(model, 1)
    loss = F.cross_entropy(model(x), y)
    terms = [layer.mask.l1(layer) for _, layer in method.layers]
    assert all(t is layer.mask._forward_term.value for t, (_, layer) in zip(terms, method.layers))
    (loss + method.penalty()).backward()

    for cls in (SigmoidMask, RelaxedMask):  # the twin recomputes the penalty in its own ops
        monkeypatch.setattr(cls, "_current_term", lambda self, param, key=None: None)
    (F.cross_entropy(twin(x), y) + twin_method.penalty()).backward()
    for got, expected in zip(_mask_grads(method), _mask_grads(twin_method)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(method.penalty().detach(), twin_method.penalty().detach(), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("make", [_cs, _concave])
def test_penalty_after_the_forward_backward_recomputes(make):
    model = cnn()
    method = make(model)
    (x, y), = batches(model, 1)
    F.cross_entropy(model(x), y).backward()
    task = _mask_grads(method)
    penalty = method.penalty()  # the forward's graph is used: a fresh term
    assert all(layer.mask.l1(layer) is not layer.mask._forward_term.value for _, layer in method.layers)
    penalty.backward()
    for (_, layer), before, after in zip(method.layers, task, _mask_grads(method)):
        p = layer.mask_parameters()[0].detach()
        slope = mask_math.gate_slope(p, layer.mask.name, layer.mask.beta if layer.mask.name == "sigmoid" else 1.0,
                                     layer.mask.scale if layer.mask.name == "sigmoid" else 1.0)
        torch.testing.assert_close(after - before, method.lam * slope.float(), rtol=1e-5, atol=1e-9)


def test_cs_penalty_after_a_new_beta_or_an_optimiser_step_recomputes():
    model = cnn()
    method = _cs(model)
    (x, y), = batches(model, 1)
    model(x)
    _, layer = method.layers[0]
    kept = layer.mask._forward_term.value
    assert layer.mask.l1(layer) is kept
    layer.mask.set_beta(layer, 4.0)
    fresh = layer.mask.l1(layer)
    assert fresh is not kept
    torch.testing.assert_close(fresh.detach(), (layer.mask.scale * torch.sigmoid(4.0 * layer.weight_score)).sum(),
                               rtol=1e-5, atol=0.0)
    model(x)
    with torch.no_grad():
        layer.weight_score.add_(0.1)  # as an optimiser step does
    assert layer.mask.l1(layer) is not layer.mask._forward_term.value


def test_concave_dead_entries_get_no_gradient_from_either_output():
    model = cnn()
    method = _concave(model)
    with torch.no_grad():
        for _, layer in method.layers:
            layer.weight_mask[..., 0] = 0.0  # below alpha: pruned for good at the round's end
    method.end_round()
    (x, y), = batches(model, 1)
    (F.cross_entropy(model(x), y) + method.penalty()).backward()
    for (name, layer), g in zip(method.layers, _mask_grads(method)):
        assert layer.mask.has_dead and layer.mask.grad_keep(layer) is layer.weight_alive
        assert torch.all(g[~method.alive[name]] == 0) and torch.any(g[method.alive[name]] != 0)


@pytest.mark.parametrize("make", [_cs, _concave])
def test_copies_after_a_training_forward_leave_the_term_out(make):
    model = cnn()
    method = make(model)
    (x, y), = batches(model, 1)
    loss = F.cross_entropy(model(x), y) + method.penalty()
    twin = copy.deepcopy(model)
    assert all(m.mask._forward_term is None for m in twin.modules() if hasattr(m, "mask"))
    assert all(m.mask._forward_term is not None for m in model.modules() if hasattr(m, "mask"))
    loss.backward()  # the original's graph is intact
