"""Memory-mapped, shuffled, DDP- and worker-split, exactly resumable batches over a built corpus.

Order of an epoch: a seeded permutation of all ``W`` window ids (``numpy.random.default_rng([seed,
epoch])``), global across shards. Rank ``r`` of ``world_size`` takes the contiguous slice
``perm[r * per_rank:(r + 1) * per_rank]`` and cuts it into batches in order; batch ``b`` is read by
worker process ``b % num_workers`` and the batches come back in order ``0, 1, 2, ...``, so neither ranks
nor workers overlap and the sequence does not depend on ``num_workers``.

``drop_last=True`` (training): ``per_rank = W // world_size`` and ``len(loader) = per_rank // batch_size``
on every rank (DDP lock-step); per epoch at most ``world_size * batch_size - 1`` windows go unused — a
different few each epoch, since the permutation changes. ``drop_last=False``: every window exactly once per
epoch; rank ``r`` gets ``W // world_size`` (+1 for the first ``W % world_size`` ranks) windows and a final
short batch, so ranks may differ by one batch (use it for single-rank passes such as evaluation).

Resume: ``state_dict()`` is ``{"epoch", "next_batch", ...}`` after the batches the caller consumed (not the
ones prefetched by workers); ``set_epoch(e)`` then ``load_state_dict(d)`` then ``iter(loader)`` yields
exactly the batches that would have followed. An exhausted epoch resets ``next_batch`` to 0; the caller
moves to the next epoch with ``set_epoch``.

The data path, built to keep up with a GPU (``bench/bench_loader.py`` measures it against a bare gather):

- ``x`` comes out as ``dtype``: ``torch.float16`` (the shards' own type: a plain copy, half the bytes;
  training on CUDA converts on the device) or ``torch.float32`` (converted on the CPU, row by row).
- Each window is copied once, from its memory-mapped shard row straight into the batch buffer (rows visited
  in ascending id order, so reads within a shard go forward); no gather-then-reorder copies.
- Batch buffers are reused: freshly allocated multi-MB buffers cost a page fault per 4 KB page on every
  batch, more than the copy itself. A buffer is handed out again only once nothing outside the loader refers
  to it (its storage's reference count), so a batch the caller keeps stays intact; when every buffer is
  held the loader allocates a fresh one.
- Workers (processes living as long as the loader, ``PREFETCH`` batches in flight each) write into buffers in
  shared memory that the main process allocated once, and send back only the buffer's number with
  ``present`` and ``index`` (a few KB through a pipe): no per-batch shared-memory segment, no
  copy on the way. (PyTorch's DataLoader moves every batch into a fresh shared-memory segment, which on a
  2-core VM cost more than reading the batch, and its queues ~150 µs per batch.)
- ``pin_memory=True`` (CUDA): batches come out in page-locked memory for ``non_blocking`` copies; without
  workers the rows are copied straight into it, with workers the main process copies each batch there once.
"""

from __future__ import annotations

import json
import math
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"  # same name as build.MANIFEST (kept here so the loader needs no builder)
DTYPES = (torch.float16, torch.float32)
PREFETCH = 2  # batches in flight per worker


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


_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # None: this torch cannot tell


def _use_count(t: torch.Tensor) -> int:
    """References to ``t``'s storage: tensors and views of it, wherever they are held."""
    return _STORAGE_USE_COUNT(t.untyped_storage()._cdata)


