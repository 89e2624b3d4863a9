"""What every method's state_dict / load_state_dict and argument checks share: a state
that does not fit is refused before anything changes, state_dict() hands out copies, and
no argument accepts ±inf."""
import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

import sparsekern
from conftest import HAS_CUDA
from methods_helpers import (_reload, assert_untouched, mlp, one_thread, sgd, small_batches, small_mlp,  # noqa: F401
                             snapshot, train)
from sparsekern.methods import (DPF, IMP, ConcaveRegularization, ConstrainedL0, ContinuousSparsification,
                                GradualMagnitude, OneShot, PenalizedL0)

METHODS = {
    "imp": lambda m: IMP(m),
    "oneshot": lambda m: OneShot(m, sparsity=0.5),
    "gmp": lambda m: GradualMagnitude(m, sparsity=0.5, end_iteration=10, frequency=2),
    "dpf": lambda m: DPF(m, sparsity=0.5, end_iteration=10, period=2),
    "cs": lambda m: ContinuousSparsification(m, epochs_per_round=2),
    "concave": lambda m: ConcaveRegularization(m),
    "concave-sigmoid": lambda m: ConcaveRegularization(m, reparameterization="sigmoid", epochs_per_round=2),
    "l0": lambda m: ConstrainedL0(m, target_density=0.5),
    "l0-layerwise": lambda m: ConstrainedL0(m, target_density={"0": 0.5, "2": 0.5}),
    "l0-structured": lambda m: ConstrainedL0(m, target_density=0.5, structured=True),
    "l0-penalized": lambda m: PenalizedL0(m, lam=1e-3),
}


def trained(name, seed=0):
    model = small_mlp(seed)
    method = METHODS[name](model)
    train(model, method, sgd(method), small_batches(3))
    return model, method


def everything(model, method):
    """The model's tensors and the method's whole state, cloned (state_dict copies)."""
    return {k: v.clone() for k, v in model.state_dict().items()}, _reload(method.state_dict())


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def damaged(state, where, value):
    """A deep copy of `state` with the entry at path `where` set to `value`."""
    state = _reload(state)
    node = state
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value(node[where[-1]]) if callable(value) else value
    return state


def first_mask_key(state):
    return sorted(state["masks"])[0]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_round_trip_through_a_checkpoint_restores_everything(name):
    model, method = trained(name)
    state = _reload(method.state_dict())
    fresh_model, fresh = trained(name, seed=1)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(state)
    assert_same(everything(model, method), everything(fresh_model, fresh))


def shrink(t):
    return t[..., :-1].clone() if t.dim() else t.reshape(1).clone()


# (name of the method, path into the state, replacement, error, words of the message)
DAMAGE = [
    ("imp", ("masks", "KEY"), shrink, ValueError, "shape"),
    ("imp", ("masks", "KEY"), lambda t: t.tolist(), TypeError, "tensor"),
    ("imp", ("masks", "2.weight_mask"), None, ValueError, "missing"),
    ("imp", ("iteration",), -1, ValueError, "iteration"),
    ("imp", ("round",), 1.5, ValueError, "round"),
    ("imp", ("rewind_state", "0.weight"), shrink, ValueError, "rewind_state"),
    ("imp", ("rewind_state", "extra.weight"), lambda _: torch.zeros(1), ValueError, "unexpected"),
    ("imp", ("extra", "history"), None, ValueError, "extra"),
    ("gmp", ("masks", "KEY"), shrink, ValueError, "shape"),
    ("gmp", ("extra", "history"), lambda h: None, TypeError, "history"),
    ("dpf", ("extra", "history"), lambda h: h + [3], TypeError, "history"),
    ("dpf", ("masks", "KEY"), shrink, ValueError, "shape"),
    ("cs", ("extra", "beta"), math.inf, ValueError, "beta"),
    ("cs", ("extra", "beta"), 0.5, ValueError, "beta"),
    ("cs", ("extra", "ticket"), 1, TypeError, "ticket"),
    ("cs", ("masks", "KEY"), shrink, ValueError, "shape"),
    ("concave", ("extra", "alive", "0"), shrink, ValueError, "alive"),
    ("concave", ("extra", "alive"), lambda a: {"zzz": a["0"], "2": a["2"]}, ValueError, "alive"),
    ("l0", ("extra", "multipliers"), lambda t: torch.zeros(2), ValueError, "multipliers"),
    ("l0", ("extra", "defect"), lambda t: torch.zeros(3), ValueError, "defect"),
    ("l0", ("extra", "multipliers"), lambda t: torch.full_like(t, -1.0), ValueError, "multipliers"),
    ("l0", ("extra", "multipliers"), lambda t: torch.full_like(t, math.nan), ValueError, "multipliers"),
    ("l0", ("noise",), {}, ValueError, "noise"),
    ("l0", ("noise", "0"), (1, 2.5), ValueError, "noise"),
    # The last layer's pair: the mask setters refused it only after the earlier layers loaded.
    ("l0", ("noise", "2"), (0, -5), ValueError, "noise"),
    ("l0", ("noise", "2"), (2**63, 0), ValueError, "noise"),
    ("l0-structured", ("masks", "KEY"), lambda t: torch.zeros(16, 8), ValueError, "shape"),
    # Values of the wrong kind: a float 0.5 copied into a bool mask became True.
    ("imp", ("masks", "KEY"), lambda t: torch.full(t.shape, 0.5), TypeError, "must be bool"),
    ("dpf", ("masks", "KEY"), lambda t: t.float(), TypeError, "must be bool"),
    ("cs", ("masks", "KEY"), lambda t: t > 0, TypeError, "floating point"),
    ("cs", ("masks", "KEY"), lambda t: torch.full_like(t, math.nan), ValueError, "NaN"),
    ("l0", ("masks", "KEY"), lambda t: torch.full_like(t, math.nan), ValueError, "NaN"),
    ("concave", ("masks", "KEY"), lambda t: t.long(), TypeError, "floating point"),
]


