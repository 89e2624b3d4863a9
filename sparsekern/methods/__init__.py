"""Pruning methods: one file per method on a shared base (base.py) and schedules."""
from . import schedules
from .base import PruningMethod
from .concave import ConcaveRegularization
from .cs import ContinuousSparsification
from .dpf import DPF
from .gmp import GradualMagnitude
from .imp import IMP
from .l0 import ConstrainedL0, PenalizedL0
from .oneshot import OneShot

__all__ = ["PruningMethod", "schedules"]
__all__ += ["IMP", "OneShot", "GradualMagnitude", "DPF"]
__all__ += ["ContinuousSparsification", "ConcaveRegularization", "ConstrainedL0", "PenalizedL0"]
