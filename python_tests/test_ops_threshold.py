"""magnitude_threshold / magnitude_masks: exact equality with torch.kthvalue over the
concatenation, exact pruned counts, the tie order, every bad input, opcheck, compile."""
import math

import pytest
import torch

from sparsekern import ops
from sparsekern.ops import reference


def kthvalue_oracle(tensors, sparsity):
    """The issue's definition, verbatim."""
    flat = torch.cat([t.detach().abs().flatten().float() for t in tensors])
    n_prune = round(sparsity * flat.numel())
    if n_prune == 0:
        return torch.zeros((), device=flat.device)
    return torch.kthvalue(flat.cpu(), n_prune).values


def check_exact(tensors, sparsity):
    """Threshold bit-equal to the oracle; masks equal to the reference's tie order, with
    exactly n_prune False, and every pruned |x| <= threshold <= every kept |x|."""
    expected = kthvalue_oracle(tensors, sparsity)
    got = ops.magnitude_threshold(tensors, sparsity)
    assert got.dtype == torch.float32 and got.dim() == 0 and got.device == tensors[0].device
    assert got.cpu().view(torch.int32) == expected.view(torch.int32), (got, expected)

    n_prune = ops.n_prune_for(sparsity, sum(t.numel() for t in tensors))
    masks, thr = ops.magnitude_masks(tensors, sparsity, return_threshold=True)
    assert thr.cpu().view(torch.int32) == expected.view(torch.int32)
    ref_masks, _ = reference.magnitude_masks(tensors, n_prune)
    assert [m.shape for m in masks] == [t.shape for t in tensors]
    assert all(m.dtype == torch.bool for m in masks)
    assert sum(int((~m).sum()) for m in masks) == n_prune
    for m, r, t in zip(masks, ref_masks, tensors):
        assert torch.equal(m, r)
        mag = t.detach().abs().float()
        assert bool((mag[~m] <= got).all()) and bool((mag[m] >= got).all())


def rand(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


SPARSITIES = [0.0, 0.1, 0.5, 0.9, 0.999, 1 - 1e-9]


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_random_mixed_shapes(device, sparsity):
    tensors = [rand(37, 53, device=device), rand(7, device=device, seed=1), rand(3, 5, 2, 2, device=device, seed=2)]
    check_exact(tensors, sparsity)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_low_and_double_precision(device, dtype, sparsity):
    # fp16/bf16 produce many exact ties; float64 rounds to float32 like the oracle.
    tensors = [rand(64, 33, device=device, dtype=dtype), rand(100, device=device, dtype=dtype, seed=3)]
    check_exact(tensors, sparsity)


def test_mixed_dtypes(device):
    tensors = [rand(40, device=device, dtype=torch.float16), rand(50, device=device), rand(9, device=device, dtype=torch.bfloat16)]
    for s in (0.2, 0.7):
        check_exact(tensors, s)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75, 0.99])
def test_many_ties(device, sparsity):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randint(-3, 4, (41, 17), generator=g).float().to(device) for _ in range(4)]
    check_exact(tensors, sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.5, 0.999])
def test_all_equal(device, sparsity):
    tensors = [torch.full((13, 11), -2.5, device=device), torch.full((29,), 2.5, device=device)]
    check_exact(tensors, sparsity)


def test_zeros_and_negative_zero(device):
    t = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, -1.0, 0.0, 2.0], device=device)
    for s in (0.1, 0.3, 0.5, 0.7):
        check_exact([t, -t.flip(0)], s)


def test_subnormals_huge_and_tiny(device):
    tiny = torch.finfo(torch.float32).tiny
    values = torch.tensor(
        [tiny / 2**20, tiny / 2, tiny, 1e-38, 1e-30, 1.0, 3e38, -3e38, torch.finfo(torch.float32).max,
         -tiny / 2**23, 0.0, 1e-45],
        dtype=torch.float32,
    ).to(device)
    for s in (0.1, 0.25, 0.5, 0.75, 0.9):
        check_exact([values, values[::2]], s)
    half = torch.tensor([6e-8, 1e-7, 6.1e-5, 65504.0, -6e-8, 0.0], dtype=torch.float16, device=device)
    check_exact([half], 0.5)


