"""ops.masked_conv2d_weight against the float64 reference for every mask kind: w_eff and
the gradients of weight and mask (directly and through F.conv2d); per-channel gates,
channels_last and non-contiguous weights, zero-size; float64 gradcheck; opcheck on both
ops; torch.compile (fullgraph) forward + backward; the forward saves no weight-sized
tensor beyond its inputs; bad inputs. Plus the CUDA path without a GPU (fake-tensor
trace, sm_90 compile)."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tolerances
from sparsekern import ops
from masked_helpers import make_mask, compile_for_sm90
from sparsekern.ops import mask_math, reference

KINDS = mask_math.KINDS
SHAPE = (7, 5, 3, 3)


def inputs(kind, device, dtype=torch.float32, shape=SHAPE, mask_shape=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    m = make_mask(kind, shape, gen, mask_shape).to(device)
    if m.is_floating_point() and dtype == torch.float64:
        m = m.double()
    G = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return w, m, G


def run(fn, w, m, G, kind, beta=1.0, scale=1.0):
    """(w_eff, grad_w, grad_mask or None)."""
    w = w.detach().clone().requires_grad_()
    m = m.detach().clone().requires_grad_(m.is_floating_point())
    out = fn(w, m, kind=kind, beta=beta, scale=scale)
    wrt = [w] + ([m] if m.requires_grad else [])
    grads = torch.autograd.grad(out, wrt, G)
    return out.detach(), grads[0], (grads[1] if m.requires_grad else None)


def ref_fn(w, m, *, kind, beta, scale):
    return reference.masked_conv2d_weight(w, m, kind, beta, scale)


def to64(t):
    return t.detach().double() if t.is_floating_point() else t.detach()


def check_against_reference(w, m, G, kind, beta=1.0, scale=1.0, k=8.0):
    got = run(ops.masked_conv2d_weight, w, m, G, kind, beta, scale)
    want = run(ref_fn, to64(w), to64(m), to64(G), kind, beta, scale)
    for name, g, r, src in zip(("w_eff", "grad_weight", "grad_mask"), got, want, (w, w, m)):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == src.dtype and g.shape == src.shape, name
        torch.testing.assert_close(g.double(), r, **tolerances(w.dtype, k), msg=lambda s: f"{name}: {s}")
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(device, kind, dtype):
    w, m, G = inputs(kind, device, dtype)
    check_against_reference(w, m, G, kind, beta=2.5, scale=0.8)


@pytest.mark.parametrize("mask_shape", [(7, 1, 1, 1), (1, 1, 1, 1), (1, 5, 1, 1), (7, 5, 1, 1)])
def test_hard_concrete_gate_shapes(device, mask_shape):
    w, z, G = inputs("hard_concrete", device, mask_shape=mask_shape)
    got = check_against_reference(w, z, G, "hard_concrete", k=32.0)
    assert got[2].shape == z.shape


@pytest.mark.parametrize("kind", KINDS)
def test_layouts(device, kind):
    """channels_last weight (w_eff and computed grad_w keep it), a mask in another
    layout, and a sliced weight."""
    w, m, G = inputs(kind, device, shape=(6, 4, 3, 5))
    w_cl = w.contiguous(memory_format=torch.channels_last)
    got = check_against_reference(w_cl, m, G, kind, beta=1.5)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    if kind != "straight_through":  # whose grad_w is G itself, passed through uncopied
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    m_cl = m.contiguous(memory_format=torch.channels_last)
    check_against_reference(w, m_cl, G.contiguous(memory_format=torch.channels_last), kind, beta=1.5)
    w_sliced = torch.randn(6, 8, 3, 5, device=device)[:, ::2]
    check_against_reference(w_sliced, m, G, kind, beta=1.5)


@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0, 3, 3)])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_size(device, kind, shape):
    w, m, G = inputs(kind, device, shape=shape)
    out, gw, gm = check_against_reference(w, m, G, kind, beta=1.5)
    assert out.shape == gw.shape == shape and (gm is None or gm.shape == shape)


@pytest.mark.parametrize("kind", KINDS)
def test_through_conv2d(device, kind):
    """The module's use: F.conv2d on w_eff; grads of input, weight and mask."""
    w, m, _ = inputs(kind, device)
    x = torch.randn(2, 5, 8, 9, generator=torch.Generator().manual_seed(4)).to(device)

    def loss(fn, x, w, m):
        w_eff = fn(w, m, kind=kind, beta=2.0, scale=1.0)
        return F.conv2d(x, w_eff, padding=1).square().sum()

    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in (x, w, m)]
    got = torch.autograd.grad(loss(ops.masked_conv2d_weight, *leaves), [t for t in leaves if t.requires_grad])
    leaves64 = [to64(t).requires_grad_(t.is_floating_point()) for t in (x, w, m)]
    want = torch.autograd.grad(loss(ref_fn, *leaves64), [t for t in leaves64 if t.requires_grad])
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-4)


