"""cbramod-fast: a fast, drop-in CBraMod for EEG and ECG.

The public API is ``CBraMod``, ``CBraModConfig``, ``PRESETS`` and ``ReferenceCBraMod``, loaded on first use:
``import cbramod_fast.signal`` (or the corpus builder) does not pay for torch.
"""

from __future__ import annotations

__all__ = ["PRESETS", "CBraMod", "CBraModConfig", "ReferenceCBraMod"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from . import model

        value = getattr(model, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
