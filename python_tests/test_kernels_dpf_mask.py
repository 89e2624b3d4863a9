"""The DPF mask Triton kernels (kernels/dpf_mask.py), called through their launchers on
small CPU tensors under TRITON_INTERPRET=1 (or on CUDA), against the reference: masks,
kept counts and flips for odd, zero-size and non-contiguous tensors in every float dtype.

A small BLOCK makes each tensor span several programs, so the per-tensor counts are the
sum of many atomic adds with a ragged last block.
"""
import pytest
import torch

from conftest import HAS_CUDA
from sparsekern.kernels import dpf_mask as kdpf
from sparsekern.ops import reference

pytestmark = pytest.mark.triton

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def small_block(monkeypatch):
    monkeypatch.setattr(kdpf, "BLOCK", 128)


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


def random_masks(tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(t.shape, generator=g) < 0.5).to(DEV) for t in tensors]


def layers(dtype):
    return [
        rand(37, 53, dtype=dtype),
        rand(0, 5, dtype=dtype),
        rand(20, 30, dtype=dtype, seed=2).t(),
        rand(7, 3, 3, 3, dtype=dtype, seed=3)[:, 1:],
        rand(1, dtype=dtype, seed=4),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.6, 5.0])
def test_update_matches_reference(dtype, threshold):
    weights = layers(dtype)
    prev = random_masks(weights)
    thr = torch.tensor(threshold, device=DEV)
    masks, nnz, flips = kdpf.update(weights, prev, thr)
    ref_masks, ref_nnz, ref_flips = reference.dpf_mask_update(weights, prev, thr)
    assert all(m.dtype == torch.bool and m.shape == w.shape for m, w in zip(masks, weights))
    assert all(torch.equal(m, r) for m, r in zip(masks, ref_masks))
    assert torch.equal(nnz, ref_nnz) and torch.equal(flips, ref_flips)


def test_ties_pruned_and_threshold_read_on_device():
    # Values exactly at the threshold are pruned; the threshold arrives as a device tensor.
    w = torch.tensor([0.5, -0.5, 0.5000001, 0.25] * 100, device=DEV)
    prev = [torch.ones(400, dtype=torch.bool, device=DEV)]
    masks, nnz, flips = kdpf.update([w], prev, torch.tensor(0.5, device=DEV))
    assert masks[0].tolist() == [False, False, True, False] * 100
    assert nnz.tolist() == [100] and flips.tolist() == [300]


def test_flips_matches_reference():
    shapes = [(37, 53), (0, 4), (30, 20)]
    new = random_masks([torch.empty(s) for s in shapes], seed=5)
    new[2] = new[2].t()  # non-contiguous
    prev = random_masks([torch.empty(m.shape) for m in new], seed=6)
    nnz, flips = kdpf.flips(new, prev)
    ref_nnz, ref_flips = reference.mask_flips(new, prev)
    assert torch.equal(nnz, ref_nnz) and torch.equal(flips, ref_flips)
    assert flips[1] == 0 and nnz[1] == 0
