"""The C++ CPU kernels of w ⊙ g (sparsekern::mask_apply, mask_apply_backward) and
zero_masked_: against the float64 math of mask_math for every kind and layout the C++
path takes (contiguous, channels_last, per-row hard-concrete gates, odd and zero sizes),
the fallback for layouts it does not take, sigmoid at extreme scores, opcheck, bad input."""
import pytest
import torch

from conftest import tolerances
from masked_helpers import make_mask
from sparsekern import ops
from sparsekern._extension import HAS_EXTENSION
from sparsekern.ops import mask_apply, mask_math

KINDS = mask_math.KINDS
SHAPES = [(37, 53), (7, 5, 3, 3), (0, 4), (1, 1)]


def case(kind, shape, per_row=False, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    mask_shape = (shape[0],) + (1,) * (len(shape) - 1) if per_row else None
    m = make_mask(kind, shape, gen, mask_shape)
    G = torch.randn(shape, generator=gen)
    if channels_last:
        w, G = w.contiguous(memory_format=torch.channels_last), G.contiguous(memory_format=torch.channels_last)
        if not per_row:
            m = m.contiguous(memory_format=torch.channels_last)
    return w, m, G


def expected(w, m, G, kind, beta, scale):
    """(w_eff, grad_w, grad_mask) in float64 from mask_math."""
    d = lambda t: t.double() if t.is_floating_point() else t
    w_eff = mask_math.masked_weight(d(w), d(m), kind, beta, scale)
    gw, gm = mask_math.weight_and_mask_grads(d(G), d(w), d(m), kind, beta, scale, True)
    return w_eff, gw, gm


LAYOUTS = [(s, False, False) for s in SHAPES] + [((6, 4, 3, 3), False, True)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,per_row,channels_last", LAYOUTS)
def test_matches_float64_math(kind, shape, per_row, channels_last):
    w, m, G = case(kind, shape, per_row, channels_last)
    beta, scale = 2.5, 1.3
    assert mask_apply.cpp_layout(w, m, kind)
    w_eff = mask_apply.masked_weight(w, m, kind, beta, scale)
    gw, gm = mask_apply.weight_and_mask_grads(G, w, m, kind, beta, scale, True)
    ew, egw, egm = expected(w, m, G, kind, beta, scale)
    tol = tolerances(torch.float32)
    torch.testing.assert_close(w_eff.double(), ew, **tol)
    torch.testing.assert_close(gw.double(), egw, **tol)
    assert w_eff.stride() == w.stride() and gw.stride() == w.stride()
    if kind in mask_math.LEARNABLE_KINDS:
        torch.testing.assert_close(gm.double(), egm, **tol)
    else:
        assert gm is None


@pytest.mark.parametrize("kind", ["hard_concrete"])
@pytest.mark.parametrize("shape", [(37, 53), (6, 4, 3, 3), (0, 5, 1, 1)])
def test_per_row_gates(kind, shape):
    w, m, G = case(kind, shape, per_row=True)
    assert mask_apply.cpp_layout(w, m, kind)
    gw, gm = mask_apply.weight_and_mask_grads(G, w, m, kind, 1.0, 1.0, True)
    _, egw, egm = expected(w, m, G, kind, 1.0, 1.0)
    # gm sums a row of w.numel() / out products in float32
    torch.testing.assert_close(gm.double(), egm, **tolerances(torch.float32, k=8.0 * shape[1] * 9))
    torch.testing.assert_close(gw.double(), egw, **tolerances(torch.float32))
    assert gm.shape == m.shape


@pytest.mark.parametrize("kind", ["binary", "sigmoid", "hard_concrete"])
def test_layouts_the_cpp_path_does_not_take_fall_back(kind):
    w, m, G = case(kind, (8, 6))
    cases = [
        (w.t(), m.t(), G.t()),          # non-contiguous weight
        (w.double(), m, G.double()),    # float64: the torch math
        (w.half(), m, G.half()),
    ]
    if kind == "hard_concrete":
        cases.append((w, m[:1, :].expand(1, 6).contiguous(), G))  # per-column gates [1, in]
    for wi, mi, Gi in cases:
        assert not mask_apply.cpp_layout(wi, mi, kind)
        got = mask_apply.masked_weight(wi, mi, kind, 2.0, 1.0)
        torch.testing.assert_close(got, mask_math.masked_weight(wi, mi, kind, 2.0, 1.0))
        gw, _ = mask_apply.weight_and_mask_grads(Gi, wi, mi, kind, 2.0, 1.0, True)
        torch.testing.assert_close(gw, mask_math.weight_and_mask_grads(Gi, wi, mi, kind, 2.0, 1.0, True)[0])


def test_grad_in_another_memory_format_is_reordered():
    w, m, G = case("relaxed", (6, 4, 3, 3))
    G_cl = G.contiguous(memory_format=torch.channels_last)
    gw, gm = mask_apply.weight_and_mask_grads(G_cl, w, m, "relaxed", 1.0, 1.0, True)
    _, egw, egm = expected(w, m, G, "relaxed", 1.0, 1.0)
    torch.testing.assert_close(gw.double(), egw, **tolerances(torch.float32))
    torch.testing.assert_close(gm.double(), egm, **tolerances(torch.float32))


def test_sigmoid_gate_at_extreme_scores():
    s = torch.cat([torch.linspace(-120.0, 120.0, 100_001), torch.tensor([float("inf"), -float("inf")])])
    g = mask_apply.masked_weight(torch.ones_like(s), s, "sigmoid", 1.0, 1.0).double()
    ref = torch.sigmoid(s.double())
    # absolute error at most a float32 ulp of 1; relative error ~1e-7 wherever the gate is a normal float
    torch.testing.assert_close(g, ref, rtol=4e-7, atol=1.2e-7)
    normal = ref > 1e-37
    assert ((g[normal] - ref[normal]).abs() / ref[normal]).max() < 4e-7
    nan = mask_apply.masked_weight(torch.ones(1), torch.tensor([float("nan")]), "sigmoid", 1.0, 1.0)
    assert nan.isnan().all()
    # Far below: exactly 0, gate and gradients, as torch.sigmoid's result reads (the
    # clamped exp left 6e-39, so CS's pruned effective weights were subnormals, not 0).
    s = torch.tensor([-88.5, -90.0, -200.0, -float("inf")], requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    g = mask_apply.masked_weight(w, s, "sigmoid", 1.0, 1.0)
    assert torch.equal(g, torch.zeros(4))
    g.sum().backward()
    assert torch.equal(w.grad, torch.zeros(4)) and torch.equal(s.grad, torch.zeros(4))


def test_zero_masked_is_exact_in_place_and_bumps_version():
    w = torch.nn.Parameter(torch.randn(37, 53))
    keep = torch.rand(37, 53) > 0.7
    before, version = w.detach().clone(), w._version
    ops.zero_masked_(w, keep)
    assert torch.equal(w.detach(), before * keep)
    assert w._version > version
    cl = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    keep_cl = (torch.rand(4, 3, 3, 3) > 0.5).contiguous(memory_format=torch.channels_last)
    expect = cl * keep_cl
    ops.zero_masked_(cl, keep_cl)
    assert torch.equal(cl, expect)


def test_zero_masked_rejects_bad_keep():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="keep"):
        ops.zero_masked_(w, torch.ones(3, 4))
    with pytest.raises(ValueError, match="keep"):
        ops.zero_masked_(w, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="keep"):
        ops.zero_masked_(w, [[True] * 4] * 3)
    with pytest.raises(TypeError, match="weight"):
        ops.zero_masked_(w.tolist(), torch.ones(3, 4, dtype=torch.bool))


def test_zero_masked_refuses_an_expanded_weight_before_writing_any():
    # An expanded weight (stride 0) cannot be written in place: mul_ raised RuntimeError
    # after the C++ kernel had already zeroed the list's other weights.
    w = torch.randn(3, 4)
    before = w.clone()
    expanded = torch.randn(1, 4).expand(3, 4)
    keep = torch.rand(3, 4) > 0.5
    with pytest.raises(ValueError, match="`weight`"):
        ops.zero_masked_([w, expanded], [keep, keep])
    assert torch.equal(w, before)


@pytest.mark.skipif(not HAS_EXTENSION, reason="checks the C++ kernels' own argument checks")
def test_cpp_kernels_reject_layouts_they_do_not_take():
    w = torch.randn(4, 6)
    with pytest.raises(TypeError, match="bool"):
        torch.ops.sparsekern.mask_apply(w, torch.ones(4, 6), "binary", 1.0, 1.0)
    with pytest.raises(ValueError, match="strides"):
        torch.ops.sparsekern.mask_apply(w, torch.ones(6, 4).t(), "relaxed", 1.0, 1.0)
    with pytest.raises(ValueError, match="kind"):
        torch.ops.sparsekern.mask_apply(w, torch.ones(4, 6), "nope", 1.0, 1.0)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.sparsekern.mask_apply(w.double(), torch.ones(4, 6).double(), "relaxed", 1.0, 1.0)
    with pytest.raises(ValueError, match="grad"):
        torch.ops.sparsekern.mask_apply_backward(torch.ones(6, 4).t(), w, torch.ones(4, 6), "relaxed", 1.0, 1.0, True)


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    w, m, G = case(kind, (7, 5, 3, 3), per_row=kind == "hard_concrete")
    torch.library.opcheck(torch.ops.sparsekern.mask_apply.default, (w, m, kind, 2.0, 1.5))
    torch.library.opcheck(torch.ops.sparsekern.mask_apply_backward.default, (G, w, m, kind, 2.0, 1.5, True))


def test_opcheck_zero_masked():
    w, keep = torch.randn(5, 7), torch.rand(5, 7) > 0.5
    torch.library.opcheck(torch.ops.sparsekern.zero_masked_.default, ([w, torch.randn(3)], [keep, keep[0, :3]]))


def test_zero_masked_many_writes_only_what_differs_and_matches_mul():
    gen = torch.Generator().manual_seed(3)
    # Large enough for several threads' ranges and many 4096-value blocks; pruned weights
    # already zero (±0) except in a few blocks, one with NaN and Inf.
    w = torch.randn(300_001, generator=gen)
    keep = torch.rand(300_001, generator=gen) > 0.3
    w = w * keep
    w[~keep & (torch.arange(w.numel()) % 7 == 0)] = -0.0
    pruned = (~keep).nonzero().flatten()
    w[pruned[[10, 5000, 5001, -1]]] = torch.tensor([2.0, float("nan"), float("inf"), -3.0])
    small, small_keep = torch.randn(6, 5), torch.rand(6, 5) > 0.5
    noncontig, nc_keep = torch.randn(5, 6).t(), torch.rand(6, 5) > 0.5  # the torch path
    expect = [w * keep, small * small_keep, noncontig * nc_keep]
    ops.zero_masked_([w, small, noncontig], [keep, small_keep, nc_keep])
    for got, ref in zip([w, small, noncontig], expect):
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
        assert torch.equal(torch.signbit(got), torch.signbit(ref))
    with pytest.raises(TypeError, match="sequence"):
        ops.zero_masked_([w], keep)
    before = small.clone()
    with pytest.raises(ValueError, match="keep"):  # the second pair is bad: nothing changes
        ops.zero_masked_([small, w], [torch.zeros_like(small_keep), keep[:5]])
    assert torch.equal(small, before)


# --- the eager CPU path: mask_apply with its autograd in C++ -----------------------------


def grads_through(fn, w, m, G):
    w = w.detach().clone().requires_grad_()
    m = m.detach().clone().requires_grad_(m.is_floating_point())
    out = fn(w, m)
    out.backward(G)
    return out.detach(), w.grad, m.grad


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ autograd is part of the extension")
@pytest.mark.parametrize(
    "kind,per_row,channels_last",
    [(k, False, cl) for k in KINDS for cl in (False, True)] + [("hard_concrete", True, False)],
)
def test_eager_autograd_matches_the_op(kind, per_row, channels_last):
    w, m, G = case(kind, (6, 4, 3, 3), per_row, channels_last)
    assert mask_apply.eager_cpu(w, m, kind)
    eager = grads_through(lambda w, m: ops.masked_conv2d_weight(w, m, kind=kind, beta=2.0, scale=1.5), w, m, G)
    via_op = grads_through(lambda w, m: torch.ops.sparsekern.masked_conv2d_weight(w, m, kind, 2.0, 1.5), w, m, G)
    for a, b in zip(eager, via_op):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tolerances(torch.float32))
    assert eager[0].grad_fn is None and eager[1].stride() == w.stride()
    if kind == "straight_through":
        assert torch.equal(eager[1], G)  # unmasked


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ autograd is part of the extension")
def test_eager_autograd_grads_only_what_requires_grad():
    w, m, G = case("sigmoid", (5, 7))
    m = m.requires_grad_()
    out = mask_apply.masked_weight_autograd(w, m, "sigmoid", 1.0, 1.0)  # w needs no grad
    (gm,) = torch.autograd.grad(out, m, G)
    torch.testing.assert_close(gm.double(), expected(w, m.detach(), G, "sigmoid", 1.0, 1.0)[2],
                               **tolerances(torch.float32))
    w = w.requires_grad_()
    out = mask_apply.masked_weight_autograd(w, m.detach(), "sigmoid", 1.0, 1.0)
    (gw,) = torch.autograd.grad(out, w, G)
    torch.testing.assert_close(gw.double(), expected(w.detach(), m, G, "sigmoid", 1.0, 1.0)[1],
                               **tolerances(torch.float32))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ autograd is part of the extension")
def test_eager_linear_matches_the_op():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 53, generator=gen)
    w, m, _ = case("relaxed", (37, 53))
    b = torch.randn(37, generator=gen)
    Gy = torch.randn(2, 9, 37, generator=gen)

    def run(fn):
        xs, ws, ms, bs = (t.detach().clone().requires_grad_() for t in (x, w, m, b))
        fn(xs, ws, bs, ms).backward(Gy)
        return [t.grad for t in (xs, ws, ms, bs)]

    eager = run(lambda x, w, b, m: ops.masked_linear(x, w, b, m, kind="relaxed"))
    via_op = run(lambda x, w, b, m: torch.ops.sparsekern.masked_linear(
        x.reshape(-1, 53), w, b, m, "relaxed", 1.0, 1.0).reshape(2, 9, 37))
    for a, c in zip(eager, via_op):
        torch.testing.assert_close(a, c, **tolerances(torch.float32, k=64))