@pytest.mark.parametrize("name, where, value, error, words", DAMAGE)
def test_a_state_that_does_not_fit_changes_nothing(name, where, value, error, words):
    model, method = trained(name)
    state = method.state_dict()
    where = tuple(first_mask_key(state) if k == "KEY" else k for k in where)
    if value is None:  # remove the entry
        state = _reload(state)
        node = state
        for key in where[:-1]:
            node = node[key]
        del node[where[-1]]
    else:
        if where[0] == "rewind_state" and state["rewind_state"] is not None and where[1] not in state["rewind_state"]:
            state["rewind_state"][where[1]] = torch.zeros(1)
        state = damaged(state, where, value)
    train(model, method, sgd(method), small_batches(2, seed=5))  # state now differs from `state`
    before = everything(model, method)
    with pytest.raises(error, match=words):
        method.load_state_dict(state)
    assert_same(before, everything(model, method))


def test_a_constraint_set_that_differs_changes_nothing():
    # A model-wise L0 state into a layer-wise method: the groups differ; the masks fit.
    _, modelwise = trained("l0")
    model, layerwise = trained("l0-layerwise", seed=1)
    before = everything(model, layerwise)
    with pytest.raises(ValueError, match="constraints"):
        layerwise.load_state_dict(modelwise.state_dict())
    assert_same(before, everything(model, layerwise))


@pytest.mark.parametrize("damage, error, words", [(shrink, ValueError, "shape"),
                                                   (lambda t: t.float(), TypeError, "must be bool")])
def test_a_ticket_state_that_does_not_fit_leaves_the_search_phase_as_it_was(damage, error, words):
    # A ticket-phase state makes a search-phase CS binarize its layers first: only after
    # the whole state has passed its checks.
    model, cs = trained("cs")
    cs.to_ticket()
    state = damaged(cs.state_dict(), ("masks", "0.weight_mask"), damage)
    fresh_model, fresh = trained("cs", seed=1)
    before = everything(fresh_model, fresh)
    with pytest.raises(error, match=words):
        fresh.load_state_dict(state)
    assert not fresh.ticket and all(layer.mask.name == "sigmoid" for _, layer in fresh.layers)
    assert_same(before, everything(fresh_model, fresh))


@pytest.mark.parametrize("name", ["imp", "cs", "concave"])
def test_state_dict_hands_out_a_copy_of_the_rewind_point(name):
    model, method = trained(name)
    saved = {k: v.clone() for k, v in method._rewind_state.items()}
    for v in method.state_dict()["rewind_state"].values():
        v.zero_()  # a caller editing its checkpoint dict
    assert_same(saved, method._rewind_state)


