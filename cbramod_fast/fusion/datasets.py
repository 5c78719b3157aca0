"""EEG + ECG trial datasets for fusion: DREAMER (.mat), eegmat (EDF) and a generic per-trial .npz format.

Every loader returns a list of :class:`Trial` with signals in µV, channels first, at their native rates
(EDF files are read by :mod:`cbramod_fast.readers`); :func:`make_windows` turns them into 200 Hz CBraMod
patches with the C++ pipeline.

Generic format (AMIGOS, WESAD, your own): a directory of ``*.npz`` files, one per trial, holding
``eeg`` (C, T) float, ``eeg_fs`` (scalar), ``ecg`` (L, T') float, ``ecg_fs``, ``subject`` (str),
optional ``eeg_channels`` / ``ecg_channels`` (str arrays), optional ``eeg_baseline`` / ``ecg_baseline``
and one scalar per label, named ``label_<target>`` (e.g. ``label_valence``). Signals in µV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import signal as sig
from ..readers import read_edf_signals

DREAMER_TARGETS = ("valence", "arousal", "dominance")


@dataclass
class Trial:
    subject: str
    trial: str
    eeg: np.ndarray | None  # (C, T) µV
    eeg_fs: float
    ecg: np.ndarray | None  # (L, T) µV
    ecg_fs: float
    labels: dict[str, float]
    eeg_channels: list[str] = field(default_factory=list)
    ecg_channels: list[str] = field(default_factory=list)
    eeg_baseline: np.ndarray | None = None
    ecg_baseline: np.ndarray | None = None


# -- DREAMER ----------------------------------------------------------------------------------------------

def _field(obj, name: str, where: str):
    try:
        return getattr(obj, name)
    except AttributeError:
        raise ValueError(f"{where}: missing field {name!r} (is this the DREAMER.mat release?)") from None


def _cells(x) -> list:
    arr = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
    return list(arr.ravel()) if arr.dtype == object else [x]


def load_dreamer(path: str | Path) -> list[Trial]:
    """Read ``DREAMER.mat``: ``DREAMER.Data{s}`` with ``EEG``/``ECG`` ``.baseline``/``.stimuli`` cells
    (samples x channels) and ``ScoreValence/ScoreArousal/ScoreDominance`` (1-5). Subject and trial counts,
    rates and electrode names are read from the file."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DREAMER file")
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .mat file ({exc})") from exc
    if "DREAMER" not in mat:
        raise ValueError(f"{path}: no top-level 'DREAMER' struct (found {sorted(k for k in mat if not k.startswith('__'))})")
    d = mat["DREAMER"]
    where = str(path)
    eeg_fs = float(_field(d, "EEG_SamplingRate", where))
    ecg_fs = float(_field(d, "ECG_SamplingRate", where))
    electrodes = [str(e) for e in np.atleast_1d(_field(d, "EEG_Electrodes", where))]
    n_subj = int(_field(d, "noOfSubjects", where))
    n_vid = int(_field(d, "noOfVideoSequences", where))
    data = _cells(_field(d, "Data", where))
    if len(data) != n_subj:
        raise ValueError(f"{where}: noOfSubjects={n_subj} but Data holds {len(data)} subjects")
    trials = []
    for s, subj in enumerate(data):
        sw = f"{where}: Data{{{s + 1}}}"
        eeg, ecg = _field(subj, "EEG", sw), _field(subj, "ECG", sw)
        eeg_stim, eeg_base = _cells(_field(eeg, "stimuli", sw)), _cells(_field(eeg, "baseline", sw))
        ecg_stim, ecg_base = _cells(_field(ecg, "stimuli", sw)), _cells(_field(ecg, "baseline", sw))
        scores = {t: np.atleast_1d(_field(subj, f"Score{t.capitalize()}", sw)).astype(float) for t in DREAMER_TARGETS}
        for name, seq in (("EEG.stimuli", eeg_stim), ("ECG.stimuli", ecg_stim), *((f"Score{t.capitalize()}", v)
                                                                                   for t, v in scores.items())):
            if len(seq) != n_vid:
                raise ValueError(f"{sw}: {name} has {len(seq)} entries, noOfVideoSequences={n_vid}")
        for v in range(n_vid):
            trials.append(Trial(
                subject=f"S{s + 1:02d}", trial=f"S{s + 1:02d}_T{v + 1:02d}",
                eeg=np.asarray(eeg_stim[v], dtype=np.float64).T, eeg_fs=eeg_fs,
                ecg=np.asarray(ecg_stim[v], dtype=np.float64).T, ecg_fs=ecg_fs,
                labels={t: float(scores[t][v]) for t in DREAMER_TARGETS},
                eeg_channels=electrodes, ecg_channels=[f"ECG{i + 1}" for i in range(np.asarray(ecg_stim[v]).shape[1])],
                eeg_baseline=np.asarray(eeg_base[v], dtype=np.float64).T if v < len(eeg_base) else None,
                ecg_baseline=np.asarray(ecg_base[v], dtype=np.float64).T if v < len(ecg_base) else None,
            ))
    return trials


