"""GatedBatchNorm2d: the BatchNorm after a structured hard-concrete conv runs on the conv's
open channels only (closed: output exactly 0, running statistics unchanged), against a
float64 reference in train and eval, with and without affine parameters and running
statistics, gradients included; to_dense (a plain BatchNorm2d with the eval gate baked in)."""
import copy

import pytest
import torch
from torch import nn

from sparsekern.nn import GatedBatchNorm2d, SparseConv2d
from sparsekern.ops import hard_concrete_gates

CLOSED, OPEN = -20.0, 20.0  # log α far enough out that every sample is 0 / 1


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def reference(x, open_, bn, training):
    """float64: an ordinary BatchNorm on the open channels, 0 on the closed; returns
    (output, new running mean, new running var) (statistics None when not tracked)."""
    x = x.double()
    rm = None if bn.running_mean is None else bn.running_mean.detach().double().clone()
    rv = None if bn.running_var is None else bn.running_var.detach().double().clone()
    batch = training or rm is None
    if batch:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = rm, rv
    y = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
    if bn.affine:
        y = y * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    y = y * open_.double()[:, None, None]
    if training and bn.track_running_stats:
        n = x.numel() / x.shape[1]
        f = bn.momentum if bn.momentum is not None else 1.0 / (int(bn.num_batches_tracked) + 1)
        rm = torch.where(open_, (1 - f) * rm + f * mean.detach(), rm)
        rv = torch.where(open_, (1 - f) * rv + f * var.detach() * n / (n - 1), rv)
    return y, rm, rv


def drawn_open(conv):
    """The channels the conv's last training forward left open, from the op itself."""
    z = hard_concrete_gates(conv.weight_log_alpha.detach(), conv.mask.seed, conv.mask.offset - 1)
    return z.reshape(-1) != 0


CASES = [dict(affine=a, track=t, momentum=m) for a in (True, False) for t in (True, False) for m in (0.1, None)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_the_float64_reference_with_gradients(case, training):
    conv, bn = gated_pair(channels=7, **case)
    conv.train(training), bn.train(training)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):  # several steps: the running statistics carry over
        conv(torch.randn(3, 2, 5, 7, dtype=torch.float64, generator=gen))  # draws this forward's gates
        open_ = drawn_open(conv) if training else conv.mask.gate(conv).reshape(-1) != 0
        assert torch.equal(bn.open_channels(), open_)
        assert 0 < int(open_.sum()) < 7  # both kinds of channel
        # Any input, the closed channels' not zero: the gated BatchNorm zeroes them itself.
        x = (torch.randn(3, 7, 5, 7, dtype=torch.float64, generator=gen) * 2 + 0.5).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        ref_bn = copy.deepcopy(bn)
        for p in ref_bn.parameters():
            p.grad = None
        want, rm, rv = reference(x_ref, open_, ref_bn, training)
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
    assert list(dense.state_dict()) == list(bn.state_dict())
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
