"""Build a pretraining corpus: records → preprocessed fixed windows in memory-mapped shards + a manifest.

Pipeline per file (in a worker process): read (:mod:`cbramod_fast.readers`) → pick/order leads, µV →
:func:`cbramod_fast.signal.preprocess` (band-pass, notch, resample to 200 Hz, patches, per-patch flags) →
fixed windows of ``window_patches`` patches → reject flat / clipped / non-finite / over-amplitude windows
(counted per reason) → scale (µV × ``scale``, default 1/100 like CBraMod) → stored dtype (float16).

Layout of a corpus folder::

    manifest.json            written last, atomically: the corpus exists iff this file exists
    x-00000.npy ...          (n, C, N, 200) windows, ``dtype`` (float16 by default), np.load(mmap_mode="r")
    present-00000.npy ...    (n, C) bool: lead present in that window (absent leads are zeros)
    build_state.json         only while a build is unfinished (resume point), + records-00000.json journals

Determinism: files are processed in sorted order and their windows appended to shards in that order, so
shard contents depend only on the sources and the configuration — not on ``workers``.

Resume: after each shard is written (temp name, then ``os.replace``) the build commits a resume point: the
first file with a window not yet in a shard and how many of its windows are. A rerun of the same command
re-processes from there, dropping the windows already written, and ends with exactly the windows of an
uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path

import numpy as np

from ..atomic import atomic_text, atomic_write
from ..readers import STANDARD_LEADS, RecordError, find_records, read_record, source_path
from ..signal import preprocess

MANIFEST = "manifest.json"
STATE = "build_state.json"
FORMAT_VERSION = 1
REJECT_REASONS = ("non_finite", "flat", "clipped", "over_amplitude")


@dataclass
class CorpusConfig:
    """How records become windows. Amplitude thresholds are in µV (before ``scale``)."""

    leads: tuple[str, ...] = STANDARD_LEADS  # output lead order; missing leads are zero, present=False
    fs: int = 200  # output rate = samples per patch (one patch = one second, as in CBraMod)
    window_patches: int = 10  # patches per window (10 s)
    stride_patches: int | None = None  # window hop in patches; None = window_patches (no overlap)
    band: tuple[float, float] = (0.5, 45.0)  # band-pass edges, Hz
    notch: float | None = None  # mains notch (50 or 60 Hz), None = off
    scale: float = 0.01  # stored value = µV × scale (CBraMod: µV / 100)
    max_abs_uv: float = 8000.0  # a present lead above this (after filtering) rejects the window
    flat_uv: float = 1.0  # a 1-s patch with a smaller peak-to-peak (µV) is flat (a disconnected lead)
    clip_run_s: float = 0.04  # this long at the lead's extreme value = clipped (the recorder's rail)
    flat_leads: str = "absent"  # "absent": a flat lead is zeroed and marked absent; "reject": drop the window
    min_leads: int = 1  # fewer usable leads in a window rejects it as flat
    dtype: str = "float16"  # stored dtype: float16 or float32
    shard_windows: int = 2048  # windows per shard file (the last shard may be shorter)
    numpy_fs: float | None = None  # sampling rate of .npy files (no header to say it)
    numpy_unit: str = "uV"  # unit of .npy files

    def __post_init__(self):
        self.leads = tuple(self.leads)
        self.band = tuple(float(b) for b in self.band)
        if self.stride_patches is None:
            self.stride_patches = self.window_patches
        if not self.leads:
            raise ValueError("CorpusConfig: at least one lead")
        if self.window_patches < 1 or self.stride_patches < 1 or self.shard_windows < 1 or self.fs < 1:
            raise ValueError("CorpusConfig: window_patches, stride_patches, shard_windows and fs must be >= 1")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"CorpusConfig: dtype must be float16 or float32, got {self.dtype!r}")
        if self.flat_leads not in ("absent", "reject"):
            raise ValueError(f"CorpusConfig: flat_leads must be 'absent' or 'reject', got {self.flat_leads!r}")
        if not 1 <= self.min_leads <= len(self.leads):
            raise ValueError(f"CorpusConfig: min_leads must be in 1..{len(self.leads)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["leads"], d["band"] = list(self.leads), list(self.band)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CorpusConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FileResult:
    """What a worker returns for one file (arrays are the kept windows, already scaled and cast)."""

    index: int
    file: str
    source: int
    x: np.ndarray | None = None  # (n, C, N, fs)
    present: np.ndarray | None = None  # (n, C)
    offsets: list[int] = field(default_factory=list)  # window start, in samples at cfg.fs
    meta: dict = field(default_factory=dict)  # record, fs, n_samples, source leads, units
    rejected: dict = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    flat_leads: int = 0
    error: str | None = None


def preprocess_record(rec, cfg: CorpusConfig, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A record's present leads → ``(patches (L, P, cfg.fs) float32, scaled; reason flags (4, L, P) bool)``.

    One call of :func:`cbramod_fast.signal.preprocess` (band-pass, notch, resample to ``cfg.fs``, scale,
    patches and per-patch flags) on the present rows; rows of absent leads stay zero and unflagged. The flags
    are stacked in ``REJECT_REASONS`` order.
    """
    rows = np.flatnonzero(rec.present)
    pp = preprocess(rec.signal[rows], rec.fs, band=cfg.band, notch=cfg.notch, fs_out=cfg.fs,
                    max_abs=cfg.max_abs_uv, scale=cfg.scale, patch=cfg.fs, threads=threads,
                    flat_ptp=cfg.flat_uv * abs(cfg.scale), clip_run_s=cfg.clip_run_s)
    n_p = pp.patches.shape[1]
    out = np.zeros((len(rec.present), n_p, cfg.fs), np.float32)
    flags = np.zeros((len(REJECT_REASONS), len(rec.present), n_p), bool)
    out[rows] = pp.patches
    for k, f in enumerate((pp.nonfinite, pp.flat, pp.clipped, pp.over_amplitude)):  # REJECT_REASONS order
        flags[k, rows] = f
    return out, flags


