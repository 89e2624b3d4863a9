"""sparsekern: fused kernels and pruning methods for training sparse neural networks."""
from . import _extension
from . import ops
from ._extension import HAS_EXTENSION
from .nn import SparseConv2d, SparseLinear, SparseMultiheadAttention, export, report, sparsify
from . import methods
from .cpu_allocator import tune_cpu_allocator

__all__ = ["ops", "methods", "HAS_EXTENSION", "SparseLinear", "SparseConv2d", "SparseMultiheadAttention", "sparsify", "export", "report"]
__all__ += ["tune_cpu_allocator"]
__version__ = "0.1.0"