# -- eegmat (PhysioNet "EEG During Mental Arithmetic Tasks") ------------------------------------------

def _trial_files(folder: str | Path, pattern: str, what: str) -> list[Path]:
    files = sorted(Path(folder).glob(pattern))
    if not files:
        raise FileNotFoundError(f"{folder}: no {what}")
    return files


def eeg_ecg_channels(labels: list[str]) -> tuple[list[int], list[int]]:
    """Indices of the EEG channels (``EEG ...``, without the A2-A1 reference) and the ECG ones (``ECG ...``)."""
    eeg = [i for i, n in enumerate(labels) if n.upper().startswith("EEG") and "A2-A1" not in n.upper()]
    return eeg, [i for i, n in enumerate(labels) if n.upper().startswith("ECG")]


def load_eegmat(folder: str | Path) -> list[Trial]:
    """``SubjectXX_1.edf`` (rest, label 0) and ``SubjectXX_2.edf`` (mental arithmetic, label 1):
    19 EEG channels (``EEG ...`` minus the A2-A1 reference channel) and ``ECG ECG``, one trial per file."""
    trials = []
    for path in _trial_files(folder, "Subject*_[12].edf", "SubjectXX_1.edf / SubjectXX_2.edf files"):
        x, fs, labels = read_edf_signals(path)
        eeg_idx, ecg_idx = eeg_ecg_channels(labels)
        if not eeg_idx or not ecg_idx:
            raise ValueError(f"{path}: expected EEG and ECG channels, found {labels}")
        subject, cond = path.stem.rsplit("_", 1)
        trials.append(Trial(subject=subject, trial=path.stem, eeg=x[eeg_idx], eeg_fs=fs, ecg=x[ecg_idx],
                            ecg_fs=fs, labels={"task": float(cond == "2")},
                            eeg_channels=[labels[i][4:] for i in eeg_idx], ecg_channels=[labels[i] for i in ecg_idx]))
    return trials


# -- generic npz ------------------------------------------------------------------------------------------

def load_npz_dir(folder: str | Path) -> list[Trial]:
    """One trial per ``.npz`` file of ``folder`` (the generic format in this module's docstring)."""
    trials = []
    for path in _trial_files(folder, "*.npz", ".npz trial files"):
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable .npz ({exc})") from exc
        missing = [k for k in ("subject",) if k not in z]
        if missing or ("eeg" not in z and "ecg" not in z):
            raise ValueError(f"{path}: needs 'subject' and at least one of 'eeg'/'ecg' (has {sorted(z.files)})")
        labels = {k[6:]: float(z[k]) for k in z.files if k.startswith("label_")}
        if not labels:
            raise ValueError(f"{path}: no label_<target> entries")

        def arr(key, z=z):
            return np.asarray(z[key], dtype=np.float64) if key in z else None

        trials.append(Trial(
            subject=str(z["subject"]), trial=path.stem, eeg=arr("eeg"),
            eeg_fs=float(z["eeg_fs"]) if "eeg" in z else 0.0, ecg=arr("ecg"),
            ecg_fs=float(z["ecg_fs"]) if "ecg" in z else 0.0, labels=labels,
            eeg_channels=[str(c) for c in z["eeg_channels"]] if "eeg_channels" in z else [],
            ecg_channels=[str(c) for c in z["ecg_channels"]] if "ecg_channels" in z else [],
            eeg_baseline=arr("eeg_baseline"), ecg_baseline=arr("ecg_baseline")))
    return trials


