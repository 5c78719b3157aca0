"""`cbramod-fast evaluate` / `predict`: planted signals found, every fitted object saved, subject
independence checked from outside (one subject's recordings changed: the fold that tests it is unchanged, a
leaky variant is caught), the npz format with k-fold, fine-tuned folds, saved models that load and predict,
and one-line errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from fusion_data import (
    QUICK,
    WEIGHTS,
    distort_subject,
    dreamer_args,
    evaluate_args,
    fold_differences,
    tiny_encoders,
    write_dreamer,
    write_npz_trials,
)

from cbramod_fast.cli import main as cli_main
from cbramod_fast.fusion import cli as fusion_cli
from cbramod_fast.fusion import datasets as ds
from cbramod_fast.fusion.baseline import Baseline
from cbramod_fast.fusion.cli import _save_fusion, load_fusion, run_evaluate, run_predict
from cbramod_fast.fusion.model import FitConfig, FusionModel, embed_all, fit
from cbramod_fast.fusion.protocol import EvalConfig, cached_embeddings, run_fold


def test_planted_signal_is_found_every_fitted_object_is_saved_and_predict_works(tmp_path):
    res = run_evaluate(dreamer_args(write_dreamer(tmp_path / "planted.mat"), tmp_path / "out", final=True, **QUICK))
    for model in ("fusion", "eeg", "ecg", "baseline"):
        assert res[model]["arousal"]["auc"]["mean"] >= 0.85, (model, res[model]["arousal"]["auc"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["_meta"]["n_subjects"] == 4 and saved["_meta"]["class_balance"]["arousal"] == 0.5
    assert (tmp_path / "out" / "roc_arousal.png").is_file()
    assert "fusion[eeg only]" in saved and "trial_auc" in saved["fusion"]["arousal"]
    for folder in [tmp_path / "out" / f"fold_{i:02d}" for i in range(4)] + [tmp_path / "out" / "final"]:
        assert sorted(p.name for p in folder.iterdir()) == FOLD_FILES, folder
    # the inner choices of every fold are in _meta and in the fold's selection.json
    meta = saved["_meta"]["folds"][1]
    sel = json.loads((tmp_path / "out" / "fold_01" / "selection.json").read_text())
    assert meta["test_subjects"] == sel["test_subjects"] == ["S02"] and "S02" not in sel["train_subjects"]
    assert {"eeg", "ecg", "joint", "fusion", "baseline"} <= set(meta) and "grid" in sel["eeg"]
    assert sum(meta["fusion"][0]["weights"].values()) == pytest.approx(1.0)
    # every saved model reproduces what the fold predicted: the fitted state is complete
    base = json.loads((tmp_path / "out" / "fold_01" / "baseline.json").read_text())
    fitted = Baseline.from_dict(base["targets"]["arousal"])
    assert fitted.C == sel["baseline"][0]["C"] and len(fitted.coef) == len(base["features"])
    for name in ("fusion", "eeg", "ecg"):
        model = load_fusion(tmp_path / "out" / "fold_01", name)
        assert model.cfg.late == (name == "fusion")

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
    p_eeg = out[str(npz)]["trial"]["arousal"]
    assert 0.0 <= p_both <= 1.0 and (p_both > 0.5) == (p_eeg > 0.5) == bool(trial.labels["arousal"] > 3)


FOLD_FILES = ["baseline.json", "ecg.pt", "eeg.pt", "fusion.pt", "selection.json"]


def _independence_runs(tmp_path, tag):
    """Evaluate the planted npz trials, then again with sub1's recordings changed; the two output folders."""
    folder = tmp_path / "trials" if (tmp_path / "trials").is_dir() else write_npz_trials(tmp_path / "trials")
    changed = tmp_path / "changed" if (tmp_path / "changed").is_dir() else distort_subject(folder, tmp_path / "changed", "sub1")
    outs = []
    for name, src in (("a", folder), ("b", changed)):
        args = evaluate_args("npz", src, tmp_path / f"{tag}_{name}", eeg_weights=WEIGHTS, ecg_weights=WEIGHTS,
                             threshold=0.5, window=5, quiet=True, no_plots=True, **QUICK)
        res = run_evaluate(args)
        assert [f["test_subjects"] for f in res["_meta"]["folds"]] == [["sub0"], ["sub1"], ["sub2"], ["sub3"]]
        outs.append(tmp_path / f"{tag}_{name}")
    return outs


def test_changing_one_subject_changes_no_fitted_object_of_the_fold_that_tests_it(tmp_path):
    a, b = _independence_runs(tmp_path, "clean")
    # the fold that tests sub1 fitted everything from the other subjects: every file equal
    assert sorted(p.name for p in (a / "fold_01").iterdir()) == FOLD_FILES
    assert fold_differences(a / "fold_01", b / "fold_01") == []
    # the folds that trained on sub1 saw the change: every fitted model differs (so the check can fail)
    for i in (0, 2, 3):
        diff = fold_differences(a / f"fold_{i:02d}", b / f"fold_{i:02d}")
        assert {"fusion.pt", "eeg.pt", "ecg.pt", "baseline.json"} <= set(diff), (i, diff)

    # A deliberately leaky variant, standardising the embeddings with every window (the test subject's
    # included), is caught by the same comparison: the check works.
    def leaky(*a, **kw):
        embs = cached_embeddings(*a, **kw)
        return {m: (e - e.mean(0)) / e.std(0) for m, e in embs.items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fusion_cli, "cached_embeddings", leaky)
        la, lb = _independence_runs(tmp_path, "leaky")
    assert {"fusion.pt", "eeg.pt", "ecg.pt"} <= set(fold_differences(la / "fold_01", lb / "fold_01"))


def test_npz_format_kfold_evaluate_and_cli_errors(tmp_path, capsys):
    folder = write_npz_trials(tmp_path / "trials")
    trials = ds.load_npz_dir(folder)
    assert len(trials) == 16 and trials[0].eeg_channels == ["Fz", "Cz", "Pz", "Oz"] and trials[0].labels == {"stress": 0.0}
    args = evaluate_args("npz", folder, tmp_path / "out", preset="tiny", threshold=0.5, window=5, scheme="kfold", k=2,
                         head="linear", seed=3, no_select=True, no_plots=True, quiet=True)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        res = run_evaluate(args)
    meta = res["_meta"]
    assert meta["seed"] == 3 and meta["scheme"] == "kfold" and len(meta["folds"]) == 2
    assert meta["eeg_weights"].startswith("random init") and "without inner selection" in meta["folds"][0]["note"]
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
    rc = cli_main(["evaluate", "npz", str(folder), "--out", str(tmp_path / "o5"), "--mix-step", "0.3", "--quiet"])
    assert rc == 2 and "--mix-step must divide 1" in capsys.readouterr().err
    rc = cli_main(["evaluate", "npz", str(folder), "--out", str(tmp_path / "o6"), "--select-heads", "tree"])
    assert rc == 2 and "--select-heads" in capsys.readouterr().err


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

    args = evaluate_args("npz", folder, tmp_path / "out", preset="tiny", threshold=0.5, window=5, scheme="kfold", k=2,
                         mode="finetune", pooling="attention", encoder_lr_scale=0.5, freeze=["ecg"], epochs=1,
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
