"""Every checkpoint form people have loads into CBraMod.from_pretrained and reproduces the fixtures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA
from safetensors.torch import save_file

from cbramod_fast import CBraMod

WEIGHTS = DATA / "cbramod_weights_seed3_layers2.pth"
CASES = DATA / "cbramod_cases_seed3_layers2.pt"


@pytest.fixture(scope="module")
def sd():
    return torch.load(WEIGHTS, map_location="cpu")


@pytest.fixture(scope="module")
def cases():
    return torch.load(CASES)


def _check_fixture_outputs(model, cases):
    model.eval()
    with torch.no_grad():
        for case in cases:
            out = model(case["x"], case["mask"])
            assert (out - case["out"]).abs().max().item() <= 1e-4


def _head(c=3, n=4):  # braindecode's Flatten -> Linear(C*N*200 -> n_outputs)
    return {"final_layer.1.weight": torch.randn(2, c * n * 200), "final_layer.1.bias": torch.zeros(2)}


def _write(kind, sd, tmp_path):
    if kind == "pth":
        torch.save(sd, tmp_path / "pretrained_weights.pth")
        return tmp_path / "pretrained_weights.pth"
    if kind == "bin":
        torch.save(sd, tmp_path / "pytorch_model.bin")
        return tmp_path / "pytorch_model.bin"
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
        return tmp_path / "w.safetensors"
    if kind in ("hf-folder", "hf-folder-head"):
        folder = tmp_path / "cbramod-pretrained"
        folder.mkdir()
        payload = dict(sd, **_head()) if kind == "hf-folder-head" else sd
        save_file({k: v.contiguous() for k, v in payload.items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"n_layer": 2, "nhead": 8, "dim_feedforward": 800}))
        return folder
    if kind == "hf-folder-bin":
        folder = tmp_path / "hub"
        folder.mkdir()
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    if kind == "ddp":
        torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
        return tmp_path / "ddp.pth"
    if kind == "compiled-ddp":
        torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "c.pth")
        return tmp_path / "c.pth"
    if kind == "wrapped":
        torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
        return tmp_path / "ckpt.pt"
    raise AssertionError(kind)


FORMS = ["pth", "bin", "safetensors", "hf-folder", "hf-folder-head", "hf-folder-bin", "ddp", "compiled-ddp", "wrapped"]


@pytest.mark.parametrize("kind", FORMS)
def test_every_form_reproduces_fixtures(kind, sd, cases, tmp_path):
    model = CBraMod.from_pretrained(_write(kind, sd, tmp_path))
    assert model.config.n_layer == 2
    assert model.load_report.ok
    if kind == "hf-folder-head":
        assert model.load_report.head_keys == ["final_layer.1.bias", "final_layer.1.weight"]
    _check_fixture_outputs(model, cases)


def test_plain_load_state_dict_strict(sd, cases):
    model = CBraMod(n_layer=2)
    model.load_state_dict(sd, strict=True)  # the drop-in promise: original files load unchanged
    _check_fixture_outputs(model, cases)


def test_missing_keys_are_reported(sd, tmp_path):
    broken = {k: v for k, v in sd.items() if not k.startswith("proj_out.")}
    torch.save(broken, tmp_path / "no_proj_out.pth")
    with pytest.raises(KeyError, match=r"missing keys \(2\): proj_out.0.bias, proj_out.0.weight"):
        CBraMod.from_pretrained(tmp_path / "no_proj_out.pth")
    with pytest.warns(UserWarning, match="missing keys"):
        model = CBraMod.from_pretrained(tmp_path / "no_proj_out.pth", strict=False)
    assert model.load_report.missing == ["proj_out.0.bias", "proj_out.0.weight"]


def test_unexpected_keys_are_reported(sd, tmp_path):
    torch.save(dict(sd, **{"classifier.weight": torch.zeros(3)}), tmp_path / "extra.pth")
    with pytest.raises(KeyError, match="unexpected keys.*classifier.weight"):
        CBraMod.from_pretrained(tmp_path / "extra.pth")


def test_shape_mismatch_names_the_key(sd, tmp_path):
    bad = dict(sd)
    bad["patch_embedding.spectral_proj.0.weight"] = torch.zeros(200, 100)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"spectral_proj.0.weight has shape \(200, 100\)"):
        CBraMod.from_pretrained(tmp_path / "bad.pth")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"definitely not a pickle")
    with pytest.raises(ValueError, match="junk.pth"):
        CBraMod.from_pretrained(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        CBraMod.from_pretrained(tmp_path / "nowhere.pth")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        CBraMod.from_pretrained(tmp_path / "empty_folder")


def test_overrides_and_out_dim_inference(sd, tmp_path):
    torch.save(sd, tmp_path / "w.pth")
    model = CBraMod.from_pretrained(tmp_path / "w.pth", backend="torch")
    assert model.config.out_dim == 200 and model.backend == "torch"
