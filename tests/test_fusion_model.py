"""The fusion model: pooling, heads, modality dropout and placeholders, late fusion, stacked head training
and linear probes, frozen and fine-tuning fits.

Encoders are the 2-layer ``tiny`` preset.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion_data import tiny_encoders
from torch import nn

from cbramod_fast import CBraMod
from cbramod_fast.fusion.model import (
    FitConfig,
    FusionModel,
    HeadSpec,
    fit,
    fit_logistic,
    head_spec,
    load_head,
    stack_logits,
    train_heads,
)
from cbramod_fast.fusion.protocol import binary_metrics


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_any_channel_count_and_length_multi_task(pooling, head):
    model = FusionModel(*tiny_encoders(), num_outputs=3, pooling=pooling, head=head).eval()
    for c_eeg, c_ecg, n in ((14, 2, 3), (19, 1, 5)):
        p = model.predict(eeg=torch.randn(2, c_eeg, n, 200), ecg=torch.randn(2, c_ecg, n, 200))
        assert p.shape == (2, 3) and ((p >= 0) & (p <= 1)).all()
    # head size depends on the embedding width only (no flatten over channels x patches)
    assert sum(x.numel() for x in model.head.parameters()) < 200 * 2 * 128 + 128 * 4 + 10


def test_bad_configuration_is_rejected():
    eeg, ecg = tiny_encoders()
    with pytest.raises(ValueError, match="pooling"):
        FusionModel(eeg, ecg, pooling="flatten")
    with pytest.raises(ValueError, match="head"):
        FusionModel(eeg, ecg, head="transformer")
    with pytest.raises(ValueError, match="'ecg' is used but has no encoder"):
        FusionModel(eeg, None)
    only = FusionModel(eeg, None, use=("eeg",))
    assert only.predict(eeg=torch.randn(1, 3, 2, 200)).shape == (1, 1)


def test_modality_dropout_never_drops_every_modality():
    model = FusionModel(*tiny_encoders(), modality_dropout=0.95)
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
    eeg, ecg = tiny_encoders()
    before = {k: v.clone() for k, v in eeg.state_dict().items()}
    torch.manual_seed(5)
    model = FusionModel(eeg, ecg, num_outputs=2)
    rng = np.random.default_rng(0)
    embs = {m: torch.from_numpy(rng.standard_normal((200, 200)).astype(np.float32) * 3 + 1) for m in ("eeg", "ecg")}
    # target 0 lives in the EEG embedding, target 1 in the ECG embedding
    y = np.stack([(embs["eeg"][:, 0] > 1).numpy(), (embs["ecg"][:, 5] > 1).numpy()], 1).astype(int)
    losses = fit(model, y, FitConfig(epochs=150, lr=1e-2, seed=1), embs=embs)
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
    assert fit(model2, y, FitConfig(epochs=150, lr=1e-2, seed=1), embs=embs) == losses


def test_finetune_uses_lower_encoder_lr_and_per_modality_freezing():
    eeg, ecg = tiny_encoders()
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


def _planted_embeddings(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, 400)).astype(np.float32) * 2 + 1)
    y = torch.stack([(x[:, 3] > 1), (x[:, 250] > 1)], 1).float()  # one target per modality block
    return x, y


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_a_stack_of_heads_trains_each_as_it_would_alone(head):
    x, y = _planted_embeddings()
    spec = HeadSpec(head, (200, 200), 2, hidden=16)
    masks = torch.from_numpy(np.random.default_rng(1).random((3, len(x))) > 0.3)
    wds = [0.01, 0.1, 1.0]
    snaps, losses = train_heads(x, y, masks, spec, 1e-2, wds, 40, seed=3, checkpoints=(20,))
    assert sorted(snaps) == [20, 40] and losses.shape == (40, 3)
    stacked = stack_logits(snaps[40], x, spec)
    for g in range(3):
        alone, _ = train_heads(x, y, masks[g : g + 1], spec, 1e-2, [wds[g]], 40, seed=3)
        assert torch.allclose(stack_logits(alone[40], x, spec)[0], stacked[g], atol=1e-4), g
        # a head's standardisation comes from its own windows
        assert torch.allclose(snaps[40]["mean"][g], x[masks[g]].mean(0), atol=1e-5)
    # loaded into a model, a head predicts what the stack predicted
    model = FusionModel(*tiny_encoders(), num_outputs=2, head=head, hidden=16).eval()
    load_head(model, snaps[40], 1, spec)
    with torch.no_grad():
        out = model.head_logits({"eeg": x[:, :200], "ecg": x[:, 200:]})
    assert torch.allclose(out, stacked[1], atol=1e-4)


def test_linear_heads_are_the_logistic_regression_optimum():
    from sklearn.linear_model import LogisticRegression

    x, y = _planted_embeddings()
    masks = torch.ones(2, len(x), dtype=torch.bool)
    masks[1, :30] = False
    p = fit_logistic(x, y, masks, (200, 200), [0.1, 0.01])
    z = ((x[masks[1]] - x[masks[1]].mean(0)) / x[masks[1]].std(0)).double().numpy()
    ref = LogisticRegression(C=0.01, class_weight="balanced", max_iter=5000).fit(z, y[masks[1], 1].numpy())
    assert np.allclose(p["w"][1, :, 1].numpy(), ref.coef_[0], atol=1e-5)
    logits = stack_logits(p, x, HeadSpec("linear", (200, 200), 2))
    assert binary_metrics(y[:, 0].numpy(), logits[0, :, 0].numpy())["auc"] > 0.95


def test_late_fusion_mixes_heads_and_falls_back_to_the_present_modality():
    x, y = _planted_embeddings()
    model = FusionModel(*tiny_encoders(), num_outputs=2, head="linear", late=True, branch_heads=("linear", "mlp"),
                        hidden=8).eval()
    everything = torch.ones(1, len(x), dtype=torch.bool)
    load_head(model, fit_logistic(x, y, everything, (200, 200), [0.1]), 0, head_spec(model.cfg))
    eeg_only = fit_logistic(x[:, :200], y, everything, (200,), [0.1])
    load_head(model, eeg_only, 0, HeadSpec("linear", (200,), 2), branch="eeg")
    ecg_spec = HeadSpec("mlp", (200,), 2, hidden=8)
    snaps, _ = train_heads(x[:, 200:], y, everything, ecg_spec, 1e-2, [0.01], 5, seed=0)
    load_head(model, snaps[5], 0, ecg_spec, branch="ecg")
    embs = {"eeg": x[:, :200], "ecg": x[:, 200:]}
    with torch.no_grad():
        joint = model.head(torch.cat([model.standardised(m, e) for m, e in embs.items()], 1))
        eeg = model.branches["eeg"](model.standardised("eeg", embs["eeg"]))
        ecg = model.branches["ecg"](model.standardised("ecg", embs["ecg"]))
        assert torch.allclose(model.head_logits(embs), joint)  # the joint head alone by default
        model.mix.copy_(torch.tensor([[0.0, 2.0, 0.0, 0.5], [0.5, 0.0, 1.0, 0.0]]))
        both = model.head_logits(embs)
        assert torch.allclose(both[:, 0], 2 * eeg[:, 0] + 0.5) and torch.allclose(both[:, 1], 0.5 * joint[:, 1] + ecg[:, 1])
        assert torch.equal(model.head_logits({"eeg": embs["eeg"], "ecg": None}), eeg)
        assert torch.equal(model.head_logits({"eeg": None, "ecg": embs["ecg"]}), ecg)
    other = fit_logistic(x[:60, :200], y[:60], torch.ones(1, 60, dtype=torch.bool), (200,), [0.1])
    with pytest.raises(ValueError, match="other windows"):
        load_head(model, other, 0, HeadSpec("linear", (200,), 2), branch="eeg")
    with pytest.raises(ValueError, match="branch_heads"):
        FusionModel(*tiny_encoders(), late=True, branch_heads=("linear",))
    with pytest.raises(ValueError, match="assembled from separately trained heads"):
        fit(model, y.numpy(), FitConfig(), embs=embs)
