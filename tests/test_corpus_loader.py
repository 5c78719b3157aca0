"""CorpusLoader: global shuffle, rank × worker partition, drop_last, exact resume, mmap reads.

The partition tests use a corpus folder written directly in the manifest/shard format with each window
holding its own global id, so every returned sample can be traced to its row; the loader on a corpus built
from real ECG is tested in test_corpus_build.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cbramod_fast.corpus.loader import CorpusLoader, epoch_permutation

C, N, P = 3, 2, 200


def write_id_corpus(root: Path, shard_sizes: list[int], dtype=np.float16) -> Path:
    """A corpus whose window g is filled with g (exact in float16 up to 2048) and present = (g % 3 != k)."""
    root.mkdir(parents=True, exist_ok=True)
    shards, g = [], 0
    for s, n in enumerate(shard_sizes):
        ids = np.arange(g, g + n)
        x = np.broadcast_to(ids[:, None, None, None], (n, C, N, P)).astype(dtype)
        present = np.stack([ids % 3 != k for k in range(C)], axis=1)
        np.save(root / f"x-{s:05d}.npy", x)
        np.save(root / f"present-{s:05d}.npy", present)
        shards.append({"x": f"x-{s:05d}.npy", "present": f"present-{s:05d}.npy", "n": n})
        g += n
    (root / "manifest.json").write_text(json.dumps({"shards": shards, "n_windows": g, "leads": ["I", "II", "V1"],
                                                    "shape": [C, N, P]}))
    return root


def collect(loader) -> list[torch.Tensor]:
    return [b["index"].clone() for b in loader]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_id_corpus(tmp_path_factory.mktemp("idcorpus"), [37, 50, 13, 64])  # 164 windows, odd shards


def test_batches_are_the_rows_they_name(corpus):
    loader = CorpusLoader(corpus, batch_size=16, seed=3)
    assert len(loader) == 164 // 16
    for b in loader:
        assert b["x"].dtype == torch.float32 and b["x"].shape == (16, C, N, P)
        assert b["present"].dtype == torch.bool and b["present"].shape == (16, C)
        assert b["index"].dtype == torch.long
        idx = b["index"]
        assert torch.equal(b["x"][:, :, :, :].amax(dim=(1, 2, 3)), idx.float())
        assert torch.equal(b["x"].amin(dim=(1, 2, 3)), idx.float())
        want = torch.stack([idx % 3 != k for k in range(C)], dim=1)
        assert torch.equal(b["present"], want)


def test_permutation_is_global_seeded_and_changes_per_epoch(corpus):
    loader = CorpusLoader(corpus, batch_size=4, seed=7, drop_last=False)
    e0 = torch.cat(collect(loader)).numpy()
    assert sorted(e0.tolist()) == list(range(164))  # every window once
    np.testing.assert_array_equal(e0, epoch_permutation(164, 7, 0))
    # windows of different shards are mixed within the first batches (global, not per-shard, shuffle)
    bounds = np.cumsum([0, 37, 50, 13, 64])
    shard_of = np.searchsorted(bounds, e0[:16], side="right") - 1
    assert len(set(shard_of.tolist())) >= 3
    loader.set_epoch(1)
    e1 = torch.cat(collect(loader)).numpy()
    assert sorted(e1.tolist()) == list(range(164)) and not np.array_equal(e0, e1)
    again = CorpusLoader(corpus, batch_size=4, seed=7, drop_last=False)
    np.testing.assert_array_equal(torch.cat(collect(again)).numpy(), e0)
    other = CorpusLoader(corpus, batch_size=4, seed=8, drop_last=False)
    assert not np.array_equal(torch.cat(collect(other)).numpy(), e0)


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_two_workers_partition_the_permutation(corpus, drop_last):
    bs, world = 8, 2
    per_rank = {}
    for rank in range(world):
        seq0 = collect(CorpusLoader(corpus, batch_size=bs, seed=5, rank=rank, world_size=world, num_workers=0,
                                    drop_last=drop_last))
        seq2 = collect(CorpusLoader(corpus, batch_size=bs, seed=5, rank=rank, world_size=world, num_workers=2,
                                    drop_last=drop_last))
        # 2 workers give the same batches in the same order as the main process: no batch lost or doubled
        assert len(seq0) == len(seq2) and all(torch.equal(a, b) for a, b in zip(seq0, seq2))
        per_rank[rank] = torch.cat(seq2).numpy()
    perm = epoch_permutation(164, 5, 0)
    both = np.concatenate([per_rank[0], per_rank[1]])
    assert len(set(per_rank[0]) & set(per_rank[1])) == 0  # ranks disjoint
    if drop_last:
        # 82 per rank -> 10 full batches of 8 each, 2 per rank unused
        assert len(per_rank[0]) == len(per_rank[1]) == 80
        np.testing.assert_array_equal(per_rank[0], perm[:80])
        np.testing.assert_array_equal(per_rank[1], perm[82:162])
    else:
        np.testing.assert_array_equal(both, perm)  # the two ranks together = the full permutation, in order


def test_four_ranks_by_two_workers_cover_everything_once(tmp_path):
    corpus = write_id_corpus(tmp_path / "c", [64, 64])  # 128 = 4 ranks x 4 batches x 8
    got = []
    for rank in range(4):
        loader = CorpusLoader(corpus, batch_size=8, seed=1, rank=rank, world_size=4, num_workers=2)
        assert len(loader) == 4
        got += collect(loader)
    allidx = torch.cat(got).numpy()
    assert len(allidx) == 128 and sorted(allidx.tolist()) == list(range(128))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_k_batches_yields_exactly_the_rest(corpus, workers):
    full = CorpusLoader(corpus, batch_size=8, seed=11, num_workers=workers)
    full.set_epoch(2)
    want = collect(full)
    a = CorpusLoader(corpus, batch_size=8, seed=11, num_workers=workers)
    a.set_epoch(2)
    it = iter(a)
    head = [next(it)["index"].clone() for _ in range(7)]
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable
    del it
    assert state["epoch"] == 2 and state["next_batch"] == 7
    b = CorpusLoader(corpus, batch_size=8, seed=11, num_workers=workers)
    b.set_epoch(state["epoch"])
    b.load_state_dict(state)
    tail = collect(b)
    assert len(head) + len(tail) == len(want)
    assert all(torch.equal(x, y) for x, y in zip(head + tail, want))
    # after the epoch the position is back at 0: the next epoch starts from its first batch
    assert b.state_dict()["next_batch"] == 0


def test_resume_refuses_a_different_order(corpus):
    a = CorpusLoader(corpus, batch_size=8, seed=11)
    with pytest.raises(ValueError, match="batch_size"):
        CorpusLoader(corpus, batch_size=4, seed=11).load_state_dict(a.state_dict())


def test_reads_are_memory_mapped(corpus, monkeypatch):
    calls = []
    real = np.load

    def spy(path, *args, **kwargs):
        calls.append(kwargs.get("mmap_mode"))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    next(iter(CorpusLoader(corpus, batch_size=8)))
    assert calls and all(m == "r" for m in calls)


def test_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        CorpusLoader(tmp_path)
    with pytest.raises(ValueError, match="no batch"):
        CorpusLoader(corpus, batch_size=1000)
    with pytest.raises(ValueError, match="rank"):
        CorpusLoader(corpus, rank=2, world_size=2)


# -- the data path: dtype, reused buffers, worker processes ------------------------------------------------
def _check_rows(batch) -> None:
    idx = batch["index"]
    assert torch.equal(batch["x"].float().amax(dim=(1, 2, 3)), idx.float())
    assert torch.equal(batch["x"].float().amin(dim=(1, 2, 3)), idx.float())
    assert torch.equal(batch["present"], torch.stack([idx % 3 != k for k in range(C)], dim=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_float16_output_is_the_float32_batches_converted(corpus, workers):
    a = CorpusLoader(corpus, batch_size=8, seed=4, num_workers=workers, drop_last=False)
    h = CorpusLoader(corpus, batch_size=8, seed=4, num_workers=workers, drop_last=False, dtype=torch.float16)
    n = 0
    for ba, bh in zip(a, h):
        assert ba["x"].dtype == torch.float32 and bh["x"].dtype == torch.float16
        assert torch.equal(bh["x"].float(), ba["x"]) and torch.equal(bh["index"], ba["index"])
        assert torch.equal(bh["present"], ba["present"])
        n += len(ba["index"])
    assert n == 164


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_the_caller_keeps_are_never_overwritten(corpus, workers, dtype):
    # Holding every batch exhausts the reused buffers: later batches must come in fresh memory, and none of
    # the kept ones may change when the loader reads on (two epochs).
    loader = CorpusLoader(corpus, batch_size=8, seed=2, num_workers=workers, dtype=dtype)
    kept = list(loader)
    loader.set_epoch(1)
    kept += list(loader)
    assert len(kept) == 2 * (164 // 8)
    assert len({b["x"].data_ptr() for b in kept}) == len(kept)  # no two kept batches share memory
    for b in kept:
        _check_rows(b)
    # Keeping only a view of x, or only present / index, protects that much too.
    views = [(b["x"][:, 1], b["index"]) for b in loader]
    for x1, idx in views:
        assert torch.equal(x1.float().amax(dim=(1, 2)), idx.float())


@pytest.mark.parametrize("workers", [0, 2])
def test_released_batches_reuse_the_loaders_buffers(corpus, workers):
    loader = CorpusLoader(corpus, batch_size=8, seed=2, num_workers=workers)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for b in loader:
            _check_rows(b)
            slots = {s.data_ptr() for s in loader._buffers.slots}
            assert b["x"].data_ptr() in slots  # one of the loader's buffers, not a fresh allocation
            assert b["x"].is_shared() == (workers > 0)  # workers write into shared memory
    assert len(loader._buffers.slots) <= (4 if workers == 0 else 2 * workers + 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_torch_without_storage_reference_counts_gets_fresh_batches(corpus, workers, monkeypatch):
    import cbramod_fast.corpus.loader as loader_module

    monkeypatch.setattr(loader_module, "_STORAGE_USE_COUNT", None)  # whether a buffer is held cannot be known
    loader = CorpusLoader(corpus, batch_size=8, seed=2, num_workers=workers)
    got = list(loader)
    assert len(got) == 164 // 8 and not loader._buffers.slots
    for b in got:
        _check_rows(b)


def test_workers_leave_the_global_random_streams_alone(corpus):
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    loader = CorpusLoader(corpus, batch_size=8, seed=2, num_workers=2)
    for epoch in range(2):
        loader.set_epoch(epoch)
        collect(loader)
    assert torch.equal(torch.get_rng_state(), torch_state)  # dropout streams do not depend on the workers
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_an_abandoned_iteration_ends_when_a_new_one_starts(corpus):
    loader = CorpusLoader(corpus, batch_size=8, seed=6, num_workers=2)
    want = collect(CorpusLoader(corpus, batch_size=8, seed=6))
    old = iter(loader)
    assert torch.equal(next(old)["index"], want[0]) and torch.equal(next(old)["index"], want[1])
    loader.load_state_dict({"epoch": 0, "next_batch": 5})
    got = collect(loader)  # the in-flight reads of the old iteration are collected and dropped
    assert len(got) == len(want) - 5 and all(torch.equal(a, b) for a, b in zip(got, want[5:]))
    with pytest.raises(RuntimeError, match="newer iteration"):
        next(old)


def test_close_stops_the_workers_and_a_dead_worker_is_reported(corpus):
    loader = CorpusLoader(corpus, batch_size=8, seed=6, num_workers=2)
    next(iter(loader))
    procs = list(loader._pool.procs)
    assert all(p.is_alive() for p in procs)
    loader.close()
    assert not any(p.is_alive() for p in procs)
    it = iter(loader)  # workers start again on the next iteration
    next(it)
    loader._pool.procs[1].kill()
    with pytest.raises(RuntimeError, match=r"worker 1 \(pid \d+\) died"):
        for _ in it:
            pass


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_that_disagrees_with_the_manifest_is_named(tmp_path, workers):
    root = write_id_corpus(tmp_path / "c", [16, 16])
    np.save(root / "x-00001.npy", np.zeros((16, C, N, P + 1), np.float16))  # a shard of another window shape
    loader = CorpusLoader(root, batch_size=32, num_workers=workers)
    with pytest.raises(ValueError, match=r"x-00001\.npy: array float16 \(16, 3, 2, 201\)"):
        next(iter(loader))


def test_bad_dtype_or_pin_memory_without_cuda(corpus):
    with pytest.raises(ValueError, match="dtype"):
        CorpusLoader(corpus, dtype=torch.int16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            CorpusLoader(corpus, pin_memory=True)


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_batches_on_cuda(corpus, workers):
    loader = CorpusLoader(corpus, batch_size=8, seed=1, num_workers=workers, dtype=torch.float16, pin_memory=True)
    for b in loader:
        assert b["x"].is_pinned() and b["present"].is_pinned() and b["index"].is_pinned()
        _check_rows({k: v.to("cuda", non_blocking=True) for k, v in b.items()})
