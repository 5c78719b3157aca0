"""What a pretraining run does: ``PretrainConfig`` (defaults = a real GPU run) and the shipped CPU demo's overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError

DEMO_DATA = Path(__file__).resolve().parents[1] / "data" / "ecg_demo"  # real ECG shipped for the demo


@dataclass
class PretrainConfig:
    """Everything a run needs; the defaults are what a real (GPU) pretraining run should use."""

    data: str | None = None  # corpus folder; None = build one from the shipped demo sample
    out: str | None = None  # run folder; None = runs/pretrain-<time>
    preset: str = "base"  # model size (cbramod_fast.model.config.PRESETS)
    init: str | None = None  # start from a CBraMod checkpoint (original or braindecode layout)
    steps: int = 100_000  # optimizer steps
    batch_size: int = 128  # windows per rank per micro-step
    accum: int = 1  # micro-steps per optimizer step (gradient accumulation)
    lr: float = 5e-4  # peak learning rate (the original CBraMod recipe)
    min_lr: float = 1e-5  # cosine floor
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # linear warm-up, then cosine to min_lr at `steps`; None = auto_warmup()
    grad_clip: float = 1.0
    patch_ratio: float = 0.5  # intra-lead patch masking probability
    lead_ratio: float = 0.25  # inter-lead whole-lead masking probability
    span: int = 1  # >1: mask contiguous spans of this many patches instead of single patches
    loss_on: str = "masked"  # "masked": MSE on masked patches only; "all": every present patch
    seed: int = 0
    ckpt_every: int = 1_000
    log_every: int = 10
    workers: int | None = None  # loader worker processes per rank; None = auto_workers()
    compile: bool = False  # torch.compile the model
    backend: str = "auto"  # attention / masking kernels: auto (Triton on CUDA), torch, triton
    amp: str = "auto"  # auto = bf16 autocast on CUDA, none on CPU; or "bf16", "fp16", "none"
    device: str = "auto"  # auto = cuda:<local rank> when available, else cpu
    dropout: float = 0.1
    weight_init: str = "original"  # "original": the original CBraMod's init; "pytorch": PyTorch's default init
    stop_at: int | None = None  # leave the loop after this step (schedule still spans `steps`)

    def resolved(self) -> PretrainConfig:
        """The settings a run uses: the automatic warm-up and worker count made concrete (what config.json
        records, so a resumed run keeps its schedule)."""
        return replace(self, warmup_steps=auto_warmup(self.steps) if self.warmup_steps is None else self.warmup_steps,
                       workers=auto_workers() if self.workers is None else self.workers)

    def validate(self) -> None:
        """Raise :class:`cbramod_fast.errors.ConfigError` naming the first invalid setting."""
        from ..model.cbramod import WEIGHT_INITS
        from ..model.config import PRESETS

        if self.preset not in PRESETS:
            raise ConfigError("preset", f"unknown {{name}} {self.preset!r}; expected one of {sorted(PRESETS)}")
        for name in ("steps", "batch_size", "accum", "ckpt_every", "log_every", "span"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{{name}} must be >= 1, got {getattr(self, name)}")
        for name in ("patch_ratio", "lead_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(name, f"{{name}} must be in [0, 1], got {getattr(self, name)}")
        if self.patch_ratio == 0 and self.lead_ratio == 0 and self.loss_on == "masked":
            raise ConfigError("patch_ratio", "{name} and the lead ratio are both 0: nothing to reconstruct")
        if self.loss_on not in ("masked", "all"):
            raise ConfigError("loss_on", f"{{name}} must be 'masked' or 'all', got {self.loss_on!r}")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ConfigError("amp", f"{{name}} must be auto, bf16, fp16 or none, got {self.amp!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ConfigError("backend", f"{{name}} must be auto, torch or triton, got {self.backend!r}")
        if self.weight_init not in WEIGHT_INITS:
            raise ConfigError("weight_init", f"{{name}} must be one of {', '.join(WEIGHT_INITS)}, got "
                                             f"{self.weight_init!r}")
        if self.lr <= 0:
            raise ConfigError("lr", f"{{name}} must be > 0, got {self.lr}")
        for name in ("min_lr", "warmup_steps", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(name, f"{{name}} must be >= 0, got {getattr(self, name)}")


MAX_AUTO_WARMUP = 2_000  # the original recipe's warm-up, for runs of >= 40k steps


def auto_warmup(steps: int) -> int:
    """Default warm-up: 5 % of the run, at most 2,000 steps. A fixed 2,000 would keep the learning rate near
    zero for the whole of a short run (60 steps would never pass 3 % of the peak)."""
    return min(MAX_AUTO_WARMUP, steps // 20)


def auto_workers() -> int:
    """Default loader workers per rank: the cores this process may use, shared among the ranks of this node
    (``LOCAL_WORLD_SIZE``), less one for the training process itself; at most 4 (each worker reads
    ~10^5 windows/s, more than a GPU consumes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(4, per_rank - 1))


# The short CPU demo the README's main command runs (applied when --data is not given; explicit flags win).
DEMO_OVERRIDES = {"preset": "small", "steps": 500, "batch_size": 32, "lr": 1e-3, "ckpt_every": 100,
                  "log_every": 10, "workers": 0}