LOADERS = {"dreamer": load_dreamer, "eegmat": load_eegmat, "npz": load_npz_dir}


# -- windows ----------------------------------------------------------------------------------------------

@dataclass
class TrialWindows:
    """Both modalities of every trial cut into aligned windows, with each window's trial, subject and labels."""

    eeg: np.ndarray  # (W, C, window_s, 200) float32, µV/100
    ecg: np.ndarray  # (W, L, window_s, 200)
    trial: np.ndarray  # (W,) index into the trial list
    subject: np.ndarray  # (W,) subject id (str)
    labels: dict[str, np.ndarray]  # target -> (W,) raw label value
    baseline_of: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # trial -> baseline windows


def to_patches(x: np.ndarray, fs: float, band: tuple[float, float], notch: float | None) -> np.ndarray:
    """``(C, T)`` µV at ``fs`` → ``(C, N, 200)`` patches at 200 Hz, µV/100 (band-pass, optional notch)."""
    hi = min(band[1], 0.45 * fs)  # keep the band below Nyquist for low-rate recordings (128 Hz EEG)
    return sig.preprocess(x, fs, band=(band[0], hi), notch=notch, fs_out=200).patches  # (C, N, 200)


def trial_windows(t: Trial, window_s: int, eeg_band=(0.3, 45.0), ecg_band=(0.5, 45.0), notch=None,
                  baseline: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Both modalities of one trial cut into the same number of aligned ``window_s`` windows."""
    src = (t.eeg_baseline, t.ecg_baseline) if baseline else (t.eeg, t.ecg)
    if src[0] is None or src[1] is None:
        raise ValueError(f"trial {t.trial}: both EEG and ECG are needed")
    e = to_patches(src[0], t.eeg_fs, eeg_band, notch)
    c = to_patches(src[1], t.ecg_fs, ecg_band, notch)
    n = min(e.shape[1], c.shape[1]) // window_s
    if n == 0:
        return np.zeros((0, e.shape[0], window_s, 200), np.float32), np.zeros((0, c.shape[0], window_s, 200), np.float32)

    def cut(p):
        return p[:, : n * window_s].reshape(p.shape[0], n, window_s, 200).transpose(1, 0, 2, 3).copy()

    return cut(e), cut(c)


def make_windows(trials: list[Trial], window_s: int = 10, baseline_correction: bool = False, notch=None,
                 progress: bool = True) -> TrialWindows:
    from tqdm.auto import tqdm

    eegs, ecgs, tri, subj, labs, base = [], [], [], [], {k: [] for k in trials[0].labels}, {}
    for i, t in enumerate(tqdm(trials, desc="preprocess trials", disable=not progress)):
        e, c = trial_windows(t, window_s, notch=notch)
        eegs.append(e)
        ecgs.append(c)
        tri += [i] * len(e)
        subj += [t.subject] * len(e)
        for k in labs:
            labs[k] += [t.labels[k]] * len(e)
        if baseline_correction and t.eeg_baseline is not None and t.ecg_baseline is not None:
            base[i] = trial_windows(t, window_s, notch=notch, baseline=True)
    if not sum(len(e) for e in eegs):
        raise ValueError(f"no trial is longer than one {window_s}-s window")
    return TrialWindows(np.concatenate(eegs), np.concatenate(ecgs), np.asarray(tri), np.asarray(subj),
                   {k: np.asarray(v, dtype=float) for k, v in labs.items()}, base)


def binarise(values: np.ndarray, threshold: float | None) -> np.ndarray:
    """High (1) vs low (0): ``value > threshold``. DREAMER default threshold 3 (scores 4-5 high, 1-3 low);
    labels that are already 0/1 (eegmat's task) pass through with threshold None."""
    return (values > (0.5 if threshold is None else threshold)).astype(np.int64)
