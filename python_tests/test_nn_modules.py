"""SparseLinear / SparseConv2d: for every mask kind the output equals the dense layer with
w ⊙ g (g written out here in plain torch), the gradients reach weight, bias and mask as
DESIGN.md's table says, state_dict names, dense-checkpoint loading, from_dense/to_dense,
option checking, and torch.compile(fullgraph=True) forward + backward."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from sparsekern import ops
from sparsekern.nn import SparseConv2d, SparseLinear, make_mask

KINDS = ["binary", "straight_through", "sigmoid", "relaxed", "hard_concrete", "hard_concrete_structured"]
STATE_NAME = {
    "binary": "weight_mask",
    "straight_through": "weight_mask",
    "sigmoid": "weight_score",
    "relaxed": "weight_mask",
    "hard_concrete": "weight_log_alpha",
    "hard_concrete_structured": "weight_log_alpha",
}
HC = dict(beta=2.0 / 3.0, gamma=-0.1, zeta=1.1)
TOL = dict(rtol=1e-5, atol=1e-6)


def kind_and_options(kind):
    if kind == "hard_concrete_structured":
        return "hard_concrete", {"structured": True, "seed": 1234}
    if kind == "hard_concrete":
        return kind, {"seed": 1234}
    if kind == "sigmoid":
        return kind, {"s0": -0.2, "beta": 2.5}
    return kind, {}


def make_layer(kind, cls, *args, dtype=torch.float64, device="cpu", **kwargs):
    """A layer of `kind` whose mask state is random, so every gate value matters."""
    name, opts = kind_and_options(kind)
    return randomize(cls(*args, dtype=dtype, device=device, mask=name, **kwargs, **opts))


def randomize(layer):
    """Sets the layer's mask state at random, so every gate value matters; returns it."""
    (state_name,) = layer.mask.state_names
    state = getattr(layer, state_name)
    with torch.no_grad():
        if state.dtype == torch.bool:
            state.copy_(torch.rand(state.shape) < 0.6)
        elif layer.mask.name == "sigmoid":
            state.copy_(torch.randn(state.shape))
        elif layer.mask.name == "relaxed":
            state.copy_(torch.rand(state.shape))
        else:  # log α spread so that some gates are 0, some 1, some between
            state.copy_(3 * torch.randn(state.shape))
    return layer


def reference_gate(layer, state, offset_before):
    """g from a leaf copy of the mask state, in plain torch (the hard-concrete noise is the
    op reference's Philox stream at the offset the forward used)."""
    m = layer.mask
    if m.name in ("binary", "straight_through"):
        return state.to(layer.weight.dtype)
    if m.name == "sigmoid":
        return torch.sigmoid(m.beta * state) / torch.sigmoid(torch.tensor(m.s0, dtype=state.dtype))
    if m.name == "relaxed":
        return state
    x = state
    if layer.training:
        u = ops.reference.hard_concrete_uniform(x.shape, m.seed, offset_before, x.dtype, x.device)
        x = x + torch.log(u) - torch.log(1 - u)
    g = (torch.sigmoid(x / HC["beta"]) * (HC["zeta"] - HC["gamma"]) + HC["gamma"]).clamp(0, 1)
    return g.repeat_interleave(m.inputs_per_gate, dim=1)  # a gate per block of inputs (attention heads)


def state_name(layer):
    (name,) = layer.mask.state_names
    return name