def process_file(task: tuple) -> FileResult:
    """Read, preprocess and window one file (runs in a worker process). Never raises for a bad file."""
    index, source, rel, path, cfg, threads = task
    res = FileResult(index=index, file=rel, source=source)
    try:
        rec = read_record(path, cfg.leads, cfg.numpy_fs, cfg.numpy_unit)
        res.meta = {"record": rec.record, "fs": rec.fs, "n_samples": int(rec.signal.shape[1]),
                    "source_leads": rec.source_leads, "units": rec.units}
        if rec.signal.shape[1] < cfg.window_patches * rec.fs:
            return res  # shorter than one window: a record with no windows, not an error
        patches, flags = preprocess_record(rec, cfg, threads)
        _cut_windows(res, patches, flags, rec.present, cfg)
    except (RecordError, ValueError, OSError) as exc:  # the file's fault: skipped with its reason; bugs propagate
        res.error = str(exc) if isinstance(exc, RecordError) else f"{rel}: {type(exc).__name__}: {exc}"
        res.x = res.present = None
        res.offsets = []
    return res


def _cut_windows(res: FileResult, patches: np.ndarray, flags: np.ndarray, present: np.ndarray,
                 cfg: CorpusConfig) -> None:
    """Keep the acceptable windows of one record in ``res`` (cast), counting rejections by reason.

    A window is rejected for the first of non_finite, clipped, over_amplitude that any present lead has in
    any patch. A present lead with a flat patch is flat in that window: masked absent (``flat_leads=
    "absent"``) or rejecting the window (``"reject"``); fewer than ``min_leads`` usable leads rejects as flat.
    """
    n_patches = patches.shape[1]
    wp, sp = cfg.window_patches, cfg.stride_patches
    keep_x, keep_p = [], []
    dtype = np.dtype(cfg.dtype)
    per_lead = {r: flags[k] & present[:, None] for k, r in enumerate(REJECT_REASONS)}  # (L, P) each
    for s in range(0, n_patches - wp + 1, sp):
        hit = {r: f[:, s:s + wp].any(axis=1) for r, f in per_lead.items()}  # (L,) per reason
        reason = next((r for r in ("non_finite", "clipped", "over_amplitude") if hit[r].any()), None)
        pres = present.copy()
        if reason is None:
            if hit["flat"].any() and cfg.flat_leads == "reject":
                reason = "flat"
            else:
                pres &= ~hit["flat"]
                if pres.sum() < cfg.min_leads:
                    reason = "flat"
        if reason is not None:
            res.rejected[reason] += 1
            continue
        res.flat_leads += int((present & ~pres).sum())
        keep_x.append(np.where(pres[:, None, None], patches[:, s:s + wp], 0.0).astype(dtype))
        keep_p.append(pres)
        res.offsets.append(s * cfg.fs)
    if keep_x:
        res.x, res.present = np.stack(keep_x), np.stack(keep_p)


