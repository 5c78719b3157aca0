"""Reading ECG / EEG recordings: WFDB, EDF/BDF and NumPy files → one recording in µV, leads in a requested order.

The one place the package reads recordings: corpus building, the fusion datasets, the in-memory windows of
tests and experiments all come through here, so units and lead names mean the same everywhere.
``wfdb`` and ``pyedflib`` are imported only when a file needs them (single-file WFDB records in format 16
or 212 — most PhysioNet ECG — are read directly, without ``wfdb``).

Every reader returns a :class:`Record` whose ``signal`` is ``(L, T)`` float64 in µV, its rows in the order
of the requested ``leads``; a lead the file lacks is a row of zeros with ``present[i] = False``.

Lead names are matched case-, space- and alias-insensitively (:func:`normalize_lead`): ``MLII`` is II,
``avr`` is aVR, ``ECG V1`` / ``Lead V1`` are V1, ``DII`` is II. Any other name (``ECG ECG1``, ``A2-A1``)
matches itself after the same normalisation, so EDF channels can be picked with ``leads=("ECG ECG1",)``.

NumPy input (one recording per file):

* ``.npz`` with keys ``signal`` — shape ``(C, T)``, leads first —, ``fs`` (Hz, scalar) and optionally
  ``leads`` (``C`` names) and ``unit`` (``"uV"`` default, ``"mV"``, ``"V"``, ``"nV"``).
* ``.npy`` holding a ``(C, T)`` array; its rate (and unit, default µV) come from the build configuration
  (``--npy-fs``, ``--npy-unit``).

Without lead names a NumPy record must have exactly as many rows as requested leads and is taken to be in
that order. An array with more rows than samples is rejected as a probable ``(T, C)`` layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RecordError

__all__ = ["EDF_SUFFIXES", "NUMPY_SUFFIXES", "STANDARD_LEADS", "SUFFIXES", "WFDB_SUFFIXES", "Record", "RecordError",
           "find_records", "normalize_lead", "pick_leads", "read_edf", "read_edf_signals", "read_numpy",
           "read_record", "read_wfdb", "records_in", "source_path", "unit_factor"]

STANDARD_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

# normalised name -> canonical normalised name
_ALIASES = {"mli": "i", "mlii": "ii", "ml2": "ii", "mliii": "iii", "ml3": "iii", "di": "i", "dii": "ii",
            "diii": "iii", "1": "i", "2": "ii", "3": "iii"}
_STANDARD_NORM = {n.lower() for n in STANDARD_LEADS}
_UNIT_TO_UV = {"uv": 1.0, "µv": 1.0, "μv": 1.0, "mv": 1e3, "v": 1e6, "nv": 1e-3}

WFDB_SUFFIXES = (".hea",)
EDF_SUFFIXES = (".edf", ".bdf")
NUMPY_SUFFIXES = (".npy", ".npz")
SUFFIXES = WFDB_SUFFIXES + EDF_SUFFIXES + NUMPY_SUFFIXES


@dataclass
class Record:
    record: str  # record name (file stem for EDF/NumPy, the header's name for WFDB)
    fs: float  # sampling rate of ``signal`` in Hz
    signal: np.ndarray  # (L, T) float64, µV, rows in the requested lead order, zeros where absent
    present: np.ndarray  # (L,) bool
    source_leads: list[str | None]  # the file's name for each requested lead (None where absent)
    units: list[str | None]  # the file's unit for each requested lead


def normalize_lead(name: str) -> str:
    """Canonical comparison key of a lead name (lower case, no spaces/dashes/underscores, aliases resolved)."""
    n = "".join(ch for ch in str(name).strip().lower() if ch not in " _-.")
    for prefix in ("lead", "ecg"):
        rest = n[len(prefix):]
        if n.startswith(prefix) and (rest in _STANDARD_NORM or rest in _ALIASES):
            n = rest
    return _ALIASES.get(n, n)


def unit_factor(unit: str | None, where: str) -> float:
    """Multiplier from ``unit`` to µV; raises :class:`RecordError` for an unknown unit."""
    key = str(unit or "").strip().lower()
    if key not in _UNIT_TO_UV:
        raise RecordError(f"{where}: unknown signal unit {unit!r} (known: uV, mV, V, nV)")
    return _UNIT_TO_UV[key]


def pick_leads(names: list[str], leads: tuple[str, ...]) -> list[int | None]:
    """For each requested lead, the index of the first file channel with that name (None if absent)."""
    keys = [normalize_lead(n) for n in names]
    return [keys.index(k) if (k := normalize_lead(lead)) in keys else None for lead in leads]


def _assemble(name: str, fs: float, length: int, leads: tuple[str, ...], names: list[str],
              units: list[str | None], get_row, where: str) -> Record:
    """Build a Record from per-channel accessors; ``get_row(i)`` returns channel ``i`` in file units."""
    if not np.isfinite(fs) or fs <= 0:
        raise RecordError(f"{where}: invalid sampling rate {fs!r}")
    if length <= 0:
        raise RecordError(f"{where}: no samples")
    picked = pick_leads(names, leads)
    if all(p is None for p in picked):
        raise RecordError(f"{where}: none of the requested leads {list(leads)} in the file's {list(names)}")
    out = np.zeros((len(leads), length), np.float64)
    for row, ch in enumerate(picked):
        if ch is not None:
            data = np.asarray(get_row(ch), np.float64)
            if data.shape != (length,):
                raise RecordError(f"{where}: channel {names[ch]!r} has {data.shape[0]} samples, expected {length}"
                                  " (truncated file?)")
            out[row] = data * unit_factor(units[ch], f"{where} channel {names[ch]!r}")
    return Record(record=name, fs=float(fs), signal=out, present=np.array([p is not None for p in picked]),
                  source_leads=[names[p] if p is not None else None for p in picked],
                  units=[units[p] if p is not None else None for p in picked])


def read_wfdb(path: str | Path, leads: tuple[str, ...] = STANDARD_LEADS) -> Record:
    """Read a WFDB record from its ``.hea`` path (signal files: ``.dat``, ``.mat``, ... as the header says)."""
    path = Path(path)
    base = str(path.with_suffix("")) if path.suffix == ".hea" else str(path)
    if _is_multi_segment(path.with_suffix(".hea")):
        raise RecordError(f"{path}: multi-segment master header (its segments are read individually)")
    fast = _read_wfdb_fast(path.with_suffix(".hea"))
    if fast is not None:
        name, fs, sig, names, units = fast
        return _assemble(name, fs, sig.shape[0], leads, names, units, lambda i: sig[:, i], str(path))
    import wfdb  # other layouts (several signal files, other formats): the reference reader

    try:
        rec = wfdb.rdrecord(base, physical=True)
    except Exception as exc:  # wfdb raises many types for broken files; report them uniformly
        raise RecordError(f"{path}: unreadable WFDB record ({type(exc).__name__}: {exc})") from exc
    sig = rec.p_signal
    if sig is None or sig.ndim != 2:
        raise RecordError(f"{path}: no signal")
    if rec.sig_len and sig.shape[0] != rec.sig_len:
        raise RecordError(f"{path}: {sig.shape[0]} samples read, header says {rec.sig_len} (truncated file?)")
    units = [u if u else "mV" for u in (rec.units or ["mV"] * sig.shape[1])]  # WFDB's default unit is mV
    return _assemble(rec.record_name, rec.fs, sig.shape[0], leads, list(rec.sig_name), units,
                     lambda i: sig[:, i], str(path))


def _is_multi_segment(hea: Path) -> bool:
    """True for a multi-segment master header (record line ``name/n_segments ...``); cheap, no pandas."""
    try:
        with open(hea, encoding="latin-1") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    return "/" in line.split()[0]
    except OSError:
        return False  # let wfdb report the problem
    return False


_SIG_LINE = re.compile(
    r"^(?P<file>\S+)\s+(?P<fmt>\d+)(?P<spf>x\d+)?(?P<skew>:\d+)?(?:\+(?P<off>\d+))?"
    r"(?:\s+(?P<gain>[-+\d.eE]+)(?:\((?P<base>-?\d+)\))?(?:/(?P<units>\S+))?"
    r"(?:\s+(?P<res>\d+)(?:\s+(?P<zero>-?\d+))?)?)?")


def _read_wfdb_fast(hea: Path):
    """``(name, fs, signal (T, C) float64 in file units, names, units)`` for the common simple layout, else None.

    ``wfdb``'s header parser costs ~20 ms per record (pandas); most PhysioNet ECG records are one signal file
    in format 16 or 212 with plain fields, which this reads directly. The physical values are computed as
    ``wfdb.rdrecord`` does — ``(digital - baseline) / gain`` in float64, the format's invalid value → NaN — and
    a test checks equality with ``wfdb`` on every real record here. Anything else returns None (→ ``wfdb``).
    """
    try:
        lines = [ln.strip() for ln in hea.read_text(encoding="latin-1").splitlines()]
    except OSError:
        return None
    lines = [ln.split("#")[0].strip() for ln in lines if ln and not ln.startswith("#")]
    lines = [ln for ln in lines if ln]
    if not lines:
        return None
    head = lines[0].split()
    if len(head) < 4 or "/" in head[0] or not head[1].isdigit():
        return None
    nsig = int(head[1])
    try:
        fs, siglen = float(head[2]), int(head[3])
    except ValueError:
        return None  # counter frequency, base time, ... : let wfdb handle it
    if nsig < 1 or len(lines) < 1 + nsig or fs <= 0 or siglen <= 0:
        return None
    sigs = []
    for ln in lines[1:1 + nsig]:
        m = _SIG_LINE.match(ln)
        if m is None or m["spf"] not in (None, "x1") or m["skew"] or m["gain"] is None:
            return None
        gain = float(m["gain"])
        if gain == 0 or m["fmt"] not in ("16", "212"):
            return None
        zero = int(m["zero"]) if m["zero"] else 0
        rest = ln[m.end():].split()  # init value, checksum, block size, description
        sigs.append({"file": m["file"], "fmt": m["fmt"], "off": int(m["off"] or 0), "gain": gain,
                     "base": int(m["base"]) if m["base"] is not None else zero, "units": m["units"] or "mV",
                     "name": " ".join(rest[3:]) if len(rest) > 3 else ""})
    if len({(s["file"], s["fmt"], s["off"]) for s in sigs}) != 1 or not all(s["name"] for s in sigs):
        return None
    dat = hea.parent / sigs[0]["file"]
    n = siglen * nsig
    try:
        raw = np.fromfile(dat, dtype=np.uint8, offset=sigs[0]["off"])
    except (OSError, ValueError) as exc:
        raise RecordError(f"{hea}: cannot read signal file {dat.name} ({exc})") from exc
    if sigs[0]["fmt"] == "16":
        if raw.size < 2 * n:
            raise RecordError(f"{hea}: {dat.name} holds {raw.size // (2 * nsig)} samples per signal, header says "
                              f"{siglen} (truncated file?)")
        d = raw[:2 * n].view("<i2").astype(np.int64)
        invalid = -32768
    else:
        need = 3 * (n // 2) + 2 * (n % 2)
        if raw.size < need:
            raise RecordError(f"{hea}: {dat.name} holds {2 * raw.size // (3 * nsig)} samples per signal, header says "
                              f"{siglen} (truncated file?)")
        b = raw[:3 * ((n + 1) // 2)].astype(np.int64) if raw.size >= 3 * ((n + 1) // 2) else \
            np.concatenate([raw[:need], np.zeros(1, np.uint8)]).astype(np.int64)
        b = b.reshape(-1, 3)
        d = np.empty(2 * len(b), np.int64)
        d[0::2] = b[:, 0] | ((b[:, 1] & 0x0F) << 8)
        d[1::2] = b[:, 2] | ((b[:, 1] & 0xF0) << 4)
        d = d[:n]
        d[d > 2047] -= 4096
        invalid = -2048
    d = d.reshape(siglen, nsig)
    out = d.astype(np.float64)
    base = np.array([s["base"] for s in sigs], np.float64)
    gain = np.array([s["gain"] for s in sigs], np.float64)
    np.subtract(out, base, out)
    np.divide(out, gain, out)
    out[d == invalid] = np.nan
    return head[0], fs, out, [s["name"] for s in sigs], [s["units"] for s in sigs]


def _open_edf(path: Path):
    """A ``pyedflib.EdfReader`` of ``path``; any failure to open it is a :class:`RecordError` naming the file."""
    import pyedflib

    try:
        return pyedflib.EdfReader(str(path))
    except Exception as exc:  # pyedflib raises OSError and others for broken files; report them uniformly
        raise RecordError(f"{path}: unreadable EDF/BDF file ({type(exc).__name__}: {exc})") from exc


def read_edf(path: str | Path, leads: tuple[str, ...] = STANDARD_LEADS) -> Record:
    """Read the requested channels of an EDF/EDF+/BDF file (physical values) with ``pyedflib``."""
    path = Path(path)
    f = _open_edf(path)
    try:
        names = [s.strip() for s in f.getSignalLabels()]
        picked = [p for p in pick_leads(names, leads) if p is not None]
        if not picked:
            raise RecordError(f"{path}: none of the requested leads {list(leads)} in the file's {names}")
        rates = {float(f.getSampleFrequency(i)) for i in picked}
        if len(rates) != 1:
            raise RecordError(f"{path}: the requested leads have different rates {sorted(rates)} Hz")
        fs = rates.pop()
        length = int(f.getNSamples()[picked[0]])
        units = [f.getPhysicalDimension(i) for i in range(len(names))]
        return _assemble(path.stem, fs, length, leads, names, units, lambda i: f.readSignal(i), str(path))
    finally:
        f.close()


def read_edf_signals(path: str | Path) -> tuple[np.ndarray, float, list[str]]:
    """Every signal of an EDF/BDF file at its most common rate, in µV: ``(signals (S, T), fs, labels)``.

    For EEG + ECG files whose channels are picked by kind afterwards (fusion datasets); signals recorded at
    another rate (annotations, slow sensors) are left out.
    """
    path = Path(path)
    f = _open_edf(path)
    try:
        fs_all = f.getSampleFrequencies()
        fs = float(np.bincount(fs_all.astype(int)).argmax())
        rows, labels = [], []
        for i, label in enumerate(f.getSignalLabels()):
            if float(fs_all[i]) != fs:
                continue
            rows.append(f.readSignal(i) * unit_factor(f.getPhysicalDimension(i), f"{path} signal {label!r}"))
            labels.append(label.strip())
    finally:
        f.close()
    return np.asarray(rows), fs, labels


def read_numpy(path: str | Path, leads: tuple[str, ...] = STANDARD_LEADS, fs: float | None = None,
               unit: str = "uV") -> Record:
    """Read a ``.npz`` (``signal`` (C, T), ``fs``, optional ``leads``, ``unit``) or a ``.npy`` (C, T) file."""
    path = Path(path)
    names = None
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "signal" not in z or "fs" not in z:
                    raise RecordError(f"{path}: .npz needs keys 'signal' (C, T) and 'fs'; has {sorted(z.keys())}")
                sig = np.asarray(z["signal"])
                fs = float(np.asarray(z["fs"]).reshape(()))
                names = [str(n) for n in z["leads"]] if "leads" in z else None
                unit = str(np.asarray(z["unit"]).reshape(())) if "unit" in z else unit
        else:
            sig = np.load(path, mmap_mode="r", allow_pickle=False)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(f"{path}: unreadable NumPy file ({type(exc).__name__}: {exc})") from exc
    if fs is None:
        raise RecordError(f"{path}: a .npy file has no sampling rate; set it (--npy-fs / numpy_fs)")
    if sig.ndim == 1:
        sig = sig[None]
    if sig.ndim != 2 or not (np.issubdtype(sig.dtype, np.floating) or np.issubdtype(sig.dtype, np.integer)):
        raise RecordError(f"{path}: expected a real (C, T) array, got {sig.dtype} {sig.shape}")
    if sig.shape[0] > sig.shape[1]:
        raise RecordError(f"{path}: shape {sig.shape} has more rows than samples; store signals as (C, T)")
    if names is None:
        if sig.shape[0] != len(leads):
            raise RecordError(f"{path}: {sig.shape[0]} rows but no 'leads' names; without names the rows must be "
                              f"exactly the {len(leads)} requested leads")
        names = list(leads)
    if len(names) != sig.shape[0]:
        raise RecordError(f"{path}: {len(names)} lead names for {sig.shape[0]} rows")
    return _assemble(path.stem, fs, sig.shape[1], leads, names, [unit] * len(names), lambda i: sig[i], str(path))


def read_record(path: str | Path, leads: tuple[str, ...] = STANDARD_LEADS, numpy_fs: float | None = None,
                numpy_unit: str = "uV") -> Record:
    """Dispatch on the file suffix (``.hea`` WFDB, ``.edf``/``.bdf``, ``.npy``/``.npz``)."""
    suffix = Path(path).suffix.lower()
    if suffix in WFDB_SUFFIXES:
        return read_wfdb(path, leads)
    if suffix in EDF_SUFFIXES:
        return read_edf(path, leads)
    if suffix in NUMPY_SUFFIXES:
        return read_numpy(path, leads, numpy_fs, numpy_unit)
    raise RecordError(f"{path}: unsupported file type {suffix!r} (supported: {', '.join(SUFFIXES)})")


def find_records(sources: list[str | Path]) -> list[tuple[int, str]]:
    """All readable files under ``sources`` as ``(source index, path relative to that source)``, sorted.

    A source may be a folder (searched recursively) or a single file (relative path = its name).
    """
    out: list[tuple[int, str]] = []
    for i, src in enumerate(sources):
        src = Path(src)
        if src.is_file():
            out.append((i, src.name))
            continue
        if not src.is_dir():
            raise FileNotFoundError(f"source {src}: no such file or folder")
        out.extend((i, p.relative_to(src).as_posix()) for p in src.rglob("*")
                   if p.suffix.lower() in SUFFIXES and p.is_file())
    return sorted(set(out))


def records_in(folder: str | Path) -> list[Path]:
    """The WFDB records of ``folder`` (its ``.hea`` headers, not recursive) as paths without extension, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    recs = sorted(p.with_suffix("") for p in folder.glob("*.hea"))
    if not recs:
        raise FileNotFoundError(f"{folder}: no WFDB .hea headers")
    return recs


def source_path(sources: list[str | Path], src_index: int, rel: str) -> Path:
    """The file a :func:`find_records` entry names."""
    src = Path(sources[src_index])
    return src if src.is_file() else src / rel