@pytest.mark.parametrize("name", ["imp", "cs", "concave"])
def test_the_rewind_point_follows_a_model_converted_to_bfloat16(name):
    """IMP(model) then model.to(torch.bfloat16): the float32 rewind point was kept (and
    checkpointed) beside the bfloat16 model, twice its memory. From the next step on it has
    the model's dtype; the rewind writes the same values (the conversion rounds them as
    copy_ did)."""
    model = small_mlp()
    method = METHODS[name](model)
    want = {k: v.to(torch.bfloat16) for k, v in method._rewind_state.items()}
    model.to(torch.bfloat16)
    train(model, method, sgd(method), [(x.to(torch.bfloat16), y) for x, y in small_batches(2)])
    assert {v.dtype for v in method._rewind_state.values()} == {torch.bfloat16}
    assert {v.dtype for v in method.state_dict()["rewind_state"].values()} == {torch.bfloat16}
    assert_same(want, method._rewind_state)


@pytest.mark.parametrize("move", ["meta", "overwrite"])
@pytest.mark.parametrize("name", ["imp", "cs", "concave"])
def test_the_rewind_point_follows_a_model_whose_parameters_are_replaced(name, move):
    """model.to() gives each weight a new Parameter object when it moves to or from the
    meta device (a real move that needs no GPU), or under
    torch.__future__.set_overwrite_module_params_on_conversion(True). step() compared the
    saved copies with the Parameter it had held since the rewind point: it never saw the
    move, the copies stayed on the old device or in the old dtype, and the old weight was
    kept alive."""
    model = small_mlp()
    method = METHODS[name](model)
    old = weakref.ref(method.layers[0][1].weight)
    if move == "meta":
        model.to("meta")
        data = [(x.to("meta"), y.to("meta")) for x, y in small_batches(1)]
    else:
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            model.double()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        data = [(x.double(), y) for x, y in small_batches(1)]
    train(model, method, sgd(method), data)
    live = method.layers[0][1].weight
    assert live is not old()
    assert {(v.device, v.dtype) for v in method._rewind_state.values()} == {(live.device, live.dtype)}
    gc.collect()
    assert old() is None


@pytest.mark.parametrize("name", ["imp", "cs"])
def test_a_float32_checkpoint_loads_into_a_bfloat16_model_in_its_dtype(name):
    """A float32 run's checkpoint resumed in bfloat16: the loaded rewind point takes the
    model's dtype (it stayed float32), and a rewind restores what the float32 run's does,
    rounded."""
    model, method = trained(name)
    state = _reload(method.state_dict())
    half_model = small_mlp(seed=1).to(torch.bfloat16)
    half = METHODS[name](half_model)
    half_model.load_state_dict(model.state_dict())
    half.load_state_dict(state)
    assert {v.dtype for v in half.state_dict()["rewind_state"].values()} == {torch.bfloat16}
    half.rewind()
    method.rewind()
    for k, v in half._rewound().items():
        assert torch.equal(v, method._rewound()[k].to(torch.bfloat16))


def test_param_groups_leave_weight_decay_to_the_optimiser_unless_given():
    method = IMP(mlp())
    opt = torch.optim.SGD(method.param_groups(lr=0.1), weight_decay=1e-4)
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    opt = torch.optim.SGD(method.param_groups(lr=0.1, weight_decay=0.0), weight_decay=1e-4)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    cs = ContinuousSparsification(mlp(), epochs_per_round=2)
    opt = torch.optim.SGD(cs.param_groups(lr=0.1), weight_decay=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]  # masks: never decayed


INFINITE = [
    (ContinuousSparsification, {"epochs_per_round": 2, "lam": math.inf}, "lam"),
    (ContinuousSparsification, {"epochs_per_round": 2, "s0": -math.inf}, "s0"),
    (ContinuousSparsification, {"epochs_per_round": 2, "s0": -1000.0}, "s0"),
    (ContinuousSparsification, {"epochs_per_round": 2, "beta_final": math.inf}, "beta_final"),
    (ContinuousSparsification, {"epochs_per_round": 2, "mask_lr": math.inf}, "mask_lr"),
    (ConcaveRegularization, {"eps": math.inf}, "eps"),
    (ConcaveRegularization, {"lam": math.inf}, "lam"),
    (ConstrainedL0, {"target_density": 0.5, "dual_lr": math.inf}, "dual_lr"),
    (ConstrainedL0, {"target_density": 0.5, "gate_lr": math.inf}, "gate_lr"),
    (ConstrainedL0, {"target_density": 0.5, "l2_weight": math.inf}, "l2_weight"),
    (PenalizedL0, {"lam": math.inf}, "lam"),
    (PenalizedL0, {"lam": 10 ** 400}, "lam"),
]