class BatchBuffers:
    """Batch-sized ``x`` buffers, each reused once nothing but this pool refers to its storage.

    ``acquire()`` returns a free buffer's number (marked in flight until ``release``) or None when all are
    in flight or held by callers. ``shared=True`` puts them in shared memory, all allocated up front (worker
    processes must see them); otherwise they are allocated on demand, up to ``capacity``.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, capacity: int, shared: bool):
        self.shape, self.dtype, self.capacity, self.shared = tuple(shape), dtype, capacity, shared
        self.slots: list[torch.Tensor] = []
        self.in_flight: set[int] = set()
        self._idle = 0  # use count of a buffer only the pool holds (measured: it depends on torch internals)
        if shared and _STORAGE_USE_COUNT is not None:
            while len(self.slots) < capacity:
                self._grow()

    def _grow(self) -> None:
        t = torch.empty(self.shape, dtype=self.dtype)
        if self.shared:
            t.share_memory_()
        self.slots.append(t)
        self._idle = _use_count(t)

    def acquire(self) -> int | None:
        if _STORAGE_USE_COUNT is None:
            return None  # whether a caller still holds a buffer cannot be known: never reuse one
        for i, t in enumerate(self.slots):
            if i not in self.in_flight and _use_count(t) == self._idle:
                self.in_flight.add(i)
                return i
        if len(self.slots) < self.capacity and not self.shared:
            self._grow()
            self.in_flight.add(len(self.slots) - 1)
            return len(self.slots) - 1
        return None

    def release(self, i: int | None) -> None:
        self.in_flight.discard(i)


class ShardReader:
    """Reads batches of one rank's epochs: the permutation, the shards (memory-mapped on first use, per
    process) and the gather of rows into a batch buffer. Picklable without its open maps (workers reopen)."""

    def __init__(self, corpus_dir: Path, manifest: dict, seed: int, rank: int, world_size: int, batch_size: int,
                 drop_last: bool, dtype: torch.dtype):
        self.dir, self.seed, self.batch_size, self.dtype = Path(corpus_dir), seed, batch_size, dtype
        self.shards = manifest["shards"]
        self.shape = tuple(manifest["shape"])
        self.bounds = np.cumsum([0] + [s["n"] for s in self.shards])
        self.n = int(self.bounds[-1])
        self.start, self.stop = rank_slice(self.n, rank, world_size, drop_last)
        self.n_batches = ((self.stop - self.start) // batch_size if drop_last
                          else math.ceil((self.stop - self.start) / batch_size))
        self._reset()

    def _reset(self) -> None:
        self._perm: tuple[int, np.ndarray] | None = None
        self._x: dict[int, np.ndarray] = {}
        self._xt: dict[int, torch.Tensor] = {}
        self._p: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_perm", "_x", "_xt", "_p"):  # a pickled memmap would carry its whole shard along
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _open(self, s: int) -> None:
        sh = self.shards[s]
        x = np.load(self.dir / sh["x"], mmap_mode="r")
        p = np.load(self.dir / sh["present"], mmap_mode="r")
        if x.shape != (sh["n"], *self.shape) or x.dtype.kind != "f":
            raise ValueError(f"{self.dir / sh['x']}: array {x.dtype} {x.shape}, but the manifest says "
                             f"{sh['n']} float windows of shape {self.shape}")
        if p.shape != (sh["n"], self.shape[0]) or p.dtype != np.bool_:
            raise ValueError(f"{self.dir / sh['present']}: array {p.dtype} {p.shape}, but the manifest says "
                             f"bool ({sh['n']}, {self.shape[0]})")
        self._x[s] = np.asarray(x)  # the plain ndarray view: indexing a memmap subclass costs microseconds
        self._p[s] = np.asarray(p)
        if self.dtype != torch.float16 or x.dtype != np.float16:
            with warnings.catch_warnings():  # read-only map; torch warns, we only ever read it
                warnings.simplefilter("ignore", UserWarning)
                self._xt[s] = torch.from_numpy(self._x[s])

    def indices(self, epoch: int, b: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch))
        lo = self.start + b * self.batch_size
        return self._perm[1][lo:min(lo + self.batch_size, self.stop)]

    def read(self, epoch: int, b: int, out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Copy batch ``b``'s windows into ``out[:n]``; returns ``(present (n, C) bool, index (n,) int64)``."""
        if not 0 <= b < self.n_batches:
            raise IndexError(f"batch {b} out of range 0..{self.n_batches - 1}")
        idx = self.indices(epoch, b)
        shard_of = np.searchsorted(self.bounds, idx, side="right") - 1
        rows = idx - self.bounds[shard_of]
        present = np.empty((len(idx), self.shape[0]), dtype=bool)
        for s in np.unique(shard_of).tolist():
            if s not in self._x:
                self._open(s)
            sel = shard_of == s
            present[sel] = self._p[s][rows[sel]]
        order = np.argsort(idx, kind="stable")
        pos, shard, row = order.tolist(), shard_of[order].tolist(), rows[order].tolist()
        if out.dtype == torch.float16 and all(self._x[s].dtype == np.float16 for s in set(shard)):
            o, xs = out.numpy(), self._x  # a plain copy per row: numpy's memcpy, no dispatch overhead
            for i, s, r in zip(pos, shard, row):
                o[i] = xs[s][r]
        else:
            xt = self._xt  # converting rows: torch's vectorised cast (numpy's float16 cast is scalar)
            for i, s, r in zip(pos, shard, row):
                out[i].copy_(xt[s][r])
        return present, idx.copy()


