"""EEG + ECG fusion for emotion / state recognition: the model, trial datasets, the subject-independent
protocol and its command line (``cbramod-fast evaluate``, ``cbramod-fast predict``).

Data path: :mod:`.datasets` (trials → aligned 200 Hz windows) → :mod:`.model` (two CBraMod encoders, pooled
embeddings, a head) → :mod:`.protocol` (folds by subject, baselines, metrics) → :mod:`.cli`.
"""

from __future__ import annotations

from .model import FitConfig, FusionConfig, FusionModel, embed_all, fit

__all__ = ["FitConfig", "FusionConfig", "FusionModel", "embed_all", "fit"]