@pytest.mark.parametrize("cls, kwargs, words", INFINITE)
def test_infinite_arguments_are_refused_before_the_model_changes(cls, kwargs, words):
    model = mlp()
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=words):
        cls(model, **kwargs)
    assert [type(m) for m in model.modules()] == types


@pytest.mark.parametrize("kwargs", [{"lr": math.inf}, {"lr": 0.1, "weight_decay": math.inf},
                                    {"lr": 0.1, "mask_lr": -math.inf}])
def test_param_groups_refuse_infinite_rates(kwargs):
    with pytest.raises(ValueError, match=next(k for k, v in kwargs.items() if math.isinf(v))):
        ConstrainedL0(mlp(), target_density=0.5).param_groups(**kwargs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_model_with_sparse_layers_of_another_kind_is_refused_before_it_changes(name):
    # Such layers are taken over as they are: a DPF on a sigmoid layer failed with an
    # AttributeError after swapping the other layers, an L0 on a binary one at penalty().
    probe = small_mlp()
    kind = METHODS[name](probe).layers[0][1].mask.name
    model = sparsekern.sparsify(small_mlp(), mask="binary" if kind != "binary" else "sigmoid", include=["0"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="mask kind"):
        METHODS[name](model)
    assert_untouched(model, before)


def test_sparse_layers_of_the_methods_own_kind_are_taken_over():
    model = sparsekern.sparsify(small_mlp(), mask="binary", include=["0"])
    method = IMP(model)
    assert [name for name, _ in method.layers] == ["0", "2"]


@pytest.mark.parametrize("make", [
    lambda m: OneShot(m, sparsity=0.5),
    lambda m: DPF(m, sparsity=0.5),
    lambda m: DPF(m, sparsity=0.5, mode="structured"),
    lambda m: GradualMagnitude(m, sparsity=0.5, end_iteration=10, initial_sparsity=0.2),
])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_methods_that_rank_at_construction_refuse_nonfinite_weights_before_the_swap(make, bad):
    # The ranking op raised only after sparsify had swapped every layer, naming `tensors`.
    model = small_mlp()
    with torch.no_grad():
        model[0].weight[1, 3] = bad  # not the classifier, which DPF leaves dense
    types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"NaN or Inf weights in \['0'\]"):
        make(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == types


META_EXTRA = {  # a structured DPF, and concave rounds that leave dead entries (alive False)
    "dpf-structured": lambda m: DPF(m, sparsity=0.5, end_iteration=10, period=2, mode="structured"),
    "concave-fraction": lambda m: ConcaveRegularization(m, prune_fraction=0.3),
    "concave-sigmoid-fraction": lambda m: ConcaveRegularization(m, prune_fraction=0.3, reparameterization="sigmoid",
                                                                epochs_per_round=2),
}


@pytest.mark.parametrize("name", sorted(METHODS) + sorted(META_EXTRA))
def test_a_method_attached_on_the_meta_device_resumes_from_a_checkpoint(name):
    """A model built under torch.device("meta") takes every method (DPF read its first
    mask's counts off the meta device and raised; GMP, the structured DPF and the concave
    regularisers asked a meta tensor for a value). After to_empty() its state is loaded
    from a checkpoint and training goes on exactly as in the run that wrote it; before that
    load, step() refuses (the masks and rewind point were never computed: after
    to_empty() they are uninitialised memory)."""
    make = METHODS.get(name) or META_EXTRA[name]
    model = small_mlp(0)
    method = make(model)
    train(model, method, sgd(method), small_batches(3))
    if method.round_based:  # dead entries (concave), a pruned level (IMP), a soft reset (CS)
        method.end_round()
    if name.endswith("fraction"):
        assert not all(bool(a.all()) for a in method.alive.values())
    ckpt = _reload({"model": model.state_dict(), "method": method.state_dict()})

    with torch.device("meta"):
        meta_model = small_mlp(1)
    meta = make(meta_model)
    assert [n for n, _ in meta.layers] == [n for n, _ in method.layers]
    assert all(getattr(layer, s).is_meta for _, layer in meta.layers for s in layer.mask.state_names)
    meta_model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match=r"meta device.*load_state_dict"):
        meta.step()
    assert meta.iteration == 0
    meta_model.load_state_dict(ckpt["model"])
    meta.load_state_dict(ckpt["method"])
    assert_same(everything(model, method), everything(meta_model, meta))

    data = small_batches(3, seed=7)
    train(model, method, sgd(method), data)
    train(meta_model, meta, sgd(meta), data)
    if method.round_based:
        method.end_round()
        meta.end_round()
    assert_same(everything(model, method), everything(meta_model, meta))
    assert method.density() == meta.density()


@pytest.mark.parametrize("name", ["l0", "l0-structured", "l0-penalized"])
def test_a_hard_concrete_method_attaches_under_the_meta_default_device(name):
    """Model and method built inside `with torch.device("meta")`: the gates' seed was drawn
    as a meta tensor, which has no value to read (the constructor raised), and the noise
    counter started on meta. Materialised and loaded, it trains on as the run it came from."""
    model, method = trained(name)
    ckpt = _reload({"model": model.state_dict(), "method": method.state_dict()})
    with torch.device("meta"):
        meta_model = small_mlp(1)
        meta = METHODS[name](meta_model)
    assert all(not layer.mask._counter.is_meta for _, layer in meta.layers)
    meta_model.to_empty(device="cpu")
    meta_model.load_state_dict(ckpt["model"])
    meta.load_state_dict(ckpt["method"])
    data = small_batches(2, seed=7)
    train(model, method, sgd(method), data)
    train(meta_model, meta, sgd(meta), data)
    assert_same(everything(model, method), everything(meta_model, meta))


def test_a_checkpoint_loaded_while_the_model_is_still_meta_does_not_count():
    # The values went nowhere (copies into meta tensors): training after to_empty() is
    # refused as if nothing had been loaded.
    model, method = trained("imp")
    with torch.device("meta"):
        meta_model = small_mlp(1)
    meta = IMP(meta_model)
    meta.load_state_dict(_reload(method.state_dict()))
    meta_model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="meta device"):
        meta.step()


