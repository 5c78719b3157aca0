"""Memory-mapped, shuffled, DDP- and worker-split, exactly resumable batches over a built corpus.

Order of an epoch: a seeded permutation of all ``W`` window ids (``numpy.random.default_rng([seed,
epoch])``), global across shards. Rank ``r`` of ``world_size`` takes the contiguous slice
``perm[r * per_rank:(r + 1) * per_rank]`` and cuts it into batches in order; batch ``b`` is read by
DataLoader worker ``b % num_workers`` and the batches come back in order ``0, 1, 2, ...`` (a map-style
dataset indexed by batch number), so neither ranks nor workers overlap and the sequence does not depend on
``num_workers``.

``drop_last=True`` (training): ``per_rank = W // world_size`` and ``len(loader) = per_rank // batch_size``
on every rank (DDP lock-step); per epoch at most ``world_size * batch_size - 1`` windows go unused — a
different few each epoch, since the permutation changes. ``drop_last=False``: every window exactly once per
epoch; rank ``r`` gets ``W // world_size`` (+1 for the first ``W % world_size`` ranks) windows and a final
short batch, so ranks may differ by one batch (use it for single-rank passes such as evaluation).

Resume: ``state_dict()`` is ``{"epoch", "next_batch", ...}`` after the batches the caller consumed (not the
ones prefetched by workers); ``set_epoch(e)`` then ``load_state_dict(d)`` then ``iter(loader)`` yields
exactly the batches that would have followed. An exhausted epoch resets ``next_batch`` to 0; the caller
moves to the next epoch with ``set_epoch``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"  # same name as build.MANIFEST (kept here so the loader needs no builder)


def epoch_permutation(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The global window order of one epoch (int64)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_windows).astype(np.int64)


def rank_slice(n_windows: int, rank: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """``[start, stop)`` of the permutation that ``rank`` reads."""
    if drop_last:
        per = n_windows // world_size
        return rank * per, (rank + 1) * per
    base, extra = divmod(n_windows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class CorpusDataset(torch.utils.data.Dataset):
    """Item ``b`` = batch ``b`` of one rank's epoch. Shards are opened (memory-mapped) lazily per process."""

    def __init__(self, corpus_dir: str | Path, manifest: dict, epoch: int, seed: int, rank: int, world_size: int,
                 batch_size: int, drop_last: bool):
        self.dir = Path(corpus_dir)
        self.shards = manifest["shards"]
        self.bounds = np.cumsum([0] + [s["n"] for s in self.shards])
        self.n = int(self.bounds[-1])
        self.epoch, self.seed, self.batch_size = epoch, seed, batch_size
        self.start, self.stop = rank_slice(self.n, rank, world_size, drop_last)
        self.drop_last = drop_last
        self._perm = None
        self._x: dict[int, np.ndarray] = {}
        self._p: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        m = self.stop - self.start
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def _open(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if s not in self._x:
            sh = self.shards[s]
            self._x[s] = np.load(self.dir / sh["x"], mmap_mode="r")
            self._p[s] = np.load(self.dir / sh["present"], mmap_mode="r")
        return self._x[s], self._p[s]

    def indices(self, b: int) -> np.ndarray:
        if self._perm is None:
            self._perm = epoch_permutation(self.n, self.seed, self.epoch)
        lo = self.start + b * self.batch_size
        return self._perm[lo:min(lo + self.batch_size, self.stop)]

    def __getitem__(self, b: int) -> dict:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range 0..{len(self) - 1}")
        idx = self.indices(b)
        # read shard by shard in ascending row order (sequential mmap access), then restore batch order
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        shard_of = np.searchsorted(self.bounds, sidx, side="right") - 1
        xs, ps = [], []
        for s in np.unique(shard_of):
            rows = sidx[shard_of == s] - self.bounds[s]
            x, p = self._open(int(s))
            xs.append(np.asarray(x[rows], dtype=np.float32))
            ps.append(np.asarray(p[rows], dtype=bool))
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        x = np.concatenate(xs)[inv]
        p = np.concatenate(ps)[inv]
        return {"x": torch.from_numpy(x), "present": torch.from_numpy(p), "index": torch.from_numpy(idx.copy())}


class _FromBatch(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class CorpusLoader:
    """Batches ``{"x": float32 (B, C, N, P), "present": bool (B, C), "index": int64 (B,)}`` of a corpus.

    See the module docstring for the order, the rank/worker split, ``drop_last`` and resuming.
    """

    def __init__(self, corpus_dir: str | Path, batch_size: int = 64, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, drop_last: bool = True):
        self.dir = Path(corpus_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir}: no {MANIFEST} (not a finished corpus; run `cbramod-fast corpus "
                                    "build` to completion)")
        # per-record provenance can be tens of MB on big corpora: the loader keeps only what it reads with
        self.manifest = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("records", "skipped")}
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"CorpusLoader: bad batch_size={batch_size}, rank={rank}, world_size={world_size} "
                             f"or num_workers={num_workers}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.drop_last = num_workers, drop_last
        self.n_windows = int(self.manifest["n_windows"])
        self.leads = list(self.manifest["leads"])
        self.shape = tuple(self.manifest["shape"])
        self.epoch, self._next = 0, 0
        if len(self) == 0:
            raise ValueError(f"CorpusLoader: {self.n_windows} windows / {world_size} ranks give no batch of "
                             f"{batch_size} (corpus {self.dir})")

    def _dataset(self) -> CorpusDataset:
        return CorpusDataset(self.dir, self.manifest, self.epoch, self.seed, self.rank, self.world_size,
                             self.batch_size, self.drop_last)

    def __len__(self) -> int:
        start, stop = rank_slice(self.n_windows, self.rank, self.world_size, self.drop_last)
        m = stop - start
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._next = int(epoch), 0

    def __iter__(self):
        ds = self._dataset()
        n = len(ds)
        if self.num_workers == 0:
            batches = (ds[b] for b in range(self._next, n))
        else:
            batches = torch.utils.data.DataLoader(ds, batch_size=None, sampler=_FromBatch(self._next, n),
                                                  num_workers=self.num_workers, pin_memory=False)
        for batch in batches:
            self._next += 1
            yield batch
        self._next = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self._next, "seed": self.seed, "batch_size": self.batch_size,
                "rank": self.rank, "world_size": self.world_size, "n_windows": self.n_windows}

    def load_state_dict(self, d: dict) -> None:
        for key in ("seed", "batch_size", "world_size", "n_windows"):
            if key in d and d[key] != getattr(self, key):
                raise ValueError(f"CorpusLoader.load_state_dict: saved {key}={d[key]} but this loader has "
                                 f"{getattr(self, key)}; the batch order would differ")
        self.epoch, self._next = int(d["epoch"]), int(d["next_batch"])