def check_against_reference(layer, x, dense_fn):
    """Runs layer and the reference y = dense_fn(x, w ⊙ g, b) with the same upstream
    gradient; compares outputs and the gradients of weight, bias and the mask state."""
    name = state_name(layer)
    state = getattr(layer, name)
    offset = getattr(layer.mask, "offset", None)
    y = layer(x)
    go = torch.randn_like(y)
    y.backward(go)

    w = layer.weight.detach().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    s = state.detach().clone().requires_grad_(state.is_floating_point())
    g = reference_gate(layer, s, offset)
    b_eff = b * g.reshape(-1) if b is not None and layer.mask.bias_gated(layer) else b
    w_eff = w * g
    w_eff.retain_grad()
    y_ref = dense_fn(x, w_eff, b_eff)
    y_ref.backward(go)
    torch.testing.assert_close(y, y_ref, **TOL)

    if layer.mask.name == "straight_through":
        torch.testing.assert_close(layer.weight.grad, w_eff.grad, **TOL)  # G, unmasked
        assert bool((layer.weight.grad[~state] != 0).any())  # pruned weights do get gradient
    else:
        torch.testing.assert_close(layer.weight.grad, w.grad, **TOL)  # G ⊙ g
    if b is not None:
        torch.testing.assert_close(layer.bias.grad, b.grad, **TOL)
    if state.is_floating_point():
        assert state.requires_grad and state.grad is not None
        torch.testing.assert_close(state.grad, s.grad, **TOL)
        assert bool(state.grad.abs().sum() > 0)
    else:
        assert not state.requires_grad and state.grad is None
    return y


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_linear_equals_dense_with_masked_weight(kind, training, device):
    torch.manual_seed(0)
    layer = make_layer(kind, SparseLinear, 7, 5, device=device).train(training)
    x = torch.randn(2, 3, 7, dtype=torch.float64, device=device)  # extra leading dim
    check_against_reference(layer, x, F.linear)


CONV_CONFIGS = [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, stride=2, padding=1, dilation=1, bias=False),
    dict(kernel_size=(3, 1), padding="valid", dilation=2, groups=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("config", range(len(CONV_CONFIGS)))
@pytest.mark.parametrize("kind", KINDS)
def test_conv_equals_dense_with_masked_weight(kind, config, device):
    torch.manual_seed(1)
    cfg = CONV_CONFIGS[config]
    layer = make_layer(kind, SparseConv2d, 4, 6, device=device, **cfg).train()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=device)
    plain = nn.Conv2d(4, 6, **cfg, dtype=torch.float64)

    def dense(x, w, b):
        return plain._conv_forward(x, w, b)

    check_against_reference(layer, x, dense)


def test_structured_hard_concrete_gate_shapes_and_bias_gating():
    lin = SparseLinear(6, 4, mask="hard_concrete", structured=True)
    conv = SparseConv2d(3, 5, 3, mask="hard_concrete", structured=True)
    assert lin.weight_log_alpha.shape == (1, 6)  # one gate per input neuron
    assert conv.weight_log_alpha.shape == (5, 1, 1, 1)  # one gate per output channel
    assert conv.mask.bias_gated(conv) and not lin.mask.bias_gated(lin)
    with torch.no_grad():
        conv.weight_log_alpha[2] = -50.0  # median gate exactly 0
        conv.bias.fill_(1.0)
    y = conv.eval()(torch.randn(1, 3, 5, 5))
    assert bool((y[:, 2] == 0).all())  # the bias is gated with its channel
    assert conv.mask.group_size(conv) == 27 and lin.mask.group_size(lin) == 4


def test_hard_concrete_init_and_offset():
    torch.manual_seed(0)
    layer = SparseLinear(50, 40, mask="hard_concrete", droprate_init=0.2)
    la = layer.weight_log_alpha
    assert la.shape == layer.weight.shape and la.requires_grad
    la = la.detach()
    assert abs(float(la.mean()) - math.log(0.8 / 0.2)) < 0.01 and 0.005 < float(la.std()) < 0.015
    x = torch.randn(3, 50)
    y1, y2 = layer(x), layer(x)
    assert layer.mask.offset == 2 and not torch.equal(y1, y2)  # fresh noise every training forward
    layer.eval()
    y3, y4 = layer(x), layer(x)
    assert layer.mask.offset == 2 and torch.equal(y3, y4)  # eval: deterministic median gate
    # Same seed, same init and stream; seed=None draws from torch's generator.
    torch.manual_seed(5)
    a = SparseLinear(4, 3, mask="hard_concrete")
    torch.manual_seed(5)
    b = SparseLinear(4, 3, mask="hard_concrete")
    assert a.mask.seed == b.mask.seed and torch.equal(a.weight_log_alpha, b.weight_log_alpha)


