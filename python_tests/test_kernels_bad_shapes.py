"""The Triton launchers refuse tensors whose shapes do not match: the kernels index every
tensor by one reference shape (the weight's, log alpha's, the new mask's), so a smaller one
was read out of bounds, silently (under TRITON_INTERPRET=1 values like -2.5e2 and -6.8e-41
came back; on a GPU, whatever lay past the buffer). The public functions check shapes
themselves; a torch.ops.sparsekern.* op called directly on CUDA tensors reaches the
launchers unchecked."""
import pytest
import torch

from conftest import HAS_CUDA
from sparsekern.kernels import dpf_mask as kdpf
from sparsekern.kernels import hard_concrete as khc
from sparsekern.kernels import masked_conv as kconv
from sparsekern.kernels import masked_linear as klin

pytestmark = pytest.mark.triton

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def t(*shape, dtype=torch.float32):
    return torch.rand(*shape, device=DEV).to(dtype)


OFF = torch.tensor(0, device=DEV)
CASES = {
    "dpf_update_prev_mask": (lambda: kdpf.update([t(5)], [t(3) > 0], t(())), r"`prev_masks\[0\]`"),
    "dpf_update_prev_masks_count": (lambda: kdpf.update([t(5), t(5)], [t(5) > 0], t(())), "`prev_masks`"),
    "dpf_update_threshold": (lambda: kdpf.update([t(5)], [t(5) > 0], t(0)), "`threshold`"),
    "dpf_flips_prev_mask": (lambda: kdpf.flips([t(5) > 0], [t(3) > 0]), r"`prev_masks\[0\]`"),
    "hc_backward_grad_z": (lambda: khc.backward(t(3), t(()), t(5), 0, OFF, 1, 2 / 3, -0.1, 1.1, True), "grad_z"),
    "hc_backward_grad_l0": (lambda: khc.backward(t(5), t(0), t(5), 0, OFF, 1, 2 / 3, -0.1, 1.1, True), "grad_l0"),
    "linear_x": (lambda: klin.masked_matmul(t(2, 3), t(4, 5), t(4, 5) > 0, None, "binary"), "`a`"),
    "linear_grad_input": (lambda: klin.masked_matmul(t(2, 5), t(4, 5), t(4, 5), None, "relaxed",
                                                     transpose_weight=False), "`a`"),
    "linear_bias": (lambda: klin.masked_matmul(t(2, 5), t(4, 5), t(4, 5), t(3), "relaxed"), "`bias`"),
    "linear_mask": (lambda: klin.masked_matmul(t(2, 5), t(4, 5), t(4, 3), None, "relaxed"), "`mask`"),
    "linear_grad_weight_grad_y": (lambda: klin.masked_linear_grad_weight(t(2, 3), t(2, 5), t(4, 5), t(4, 5),
                                                                         "relaxed"), "`grad_y`"),
    "linear_grad_weight_x": (lambda: klin.masked_linear_grad_weight(t(2, 4), t(3, 5), t(4, 5), t(4, 5),
                                                                    "relaxed"), "`x`"),
    "linear_grad_weight_mask": (lambda: klin.masked_linear_grad_weight(t(2, 4), t(2, 5), t(4, 5), t(2, 5),
                                                                       "relaxed"), "`mask`"),
    "conv_mask": (lambda: kconv.masked_weight(t(3, 2, 1, 1), t(2, 2, 1, 1), "relaxed"), "`mask`"),
    "conv_backward_grad": (lambda: kconv.masked_weight_backward(t(2, 2, 1, 1), t(3, 2, 1, 1), t(3, 2, 1, 1),
                                                                "relaxed"), "`grad_w_eff`"),
    "conv_backward_mask": (lambda: kconv.masked_weight_backward(t(3, 2, 1, 1), t(3, 2, 1, 1), t(3, 2),
                                                                "relaxed"), "`mask`"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_launchers_refuse_mismatched_shapes(name):
    call, label = CASES[name]
    with pytest.raises(ValueError, match=label):
        call()
