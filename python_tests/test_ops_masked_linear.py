"""ops.masked_linear against the float64 reference for every mask kind: values and the
gradients of x, weight, bias and mask; leading batch dims, bias None, zero-size,
non-contiguous inputs; float64 gradcheck; opcheck on the three ops; torch.compile
(fullgraph) forward + backward; bad inputs. Plus the CUDA path without a GPU: it traces
under AOT autograd with fake CUDA tensors, and its kernels compile to sm_90 cubins."""
import math

import pytest
import torch

from conftest import tolerances
from sparsekern import ops
from masked_helpers import make_mask, compile_for_sm90
from sparsekern.ops import mask_math, reference

KINDS = mask_math.KINDS
LEARNABLE = mask_math.LEARNABLE_KINDS


def inputs(kind, device, dtype=torch.float32, lead=(2, 3), out_f=37, in_f=53, mask_shape=None,
           bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=gen) / math.sqrt(in_f)
    w = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen) if bias else None
    m = make_mask(kind, (out_f, in_f), gen, mask_shape)
    gy = torch.randn(*lead, out_f, generator=gen) / math.sqrt(max(math.prod(lead), 1))
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    m = m.to(device=device, dtype=torch.float64 if dtype == torch.float64 and m.is_floating_point() else m.dtype)
    return cast(x), cast(w), cast(b), m, cast(gy)


def run(fn, x, w, b, m, gy, kind, beta=1.0, scale=1.0):
    """fn's output and the gradients of x, w, b, m (None where not differentiable)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
              for t in (x, w, b, m)]
    y = fn(leaves[0], leaves[1], leaves[2], leaves[3], kind=kind, beta=beta, scale=scale)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = dict(zip(map(id, wrt), torch.autograd.grad(y, wrt, gy)))
    return [y.detach()] + [grads.get(id(t)) if t is not None else None for t in leaves]


def ref_fn(x, w, b, m, *, kind, beta, scale):
    return reference.masked_linear(x, w, b, m, kind, beta, scale)


def to64(t):
    return None if t is None else (t.detach().double() if t.is_floating_point() else t.detach())


def check_against_reference(x, w, b, m, gy, kind, beta=1.0, scale=1.0, k=16.0):
    got = run(ops.masked_linear, x, w, b, m, gy, kind, beta, scale)
    want = run(ref_fn, *map(to64, (x, w, b, m, gy)), kind, beta, scale)
    names = ["y", "grad_x", "grad_weight", "grad_bias", "grad_mask"]
    for name, g, r, src in zip(names, got, want, (x, x, w, b, m)):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == src.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g.double(), r, **tolerances(x.dtype, k), msg=lambda s: f"{name}: {s}")
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(device, kind, dtype):
    x, w, b, m, gy = inputs(kind, device, dtype)
    got = check_against_reference(x, w, b, m, gy, kind, beta=1.7, scale=1.3)
    assert got[0].shape == (2, 3, 37)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_runs_the_linear_in_low_precision(device, kind, x_dtype):
    """Under torch.autocast x comes in bfloat16 from the layer before (or float32 into the
    first layer) while the weight, bias and mask stay float32: the op runs as nn.Linear
    does there, F.linear(x, w_eff) in bfloat16 with w_eff formed in float32 (this raised a
    dtype TypeError before). Gradients come back in each input's own dtype."""
    x, w, b, m, gy = inputs(kind, device)
    x, gy = x.to(x_dtype), gy.to(torch.bfloat16)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = run(ops.masked_linear, x, w, b, m, gy, kind, 1.7, 1.3)
        # What autocast makes of nn.Linear with the masked weight: the same result, bit for bit.
        same = torch.nn.functional.linear(x, reference.masked_weight(w, m, kind, 1.7, 1.3), b)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], same)
    want = run(ref_fn, *map(to64, (x, w, b, m, gy)), kind, 1.7, 1.3)
    for name, g, r, src in zip(["y", "grad_x", "grad_weight", "grad_bias", "grad_mask"], got, want, (gy, x, w, b, m)):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == src.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g.double(), r, **tolerances(torch.bfloat16, 16.0), msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("mask_shape", [(37, 53), (1, 53), (37, 1), (1, 1)])
