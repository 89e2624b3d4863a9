"""dpf_mask_update / mask_flips / mask_iou: masks, kept counts and flips against the
reference on odd, zero-size and non-contiguous tensors, the tie rule, the exact-count
path through magnitude_masks, the IoU formula, opcheck, torch.compile, bad inputs."""
import pytest
import torch

from sparsekern import ops
from sparsekern.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def rand(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def random_masks(tensors, seed=1, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(t.shape, generator=g) < p).to(t.device) for t in tensors]


def layers(device, dtype=torch.float32):
    """Odd shapes, a zero-size tensor and two non-contiguous views."""
    return [
        rand(37, 53, device=device, dtype=dtype),
        rand(0, 5, device=device, dtype=dtype),
        rand(20, 30, device=device, dtype=dtype, seed=2).t(),
        rand(7, 3, 3, 3, device=device, dtype=dtype, seed=3)[:, 1:],
        rand(101, device=device, dtype=dtype, seed=4),
    ]


def check_against_reference(weights, prev, threshold):
    masks, nnz, flips = ops.dpf_mask_update(weights, prev, threshold)
    ref_masks, ref_nnz, ref_flips = reference.dpf_mask_update(weights, prev, threshold)
    assert [m.shape for m in masks] == [w.shape for w in weights]
    for m, w in zip(masks, weights):
        assert m.dtype == torch.bool and m.is_contiguous() and m.device == w.device
    assert all(torch.equal(m, r) for m, r in zip(masks, ref_masks))
    assert nnz.dtype == flips.dtype == torch.int64 and nnz.shape == flips.shape == (len(weights),)
    assert torch.equal(nnz, ref_nnz) and torch.equal(flips, ref_flips)
    # The definitions, independently of the reference.
    for m, w, p, k, f in zip(masks, weights, prev, nnz.tolist(), flips.tolist()):
        assert torch.equal(m, w.abs().float() > threshold)
        assert k == int(m.sum()) and f == int((m ^ p).sum())
    return masks, nnz, flips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 0.4, 1.3, 10.0])
def test_update_matches_reference(device, dtype, threshold):
    weights = layers(device, dtype)
    check_against_reference(weights, random_masks(weights), torch.tensor(threshold, device=device))


def test_ties_at_the_threshold_are_pruned(device):
    w = torch.tensor([-0.5, 0.5, 0.25, 0.75, -0.75, 0.0], device=device)
    prev = [torch.ones(6, dtype=torch.bool, device=device)]
    masks, nnz, _ = check_against_reference([w], prev, torch.tensor(0.5, device=device))
    assert masks[0].tolist() == [False, False, False, True, True, False] and nnz.tolist() == [2]


def test_float64_weights_compare_in_float32(device):
    # 0.5 + 1e-12 rounds to 0.5 in float32: a tie, pruned (as magnitude_threshold ranks).
    w = torch.tensor([0.5 + 1e-12, 0.5 + 1e-6], dtype=torch.float64, device=device)
    masks, _, _ = ops.dpf_mask_update([w], [torch.zeros(2, dtype=torch.bool, device=device)], 0.5)
    assert masks[0].tolist() == [False, True]


def test_threshold_from_magnitude_threshold(device):
    weights = layers(device)
    prev = [torch.ones(w.shape, dtype=torch.bool, device=device) for w in weights]
    threshold = ops.magnitude_threshold(weights, 0.7)
    masks, nnz, flips = check_against_reference(weights, prev, threshold)
    total = sum(w.numel() for w in weights)
    # Random normals have no ties, so "> threshold" keeps exactly the target count;
    # from all-True masks every pruned weight is a flip.
    assert int(nnz.sum()) == total - ops.n_prune_for(0.7, total)
    assert torch.equal(flips, torch.tensor([w.numel() for w in weights], device=device) - nnz)


def test_exact_count_path_with_ties(device):
    # Heavy ties: "> threshold" falls short of the target; magnitude_masks + mask_flips is exact.
    weights = [torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0, 3.0], device=device), torch.ones(4, 3, device=device).t()]
    prev = random_masks(weights, seed=5)
    new_masks = ops.magnitude_masks(weights, 0.5)
    nnz, flips = ops.mask_flips(new_masks, prev)
    assert int(nnz.sum()) == 18 - 9
    ref_nnz, ref_flips = reference.mask_flips(new_masks, prev)
    assert torch.equal(nnz, ref_nnz) and torch.equal(flips, ref_flips)
    assert flips.tolist() == [int((m ^ p).sum()) for m, p in zip(new_masks, prev)]
    _, short_nnz, _ = ops.dpf_mask_update(weights, prev, ops.magnitude_threshold(weights, 0.5))
    assert int(short_nnz.sum()) == 2  # only the 2.0 and the 3.0 are above the tied 1.0


def test_mask_flips_non_contiguous_and_empty(device):
    empty = torch.zeros(0, 2, dtype=torch.bool, device=device)
    new = [random_masks([torch.empty(30, 20)], seed=6)[0].to(device).t(), empty]
    prev = [random_masks([torch.empty(20, 30)], seed=7)[0].to(device), empty.clone()]
    nnz, flips = ops.mask_flips(new, prev)
    assert nnz.tolist() == [int(new[0].sum()), 0] and flips.tolist() == [int((new[0] ^ prev[0]).sum()), 0]


