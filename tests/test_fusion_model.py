"""The fusion model: pooling, heads, modality dropout and placeholders, frozen and fine-tuning fits.

Encoders are the 2-layer ``tiny`` preset.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion_data import tiny_encoders
from torch import nn

from cbramod_fast import CBraMod
from cbramod_fast.fusion.model import FitConfig, FusionModel, fit
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
