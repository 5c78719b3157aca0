"""Reading CBraMod checkpoints in the forms people actually have.

Accepted: a ``torch.save(state_dict)`` file (``.pth``/``.pt``/``.bin``; also dicts wrapping it under
``state_dict``/``model``), a ``.safetensors`` file, or a Hugging Face-style folder (braindecode's
``save_pretrained``: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``). Prefixes added by
wrappers (``module.`` from DDP, ``_orig_mod.`` from torch.compile) are stripped; braindecode's
classification head (``final_layer.*``) is set aside and reported, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import CBraModConfig

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_HEAD_PREFIX = "final_layer."
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
                 "pretrained_weights.pth")


@dataclass
class LoadReport:
    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    head_keys: list[str] = field(default_factory=list)  # braindecode final_layer.* (not part of the encoder)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        parts = [f"loaded {self.source}"]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        if self.head_keys:
            parts.append(f"braindecode head keys set aside: {', '.join(self.head_keys)}")
        return "; ".join(parts)


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no weights file found (looked for {', '.join(_WEIGHT_FILES)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a raw state dict (tensors on CPU) from any supported form, prefixes stripped."""
    file = _weights_file(Path(path))
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(file), device="cpu")
    else:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors have many types; name the file
            raise ValueError(f"{file}: not a readable torch checkpoint ({exc})") from exc
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{file}: expected a state dict of tensors, got {type(sd).__name__}")
    return {_strip(k): v for k, v in sd.items()}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def split_head(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate braindecode's classification head from the encoder's keys."""
    head = {k: v for k, v in sd.items() if k.startswith(_HEAD_PREFIX)}
    return {k: v for k, v in sd.items() if k not in head}, head


def infer_config(sd: dict[str, torch.Tensor], path: str | Path | None = None) -> CBraModConfig:
    """Hyperparameters from tensor shapes (and ``config.json`` beside the weights, if any)."""
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    kw: dict = {}
    if layers:
        kw["n_layer"] = max(layers) + 1
    if "encoder.layers.0.linear1.weight" in sd:
        kw["dim_feedforward"] = sd["encoder.layers.0.linear1.weight"].shape[0]
    if "proj_out.0.weight" in sd:
        kw["out_dim"] = sd["proj_out.0.weight"].shape[0]
    if path is not None:
        cfg_file = Path(path) / "config.json" if Path(path).is_dir() else None
        if cfg_file is not None and cfg_file.is_file():
            extra = json.loads(cfg_file.read_text())
            # braindecode's config names the head count n_heads (8 for the published model).
            for src, dst in (("nhead", "nhead"), ("n_heads", "nhead")):
                if isinstance(extra.get(src), int):
                    kw.setdefault(dst, extra[src])
    return CBraModConfig(**kw)
