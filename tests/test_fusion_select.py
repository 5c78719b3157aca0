"""Model selection inside a fold: subject-grouped inner splits of the training subjects only, the within-subject
score, the one-standard-error rule, late-fusion weights that hold each modality alone, and the fusion that
tracks its better modality when the other carries nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion_data import tiny_encoders

from cbramod_fast.fusion.model import FitConfig
from cbramod_fast.fusion.select import (
    SelectConfig,
    choose_mix,
    fit_models,
    inner_splits,
    one_se_choice,
    simplex_grid,
    subject_auc,
    subject_aucs,
)


def test_inner_splits_group_subjects():
    subj = np.repeat(np.array(["a", "b", "c", "d", "e"]), 4)
    splits = inner_splits(subj, 4)
    assert len(splits) == 4
    for tr, va in splits:
        assert not set(subj[tr]) & set(subj[va])
    assert sorted(np.concatenate([va for _, va in splits]).tolist()) == list(range(len(subj)))
    assert len(inner_splits(subj, 10)) == 5 and inner_splits(np.array(["a", "a"]), 4) == []


def test_subject_auc_is_within_subject():
    y = np.array([0, 1, 0, 1, 0, 0])
    subj = np.array(["a", "a", "b", "b", "c", "c"])
    score = np.array([0.1, 0.2, 10.0, 11.0, 5.0, 6.0])  # per-subject offsets do not matter
    assert subject_aucs(y, score, subj)[:2].tolist() == [1.0, 1.0] and np.isnan(subject_aucs(y, score, subj)[2])
    assert subject_auc(y, score, subj) == 1.0
    assert subject_auc(np.array([0, 1]), np.array([0.3, 0.2]), np.array(["a", "b"])) == 0.0  # pooled fallback


def test_one_standard_error_rule_prefers_the_simpler_candidate():
    per_subject = {"simple": np.array([0.6, 0.7, 0.8]), "complex": np.array([0.65, 0.75, 0.8])}
    assert one_se_choice(["simple", "complex"], per_subject)[0] == "simple"
    assert one_se_choice(["simple", "complex"], per_subject, rule="best")[0] == "complex"
    per_subject["complex"] = np.array([0.99, 0.99, 0.99])
    assert one_se_choice(["simple", "complex"], per_subject)[0] == "complex"


def test_mix_grid_holds_each_component_alone_and_picks_the_informative_one():
    grid = simplex_grid(3, 0.25)
    assert grid[:3] == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)] and len(grid) == 15
    assert all(sum(w) == pytest.approx(1.0) for w in grid)
    rng = np.random.default_rng(0)
    subj = np.repeat(np.arange(8), 20).astype(str)
    y = np.tile(np.arange(20) % 2, 8)
    oof = {"joint": y + 2.0 * rng.standard_normal(len(y)), "eeg": y + 0.3 * rng.standard_normal(len(y)),
           "ecg": rng.standard_normal(len(y))}
    record, row = choose_mix(oof, y, subj, 0.25)
    assert record["weights"]["ecg"] == 0.0 and record["weights"]["eeg"] >= 0.75 and record["inner_auc"] > 0.9
    assert len(row) == 4 and row[1] > 0 and record["calibration"][0] > 0


@pytest.mark.parametrize("informative", ["eeg", "ecg"])
def test_fusion_tracks_its_better_modality(informative):
    # One modality carries the state (consistently across subjects), the other only noise; held-out subjects.
    rng = np.random.default_rng(1)
    n_subj, per = 12, 16
    subj = np.repeat(np.arange(n_subj), per).astype(str)
    y = np.tile(np.arange(per) % 2, n_subj)[:, None]
    embs = {m: torch.from_numpy(rng.standard_normal((len(y), 200)).astype(np.float32)) for m in ("eeg", "ecg")}
    embs[informative][:, :10] += torch.from_numpy(1.2 * y.astype(np.float32))
    train = subj < "8"
    sel = SelectConfig(cs=(0.01, 1.0), weight_decays=(0.01,), epochs=(10, 30))
    models, choices = fit_models({m: e[train] for m, e in embs.items()}, y[train], subj[train],
                                 dict(zip(("eeg", "ecg"), tiny_encoders())), FitConfig(), sel, head="mlp")
    assert choices["fusion"][0]["weights"][informative] > 0 and len(choices["inner_folds"]) == 4
    for name in ("eeg", "ecg", "joint"):
        assert set(choices[name]) >= {"setting", "inner_auc", "grid"}
    test = {m: e[~train] for m, e in embs.items()}
    with torch.no_grad():
        auc = {n: subject_auc(y[~train, 0], models[n].head_logits(test)[:, 0].numpy(), subj[~train])
               for n in ("fusion", "eeg", "ecg")}
    assert auc[informative] > 0.8
    assert auc["fusion"] >= max(auc["eeg"], auc["ecg"]) - 0.02, auc
