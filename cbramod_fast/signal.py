"""Signal pipeline: the Python face of the C++ extension (validation, docstrings, scipy-style names).

Arrays are ``(..., T)``: any leading shape, time last, float32 or float64 (any memory layout). Filters are
designed with scipy (cheap); the padding, filtering, resampling and patching loops run in
``cbramod_fast._ext`` in double precision with the GIL released, split across rows over ``threads``
(``0`` = all cores). Results match scipy (``sosfiltfilt``, ``filtfilt``, ``resample_poly``) to ≤ 1e-6
(float64) / ≤ 1e-4 (float32) of the signal's max abs, and keep the input's dtype.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from . import _ext

__all__ = ["Preprocessed", "bandpass", "highpass", "lowpass", "notch", "patchify", "preprocess", "resample",
           "resample_ratio"]

_FLOAT_DTYPES = (np.float32, np.float64)


def _as_float_array(x, name: str = "x") -> np.ndarray:
    """Return ``x`` as a float32/float64 ndarray, rejecting integer, bool and complex input."""
    arr = np.asarray(x)
    if arr.dtype.kind == "f" and not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))  # big-endian files: one native copy
    if arr.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name}: expected an array shaped (..., T), got a scalar")
    if arr.size == 0:
        raise ValueError(f"{name}: empty array (shape {arr.shape})")
    return arr


def _rows(arr: np.ndarray) -> np.ndarray:
    """``(..., T)`` → a ``(rows, T)`` view when the layout allows (a copy otherwise); C++ takes any strides."""
    return arr.reshape(-1, arr.shape[-1])


def _check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0 = all cores), got {threads!r}")
    return int(threads)


def _check_fs(fs, name: str = "fs") -> float:
    if isinstance(fs, bool) or not isinstance(fs, (int, float, np.integer, np.floating)) or not math.isfinite(fs):
        raise ValueError(f"{name} must be a finite positive number, got {fs!r}")
    if fs <= 0:
        raise ValueError(f"{name} must be positive, got {fs}")
    return float(fs)


def _raise_nonfinite(fn: str, arr: np.ndarray, row: int, sample: int) -> None:
    where = np.unravel_index(row, arr.shape[:-1]) if arr.ndim > 1 else ()
    value = arr[(*where, sample)]
    index = ", ".join(str(int(i)) for i in (*where, sample))
    raise ValueError(f"{fn}: non-finite value {value} in the input at index [{index}] "
                     f"(row {row}, sample {sample}); clean or interpolate it first")


# ---------------------------------------------------------------------------------------------- IIR filters
class _Sos(NamedTuple):
    sos: np.ndarray  # (n_sections, 6), a0 == 1
    zi: np.ndarray  # (n_sections, 2)
    padlen: int


def _check_cutoff(value, fs: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in Hz, got {value!r}")
    if not (0 < value < fs / 2):
        raise ValueError(f"Digital filter critical frequencies must be 0 < Wn < fs/2: {name}={value} Hz with "
                         f"fs={fs} Hz (Nyquist {fs / 2} Hz)")
    return float(value)


def _check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    return int(order)


@lru_cache(maxsize=256)
def _butter(order: int, wn: tuple[float, ...], btype: str, fs: float) -> _Sos:
    """scipy.signal.sosfiltfilt's filter, initial conditions and default padlen for a Butterworth design."""
    from scipy.signal import butter, sosfilt_zi

    sos = butter(order, wn[0] if len(wn) == 1 else list(wn), btype=btype, fs=fs, output="sos")
    sos = sos / sos[:, 3:4]
    n_sections = sos.shape[0]
    # sosfiltfilt: ntaps = 2*n_sections + 1, less the trailing zero coefficients shared by b and a
    ntaps = 2 * n_sections + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    return _Sos(np.ascontiguousarray(sos), np.ascontiguousarray(sosfilt_zi(sos)), 3 * ntaps)


@lru_cache(maxsize=64)
def _iirnotch(freq: float, q: float, fs: float) -> _Sos:
    """scipy.signal.filtfilt(b, a) for iirnotch as one biquad: padlen = 3 * max(len(a), len(b)), lfilter_zi."""
    from scipy.signal import iirnotch, lfilter_zi

    b, a = iirnotch(freq, q, fs=fs)
    zi = lfilter_zi(b, a)  # normalises by a[0] itself
    b, a = b / a[0], a / a[0]
    sos = np.concatenate([b, a])[None, :]
    return _Sos(np.ascontiguousarray(sos), np.ascontiguousarray(zi.reshape(1, 2)), 3 * max(len(a), len(b)))


