"""The op layer: public functions backed by torch.library custom ops, each with a
reference (reference.py), CPU and CUDA/Triton kernels, a fake impl and autograd."""
from . import reference
from .threshold import magnitude_masks, magnitude_threshold, n_prune_for
from .masked_linear import masked_linear
from .masked_conv import masked_conv2d_weight
from .mask_apply import zero_masked_
from .mask_l1 import sigmoid_mask_l1

__all__ = ["reference", "magnitude_threshold", "magnitude_masks", "n_prune_for"]
__all__ += ["masked_linear", "masked_conv2d_weight", "zero_masked_", "sigmoid_mask_l1"]
from .hard_concrete import hard_concrete_gates, hard_concrete_l0, hard_concrete_sample
from .hard_concrete_masked import hard_concrete_masked_weight
from .dpf_mask import dpf_mask_update, mask_flips, mask_iou

__all__ += ["hard_concrete_gates", "hard_concrete_l0", "hard_concrete_sample", "hard_concrete_masked_weight"]
__all__ += ["dpf_mask_update", "mask_flips", "mask_iou"]