def test_iou_from_counts(device):
    weights = layers(device)
    prev, new = random_masks(weights, seed=8, p=0.3), random_masks(weights, seed=9, p=0.6)
    nnz_prev, _ = ops.mask_flips(prev, prev)
    nnz_new, flips = ops.mask_flips(new, prev)
    iou = ops.mask_iou(nnz_prev, nnz_new, flips)
    for i, (a, b) in enumerate(zip(prev, new)):
        union = int((a | b).sum())
        expected = int((a & b).sum()) / union if union else 1.0
        assert iou[i].item() == pytest.approx(expected, abs=1e-12)
    # Global IoU from summed counts.
    inter = sum(int((a & b).sum()) for a, b in zip(prev, new))
    union = sum(int((a | b).sum()) for a, b in zip(prev, new))
    assert ops.mask_iou(nnz_prev.sum(), nnz_new.sum(), flips.sum()).item() == pytest.approx(inter / union)
    # Python ints count too (as before): IoU of {0, 1, 2} and {1, 2, 3} is 2 / 4.
    assert ops.mask_iou(3, torch.tensor(3), 2).item() == 0.5


def test_weights_requiring_grad_and_python_threshold(device):
    w = rand(9, 4, device=device).requires_grad_()
    masks, nnz, flips = ops.dpf_mask_update([w], [torch.ones(9, 4, dtype=torch.bool, device=device)], 0.5)
    assert not masks[0].requires_grad and torch.equal(masks[0], w.detach().abs() > 0.5)
    assert nnz.device == w.device


def test_no_host_sync_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("host syncs are only observable on CUDA")
    weights = layers(device)
    prev = random_masks(weights)
    threshold = torch.tensor(0.4, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks, _, _ = ops.dpf_mask_update(weights, prev, threshold)
        ops.mask_flips(masks, prev)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_opcheck(device):
    weights = [rand(37, 53, device=device), rand(5, 3, device=device, dtype=torch.float16)]
    prev = random_masks(weights)
    threshold = torch.tensor(0.4, device=device)
    torch.library.opcheck(torch.ops.sparsekern.dpf_mask_update.default, (weights, prev, threshold))
    torch.library.opcheck(torch.ops.sparsekern.mask_flips.default, (random_masks(weights, seed=3), prev))


def test_compile_fullgraph():
    def update(weights, prev, threshold):
        masks, nnz, flips = ops.dpf_mask_update(weights, prev, threshold)
        nnz_prev, _ = ops.mask_flips(prev, prev)
        return masks, ops.mask_iou(nnz_prev, nnz, flips)

    compiled = torch.compile(update, backend="aot_eager", fullgraph=True)
    weights = layers("cpu")
    prev = random_masks(weights)
    threshold = torch.tensor(0.4)
    (masks, iou), (ref_masks, ref_iou) = compiled(weights, prev, threshold), update(weights, prev, threshold)
    assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks)) and torch.equal(iou, ref_iou)


W = [torch.zeros(3, 4)]
P = [torch.ones(3, 4, dtype=torch.bool)]
T = torch.tensor(0.1)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: ops.dpf_mask_update(W[0], P, T), TypeError, "weights"),
        (lambda: ops.dpf_mask_update([], [], T), ValueError, "weights"),
        (lambda: ops.dpf_mask_update([1.0], P, T), TypeError, r"weights\[0\]"),
        (lambda: ops.dpf_mask_update([torch.zeros(3, 4, dtype=torch.int32)], P, T), ValueError, r"weights\[0\]"),
        (lambda: ops.dpf_mask_update(W, P + P, T), ValueError, "prev_masks"),
        (lambda: ops.dpf_mask_update(W, [torch.ones(3, 4)], T), ValueError, r"prev_masks\[0\]"),
        (lambda: ops.dpf_mask_update(W, [torch.ones(4, 3, dtype=torch.bool)], T), ValueError, r"prev_masks\[0\]"),
        (lambda: ops.dpf_mask_update(W, [P[0].to("meta")], T), ValueError, r"prev_masks\[0\]"),
        (lambda: ops.dpf_mask_update(W + [W[0].to("meta")], P + P, T), ValueError, r"weights\[1\]"),
        (lambda: ops.dpf_mask_update(W, P, T.to("meta")), ValueError, "threshold"),
        (lambda: ops.dpf_mask_update(W, P, torch.tensor([0.1])), ValueError, "threshold"),
        (lambda: ops.dpf_mask_update(W, P, T.double()), ValueError, "threshold"),
        (lambda: ops.dpf_mask_update(W, P, "0.1"), TypeError, "threshold"),
        (lambda: ops.dpf_mask_update(W, P, True), TypeError, "threshold"),
        (lambda: ops.mask_flips([torch.ones(3, 4)], P), ValueError, r"new_masks\[0\]"),
        (lambda: ops.mask_flips(P, P[0]), TypeError, "prev_masks"),
        (lambda: ops.mask_flips(P, []), ValueError, "prev_masks"),
        (lambda: ops.mask_flips(P, [torch.ones(2, dtype=torch.bool)]), ValueError, r"prev_masks\[0\]"),
        (lambda: ops.mask_iou([3], torch.tensor([2]), torch.tensor([1])), TypeError, "nnz_prev"),
        (lambda: ops.mask_iou(torch.tensor([3]), [2], torch.tensor([1])), TypeError, "nnz_new"),
        (lambda: ops.mask_iou(torch.tensor([3]), torch.tensor([2]), (1,)), TypeError, "flips"),
    ],
)
def test_bad_inputs_raise(call, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        call()