def _filtfilt(fn: str, x, f: _Sos, threads: int) -> np.ndarray:
    arr = _as_float_array(x)
    threads = _check_threads(threads)
    t = arr.shape[-1]
    if t <= f.padlen:
        raise ValueError(f"{fn}: the length of the input vector x must be greater than padlen, which is "
                         f"{f.padlen} (got T={t}, shape {arr.shape})")
    ext = _ext.filtfilt_f32 if arr.dtype == np.float32 else _ext.filtfilt_f64
    out, bad_row, bad_sample = ext(_rows(arr), f.sos, f.zi, f.padlen, threads)
    if bad_row >= 0:
        _raise_nonfinite(fn, arr, bad_row, bad_sample)
    return out.reshape(arr.shape)


def bandpass(x, fs: float, low: float, high: float, order: int = 4, threads: int = 0) -> np.ndarray:
    """Zero-phase Butterworth band-pass along the last axis.

    Equals ``scipy.signal.sosfiltfilt(butter(order, [low, high], "bandpass", fs=fs, output="sos"), x,
    axis=-1)`` (odd padding of ``3 * (2 * n_sections + 1)`` samples, ``sosfilt_zi`` initial conditions),
    computed in double and returned in ``x``'s dtype. Raises ``ValueError`` for ``fs <= 0``, ``low >= high``,
    cutoffs outside ``(0, fs/2)``, a signal not longer than the padding, NaN/Inf (naming the index), empty
    input; ``TypeError`` for non-float dtypes.
    """
    fs = _check_fs(fs)
    low, high = _check_cutoff(low, fs, "low"), _check_cutoff(high, fs, "high")
    if low >= high:
        raise ValueError(f"bandpass: low ({low} Hz) must be less than high ({high} Hz)")
    return _filtfilt("bandpass", x, _butter(_check_order(order), (low, high), "bandpass", fs), threads)


def highpass(x, fs: float, cutoff: float, order: int = 4, threads: int = 0) -> np.ndarray:
    """Zero-phase Butterworth high-pass: ``sosfiltfilt(butter(order, cutoff, "highpass", fs=fs,
    output="sos"), x, axis=-1)``. Same conventions and errors as :func:`bandpass`."""
    fs = _check_fs(fs)
    cutoff = _check_cutoff(cutoff, fs, "cutoff")
    return _filtfilt("highpass", x, _butter(_check_order(order), (cutoff,), "highpass", fs), threads)


def lowpass(x, fs: float, cutoff: float, order: int = 4, threads: int = 0) -> np.ndarray:
    """Zero-phase Butterworth low-pass: ``sosfiltfilt(butter(order, cutoff, "lowpass", fs=fs,
    output="sos"), x, axis=-1)``. Same conventions and errors as :func:`bandpass`."""
    fs = _check_fs(fs)
    cutoff = _check_cutoff(cutoff, fs, "cutoff")
    return _filtfilt("lowpass", x, _butter(_check_order(order), (cutoff,), "lowpass", fs), threads)


def _check_notch(fs: float, freq, q) -> tuple[float, float]:
    freq = _check_cutoff(freq, fs, "freq")
    if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) or not q > 0:
        raise ValueError(f"notch: quality factor q must be positive, got {q!r}")
    return freq, float(q)


def notch(x, fs: float, freq: float, q: float = 30.0, threads: int = 0) -> np.ndarray:
    """Zero-phase IIR notch: ``scipy.signal.filtfilt(*iirnotch(freq, q, fs=fs), x, axis=-1)``.

    One biquad, padded by ``3 * max(len(a), len(b)) = 9`` samples (odd extension), ``lfilter_zi`` initial
    conditions. Errors as :func:`bandpass` (``freq`` must lie in ``(0, fs/2)``, ``q > 0``).
    """
    fs = _check_fs(fs)
    freq, q = _check_notch(fs, freq, q)
    return _filtfilt("notch", x, _iirnotch(freq, q, fs), threads)


# ---------------------------------------------------------------------------------------------- resampling
def resample_ratio(fs_in: float, fs_out: float) -> tuple[int, int]:
    """``(up, down)``: the reduced ratio ``fs_out / fs_in``; rates must be exact rationals (e.g. 360, 128.0,
    250.5), with ``max(up, down) <= 10000`` (scipy's filter has ``20 * max(up, down) + 1`` taps)."""
    return _resample_ratio(_check_fs(fs_in, "fs_in"), _check_fs(fs_out, "fs_out"))


