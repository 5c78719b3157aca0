"""Encoder hyperparameters with named presets (the original's defaults are ``"base"``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class CBraModConfig:
    in_dim: int = 200  # samples per patch (1 s at 200 Hz); the spectral layer fixes it at 200
    out_dim: int = 200  # reconstruction size of proj_out
    d_model: int = 200
    dim_feedforward: int = 800
    seq_len: int = 30  # kept for signature compatibility; the original does not use it either
    n_layer: int = 12
    nhead: int = 8  # half attend across channels, half across patches
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.d_model % 2 or self.nhead % 2:
            raise ValueError(f"d_model ({self.d_model}) and nhead ({self.nhead}) must be even: half of each "
                             "goes to the spatial and half to the temporal attention")
        if (self.d_model // 2) % (self.nhead // 2):
            raise ValueError(f"d_model/2={self.d_model // 2} is not divisible by nhead/2={self.nhead // 2}")
        if self.d_model != 200:
            # The patch embedding's time branch yields 25 channels x 8 positions = 200 features.
            raise ValueError(f"d_model must be 200 (the patch embedding yields 25x8 features), got {self.d_model}")
        if self.in_dim != 200:
            raise ValueError(f"in_dim (patch length) must be 200 samples, got {self.in_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **kw) -> CBraModConfig:
        return replace(self, **kw)


PRESETS: dict[str, CBraModConfig] = {
    "base": CBraModConfig(),  # the published CBraMod (4.92 M parameters)
    "small": CBraModConfig(n_layer=4, dim_feedforward=400),  # quick CPU pretraining demos
    "tiny": CBraModConfig(n_layer=2, dim_feedforward=200),  # unit tests
}