def test_sigmoid_scale_and_beta():
    layer = SparseLinear(3, 2, mask="sigmoid", s0=-0.5)
    assert layer.mask.scale == pytest.approx(1 / (1 / (1 + math.exp(0.5))))
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # g = 1 at init
    layer.mask.set_beta(layer, 7.0)  # the next forward uses it
    g = torch.sigmoid(7.0 * layer.weight_score) * layer.mask.scale
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * g, layer.bias))
    assert SparseLinear(3, 2, mask="sigmoid", scale_init=False).mask.scale == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_names(kind):
    name, opts = kind_and_options(kind)
    lin = SparseLinear(3, 2, mask=name, **opts)
    conv = SparseConv2d(2, 3, 1, bias=False, mask=name, **opts)
    assert list(lin.state_dict()) == ["weight", "bias", STATE_NAME[kind]]
    assert list(conv.state_dict()) == ["weight", STATE_NAME[kind]]
    learnable = [p for n, p in lin.named_parameters() if n == STATE_NAME[kind]]
    assert lin.mask_parameters() == learnable


@pytest.mark.parametrize("kind", KINDS)
def test_dense_checkpoint_loads_strictly_and_keeps_mask(kind):
    name, opts = kind_and_options(kind)
    dense = nn.Linear(5, 4)
    layer = make_layer(kind, SparseLinear, 5, 4, dtype=torch.float32)
    mask_before = getattr(layer, STATE_NAME[kind]).detach().clone()
    result = layer.load_state_dict(dense.state_dict())  # strict: no missing mask keys
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, dense.weight) and torch.equal(layer.bias, dense.bias)
    assert torch.equal(getattr(layer, STATE_NAME[kind]), mask_before)
    # A sparse checkpoint round-trips, mask included ...
    other = SparseLinear(5, 4, mask=name, **opts)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(getattr(other, STATE_NAME[kind]), mask_before)
    # ... and one that has weight but lacks only some entries is still an error.
    sd = layer.state_dict()
    del sd["bias"]
    with pytest.raises(RuntimeError, match="bias"):
        other.load_state_dict(sd)


def test_from_dense_shares_parameters_and_config():
    dense = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True, padding_mode="circular", dtype=torch.float64)
    sparse = SparseConv2d.from_dense(dense, mask="binary")
    assert sparse.weight is dense.weight and sparse.bias is dense.bias
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(sparse, attr) == getattr(dense, attr)
    assert sparse.weight_mask.device == dense.weight.device and bool(sparse.weight_mask.all())
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), dense(x))

    lin = nn.Linear(3, 2, bias=False, dtype=torch.float64).eval()
    s = SparseLinear.from_dense(lin, mask="sigmoid", s0=0.3)
    assert s.weight is lin.weight and s.bias is None and not s.training
    assert s.weight_score.dtype == torch.float64 and float(s.weight_score[0, 0].detach()) == 0.3
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SparseConv2d.from_dense(nn.Conv1d(1, 1, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(s)  # already sparse


def test_from_dense_draws_no_weight_init():
    dense = nn.Linear(20, 10)
    torch.manual_seed(3)
    SparseLinear.from_dense(dense, mask="binary")
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))  # the RNG stream is untouched