@lru_cache(maxsize=256)
def _resample_ratio(fs_in: float, fs_out: float) -> tuple[int, int]:
    ratio = Fraction(fs_out).limit_denominator(1000) / Fraction(fs_in).limit_denominator(1000)
    if abs(float(ratio) - fs_out / fs_in) > 1e-12 * fs_out / fs_in:
        raise ValueError(f"resample: cannot express fs_out/fs_in = {fs_out}/{fs_in} as a small rational")
    up, down = ratio.numerator, ratio.denominator
    if max(up, down) > 10000:
        raise ValueError(f"resample: ratio {fs_out}/{fs_in} reduces to up={up}, down={down}; max(up, down) must "
                         "be <= 10000 (the FIR would have 20 * max + 1 taps)")
    return up, down


@lru_cache(maxsize=64)
def _resample_fir(up: int, down: int) -> np.ndarray:
    """resample_poly's default FIR: firwin(2*half_len + 1, 1/max_rate, window=('kaiser', 5.0)) * up."""
    from scipy.signal import firwin

    if up == down == 1:
        return np.zeros(0)
    max_rate = max(up, down)
    half_len = 10 * max_rate
    return np.ascontiguousarray(firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * up)


def resample(x, fs_in: float, fs_out: float, threads: int = 0) -> np.ndarray:
    """Resample the last axis from ``fs_in`` to ``fs_out`` Hz by polyphase filtering.

    Equals ``scipy.signal.resample_poly(x, up, down, axis=-1)`` with ``(up, down) = resample_ratio(fs_in,
    fs_out)`` and scipy's default Kaiser (beta 5) window and zero padding; output length
    ``ceil(T * up / down)``. Non-integer ratios (360 → 200, 128 → 200, 257 → 200) work; ``up == down``
    returns a copy. NaN/Inf raise ``ValueError`` naming the index.
    """
    arr = _as_float_array(x)
    threads = _check_threads(threads)
    up, down = resample_ratio(fs_in, fs_out)
    ext = _ext.resample_f32 if arr.dtype == np.float32 else _ext.resample_f64
    out, bad_row, bad_sample = ext(_rows(arr), _resample_fir(up, down), up, down, threads)
    if bad_row >= 0:
        _raise_nonfinite("resample", arr, bad_row, bad_sample)
    return out.reshape(*arr.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------------------------- patches
def patchify(x, patch: int = 200, threads: int = 0) -> np.ndarray:
    """Cut ``(..., T)`` into ``(..., T // patch, patch)`` consecutive patches.

    Trailing samples that do not fill a whole patch are dropped. The result is a new C-contiguous
    array of the input's dtype.
    """
    arr = _as_float_array(x)
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or patch <= 0:
        raise ValueError(f"patchify: patch must be a positive integer, got {patch!r}")
    t = arr.shape[-1]
    if t < patch:
        raise ValueError(f"patchify: signal length T={t} is shorter than one patch ({patch}); shape {arr.shape}")
    rows = np.ascontiguousarray(arr.reshape(-1, t))
    fn = _ext.patchify_f32 if rows.dtype == np.float32 else _ext.patchify_f64
    out = fn(rows, int(patch), int(threads))
    return out.reshape(*arr.shape[:-1], t // patch, patch)


# ---------------------------------------------------------------------------------------------- pipeline
class Preprocessed(NamedTuple):
    """Output of :func:`preprocess`. Flags are per patch; ``valid`` is the patches with no flag set."""

    patches: np.ndarray  # (..., N, patch) float32
    valid: np.ndarray  # (..., N) bool
    flat: np.ndarray  # (..., N) bool
    clipped: np.ndarray  # (..., N) bool
    over_amplitude: np.ndarray  # (..., N) bool
    nonfinite: np.ndarray  # (..., N) bool


_NO_FILTER = _Sos(np.zeros((0, 6)), np.zeros((0, 2)), 0)


def preprocess(
    x,
    fs: float,
    band: tuple[float, float] | None = (0.5, 45.0),
    notch: float | None = None,
    fs_out: float = 200,
    max_abs: float | None = None,
    scale: float = 0.01,
    patch: int = 200,
    threads: int = 0,
    *,
    order: int = 4,
    notch_q: float = 30.0,
    flat_ptp: float = 1e-3,
    clip_run_s: float = 0.02,
) -> Preprocessed:
    """The corpus pipeline in one call: band-pass → notch → resample → scale → patches, with patch flags.

    Numerically (for finite input) ``patches`` equals, up to the float32 cast,
    ``patchify(resample(notch(bandpass(x, fs, *band, order), fs, notch, notch_q), fs, fs_out) * scale,
    patch)``, i.e. the scipy chain ``sosfiltfilt`` → ``filtfilt(iirnotch)`` → ``resample_poly``; ``band=None``
    / ``notch=None`` skip that stage. All stages run fused per block of rows in double precision in C++
    (GIL released, ``threads`` workers, 0 = all cores); extra memory is a few rows per thread plus the
    float32 output. ``N = ceil(T * up / down) // patch``; trailing samples are dropped.

    Per-patch flags (input sample ``s`` belongs to patch ``floor(s * up / (down * patch))``):

    - ``nonfinite``: the patch holds a NaN/Inf input sample. Such samples are **treated as 0** for
      filtering (nothing raises), so filter ringing can also disturb neighbouring patches.
    - ``flat``: the patch's peak-to-peak, in output units (after ``scale``), is below ``flat_ptp``
      (default 1e-3: 0.1 µV for µV input with the default scale 0.01) — a disconnected or zeroed lead.
    - ``clipped``: the patch holds part of a run of at least ``max(2, round(clip_run_s * fs))`` consecutive
      input samples all equal to the row's (channel's) largest or smallest finite value — a recorder rail.
      Constant rows are flat, never clipped.
    - ``over_amplitude`` (only when ``max_abs`` is set): the filtered, resampled patch exceeds ``max_abs``
      in absolute value, in input units (before ``scale``); the band-pass has removed any DC offset.

    ``valid`` = none of the four. Errors as the single stages (bad rates, band, dtype, empty input, a
    signal not longer than the filters' padding, a resampled signal shorter than one patch).
    """
    arr = _as_float_array(x)
    threads = _check_threads(threads)
    fs = _check_fs(fs)
    order = _check_order(order)
    if band is None:
        band_f = _NO_FILTER
    else:
        if len(band) != 2:
            raise ValueError(f"preprocess: band must be (low, high) in Hz or None, got {band!r}")
        low, high = _check_cutoff(band[0], fs, "band low"), _check_cutoff(band[1], fs, "band high")
        if low >= high:
            raise ValueError(f"preprocess: band low ({low} Hz) must be less than high ({high} Hz)")
        band_f = _butter(order, (low, high), "bandpass", fs)
    notch_f = _NO_FILTER if notch is None else _iirnotch(*_check_notch(fs, notch, notch_q), fs)
    up, down = resample_ratio(fs, fs_out)
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or patch <= 0:
        raise ValueError(f"preprocess: patch must be a positive integer, got {patch!r}")
    if not (isinstance(scale, (int, float, np.integer, np.floating)) and math.isfinite(scale)):
        raise ValueError(f"preprocess: scale must be a finite number, got {scale!r}")
    if max_abs is not None and not (math.isfinite(max_abs) and max_abs > 0):
        raise ValueError(f"preprocess: max_abs must be a positive number or None, got {max_abs!r}")
    if not (math.isfinite(flat_ptp) and flat_ptp >= 0):
        raise ValueError(f"preprocess: flat_ptp must be >= 0, got {flat_ptp!r}")
    t = arr.shape[-1]
    padlen = max(band_f.padlen, notch_f.padlen)
    if t <= padlen:
        raise ValueError(f"preprocess: the length of the input vector x must be greater than padlen, which is "
                         f"{padlen} (got T={t}, shape {arr.shape})")
    n_out = -(-t * up // down)
    if n_out < patch:
        raise ValueError(f"preprocess: T={t} samples at {fs} Hz give {n_out} samples at {fs_out} Hz, fewer than "
                         f"one patch ({patch}); shape {arr.shape}")
    clip_run = max(2, round(clip_run_s * fs))
    ext = _ext.preprocess_f32 if arr.dtype == np.float32 else _ext.preprocess_f64
    patches, flags = ext(_rows(arr), band_f.sos, band_f.zi, band_f.padlen, notch_f.sos, notch_f.zi,
                         notch_f.padlen, _resample_fir(up, down), up, down, float(scale), int(patch),
                         math.inf if max_abs is None else float(max_abs), float(flat_ptp), int(clip_run), threads)
    lead = arr.shape[:-1]
    patches = patches.reshape(*lead, *patches.shape[1:])
    flags = flags.reshape(*lead, flags.shape[-1])
    return Preprocessed(
        patches=patches,
        valid=flags == 0,
        flat=(flags & _ext.FLAG_FLAT) != 0,
        clipped=(flags & _ext.FLAG_CLIPPED) != 0,
        over_amplitude=(flags & _ext.FLAG_OVER_AMPLITUDE) != 0,
        nonfinite=(flags & _ext.FLAG_NONFINITE) != 0,
    )
