"""FusionModel unit tests: pooling, heads, modality dropout / placeholders, training modes, save/load, and
the protocol's pieces (heart rate, hand-crafted baseline, trial aggregation, npz format, CLI errors).

Encoders are the 2-layer ``tiny`` preset; end-to-end runs on DREAMER-structured files live in test_emotion.py.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from torch import nn

from cbramod_fast import CBraMod
from cbramod_fast.cli import main as cli_main
from cbramod_fast.emotion import datasets as ds
from cbramod_fast.emotion.evaluate import _save_fusion, load_fusion, run_evaluate
from cbramod_fast.emotion.protocol import (
    BASELINE_CS,
    EvalConfig,
    baseline_classifier,
    binary_metrics,
    heart_rate,
    run_fold,
    summarise,
    trial_mean,
)
from cbramod_fast.fusion import FitConfig, FusionModel, embed_all, fit


def _encoders(seed=0):
    torch.manual_seed(seed)
    return CBraMod.from_config("tiny").eval(), CBraMod.from_config("tiny").eval()


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_any_channel_count_and_length_multi_task(pooling, head):
    model = FusionModel(*_encoders(), num_outputs=3, pooling=pooling, head=head).eval()
    for c_eeg, c_ecg, n in ((14, 2, 3), (19, 1, 5)):
        p = model.predict(eeg=torch.randn(2, c_eeg, n, 200), ecg=torch.randn(2, c_ecg, n, 200))
        assert p.shape == (2, 3) and ((p >= 0) & (p <= 1)).all()
    # head size depends on the embedding width only (no flatten over channels x patches)
    assert sum(x.numel() for x in model.head.parameters()) < 200 * 2 * 128 + 128 * 4 + 10


def test_bad_configuration_is_rejected():
    eeg, ecg = _encoders()
    with pytest.raises(ValueError, match="pooling"):
        FusionModel(eeg, ecg, pooling="flatten")
    with pytest.raises(ValueError, match="head"):
        FusionModel(eeg, ecg, head="transformer")
    with pytest.raises(ValueError, match="'ecg' is used but has no encoder"):
        FusionModel(eeg, None)
    only = FusionModel(eeg, None, use=("eeg",))
    assert only.predict(eeg=torch.randn(1, 3, 2, 200)).shape == (1, 1)


def test_modality_dropout_never_drops_every_modality():
    model = FusionModel(*_encoders(), modality_dropout=0.95)
    model.head = nn.Identity()  # expose the concatenated, standardised parts
    with torch.no_grad():
        model.placeholder["eeg"].fill_(-7.0)
        model.placeholder["ecg"].fill_(7.0)
    embs = {"eeg": torch.randn(500, 200), "ecg": torch.randn(500, 200)}
    model.train()
    z = model.head_logits(embs)
    eeg_dropped = (z[:, :200] == -7.0).all(1)
    ecg_dropped = (z[:, 200:] == 7.0).all(1)
    assert not (eeg_dropped & ecg_dropped).any()
    assert eeg_dropped.sum() > 100 and ecg_dropped.sum() > 100  # dropout does happen, for both modalities
    model.eval()  # no dropout at inference; a missing modality takes its placeholder
    z = model.head_logits({"eeg": embs["eeg"], "ecg": None})
    assert (z[:, 200:] == 7.0).all() and not (z[:, :200] == -7.0).all(1).any()


def test_frozen_fit_learns_from_cached_embeddings_and_leaves_encoders_alone():
    eeg, ecg = _encoders()
    before = {k: v.clone() for k, v in eeg.state_dict().items()}
    torch.manual_seed(5)
    model = FusionModel(eeg, ecg, num_outputs=2)
    rng = np.random.default_rng(0)
    embs = {m: torch.from_numpy(rng.standard_normal((200, 200)).astype(np.float32) * 3 + 1) for m in ("eeg", "ecg")}
    # target 0 lives in the EEG embedding, target 1 in the ECG embedding
    y = np.stack([(embs["eeg"][:, 0] > 1).numpy(), (embs["ecg"][:, 5] > 1).numpy()], 1).astype(int)
    losses = fit(model, y, FitConfig(epochs=60, seed=1), embs=embs)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, before[k]) for k, v in eeg.state_dict().items())
    # standardisation comes from the embeddings it was trained on
    assert torch.allclose(model.emb_mean[0], embs["eeg"].mean(0)) and torch.allclose(model.emb_std[1], embs["ecg"].std(0))
    assert model.placeholder["eeg"].abs().sum() > 0  # the placeholder was learned through modality dropout
    with torch.no_grad():
        p = torch.sigmoid(model.eval().head_logits(embs)).numpy()
        p_eeg_only = torch.sigmoid(model.head_logits({"eeg": embs["eeg"], "ecg": None})).numpy()
    assert binary_metrics(y[:, 0], p[:, 0])["auc"] > 0.95 and binary_metrics(y[:, 1], p[:, 1])["auc"] > 0.95
    assert binary_metrics(y[:, 0], p_eeg_only[:, 0])["auc"] > 0.9  # EEG-driven target survives without ECG
    # a second fit with the same seed reproduces the first exactly
    torch.manual_seed(5)
    model2 = FusionModel(eeg, ecg, num_outputs=2)
    assert fit(model2, y, FitConfig(epochs=60, seed=1), embs=embs) == losses


def test_finetune_uses_lower_encoder_lr_and_per_modality_freezing():
    eeg, ecg = _encoders()
    model = FusionModel(eeg, ecg, num_outputs=1)
    x = {"eeg": np.random.default_rng(0).standard_normal((6, 3, 2, 200)).astype(np.float32),
         "ecg": np.random.default_rng(1).standard_normal((6, 1, 2, 200)).astype(np.float32)}
    y = np.array([0, 1, 0, 1, 0, 1])
    seen = {}
    orig = torch.optim.AdamW

    def spy(groups, **kw):
        seen["lrs"] = [g["lr"] for g in groups]
        seen["n"] = [len(g["params"]) for g in groups]
        return orig(groups, **kw)

    torch.optim.AdamW, saved = spy, torch.optim.AdamW
    try:
        fit(model, y, FitConfig(mode="finetune", epochs=1, batch_size=3, lr=1e-3, encoder_lr_scale=0.1,
                                freeze=("eeg",)), windows=x)
    finally:
        torch.optim.AdamW = saved
    assert seen["lrs"] == [1e-3, pytest.approx(1e-4)]
    n_ecg = sum(1 for n, p in ecg.named_parameters() if "mask_encoding" not in n)
    assert seen["n"][1] == n_ecg  # only the unfrozen (ECG) encoder is optimised
    assert not any(p.requires_grad for p in eeg.parameters())
    with pytest.raises(ValueError, match="frozen mode needs cached embeddings"):
        fit(model, y, FitConfig(mode="frozen"))
    with pytest.raises(ValueError, match="unknown fit mode"):
        fit(model, y, FitConfig(mode="lora"), windows=x)


def test_embed_all_matches_the_model_and_save_load_round_trip(tmp_path):
    eeg, ecg = _encoders()
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


def _ecg(fs, secs, bpm, rng):
    t = np.arange(int(fs * secs)) / fs
    x = 0.3 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * 0.3 * t)  # noise + baseline wander
    for k in np.arange(0.2, secs, 60.0 / bpm):
        x += 10 * np.exp(-0.5 * ((t - k) / 0.01) ** 2) + 2 * np.exp(-0.5 * ((t - k - 0.25) / 0.04) ** 2)
    return x


@pytest.mark.parametrize("bpm", [55, 75, 120])
@pytest.mark.parametrize("inverted", [False, True])
def test_heart_rate(bpm, inverted):
    x = _ecg(200, 10, bpm, np.random.default_rng(bpm))
    x = -x if inverted else x
    assert heart_rate(x.reshape(1, 10, 200)) == pytest.approx(bpm, abs=2)
    assert np.isnan(heart_rate(np.zeros((1, 10, 200))))


def test_baseline_chooses_regularisation_on_training_subjects_only():
    rng = np.random.default_rng(0)
    subj = np.repeat(np.arange(6), 20).astype(str)
    y = np.tile(np.arange(20) % 2, 6)
    x = np.c_[y + 0.5 * rng.standard_normal(len(y)), rng.standard_normal((len(y), 30))]
    clf = baseline_classifier(x, y, subj)
    assert clf.chosen_c in BASELINE_CS
    assert binary_metrics(y, clf.predict_proba(x)[:, 1])["auc"] > 0.9
    one = baseline_classifier(x, y, np.zeros(len(y), dtype=str))  # one subject: no inner split
    assert one.chosen_c == 0.1


def test_trial_aggregation_metrics_and_binarise():
    ids, p = trial_mean(np.array([0.2, 0.4, 0.9, 0.7]), np.array([3, 3, 5, 5]))
    assert ids.tolist() == [3, 5] and np.allclose(p, [0.3, 0.8])
    m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]))
    assert m == {"auc": 1.0, "f1": pytest.approx(0.8), "accuracy": 0.75, "balanced_accuracy": 0.75}
    assert np.isnan(binary_metrics(np.array([1, 1]), np.array([0.2, 0.9]))["auc"])
    s = summarise([{"auc": 0.6, "f1": 0, "accuracy": 1, "balanced_accuracy": 1},
                   {"auc": float("nan"), "f1": 1, "accuracy": 0, "balanced_accuracy": 0}], m)
    assert s["auc"] == {"mean": 0.6, "std": 0.0, "n_folds": 1, "pooled": 1.0} and s["f1"]["mean"] == 0.5
    assert ds.binarise(np.array([1, 3, 3.5, 5]), 3.0).tolist() == [0, 0, 1, 1]
    assert ds.binarise(np.array([0.0, 1.0]), None).tolist() == [0, 1]


def _write_npz_trials(folder, n_subj=4, n_trials=4, secs=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for s in range(n_subj):
        for k in range(n_trials):
            state = k % 2
            t = np.arange(250 * secs) / 250
            eeg = 10 * rng.standard_normal((4, t.size)) + (30 if state else 3) * np.sin(2 * np.pi * 10 * t)
            ecg = 100 * _ecg(250, secs, 110 if state else 60, rng)[None]
            np.savez(folder / f"s{s}_t{k}.npz", eeg=eeg, eeg_fs=250.0, ecg=ecg, ecg_fs=250.0, subject=f"sub{s}",
                     eeg_channels=np.array(["Fz", "Cz", "Pz", "Oz"]), label_stress=float(state))
    return folder


def test_npz_format_kfold_evaluate_and_cli_errors(tmp_path, capsys):
    folder = _write_npz_trials(tmp_path / "trials")
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


@pytest.mark.shared
def test_predict_reads_a_real_eegmat_edf(shared_dir, tmp_path, capsys):
    eeg, ecg = _encoders()
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


def test_finetune_evaluation_copies_encoders_per_fold_and_saves_them(tmp_path):
    folder = _write_npz_trials(tmp_path / "trials", n_subj=3, n_trials=2)
    trials = ds.load_npz_dir(folder)
    w = ds.make_windows(trials, 5, progress=False)
    y = ds.binarise(w.labels["stress"], 0.5)[:, None]
    enc = dict(zip(("eeg", "ecg"), _encoders()))
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