@pytest.mark.parametrize("kind", KINDS)
def test_to_dense_bakes_the_eval_gate(kind):
    torch.manual_seed(2)
    conv = make_layer(kind, SparseConv2d, 3, 4, 3, padding=1).eval()
    lin = make_layer(kind, SparseLinear, 6, 2).eval()
    for layer, x in ((conv, torch.randn(2, 3, 5, 5, dtype=torch.float64)), (lin, torch.randn(2, 6, dtype=torch.float64))):
        dense = layer.to_dense()
        assert type(dense) in (nn.Conv2d, nn.Linear) and dense.weight.dtype == torch.float64
        assert set(dense.state_dict()) == {"weight", "bias"}
        with torch.no_grad():
            torch.testing.assert_close(dense(x), layer(x), **TOL)
        assert dense.weight.data_ptr() != layer.weight.data_ptr()
        # Where the mask's support is empty the baked weight is exactly 0.
        keep = layer.mask.keep(layer)
        if layer.mask.name != "sigmoid":
            assert bool((dense.weight[~keep] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_to_dense_in_16_bit_equals_the_layer(kind, dtype):
    """A bfloat16 / float16 layer exports bit for bit: the gate in float32 and w ⊙ g
    rounded once, as the forward does (the 16-bit gate was rounded before the product: the
    sigmoid and hard-concrete exports were 1 ulp off in the weights, 2-4 in the outputs)."""
    torch.manual_seed(4)
    conv = make_layer(kind, SparseConv2d, 3, 4, 3, padding=1, dtype=dtype).eval()
    lin = make_layer(kind, SparseLinear, 6, 5, dtype=dtype).eval()
    for layer, x in ((conv, torch.randn(2, 3, 5, 5, dtype=dtype)), (lin, torch.randn(2, 6, dtype=dtype))):
        dense = layer.to_dense()
        assert dense.weight.dtype == dtype
        with torch.no_grad():
            assert torch.equal(dense(x), layer(x))


def test_float16_sigmoid_gate_does_not_overflow():
    """The gate scale·σ(β·s) with scale = 1/σ(s0) is formed in float32: in float16 the
    scale overflowed for s0 < −11 and σ(s0) underflowed, so at s0 = −20 a layer whose gates
    were all 1 exported all-zero weights (its output off by 0.85 of 1.04)."""
    torch.manual_seed(5)
    layer = SparseLinear(6, 3, mask="sigmoid", s0=-20.0, dtype=torch.float16).eval()
    x = torch.randn(4, 6, dtype=torch.float16)
    assert torch.equal(layer.mask.gate(layer), torch.ones_like(layer.weight))
    with torch.no_grad():
        assert torch.equal(layer.to_dense()(x), layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_runs_like_the_exported_layer(kind, device):
    """Under torch.autocast a sparse layer computes what its exported nn.Linear / nn.Conv2d
    computes there, bit for bit, in bfloat16 (the linear raised a dtype TypeError before:
    x came in bfloat16, the weight stayed float32); training mode gets gradients to the
    weight and the mask in their own float32."""
    torch.manual_seed(3)
    conv = make_layer(kind, SparseConv2d, 3, 4, 3, padding=1, dtype=torch.float32, device=device)
    lin = make_layer(kind, SparseLinear, 6, 5, dtype=torch.float32, device=device)
    for layer, x in ((conv, torch.randn(2, 3, 5, 5)), (lin, torch.randn(2, 6))):
        x = x.to(device=device, dtype=torch.bfloat16)
        dense = layer.eval().to_dense()
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            got, want = layer(x), dense(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        layer.train()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        for p in [layer.weight, *layer.mask_parameters()]:
            assert p.grad is not None and p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("structured", [False, True])
def test_activation_checkpointing_recomputes_the_same_noise(structured, reentrant):
    """torch.utils.checkpoint reruns the forward inside the backward; the hard-concrete
    layers must draw the noise of the original forward there, or the gradients are of
    another sample (they differed by up to 5.0 on a ResNet-20 before). Two micro-batches
    (gradient accumulation), each checkpointed in two segments: the gradients and the
    offsets equal those of the same steps without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    def model():
        torch.manual_seed(5)
        opts = dict(mask="hard_concrete", structured=structured)
        return nn.Sequential(SparseConv2d(2, 4, 3, seed=11, **opts), nn.ReLU(), nn.Flatten(),
                             SparseLinear(36, 3, seed=12, **opts))

    plain, ckpt = model(), model()
    xs = [torch.randn(2, 2, 5, 5, requires_grad=reentrant) for _ in range(2)]
    for x in xs:
        plain(x).square().sum().backward()
        h = checkpoint(ckpt[:2], x, use_reentrant=reentrant)
        checkpoint(ckpt[2:], h, use_reentrant=reentrant).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    assert [m.mask.offset for m in (ckpt[0], ckpt[3])] == [m.mask.offset for m in (plain[0], plain[3])] == [2, 2]


def test_project():
    rel = SparseLinear(3, 3, mask="relaxed")
    hc = SparseLinear(3, 3, mask="hard_concrete")
    with torch.no_grad():
        rel.weight_mask.copy_(torch.tensor([-1.0, 0.5, 2.0]).expand(3, 3))
        hc.weight_log_alpha.copy_(torch.tensor([-10.0, 0.0, 10.0]).expand(3, 3))
    rel.mask.project(rel)
    hc.mask.project(hc)
    assert rel.weight_mask[0].tolist() == [0.0, 0.5, 1.0]
    torch.testing.assert_close(hc.weight_log_alpha[0], torch.tensor([math.log(0.01), 0.0, math.log(100.0)]))


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match="unknown mask kind 'dense'"):
        SparseLinear(2, 2, mask="dense")
    with pytest.raises(TypeError, match="takes no option.*'s0'"):
        SparseLinear(2, 2, mask="binary", s0=1.0)
    with pytest.raises(ValueError, match="droprate_init"):
        SparseLinear(2, 2, mask="hard_concrete", droprate_init=1.0)
    with pytest.raises(ValueError, match="m0"):
        SparseConv2d(2, 2, 1, mask="relaxed", m0=1.5)
    with pytest.raises(TypeError, match="beta"):
        make_mask("sigmoid", beta="2")
    with pytest.raises(TypeError, match="MaskKind instance"):
        SparseLinear(2, 2, mask=make_mask("relaxed"), m0=0.2)
    assert make_mask("hard-concrete", structured=True).name == "hard_concrete"  # DESIGN's spelling
    # A complex layer was built, and failed at its first forward naming an internal op
    # (or, binary, ran); a meta float8 one the same.
    with pytest.raises(TypeError, match=r"`dtype`.*complex64"):
        SparseLinear(2, 2, mask="hard_concrete", dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"`dtype`.*float8_e4m3fn"):
        SparseConv2d(2, 2, 1, mask="binary", dtype=torch.float8_e4m3fn, device="meta")


def _compiled_matches_eager(kind, layer, x):
    """One forward + backward through torch.compile(fullgraph=True) equals eager."""
    torch._dynamo.reset()
    name = state_name(layer)
    ref = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    y_ref = ref(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **TOL)
    state, ref_state = getattr(layer, name), getattr(ref, name)
    if state.is_floating_point():
        torch.testing.assert_close(state.grad, ref_state.grad, **TOL)
    if kind.startswith("hard_concrete"):
        assert layer.mask.offset == ref.mask.offset == 1  # the side effect survived compile


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_linear(kind, device):
    torch.manual_seed(0)
    layer = make_layer(kind, SparseLinear, 8, 4, dtype=torch.float32, device=device).train()
    _compiled_matches_eager(kind, layer, torch.randn(3, 8, device=device))


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_conv(kind, device):
    torch.manual_seed(0)
    layer = make_layer(kind, SparseConv2d, 3, 4, 3, padding=1, dtype=torch.float32, device=device).train()
    _compiled_matches_eager(kind, layer, torch.randn(2, 3, 6, 6, device=device))


@pytest.mark.parametrize("cls, args, x_shape", [
    (SparseLinear, (8, 4), (3, 8)),
    (SparseConv2d, (3, 4, 3), (2, 3, 6, 6)),
])
def test_compile_fullgraph_keeps_the_expected_l0(cls, args, x_shape):
    # The compiled forward keeps its expected L0 for expected_nonzero() (a side effect
    # dynamo replays); using it gives the eager gradient, and the layer still deep-copies.
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = make_layer("hard_concrete", cls, *args, dtype=torch.float32).train()
    ref = copy.deepcopy(layer)
    x = torch.randn(x_shape)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    l0 = layer.mask.expected_nonzero(layer)
    assert l0 is layer.mask._forward_term.value and l0.requires_grad
    (y.square().sum() + 0.3 * l0).backward()
    y_ref = ref(x)
    l0_ref = ops.hard_concrete_l0(ref.weight_log_alpha, ref.mask.group_size(ref))
    (y_ref.square().sum() + 0.3 * l0_ref).backward()
    torch.testing.assert_close(l0.detach(), l0_ref.detach(), **TOL)
    torch.testing.assert_close(layer.weight_log_alpha.grad, ref.weight_log_alpha.grad, **TOL)
    assert copy.deepcopy(layer).mask._forward_term is None


def test_compile_hard_concrete_offset_does_not_recompile_every_step():
    """The Philox offset is a Python int that changes every training step; with
    allow_unspec_int_on_nn_module dynamo makes it symbolic after one recompile."""
    torch._dynamo.reset()
    layer = SparseLinear(8, 4, mask="hard_concrete", structured=True).train()
    compiles = 0

    def backend(gm, example_inputs):
        nonlocal compiles
        compiles += 1
        return gm

    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        compiled = torch.compile(layer, fullgraph=True, backend=backend)
        outs = [compiled(torch.ones(2, 8)) for _ in range(4)]
    assert compiles <= 2 and layer.mask.offset == 4
    assert not torch.equal(outs[2], outs[3])


def test_compile_sigmoid_beta_change_does_not_recompile():
    """CS anneals β every epoch; the compiled forward reads it from the layer's
    `weight_beta` buffer, so a new β is a new input value, not a new graph."""
    torch._dynamo.reset()
    layer = make_layer("sigmoid", SparseConv2d, 3, 4, 3, padding=1, dtype=torch.float32).train()
    compiles = 0

    def backend(gm, example_inputs):
        nonlocal compiles
        compiles += 1
        return gm

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 6, 6)
    for beta in (1.0, 2.5, 7.0, 40.0):
        layer.mask.set_beta(layer, beta)
        ref = copy.deepcopy(layer)
        y = compiled(x)
        torch.testing.assert_close(y, ref(x), **TOL)
        assert float(layer.weight_beta) == beta == layer.mask.beta
    assert compiles == 1


@pytest.mark.parametrize("dtype, convert", [(torch.bfloat16, "to"), (torch.float16, "to"), (torch.float16, "half")])
@pytest.mark.parametrize("cls, args, x_shape", [
    (SparseLinear, (8, 4), (3, 8)),
    (SparseConv2d, (3, 4, 3), (2, 3, 6, 6)),
])
def test_compiled_sigmoid_uses_eager_beta_in_16_bit_models(cls, args, x_shape, dtype, convert):
    """model.to(bfloat16) converted `weight_beta` with the weights: β = 14.142 became 14.125
    in compiled forwards while eager ones multiplied by the float. It stays in the gate's
    compute dtype (float32), and the compiled β·s is formed there, as the eager op forms it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = make_layer("sigmoid", cls, *args, dtype=torch.float32).train()
    layer.mask.set_beta(layer, 14.142)  # not a bfloat16 (nor a float16) number
    layer = layer.to(dtype) if convert == "to" else layer.half()
    exact = torch.tensor(14.142, dtype=torch.float32)  # what the eager op multiplies a float32 s by
    assert layer.weight_beta.dtype == torch.float32 and torch.equal(layer.weight_beta, exact)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x = torch.randn(x_shape, dtype=dtype)
    for beta in (14.142, 3.3):
        layer.mask.set_beta(layer, beta)
        assert torch.equal(layer.weight_beta, torch.tensor(beta, dtype=torch.float32))
        ref = copy.deepcopy(layer)
        y = compiled(x)
        y_ref = ref(x)
        assert y.dtype == dtype and torch.equal(y, y_ref)
        y.float().square().sum().backward()
        y_ref.float().square().sum().backward()
        assert layer.weight_score.grad.dtype == dtype
        torch.testing.assert_close(layer.weight_score.grad, ref.weight_score.grad, rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=0, atol=0)
        layer.zero_grad()
        # The compiled penalty (CS's L1 of the gate) too.
        l1 = torch.compile(layer.mask.l1, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(l1(layer), ref.mask.l1(ref), rtol=1e-6, atol=0)
    assert counter.frame_count == 1  # set_beta is a new input value, not a new graph


def test_sigmoid_beta_buffer_survives_to_empty_and_float64():
    """weight_beta is not in the state_dict, so after to_empty() nothing loads it: it is set
    from β again, not left uninitialised. A float64 model keeps β exactly."""
    layer = SparseLinear(3, 2, mask="sigmoid", beta=1.7, device="meta")
    layer.to_empty(device="cpu")
    assert torch.equal(layer.weight_beta, torch.tensor(1.7, dtype=torch.float32))
    layer.double()
    assert layer.weight_beta.dtype == torch.float64 and float(layer.weight_beta) == 1.7
    assert SparseLinear(3, 2, mask="sigmoid", beta=1.7, dtype=torch.float64).weight_beta.item() == 1.7
    assert layer.float().weight_beta.dtype == torch.float32


@pytest.mark.parametrize("structured", [False, True])
def test_hard_concrete_noise_offsets_follow_the_layer(structured):
    """The counter and the last forward's offset were moved only by the next training
    forward: after layer.to(device) an offset set in between (a method's load_state_dict)
    went to the old device, and both stayed there. The meta device is a real move that
    needs no GPU; moved off it (to_empty), the counter, which had no value there, restarts
    at 0 (copying it raised at the first training forward: no data)."""
    torch.manual_seed(0)
    layer = SparseLinear(4, 3, mask="hard_concrete", structured=structured, seed=5).train()
    for _ in range(3):
        layer(torch.randn(2, 4))
    assert layer.mask.offset == 3
    layer.double()  # a conversion on the same device keeps the values
    assert layer.mask.offset == 3 and layer.mask._counter.dtype == torch.int64
    layer.to("meta")
    assert layer.mask._counter.is_meta and layer.mask._last_offset.is_meta
    layer.mask.offset = 7  # set on log α's device
    assert layer.mask._counter.is_meta
    layer.to_empty(device="cpu")
    assert layer.mask._counter.device.type == "cpu" and layer.mask._last_offset is None
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.zero_()
        layer.weight_log_alpha.fill_(1.0)
    assert layer.mask.offset == 0
    layer(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert layer.mask.offset == 1 and layer.weight_log_alpha.grad is not None


def test_sigmoid_beta_is_set_through_set_beta():
    layer = SparseLinear(3, 2, mask="sigmoid")
    with pytest.raises(AttributeError, match="set_beta"):
        layer.mask.beta = 2.0
    with pytest.raises(ValueError, match="beta"):
        layer.mask.set_beta(layer, -1.0)
    assert "weight_beta" not in layer.state_dict()  # not a checkpoint entry: the method owns β


def test_project_layers_clamps_like_each_layers_project():
    from sparsekern.nn.masks import project_layers

    torch.manual_seed(0)
    layers = [SparseConv2d(3, 4, 3, mask="hard_concrete"), SparseLinear(5, 2, mask="relaxed"),
              SparseLinear(5, 2, mask="hard_concrete", structured=True), SparseConv2d(3, 4, 1, mask="sigmoid"),
              SparseLinear(4, 3, mask="binary"),
              # at and above CLAMP_ALONE_NUMEL: clamped alone, not with the foreach pair
              SparseLinear(256, 256, mask="hard_concrete"), SparseLinear(300, 250, mask="relaxed")]
    twins = [copy.deepcopy(layer) for layer in layers]
    with torch.no_grad():
        for layer, twin in zip(layers, twins):
            for name in layer.mask.state_names:
                t = getattr(layer, name)
                if t.dtype.is_floating_point:
                    t.copy_(torch.randn(t.shape) * 10)
                    t.view(-1)[0] = float("nan")
                    getattr(twin, name).copy_(t)
    project_layers(layers)
    for twin in twins:
        twin.mask.project(twin)
    for layer, twin in zip(layers, twins):
        for name in layer.mask.state_names:
            assert torch.equal(getattr(layer, name).isnan(), getattr(twin, name).isnan())
            torch.testing.assert_close(getattr(layer, name), getattr(twin, name), rtol=0, atol=0, equal_nan=True)


def test_every_mask_kind_has_options_and_a_repr():
    for kind in ("binary", "straight_through", "sigmoid", "relaxed", "hard_concrete"):
        layer = SparseLinear(3, 2, mask=kind)
        assert isinstance(layer.mask.options(), dict)
        assert f"mask={kind}(" in repr(layer)


def test_hard_concrete_constants_are_checked_when_set():
    # The forward passes them to the op unchecked (hard_concrete.sample_checked).
    mask = make_mask("hard_concrete", seed=3)
    for name, bad, error in [("beta", 0.0, ValueError), ("gamma", 0.1, ValueError), ("zeta", 1.0, ValueError),
                             ("beta", "x", TypeError), ("seed", -1, ValueError), ("seed", 1.5, TypeError)]:
        before = getattr(mask, name)
        with pytest.raises(error, match=name):
            setattr(mask, name, bad)
        assert getattr(mask, name) == before
    mask.beta = 0.5
    assert mask.beta == 0.5


def test_relaxed_mask_pickled_holding_its_gradient_keep_mask_loads():
    # torch.save(model) from when the mask held the tensor itself as `grad_keep` (now a
    # method reading the layer's `weight_alive` buffer, which the instance attribute shadowed).
    layer = SparseLinear(3, 2, mask="relaxed")
    state = layer.mask.__getstate__()
    state.pop("has_dead")
    state["grad_keep"] = None
    old = type(layer.mask).__new__(type(layer.mask))
    old.__setstate__(state)
    layer.mask = old
    assert old.grad_keep(layer) is None and not old.has_dead
    layer(torch.randn(4, 3)).sum().backward()
    assert layer.weight_mask.grad is not None
