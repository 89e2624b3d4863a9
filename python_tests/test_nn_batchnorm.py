"""GatedBatchNorm2d: the BatchNorm after a structured hard-concrete conv runs on the conv's
open channels only (closed: output exactly 0, running statistics unchanged; open: z times
the normalised channel, log α learning through it, and running statistics of the ungated
output y of x = z·y), against a
float64 reference in train and eval, with and without affine parameters and running
statistics, gradients included; which BatchNorms sparsify gates (fx pairing), what it
leaves alone, the warning for a model fx cannot trace; export (a plain BatchNorm2d with
the eval gate baked in) and purge (every closed conv1 channel of a ResNet-20 removed,
outputs unchanged); copies, pickles, checkpoints, torch.compile and activation
checkpointing."""
import copy
import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import export, sparsify
from sparsekern.methods import DPF, ConstrainedL0, PenalizedL0
from sparsekern.models import build_model
from sparsekern.nn import GatedBatchNorm2d, SparseConv2d, sparse_modules
from sparsekern.nn.batchnorm import gate_batchnorms
from sparsekern.ops import hard_concrete_gates
from run_helpers import one_thread  # noqa: F401  (one_thread: a fixture)

CLOSED, OPEN = -20.0, 20.0  # log α far enough out that every sample is 0 / 1


