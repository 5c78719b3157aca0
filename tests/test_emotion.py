"""Fusion evaluation end to end on DREAMER-structured files the tests write, and eegmat on real EDFs.

The planted dataset hides one binary state per trial in the EEG (alpha power) and the ECG (heart rate):
the pipeline must find it (high AUC), and with shuffled labels it must not (AUC near 0.5) — a pipeline
that leaks test subjects into training would score well on shuffled labels too.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator

import numpy as np
import pytest
import torch
from conftest import DATA
from scipy.io import savemat

from cbramod_fast import CBraMod
from cbramod_fast.emotion import datasets as ds
from cbramod_fast.emotion.evaluate import run_evaluate, run_predict
from cbramod_fast.emotion.protocol import EvalConfig, cached_embeddings, run_fold, subject_folds
from cbramod_fast.fusion import FitConfig, FusionModel, fit

WEIGHTS = str(DATA / "cbramod_weights_seed3_layers2.pth")
ELECTRODES = ["AF3", "F7", "F3", "FC5", "T7", "P7", "O1", "O2", "P8", "T8", "FC6", "F4", "F8", "AF4"]


def _ecg(rng, fs, secs, bpm):
    t = np.arange(int(fs * secs)) / fs
    x = 30 * rng.standard_normal(t.size)
    beat = 60.0 / bpm
    for k in np.arange(rng.uniform(0, beat), secs, beat * rng.uniform(0.97, 1.03)):
        x += 1000 * np.exp(-0.5 * ((t - k) / 0.012) ** 2)  # R wave
    return x


def write_dreamer(path, n_subj=4, n_vid=6, secs=20, shuffle=False, seed=0):
    rng = np.random.default_rng(seed)
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
            ecg_stim[v, 0] = np.stack([_ecg(rng, 256, secs, 100 if state[v] else 60) for _ in range(2)], 1)
            ecg_base[v, 0] = np.stack([_ecg(rng, 256, 4, 70) for _ in range(2)], 1)
        labels = rng.permutation(state) if shuffle else state
        scores = np.where(labels == 1, 4, 2).astype(np.float64)[:, None]
        data[0, s] = {"Age": 25, "Gender": "male", "EEG": {"baseline": eeg_base, "stimuli": eeg_stim},
                      "ECG": {"baseline": ecg_base, "stimuli": ecg_stim},
                      "ScoreValence": scores, "ScoreArousal": scores, "ScoreDominance": scores}
    savemat(str(path), {"DREAMER": {"Data": data, "EEG_SamplingRate": 128.0, "ECG_SamplingRate": 256.0,
                                    "EEG_Electrodes": np.array(ELECTRODES, dtype=object),
                                    "noOfSubjects": float(n_subj), "noOfVideoSequences": float(n_vid)}})
    return path


def _args(path, out, **kw):
    base = {"dataset": "dreamer", "path": str(path), "out": str(out), "eeg_weights": WEIGHTS, "ecg_weights": WEIGHTS,
                "preset": "tiny", "targets": "arousal", "threshold": None, "window": 10, "scheme": "loso", "k": 5, "mode": "frozen",
                "pooling": "mean", "head": "mlp", "epochs": 60, "encoder_lr_scale": 0.1, "freeze": None,
                "lr": 1e-3, "seed": 0, "baseline_correction": False, "final": False,
                "no_plots": False, "quiet": True}
    base.update(kw)
    return argparse.Namespace(**base)


def test_dreamer_loader_reads_the_real_structure(tmp_path):
    trials = ds.load_dreamer(write_dreamer(tmp_path / "DREAMER.mat", n_subj=2, n_vid=3, secs=12))
    assert len(trials) == 6 and trials[0].subject == "S01" and trials[-1].trial == "S02_T03"
    t = trials[0]
    assert t.eeg.shape == (14, 128 * 12) and t.ecg.shape == (2, 256 * 12) and t.eeg_fs == 128 and t.ecg_fs == 256
    assert t.eeg_channels == ELECTRODES and set(t.labels) == {"valence", "arousal", "dominance"}
    assert t.eeg_baseline.shape == (14, 128 * 4)


def test_dreamer_loader_bad_files(tmp_path):
    (tmp_path / "junk.mat").write_bytes(b"nope")
    with pytest.raises(ValueError, match="junk.mat"):
        ds.load_dreamer(tmp_path / "junk.mat")
    savemat(str(tmp_path / "other.mat"), {"X": 1.0})
    with pytest.raises(ValueError, match="no top-level 'DREAMER'"):
        ds.load_dreamer(tmp_path / "other.mat")
    with pytest.raises(FileNotFoundError):
        ds.load_dreamer(tmp_path / "missing.mat")


def test_planted_signal_is_found_and_shuffled_labels_are_not(tmp_path):
    res = run_evaluate(_args(write_dreamer(tmp_path / "planted.mat"), tmp_path / "out", final=True))
    for model in ("fusion", "eeg", "ecg", "baseline"):
        assert res[model]["arousal"]["auc"]["mean"] >= 0.85, (model, res[model]["arousal"]["auc"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["_meta"]["n_subjects"] == 4 and saved["_meta"]["class_balance"]["arousal"] == 0.5
    assert (tmp_path / "out" / "roc_arousal.png").is_file() and (tmp_path / "out" / "fold_03" / "fusion.pt").is_file()
    assert "fusion[eeg only]" in saved and "trial_auc" in saved["fusion"]["arousal"]

    shuf = run_evaluate(_args(write_dreamer(tmp_path / "shuffled.mat", shuffle=True), tmp_path / "out2",
                              no_plots=True))
    for model in ("fusion", "baseline"):
        pooled = shuf[model]["arousal"]["auc"]["pooled"]
        assert abs(pooled - 0.5) <= 0.2, (model, pooled)

    # the saved final model predicts from files, with both modalities or EEG only
    trial = ds.load_dreamer(tmp_path / "planted.mat")[0]
    npz = tmp_path / "trial.npz"
    np.savez(npz, eeg=trial.eeg, eeg_fs=trial.eeg_fs, ecg=trial.ecg, ecg_fs=trial.ecg_fs)
    out = run_predict(argparse.Namespace(files=[str(npz)], model=str(tmp_path / "out" / "final"), window=10,
                                         no_ecg=False, no_eeg=False, verbose=False))
    p_both = out[str(npz)]["trial"]["arousal"]
    out = run_predict(argparse.Namespace(files=[str(npz)], model=str(tmp_path / "out" / "final"), window=10,
                                         no_ecg=True, no_eeg=False, verbose=False))
    assert out[str(npz)]["modalities"] == ["eeg"]
    assert 0.0 <= p_both <= 1.0 and (p_both > 0.5) == bool(trial.labels["arousal"] > 3)


def test_no_test_subject_reaches_training_or_normalisation(tmp_path):
    trials = ds.load_dreamer(write_dreamer(tmp_path / "d.mat", n_subj=3, n_vid=4, secs=10))
    w = ds.make_windows(trials, 10, progress=False)
    y = ds.binarise(w.labels["arousal"], 3.0)[:, None]
    enc = {m: CBraMod.from_pretrained(WEIGHTS) for m in ("eeg", "ecg")}
    embs = cached_embeddings(FusionModel(enc["eeg"], enc["ecg"]), w, progress=False)
    # Poison the test subject's embeddings: if any statistic saw them, the model's means would move.
    for test in subject_folds(w.subject):
        poisoned = {m: e.clone() for m, e in embs.items()}
        sel = torch.from_numpy(np.isin(w.subject, test))
        for e in poisoned.values():
            e[sel] = 1e6
        fold = run_fold(enc, poisoned, np.zeros((len(y), 3)), y, w, test, EvalConfig(fit=FitConfig(epochs=2)))
        assert not set(w.subject[fold.train_index]) & set(test)
        for name, model in fold.models.items():
            for i, m in enumerate(model.cfg.use):
                expected = embs[m][fold.train_index].mean(0)
                assert torch.allclose(model.emb_mean[i], expected, atol=1e-4), (name, m)
        assert all(np.isfinite(p).all() for p in fold.probs.values())


def test_subject_folds():
    subj = np.array(["a", "a", "b", "c", "c", "d"])
    assert subject_folds(subj) == [["a"], ["b"], ["c"], ["d"]]
    k = subject_folds(subj, "kfold", k=2, seed=1)
    assert sorted(functools.reduce(operator.iadd, k, [])) == ["a", "b", "c", "d"] and len(k) == 2
    with pytest.raises(ValueError, match=">= 2 subjects"):
        subject_folds(np.array(["a", "a"]))


def test_fusion_model_missing_modality_and_finetune():
    enc = {m: CBraMod.from_config("tiny") for m in ("eeg", "ecg")}
    model = FusionModel(enc["eeg"], enc["ecg"], num_outputs=3, pooling="attention")
    eeg, ecg = torch.randn(4, 3, 2, 200), torch.randn(4, 2, 2, 200)
    assert model.predict(eeg=eeg, ecg=ecg).shape == (4, 3)
    assert model.predict(eeg=eeg).shape == (4, 3) and model.predict(ecg=ecg).shape == (4, 3)
    with pytest.raises(ValueError, match="at least one modality"):
        model.predict()
    y = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]])
    before = enc["ecg"].encoder.layers[0].linear1.weight.clone()
    before_eeg = enc["eeg"].encoder.layers[0].linear1.weight.clone()
    losses = fit(model, y, FitConfig(mode="finetune", epochs=2, batch_size=2, freeze=("ecg",)),
                 windows={"eeg": eeg.numpy(), "ecg": ecg.numpy()})
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert torch.equal(enc["ecg"].encoder.layers[0].linear1.weight, before)  # frozen modality
    assert not torch.equal(enc["eeg"].encoder.layers[0].linear1.weight, before_eeg)  # fine-tuned modality


@pytest.mark.shared
def test_eegmat_loader_reads_real_edfs(shared_dir):
    trials = ds.load_eegmat(shared_dir / "data" / "eeg_ecg_eegmat")
    assert len(trials) == 24 and {t.labels["task"] for t in trials} == {0.0, 1.0}
    t = trials[0]
    assert t.eeg.shape[0] == 19 and t.ecg.shape[0] == 1 and t.eeg_fs == 500
    assert "Fp1" in t.eeg_channels and np.isfinite(t.eeg).all()
    assert 20 < np.abs(t.ecg).max() < 1e5  # µV after unit conversion from the EDF's mV
