"""``CBraMod``: the drop-in encoder (original constructor, state-dict keys and outputs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..kernels import resolve_backend
from .checkpoint import LoadReport, infer_config, read_state_dict, split_head
from .config import PRESETS, CBraModConfig
from .cpu_path import PATHS
from .embedding import PatchEmbedding
from .encoder import Encoder

WEIGHT_INITS = ("original", "pytorch")


def original_linear_init(m: nn.Module) -> None:
    """The original's re-initialisation of every ``nn.Linear`` weight after construction (applied with
    ``Module.apply``, i.e. in the same module order): a seeded model equals the original's tensor for tensor
    and leaves the random number generator where the original leaves it."""
    if isinstance(m, nn.Linear):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class CBraMod(nn.Module):
    """Criss-cross transformer over ``(B, C, N, 200)`` patches.

    ``forward(x, mask)`` returns the reconstruction ``(B, C, N, out_dim)`` exactly like the original;
    ``encode(x, mask)`` returns the encoder features ``(B, C, N, d_model)`` (before ``proj_out``), which
    is what fine-tuning uses. ``mask`` (B, C, N) marks patches replaced by ``mask_encoding`` (1 = masked).
    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"`` or ``"triton"``.
    ``cpu_path``: how CPU inference runs (``cpu_path.py``): ``"auto"`` (the implementation of each step
    measured fastest on this CPU; ``CBRAMOD_FAST_CPU_PATH`` may force one), ``"onednn"``, ``"blas"``,
    ``"cpp"`` (our GEMM) or ``"plain"``; ``model.cpu_path`` tells what the last CPU inference call ran.
    """

    def __init__(self, in_dim: int = 200, out_dim: int = 200, d_model: int = 200, dim_feedforward: int = 800,
                 seq_len: int = 30, n_layer: int = 12, nhead: int = 8, backend: str = "auto",
                 dropout: float = 0.1, cpu_path: str = "auto", weight_init: str = "original"):
        super().__init__()
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"unknown weight_init {weight_init!r}; expected one of {WEIGHT_INITS}")
        self.config = CBraModConfig(in_dim=in_dim, out_dim=out_dim, d_model=d_model,
                                    dim_feedforward=dim_feedforward, seq_len=seq_len, n_layer=n_layer,
                                    nhead=nhead, dropout=dropout)
        resolve_backend(backend, "cpu")  # validate the name early
        self.backend = backend
        self.patch_embedding = PatchEmbedding(self.config)
        self.encoder = Encoder(self.config, clone_layers=weight_init == "original")
        self.proj_out = nn.Sequential(nn.Linear(d_model, out_dim))
        if weight_init == "original":
            self.apply(original_linear_init)
        self.set_cpu_path(cpu_path)

    def set_cpu_path(self, mode: str) -> None:
        """Force the CPU inference path: ``"auto"``, ``"onednn"``, ``"blas"``, ``"cpp"`` or ``"plain"``."""
        if mode not in PATHS:
            raise ValueError(f"unknown cpu_path {mode!r}; expected one of {PATHS}")
        self.encoder.cpu_path = mode

    @property
    def cpu_path(self) -> str | None:
        """What the last CPU inference call ran (precision, each step's implementation, the patch embedding's
        native kernels or modules), or None."""
        layers, embed = self.encoder.last_cpu_path, self.patch_embedding.last_embed
        return layers if layers is None or embed is None else f"{layers} embed={embed}"

    @classmethod
    def from_config(cls, cfg: CBraModConfig | str, backend: str = "auto", cpu_path: str = "auto",
                    weight_init: str = "original") -> CBraMod:
        if isinstance(cfg, str):
            if cfg not in PRESETS:
                raise ValueError(f"unknown preset {cfg!r}; expected one of {sorted(PRESETS)}")
            cfg = PRESETS[cfg]
        return cls(**cfg.to_dict(), backend=backend, cpu_path=cpu_path, weight_init=weight_init)

    # -- input checks -------------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        p = self.config.in_dim
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, N, {p}), got shape {tuple(x.shape)} (rank {x.dim()})")
        if x.shape[-1] != p:
            raise ValueError(f"x must be (B, C, N, {p}): patch length {x.shape[-1]} != {p}; "
                             f"got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype} with shape {tuple(x.shape)}")
        if min(x.shape[:3]) < 1:
            raise ValueError(f"x must have B, C, N >= 1, got shape {tuple(x.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:3]):
            raise ValueError(f"mask must be (B, C, N) = {tuple(x.shape[:3])}, got {tuple(mask.shape)}")

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, mask)
        backend = resolve_backend(self.backend, x.device)
        return self.encoder(self.patch_embedding(x, mask, self.encoder.cpu_path), backend)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj_out(self.encode(x, mask))

    # -- braindecode-style raw input ----------------------------------------------------------------------
    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.in_dim
        if x.dim() != 3 or x.shape[-1] % p or x.shape[-1] == 0:
            raise ValueError(f"raw input must be (B, C, T) with T a positive multiple of {p}, "
                             f"got shape {tuple(x.shape)}")
        return x.unflatten(-1, (x.shape[-1] // p, p))

    def forward_raw(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """braindecode's convention: ``(B, C, T)`` in, ``(B, C, T // 200, out_dim)`` out (after proj_out)."""
        return self.forward(self._patches(x), mask)

    def encode_raw(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self._patches(x), mask)

    # -- checkpoints --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, strict: bool = True, backend: str = "auto",
                        cpu_path: str = "auto", **overrides) -> CBraMod:
        """Load an original or braindecode checkpoint (file or Hugging Face-style folder).

        Hyperparameters are inferred from the tensors; ``overrides`` win. With ``strict`` (default) any
        missing or unexpected encoder key raises; otherwise they are warned about. The load report is
        kept in ``model.load_report``.
        """
        sd, head = split_head(read_state_dict(path))
        cfg = infer_config(sd, path).with_(**overrides)
        model = cls(**cfg.to_dict(), backend=backend, cpu_path=cpu_path)
        model.load_report = model.load_checkpoint_state(sd, source=str(path), strict=strict)
        model.load_report.head_keys = sorted(head)
        return model

    def load_checkpoint_state(self, sd: dict[str, torch.Tensor], source: str = "state dict",
                              strict: bool = True) -> LoadReport:
        own = self.state_dict()
        report = LoadReport(source=source, missing=sorted(set(own) - set(sd)), unexpected=sorted(set(sd) - set(own)))
        for k in sorted(set(own) & set(sd)):
            if own[k].shape != sd[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, model expects {tuple(own[k].shape)}")
        if not report.ok:
            if strict:
                raise KeyError(str(report))
            warnings.warn(str(report), stacklevel=3)
        self.load_state_dict(sd, strict=False)
        return report

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