def test_hard_concrete_gate_shapes(device, mask_shape):
    x, w, b, z, gy = inputs("hard_concrete", device, mask_shape=mask_shape)
    got = check_against_reference(x, w, b, z, gy, "hard_concrete", k=64.0)
    assert got[4].shape == z.shape


@pytest.mark.parametrize("kind", KINDS)
def test_bias_none_and_no_batch_dims(device, kind):
    x, w, _, m, gy = inputs(kind, device, lead=(), bias=False)
    assert x.shape == (53,)
    got = check_against_reference(x, w, None, m, gy, kind)
    assert got[0].shape == (37,) and got[3] is None


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("kind", ["sigmoid", "binary"])
def test_zero_size_batch(device, kind, lead):
    x, w, b, m, gy = inputs(kind, device, lead=lead)
    y, gx, gw, gb, gm = run(ops.masked_linear, x, w, b, m, gy, kind)
    assert y.shape == (*lead, 37) and gx.shape == x.shape
    assert (gw == 0).all() and (gb == 0).all()
    assert gm is None if kind == "binary" else (gm == 0).all()


@pytest.mark.parametrize("out_f, in_f", [(0, 53), (37, 0), (0, 0)])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_features(device, kind, out_f, in_f):
    check_against_reference(*inputs(kind, device, out_f=out_f, in_f=in_f), kind, beta=1.5)


@pytest.mark.parametrize("kind", KINDS)
def test_meta_tensors(kind):
    """Shape inference on the meta device, as nn.Linear and the other masked ops allow:
    the autocast query raised RuntimeError for the meta device type."""
    x, w, b, m, _ = (t.to("meta") for t in inputs(kind, "cpu"))
    y = ops.masked_linear(x, w, b, m, kind=kind)
    expected = reference.masked_linear(x, w, b, m, kind)
    assert (y.device, y.shape, y.dtype) == (expected.device, expected.shape, expected.dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs(device, kind):
    """Transposed weight and mask, x sliced along its features and its batch."""
    # Sliced after the move: .to(cuda) of a CPU view makes a contiguous copy.
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 2 * 53, generator=gen) / math.sqrt(53)).to(device)[::2, :, ::2]
    w = torch.randn(53, 37, generator=gen).to(device).t()
    m = make_mask(kind, (53, 37), gen).to(device).t()
    b = torch.randn(2 * 37, generator=gen).to(device)[::2]
    gy = torch.randn(2, 3, 37, generator=gen).to(device)
    assert not any(t.is_contiguous() for t in (x, w, m, b))
    check_against_reference(x, w, b, m, gy, kind, beta=0.5, scale=2.0)


def test_straight_through_reaches_pruned_weights(device):
    x, w, b, m, gy = inputs("straight_through", device)
    _, _, gw_st, _, gm = run(ops.masked_linear, x, w, b, m, gy, "straight_through")
    _, _, gw_bin, _, _ = run(ops.masked_linear, x, w, b, m, gy, "binary")
    pruned = ~m
    assert gm is None and pruned.any()
    assert (gw_st[pruned] != 0).all() and (gw_bin[pruned] == 0).all()
    torch.testing.assert_close(gw_st[m], gw_bin[m])
    # Both kinds compute the same forward: pruned weights do not reach y.
    y_st = ops.masked_linear(x, w, b, m, kind="straight_through")
    torch.testing.assert_close(y_st, ops.masked_linear(x, w * m, b, m, kind="binary"))


