"""A pretraining run's pictures: ``loss.png`` (masked-patch MSE per step) and ``reconstruction.png``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..masking import dual_mask
from ..readers import STANDARD_LEADS
from .config import PretrainConfig


def plot_loss(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-patch MSE (µV/100)²")
    ax.set_title(f"pretraining loss ({run_dir.name})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = atomic_write(run_dir / "loss.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


@torch.no_grad()
def plot_reconstruction(model: torch.nn.Module, x: torch.Tensor, present: torch.Tensor, cfg: PretrainConfig,
                        run_dir: Path, leads: int = 4) -> Path:
    """One window, a few leads: signal, reconstruction, masked patches shaded (whole-lead masks titled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    i = int(present.sum(dim=1).argmax())  # the window with the most leads: whole-lead masks show best
    x, present = x[i:i + 1].float(), present[i:i + 1]
    _, c, n, p = x.shape
    g = torch.Generator(device=x.device).manual_seed(1234)  # own generator: training RNG untouched
    mask = dual_mask(1, c, n, cfg.patch_ratio, cfg.lead_ratio, generator=g, present=present,
                     span=cfg.span, backend="torch")
    pred = model(x, mask).float()
    model.train(was_training)
    order = sorted(range(c), key=lambda i: (not bool(mask[0, i].all() and present[0, i]), not bool(present[0, i])))
    show = [i for i in order if present[0, i]][:leads]
    fig, axes = plt.subplots(len(show), 1, figsize=(10, 1.8 * len(show)), sharex=True, squeeze=False)
    t = np.arange(n * p) / p
    for ax, ci in zip(axes[:, 0], show):
        ax.plot(t, x[0, ci].reshape(-1).cpu(), color="k", lw=0.8, label="signal")
        # Only masked patches are reconstruction targets; the rest of the output is not trained.
        rec = pred[0, ci].cpu().masked_fill(~mask[0, ci, :, None].cpu(), float("nan")).reshape(-1)
        ax.plot(t, rec, color="tab:red", lw=0.8, alpha=0.9, label="reconstruction (masked patches)")
        for k in range(n):
            if mask[0, ci, k]:
                ax.axvspan(k, k + 1, color="tab:orange", alpha=0.15, lw=0)
        name = STANDARD_LEADS[ci] if c == len(STANDARD_LEADS) else f"lead {ci}"
        ax.set_ylabel(name)
        ax.set_title(f"{name}: whole lead masked" if mask[0, ci].all() else f"{name}: masked patches shaded",
                     fontsize=8, loc="left")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path = atomic_write(run_dir / "reconstruction.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
