"""The CBraMod encoder: the fast drop-in model, its configuration and presets, checkpoint loading, the
CPU inference path, and the faithful reference implementation tests and benchmarks compare against."""

from __future__ import annotations

from .cbramod import CBraMod
from .checkpoint import LoadReport, read_state_dict
from .config import PRESETS, CBraModConfig
from .reference import ReferenceCBraMod

__all__ = ["PRESETS", "CBraMod", "CBraModConfig", "LoadReport", "ReferenceCBraMod", "read_state_dict"]