def test_straight_through_reaches_pruned_weights(device):
    w, m, G = inputs("straight_through", device)
    _, gw_st, gm = run(ops.masked_conv2d_weight, w, m, G, "straight_through")
    _, gw_bin, _ = run(ops.masked_conv2d_weight, w, m, G, "binary")
    pruned = ~m
    assert gm is None and pruned.any()
    assert (gw_st[pruned] != 0).all() and (gw_bin[pruned] == 0).all()
    torch.testing.assert_close(gw_st, G)


def test_forward_saves_only_inputs():
    """No weight-sized tensor beyond weight and mask is kept for backward."""
    w, s, _ = inputs("sigmoid", "cpu")
    w.requires_grad_()
    s.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.masked_conv2d_weight(w, s, kind="sigmoid", beta=2.0)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {w.data_ptr(), s.data_ptr()}


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=gen, requires_grad=kind != "straight_through")
    m = make_mask(kind, (4, 3, 2, 2), gen, (4, 1, 1, 1) if kind == "hard_concrete" else None)
    if m.is_floating_point():
        m = m.double().requires_grad_()
    if not (w.requires_grad or m.requires_grad):
        # Straight-through's grad_w is G by design, not d(w⊙m)/dw: check it directly.
        G = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=gen)
        w_ = w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(ops.masked_conv2d_weight(w_, m, kind=kind), [w_], G)
        assert torch.equal(gw, G)
        return
    fn = lambda w, m: ops.masked_conv2d_weight(w, m, kind=kind, beta=1.5, scale=0.7)
    assert torch.autograd.gradcheck(fn, (w, m))


# Zero-size: the backward's tangent (the gradient of out.sum()) is an expanded empty
# tensor, strides (0, 0, 0, 0); the traced graph had passed it to the C++ backward, whose
# strict stride check raised ValueError in opcheck's AOT-dispatch test.
@pytest.mark.parametrize("shape", [SHAPE, (0, 5, 3, 3)])
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind, shape):
    mask_shape = (shape[0], 1, 1, 1) if kind == "hard_concrete" else None
    w, m, G = inputs(kind, "cpu", shape=shape, mask_shape=mask_shape)
    learn = m.is_floating_point()
    for args in ([w, m], [w.clone().requires_grad_(), m.clone().requires_grad_(learn)],
                 [w.contiguous(memory_format=torch.channels_last), m]):
        torch.library.opcheck(torch.ops.sparsekern.masked_conv2d_weight, (*args, kind, 1.5, 0.7))
    for mask_grad in (True, False):
        torch.library.opcheck(torch.ops.sparsekern.masked_conv2d_weight_backward,
                              (G, w, m, kind, 1.5, 0.7, mask_grad))


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(kind):
    w, m, _ = inputs(kind, "cpu")
    x = torch.randn(2, 5, 6, 6)

    def f(x, w, m):
        return F.conv2d(x, ops.masked_conv2d_weight(w, m, kind=kind, beta=2.0), padding=1).square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, f):
        wg = w.clone().requires_grad_()
        mg = m.clone().requires_grad_(m.is_floating_point())
        loss = fn(x, wg, mg)
        loss.backward()
        results.append((loss.detach(), wg.grad, mg.grad))
    for g, r in zip(*results):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r)