def test_single_element(device):
    check_exact([torch.tensor([-3.0], device=device)], 0.0)
    check_exact([torch.tensor([-3.0], device=device)], 0.6)  # round(0.6) == 1: prunes it


def test_two_thousand_tiny_tensors(device):
    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(3, generator=g).to(device) for _ in range(2000)]
    for s in (0.33, 0.9):
        check_exact(tensors, s)


def test_non_contiguous_views(device):
    base = rand(40, 60, device=device, seed=11)
    tensors = [base.t(), base[::3, 1::2], rand(8, 9, 10, device=device).permute(2, 0, 1)[:, :, ::2]]
    assert not any(t.is_contiguous() for t in tensors)
    for s in (0.2, 0.8):
        check_exact(tensors, s)


def test_zero_size_tensors(device):
    empty = torch.empty(0, 5, device=device)
    check_exact([empty, rand(30, device=device), empty], 0.5)
    assert ops.magnitude_threshold([empty], 0.5).item() == 0.0
    masks = ops.magnitude_masks([empty, empty], 0.9)
    assert [m.shape for m in masks] == [empty.shape, empty.shape]


def test_meta_tensors_give_shapes():
    """Shape inference on the meta device, as nn layers allow (the finite check's item()
    raised RuntimeError there)."""
    w = [torch.empty(10, 10, device="meta"), torch.empty(3, device="meta", dtype=torch.float16)]
    t = ops.magnitude_threshold(w, 0.5)
    assert t.device.type == "meta" and t.shape == () and t.dtype == torch.float32
    masks, t = ops.magnitude_masks(w, 0.5, return_threshold=True)
    assert [m.shape for m in masks] == [(10, 10), (3,)] and all(m.dtype == torch.bool for m in masks)


def test_large_tensor_crosses_chunks(device):
    # More than one CPU chunk (2^16) and one CUDA block (8192) per tensor.
    t = rand(300_001, device=device, seed=13).half().float()  # fp16 values: ties across chunks
    for s in (0.5, 0.95):
        check_exact([t, rand(70_000, device=device)], s)


def test_gradients_do_not_flow_and_inputs_untouched(device):
    w = rand(10, 10, device=device).requires_grad_()
    before = w.detach().clone()
    thr = ops.magnitude_threshold([w], 0.5)
    masks = ops.magnitude_masks([w], 0.5)
    assert not thr.requires_grad and not masks[0].requires_grad
    assert torch.equal(w.detach(), before)


def test_generator_input_accepted(device):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).to(device)
    thr = ops.magnitude_threshold((p for p in model.parameters()), 0.5)
    assert thr == kthvalue_oracle(list(model.parameters()), 0.5).to(device)


@pytest.mark.parametrize(
    "tensors, sparsity, error, match",
    [
        ([], 0.5, ValueError, "must not be empty"),
        ([torch.ones(3)], 1.0, ValueError, "sparsity"),
        ([torch.ones(3)], -0.1, ValueError, "sparsity"),
        ([torch.ones(3)], float("nan"), ValueError, "sparsity"),
        ([torch.ones(3)], "0.5", TypeError, "sparsity"),
        ([torch.ones(3)], True, TypeError, "sparsity"),
        ([torch.tensor([1.0, float("nan")])], 0.5, ValueError, "NaN or Inf"),
        ([torch.tensor([1.0, float("inf")])], 0.5, ValueError, "NaN or Inf"),
        ([torch.tensor([1.0, -float("inf")])], 0.0, ValueError, "NaN or Inf"),
        ([torch.ones(3, dtype=torch.int64)], 0.5, ValueError, "floating point"),
        ([torch.ones(3, dtype=torch.bool)], 0.5, ValueError, "floating point"),
        ([torch.ones(3), torch.ones(2, device="meta")], 0.5, ValueError, "one device"),
        (torch.ones(3), 0.5, TypeError, "list of tensors"),
        ([torch.ones(3), 2.0], 0.5, TypeError, r"tensors\[1\]"),
        (5, 0.5, TypeError, "list of tensors"),
    ],
)
@pytest.mark.parametrize("fn", [ops.magnitude_threshold, ops.magnitude_masks])
def test_bad_inputs_raise(fn, tensors, sparsity, error, match):
    with pytest.raises(error, match=match):
        fn(tensors, sparsity)


