"""The module layer: sparse layers, mask kinds, sparsify(), export()/purge and report()."""
from .attention import SparseMultiheadAttention
from .batchnorm import GatedBatchNorm2d
from .export import Exported, count_macs, count_params, export
from .heads import PrunedMultiheadAttention
from .masks import (
    MASK_KINDS,
    BinaryMask,
    HardConcreteMask,
    MaskKind,
    RelaxedMask,
    SigmoidMask,
    StraightThroughMask,
    make_mask,
)
from .modules import SparseConv2d, SparseLinear
from .purge import purge_channels
from .purgeable import purgeable_layers
from .report import SparsityReport, report
from .sparsify import sparse_modules, sparsify
from .transformer import SparseTransformerEncoderLayer

__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "SparseMultiheadAttention",
    "SparseTransformerEncoderLayer",
    "GatedBatchNorm2d",
    "PrunedMultiheadAttention",
    "sparsify",
    "sparse_modules",
    "export",
    "Exported",
    "purge_channels",
    "purgeable_layers",
    "count_params",
    "count_macs",
    "report",
    "SparsityReport",
    "MaskKind",
    "BinaryMask",
    "StraightThroughMask",
    "SigmoidMask",
    "RelaxedMask",
    "HardConcreteMask",
    "MASK_KINDS",
    "make_mask",
]
