"""The pretraining loop, top to bottom: set up (devices, seeds, model, optimizer, data), resume if asked, then
per step mask → forward → masked MSE → backward → clip → AdamW, logging and checkpointing as it goes.

The next batch is fetched and copied to the device while a step runs (:class:`.data.DeviceFeed`); each
metrics row says what fraction of the time went to waiting for data, and the run's summary whether it was
data-bound."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_text
from ..errors import ConfigError
from ..masking import dual_mask, masked_mse
from .config import PretrainConfig, auto_warmup
from .data import DeviceFeed, EpochBatches, make_loader
from .plots import plot_loss, plot_reconstruction
from .state import CHECKPOINT, load_checkpoint, save_checkpoint, truncate_metrics

DATA_BOUND = 0.1  # a run that waits for data this fraction of its time or more is data-bound


def lr_lambda(cfg: PretrainConfig):
    """Learning-rate factor per step: linear warm-up, then cosine from 1 to ``min_lr / lr`` at ``steps``."""
    floor = cfg.min_lr / cfg.lr
    warmup = auto_warmup(cfg.steps) if cfg.warmup_steps is None else cfg.warmup_steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def dist_info() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` as ``torchrun`` sets them (one process: 0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: PretrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _model(cfg: PretrainConfig) -> torch.nn.Module:
    from ..model import CBraMod
    from ..model.config import PRESETS

    if cfg.init:
        return CBraMod.from_pretrained(cfg.init, backend=cfg.backend, dropout=cfg.dropout)
    return CBraMod(**PRESETS[cfg.preset].with_(dropout=cfg.dropout).to_dict(), backend=cfg.backend,
                   weight_init=cfg.weight_init)


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> tuple[torch.optim.Optimizer, list]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and norms
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    return opt, params


def pretrain(cfg: PretrainConfig, resume: bool = False, loader=None, quiet: bool = False) -> dict:
    """Run (or resume) pretraining; returns a summary (with ``data_wait``, the fraction of the loop's time spent
    waiting for batches, and ``data_bound``). ``loader`` overrides the data source (tests)."""
    from tqdm import tqdm

    # -- devices and the run folder
    cfg.validate()
    cfg = cfg.resolved()
    rank, world, local_rank = dist_info()
    distributed = world > 1
    device = _device(cfg, local_rank)
    if distributed and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run_dir = Path(cfg.out)
    ckpt_path = run_dir / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"cannot resume: {ckpt_path} does not exist")
    if not resume and ckpt_path.is_file():
        raise ConfigError("out", f"{{name}} {run_dir} already holds a run ({CHECKPOINT}); resume it or choose "
                                 "another run folder")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=1) + "\n")
    if not quiet and rank == 0:
        print("pretraining config:\n" + "\n".join(f"  {k} = {v}" for k, v in asdict(cfg).items()), flush=True)

    # -- seeds, model, optimizer, data (in this order: the RNG streams depend on it)
    torch.manual_seed(cfg.seed * 1_000_003 + rank)  # dropout differs per rank; DDP syncs the weights
    np.random.seed((cfg.seed * 1_000_003 + rank) % 2**32)
    random.seed(cfg.seed * 1_000_003 + rank)
    model = _model(cfg).to(device)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    opt, params = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    mask_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1))
    if loader is None:
        loader = make_loader(cfg, run_dir, rank, world, device)

    # -- resume: weights, optimizer, every RNG and the loader position, exactly where the checkpoint left them
    step, epoch = 0, 0
    if resume:
        step, epoch = load_checkpoint(ckpt_path, model, opt, sched, scaler, mask_gen, loader, rank, world)
        if rank == 0:
            truncate_metrics(run_dir / "metrics.jsonl", step)
    else:
        loader.set_epoch(epoch)
    fwd = ddp = model
    if distributed:
        fwd = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)
    feed = DeviceFeed(EpochBatches(loader, epoch), device)

    # -- the loop
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
    wait_log, loop_s, t_loop = feed.wait_s, 0.0, time.perf_counter()
    model.train()
    try:
        while step < end:
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.accum):
                batch = feed.next()
                x, present = batch["x"], batch["present"]
                b, c, n, _ = x.shape
                mask = dual_mask(b, c, n, cfg.patch_ratio, cfg.lead_ratio, generator=mask_gen, present=present,
                                 span=cfg.span, backend=cfg.backend)
                # Gradients are all-reduced on the last micro-step only.
                sync = (ddp.no_sync() if distributed and micro < cfg.accum - 1 else contextlib.nullcontext())
                with sync:
                    with autocast:
                        pred = fwd(x, mask)
                    loss = masked_mse(pred, x, mask, present, cfg.loss_on, backend=cfg.backend)
                    scaler.scale(loss / cfg.accum).backward()
                step_loss += loss.detach() / cfg.accum
                if step + 1 < end or micro + 1 < cfg.accum:
                    feed.preload()  # the next batch, while this step's queued work runs
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr = sched.get_last_lr()[0]
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            n_log += per_step
            loss_sum += step_loss  # stays on the device: the host reads losses only when it logs
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
                       "samples_per_s": n_log / dt, "data_wait": (feed.wait_s - wait_log) / dt,
                       "epoch": feed.position()[0]}
                last_loss = row["loss"]
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{row['samples_per_s']:.0f}")
                loss_sum.zero_()
                t_log, n_log, wait_log = time.perf_counter(), 0, feed.wait_s

            if step % cfg.ckpt_every == 0 or step == end:
                loop_s += time.perf_counter() - t_loop
                save_checkpoint(ckpt_path, model, opt, sched, scaler, step, feed.position(), cfg, mask_gen, rank,
                                world)
                if rank == 0 and last_x is not None:
                    plot_loss(run_dir)
                    plot_reconstruction(model, last_x, last_present, cfg, run_dir)
                # checkpoint time is neither training throughput nor waiting for data
                t_log, n_log, wait_log, t_loop = time.perf_counter(), 0, feed.wait_s, time.perf_counter()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if distributed:
        torch.distributed.barrier()
    data_wait = feed.wait_s / loop_s if loop_s > 0 else 0.0
    return {"run": str(run_dir), "step": step, "epoch": feed.position()[0], "loss": last_loss, "model": model,
            "data_wait": data_wait, "data_bound": data_wait >= DATA_BOUND}