def test_cpp_op_validates_too():
    # C++ users reach the op without the Python wrapper: it checks its own arguments.
    with pytest.raises(ValueError, match="n_prune"):
        torch.ops.sparsekern.magnitude_threshold([torch.ones(3)], 4)
    with pytest.raises(ValueError, match="floating point"):
        torch.ops.sparsekern.magnitude_masks([torch.ones(3, dtype=torch.int32)], 1)


def test_non_finite_gives_nan_without_check(device):
    t = torch.tensor([1.0, float("nan"), 2.0], device=device)
    assert math.isnan(ops.magnitude_threshold([t], 0.3, check_finite=False).item())
    masks = ops.magnitude_masks([t], 0.3, check_finite=False)
    assert bool(masks[0].all())


def test_opcheck(device):
    tensors = [rand(37, 53, device=device), rand(11, device=device, dtype=torch.float16)]
    for n_prune in (0, 1, 500, 1971):
        torch.library.opcheck(torch.ops.sparsekern.magnitude_threshold.default, (tensors, n_prune))
        torch.library.opcheck(torch.ops.sparsekern.magnitude_masks.default, (tensors, n_prune))


def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def prune(w1, w2):
        masks, thr = torch.ops.sparsekern.magnitude_masks([w1, w2], 600)
        return w1 * masks[0], w2 * masks[1], thr

    w1, w2 = rand(37, 20, device=device), rand(50, device=device, seed=2)
    p1, p2, thr = prune(w1, w2)
    ref_masks, ref_thr = reference.magnitude_masks([w1, w2], 600)
    assert torch.equal(p1, w1 * ref_masks[0]) and torch.equal(p2, w2 * ref_masks[1])
    assert thr == ref_thr


def test_exact_count_form(device):
    tensors = [rand(37, 53, device=device), rand(11, device=device, seed=4)]
    for n in (0, 1, 700, 1972):
        masks = ops.magnitude_masks(tensors, n_prune=n)
        ref, ref_thr = reference.magnitude_masks(tensors, n)
        assert all(torch.equal(m, r) for m, r in zip(masks, ref))
        assert torch.equal(ops.magnitude_threshold(tensors, n_prune=n).cpu(), ref_thr.cpu())


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, TypeError, "exactly one"),
    ({"sparsity": 0.5, "n_prune": 3}, TypeError, "exactly one"),
    ({"n_prune": -1}, ValueError, "n_prune"),
    ({"n_prune": 4}, ValueError, "at most the 3"),
    ({"n_prune": 1.5}, TypeError, "n_prune"),
    ({"n_prune": 1, "check_finite": "no"}, TypeError, "check_finite"),
])
@pytest.mark.parametrize("fn", [ops.magnitude_threshold, ops.magnitude_masks])
def test_exact_count_bad_inputs(fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn([torch.ones(3)], **kwargs)


def test_return_threshold_must_be_a_bool():
    # A truthy non-bool was taken as True: return_threshold="no" returned (masks, threshold).
    with pytest.raises(TypeError, match="`return_threshold`"):
        ops.magnitude_masks([torch.ones(3)], 0.5, return_threshold="no")
