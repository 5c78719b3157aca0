"""The fusion model: two CBraMod encoders, pooled embeddings concatenated, a (multi-task) head; its training.

Embeddings are pooled over channels and patches (mean, or attention pooling with a learned query) — never a
giant flatten head, so any channel count and window length work. A modality can be missing at prediction
time: training drops each modality at random (never both) and substitutes a learned placeholder
embedding, and ``predict(eeg=..., ecg=None)`` uses the same placeholder.

Two ways to train (``fit``): ``mode="frozen"`` (encoders fixed, their embeddings computed once and cached,
only the head learns — the default on CPU) and ``mode="finetune"`` (end to end, encoders at
``encoder_lr_scale`` times the head's learning rate; ``freeze=("eeg",)`` keeps one modality fixed).
Embedding standardisation statistics come from the training windows only and live in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..model import CBraMod

MODALITIES = ("eeg", "ecg")


class AttentionPool(nn.Module):
    """Softmax-weighted average of the (C*N) tokens against a learned query."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, D)
        w = torch.softmax(torch.tanh(self.proj(tokens)) @ self.query / tokens.shape[-1] ** 0.5, dim=1)
        return (w.unsqueeze(-1) * tokens).sum(1)


@dataclass
class FusionConfig:
    num_outputs: int = 1
    pooling: str = "mean"  # "mean" | "attention"
    head: str = "mlp"  # "mlp" | "linear"
    hidden: int = 128
    dropout: float = 0.2
    modality_dropout: float = 0.25
    use: tuple[str, ...] = MODALITIES  # which modalities the head sees ("eeg", "ecg" or both)


