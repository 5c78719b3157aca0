"""Dual-masking self-supervised pretraining of the CBraMod encoder on an ECG corpus.

``cbramod-fast pretrain --data CORPUS --out RUN`` trains on a corpus built by ``cbramod-fast corpus build``;
without ``--data`` it builds a corpus from the real ECG sample shipped in ``cbramod_fast/data/ecg_demo``
and runs a short CPU demo. The run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``
(written atomically every ``ckpt_every`` steps and at the end), ``loss.png`` and ``reconstruction.png``.
The loss is :func:`cbramod_fast.masking.masked_mse` (Triton on CUDA, its PyTorch twin elsewhere).
``--resume`` continues a run exactly where its last checkpoint stopped (same losses and weights on CPU
fp32 as an uninterrupted run). Multi-GPU / multi-node: launch with ``torchrun`` (DDP; NCCL on GPU, gloo
on CPU). ``cbramod-fast export RUN --out encoder.pth`` writes the encoder as an original-layout state dict.

Modules: :mod:`.config` (the settings) → :mod:`.data` (batches) → :mod:`.loop` (the training loop) with
:mod:`.state` (checkpoint, resume, export) and :mod:`.plots`; :mod:`.cli` is the command line.
"""

from __future__ import annotations

from .config import DEMO_DATA, DEMO_OVERRIDES, PretrainConfig, auto_warmup, auto_workers
from .data import ArrayLoader, DeviceFeed, build_demo_corpus, make_loader
from .loop import lr_lambda, pretrain
from .state import CHECKPOINT, export_encoder

__all__ = ["CHECKPOINT", "DEMO_DATA", "DEMO_OVERRIDES", "ArrayLoader", "DeviceFeed", "PretrainConfig",
           "auto_warmup", "auto_workers", "build_demo_corpus", "export_encoder", "lr_lambda", "make_loader",
           "pretrain"]