def _worker_main(conn, reader: ShardReader, slots: list[torch.Tensor]) -> None:
    """A worker process: for each task ``(epoch, b, slot)`` read batch ``b`` into shared buffer ``slot`` and
    answer ``(b, slot, present, index, x)`` (``x`` only when ``slot`` is None: no buffer was free)."""
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the main process ends us
    torch.set_num_threads(1)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            return
        if task is None:
            return
        epoch, b, slot = task
        try:
            out = slots[slot] if slot is not None else torch.empty((reader.batch_size, *reader.shape),
                                                                  dtype=reader.dtype)
            present, idx = reader.read(epoch, b, out)
            conn.send((b, slot, present, idx, None if slot is not None else out[:len(idx)].numpy()))
        except Exception as exc:  # noqa: BLE001 - handed to the main process, which raises it
            conn.send(("error", exc, traceback.format_exc()))


class WorkerPool:
    """Worker processes for one loader: batch ``b`` goes to worker ``b % n`` and the main process collects
    the answers in order (so the batches do not depend on ``n``). Messages are a few hundred bytes: the
    windows themselves go through the shared buffers."""

    def __init__(self, reader: ShardReader, buffers: BatchBuffers, n: int):
        ctx = torch.multiprocessing.get_context()  # torch's reductions pickle the shared buffers for spawn
        self.conns, self.procs = [], []
        for _ in range(n):
            here, there = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_worker_main, args=(there, reader, buffers.slots), daemon=True)
            proc.start()
            there.close()  # only the worker holds its end: its exit shows here as end-of-file
            self.conns.append(here)
            self.procs.append(proc)
        self.pending: list[tuple[int, int, int | None]] = []  # tasks sent, not yet collected, in order
        self._finalizer = weakref.finalize(self, WorkerPool._stop, self.conns, self.procs)

    def send(self, task: tuple[int, int, int | None]) -> None:
        self.conns[task[1] % len(self.conns)].send(task)
        self.pending.append(task)

    def recv(self) -> tuple:
        epoch, b, slot = self.pending.pop(0)
        w = b % len(self.conns)
        try:
            msg = self.conns[w].recv()
        except (EOFError, OSError) as exc:
            proc = self.procs[w]
            proc.join(timeout=1.0)
            raise RuntimeError(f"CorpusLoader: worker {w} (pid {proc.pid}) died (exit code {proc.exitcode}) "
                               f"while reading epoch {epoch} batch {b}") from exc
        if msg[0] == "error":
            raise msg[1] from RuntimeError(f"in CorpusLoader worker {w}, epoch {epoch} batch {b}:\n{msg[2]}")
        if msg[0] != b or msg[1] != slot:
            raise RuntimeError(f"CorpusLoader: worker {w} answered batch {msg[0]}, expected {b}")
        return msg

    def drain(self) -> None:
        """Collect what an abandoned iteration left in flight (its buffers are then being written no more)."""
        while self.pending:
            self.recv()

    @staticmethod
    def _stop(conns, procs) -> None:
        for conn in conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
        for conn in conns:
            conn.close()

    def close(self) -> None:
        self._finalizer()


