"""A pretraining run's state on disk: the checkpoint (model, optimizer, every RNG and loader position of every
rank), resuming from it, the metrics log's tail, and the encoder export."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_text, atomic_write
from ..errors import UsageError

CHECKPOINT = "checkpoint.pt"


def rng_state(mask_gen: torch.Generator) -> dict:
    """Every RNG the loop draws from, as tensors and plain types (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "mask": mask_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss}}


def set_rng_state(s: dict, mask_gen: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    mask_gen.set_state(s["mask"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def save_checkpoint(path: Path, model, opt, sched, scaler, step: int, position: tuple[int, dict], cfg, mask_gen,
                    rank: int, world: int) -> None:
    """Every rank calls this (the RNG and loader states of all ranks are gathered); rank 0 writes ``path``.
    ``position``: ``(epoch, loader state)`` where this rank's data continues (not counting prefetched batches)."""
    epoch, loader_state = position
    states = {"rng": rng_state(mask_gen), "loader": loader_state}
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, states)
    else:
        gathered = [states]
    if rank == 0:
        ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "config": asdict(cfg),
              "model_config": model.config.to_dict(), "world_size": world, "rng": [g["rng"] for g in gathered],
              "loader": [g["loader"] for g in gathered]}
        atomic_write(path, lambda tmp: torch.save(ck, tmp))


def load_checkpoint(path: Path, model, opt, sched, scaler, mask_gen, loader, rank: int, world: int
                    ) -> tuple[int, int]:
    """Restore everything :func:`save_checkpoint` wrote for this rank; returns ``(step, epoch)``."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck["world_size"] != world:
        raise UsageError(f"{path} was written by {ck['world_size']} ranks; resume with the same number")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["scaler"])
    set_rng_state(ck["rng"][rank], mask_gen)
    loader.set_epoch(ck["epoch"])
    loader.load_state_dict(ck["loader"][rank])
    return ck["step"], ck["epoch"]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (the interrupted run's tail)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_text(path, "".join(line + "\n" for line in keep))


def export_encoder(run: str | Path, out: str | Path) -> Path:
    """Write the run's model as an original-layout CBraMod state dict (loads into the original class)."""
    run = Path(run)
    ckpt = run / CHECKPOINT if run.is_dir() else run
    if not ckpt.is_file():
        raise FileNotFoundError(f"{run}: no {CHECKPOINT} (is this a pretraining run folder?)")
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "model" not in ck:
        raise ValueError(f"{ckpt}: not a cbramod-fast pretraining checkpoint")
    from ..model.checkpoint import _strip

    sd = {_strip(k): v.contiguous() for k, v in ck["model"].items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.save(sd, tmp))
    return out
