"""Synthetic EEG + ECG trials with a planted state, and small encoders, for the fusion tests.

The planted data hide one binary state per trial in the EEG (alpha power) and the ECG (heart rate): the
pipeline must find it, and with shuffled labels (drawn independently of the state) it must not. Also: a
copy of a trial folder with one subject's recordings changed, and the comparison of two runs' fold folders
that the subject-independence test makes.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import torch
from conftest import DATA
from scipy.io import savemat

from cbramod_fast import CBraMod
from cbramod_fast.fusion.cli import _add_evaluate

WEIGHTS = str(DATA / "cbramod_weights_seed3_layers2.pth")


ELECTRODES = ["AF3", "F7", "F3", "FC5", "T7", "P7", "O1", "O2", "P8", "T8", "FC6", "F4", "F8", "AF4"]


def jittered_ecg(rng, fs, secs, bpm):
    t = np.arange(int(fs * secs)) / fs
    x = 30 * rng.standard_normal(t.size)
    beat = 60.0 / bpm
    for k in np.arange(rng.uniform(0, beat), secs, beat * rng.uniform(0.97, 1.03)):
        x += 1000 * np.exp(-0.5 * ((t - k) / 0.012) ** 2)  # R wave
    return x


def write_dreamer(path, n_subj=4, n_vid=6, secs=20, shuffle=False, seed=0):
    rng = np.random.default_rng(seed)
    label_rng = np.random.default_rng([seed, 1])
    data = np.empty((1, n_subj), dtype=object)
    for s in range(n_subj):
        state = rng.permutation(np.arange(n_vid) % 2)  # balanced high/low per subject
        eeg_stim, eeg_base = np.empty((n_vid, 1), dtype=object), np.empty((n_vid, 1), dtype=object)
        ecg_stim, ecg_base = np.empty((n_vid, 1), dtype=object), np.empty((n_vid, 1), dtype=object)
        for v in range(n_vid):
            t = np.arange(128 * secs) / 128
            alpha = (25.0 if state[v] else 5.0) * np.sin(2 * np.pi * 10 * t + rng.uniform(0, 6))
            eeg_stim[v, 0] = (10 * rng.standard_normal((t.size, 14)) + alpha[:, None]).astype(np.float64)
            eeg_base[v, 0] = 10 * rng.standard_normal((128 * 4, 14))
            ecg_stim[v, 0] = np.stack([jittered_ecg(rng, 256, secs, 100 if state[v] else 60) for _ in range(2)], 1)
            ecg_base[v, 0] = np.stack([jittered_ecg(rng, 256, 4, 70) for _ in range(2)], 1)
        # Shuffled labels: a balanced draw of their own, independent of the planted state (a permutation of
        # `state` by the same generator would tie the two together).
        labels = label_rng.permutation(np.arange(n_vid) % 2) if shuffle else state
        scores = np.where(labels == 1, 4, 2).astype(np.float64)[:, None]
        data[0, s] = {"Age": 25, "Gender": "male", "EEG": {"baseline": eeg_base, "stimuli": eeg_stim},
                      "ECG": {"baseline": ecg_base, "stimuli": ecg_stim},
                      "ScoreValence": scores, "ScoreArousal": scores, "ScoreDominance": scores}
    savemat(str(path), {"DREAMER": {"Data": data, "EEG_SamplingRate": 128.0, "ECG_SamplingRate": 256.0,
                                    "EEG_Electrodes": np.array(ELECTRODES, dtype=object),
                                    "noOfSubjects": float(n_subj), "noOfVideoSequences": float(n_vid)}})
    return path


def evaluate_args(dataset, path, out, **kw):
    """The arguments ``cbramod-fast evaluate DATASET PATH --out OUT`` parses to, with ``kw`` replacing some."""
    parser = argparse.ArgumentParser()
    _add_evaluate(parser)
    args = parser.parse_args([dataset, str(path), "--out", str(out)])
    for k, v in kw.items():
        if not hasattr(args, k):
            raise AttributeError(f"evaluate has no argument {k!r}")
        setattr(args, k, v)
    return args


# A smaller selection grid than the defaults (same kinds of choice) keeps the tests' runs short.
QUICK = {"select_heads": "linear,mlp", "select_weight_decays": "0.01", "select_epochs": "10,30",
         "inner_k": 3}


def dreamer_args(path, out, **kw):
    base = {"eeg_weights": WEIGHTS, "ecg_weights": WEIGHTS, "preset": "tiny", "targets": "arousal", "epochs": 60,
            "quiet": True}
    return evaluate_args("dreamer", path, out, **{**base, **kw})


def clean_ecg(fs, secs, bpm, rng):
    t = np.arange(int(fs * secs)) / fs
    x = 0.3 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * 0.3 * t)  # noise + baseline wander
    for k in np.arange(0.2, secs, 60.0 / bpm):
        x += 10 * np.exp(-0.5 * ((t - k) / 0.01) ** 2) + 2 * np.exp(-0.5 * ((t - k - 0.25) / 0.04) ** 2)
    return x


def write_npz_trials(folder, n_subj=4, n_trials=4, secs=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for s in range(n_subj):
        for k in range(n_trials):
            state = k % 2
            t = np.arange(250 * secs) / 250
            eeg = 10 * rng.standard_normal((4, t.size)) + (30 if state else 3) * np.sin(2 * np.pi * 10 * t)
            ecg = 100 * clean_ecg(250, secs, 110 if state else 60, rng)[None]
            np.savez(folder / f"s{s}_t{k}.npz", eeg=eeg, eeg_fs=250.0, ecg=ecg, ecg_fs=250.0, subject=f"sub{s}",
                     eeg_channels=np.array(["Fz", "Cz", "Pz", "Oz"]), label_stress=float(state))
    return folder


def distort_subject(src, dst, subject):
    """Copy the npz trial folder ``src`` to ``dst`` with ``subject``'s recordings changed (gain and noise),
    every other file byte-identical."""
    rng = np.random.default_rng(7)
    dst.mkdir()
    for f in sorted(src.glob("*.npz")):
        z = dict(np.load(f))
        if str(z["subject"]) == subject:
            z["eeg"] = 1.7 * z["eeg"] + 5 * rng.standard_normal(z["eeg"].shape)
            z["ecg"] = 0.6 * z["ecg"] + 20 * rng.standard_normal(z["ecg"].shape)
            np.savez(dst / f.name, **z)
        else:
            shutil.copyfile(f, dst / f.name)
    return dst


def same(a, b) -> bool:
    """Equal values, tensors bit for bit, NaN equal to NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def fold_differences(fold_a, fold_b) -> list[str]:
    """Files of two fold folders that differ: ``.pt`` files compared after loading (tensors exactly equal),
    every other file byte for byte; a file present in only one folder counts as differing."""
    names = sorted({p.name for p in fold_a.iterdir()} | {p.name for p in fold_b.iterdir()})
    out = []
    for n in names:
        a, b = fold_a / n, fold_b / n
        if not (a.is_file() and b.is_file()):
            out.append(n)
        elif n.endswith(".pt"):
            if not same(torch.load(a, weights_only=True), torch.load(b, weights_only=True)):
                out.append(n)
        elif a.read_bytes() != b.read_bytes():
            out.append(n)
    return out


def tiny_encoders(seed=0):
    torch.manual_seed(seed)
    return CBraMod.from_config("tiny").eval(), CBraMod.from_config("tiny").eval()
