"""`cbramod-fast evaluate` / `predict`: planted signals found and shuffled labels not, the npz format with
k-fold, fine-tuned folds, saved models that load and predict, and one-line errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from fusion_data import dreamer_args, tiny_encoders, write_dreamer, write_npz_trials

from cbramod_fast.cli import main as cli_main
from cbramod_fast.fusion import datasets as ds
from cbramod_fast.fusion.cli import _save_fusion, load_fusion, run_evaluate, run_predict
from cbramod_fast.fusion.model import FitConfig, FusionModel, embed_all, fit
from cbramod_fast.fusion.protocol import EvalConfig, run_fold


def test_planted_signal_is_found_and_shuffled_labels_are_not(tmp_path):
    res = run_evaluate(dreamer_args(write_dreamer(tmp_path / "planted.mat"), tmp_path / "out", final=True))
    for model in ("fusion", "eeg", "ecg", "baseline"):
        assert res[model]["arousal"]["auc"]["mean"] >= 0.85, (model, res[model]["arousal"]["auc"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["_meta"]["n_subjects"] == 4 and saved["_meta"]["class_balance"]["arousal"] == 0.5
    assert (tmp_path / "out" / "roc_arousal.png").is_file() and (tmp_path / "out" / "fold_03" / "fusion.pt").is_file()
    assert "fusion[eeg only]" in saved and "trial_auc" in saved["fusion"]["arousal"]

    shuf = run_evaluate(dreamer_args(write_dreamer(tmp_path / "shuffled.mat", shuffle=True), tmp_path / "out2",
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


def test_npz_format_kfold_evaluate_and_cli_errors(tmp_path, capsys):
    folder = write_npz_trials(tmp_path / "trials")
    trials = ds.load_npz_dir(folder)
    assert len(trials) == 16 and trials[0].eeg_channels == ["Fz", "Cz", "Pz", "Oz"] and trials[0].labels == {"stress": 0.0}
    args = argparse.Namespace(
        dataset="npz", path=str(folder), out=str(tmp_path / "out"), eeg_weights=None, ecg_weights=None, preset="tiny",
        targets=None, threshold=0.5, window=5, scheme="kfold", k=2, mode="frozen", pooling="mean", head="linear",
        encoder_lr_scale=0.1, freeze=None,
        epochs=30, lr=1e-3, seed=3, baseline_correction=False, final=False, no_plots=True, quiet=True)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        res = run_evaluate(args)
    meta = res["_meta"]
    assert meta["seed"] == 3 and meta["scheme"] == "kfold" and len(meta["folds"]) == 2
    assert meta["eeg_weights"].startswith("random init")
    assert sorted(s for f in meta["folds"] for s in f["test_subjects"]) == ["sub0", "sub1", "sub2", "sub3"]
    assert set(res) >= {"fusion", "eeg", "ecg", "baseline", "fusion[eeg only]", "fusion[ecg only]"}
    assert res["baseline"]["stress"]["auc"]["mean"] > 0.9  # heart rate + alpha power are planted
    assert (tmp_path / "out" / "results.md").read_text().startswith("| model | target |")

    (folder / "broken.npz").write_bytes(b"not a zip")
    rc = cli_main(["evaluate", "npz", str(folder), "--out", str(tmp_path / "o2"), "--preset", "tiny", "--quiet"])
    assert rc == 2 and "broken.npz" in capsys.readouterr().err
    rc = cli_main(["evaluate", "npz", str(tmp_path / "empty"), "--out", str(tmp_path / "o3")])
    assert rc == 2 and "no .npz trial files" in capsys.readouterr().err
    (folder / "broken.npz").unlink()
    rc = cli_main(["evaluate", "npz", str(folder), "--out", str(tmp_path / "o4"), "--targets", "valence", "--quiet"])
    assert rc == 2 and "target 'valence' not in" in capsys.readouterr().err


def test_finetune_evaluation_copies_encoders_per_fold_and_saves_them(tmp_path):
    folder = write_npz_trials(tmp_path / "trials", n_subj=3, n_trials=2)
    trials = ds.load_npz_dir(folder)
    w = ds.make_windows(trials, 5, progress=False)
    y = ds.binarise(w.labels["stress"], 0.5)[:, None]
    enc = dict(zip(("eeg", "ecg"), tiny_encoders()))
    before = {m: {k: v.clone() for k, v in e.state_dict().items()} for m, e in enc.items()}
    cfg = EvalConfig(fit=FitConfig(mode="finetune", epochs=1, batch_size=4))
    fold = run_fold(enc, {}, np.zeros((len(y), 3)), y, w, ["sub0"], cfg)
    # the caller's encoders are untouched (the next fold must not start from weights that saw its test subject)
    for m, e in enc.items():
        assert all(torch.equal(v, before[m][k]) for k, v in e.state_dict().items()), m
    tuned = fold.models["fusion"].encoders["eeg"]
    assert not torch.equal(tuned.encoder.layers[0].linear1.weight, enc["eeg"].encoder.layers[0].linear1.weight)

    args = argparse.Namespace(
        dataset="npz", path=str(folder), out=str(tmp_path / "out"), eeg_weights=None, ecg_weights=None, preset="tiny",
        targets=None, threshold=0.5, window=5, scheme="kfold", k=2, mode="finetune", pooling="attention", head="mlp",
        encoder_lr_scale=0.5, freeze=["ecg"], epochs=1, lr=1e-3, seed=0, baseline_correction=False, final=False,
        no_plots=True, quiet=True)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        run_evaluate(args)
    saved = torch.load(tmp_path / "out" / "encoders.pt", weights_only=True)
    back = load_fusion(tmp_path / "out" / "fold_00")
    eeg_key, ecg_key = "encoder.layers.0.linear1.weight", "encoder.layers.0.linear1.weight"
    assert not torch.equal(back.encoders["eeg"].state_dict()[eeg_key], saved["eeg"]["state"][eeg_key])  # fine-tuned
    assert torch.equal(back.encoders["ecg"].state_dict()[ecg_key], saved["ecg"]["state"][ecg_key])  # --freeze ecg
    assert back.cfg.pooling == "attention"
    rc = cli_main(["evaluate", "npz", str(folder), "--out", str(tmp_path / "o5"), "--pooling", "attention"])
    assert rc == 2


def test_embed_all_matches_the_model_and_save_load_round_trip(tmp_path):
    eeg, ecg = tiny_encoders()
    model = FusionModel(eeg, ecg, num_outputs=2, head="linear")
    x = {"eeg": torch.randn(5, 4, 2, 200), "ecg": torch.randn(5, 2, 2, 200)}
    cached = {m: embed_all(model, m, x[m].numpy(), batch=2) for m in x}
    with torch.no_grad():
        assert torch.allclose(cached["eeg"], model.embed("eeg", x["eeg"]), atol=1e-5)
    fit(model, np.array([[0, 1], [1, 0], [0, 1], [1, 1], [0, 0]]), FitConfig(epochs=3), embs=cached)
    torch.save({m: {"config": e.config.to_dict(), "state": e.state_dict(), "source": "test"}
                for m, e in (("eeg", eeg), ("ecg", ecg))}, tmp_path / "encoders.pt")
    _save_fusion(model, tmp_path / "final" / "fusion.pt", ["valence", "arousal"], {"valence": 3.0, "arousal": 3.0})
    back = load_fusion(tmp_path / "final")
    assert back.targets == ["valence", "arousal"]
    for kw in ({"eeg": x["eeg"], "ecg": x["ecg"]}, {"eeg": x["eeg"]}, {"ecg": x["ecg"]}):
        assert torch.allclose(back.predict(**kw), model.predict(**kw), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="fusion.pt"):
        load_fusion(tmp_path / "nowhere")


@pytest.mark.shared
def test_predict_reads_a_real_eegmat_edf(shared_dir, tmp_path, capsys):
    pytest.importorskip("pyedflib")
    eeg, ecg = tiny_encoders()
    model = FusionModel(eeg, ecg, num_outputs=1)
    torch.save({m: {"config": e.config.to_dict(), "state": e.state_dict(), "source": "test"}
                for m, e in (("eeg", eeg), ("ecg", ecg))}, tmp_path / "encoders.pt")
    _save_fusion(model, tmp_path / "final" / "fusion.pt", ["task"], {"task": None})
    edf = shared_dir / "data" / "eeg_ecg_eegmat" / "Subject00_2.edf"
    for flag, mods in (([], ["ecg", "eeg"]), (["--no-ecg"], ["eeg"]), (["--no-eeg"], ["ecg"])):
        rc = cli_main(["predict", str(edf), "--model", str(tmp_path / "final"), "--verbose", *flag])
        out = json.loads(capsys.readouterr().out)[str(edf)]
        assert rc == 0 and out["modalities"] == mods
        assert len(out["windows"]) == 6 and 0 <= out["trial"]["task"] <= 1  # 60 s task recording, 10-s windows
    rc = cli_main(["predict", str(edf), "--model", str(tmp_path / "final"), "--no-eeg", "--no-ecg"])
    assert rc == 2 and "neither EEG nor ECG" in capsys.readouterr().err
