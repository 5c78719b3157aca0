"""`cbramod-fast pretrain` and `cbramod-fast export`: flags → ``PretrainConfig`` → :func:`.loop.pretrain`."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path

from ..errors import ConfigError, UsageError
from .config import DEMO_DATA, DEMO_OVERRIDES, PretrainConfig
from .state import CHECKPOINT, export_encoder

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
    "weight_init": ("--weight-init", str, ("encoder initialisation: original (the original CBraMod's: "
                                           "kaiming-normal Linear weights, layers start as copies of one) or "
                                           "pytorch (PyTorch's default, independent layers)")),
    "stop_at": ("--stop-at", int, "stop after this step (the schedule still spans --steps); resume later"),
}


_AUTO = {"warmup_steps": "5 %% of --steps, at most 2000", "workers": "the cores per rank less one, at most 4"}


def _add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    for name, (flag, typ, help_) in _FLAGS.items():
        default = _AUTO.get(name, PretrainConfig.__dataclass_fields__[name].default)
        p.add_argument(flag, dest=name, type=typ, default=None, help=f"{help_} [default: {default}]")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")


def config_from_args(args: argparse.Namespace) -> tuple[PretrainConfig, dict]:
    """Defaults <- saved run config (--resume) or demo overrides (no --data) <- explicit flags."""
    explicit = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)
                if getattr(args, f.name, None) is not None}
    if args.resume:
        if "out" not in explicit:
            raise UsageError("--resume needs --out RUN (the run folder to continue)")
        cfg_file = Path(explicit["out"]) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"--resume: {cfg_file} does not exist")
        # --stop-at ends one part of a run; the resumed part runs to --steps unless it is given again.
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
    import torch

    from .loop import dist_info, pretrain

    cfg, explicit = config_from_args(args)
    if cfg.data is None and not args.resume:
        print(f"demo mode: no --data, using the real ECG sample in {DEMO_DATA} "
              f"(demo settings: {', '.join(f'{k}={v}' for k, v in DEMO_OVERRIDES.items() if k not in explicit)})",
              flush=True)
    try:
        summary = pretrain(cfg, resume=args.resume)
    except ConfigError as exc:  # the message names the flag, not the config field
        raise UsageError(exc.named(_FLAGS[exc.setting][0])) from exc
    rank, _, _ = dist_info()
    if rank == 0:
        run = Path(summary["run"])
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}; run folder {run} "
              f"({CHECKPOINT}, metrics.jsonl, loss.png, reconstruction.png)")
        wait = f"{summary['data_wait']:.1%} of the training time went to waiting for data"
        print(f"data-bound: {wait}; more --workers (or faster storage) would speed it up" if summary["data_bound"]
              else f"not data-bound: {wait}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="pretraining run folder (or its checkpoint.pt)")
    p.add_argument("--out", required=True, help="output .pth (original CBraMod state-dict layout)")


def _run_export(args: argparse.Namespace) -> int:
    print(f"wrote {export_encoder(args.run, args.out)}")
    return 0


COMMANDS = {"pretrain": (_add_pretrain_arguments, _run_pretrain), "export": (_add_export_arguments, _run_export)}