def test_partial_requires_grad(device):
    """Only the mask learns (frozen weight), or only the weight (frozen scores)."""
    x, w, b, s, gy = inputs("sigmoid", device)
    s_ = s.clone().requires_grad_()
    y = ops.masked_linear(x, w, b, s_, kind="sigmoid", beta=3.0)
    (gs,) = torch.autograd.grad(y, [s_], gy)
    ref = run(ref_fn, x, w, b, s, gy, "sigmoid", 3.0)[4]
    torch.testing.assert_close(gs, ref, **tolerances(torch.float32, 16))
    w_ = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(ops.masked_linear(x, w_, None, s, kind="sigmoid", beta=3.0), [w_], gy)
    torch.testing.assert_close(gw, run(ref_fn, x, w, b, s, gy, "sigmoid", 3.0)[2], **tolerances(torch.float32, 16))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    m = make_mask(kind, (5, 7), gen, (1, 7) if kind == "hard_concrete" else None)
    if m.is_floating_point():
        m = m.double().requires_grad_()
    # Straight-through's grad_w is G by design, not the derivative of x @ (w⊙m)ᵀ.
    w.requires_grad_(kind != "straight_through")
    fn = lambda x, w, b, m: ops.masked_linear(x, w, b, m, kind=kind, beta=1.5, scale=0.7)
    assert torch.autograd.gradcheck(fn, (x, w, b, m))


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 11, generator=gen)
    w = torch.randn(5, 11, generator=gen)
    b = torch.randn(5, generator=gen)
    m = make_mask(kind, (5, 11), gen, (1, 11) if kind == "hard_concrete" else None)
    gy = torch.randn(6, 5, generator=gen)
    learn = m.is_floating_point()
    grad_args = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
                 m.clone().requires_grad_(learn)]
    for args in ([x, w, b, m], [x, w, None, m], grad_args):
        torch.library.opcheck(torch.ops.sparsekern.masked_linear, (*args, kind, 1.5, 0.7))
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_grad_input, (gy, w, m, kind, 1.5, 0.7))
    for mask_grad, bias_grad in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.sparsekern.masked_linear_grad_weight,
                              (gy, x, w, m, kind, 1.5, 0.7, mask_grad, bias_grad))


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(kind):
    x, w, b, m, gy = inputs(kind, "cpu", lead=(4, 2), out_f=6, in_f=9)

    def f(x, w, b, m):
        return ops.masked_linear(x, w, b, m, kind=kind, beta=2.0, scale=1.1).sin()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = run(lambda x, w, b, m, **_: compiled(x, w, b, m), x, w, b, m, gy, kind)
    want = run(lambda x, w, b, m, **_: f(x, w, b, m), x, w, b, m, gy, kind)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r)


def test_bad_inputs():
    x, w, b, s, _ = inputs("sigmoid", "cpu")
    mb = s > 0
    f = ops.masked_linear
    cases = [
        (ValueError, "kind", lambda: f(x, w, b, s, kind="gaussian")),
        (TypeError, "kind", lambda: f(x, w, b, s, kind=3)),
        (TypeError, "mask", lambda: f(x, w, b, s, kind="binary")),
        (TypeError, "mask", lambda: f(x, w, b, mb, kind="sigmoid")),
        (TypeError, "mask", lambda: f(x, w, b, mb.long(), kind="straight_through")),
        (ValueError, "mask", lambda: f(x, w, b, s[:, :-1], kind="relaxed")),
        (ValueError, "mask", lambda: f(x, w, b, s[:1], kind="sigmoid")),
        (ValueError, "mask", lambda: f(x, w, b, s[:2, :1], kind="hard_concrete")),
        (ValueError, "mask", lambda: f(x, w, b, s[0], kind="hard_concrete")),
        (ValueError, "x", lambda: f(x[..., :-1], w, b, s, kind="sigmoid")),
        (TypeError, "x", lambda: f(x.double(), w, b, s, kind="sigmoid")),
        (TypeError, "x", lambda: f(x.numpy(), w, b, s, kind="sigmoid")),
        (TypeError, "x", lambda: f(x.long(), w, b, s, kind="sigmoid")),
        (ValueError, "weight", lambda: f(x, w[None], b, s[None], kind="sigmoid")),
        (ValueError, "bias", lambda: f(x, w, b[:-1], s, kind="sigmoid")),
        (TypeError, "bias", lambda: f(x, w, b.half(), s, kind="sigmoid")),
        (TypeError, "beta", lambda: f(x, w, b, s, kind="sigmoid", beta="2")),
        (TypeError, "beta", lambda: f(x, w, b, s, kind="sigmoid", beta=True)),
        (ValueError, "beta", lambda: f(x, w, b, s, kind="sigmoid", beta=float("inf"))),
        (ValueError, "scale", lambda: f(x, w, b, s, kind="sigmoid", scale=float("nan"))),
        (ValueError, "mask", lambda: f(x, w, b, s.to("meta"), kind="sigmoid")),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=f"`{name}`"):
            call()


# --- the CUDA path, without a GPU -------------------------------------------------------


