"""cbramod-fast: a fast, drop-in CBraMod for EEG and ECG."""

from __future__ import annotations

from .model import PRESETS, CBraMod, CBraModConfig, ReferenceCBraMod

__all__ = ["CBraMod", "CBraModConfig", "PRESETS", "ReferenceCBraMod"]
__version__ = "0.1.0"
