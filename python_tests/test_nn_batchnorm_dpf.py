"""DPF's structured mode gates the BatchNorm after each selected conv by its filters
(StraightThroughMask(whole_channels=True)): a pruned filter's channel comes out of the
BatchNorm as exactly 0 with its running statistics unchanged (the float64 reference of
test_nn_batchnorm with z ∈ {0, 1}), its filter, γ and β get the gradient at that pruned
model (0), the mask's updates open and close channels as they go, and purge
removes every pruned channel of a trained ResNet-20 with outputs unchanged;
gate_batchnorms=False keeps the authors' plain BatchNorms."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import sparsify
from sparsekern.methods import DPF
from sparsekern.nn import GatedBatchNorm2d, SparseConv2d
from sparsekern.nn.masks import StraightThroughMask
from run_helpers import one_thread  # noqa: F401  (one_thread: a fixture)
from test_nn_batchnorm import conv_bn_net, gated_names, reference, resnet


def pruned_pair(channels=6, affine=True, track=True, seed=0):
    """A whole-channel straight-through conv with channels 0, 2, 3 pruned and the float64
    BatchNorm it gates, with non-trivial affine parameters and running statistics."""
    torch.manual_seed(seed)
    conv = SparseConv2d(2, channels, 3, padding=1, mask="straight_through", whole_channels=True, dtype=torch.float64)
    bn = nn.BatchNorm2d(channels, affine=affine, track_running_stats=track, dtype=torch.float64)
    with torch.no_grad():
        conv.weight_mask[[0, 2, 3]] = False
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
        if track:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return conv, GatedBatchNorm2d.from_dense(bn, conv)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_the_float64_reference_with_gradients(affine, track, training):
    conv, bn = pruned_pair(affine=affine, track=track)
    conv.train(training), bn.train(training)
    z = torch.tensor([0.0, 1, 0, 0, 1, 1], dtype=torch.float64)
    assert torch.equal(bn.channel_gates(), z) and torch.equal(bn.open_channels(), z.bool())
    x = torch.randn(4, 2, 5, 7, dtype=torch.float64)
    stats = copy.deepcopy(bn)
    y = conv(x)
    out = bn(y)
    assert torch.equal(out[:, [0, 2, 3]], torch.zeros_like(out[:, [0, 2, 3]]))
    # float64 reference: γ·z·x̂ + β·z; z = 0 normalises with batch (train) or zero running
    # statistics (eval): the pruned channels are all-zero anyway.
    x_ = y.detach()
    if training or not track:
        mean, var = x_.mean((0, 2, 3)), x_.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean * z, bn.running_var * z * z
    xhat = (x_ - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
    leaves = [nn.Parameter(p.detach().clone()) for p in (bn.weight, bn.bias)] if affine else None
    gamma, beta = (leaves[0] * z, leaves[1] * z) if affine else (z, torch.zeros_like(z))
    want = xhat * gamma[:, None, None] + beta[:, None, None]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if track:  # the statistics as test_nn_batchnorm's reference keeps them for z ∈ {0, 1}
        _, mean, var = reference(x_, z, stats, training)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    # No ReLU: the pruned channels' output gradient is alive, yet their γ, β and filter
    # get none (the gradient at the pruned model, where they are multiplied by 0).
    g = torch.randn_like(out)
    out.backward(g)
    if affine:
        want.backward(g)
        for p, t in zip((bn.weight, bn.bias), leaves):
            torch.testing.assert_close(p.grad, t.grad, rtol=1e-10, atol=1e-10)
        assert torch.equal(bn.bias.grad[[0, 2, 3]], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(conv.weight.grad[[0, 2, 3]], torch.zeros_like(conv.weight.grad[[0, 2, 3]]))
    assert conv.weight.grad[[1, 4, 5]].abs().sum() > 0


def test_dpf_structured_gates_the_blocks_first_batchnorms_and_keeps_the_state_dict():
    model = resnet()
    keys = set(model.state_dict())
    method = DPF(model, sparsity=0.5, mode="structured")
    assert gated_names(model) == [f"layer{s}.{b}.bn1" for s in (1, 2, 3) for b in range(3)]
    assert all(layer.mask.whole_channels for _, layer in method.layers)
    assert set(model.state_dict()) == keys | {f"{n}.weight_mask" for n, _ in method.layers}
    for s in (1, 2, 3):
        block = getattr(model, f"layer{s}")[0]
        assert block.bn1.conv is block.conv1 and block.conv1.mask.batchnorm_gated
        # The mask pruned channels whole, and the BatchNorm closes exactly those.
        assert torch.equal(block.bn1.open_channels(), block.conv1.weight_mask.flatten(1).all(1))


@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_unstructured_modes_and_gate_batchnorms_false_leave_them_plain(mode):
    model = resnet()
    DPF(model, sparsity=0.5, mode=mode)
    assert gated_names(model) == []
    model = resnet()
    method = DPF(model, sparsity=0.5, mode="structured", gate_batchnorms=False)
    assert gated_names(model) == [] and not any(layer.mask.whole_channels for _, layer in method.layers)


def test_bad_gate_batchnorms_raises_before_the_model_changes():
    model = conv_bn_net()
    with pytest.raises(TypeError, match="gate_batchnorms"):
        DPF(model, sparsity=0.5, mode="structured", gate_batchnorms="no")
    assert not any(isinstance(m, (SparseConv2d, GatedBatchNorm2d)) for m in model.modules())
    with pytest.raises(TypeError, match="whole_channels"):
        StraightThroughMask(whole_channels=1)


def test_sparsify_with_whole_channels_gates_and_repr_says_so():
    model = conv_bn_net()
    sparsify(model, mask="straight_through", whole_channels=True, include=["0"])
    assert type(model[1]) is GatedBatchNorm2d and type(model[4]) is nn.BatchNorm2d
    assert "straight_through(whole_channels=True)" in repr(model[0])
    plain = conv_bn_net()
    sparsify(plain, mask="straight_through")
    assert gated_names(plain) == [] and "straight_through()" in repr(plain[0])


def test_pickle_of_a_straight_through_mask_from_before_the_option_reads_false():
    mask = StraightThroughMask()
    del mask.__dict__["whole_channels"]  # as pickled before the option existed
    assert not copy.deepcopy(mask).whole_channels


def test_mask_updates_open_and_close_the_batchnorm_channels():
    # A filter the ranking brings back passes through its BatchNorm again at once.
    model = conv_bn_net()
    method = DPF(model, sparsity=0.4, mode="structured", period=1, include=["0", "3"])
    conv, bn = model[0], model[1]
    before = bn.open_channels().clone()
    assert not before.all()
    with torch.no_grad():  # swap the norms of a pruned and a kept filter
        i, j = int((~before).nonzero()[0]), int(before.nonzero()[0])
        conv.weight[[i, j]] = conv.weight[[j, i]].clone()
    F.cross_entropy(model(torch.randn(4, 1, 6, 6)), torch.arange(4)).backward()
    method.step()  # no optimiser step: the swapped norms alone decide the next mask
    now = bn.open_channels()
    assert now[i] and not now[j]
    model.eval()
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        h = bn(conv(x))
    assert torch.equal(h[:, j], torch.zeros_like(h[:, j])) and h[:, i].abs().sum() > 0


def sgd(method):
    return torch.optim.SGD(method.param_groups(lr=0.05, weight_decay=5e-4), momentum=0.9)


def train(model, method, steps, seed=0, opt=None):
    gen = torch.Generator().manual_seed(seed)
    opt = opt or sgd(method)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
    return opt


def shifted_resnet():
    """resnet() with every BatchNorm's β at 0.1: β = 0 (the init) stays 0 on a channel
    pruned from the start (relu's gradient at 0 is 0), where a plain BatchNorm's output
    relu(β) is 0 too; trained longer, β moves before its filter is pruned."""
    model = resnet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(0.1)
    return model


def pruned_channels(method):
    return {n: int((~layer.weight_mask.flatten(1).any(1)).sum()) for n, layer in method.layers
            if isinstance(layer, SparseConv2d)}


def test_resnet20_purge_removes_every_pruned_channel():
    model = shifted_resnet()
    method = DPF(model, sparsity=0.5, mode="structured", period=2)
    train(model, method, 5)
    convs = {n: layer for n, layer in method.layers if isinstance(layer, SparseConv2d)}
    pruned = pruned_channels(method)
    # The global ranking takes some layers whole (here the downsampling blocks' conv1, 32
    # and 64 filters); purge keeps one zero channel of such a layer, and only that.
    whole = {n for n, c in pruned.items() if c == convs[n].out_channels}
    assert sum(pruned.values()) > 50 and whole and len(whole) < len(pruned)
    exported = method.export(purge=True, example_input=(1, 3, 8, 8))
    assert exported.stats["kept_zero_channels"] == {n: 1 for n in whole}
    assert exported.stats["removed_channels"] == {n: c - (n in whole) for n, c in pruned.items()}
    model.eval(), exported.model.eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(exported.model(x), model(x), rtol=1e-5, atol=1e-5)
    # The authors' plain BatchNorms: the pruned channels output relu(β) > 0, a constant
    # the padded conv2 cannot absorb, so purge keeps them (and they are not zero).
    plain = shifted_resnet()
    method = DPF(plain, sparsity=0.5, mode="structured", period=2, gate_batchnorms=False)
    train(plain, method, 5)
    removed = method.export(purge=True, example_input=(1, 3, 8, 8)).stats["removed_channels"]
    assert sum(removed.values()) < sum(pruned_channels(method).values()) / 2


def test_checkpoint_round_trip_resumes_bit_exactly():
    model = resnet(0)
    method = DPF(model, sparsity=0.5, mode="structured", period=2)
    opt = train(model, method, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "method": method.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = resnet(5)
    restored = DPF(fresh, sparsity=0.5, mode="structured", period=2)
    fresh.load_state_dict(saved["model"])
    restored.load_state_dict(saved["method"])
    fresh_opt = sgd(restored)
    fresh_opt.load_state_dict(saved["opt"])
    train(model, method, 3, seed=2, opt=opt)
    train(fresh, restored, 3, seed=2, opt=fresh_opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert gated_names(fresh) == gated_names(model)