def gated_pair(channels=5, affine=True, track=True, momentum=0.1, dtype=torch.float64, seed=0):
    """A structured hard-concrete conv (log α: closed, open, and random draws) and a
    BatchNorm gated by it, with non-trivial affine parameters and running statistics."""
    torch.manual_seed(seed)
    conv = SparseConv2d(2, channels, 3, padding=1, mask="hard_concrete", structured=True, seed=7, dtype=dtype)
    bn = nn.BatchNorm2d(channels, affine=affine, track_running_stats=track, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        pattern = torch.tensor([CLOSED, OPEN, 0.0, CLOSED, 0.5, -0.5, OPEN], dtype=dtype)
        conv.weight_log_alpha.copy_(pattern.repeat(channels)[:channels].view(-1, 1, 1, 1))
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
        if track:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return conv, GatedBatchNorm2d.from_dense(bn, conv)


def reference(x, z, bn, training):
    """float64: on the open channels (gate z > 0; x = z·y) an ordinary BatchNorm whose
    running statistics are y's (used as z·μ, z²·σ²; updated with x's batch statistics
    divided by z, z²), its output times z; 0 on the closed; returns (output, new running
    mean, new running var) (statistics None when not tracked)."""
    x, z = x.double(), z.detach().double()
    open_ = z != 0
    rm = None if bn.running_mean is None else bn.running_mean.detach().double().clone()
    rv = None if bn.running_var is None else bn.running_var.detach().double().clone()
    batch = training or rm is None
    if batch:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = rm * z, rv * z * z
    y = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
    if bn.affine:
        y = y * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    y = y * z[:, None, None]
    if training and bn.track_running_stats:
        n = x.numel() / x.shape[1]
        f = bn.momentum if bn.momentum is not None else 1.0 / (int(bn.num_batches_tracked) + 1)
        zz = torch.where(open_, z, 1.0)
        rm = torch.where(open_, (1 - f) * rm + f * mean.detach() / zz, rm)
        rv = torch.where(open_, (1 - f) * rv + f * var.detach() * n / (n - 1) / (zz * zz), rv)
    return y, rm, rv


def drawn_z(conv):
    """The gates the conv's last training forward drew, from the op itself."""
    z = hard_concrete_gates(conv.weight_log_alpha.detach(), conv.mask.seed, conv.mask.offset - 1)
    return z.reshape(-1)


def drawn_open(conv):
    """The channels the conv's last training forward left open."""
    return drawn_z(conv) != 0


CASES = [dict(affine=a, track=t, momentum=m) for a in (True, False) for t in (True, False) for m in (0.1, None)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_the_float64_reference_with_gradients(case, training):
    conv, bn = gated_pair(channels=7, **case)
    conv.train(training), bn.train(training)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):  # several steps: the running statistics carry over
        conv(torch.randn(3, 2, 5, 7, dtype=torch.float64, generator=gen))  # draws this forward's gates
        z = drawn_z(conv) if training else conv.mask.gate(conv).reshape(-1)
        open_ = z != 0
        assert torch.equal(bn.channel_gates(), z) and torch.equal(bn.open_channels(), open_)
        assert 0 < int(open_.sum()) < 7  # both kinds of channel
        assert ((z > 0) & (z < 1)).any()  # and a gate strictly between: the statistics' scaling
        # Any input, the closed channels' not zero: the gated BatchNorm zeroes them itself.
        x = (torch.randn(3, 7, 5, 7, dtype=torch.float64, generator=gen) * 2 + 0.5).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        ref_bn = copy.deepcopy(bn)
        for p in ref_bn.parameters():
            p.grad = None
        want, rm, rv = reference(x_ref, z, ref_bn, training)
        got = bn(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(got[:, ~open_], torch.zeros_like(got[:, ~open_]))  # exactly 0
        if rm is not None:
            torch.testing.assert_close(bn.running_mean, rm, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(bn.running_var, rv, rtol=1e-12, atol=1e-12)
            if training:  # the closed channels' statistics bit for bit as they were
                assert torch.equal(bn.running_mean[~open_], ref_bn.running_mean[~open_])
                assert torch.equal(bn.running_var[~open_], ref_bn.running_var[~open_])
        g = torch.randn(got.shape, dtype=torch.float64, generator=gen)
        got.backward(g)
        want.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
        if bn.affine:
            for name in ("weight", "bias"):
                p, q = getattr(bn, name), getattr(ref_bn, name)
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
                assert torch.equal(p.grad[~open_], torch.zeros_like(p.grad[~open_]))
                p.grad = None
    if training and bn.track_running_stats:
        assert int(bn.num_batches_tracked) == 3


def test_open_channels_follow_the_conv_mode_and_float32():
    conv, bn = gated_pair(channels=6, dtype=torch.float32)
    bn.eval()  # a frozen BatchNorm behind a training conv: this forward's sampled gates
    conv.train()
    x = torch.randn(4, 2, 4, 4)
    y = bn(conv(x))
    open_ = drawn_open(conv)
    assert torch.equal(bn.open_channels(), open_)
    assert not y[:, ~open_].any()
    conv.eval()
    assert torch.equal(bn.open_channels(), conv.mask.gate(conv).reshape(-1) != 0)


def test_training_before_any_conv_forward_raises():
    conv, bn = gated_pair()
    with pytest.raises(RuntimeError, match="first training forward"):
        bn(torch.randn(2, 5, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_to_dense_is_a_plain_batchnorm_computing_the_eval_function(affine, track):
    conv, bn = gated_pair(channels=7, affine=affine, track=track)
    conv.eval(), bn.eval()
    dense_conv, dense = conv.to_dense(), bn.to_dense()
    assert type(dense) is nn.BatchNorm2d and not hasattr(dense, "_gated_by")
    # Without affine parameters it gets them (γ = z, β = 0): nothing else scales by z.
    assert set(dense.state_dict()) == set(bn.state_dict()) | ({"weight", "bias"} if not affine else set())
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense(dense_conv(x)), bn(conv(x)), rtol=0, atol=0)
    # bn itself unchanged
    assert type(bn) is GatedBatchNorm2d and bn.conv is conv


def test_from_dense_checks_its_arguments():
    conv = SparseConv2d(2, 4, 3, mask="hard_concrete", structured=True)
    with pytest.raises(TypeError, match="`module`"):
        GatedBatchNorm2d.from_dense(nn.BatchNorm1d(4), conv)
    with pytest.raises(TypeError, match="`conv`"):
        GatedBatchNorm2d.from_dense(nn.BatchNorm2d(4), nn.Conv2d(2, 4, 3))
    with pytest.raises(ValueError, match="does not gate whole output channels"):
        GatedBatchNorm2d.from_dense(nn.BatchNorm2d(4), SparseConv2d(2, 4, 3, mask="hard_concrete"))
    with pytest.raises(ValueError, match="4 output channels"):
        GatedBatchNorm2d.from_dense(nn.BatchNorm2d(5), conv)
    with pytest.raises(TypeError, match="from_dense"):
        GatedBatchNorm2d(4)


# ---- which BatchNorms sparsify gates


def resnet(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", (3, 8, 8), 10)


def gated_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, GatedBatchNorm2d))


def test_structured_l0_gates_every_batchnorm_behind_a_conv_and_keeps_the_state_dict():
    model = resnet()
    names = [n for n, _ in model.named_modules()]
    keys = set(model.state_dict())
    # Every conv gated (an explicit include; the default gates the blocks' conv1 alone,
    # test_structured_l0_default_gates_the_blocks_first_batchnorms).
    method = ConstrainedL0(model, 0.5, structured=True, include="*")
    bns = sorted(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert gated_names(model) == bns and len(bns) == 21  # stem, 2 per block, 2 shortcuts
    for name in bns:
        bn = model.get_submodule(name)
        conv = model.get_submodule(name[:-len("bn1")] + "conv1" if name.endswith("bn1") else
                                   name[:-len("bn2")] + "conv2" if name.endswith("bn2") else name[:-1] + "0")
        assert bn.conv is conv and conv.mask.batchnorm_gated
    # Not a submodule: the same modules and state_dict keys (plus the gates' own log α).
    assert [n for n, _ in model.named_modules()] == names
    assert set(model.state_dict()) == keys | {f"{n}.weight_log_alpha" for n, _ in method.layers}
    assert "conv" not in dict(model.layer1[0].bn1.named_children())


def test_structured_l0_default_gates_the_blocks_first_batchnorms():
    # The default gates the convs purge can slice, each block's conv1: their BatchNorms
    # alone are gated; the stem's, conv2's and the shortcuts' stay plain.
    model = resnet()
    ConstrainedL0(model, 0.5, structured=True)
    assert gated_names(model) == [f"layer{s}.{b}.bn1" for s in (1, 2, 3) for b in range(3)]
    assert type(model.bn1) is nn.BatchNorm2d and type(model.layer2[0].shortcut[1]) is nn.BatchNorm2d


@pytest.mark.parametrize("make", [
    lambda m: ConstrainedL0(m, 0.5),                      # unstructured gates: no channel is closed as a whole
    lambda m: PenalizedL0(m, 1e-3, structured=False),
    lambda m: DPF(m, sparsity=0.5, mode="structured", gate_batchnorms=False),  # test_nn_batchnorm_dpf.py
], ids=["l0 unstructured", "penalized unstructured", "dpf structured, plain"])
def test_other_masks_leave_the_batchnorms_plain(make):
    model = resnet()
    make(model)
    assert gated_names(model) == []


def test_sparsify_directly_gates_and_a_second_sparsify_keeps_the_pairs():
    model = resnet()
    sparsify(model, mask="hard_concrete", structured=True, include=["layer1"])
    assert gated_names(model) == ["layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2",
                                  "layer1.2.bn1", "layer1.2.bn2"]
    first = model.layer1[0].bn1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the gated ones are not "other normalisation layers"
        sparsify(model, mask="hard_concrete", structured=True, include=["layer2"])
    assert model.layer1[0].bn1 is first and first.conv is model.layer1[0].conv1
    assert len(gated_names(model)) == 6 + 7


class Branches(nn.Module):
    """Convs whose BatchNorm is not theirs alone, or not right after them."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(3, 4, 1)      # output read by its BatchNorm and by the add
        self.bn_shared = nn.BatchNorm2d(4)
        self.twice = nn.Conv2d(4, 4, 1)       # called twice
        self.bn_twice = nn.BatchNorm2d(4)
        self.act_first = nn.Conv2d(4, 4, 1)   # a ReLU between conv and BatchNorm
        self.bn_act = nn.BatchNorm2d(4)
        self.reused_bn = nn.BatchNorm2d(4)    # one BatchNorm after two convs
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.plain = nn.Conv2d(4, 4, 1)       # the one pair that qualifies
        self.bn_plain = nn.BatchNorm2d(4)

    def forward(self, x):
        s = self.shared(x)
        h = self.bn_shared(s) + s
        h = self.bn_twice(self.twice(self.twice(h)))
        h = self.bn_act(F.relu(self.act_first(h)))
        h = self.reused_bn(self.a(h)) + self.reused_bn(self.b(h))
        return self.bn_plain(self.plain(h))


def test_only_exclusive_direct_pairs_are_gated():
    model = sparsify(Branches(), mask="hard_concrete", structured=True)
    assert gated_names(model) == ["bn_plain"]
    model(torch.randn(2, 3, 4, 4)).sum().backward()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        if h.mean() > 0:  # data-dependent control flow: fx cannot trace it
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_a_model_fx_cannot_trace_warns_once_and_still_trains():
    torch.manual_seed(0)
    model = Untraceable()
    with pytest.warns(UserWarning) as rec:
        method = ConstrainedL0(model, 0.5, structured=True)
    # One for the BatchNorms, one for the layer selection (every layer, as before).
    messages = [str(w.message) for w in rec]
    assert len([m for m in messages if re.search(r"torch.fx cannot trace Untraceable .*not gated.*shift β.*purge", m)]) == 1
    assert len([m for m in messages if "structured default cannot tell" in m]) == 1
    assert len(messages) == 2
    assert [n for n, _ in method.layers] == ["conv", "fc"]
    assert type(model.bn) is nn.BatchNorm2d
    opt = torch.optim.SGD(method.param_groups(lr=0.1))
    before = model.fc.weight.detach().clone()
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(4, 3, 5, 5)), torch.tensor([0, 1, 0, 1])) + method.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
    assert not torch.equal(model.fc.weight, before)


def test_models_without_a_conv_batchnorm_pair_are_not_traced(monkeypatch):
    from sparsekern.nn import batchnorm

    def no_trace(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(batchnorm._Tracer, "trace", no_trace)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    ConstrainedL0(mlp, 0.5, structured=True)  # a Linear's gates are on its inputs: nothing to gate
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    ConstrainedL0(cnn, 0.5, structured=True)
    assert gate_batchnorms(cnn) == []


# ---- training, export and purge of a ResNet-20


def close_conv1_gates(method):
    """Every other channel of each block's conv1 closed (log α at the clamp's floor, where
    the median gate is 0 and P(z ≠ 0) = 5%); returns {name: closed}."""
    closed = {}
    with torch.no_grad():
        for name, layer in method.layers:
            if name.startswith("layer") and name.endswith("conv1"):
                layer.weight_log_alpha[::2] = math.log(0.01)
                closed[name] = torch.arange(layer.out_channels) % 2 == 0
    return closed


def train_steps(model, method, opt, n, seed=3, check_stats=False):
    """n steps; check_stats: every step, each gated BatchNorm's statistics moved exactly
    on the channels its conv left open in that forward."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, GatedBatchNorm2d)]
    for _ in range(n):
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
        out = model(x)
        if check_stats:
            for bn, (mean, var) in zip(bns, before):
                open_ = bn.open_channels()
                assert torch.equal(bn.running_mean[~open_], mean[~open_])
                assert torch.equal(bn.running_var[~open_], var[~open_])
                assert not torch.equal(bn.running_var[open_], var[open_])
        loss = F.cross_entropy(out, y) + method.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()


def test_resnet20_purge_removes_every_closed_conv1_channel():
    model = resnet()
    method = ConstrainedL0(model, 0.5, structured=True)
    closed = close_conv1_gates(method)
    opt = torch.optim.Adam(method.param_groups(lr=1e-3, mask_lr=0.05))
    train_steps(model, method, opt, 4, check_stats=True)
    exported = method.export(purge=True, example_input=(1, 3, 8, 8))
    removed, kept = exported.stats["removed_channels"], exported.stats["kept_zero_channels"]
    for name, shut in closed.items():
        # Closed gates only (the others' median gates are open after 4 steps): each removed.
        eval_closed = int((model.get_submodule(name).mask.gate(model.get_submodule(name)).reshape(-1) == 0).sum())
        assert removed[name] == eval_closed >= int(shut.sum()), name
        assert name not in kept, name
    assert all(type(m) is not GatedBatchNorm2d for m in exported.model.modules())
    model.eval(), exported.model.eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(exported.model(x), model(x), rtol=1e-5, atol=1e-5)


def test_non_affine_batchnorm_purges_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    method = ConstrainedL0(model, 0.5, structured=True, include=["0"])
    with torch.no_grad():
        model[0].weight_log_alpha[[1, 4]] = CLOSED
        # A closed channel's mean below 0: without the gate its eval output is relu(−μ/σ) > 0.
        model[1].running_mean.fill_(-1.0)
    opt = torch.optim.SGD(method.param_groups(lr=0.05))
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(4, 3, 5, 5)), torch.tensor([0, 1, 0, 1])) + method.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
    exported = export(model, purge=True, example_input=(1, 3, 5, 5))
    assert exported.stats["removed_channels"] == {"0": 2} and exported.stats["kept_zero_channels"] == {}
    model.eval(), exported.model.eval()
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_resumes_bit_exactly():
    model = resnet(0)
    method = ConstrainedL0(model, 0.5, structured=True, dual_lr=0.5)
    close_conv1_gates(method)
    opt = torch.optim.Adam(method.param_groups(lr=1e-3, mask_lr=0.05))
    train_steps(model, method, opt, 2, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "method": method.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = resnet(5)
    restored = ConstrainedL0(fresh, 0.5, structured=True, dual_lr=0.5)
    fresh.load_state_dict(saved["model"])
    restored.load_state_dict(saved["method"])
    fresh_opt = torch.optim.Adam(restored.param_groups(lr=1e-3, mask_lr=0.05))
    fresh_opt.load_state_dict(saved["opt"])
    train_steps(model, method, opt, 3, seed=2)
    train_steps(fresh, restored, fresh_opt, 3, seed=2)
    a, b = model.state_dict(), fresh.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_deepcopy_and_pickled_model_keep_their_own_pairs():
    model = resnet()
    method = ConstrainedL0(model, 0.5, structured=True)
    close_conv1_gates(method)
    x = torch.randn(3, 3, 8, 8)
    model(x)  # a training forward: the masks hold their open channels
    state = copy.deepcopy(model.state_dict())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        model.load_state_dict(state)  # as the copy was made
        for (name, bn), (_, mine) in zip(((n, m) for n, m in other.named_modules() if isinstance(m, GatedBatchNorm2d)),
                                         ((n, m) for n, m in model.named_modules() if isinstance(m, GatedBatchNorm2d))):
            assert bn.conv is not mine.conv and any(bn.conv is m for m in other.modules()), name
        assert set(other.state_dict()) == set(model.state_dict())
        # The copy draws the same gates and computes the same (its BatchNorms follow its convs).
        for m in (model, other):
            for _, layer in sparse_modules(m):
                layer.mask.offset = 100
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
        other.eval(), model.eval()
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
        model.train()


def conv_bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_torch_compile_trains_without_recompiling_and_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    def run(compiled):
        model = conv_bn_net()
        method = ConstrainedL0(model, 0.5, structured=True)
        with torch.no_grad():
            model[0].weight_log_alpha[:2] = CLOSED
            model[3].weight_log_alpha[0] = CLOSED
        opt = torch.optim.SGD(method.param_groups(lr=0.05, weight_decay=1e-4), momentum=0.9)
        counter = CompileCounterWithBackend("aot_eager")
        forward = torch.compile(model, backend=counter) if compiled else model
        gen = torch.Generator().manual_seed(4)
        losses = []
        for _ in range(5):
            x, y = torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 10, (8,), generator=gen)
            opt.zero_grad()
            loss = F.cross_entropy(forward(x), y) + method.penalty()
            loss.backward()
            opt.step()
            method.step()
            losses.append(loss.detach())
        return model, torch.stack(losses), counter.frame_count

    torch._dynamo.reset()
    eager, eager_losses, _ = run(False)
    model, losses, frames = run(True)
    assert frames == 1
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (key, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
    # The closed channels' statistics stayed at their init under compile too.
    assert torch.equal(model[1].running_mean[:2], torch.zeros(2)) and torch.equal(model[1].running_var[:2], torch.ones(2))
    assert torch.equal(model[4].running_var[:1], torch.ones(1)) and not torch.equal(model[4].running_var, torch.ones(8))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant):
    from torch.utils.checkpoint import checkpoint

    def build():
        model = conv_bn_net()
        ConstrainedL0(model, 0.5, structured=True)
        for i, (_, layer) in enumerate(sparse_modules(model)):
            layer.mask.seed = 20 + i
        return model

    plain, ckpt = build(), build()
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):  # two micro-batches: gradient accumulation
        x = torch.randn(4, 1, 6, 6, generator=gen, requires_grad=reentrant)
        plain(x).square().sum().backward()
        h = checkpoint(ckpt[:3], x, use_reentrant=reentrant)
        h = checkpoint(ckpt[3:6], h, use_reentrant=reentrant)
        ckpt[6:](h).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_dpf_structured_with_plain_batchnorms_feeds_back_through_them():
    """DPF(mode="structured", gate_batchnorms=False), the authors' code: through an
    ordinary BatchNorm a pruned channel outputs relu(β) and its filter's gradient is
    alive (γ/√eps times the output's); gated (the default, test_nn_batchnorm_dpf.py) it
    outputs 0 whatever the filter holds, and that gradient is exactly 0."""
    model = conv_bn_net()
    method = DPF(model, sparsity=0.3, mode="structured", ignore_classifier=True, gate_batchnorms=False)
    pruned = ~model[0].weight_mask.flatten(1).any(1)
    assert pruned.any() and type(model[1]) is nn.BatchNorm2d
    with torch.no_grad():
        model[1].bias.fill_(0.5)  # a pruned channel outputs β: past the ReLU when β > 0
    F.cross_entropy(model(torch.randn(8, 1, 6, 6)), torch.arange(8)).backward()
    assert model[0].weight.grad[pruned].abs().sum() > 0


