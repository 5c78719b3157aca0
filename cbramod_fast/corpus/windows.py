"""In-memory windows of a few recordings: read, preprocess and cut without writing a corpus.

For tests, the benchmark input and experiments, where a handful of records fit in memory. The reading
(:mod:`cbramod_fast.readers`) and preprocessing (:func:`cbramod_fast.signal.preprocess`: band-pass,
resampling to 200 Hz, µV/100 scaling) are the corpus builder's; the window rule is simpler than
``build``'s per-patch flags: a window is dropped when it holds a non-finite value, exceeds ``max_abs`` (after
scaling) or has a flat present lead (std below 1e-3 after scaling).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..readers import STANDARD_LEADS, SUFFIXES, read_record


@dataclass
class Windows:
    x: np.ndarray  # (W, C, N, 200) float32, µV/100
    present: np.ndarray  # (W, C) bool
    record: list[str]  # record name of each window
    start_s: np.ndarray  # (W,) window start in seconds from the record's beginning

    def select(self, keep: np.ndarray) -> Windows:
        """The windows where the boolean ``keep`` is True."""
        return Windows(self.x[keep], self.present[keep], [r for r, k in zip(self.record, keep) if k],
                       self.start_s[keep])


def read_windows(records: list[str | Path], leads: tuple[str, ...] = STANDARD_LEADS, window_s: int = 10,
                 fs: int = 200, band: tuple[float, float] = (0.5, 45.0), scale: float = 0.01,
                 max_abs: float = 80.0) -> Windows:
    """Cut recordings into ``window_s`` windows of ``(C, window_s, fs)`` patches in the lead order ``leads``.

    ``records`` are files :func:`cbramod_fast.readers.read_record` reads, or WFDB record paths without the
    ``.hea`` extension (what :func:`cbramod_fast.readers.records_in` lists). Leads a record lacks are zero with
    ``present`` False; every record must hold at least one of ``leads``.
    """
    parts = []
    for path in map(Path, records):
        rec = read_record(path if path.suffix.lower() in SUFFIXES else path.with_name(path.name + ".hea"), leads)
        rows = np.flatnonzero(rec.present)
        parts.append(windows_from_signal(rec.signal[rows], rec.fs, [leads[i] for i in rows], rec.record, leads,
                                         window_s, fs, band, scale, max_abs))
    return concat_windows(parts, f"{len(records)} records")


def windows_from_signal(sig_uv: np.ndarray, fs_rec: float, rec_leads: list[str], name: str,
                        leads: tuple[str, ...] = STANDARD_LEADS, window_s: int = 10, fs: int = 200,
                        band: tuple[float, float] = (0.5, 45.0), scale: float = 0.01,
                        max_abs: float = 80.0) -> Windows | None:
    """Band-pass, resample to ``fs``, scale and cut one recording ``(C_rec, T)`` in µV, whose rows are the
    leads ``rec_leads``, into windows in the layout ``leads``; None when no window is usable."""
    from ..signal import preprocess

    pre = preprocess(np.nan_to_num(np.asarray(sig_uv, np.float64)), float(fs_rec), band=band, fs_out=fs,
                     scale=scale)
    sig = pre.patches.reshape(pre.patches.shape[0], -1)
    out = np.zeros((len(leads), sig.shape[-1]), np.float32)
    present = np.zeros(len(leads), bool)
    for i, lead in enumerate(leads):
        if lead in rec_leads:
            out[i] = sig[rec_leads.index(lead)]
            present[i] = True
    if not present.any():
        return None
    xs, starts, w = [], [], window_s * fs
    for k in range(out.shape[-1] // w):
        seg = out[:, k * w:(k + 1) * w]
        if (not np.isfinite(seg).all() or np.abs(seg).max() > max_abs
                or (seg[present].std(axis=-1) < 1e-3).any()):
            continue
        xs.append(seg.reshape(len(leads), window_s, fs))
        starts.append(k * window_s)
    if not xs:
        return None
    return Windows(np.stack(xs), np.repeat(present[None], len(xs), 0), [name] * len(xs),
                   np.asarray(starts, np.float64))


def concat_windows(parts: list[Windows | None], what: str) -> Windows:
    """The windows of several recordings in order (None parts skipped); raises when none is left."""
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError(f"no usable windows in {what}")
    return Windows(np.concatenate([p.x for p in parts]), np.concatenate([p.present for p in parts]),
                   [r for p in parts for r in p.record], np.concatenate([p.start_s for p in parts]))