# -- the build loop (main process) -----------------------------------------------------------------------
def write_json(obj, path: Path) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (manifests, resume points, journals)."""
    atomic_text(path, json.dumps(obj))


def _write_npy(arr: np.ndarray, path: Path) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, arr)

    atomic_write(path, save)


def parse_part(part: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) → (i, n); None → (0, 1)."""
    if part is None:
        return 0, 1
    if isinstance(part, str):
        try:
            i, n = (int(v) for v in part.split("/"))
        except ValueError:
            raise ValueError(f"--part must look like i/n (e.g. 0/4), got {part!r}") from None
    else:
        i, n = part
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part i/n needs 0 <= i < n, got {i}/{n}")
    return i, n


def part_slice(n_files: int, part: tuple[int, int]) -> slice:
    """Contiguous block ``i`` of ``n`` of the sorted file list (parts concatenated = the whole list)."""
    i, n = part
    return slice(i * n_files // n, (i + 1) * n_files // n)


def _fingerprint(cfg: CorpusConfig, sources: list[str], files: list[tuple[int, str]], part) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, cfg.to_dict(), sources, list(part)]).encode())
    for src, rel in files:
        p = source_path(sources, src, rel)
        h.update(f"{src}\0{rel}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _process_chunk(tasks: list[tuple]) -> list[FileResult]:
    return [process_file(t) for t in tasks]


def _results(tasks: list[tuple], workers: int):
    """Yield ``process_file`` results in task order.

    With a pool, files go out in chunks (one round trip per chunk, not per 10-s record) and at most
    ~4 chunks per worker are in flight, so memory stays bounded however large the corpus.
    """
    if workers <= 1:
        for t in tasks:
            yield process_file(t)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    size = max(1, min(16, len(tasks) // (8 * workers)))
    chunks = (tasks[i:i + size] for i in range(0, len(tasks), size))
    ctx = mp.get_context("fork") if sys.platform.startswith("linux") else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        pending = deque(ex.submit(_process_chunk, c) for c in islice(chunks, 4 * workers))
        while pending:
            done = pending.popleft().result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(ex.submit(_process_chunk, nxt))
            yield from done


class _Stats:
    """Per-lead sums over stored window values (float64), for mean/std in the manifest."""

    def __init__(self, n_leads: int):
        self.n = np.zeros(n_leads, np.int64)  # windows with the lead present
        self.s = np.zeros(n_leads)
        self.ss = np.zeros(n_leads)
        self.absmax = np.zeros(n_leads)

    def add(self, x: np.ndarray, present: np.ndarray) -> None:
        v = x.astype(np.float64).reshape(x.shape[0], x.shape[1], -1)
        self.n += present.sum(axis=0)
        self.s += v.sum(axis=(0, 2))
        self.ss += (v * v).sum(axis=(0, 2))
        self.absmax = np.maximum(self.absmax, np.abs(v).max(axis=(0, 2)))

    def to_dict(self) -> dict:
        return {"n": self.n.tolist(), "s": self.s.tolist(), "ss": self.ss.tolist(), "absmax": self.absmax.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> _Stats:
        st = cls(len(d["n"]))
        st.n, st.s, st.ss = np.array(d["n"], np.int64), np.array(d["s"]), np.array(d["ss"])
        st.absmax = np.array(d["absmax"])
        return st

    def summary(self, leads, samples_per_window: int) -> dict:
        out = {}
        for i, lead in enumerate(leads):
            cnt = self.n[i] * samples_per_window
            mean = self.s[i] / cnt if cnt else 0.0
            var = max(self.ss[i] / cnt - mean * mean, 0.0) if cnt else 0.0
            out[lead] = {"windows": int(self.n[i]), "mean": float(mean), "std": float(np.sqrt(var)),
                         "abs_max": float(self.absmax[i])}
        return out


def build_corpus(sources: list[str | Path], out: str | Path, config: CorpusConfig | None = None,
                 workers: int = 1, part: str | tuple[int, int] | None = None, strict: bool = False,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Build (or resume, or confirm) the corpus in ``out``; returns the manifest.

    ``part="i/n"`` builds only block ``i`` of ``n`` of the sorted file list (join parts with
    :func:`cbramod_fast.corpus.merge.merge_corpora`). ``strict`` raises on the first unusable file instead
    of recording it in ``manifest["skipped"]``. ``overwrite`` deletes an existing corpus in ``out`` first.
    """
    from tqdm import tqdm

    cfg = config or CorpusConfig()
    out = Path(out)
    sources = [str(Path(s).resolve()) for s in sources]
    if not sources:
        raise ValueError("build_corpus: no sources given")
    part = parse_part(part)
    all_files = find_records(sources)
    files = all_files[part_slice(len(all_files), part)]
    fp = _fingerprint(cfg, sources, files, part)

    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(out)
    man_path, state_path = out / MANIFEST, out / STATE
    if man_path.is_file():
        man = json.loads(man_path.read_text())
        if man.get("fingerprint") != fp:
            raise ValueError(f"{out} already holds a finished corpus built from other sources or settings; "
                             "choose another --out or pass --overwrite")
        _clean_leftovers(out)
        return man
    for tmp in out.glob("*.tmp"):  # half-written files of a killed build: never visible as finished
        tmp.unlink()

    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None and state["fingerprint"] != fp:
        raise ValueError(f"{out}: an unfinished build with other sources or settings is there; rerun it with the "
                         "same arguments, or pass --overwrite")
    if state is None:
        state = {"fingerprint": fp, "shards": [], "next_file": 0, "skip_windows": 0,
                 "rejected": dict.fromkeys(REJECT_REASONS, 0), "flat_leads": 0,
                 "stats": _Stats(len(cfg.leads)).to_dict()}
    stats = _Stats.from_dict(state["stats"])
    first, first_skip = state["next_file"], state["skip_windows"]

    threads = 0 if workers <= 1 else 1  # one C++ thread per process when the pool already uses the cores
    tasks = [(k, src, rel, str(source_path(sources, src, rel)), cfg, threads)
             for k, (src, rel) in enumerate(files) if k >= first]

    buf_x: list[np.ndarray] = []  # windows consumed but not yet in a shard
    buf_p: list[np.ndarray] = []
    buf_f: list[np.ndarray] = []  # the file index of each buffered window
    n_buf = 0
    consumed = sum(s["n"] for s in state["shards"])  # global id of the next window
    pending: list[dict] = []  # entries of files consumed but not yet committed
    next_index = first

    def commit_shard(n_take: int) -> None:
        nonlocal n_buf
        x, p, f = np.concatenate(buf_x), np.concatenate(buf_p), np.concatenate(buf_f)
        sid = len(state["shards"])
        _write_npy(np.ascontiguousarray(x[:n_take]), out / f"x-{sid:05d}.npy")
        _write_npy(np.ascontiguousarray(p[:n_take]), out / f"present-{sid:05d}.npy")
        buf_x[:], buf_p[:], buf_f[:] = ([x[n_take:]], [p[n_take:]], [f[n_take:]]) if n_take < len(f) else ([], [], [])
        n_buf -= n_take
        # resume point: the file of the first still-buffered window, and how many of its windows are written
        if n_take < len(f):
            frontier = int(f[n_take])
            skip = int(n_take - np.searchsorted(f[:n_take], frontier))
            if frontier == state["next_file"]:
                skip += state["skip_windows"]
        else:
            frontier, skip = next_index, 0
        done = [e for e in pending if e["index"] < frontier]
        pending[:] = [e for e in pending if e["index"] >= frontier]
        _absorb(done, state, stats)
        write_json({"records": [e for e in done if "error" not in e],
                      "skipped": [e for e in done if "error" in e]}, out / f"records-{sid:05d}.json")
        state["shards"].append({"x": f"x-{sid:05d}.npy", "present": f"present-{sid:05d}.npy", "n": int(n_take)})
        state["next_file"], state["skip_windows"] = frontier, skip
        state["stats"] = stats.to_dict()
        write_json(state, state_path)

    t0 = time.perf_counter()
    bar = tqdm(total=len(files), initial=first, desc=f"corpus build {out.name}", unit="file", disable=not progress)
    for res in _results(tasks, workers):
        next_index = res.index + 1
        bar.update(1)
        if res.error is not None:
            if strict:
                bar.close()
                raise RecordError(res.error if res.file in res.error else f"{res.file}: {res.error}")
            pending.append({"index": res.index, "source": res.source, "file": res.file, "error": res.error})
            continue
        n = 0 if res.x is None else len(res.x)
        drop = first_skip if res.index == first else 0
        st = _Stats(len(cfg.leads))
        if n:
            st.add(res.x, res.present)
        pending.append({"index": res.index, "source": res.source, "file": res.file, **res.meta,
                        "first": consumed - drop, "count": n, "offsets": res.offsets,
                        "_rejected": res.rejected, "_flat_leads": res.flat_leads, "_stats": st})
        if n > drop:
            buf_x.append(res.x[drop:])
            buf_p.append(res.present[drop:])
            buf_f.append(np.full(n - drop, res.index, np.int64))
            n_buf += n - drop
            consumed += n - drop
        while n_buf >= cfg.shard_windows:
            commit_shard(cfg.shard_windows)
    bar.close()
    next_index = len(files)
    if n_buf:
        commit_shard(n_buf)
    _absorb(pending, state, stats)
    return _finish(out, cfg, sources, files, part, fp, state, stats, pending, time.perf_counter() - t0)


def _absorb(entries: list[dict], state: dict, stats: _Stats) -> None:
    """Add committed files' reject counts and lead statistics to the build state (entries lose their extras)."""
    for e in entries:
        if "error" in e:
            continue
        for r in REJECT_REASONS:
            state["rejected"][r] += e["_rejected"][r]
        state["flat_leads"] += e.pop("_flat_leads")
        e.pop("_rejected")
        st = e.pop("_stats")
        stats.n += st.n
        stats.s += st.s
        stats.ss += st.ss
        stats.absmax = np.maximum(stats.absmax, st.absmax)


def _journals(out: Path, state: dict) -> tuple[list, list]:
    records, skipped = [], []
    for name in (f"records-{i:05d}.json" for i in range(len(state["shards"]))):
        j = json.loads((out / name).read_text())
        records += j["records"]
        skipped += j["skipped"]
    return records, skipped


def _finish(out: Path, cfg: CorpusConfig, sources, files, part, fp, state, stats: _Stats, tail: list[dict],
            seconds: float) -> dict:
    records, skipped = _journals(out, state)
    records += [e for e in tail if "error" not in e]
    skipped += [e for e in tail if "error" in e]
    for e in records + skipped:
        e.pop("index", None)
    n_windows = sum(s["n"] for s in state["shards"])
    assert n_windows == sum(r["count"] for r in records), "internal: window count mismatch"
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": fp, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(), "leads": list(cfg.leads), "fs": cfg.fs, "patch": cfg.fs,
        "window_patches": cfg.window_patches, "shape": [len(cfg.leads), cfg.window_patches, cfg.fs],
        "dtype": cfg.dtype, "scale": cfg.scale, "sources": sources, "part": list(part),
        "shards": state["shards"], "n_windows": n_windows,
        "counts": {"files": len(files), "records": len(records), "skipped_files": len(skipped),
                   "windows": n_windows, "rejected": state["rejected"], "flat_leads_masked": state["flat_leads"],
                   "windows_per_lead": stats.n.tolist()},
        "lead_stats": stats.summary(cfg.leads, cfg.window_patches * cfg.fs), "lead_sums": stats.to_dict(),
        "records": records, "skipped": skipped,
        "build_seconds_last_run": round(seconds, 3),
    }
    write_json(manifest, out / MANIFEST)
    _clean_leftovers(out)
    return manifest


def _clean_leftovers(out: Path) -> None:
    for p in list(out.glob("records-*.json")) + [out / STATE]:
        p.unlink(missing_ok=True)


def _clear(out: Path) -> None:
    for pat in ("x-*.npy", "present-*.npy", "records-*.json", "*.tmp", STATE, MANIFEST):
        for p in out.glob(pat):
            p.unlink()
