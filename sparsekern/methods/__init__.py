"""Pruning methods: one file per method on a shared base (base.py) and schedules."""
from . import schedules
from .base import PruningMethod

__all__ = ["PruningMethod", "schedules"]