def test_constrained_l0_penalty_on_a_materialised_meta_model_says_what_to_load():
    # Its multipliers have no value before the load: "Cannot copy out of meta tensor" before.
    with torch.device("meta"):
        model = small_mlp(1)
    method = ConstrainedL0(model, target_density=0.5)
    model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match=r"ConstrainedL0 was attached to a model on the meta device"):
        method.penalty()


@pytest.mark.parametrize("convert", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()],
                         ids=["to(bfloat16)", "half", "double"])
@pytest.mark.parametrize("name", ["cs", "concave", "l0", "l0-structured", "l0-penalized"])
def test_a_penalty_right_after_a_dtype_conversion_is_the_converted_models(name, convert):
    """The layers keep their forward's penalty term (ForwardTerm) while its mask parameter
    is unchanged; Module._apply swaps a parameter's data without bumping its version, so a
    penalty() between a forward and model.to(...) took the old dtype's term for current, and
    its backward raised (mask_apply: `weight` must be float32, got BFloat16)."""
    model = small_mlp(0)
    method = METHODS[name](model)
    model(small_batches(1)[0][0])
    convert(model)
    fresh = copy.deepcopy(method)  # copies keep no term: computed afresh
    got, expected = method.penalty(), fresh.penalty()
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    got.backward()
    expected.backward()
    for (_, layer), (_, ref) in zip(method.layers, fresh.layers):
        for p, r in zip(layer.mask_parameters(), ref.mask_parameters()):
            assert p.grad.dtype == p.dtype and torch.equal(p.grad, r.grad)


# ---- a model moved after the method was attached (method = M(model); model.to(...)):
# every tensor the method and the layers' mask kinds hold outside the model's parameters
# and buffers must follow it.
MOVED = {**METHODS, **META_EXTRA, "concave-log": lambda m: ConcaveRegularization(m, regularizer="log")}


