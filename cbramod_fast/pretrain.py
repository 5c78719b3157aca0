"""Dual-masking self-supervised pretraining of the CBraMod encoder on an ECG corpus.

``cbramod-fast pretrain --data CORPUS --out RUN`` trains on a corpus built by ``cbramod-fast corpus build``;
without ``--data`` it builds a corpus from the real ECG sample shipped in ``cbramod_fast/data/ecg_demo``
and runs a short CPU demo. The run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``
(written atomically every ``ckpt_every`` steps and at the end), ``loss.png`` and ``reconstruction.png``.
``--resume`` continues a run exactly where its last checkpoint stopped (same losses and weights on CPU
fp32 as an uninterrupted run). Multi-GPU / multi-node: launch with ``torchrun`` (DDP; NCCL on GPU, gloo
on CPU). ``cbramod-fast export RUN --out encoder.pth`` writes the encoder as an original-layout state dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from .masking import dual_mask

DEMO_DATA = Path(__file__).resolve().parent / "data" / "ecg_demo"
CHECKPOINT = "checkpoint.pt"


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
    warmup_steps: int = 2_000  # linear warm-up, then cosine to min_lr at `steps`
    grad_clip: float = 1.0
    patch_ratio: float = 0.5  # intra-lead patch masking probability
    lead_ratio: float = 0.25  # inter-lead whole-lead masking probability
    span: int = 1  # >1: mask contiguous spans of this many patches instead of single patches
    loss_on: str = "masked"  # "masked": MSE on masked patches only; "all": every present patch
    seed: int = 0
    ckpt_every: int = 1_000
    log_every: int = 10
    workers: int = 4  # loader worker processes per rank
    compile: bool = False  # torch.compile the model
    backend: str = "auto"  # attention / masking kernels: auto (Triton on CUDA), torch, triton
    amp: str = "auto"  # auto = bf16 autocast on CUDA, none on CPU; or "bf16", "fp16", "none"
    device: str = "auto"  # auto = cuda:<local rank> when available, else cpu
    dropout: float = 0.1
    stop_at: int | None = None  # leave the loop after this step (schedule still spans `steps`)

    def validate(self) -> None:
        from .cli import UsageError
        from .model.config import PRESETS

        if self.preset not in PRESETS:
            raise UsageError(f"unknown --preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        for name in ("steps", "batch_size", "accum", "ckpt_every", "log_every", "span"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("patch_ratio", "lead_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.patch_ratio == 0 and self.lead_ratio == 0 and self.loss_on == "masked":
            raise UsageError("--patch-ratio and --lead-ratio are both 0: nothing to reconstruct")
        if self.loss_on not in ("masked", "all"):
            raise UsageError(f"--loss-on must be 'masked' or 'all', got {self.loss_on!r}")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise UsageError(f"--amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise UsageError(f"--backend must be auto, torch or triton, got {self.backend!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_steps < 0 or self.workers < 0:
            raise UsageError("--lr must be > 0 and --min-lr, --warmup, --workers >= 0")


# The short CPU demo the README's main command runs (applied when --data is not given; explicit flags win).
DEMO_OVERRIDES = {"preset": "small", "steps": 500, "batch_size": 32, "lr": 1e-3, "warmup_steps": 25,
                  "ckpt_every": 100, "log_every": 10, "workers": 0}


# -- in-memory loader ------------------------------------------------------------------------------------
class ArrayLoader:
    """In-memory windows behind the ``CorpusLoader`` interface (tests, the probe, small experiments).

    Each epoch is a seeded permutation; rank ``r`` takes every ``world_size``-th window of it (all ranks
    the same count, so DDP steps stay in lock-step); ``state_dict`` records the next batch to yield.
    """

    def __init__(self, x: np.ndarray | torch.Tensor, present: np.ndarray | torch.Tensor, batch_size: int = 64,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.present = torch.as_tensor(present, dtype=torch.bool)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last = drop_last
        self.epoch, self._next = 0, 0
        if len(self) == 0:
            raise ValueError(f"ArrayLoader: {len(self.x)} windows / {world_size} ranks give no batch of "
                             f"{batch_size}")

    def _indices(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.x), generator=g)
        per_rank = len(perm) // self.world_size
        return perm[self.rank::self.world_size][:per_rank]

    def __len__(self) -> int:
        per_rank = len(self.x) // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._next = epoch, 0

    def __iter__(self):
        idx = self._indices()
        while self._next < len(self):
            sel = idx[self._next * self.batch_size:(self._next + 1) * self.batch_size]
            self._next += 1
            yield {"x": self.x[sel], "present": self.present[sel], "index": sel}
        self._next = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self._next}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self._next = int(d["epoch"]), int(d["next_batch"])


# -- helpers ---------------------------------------------------------------------------------------------
def masked_mse(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, present: torch.Tensor,
               loss_on: str = "masked") -> torch.Tensor:
    """Mean squared error per patch, averaged over masked (or all) patches of present leads."""
    err = (pred.float() - x.float()).pow(2).mean(dim=-1)  # (B, C, N)
    w = mask if loss_on == "masked" else present[:, :, None].expand_as(mask)
    w = (w & present[:, :, None]).to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)


def lr_lambda(cfg: PretrainConfig):
    floor = cfg.min_lr / cfg.lr

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state(mask_gen: torch.Generator) -> dict:
    """Every RNG the loop draws from, as tensors and plain types (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "mask": mask_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss}}