def test_bad_inputs():
    w, s, _ = inputs("sigmoid", "cpu")
    f = ops.masked_conv2d_weight
    cases = [
        (ValueError, "kind", lambda: f(w, s, kind="hard-concrete")),
        (TypeError, "kind", lambda: f(w, s, kind=None)),
        (TypeError, "mask", lambda: f(w, s, kind="binary")),
        (TypeError, "mask", lambda: f(w, s > 0, kind="relaxed")),
        (ValueError, "mask", lambda: f(w, s[:, :1], kind="sigmoid")),
        (ValueError, "mask", lambda: f(w, s[:3, :1, :1, :1], kind="hard_concrete")),
        (ValueError, "mask", lambda: f(w, s[:, 0, 0, 0], kind="hard_concrete")),
        (ValueError, "weight", lambda: f(w[0], s[0], kind="sigmoid")),
        (TypeError, "weight", lambda: f(w.int(), s, kind="sigmoid")),
        (TypeError, "weight", lambda: f(w.tolist(), s, kind="sigmoid")),
        (TypeError, "mask", lambda: f(w, s.numpy(), kind="sigmoid")),
        (TypeError, "scale", lambda: f(w, s, kind="sigmoid", scale=None)),
        (ValueError, "beta", lambda: f(w, s, kind="sigmoid", beta=float("-inf"))),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=f"`{name}`"):
            call()


# --- the CUDA path, without a GPU -------------------------------------------------------


def test_cuda_path_traces_with_fake_tensors():
    """Under AOT autograd with fake CUDA tensors both op bodies decompose into kernel
    launches whose outputs match the fake impls' metadata (channels_last kept)."""
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    def f(w, z, s, G):
        w_eff = ops.masked_conv2d_weight(w, s, kind="sigmoid", beta=3.0)
        gw, gs = torch.ops.sparsekern.masked_conv2d_weight_backward(G, w, s, "sigmoid", 3.0, 1.0, True)
        _, gz = torch.ops.sparsekern.masked_conv2d_weight_backward(G, w, z, "hard_concrete", 1.0, 1.0, True)
        return w_eff, gw, gs, gz

    with FakeTensorMode():
        cl = torch.channels_last
        w = torch.empty(16, 8, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
        z = torch.empty(16, 1, 1, 1, device="cuda")
        s = torch.empty(16, 8, 3, 3, device="cuda").contiguous(memory_format=cl)
        G = torch.empty(16, 8, 3, 3, device="cuda", dtype=torch.bfloat16)
        w_eff, gw, gs, gz = aot_function(f, fw_compiler=keep)(w, z, s, G)
    assert w_eff.is_contiguous(memory_format=cl) and gw.is_contiguous(memory_format=cl)
    assert gs.is_contiguous(memory_format=cl)
    assert (gs.shape, gs.dtype, gz.shape, gz.dtype) == (w.shape, torch.float32, z.shape, torch.float32)
    launches = [n for n in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(launches) == 3


@pytest.mark.parametrize("kind,dtype,mask_t,reduce_o,reduce_r", [
    ("binary", "*bf16", "*i1", False, False),
    ("straight_through", "*fp32", "*i1", False, False),
    ("sigmoid", "*fp16", "*fp32", False, False),
    ("hard_concrete", "*bf16", "*fp32", False, True),
    ("hard_concrete", "*fp32", "*fp32", True, True),
    ("relaxed", "*fp32", "*fp32", False, False),
])
def test_cuda_kernels_compile(kind, dtype, mask_t, reduce_o, reduce_r):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreter objects under TRITON_INTERPRET=1")
    from sparsekern.kernels import masked_conv as k

    code = k.KIND_CODES[kind]
    compile_for_sm90(k._masked_weight_kernel, dict(w_ptr=dtype, m_ptr=mask_t, out_ptr=dtype),
                     dict(KIND=code, BLOCK_O=32, BLOCK_R=128))
    grad_m_t = "*fp32" if reduce_o or reduce_r else mask_t
    compile_for_sm90(k._masked_weight_backward_kernel,
                     dict(g_ptr=dtype, w_ptr=dtype, m_ptr=mask_t, grad_w_ptr=dtype, grad_m_ptr=grad_m_t),
                     dict(KIND=code, MASK_GRAD=kind in mask_math.LEARNABLE_KINDS, REDUCE_O=reduce_o,
                          REDUCE_R=reduce_r, BLOCK_O=32, BLOCK_R=128))