class FusionModel(nn.Module):
    def __init__(self, eeg_encoder: CBraMod | None, ecg_encoder: CBraMod | None, num_outputs: int = 1,
                 pooling: str = "mean", head: str = "mlp", **kw):
        super().__init__()
        self.cfg = FusionConfig(num_outputs=num_outputs, pooling=pooling, head=head, **kw)
        if pooling not in ("mean", "attention") or head not in ("mlp", "linear"):
            raise ValueError(f"pooling must be mean|attention and head mlp|linear, got {pooling!r}, {head!r}")
        self.encoders = nn.ModuleDict({k: e for k, e in (("eeg", eeg_encoder), ("ecg", ecg_encoder)) if e is not None})
        for m in self.cfg.use:
            if m not in self.encoders:
                raise ValueError(f"modality {m!r} is used but has no encoder")
        dim = 200
        self.pools = nn.ModuleDict({m: AttentionPool(dim) for m in self.cfg.use}) if pooling == "attention" else None
        self.placeholder = nn.ParameterDict({m: nn.Parameter(torch.zeros(dim)) for m in self.cfg.use})
        self.register_buffer("emb_mean", torch.zeros(len(self.cfg.use), dim))
        self.register_buffer("emb_std", torch.ones(len(self.cfg.use), dim))
        d_in = dim * len(self.cfg.use)
        if head == "mlp":
            self.head = nn.Sequential(nn.Linear(d_in, self.cfg.hidden), nn.GELU(), nn.Dropout(self.cfg.dropout),
                                      nn.Linear(self.cfg.hidden, num_outputs))
        else:
            self.head = nn.Sequential(nn.Dropout(self.cfg.dropout), nn.Linear(d_in, num_outputs))

    # -- embeddings ---------------------------------------------------------------------------------------
    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Pooled, un-normalised embedding (B, 200) of ``x`` (B, C, N, 200)."""
        tokens = self.encoders[modality].encode(x).flatten(1, 2)  # (B, C*N, D)
        return self.pools[modality](tokens) if self.pools is not None else tokens.mean(1)

    def head_logits(self, embs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Logits from raw pooled embeddings; a missing (None) modality takes the placeholder. In training,
        modality dropout replaces each modality of a sample by its placeholder (never all of them)."""
        present = [e for e in embs.values() if e is not None]
        if not present:
            raise ValueError("predict needs at least one modality")
        b = present[0].shape[0]
        parts = []
        drop = None
        if self.training and self.cfg.modality_dropout > 0 and len(self.cfg.use) > 1:
            drop = torch.rand(b, len(self.cfg.use), device=present[0].device) < self.cfg.modality_dropout
            # A sample that lost every modality keeps one, chosen per sample (not one for the whole batch).
            all_rows = drop.all(1).nonzero().squeeze(1)
            drop[all_rows, torch.randint(0, len(self.cfg.use), (len(all_rows),), device=drop.device)] = False
        for i, m in enumerate(self.cfg.use):
            ph = self.placeholder[m].expand(b, -1)
            e = embs.get(m)
            z = ph if e is None else (e - self.emb_mean[i]) / self.emb_std[i]
            if drop is not None and e is not None:
                z = torch.where(drop[:, i : i + 1], ph, z)
            parts.append(z)
        return self.head(torch.cat(parts, dim=1))

    def forward(self, eeg: torch.Tensor | None = None, ecg: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"eeg": eeg, "ecg": ecg}
        return self.head_logits({m: None if inputs[m] is None else self.embed(m, inputs[m]) for m in self.cfg.use})

    @torch.no_grad()
    def predict(self, eeg: torch.Tensor | None = None, ecg: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities (B, num_outputs); either modality may be None."""
        self.eval()
        return torch.sigmoid(self(eeg, ecg))

    def set_normalisation(self, embs: dict[str, torch.Tensor]) -> None:
        """Standardise embeddings with statistics of *training* windows only."""
        for i, m in enumerate(self.cfg.use):
            self.emb_mean[i] = embs[m].mean(0)
            self.emb_std[i] = embs[m].std(0).clamp_min(1e-6)


@torch.no_grad()
def embed_all(model: FusionModel, modality: str, x: np.ndarray, batch: int = 16) -> torch.Tensor:
    """Frozen-encoder embeddings of every window, computed once (the cache of the frozen mode)."""
    model.encoders[modality].eval()
    out = [model.embed(modality, torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0, 200)


@dataclass
class FitConfig:
    mode: str = "frozen"  # "frozen" | "finetune"
    epochs: int = 150
    lr: float = 1e-3
    weight_decay: float = 1e-2
    encoder_lr_scale: float = 0.1
    batch_size: int = 64
    freeze: tuple[str, ...] = ()
    seed: int = 0


def _train_loop(model: FusionModel, opt, yt: torch.Tensor, cfg: FitConfig, g: torch.Generator, batch_loss,
                ) -> list[float]:
    """Mini-batch epochs; ``batch_loss(idx)`` returns the loss of the windows ``idx``."""
    n, losses = len(yt), []
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = batch_loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
    model.eval()
    return losses


def fit(model: FusionModel, y: np.ndarray, cfg: FitConfig, embs: dict[str, torch.Tensor] | None = None,
        windows: dict[str, np.ndarray] | None = None) -> list[float]:
    """Train ``model`` on labels ``y`` (W, num_outputs) in {0, 1}. Frozen mode takes cached ``embs``;
    finetune mode takes raw ``windows`` (modality -> (W, C, N, 200)). Returns the loss per epoch."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    yt = torch.as_tensor(y, dtype=torch.float32).reshape(len(y), -1)
    # Class balance per output: positive weight keeps a skewed target from collapsing to one class.
    pos = yt.mean(0).clamp(0.05, 0.95)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
    use = model.cfg.use
    if cfg.mode == "frozen":
        if embs is None:
            raise ValueError("frozen mode needs cached embeddings")
        model.set_normalisation(embs)
        params = [p for n, p in model.named_parameters() if not n.startswith("encoders.")]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # The head is tiny: thread fan-out costs more than it saves (and collapses on a busy machine).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _train_loop(model, opt, yt, cfg, g, lambda idx: loss_fn(
                model.head_logits({m: embs[m][idx] for m in use}), yt[idx]))
        finally:
            torch.set_num_threads(threads)
    if cfg.mode != "finetune":
        raise ValueError(f"unknown fit mode {cfg.mode!r}")
    if windows is None:
        raise ValueError("finetune mode needs the raw windows")
    model.set_normalisation({m: embed_all(model, m, windows[m]) for m in use})
    enc_params, head_params = [], []
    for name, p in model.named_parameters():
        if name.startswith("encoders."):
            modality = name.split(".")[1]
            p.requires_grad_(modality not in cfg.freeze and p is not model.encoders[modality].patch_embedding.mask_encoding)
            if p.requires_grad:
                enc_params.append(p)
        else:
            head_params.append(p)
    opt = torch.optim.AdamW([{"params": head_params, "lr": cfg.lr},
                             {"params": enc_params, "lr": cfg.lr * cfg.encoder_lr_scale}], weight_decay=cfg.weight_decay)
    return _train_loop(model, opt, yt, cfg, g, lambda idx: loss_fn(
        model(**{m: torch.from_numpy(windows[m][idx.numpy()]) for m in use}), yt[idx]))