def test_eval_normalises_a_gated_input_as_training_does():
    """Running statistics are the ungated output's: in eval a channel at median gate z sees
    z·y and normalises it with z·μ, z²·σ², so its output is z times the plain BatchNorm's
    of y (up to eps), as batch statistics make it in training. Kept as statistics of z·y, eval's
    median gate met statistics gathered under other sampled z: near-chance eval accuracy
    (README, structured L0 and BatchNorm)."""
    conv, bn = gated_pair(channels=7, dtype=torch.float64)
    plain = nn.BatchNorm2d(7, dtype=torch.float64)
    plain.load_state_dict(bn.state_dict())
    conv.eval(), bn.eval(), plain.eval()
    z = conv.mask.gate(conv).reshape(-1)
    assert ((z > 0) & (z < 1)).any()
    y = torch.randn(4, 7, 5, 5, dtype=torch.float64) * bn.running_var.sqrt()[:, None, None] + bn.running_mean[:, None, None]
    got = bn(y * z[:, None, None])
    want = plain(y) * z[:, None, None]
    # eps = 1e-5 against z²σ² ≥ 0.25·0.5: a relative difference below 1e-4
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_log_alpha_learns_through_the_batchnorm_as_the_reference():
    """The output is z·BN(y), so the task's gradient reaches log α (a BatchNorm after the
    gated conv normalises away the z its weights carry: without z on the output, as in the
    authors' code, log α's task gradient came through eps alone). float64 reference: z from
    the op at the same (seed, offset), conv and batch-statistics BatchNorm by hand."""
    conv, bn = gated_pair(channels=7)
    conv.train(), bn.train()
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    g = torch.randn(3, 7, 5, 6, dtype=torch.float64)
    (bn(conv(x)) * g).sum().backward()
    log_alpha = conv.weight_log_alpha.detach().clone().requires_grad_()
    z = hard_concrete_gates(log_alpha, conv.mask.seed, conv.mask.offset - 1)
    y = F.conv2d(x, conv.weight.detach() * z, conv.bias.detach() * z.reshape(-1), padding=1)
    mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    zc = z.reshape(1, -1, 1, 1)
    out = ((y - mean) / torch.sqrt(var + bn.eps) * bn.weight.detach().view_as(zc) + bn.bias.detach().view_as(zc)) * zc
    (out * g).sum().backward()
    torch.testing.assert_close(conv.weight_log_alpha.grad, log_alpha.grad, rtol=1e-9, atol=1e-12)
    z = z.detach().reshape(-1)
    between = (z > 0) & (z < 1)
    assert between.any() and conv.weight_log_alpha.grad.reshape(-1)[between].abs().min() > 1e-6