def held_tensors(method):
    """(path, tensor) for every tensor the method and its layers' mask kinds hold in their
    own attributes, through dicts, lists, tuples and slotted objects (ForwardTerm). Modules
    are left out: Module._apply moves their parameters and buffers itself."""
    found, seen = [], set()

    def walk(obj, path):
        if id(obj) in seen or isinstance(obj, torch.nn.Module):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append((path, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif hasattr(type(obj), "__slots__"):
            for slot in type(obj).__slots__:
                walk(getattr(obj, slot, None), f"{path}.{slot}")

    walk(vars(method), type(method).__name__)
    for name, layer in method.layers:
        walk(vars(layer.mask), f"{name}.mask")
    return found


def _trained_a_round(name, model):
    """The method attached and trained a little, past a round's end when it has rounds:
    its state exists (rewind point, dead concave entries, L0 multipliers, noise offsets)."""
    method = MOVED[name](model)
    train(model, method, sgd(method), small_batches(2))
    if method.round_based:
        method.end_round()
        train(model, method, sgd(method), small_batches(1, seed=5))
    return method


def _step_reads_no_values(method):
    # GMP's and DPF's mask updates count weights on the host; the meta device has no values.
    return not isinstance(method, (GradualMagnitude, DPF))


@pytest.mark.parametrize("name", sorted(MOVED))
def test_method_state_follows_a_move_to_another_device(name):
    """model.to("meta") is a real device move (Module._apply) that needs no GPU. The mask
    kinds' tensors follow at once (MaskKind.after_apply); the method's own follow by the
    first use after the move (L0's ε and λ at penalty(), the rewind point at step()), and
    the concave alive masks are the layers' buffers. ConcaveRegularization's alive stayed on
    the old device (its forward masked gradients across devices), as did the hard-concrete
    noise counters until a training forward, and, moved to meta, the rewind point."""
    model = small_mlp(0)
    method = _trained_a_round(name, model)
    model.to("meta")
    assert all(layer.mask._forward_term is None for _, layer in method.layers)
    early = [(path, t.device) for path, t in held_tensors(method) if ".mask" in path and not t.is_meta]
    assert not early
    if isinstance(method, ConcaveRegularization):
        assert all(a.is_meta for a in method.alive.values())
    x, y = small_batches(1, seed=9)[0]
    (F.cross_entropy(model(x.to("meta")), y.to("meta")) + method.penalty()).backward()
    if _step_reads_no_values(method):
        method.step()
    held = held_tensors(method)
    assert held or isinstance(method, (OneShot, GradualMagnitude, DPF))  # the magnitude methods hold none
    assert [(path, t.device) for path, t in held if not t.is_meta] == []


@pytest.mark.parametrize("name", sorted(MOVED))
def test_training_goes_on_after_a_dtype_conversion(name):
    """The same move within the CPU, which keeps values: float32 to float64 after a round,
    then training and another round's end. Every floating tensor the method and the mask
    kinds hold is float64 afterwards (the rewind point, L0's ε, λ and density defect, kept
    penalty terms)."""
    model = small_mlp(0)
    method = _trained_a_round(name, model)
    model.to(torch.float64)
    data = [(x.double(), y) for x, y in small_batches(3, seed=11)]
    train(model, method, sgd(method), data[:2])
    if method.round_based:
        method.end_round()
    train(model, method, sgd(method), data[2:])
    floats = [(path, t.dtype) for path, t in held_tensors(method) if t.is_floating_point()]
    assert [(path, dtype) for path, dtype in floats if dtype != torch.float64] == []
    assert all(layer.weight.dtype == torch.float64 for _, layer in method.layers)
    assert all(math.isfinite(v) for v in method.density()["layers"].values())


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", sorted(MOVED))
def test_a_method_attached_on_the_cpu_trains_on_after_model_to_cuda(name):
    """method = M(model); model.to("cuda"): training and the rounds' ends go on on the GPU
    with every tensor of the method and its mask kinds there (ConcaveRegularization masked
    CUDA gradients with its CPU alive masks)."""
    model = small_mlp(0)
    method = _trained_a_round(name, model)
    model.to("cuda")
    data = [(x.cuda(), y.cuda()) for x, y in small_batches(3, seed=11)]
    train(model, method, sgd(method), data[:2])
    if method.round_based:
        method.end_round()
    train(model, method, sgd(method), data[2:])
    assert [(path, t.device) for path, t in held_tensors(method) if t.device.type != "cuda"] == []
    if isinstance(method, ConcaveRegularization):
        assert all(a.is_cuda for a in method.alive.values())
        if name.endswith("fraction"):  # entries pruned for good, their gradients masked on the GPU
            assert any(not bool(a.all()) for a in method.alive.values())
    state = method.state_dict()
    assert all(t.is_cuda for t in (state["rewind_state"] or {}).values())
