"""The fusion model: two CBraMod encoders, pooled embeddings, a joint (multi-task) head over their
concatenation and, for late fusion, one head per modality mixed with it; how the heads are trained.

Embeddings are pooled over channels and patches (mean, or attention pooling with a learned query) — never a
giant flatten head, so any channel count and window length work. A modality can be missing at prediction
time: the joint head is trained with modality dropout (a modality replaced at random by a learned placeholder
embedding, never all of them) and takes the placeholder for a missing modality; a late-fusion model
(``late=True``) predicts from the present modality's own head instead.

Two ways to train (``fit``): ``mode="frozen"`` (encoders fixed, their embeddings computed once and cached,
only the head learns: a linear head is an L2-regularised logistic regression solved to its optimum, an MLP
head trains by full-batch AdamW, one step per epoch, so an epoch count chosen on part of the training
subjects means the same on all of them) and ``mode="finetune"`` (end to end in mini-batches, encoders at
``encoder_lr_scale`` times the head's learning rate; ``freeze=("eeg",)`` keeps one modality fixed). Frozen
MLP heads are trained by :func:`train_heads`, which fits many independent heads at once (the inner folds x
settings of :mod:`.select`) as each would train alone; linear ones by :func:`fit_logistic`. Embedding
standardisation statistics come from each head's own training windows and live in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model import CBraMod

MODALITIES = ("eeg", "ecg")
DIM = 200  # CBraMod's embedding width


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
    late: bool = False  # also a head per modality, mixed with the joint head by the `mix` buffer
    branch_heads: tuple[str, ...] = ()  # late fusion: each modality's head type (default: `head`)

    def __post_init__(self):
        if self.pooling not in ("mean", "attention") or self.head not in HEADS:
            raise ValueError(f"pooling must be mean|attention and head mlp|linear, got {self.pooling!r}, "
                             f"{self.head!r}")


HEADS = ("mlp", "linear")


def make_head(d_in: int, num_outputs: int, head: str, hidden: int, dropout: float) -> nn.Sequential:
    if head == "mlp":
        return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_outputs))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, num_outputs))


class FusionModel(nn.Module):
    def __init__(self, eeg_encoder: CBraMod | None, ecg_encoder: CBraMod | None, num_outputs: int = 1,
                 pooling: str = "mean", head: str = "mlp", **kw):
        super().__init__()
        self.cfg = c = FusionConfig(num_outputs=num_outputs, pooling=pooling, head=head, **kw)
        self.encoders = nn.ModuleDict({k: e for k, e in (("eeg", eeg_encoder), ("ecg", ecg_encoder)) if e is not None})
        for m in c.use:
            if m not in self.encoders:
                raise ValueError(f"modality {m!r} is used but has no encoder")
        self.pools = nn.ModuleDict({m: AttentionPool(DIM) for m in c.use}) if pooling == "attention" else None
        self.placeholder = nn.ParameterDict({m: nn.Parameter(torch.zeros(DIM)) for m in c.use})
        self.register_buffer("emb_mean", torch.zeros(len(c.use), DIM))
        self.register_buffer("emb_std", torch.ones(len(c.use), DIM))
        self.head = make_head(DIM * len(c.use), num_outputs, head, c.hidden, c.dropout)
        self.branches = None
        if c.late and len(c.use) > 1:
            kinds = c.branch_heads or (head,) * len(c.use)
            if len(kinds) != len(c.use) or any(k not in HEADS for k in kinds):
                raise ValueError(f"branch_heads must name one of {HEADS} per modality, got {kinds!r}")
            self.branches = nn.ModuleDict({m: make_head(DIM, num_outputs, k, c.hidden, c.dropout)
                                           for m, k in zip(c.use, kinds)})
            # logit = mix[:, 0] * joint + sum_i mix[:, 1 + i] * branch_i + mix[:, -1]; the joint head alone by default
            mix = torch.zeros(num_outputs, len(c.use) + 2)
            mix[:, 0] = 1.0
            self.register_buffer("mix", mix)

    # -- embeddings ---------------------------------------------------------------------------------------
    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Pooled, un-normalised embedding (B, 200) of ``x`` (B, C, N, 200)."""
        tokens = self.encoders[modality].encode(x).flatten(1, 2)  # (B, C*N, D)
        return self.pools[modality](tokens) if self.pools is not None else tokens.mean(1)

    def standardised(self, modality: str, e: torch.Tensor) -> torch.Tensor:
        i = self.cfg.use.index(modality)
        return (e - self.emb_mean[i]) / self.emb_std[i]

    def head_logits(self, embs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Logits from raw pooled embeddings. The joint head takes the placeholder for a missing (None)
        modality, and in training modality dropout replaces each modality of a sample by its placeholder
        (never all of them). A late-fusion model mixes the joint head with the per-modality heads; with a
        modality missing it predicts from the present modalities' own heads."""
        present = [m for m in self.cfg.use if embs.get(m) is not None]
        if not present:
            raise ValueError("predict needs at least one modality")
        if self.branches is not None and len(present) < len(self.cfg.use):
            return torch.stack([self.branches[m](self.standardised(m, embs[m])) for m in present]).mean(0)
        b = embs[present[0]].shape[0]
        parts = []
        drop = None
        if self.training and self.cfg.modality_dropout > 0 and len(self.cfg.use) > 1:
            drop = torch.rand(b, len(self.cfg.use), device=embs[present[0]].device) < self.cfg.modality_dropout
            # A sample that lost every modality keeps one, chosen per sample (not one for the whole batch).
            all_rows = drop.all(1).nonzero().squeeze(1)
            drop[all_rows, torch.randint(0, len(self.cfg.use), (len(all_rows),), device=drop.device)] = False
        for i, m in enumerate(self.cfg.use):
            ph = self.placeholder[m].expand(b, -1)
            e = embs.get(m)
            z = ph if e is None else self.standardised(m, e)
            if drop is not None and e is not None:
                z = torch.where(drop[:, i : i + 1], ph, z)
            parts.append(z)
        joint = self.head(torch.cat(parts, dim=1))
        if self.branches is None:
            return joint
        out = self.mix[:, 0] * joint + self.mix[:, -1]
        for i, m in enumerate(self.cfg.use):
            out = out + self.mix[:, 1 + i] * self.branches[m](self.standardised(m, embs[m]))
        return out

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
    return torch.cat(out) if out else torch.zeros(0, DIM)


@dataclass
class FitConfig:
    mode: str = "frozen"  # "frozen" | "finetune"
    epochs: int = 150
    lr: float = 1e-3
    weight_decay: float = 1e-2
    encoder_lr_scale: float = 0.1
    batch_size: int = 64  # finetune mode (frozen heads train full-batch)
    C: float = 0.01  # frozen linear heads: inverse L2 regularisation of the logistic regression
    freeze: tuple[str, ...] = ()
    seed: int = 0


# -- frozen heads, many at once -------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSpec:
    """A head over standardised embeddings; ``dims`` are the widths of the modality blocks it concatenates
    (each standardised on its own, each with a placeholder for modality dropout)."""

    head: str
    dims: tuple[int, ...]
    num_outputs: int
    hidden: int = 128
    dropout: float = 0.2
    modality_dropout: float = 0.25


def head_spec(c: FusionConfig, head: str | None = None, n_blocks: int | None = None) -> HeadSpec:
    """The head a fusion configuration describes, or (``head``, ``n_blocks``) one of its other heads."""
    return HeadSpec(head or c.head, (DIM,) * (n_blocks or len(c.use)), c.num_outputs, c.hidden, c.dropout,
                    c.modality_dropout)


def block_standardisation(x: torch.Tensor, masks: torch.Tensor, dims: tuple[int, ...]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (ddof 1) over each head's windows (``masks`` (G, n)), block by block: a modality's
    statistics are the same numbers whichever blocks it is concatenated with."""
    means, stds, a = [], [], 0
    for d in dims:
        xb = x[:, a : a + d].contiguous()
        a += d
        m = masks.to(xb.dtype).unsqueeze(-1)
        cnt = m.sum(1)
        mean = (xb * m).sum(1) / cnt
        var = (((xb - mean.unsqueeze(1)) ** 2) * m).sum(1) / (cnt - 1).clamp_min(1)
        means.append(mean)
        stds.append(var.sqrt().clamp_min(1e-6))
    return torch.cat(means, 1), torch.cat(stds, 1)


def _init_head_params(spec: HeadSpec, g: int, d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """nn.Linear's default initialisation, drawn once and given to every head of the stack."""
    def uniform(fan_in: int, *shape: int) -> torch.Tensor:
        return ((torch.rand(1, *shape, generator=gen) * 2 - 1) * fan_in**-0.5).expand(g, *shape).clone()

    t, h = spec.num_outputs, spec.hidden
    p = {"placeholder": torch.zeros(g, d)}
    if spec.head == "mlp":
        p |= {"w1": uniform(d, d, h), "b1": uniform(d, h), "w2": uniform(h, h, t), "b2": uniform(h, t)}
    else:
        p |= {"w": uniform(d, d, t), "b": uniform(d, t)}
    return {k: v.requires_grad_() for k, v in p.items()}


def _stack_forward(p: dict[str, torch.Tensor], z: torch.Tensor, spec: HeadSpec,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """Standardised inputs (G, n, d) -> logits (G, n, T); with ``gen``, training. The dropout masks are
    drawn once per step for all heads: each head trains as it would alone, and drawing G times as many
    random numbers would cost more than the heads' arithmetic."""
    _, n, _ = z.shape
    if gen is not None and spec.modality_dropout > 0 and len(spec.dims) > 1:
        k = len(spec.dims)
        drop = torch.rand(1, n, k, generator=gen) < spec.modality_dropout
        # a window that lost every modality keeps one, chosen per window
        keep = F.one_hot(torch.randint(0, k, (1, n), generator=gen), k).bool() & drop.all(-1, keepdim=True)
        drop = (drop & ~keep).repeat_interleave(torch.tensor(spec.dims), dim=-1)
        z = torch.where(drop, p["placeholder"].unsqueeze(1), z)

    def dropout(h: torch.Tensor) -> torch.Tensor:
        if gen is None or spec.dropout == 0:
            return h
        return h * ((torch.rand(1, *h.shape[1:], generator=gen) >= spec.dropout) / (1 - spec.dropout))

    if spec.head == "mlp":
        h = dropout(F.gelu(torch.baddbmm(p["b1"].unsqueeze(1), z, p["w1"])))
        return torch.baddbmm(p["b2"].unsqueeze(1), h, p["w2"])
    return torch.baddbmm(p["b"].unsqueeze(1), dropout(z), p["w"])


def train_heads(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, spec: HeadSpec, lr: float,
                weight_decay: list[float], epochs: int, seed: int, checkpoints: tuple[int, ...] = (),
                ) -> tuple[dict[int, dict[str, torch.Tensor]], torch.Tensor]:
    """Train ``G = len(masks)`` independent heads, head ``g`` on the windows ``masks[g]`` selects of ``x``
    (n, d) with labels ``y`` (n, T) and decoupled weight decay ``weight_decay[g]``: full-batch AdamW on a
    class-balanced BCE. Every head starts from the same initialisation and sees the same dropout draws, so
    each trains as it would alone (Adam is elementwise and the heads share no parameter), up to rounding.
    Returns the parameters, with each head's standardisation, after every epoch in ``checkpoints`` and the
    last, and the training losses (epochs, G)."""
    g, n = masks.shape
    gen = torch.Generator().manual_seed(seed)
    mean, std = block_standardisation(x, masks, spec.dims)
    z = (x.unsqueeze(0) - mean.unsqueeze(1)) / std.unsqueeze(1)
    p = _init_head_params(spec, g, x.shape[1], gen)
    w = masks.to(x.dtype)
    cnt = w.sum(1)
    yt = y.to(x.dtype).reshape(n, -1)
    # Class balance per head and output: a positive weight keeps a skewed target from collapsing to one class.
    pos = ((yt.unsqueeze(0) * w.unsqueeze(-1)).sum(1) / cnt.unsqueeze(1)).clamp(0.05, 0.95)
    pos_weight = ((1 - pos) / pos).unsqueeze(1)
    decay = 1 - lr * torch.as_tensor(weight_decay, dtype=x.dtype).reshape(g)
    opt = torch.optim.Adam(list(p.values()), lr=lr)
    snaps, losses = {}, []
    # The heads are small: thread fan-out costs more than it saves (and collapses on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(1, epochs + 1):
            out = _stack_forward(p, z, spec, gen)
            el = F.binary_cross_entropy_with_logits(out, yt.expand(g, n, -1), pos_weight=pos_weight, reduction="none")
            per_head = (el.mean(-1) * w).sum(1) / cnt
            opt.zero_grad()
            per_head.sum().backward()
            with torch.no_grad():  # AdamW's decoupled decay, before the step, one rate per head
                for v in p.values():
                    v.mul_(decay.view(g, *[1] * (v.dim() - 1)))
            opt.step()
            losses.append(per_head.detach())
            if epoch in checkpoints or epoch == epochs:
                snaps[epoch] = {"mean": mean, "std": std, **{k: v.detach().clone() for k, v in p.items()}}
    finally:
        torch.set_num_threads(threads)
    return snaps, torch.stack(losses)


def rate_logit(p: float) -> float:
    """The logit of a class rate, kept finite: what a model of a one-class target predicts."""
    q = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(q / (1 - q)))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, dims: tuple[int, ...],
                 cs: list[float]) -> dict[str, torch.Tensor]:
    """Linear heads of the frozen mode: for each head ``g``, an L2-regularised, class-balanced logistic
    regression (inverse regularisation ``cs[g]``, solved to its optimum by scikit-learn's lbfgs) on the windows
    ``masks[g]`` selects, standardised with their own statistics. Starting from zero rather than a random
    initialisation, an optimum rather than an early-stopped descent: the usual linear probe of frozen
    features. Returns the stack's parameters in :func:`train_heads`' layout."""
    from sklearn.linear_model import LogisticRegression

    g, n = masks.shape
    yt = y.reshape(n, -1)
    t = yt.shape[1]
    mean, std = block_standardisation(x, masks, dims)
    w, b = torch.zeros(g, x.shape[1], t), torch.zeros(g, t)
    for i in range(g):
        sel = masks[i]
        z = ((x[sel] - mean[i]) / std[i]).double().numpy()
        for j in range(t):
            yj = yt[sel, j].numpy()
            if len(np.unique(yj)) < 2:  # one class: its rate, whatever the input
                b[i, j] = rate_logit(float(yj.mean()))
                continue
            clf = LogisticRegression(C=cs[i], class_weight="balanced", max_iter=5000).fit(z, yj)
            w[i, :, j] = torch.from_numpy(clf.coef_[0])
            b[i, j] = float(clf.intercept_[0])
    return {"mean": mean, "std": std, "placeholder": torch.zeros(g, x.shape[1]), "w": w, "b": b}


@torch.no_grad()
def stack_logits(params: dict[str, torch.Tensor], x: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """Logits (G, n, T) of every head of a stack for the windows ``x`` (n, d), in inference mode."""
    z = (x.unsqueeze(0) - params["mean"].unsqueeze(1)) / params["std"].unsqueeze(1)
    return _stack_forward(params, z, spec)


@torch.no_grad()
def load_head(model: FusionModel, params: dict[str, torch.Tensor], g: int, spec: HeadSpec,
              branch: str | None = None) -> None:
    """Copy head ``g`` of a stack into ``model``: its joint head with the standardisation and placeholders,
    or (``branch``) that modality's own head, whose standardisation the model must already hold."""
    target = model.head if branch is None else model.branches[branch]
    pairs = [(target[0], "w1", "b1"), (target[3], "w2", "b2")] if spec.head == "mlp" else [(target[1], "w", "b")]
    for lin, wk, bk in pairs:
        lin.weight.copy_(params[wk][g].T)
        lin.bias.copy_(params[bk][g])
    a = 0
    for m, d in zip(model.cfg.use if branch is None else (branch,), spec.dims):
        i = model.cfg.use.index(m)
        mean, std = params["mean"][g, a : a + d], params["std"][g, a : a + d]
        if branch is None:
            model.emb_mean[i] = mean
            model.emb_std[i] = std
            model.placeholder[m].copy_(params["placeholder"][g, a : a + d])
        elif not (torch.equal(model.emb_mean[i], mean) and torch.equal(model.emb_std[i], std)):
            raise ValueError(f"the {m} head was trained on other windows than the joint head")
        a += d


# -- training ---------------------------------------------------------------------------------------------

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
    """Train ``model`` on labels ``y`` (W, num_outputs) in {0, 1}. Frozen mode takes cached ``embs`` and
    fits the joint head: a logistic regression (``cfg.C``) for ``head="linear"``, full-batch AdamW for
    ``"mlp"``; finetune mode takes raw ``windows`` (modality -> (W, C, N, 200)). Returns the loss per epoch
    (none for the logistic regression)."""
    yt = torch.as_tensor(y, dtype=torch.float32).reshape(len(y), -1)
    use = model.cfg.use
    if cfg.mode == "frozen":
        if embs is None:
            raise ValueError("frozen mode needs cached embeddings")
        if model.branches is not None:
            raise ValueError("a late-fusion model is assembled from separately trained heads (fusion.select)")
        spec = head_spec(model.cfg)
        x = torch.cat([embs[m] for m in use], 1)
        everything = torch.ones(1, len(yt), dtype=torch.bool)
        if spec.head == "linear":
            load_head(model, fit_logistic(x, yt, everything, spec.dims, [cfg.C]), 0, spec)
            return []
        snaps, losses = train_heads(x, yt, everything, spec, cfg.lr, [cfg.weight_decay], cfg.epochs, cfg.seed)
        load_head(model, snaps[cfg.epochs], 0, spec)
        model.eval()
        return losses[:, 0].tolist()
    if cfg.mode != "finetune":
        raise ValueError(f"unknown fit mode {cfg.mode!r}")
    if windows is None:
        raise ValueError("finetune mode needs the raw windows")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # Class balance per output: positive weight keeps a skewed target from collapsing to one class.
    pos = yt.mean(0).clamp(0.05, 0.95)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
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
