"""The op layer: public functions backed by torch.library custom ops, each with a
reference (reference.py), CPU and CUDA/Triton kernels, a fake impl and autograd."""
from . import reference
from .threshold import magnitude_masks, magnitude_threshold, n_prune_for

__all__ = ["reference", "magnitude_threshold", "magnitude_masks", "n_prune_for"]
