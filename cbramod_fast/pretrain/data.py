"""Where pretraining batches come from: the corpus loader over ``--data`` (or the shipped demo), or windows in
memory; and how they reach the device one step ahead (:class:`DeviceFeed`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .config import DEMO_DATA, PretrainConfig


class ArrayLoader:
    """In-memory windows behind the ``CorpusLoader`` interface (tests, experiments, small runs).

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


def build_demo_corpus(out_dir: Path) -> Path:
    """Build (or reuse) a corpus of the shipped real-ECG sample in ``out_dir`` with the corpus builder."""
    from ..corpus.build import build_corpus

    if not (out_dir / "manifest.json").is_file():
        build_corpus([DEMO_DATA], out_dir)
    return out_dir


def make_loader(cfg: PretrainConfig, run_dir: Path, rank: int, world: int, device: torch.device | None = None):
    """The training loader: ``CorpusLoader`` over ``cfg.data`` (or the demo corpus, built in ``run_dir``).

    For a CUDA ``device`` the batches come as float16 (the shards' type: half the bytes to copy) in pinned
    memory; they become float32 on the device. Elsewhere they come as float32.
    """
    if cfg.data is None:
        if rank == 0:
            build_demo_corpus(run_dir / "corpus")
        if world > 1:
            torch.distributed.barrier()  # the other ranks wait for rank 0's build, then reuse it
        corpus = build_demo_corpus(run_dir / "corpus")
    else:
        corpus = Path(cfg.data)
        if not corpus.is_dir():
            raise FileNotFoundError(f"{corpus}: no such corpus folder")
    from ..corpus.loader import CorpusLoader

    cuda = device is not None and device.type == "cuda"
    return CorpusLoader(corpus, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                        num_workers=cfg.workers, drop_last=True, dtype=torch.float16 if cuda else torch.float32,
                        pin_memory=cuda)


class EpochBatches:
    """Batches without end: when ``loader``'s epoch is exhausted the next one starts (``epoch`` counts them)."""

    def __init__(self, loader, epoch: int):
        self.loader, self.epoch = loader, epoch
        self._it = iter(loader)

    def next(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self._it = iter(self.loader)
            return next(self._it)

    def position(self) -> tuple[int, dict]:
        """``(epoch, loader state)`` before the next batch: where a resumed run continues."""
        return self.epoch, self.loader.state_dict()


class DeviceFeed:
    """Batches on ``device``, the next one fetched and on its way while the current step runs.

    ``next()`` hands out the pending batch (fetching it first if there is none); ``preload()``, called once
    the step's work is queued, fetches the following batch from the loader and starts its copy: on CUDA from
    pinned memory, ``non_blocking``, on a side stream, so the host's wait for data and the copy overlap the
    GPU's work. ``x`` arrives as float32 (converted on the device). ``position()`` is where a resume continues
    (the loader's state before the pending batch, which the run has not used). ``wait_s`` counts the seconds
    spent waiting for the loader.
    """

    def __init__(self, batches: EpochBatches, device: torch.device):
        self.batches, self.device = batches, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.wait_s = 0.0
        self._pending: tuple[dict, tuple[int, dict]] | None = None

    def preload(self) -> None:
        if self._pending is not None:
            return
        position = self.batches.position()
        t0 = time.perf_counter()
        host = self.batches.next()
        self.wait_s += time.perf_counter() - t0
        if self.stream is None:
            batch = {k: v.to(self.device) for k, v in host.items()}
            batch["x"] = batch["x"].float()
        else:
            with torch.cuda.stream(self.stream):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
                batch["x"] = batch["x"].float()
        self._pending = batch, position

    def next(self) -> dict:
        self.preload()
        batch, _ = self._pending
        self._pending = None
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for v in batch.values():  # made on the side stream, used and freed on this one
                v.record_stream(current)
        return batch

    def position(self) -> tuple[int, dict]:
        return self._pending[1] if self._pending is not None else self.batches.position()
