"""Emotion / state recognition from EEG + ECG: datasets, subject-independent protocol, CLI."""

from __future__ import annotations