def _set_rng_state(s: dict, mask_gen: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    mask_gen.set_state(s["mask"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


# -- data ------------------------------------------------------------------------------------------------
def build_demo_corpus(out_dir: Path) -> Path:
    """Build (or reuse) a corpus of the shipped real-ECG sample in ``out_dir`` with the corpus builder."""
    from .corpus.build import build_corpus  # the corpus engineer's public builder

    if not (out_dir / "manifest.json").is_file():
        build_corpus([DEMO_DATA], out_dir)
    return out_dir


def make_loader(cfg: PretrainConfig, run_dir: Path, rank: int, world: int):
    """The training loader: ``CorpusLoader`` over ``cfg.data`` (or the demo corpus)."""
    if cfg.data is None:
        if rank == 0:
            build_demo_corpus(run_dir / "corpus")
        if world > 1:
            torch.distributed.barrier()  # the other ranks wait for rank 0's build, then reuse it
        corpus = build_demo_corpus(run_dir / "corpus")
    else:
        corpus = Path(cfg.data)
        if not corpus.is_dir():
            raise FileNotFoundError(f"--data {corpus}: no such corpus folder")
    from .corpus.loader import CorpusLoader

    return CorpusLoader(corpus, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                        num_workers=cfg.workers, drop_last=True)


# -- plots -----------------------------------------------------------------------------------------------
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
    path = run_dir / "loss.png"
    fig.savefig(path.with_name("loss.tmp.png"), dpi=110)
    plt.close(fig)
    os.replace(path.with_name("loss.tmp.png"), path)
    return path


@torch.no_grad()
def plot_reconstruction(model: torch.nn.Module, x: torch.Tensor, present: torch.Tensor, cfg: PretrainConfig,
                        run_dir: Path, leads: int = 4) -> Path:
    """One window, a few leads: signal, reconstruction, masked patches shaded (whole-lead masks titled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .probe import STANDARD_LEADS

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
    path = run_dir / "reconstruction.png"
    fig.savefig(path.with_name("reconstruction.tmp.png"), dpi=110)
    plt.close(fig)
    os.replace(path.with_name("reconstruction.tmp.png"), path)
    return path


# -- training --------------------------------------------------------------------------------------------
def _device(cfg: PretrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def pretrain(cfg: PretrainConfig, resume: bool = False, loader=None, quiet: bool = False) -> dict:
    """Run (or resume) pretraining; returns a summary. ``loader`` overrides the data source (tests)."""
    from tqdm import tqdm

    from .cli import UsageError
    from .model import CBraMod
    from .model.config import PRESETS

    cfg.validate()
    rank, world, local_rank = _dist_info()
    distributed = world > 1
    device = _device(cfg, local_rank)
    if distributed and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run_dir = Path(cfg.out)
    ckpt_path = run_dir / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: {ckpt_path} does not exist")
    if not resume and ckpt_path.is_file():
        raise UsageError(f"{run_dir} already holds a run ({CHECKPOINT}); pass --resume or choose another --out")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_text(json.dumps(asdict(cfg), indent=1) + "\n", run_dir / "config.json")
    if not quiet and rank == 0:
        print("pretraining config:\n" + "\n".join(f"  {k} = {v}" for k, v in asdict(cfg).items()), flush=True)

    torch.manual_seed(cfg.seed * 1_000_003 + rank)  # dropout differs per rank; DDP syncs the weights
    np.random.seed((cfg.seed * 1_000_003 + rank) % 2**32)
    random.seed(cfg.seed * 1_000_003 + rank)
    if cfg.init:
        model = CBraMod.from_pretrained(cfg.init, backend=cfg.backend, dropout=cfg.dropout)
    else:
        model = CBraMod(**PRESETS[cfg.preset].with_(dropout=cfg.dropout).to_dict(), backend=cfg.backend)
    model.to(device)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and norms
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    mask_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1))
    if loader is None:
        loader = make_loader(cfg, run_dir, rank, world)

    step, epoch = 0, 0
    if resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["world_size"] != world:
            raise UsageError(f"{ckpt_path} was written by {ck['world_size']} ranks; resume with the same number")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        step, epoch = ck["step"], ck["epoch"]
        _set_rng_state(ck["rng"][rank], mask_gen)
        loader.set_epoch(epoch)
        loader.load_state_dict(ck["loader"][rank])
        if rank == 0:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
    else:
        loader.set_epoch(epoch)

    fwd = ddp = model
    if distributed:
        fwd = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)

    it = iter(loader)

    def next_batch():
        nonlocal it, epoch
        try:
            return next(it)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            it = iter(loader)
            return next(it)

    def checkpoint() -> None:
        states = {"rng": _rng_state(mask_gen), "loader": loader.state_dict()}
        if distributed:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, states)
        else:
            gathered = [states]
        if rank == 0:
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step,
                          "epoch": epoch, "config": asdict(cfg), "model_config": model.config.to_dict(),
                          "world_size": world, "rng": [g["rng"] for g in gathered],
                          "loader": [g["loader"] for g in gathered]}, ckpt_path)

    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    per_step = cfg.batch_size * cfg.accum * world
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    # Kept open for the whole loop (one flushed line per log step), closed in the finally below.
    metrics = open(run_dir / "metrics.jsonl", "a" if resume else "w") if rank == 0 else None  # noqa: SIM115
    bar = tqdm(total=end, initial=step, disable=rank != 0 or quiet, desc="pretrain", unit="step",
               dynamic_ncols=True)
    last_x = last_present = None
    loss_sum = torch.zeros((), device=device)
    t_log, n_log, last_loss = time.perf_counter(), 0, float("nan")
    model.train()
    try:
        while step < end:
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.accum):
                batch = next_batch()
                x = batch["x"].to(device, non_blocking=True)
                present = batch["present"].to(device, non_blocking=True)
                b, c, n, _ = x.shape
                mask = dual_mask(b, c, n, cfg.patch_ratio, cfg.lead_ratio, generator=mask_gen, present=present,
                                 span=cfg.span, backend=cfg.backend)
                sync = (ddp.no_sync() if distributed and micro < cfg.accum - 1 else contextlib.nullcontext())
                with sync:
                    with autocast:
                        pred = fwd(x, mask)
                    loss = masked_mse(pred, x, mask, present, cfg.loss_on)
                    scaler.scale(loss / cfg.accum).backward()
                step_loss += loss.detach() / cfg.accum
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr = sched.get_last_lr()[0]
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            n_log += per_step
            loss_sum += step_loss
            last_x, last_present = x, present
            bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                k = cfg.log_every if step % cfg.log_every == 0 else (step % cfg.log_every)
                if distributed:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t_log
                row = {"step": step, "loss": step_loss.item() if k == 1 else loss_sum.item() / k,
                       "last_loss": step_loss.item(), "lr": lr, "grad_norm": float(gnorm),
                       "samples_per_s": n_log / dt, "epoch": epoch}
                last_loss = row["loss"]
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{row['samples_per_s']:.0f}")
                loss_sum.zero_()
                t_log, n_log = time.perf_counter(), 0
            if step % cfg.ckpt_every == 0 or step == end:
                checkpoint()
                if rank == 0 and last_x is not None:
                    plot_loss(run_dir)
                    plot_reconstruction(model, last_x, last_present, cfg, run_dir)
                t_log, n_log = time.perf_counter(), 0  # checkpoint time is not training throughput
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if distributed:
        torch.distributed.barrier()
    return {"run": str(run_dir), "step": step, "epoch": epoch, "loss": last_loss, "model": model}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (the interrupted run's tail)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    _atomic_text("".join(line + "\n" for line in keep), path)


# -- export ----------------------------------------------------------------------------------------------
def export_encoder(run: str | Path, out: str | Path) -> Path:
    """Write the run's model as an original-layout CBraMod state dict (loads into the original class)."""
    run = Path(run)
    ckpt = run / CHECKPOINT if run.is_dir() else run
    if not ckpt.is_file():
        raise FileNotFoundError(f"{run}: no {CHECKPOINT} (is this a pretraining run folder?)")
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "model" not in ck:
        raise ValueError(f"{ckpt}: not a cbramod-fast pretraining checkpoint")
    from .model.checkpoint import _strip

    sd = {_strip(k): v.contiguous() for k, v in ck["model"].items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(sd, out)
    return out


# -- command line ----------------------------------------------------------------------------------------
_FLAGS = {  # config field -> (flag, type, help)
    "data": ("--data", str, "corpus folder from `cbramod-fast corpus build` (default: the shipped demo)"),
    "out": ("--out", str, "run folder (default: runs/pretrain-<time>)"),
    "preset": ("--preset", str, "model size: base, small, tiny"),
    "init": ("--init", str, "initialise from a CBraMod checkpoint (original or braindecode layout)"),
    "steps": ("--steps", int, "optimizer steps"),
    "batch_size": ("--batch-size", int, "windows per rank per micro-step"),
    "accum": ("--accum", int, "gradient accumulation micro-steps per optimizer step"),
    "lr": ("--lr", float, "peak learning rate"),
    "min_lr": ("--min-lr", float, "cosine schedule floor"),
    "weight_decay": ("--weight-decay", float, "AdamW weight decay"),
    "warmup_steps": ("--warmup", int, "linear warm-up steps"),
    "grad_clip": ("--grad-clip", float, "gradient norm clip"),
    "patch_ratio": ("--patch-ratio", float, "intra-lead patch masking probability"),
    "lead_ratio": ("--lead-ratio", float, "inter-lead whole-lead masking probability"),
    "span": ("--span", int, "mask contiguous spans of this many patches"),
    "loss_on": ("--loss-on", str, "masked (default) or all"),
    "seed": ("--seed", int, "random seed"),
    "ckpt_every": ("--ckpt-every", int, "checkpoint every K steps"),
    "log_every": ("--log-every", int, "log metrics every K steps"),
    "workers": ("--workers", int, "loader worker processes per rank"),
    "backend": ("--backend", str, "kernels: auto (Triton on CUDA), torch, triton"),
    "amp": ("--amp", str, "auto (bf16 on CUDA), bf16, fp16, none"),
    "device": ("--device", str, "auto, cpu, cuda, cuda:1, ..."),
    "dropout": ("--dropout", float, "dropout probability"),
    "stop_at": ("--stop-at", int, "stop after this step (the schedule still spans --steps); resume later"),
}


def _add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    for name, (flag, typ, help_) in _FLAGS.items():
        default = PretrainConfig.__dataclass_fields__[name].default
        p.add_argument(flag, dest=name, type=typ, default=None, help=f"{help_} [default: {default}]")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")


def config_from_args(args: argparse.Namespace) -> tuple[PretrainConfig, dict]:
    """Defaults <- saved run config (--resume) or demo overrides (no --data) <- explicit flags."""
    from .cli import UsageError

    explicit = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)
                if getattr(args, f.name, None) is not None}
    if args.resume:
        if "out" not in explicit:
            raise UsageError("--resume needs --out RUN (the run folder to continue)")
        cfg_file = Path(explicit["out"]) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"--resume: {cfg_file} does not exist")
        # --stop-at ends one session of a run; a resumed session runs to --steps unless given again.
        base = replace(PretrainConfig(**json.loads(cfg_file.read_text())), stop_at=None)
    else:
        base = PretrainConfig()
        if "data" not in explicit:
            base = replace(base, **DEMO_OVERRIDES)
    cfg = replace(base, **explicit)
    if cfg.out is None:
        cfg = replace(cfg, out=str(Path("runs") / time.strftime("pretrain-%Y%m%d-%H%M%S")))
    return cfg, explicit


def _run_pretrain(args: argparse.Namespace) -> int:
    cfg, explicit = config_from_args(args)
    if cfg.data is None and not args.resume:
        print(f"demo mode: no --data, using the real ECG sample in {DEMO_DATA} "
              f"(demo settings: {', '.join(f'{k}={v}' for k, v in DEMO_OVERRIDES.items() if k not in explicit)})",
              flush=True)
    summary = pretrain(cfg, resume=args.resume)
    rank, _, _ = _dist_info()
    if rank == 0:
        run = Path(summary["run"])
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}; run folder {run} "
              f"({CHECKPOINT}, metrics.jsonl, loss.png, reconstruction.png)")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="pretraining run folder (or its checkpoint.pt)")
    p.add_argument("--out", required=True, help="output .pth (original CBraMod state-dict layout)")


def _run_export(args: argparse.Namespace) -> int:
    path = export_encoder(args.run, args.out)
    print(f"wrote {path}", file=sys.stdout)
    return 0


COMMANDS = {"pretrain": (_add_pretrain_arguments, _run_pretrain), "export": (_add_export_arguments, _run_export)}