def test_cuda_path_traces_with_fake_tensors():
    """Under AOT autograd with fake CUDA tensors the op bodies take the Triton branch and
    decompose into kernel launches whose outputs match the fake impls' metadata."""
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    def f(x, w, b, z, gy):
        y = ops.masked_linear(x, w, b, z, kind="hard_concrete")
        gx = torch.ops.sparsekern.masked_linear_grad_input(gy, w, z, "hard_concrete", 1.0, 1.0)
        gw, gz, gb = torch.ops.sparsekern.masked_linear_grad_weight(
            gy, x.reshape(-1, 7), w, z, "hard_concrete", 1.0, 1.0, True, True)
        return y, gx, gw, gz, gb

    with FakeTensorMode():
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        args = (torch.empty(8, 5, 7, **bf16), torch.empty(6, 7, **bf16), torch.empty(6, **bf16),
                torch.empty(1, 7, device="cuda"), torch.empty(40, 6, **bf16))
        y, gx, gw, gz, gb = aot_function(f, fw_compiler=keep)(*args)
    assert (y.shape, gx.shape, gw.shape, gz.shape, gb.shape) == ((8, 5, 6), (40, 7), (6, 7), (1, 7), (6,))
    assert (y.dtype, gw.dtype, gz.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    launches = [n for n in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(launches) == 3


CASES = [  # (kind, dtype, mask pointer type, bias, reduce_n, reduce_k)
    ("binary", torch.bfloat16, "*i1", True, False, False),
    ("straight_through", torch.float16, "*i1", False, False, False),
    ("sigmoid", torch.float32, "*fp32", True, False, False),
    ("hard_concrete", torch.bfloat16, "*fp32", True, True, False),
    ("relaxed", torch.float32, "*bf16", False, False, False),
]


@pytest.mark.parametrize("kind,dtype,mask_t,bias,reduce_n,reduce_k", CASES)
def test_cuda_kernels_compile(kind, dtype, mask_t, bias, reduce_n, reduce_k):
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreter objects under TRITON_INTERPRET=1")
    from sparsekern.kernels import masked_linear as k

    t = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    code = k.KIND_CODES[kind]
    bm, bn, bk, warps, stages = k._blocks(dtype, 4096, 4096)
    ptrs = dict(a_ptr=t, w_ptr=t, m_ptr=mask_t, bias_ptr=t, c_ptr=t)
    compile_for_sm90(k._masked_matmul_kernel, ptrs, dict(
        KIND=code, HAS_BIAS=bias, UPCAST=False, INPUT_PRECISION=k._input_precision(dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=8), warps, stages)
    ptrs = dict(gy_ptr=t, x_ptr=t, w_ptr=t, m_ptr=mask_t, gw_ptr=t, gb_ptr=t,
                gm_ptr="*fp32" if reduce_n or reduce_k else mask_t)
    compile_for_sm90(k._masked_linear_grad_weight_kernel, ptrs, dict(
        KIND=code, MASK_GRAD=kind in LEARNABLE, BIAS_GRAD=bias, REDUCE_N=reduce_n, REDUCE_K=reduce_k,
        UPCAST=False, INPUT_PRECISION="ieee", BLOCK_N=bm, BLOCK_K=bn, BLOCK_M=bk, GROUP=8), warps, stages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_cpu_per_input_gate_uses_native_autograd(dtype, monkeypatch):
    # A hard_concrete gate per input neuron ([1, in]) takes torch's broadcasting mul in
    # eager CPU mode, not the custom op; values and gradients are the kind's.
    import importlib

    ml = importlib.import_module("sparsekern.ops.masked_linear")  # the module, not the function

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was called")

    monkeypatch.setattr(ml, "_masked_linear_op", refuse)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 7, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 7, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=dtype, requires_grad=True)
    z = torch.rand(1, 7, generator=gen, dtype=dtype).requires_grad_()
    y = ops.masked_linear(x, w, b, z, kind="hard_concrete")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b, z), g)
    xs, ws, bs, zs = (t.detach().double().requires_grad_() for t in (x, w, b, z))
    y_ref = reference.masked_linear(xs, ws, bs, zs, "hard_concrete")
    grads_ref = torch.autograd.grad(y_ref, (xs, ws, bs, zs), g.double())
    tol = tolerances(dtype, k=32.0)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), r, **tol)