class CorpusLoader:
    """Batches ``{"x": (B, C, N, P) dtype, "present": bool (B, C), "index": int64 (B,)}`` of a corpus.

    See the module docstring for the order, the rank/worker split, ``drop_last``, resuming and the data path.
    ``dtype``: ``torch.float32`` (default) or ``torch.float16``; ``pin_memory=True`` (needs CUDA): batches in
    page-locked memory. Workers start on the first iteration and live as long as the loader.
    """

    def __init__(self, corpus_dir: str | Path, batch_size: int = 64, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, drop_last: bool = True,
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False):
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
        if dtype not in DTYPES:
            raise ValueError(f"CorpusLoader: dtype must be torch.float16 or torch.float32, got {dtype}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("CorpusLoader: pin_memory=True needs CUDA (page-locked memory is for copies to a GPU)")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.drop_last, self.dtype, self.pin_memory = num_workers, drop_last, dtype, pin_memory
        self.n_windows = int(self.manifest["n_windows"])
        self.leads = list(self.manifest["leads"])
        self.shape = tuple(self.manifest["shape"])
        self.epoch, self._next = 0, 0
        self._reader = ShardReader(self.dir, self.manifest, seed, rank, world_size, batch_size, drop_last, dtype)
        if len(self) == 0:
            raise ValueError(f"CorpusLoader: {self.n_windows} windows / {world_size} ranks give no batch of "
                             f"{batch_size} (corpus {self.dir})")
        # In-process: the batch being built, the one the caller is using and the one a prefetcher holds.
        self._buffers = BatchBuffers((batch_size, *self.shape), dtype, capacity=4, shared=False)
        self._pool: WorkerPool | None = None  # started on the first iteration with workers
        self._iteration = 0  # which iteration is current (an older, abandoned one must not go on)

    def __len__(self) -> int:
        return self._reader.n_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._next = int(epoch), 0

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is garbage-collected or Python exits)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _workers(self) -> WorkerPool:
        if self._pool is None:
            # Each worker has PREFETCH batches in flight; the caller holds a few (the one in use, one prefetched).
            self._buffers = BatchBuffers((self.batch_size, *self.shape), self.dtype,
                                         capacity=PREFETCH * self.num_workers + 4, shared=True)
            self._pool = WorkerPool(self._reader, self._buffers, self.num_workers)
        self._pool.drain()
        self._buffers.in_flight.clear()
        return self._pool

    def _in_process(self, epoch: int, b: int) -> dict:
        if self.pin_memory:  # straight into page-locked memory (torch's pinned allocator recycles it)
            out = torch.empty((self.batch_size, *self.shape), dtype=self.dtype, pin_memory=True)
            present, idx = self._reader.read(epoch, b, out)
            return self._batch(out[:len(idx)], present, idx)
        slot = self._buffers.acquire()
        out = (self._buffers.slots[slot] if slot is not None
               else torch.empty((self.batch_size, *self.shape), dtype=self.dtype))
        present, idx = self._reader.read(epoch, b, out)
        self._buffers.release(slot)
        return self._batch(out[:len(idx)], present, idx)

    def _received(self, msg: tuple) -> dict:
        _, slot, present, idx, x = msg
        x = self._buffers.slots[slot][:len(idx)] if slot is not None else torch.from_numpy(x)
        if self.pin_memory:
            pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            pinned.copy_(x)
            x = pinned
        self._buffers.release(slot)
        return self._batch(x, present, idx)

    def _batch(self, x: torch.Tensor, present: np.ndarray, idx: np.ndarray) -> dict:
        p, i = torch.from_numpy(present), torch.from_numpy(idx)
        if self.pin_memory:
            p, i = p.pin_memory(), i.pin_memory()
        return {"x": x, "present": p, "index": i}

    def __iter__(self):
        self._iteration += 1
        iteration, epoch, n = self._iteration, self.epoch, len(self)
        pool = self._workers() if self.num_workers else None
        sent = self._next
        for b in range(self._next, n):
            if iteration != self._iteration:
                raise RuntimeError("CorpusLoader: a newer iteration of this loader has started; this one is over")
            if pool is None:
                batch = self._in_process(epoch, b)
            else:
                while sent < min(n, b + PREFETCH * self.num_workers):
                    pool.send((epoch, sent, self._buffers.acquire()))
                    sent += 1
                batch = self._received(pool.recv())
            self._next = b + 1
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