def test_compiling_uses_the_op_not_the_eager_path(monkeypatch):
    w, m, _ = case("binary", (4, 3, 3, 3))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not mask_apply.eager_cpu(w, m, "binary")


# --- binary masks whose pruned weights are already zero: the weight itself is used ------


def _pruned_zero_pair(shape=(6, 5, 3, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=gen) > 0.5
    return torch.randn(shape, generator=gen) * keep, keep


@pytest.mark.parametrize("case, expected", [
    ("zeros", 1), ("negative zero", 1), ("one pruned nonzero", 0), ("nan pruned", 0),
    ("nan kept", 1), ("nothing pruned", 2), ("nothing pruned, nan kept", 2), ("zero-size", 2),
    ("large, one pruned nonzero in the last block", 0), ("large, one pruned", 1),
])
def test_binary_prune_state_matches_reference(case, expected):
    w, keep = _pruned_zero_pair()
    if case.startswith("large"):  # several threads' ranges and 4096-value blocks
        keep = torch.ones(300_001, dtype=torch.bool)
        keep[-5] = False
        w = torch.randn(300_001) * keep
        if "nonzero" in case:
            w[-5] = 3.0
    pruned = (~keep).nonzero()[0].tolist() if not keep.all() else None
    kept = keep.nonzero()[0].tolist()
    if case == "negative zero":
        w[tuple(pruned)] = -0.0
    elif case == "one pruned nonzero":
        w[tuple(pruned)] = 1e-30
    elif case == "nan pruned":
        w[tuple(pruned)] = float("nan")
    elif case.startswith("nothing pruned"):
        keep = torch.ones_like(keep)
        w = torch.randn(w.shape)
        if "nan" in case:
            w[tuple(kept)] = float("nan")
    elif case == "nan kept":
        w[tuple(kept)] = float("nan")
    elif case == "zero-size":
        w, keep = w[:0], keep[:0]
    got = torch.ops.sparsekern.binary_prune_state(w, keep)
    assert got.dtype == torch.long and got.shape == ()
    assert int(got) == expected == int(mask_apply._prune_state_reference(w, keep))


def test_opcheck_binary_prune_state():
    w, keep = _pruned_zero_pair()
    torch.library.opcheck(torch.ops.sparsekern.binary_prune_state.default, (w, keep))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the eager C++ path is part of the extension")
@pytest.mark.parametrize("state", [0, 1, 2, "float64", "non-dense"])
def test_binary_masked_weight_op(state):
    w, keep = _pruned_zero_pair((7, 3, 2, 5))
    if state == 2:
        keep = torch.ones_like(keep)
    elif state == 0:
        w[tuple((~keep).nonzero()[0].tolist())] = 2.0
    elif state == "float64":
        w = w.double()
    elif state == "non-dense":
        w, keep = w[:, :, :, ::2], keep[:, :, :, ::2]
    w.requires_grad_()
    out = torch.ops.sparsekern.binary_masked_weight(w, keep)
    torch.testing.assert_close(out, w.detach() * keep, rtol=0, atol=0)
    if state == 2:
        assert out is w  # nothing to mask: the weight, no graph node
    elif state == 1:
        assert out.data_ptr() == w.data_ptr() and out._base is w
    else:
        assert out.data_ptr() != w.data_ptr()
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, w, g)
    torch.testing.assert_close(grad, g * keep, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(torch.ops.sparsekern.binary_masked_weight(w.detach(), keep), w.detach() * keep,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep"):
        torch.ops.sparsekern.binary_masked_weight(w, keep[:1])
    with pytest.raises(TypeError, match="bool"):
        torch.ops.sparsekern.binary_masked_weight(w, keep.float())
    # Its choice of graph depends on the values (an eager-only op: torch.compile traces the
    # masked ops instead), so opcheck's AOT-dispatch tests do not apply.
    torch.library.opcheck(torch.ops.sparsekern.binary_masked_weight.default, (w, keep),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the eager C++ path is part of the extension")
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_binary_with_zero_pruned_weights_uses_the_weight_itself(layer):
    from sparsekern import SparseConv2d, SparseLinear

    torch.manual_seed(0)
    if layer == "conv":
        m, x = SparseConv2d(5, 6, 3, padding=1, mask="binary"), torch.randn(2, 5, 7, 7)
    else:
        m, x = SparseLinear(9, 6, mask="binary"), torch.randn(4, 9)
    x.requires_grad_()  # so the layer saves its weight (for grad_x)
    with torch.no_grad():
        m.weight_mask.copy_(torch.rand(m.weight.shape) > 0.5)
        m.weight.mul_(m.weight_mask)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    # The layer saved the parameter's own storage, no weight-sized w_eff (and the mask
    # buffer itself, for the gradient).
    weight_sized = {t.data_ptr() for t in saved if t.numel() == m.weight.numel()}
    assert weight_sized == {m.weight.data_ptr(), m.weight_mask.data_ptr()}
    w_eff = m.weight.detach() * m.weight_mask
    expected = (torch.nn.functional.conv2d(x, w_eff, m.bias, padding=1) if layer == "conv"
                else torch.nn.functional.linear(x, w_eff, m.bias))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    w_ref = w_eff.clone().requires_grad_()
    x = x.detach()
    out = (torch.nn.functional.conv2d(x, w_ref, m.bias, padding=1) if layer == "conv"
           else torch.nn.functional.linear(x, w_ref, m.bias))
    out.backward(g)
    torch.testing.assert_close(m.weight.grad, w_ref.grad * m.weight_mask, rtol=0, atol=0)
    assert bool((m.weight.grad[~m.weight_mask] == 0).all())


def _pruned_conv(seed=0):
    from sparsekern import SparseConv2d

    torch.manual_seed(seed)
    m = SparseConv2d(5, 6, 3, padding=1, mask="binary")
    with torch.no_grad():
        m.weight_mask.copy_(torch.rand(m.weight.shape) > 0.5)
        m.weight.mul_(m.weight_mask)
    return m, torch.randn(2, 5, 7, 7)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the eager C++ path is part of the extension")
def test_binary_with_a_nonzero_pruned_weight_still_masks_it():
    w, keep = _pruned_zero_pair()
    assert mask_apply.binary_weight(w, keep).data_ptr() == w.data_ptr()
    w[tuple((~keep).nonzero()[0].tolist())] = 5.0  # a pruned weight that is not zero
    out = mask_apply.binary_weight(w, keep)
    assert out.data_ptr() != w.data_ptr() and torch.equal(out, w * keep)
    # The layer then takes the masked op: the output and the gradient ignore that weight.
    m, x = _pruned_conv()
    with torch.no_grad():
        m.weight[~m.weight_mask] = 5.0
    y = m(x)
    w_eff = m.weight.detach() * m.weight_mask
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w_eff, m.bias, padding=1), rtol=0, atol=0)
    y.sum().backward()
    assert bool((m.weight.grad[~m.weight_mask] == 0).all())
    # The public masked ops never alias the weight, zero pruned weights or not.
    for weight in (w, w * keep):
        out = ops.masked_conv2d_weight(weight, keep, kind="binary")
        assert out.data_ptr() != weight.data_ptr()
        torch.testing.assert_close(out, weight * keep, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the eager C++ path is part of the extension")
def test_binary_weight_refuses_a_mask_changed_before_backward():
    m, x = _pruned_conv()
    y = m(x)
    m.weight_mask[0].fill_(False)  # e.g. a mask update between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.skipif(not HAS_EXTENSION, reason="the eager C++ path is part of the extension")
def test_binary_weight_gradient_is_masked_in_the_graph():
    import copy
    import pickle

    from sparsekern import SparseConv2d

    m, x = _pruned_conv()
    # torch.autograd.grad sees the masked gradient too: the mask is a node of the graph.
    (g,) = torch.autograd.grad(m(x).sum(), m.weight)
    assert bool((g[~m.weight_mask] == 0).all()) and bool((g[m.weight_mask] != 0).any())
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        twin(x).sum().backward()
        torch.testing.assert_close(twin.weight.grad, g, rtol=0, atol=0)
    # A module sharing the Parameter (from_dense's source) keeps its plain gradient.
    conv = torch.nn.Conv2d(5, 6, 3, padding=1)
    layer = SparseConv2d.from_dense(conv)
    with torch.no_grad():
        layer.weight_mask.copy_(m.weight_mask)
        layer.weight.mul_(m.weight_mask)
    (g_layer,) = torch.autograd.grad(layer(x).sum(), conv.weight)
    (g_conv,) = torch.autograd.grad(conv(x).sum(), conv.weight)
    assert bool((g_layer[~m.weight_mask] == 0).all()) and bool((g_conv[~m.weight_mask] != 0).any())


@pytest.mark.skipif(not HAS_EXTENSION, reason="the eager C++ path is part of the extension")
def test_binary_grad_mask_op():
    w, keep = _pruned_zero_pair((7, 3, 2, 5))
    w.requires_grad_()
    out = torch.ops.sparsekern.binary_grad_mask(w, keep)
    assert out.data_ptr() == w.data_ptr() and out._base is w
    g = torch.randn_like(w, dtype=torch.float64).float()
    (grad,) = torch.autograd.grad(out, w, g)
    torch.testing.assert_close(grad, g * keep, rtol=0, atol=0)
    # A grad of another layout (channels_last) is masked by position, not by memory order.
    g_cl = g.contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(torch.ops.sparsekern.binary_grad_mask(w, keep), w, g_cl)
    torch.testing.assert_close(grad, g * keep, rtol=0, atol=0)
    with torch.inference_mode():
        assert torch.ops.sparsekern.binary_grad_mask(w.detach(), keep).data_ptr() == w.data_ptr()
    with pytest.raises(ValueError, match="keep"):
        torch.ops.sparsekern.binary_grad_mask(w, keep[:1])
    torch.library.opcheck(torch.ops.sparsekern.binary_grad_mask.default, (w, keep))
    # A weight the C++ kernel does not take (float64): its backward masks with torch
    # (it raised "'weight' must be float32" there).
    w64 = w.detach().double().requires_grad_()
    (grad,) = torch.autograd.grad(torch.ops.sparsekern.binary_grad_mask(w64, keep), w64, g.double())
    torch.testing.assert_close(grad, g.double() * keep, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the C++ node / torch.where
def test_grad_masked(dtype):
    t = torch.randn(5, 4, 3, dtype=dtype, requires_grad=True)
    keep = torch.rand(5, 4, 3) > 0.4
    out = mask_apply.grad_masked(t, keep)
    assert torch.equal(out, t.detach())
    g = torch.randn_like(t)
    (grad,) = torch.autograd.grad(out, t, g)
    torch.testing.assert_close(grad, g * keep, rtol=0, atol=0)
    compiled = torch.compile(lambda t, k: mask_apply.grad_masked(t, k).sum(), fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(t, keep), t)
    torch.testing.assert_close(grad, keep.to(dtype), rtol=0, atol=0)