def test_other_normalisation_layers_after_gated_convs_warn_and_stay():
    """Only nn.BatchNorm2d is gated: a SyncBatchNorm (or InstanceNorm, FrozenBatchNorm2d)
    after a structured hard-concrete conv turns a closed channel into its shift, so
    sparsify says which, once, and leaves them as they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SyncBatchNorm(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"not gated, as only nn.BatchNorm2d is: 1 \(SyncBatchNorm\)") as rec:
        # Every conv: purge cannot pass a SyncBatchNorm, so the default would gate none.
        ConstrainedL0(model, 0.5, structured=True, include="*")
    assert len([w for w in rec if "not gated" in str(w.message)]) == 1
    assert type(model[1]) is nn.SyncBatchNorm and type(model[4]) is GatedBatchNorm2d


def test_a_step_warns_when_convert_sync_batchnorm_replaced_the_gated_batchnorms():
    """nn.SyncBatchNorm.convert_sync_batchnorm after attaching builds plain SyncBatchNorms
    from the gated ones (it takes any BatchNorm): the first step names the convs whose
    closed channels now come out as a shift."""
    model = resnet()
    method = ConstrainedL0(model, 0.5, structured=True)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not gated_names(model)
    opt = torch.optim.SGD(method.param_groups(lr=0.1))
    model.eval()  # SyncBatchNorm trains on CUDA only; the check needs a forward, not training
    loss = model(torch.randn(2, 3, 8, 8)).sum() + method.penalty()
    loss.backward()
    opt.step()
    with pytest.warns(UserWarning, match=r"gated BatchNorms after layer1\.0\.conv1, layer1\.1\.conv1, layer1\.2\.conv1 and 6 more "
                                         r"were replaced since sparsify .*convert_sync_batchnorm"):
        method.step()
