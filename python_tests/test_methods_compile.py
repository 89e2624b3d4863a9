"""Training under torch.compile: every method's model compiles once and then trains step
after step without recompiling (the hard-concrete noise offset, stepped every training
forward, once made dynamo recompile at every step and, after 8, silently run eagerly),
and the compiled steps match eager ones."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from methods_helpers import batches, cnn, one_thread  # noqa: F401 (fixture)
from sparsekern import methods as M
from sparsekern.nn.masks import HardConcreteMask

METHODS = {
    "imp": lambda m: M.IMP(m),
    "oneshot": lambda m: M.OneShot(m, sparsity=0.5),
    "gmp": lambda m: M.GradualMagnitude(m, sparsity=0.5, end_iteration=4, frequency=1),
    "dpf": lambda m: M.DPF(m, sparsity=0.5, period=2),
    "cs": lambda m: M.ContinuousSparsification(m, epochs_per_round=2),
    "concave": lambda m: M.ConcaveRegularization(m),
    "concave sigmoid": lambda m: M.ConcaveRegularization(m, reparameterization="sigmoid", epochs_per_round=2),
    "l0": lambda m: M.ConstrainedL0(m, 0.5),
    "l0 structured": lambda m: M.ConstrainedL0(m, 0.5, structured=True),
    "l0-penalized": lambda m: M.PenalizedL0(m, 1e-3),
}
STEPS = 5


def run(name, compiled, zero_grad_late=False):
    model = cnn()
    method = METHODS[name](model)
    opt = torch.optim.SGD(method.param_groups(lr=0.05, weight_decay=1e-4), momentum=0.9)
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, backend=counter) if compiled else model
    losses = []
    for i, (x, y) in enumerate(batches(model, STEPS)):
        if not zero_grad_late:
            opt.zero_grad()
        loss = F.cross_entropy(forward(x), y) + method.penalty()
        if zero_grad_late:  # the README's order: .grad exists during the forward
            opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()
        losses.append(loss.detach())
        if i == 1:
            method.end_epoch()  # the per-epoch β (CS, concave sigmoid) changes mid-run
    return model, torch.stack(losses), counter.frame_count


@pytest.mark.parametrize("zero_grad_late", [False, True], ids=["zero_grad first", "zero_grad after forward"])
@pytest.mark.parametrize("name", list(METHODS))
def test_compiled_training_compiles_once_and_matches_eager(name, zero_grad_late):
    torch._dynamo.reset()
    eager, eager_losses, _ = run(name, compiled=False, zero_grad_late=zero_grad_late)
    model, losses, frames = run(name, compiled=True, zero_grad_late=zero_grad_late)
    # zero_grad after the forward: the L0 forward notes log alpha's .grad (ForwardTerm)
    # and dynamo guards on it being None, so it compiles again, once, when .grad appears.
    assert frames == (2 if zero_grad_late and name.startswith("l0") else 1)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (key, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
    kinds = [m.mask for m in model.modules() if isinstance(getattr(m, "mask", None), HardConcreteMask)]
    assert all(mask.offset == STEPS for mask in kinds)  # one fresh noise draw per compiled step


def test_offset_is_an_int_outside_and_checked():
    mask = HardConcreteMask(seed=3)
    mask.offset = 7
    assert mask.offset == 7 and isinstance(mask.offset, int)
    with pytest.raises(TypeError, match="offset"):
        mask.offset = 1.0
    with pytest.raises(ValueError, match="offset"):
        mask.offset = -1
    assert mask.offset == 7


def test_mask_pickled_with_an_int_offset_loads():
    # torch.save(model) of a model built before the offset became a tensor.
    state = HardConcreteMask(seed=3).__getstate__()
    state.pop("_counter")
    state.pop("_last_offset")
    state["offset"] = 12
    old = HardConcreteMask.__new__(HardConcreteMask)
    old.__setstate__(state)
    assert old.offset == 12 and old.seed == 3
