"""sparsekern: fused kernels and pruning methods for training sparse neural networks."""
from . import _extension
from . import ops
from ._extension import HAS_EXTENSION
from .nn import SparseConv2d, SparseLinear, export, report, sparsify
from . import methods

__all__ = ["ops", "methods", "HAS_EXTENSION", "SparseLinear", "SparseConv2d", "sparsify", "export", "report"]
__version__ = "0.1.0"
