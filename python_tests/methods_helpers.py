"""What the magnitude-method tests share (IMP, OneShot, GMP, DPF): tiny models, a
deterministic training loop, the "model untouched after a bad argument" snapshot and the
state_dict round-trip check. Not a test module (pytest collects test_*.py only)."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.ops import reference


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it single-threaded: the models are tiny, and on a
    shared 2-core machine intra-op threads only contend (10x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cnn(seed=0):
    """1604 prunable weights in three layers of different sizes, last layer a Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(128, 10))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def small_mlp(seed=0):
    """8 -> 16 -> 4: the smallest model with two masked layers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def small_batches(n=6, seed=123):
    """n batches of 16 (x, y) for small_mlp."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def batches(model, n, seed=123, size=8):
    """n (x, y) batches shaped for `model` (cnn: 1×8×8 images, mlp: 20 features)."""
    g = torch.Generator().manual_seed(seed)
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    shape = (size, 1, 8, 8) if isinstance(first, nn.Conv2d) else (size, 20)
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    return [(torch.randn(shape, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def sgd(method, lr=0.1):
    # Momentum and weight decay both move zeroed weights unless the method holds them at 0.
    return torch.optim.SGD(method.param_groups(lr=lr, weight_decay=1e-2), momentum=0.9)


def train(model, method, opt, data, each_step=None):
    for x, y in data:
        loss = F.cross_entropy(model(x), y) + method.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
        if each_step is not None:
            each_step()


def masks(method):
    return [layer.weight_mask.clone() for _, layer in method.layers]


def weights(method):
    return [layer.weight.detach().clone() for _, layer in method.layers]


def pruned(method):
    return sum(int((~layer.weight_mask).sum()) for _, layer in method.layers)


def total(method):
    return sum(layer.weight.numel() for _, layer in method.layers)


def reference_prune_remaining(ws, ms, n_prune):
    """The oracle for "prune n_prune of the remaining weights": the reference op on the
    kept values only, scattered back."""
    keep, _ = reference.magnitude_masks([w[m] for w, m in zip(ws, ms)], n_prune)
    out = []
    for m, k in zip(ms, keep):
        n = m.clone()
        n[m] = k
        out.append(n)
    return out


def snapshot(model):
    """Module types, parameter identities and the full state: what a rejected constructor
    must leave as it was."""
    return ([(n, type(m)) for n, m in model.named_modules()], [(n, id(p)) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_untouched(model, before):
    types, params, state = snapshot(model)
    assert types == before[0] and params == before[1]
    assert state.keys() == before[2].keys() and all(torch.equal(state[k], before[2][k]) for k in state)


def _reload(obj):
    # Through torch.save / torch.load(weights_only=True): a real checkpoint, so the state
    # must be plain tensors and Python containers.
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_roundtrip(make_model, make_method, data_before, continue_run):
    """Trains method A on data_before, checkpoints model + method + optimiser, restores
    them into a fresh model (different init) + method B, runs `continue_run(model, method,
    opt)` on both, and asserts identical weights, masks and method state, bit for bit."""
    model_a = make_model(0)
    a = make_method(model_a)
    opt_a = sgd(a)
    train(model_a, a, opt_a, data_before)
    ckpt = _reload({"model": model_a.state_dict(), "method": a.state_dict(), "opt": opt_a.state_dict()})

    model_b = make_model(1)
    b = make_method(model_b)
    opt_b = sgd(b)
    model_b.load_state_dict(ckpt["model"])
    b.load_state_dict(ckpt["method"])
    opt_b.load_state_dict(ckpt["opt"])

    continue_run(model_a, a, opt_a)
    continue_run(model_b, b, opt_b)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ma, mb = a.state_dict(), b.state_dict()
    assert ma["extra"] == mb["extra"]
    assert (ma["iteration"], ma["round"]) == (mb["iteration"], mb["round"])
    assert all(torch.equal(ma["masks"][k], mb["masks"][k]) for k in ma["masks"])
    return a, b
