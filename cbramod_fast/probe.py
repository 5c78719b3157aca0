"""Does pretraining help? A linear probe on a real labelled ECG task.

Task: atrial fibrillation vs normal sinus rhythm per 10-s window of CPSC 2021 (2 leads, I and II, 200 Hz),
labels from the rhythm notes (``(AFIB`` ... ``(N``) of each record's ``.atr``. Splits are by patient
(every record of a patient on one side), so no window of a test patient is ever seen in training.
Features: the frozen encoder's output (B, C, N, 200) averaged over patches, and its standard deviation
over patches, for each present lead; a standardised logistic regression on top.

``read_wfdb_windows`` is also the small in-memory reader the pretraining tests and the probe use:
``signal.preprocess`` (band-pass, resampling to 200 Hz, µV/100 scaling) and fixed windows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_ALIASES = {"MLII": "II", "ML2": "II", "AVR": "aVR", "AVL": "aVL", "AVF": "aVF"}
_UNIT_TO_UV = {"uv": 1.0, "µv": 1.0, "mv": 1000.0, "v": 1e6}


@dataclass
class Windows:
    x: np.ndarray  # (W, C, N, 200) float32, µV/100
    present: np.ndarray  # (W, C) bool
    record: list[str]  # record name of each window
    start_s: np.ndarray  # (W,) window start in seconds from the record's beginning


def _lead_name(name: str) -> str:
    n = name.strip()
    return _ALIASES.get(n.upper(), _ALIASES.get(n, n))


def read_wfdb_windows(records: list[str | Path], leads: tuple[str, ...] = STANDARD_LEADS, window_s: int = 10,
                      fs: int = 200, band: tuple[float, float] = (0.5, 45.0), scale: float = 0.01,
                      max_abs: float = 80.0) -> Windows:
    """Cut WFDB records into ``window_s`` windows of ``(C, window_s, fs)`` patches in the lead order ``leads``.

    Leads a record lacks are zero with ``present`` False. Windows with a non-finite value, a flat present
    lead or ``|x| > max_abs`` (after scaling) are dropped.
    """
    import wfdb

    parts = []
    for rec in records:
        r = wfdb.rdrecord(str(rec))
        units = [_UNIT_TO_UV.get(str(u).strip().lower(), None) for u in r.units]
        if None in units:
            raise ValueError(f"{rec}: unknown signal units {r.units}")
        sig = r.p_signal.T.astype(np.float64) * np.asarray(units)[:, None]
        parts.append(windows_from_signal(sig, float(r.fs), [_lead_name(n) for n in r.sig_name], Path(rec).name,
                                         leads, window_s, fs, band, scale, max_abs))
    return _concat(parts, f"{len(records)} records")


def windows_from_signal(sig_uv: np.ndarray, fs_rec: float, rec_leads: list[str], name: str,
                        leads: tuple[str, ...] = STANDARD_LEADS, window_s: int = 10, fs: int = 200,
                        band: tuple[float, float] = (0.5, 45.0), scale: float = 0.01,
                        max_abs: float = 80.0) -> Windows | None:
    """Band-pass, resample to ``fs``, scale and cut one recording ``(C_rec, T)`` in µV into windows
    (the C++ pipeline, ``signal.preprocess``, as corpus building uses it)."""
    from .signal import preprocess

    pre = preprocess(np.nan_to_num(np.asarray(sig_uv, np.float64)), float(fs_rec), band=band, fs_out=fs,
                     scale=scale)
    sig = pre.patches.reshape(pre.patches.shape[0], -1)
    out = np.zeros((len(leads), sig.shape[-1]), np.float32)
    present = np.zeros(len(leads), bool)
    for i, lead in enumerate(leads):
        if lead in rec_leads:
            out[i] = sig[rec_leads.index(lead)]
            present[i] = True
    if not present.any():
        return None
    xs, starts, w = [], [], window_s * fs
    for k in range(out.shape[-1] // w):
        seg = out[:, k * w:(k + 1) * w]
        if (not np.isfinite(seg).all() or np.abs(seg).max() > max_abs
                or (seg[present].std(axis=-1) < 1e-3).any()):
            continue
        xs.append(seg.reshape(len(leads), window_s, fs))
        starts.append(k * window_s)
    if not xs:
        return None
    return Windows(np.stack(xs), np.repeat(present[None], len(xs), 0), [name] * len(xs),
                   np.asarray(starts, np.float64))


def _concat(parts: list[Windows | None], what: str) -> Windows:
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError(f"no usable windows in {what}")
    return Windows(np.concatenate([p.x for p in parts]), np.concatenate([p.present for p in parts]),
                   [r for p in parts for r in p.record], np.concatenate([p.start_s for p in parts]))


def records_in(folder: str | Path) -> list[Path]:
    """WFDB record paths (without extension) of every ``.hea`` in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    recs = sorted(p.with_suffix("") for p in folder.glob("*.hea"))
    if not recs:
        raise FileNotFoundError(f"{folder}: no WFDB .hea headers")
    return recs


# -- labels ----------------------------------------------------------------------------------------------
def rhythm_intervals(record: str | Path) -> list[tuple[int, int, str]]:
    """``(start, end, rhythm)`` sample intervals from the ``(XXX`` rhythm notes of ``record.atr``."""
    import wfdb

    ann = wfdb.rdann(str(record), "atr")
    sig_len = wfdb.rdheader(str(record)).sig_len
    marks = [(int(s), n[1:]) for s, n in zip(ann.sample, ann.aux_note) if n.startswith("(")]
    if not marks:
        return [(0, sig_len, "N")]  # CPSC 2021 records without rhythm notes are sinus rhythm throughout
    out = [(0, marks[0][0], "N")] if marks[0][0] > 0 else []
    for (s, name), nxt in zip(marks, marks[1:] + [(sig_len, "")]):
        if nxt[0] > s:
            out.append((s, nxt[0], name))
    return out


def af_labels(records: list[Path], windows: Windows, fs_rec: dict[str, float], window_s: int = 10) -> np.ndarray:
    """1 = the window lies wholly in AF, 0 = wholly in normal rhythm, -1 = mixed (dropped by the caller)."""
    by_name = {Path(r).name: rhythm_intervals(r) for r in records}
    y = np.full(len(windows.record), -1, np.int64)
    for i, (name, t0) in enumerate(zip(windows.record, windows.start_s)):
        fs = fs_rec[name]
        a, b = t0 * fs, (t0 + window_s) * fs
        kinds = {k for s, e, k in by_name[name] if s < b and e > a}
        if kinds == {"AFIB"}:
            y[i] = 1
        elif kinds == {"N"}:
            y[i] = 0
    return y


def load_eegmat_ecg(folder: str | Path, lead: str = "II") -> tuple[Windows, np.ndarray, np.ndarray]:
    """eegmat's single ECG channel as windows (placed in the ``lead`` slot), label 1 = mental arithmetic
    (``SubjectXX_2``), 0 = rest (``SubjectXX_1``), and the subject of each window."""
    import pyedflib

    files = sorted(Path(folder).glob("Subject*_[12].edf"))
    if not files:
        raise FileNotFoundError(f"{folder}: no eegmat SubjectXX_[12].edf files")
    parts = []
    for f in files:
        with pyedflib.EdfReader(str(f)) as edf:
            labels = edf.getSignalLabels()
            if "ECG ECG" not in labels:
                raise ValueError(f"{f}: no 'ECG ECG' channel (has {labels})")
            i = labels.index("ECG ECG")
            unit = _UNIT_TO_UV.get(edf.getPhysicalDimension(i).strip().lower())
            if unit is None:
                raise ValueError(f"{f}: unknown ECG unit {edf.getPhysicalDimension(i)!r}")
            sig = edf.readSignal(i)[None].astype(np.float64) * unit
            parts.append(windows_from_signal(sig, edf.getSampleFrequency(i), [lead], f.stem))
    w = _concat(parts, str(folder))
    y = np.asarray([int(r.endswith("_2")) for r in w.record])
    return w, y, np.asarray([r.split("_")[0] for r in w.record])


def patient_of(record: str) -> str:
    """CPSC 2021 record names are ``data_<patient>_<segment>``."""
    return record.split("_")[1]


# -- features and the probe --------------------------------------------------------------------------------
@torch.no_grad()
def encoder_features(model: torch.nn.Module, x: np.ndarray, present: np.ndarray, batch: int = 32) -> np.ndarray:
    """Frozen-encoder features: per present lead, the mean and std over patches of ``encode`` (eval mode)."""
    model.eval()
    feats = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        h = model.encode(xb)  # (B, C, N, D)
        f = torch.cat([h.mean(dim=2), h.std(dim=2)], dim=-1)  # (B, C, 2D)
        feats.append(f.numpy())
    f = np.concatenate(feats)
    keep = present[0]  # the probe's windows all have the same present leads
    if not (present == keep).all():
        raise ValueError("encoder_features: windows with different lead sets")
    return f[:, keep].reshape(len(f), -1)


@dataclass
class ProbeResult:
    name: str
    balanced_accuracy: float
    auc: float
    folds: list[dict]


def linear_probe(features: np.ndarray, y: np.ndarray, groups: np.ndarray, name: str,
                 folds: list[list[str]] | None = None) -> ProbeResult:
    """Group-held-out logistic regression: each fold's test set is the windows of its listed groups.

    Default folds: every (positive-only group, negative-only group) pair when no group has both classes
    (CPSC 2021: one AF and one normal patient held out), else leave-one-group-out.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if folds is None:
        classes = {g: set(y[groups == g].tolist()) for g in sorted(set(groups.tolist()))}
        if all(len(c) == 1 for c in classes.values()):
            pos = [g for g, c in classes.items() if c == {1}]
            neg = [g for g, c in classes.items() if c == {0}]
            folds = [[p, n] for p in pos for n in neg]
        else:
            folds = [[g] for g in classes]
    rows, bal, aucs = [], [], []
    for test_groups in folds:
        test = np.isin(groups, test_groups)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=3000))
        clf.fit(features[~test], y[~test])
        score = clf.predict_proba(features[test])[:, 1]
        b = balanced_accuracy_score(y[test], score > 0.5)
        a = roc_auc_score(y[test], score)
        rows.append({"test_groups": [str(g) for g in test_groups], "balanced_accuracy": float(b), "auc": float(a),
                     "n_test": int(test.sum())})
        bal.append(b)
        aucs.append(a)
    return ProbeResult(name, float(np.mean(bal)), float(np.mean(aucs)), rows)


# -- the experiment ----------------------------------------------------------------------------------------
def load_cpsc2021(folder: str | Path) -> tuple[Windows, np.ndarray, np.ndarray]:
    """CPSC 2021 windows in the 12-lead layout (I, II present), AF labels, patient of each window."""
    import wfdb

    recs = records_in(folder)
    w = read_wfdb_windows(recs)
    fs = {r.name: float(wfdb.rdheader(str(r)).fs) for r in recs}
    y = af_labels(recs, w, fs)
    keep = y >= 0
    w = Windows(w.x[keep], w.present[keep], [r for r, k in zip(w.record, keep) if k], w.start_s[keep])
    return w, y[keep], np.asarray([patient_of(r) for r in w.record])


TASKS = {
    "cpsc2021_af": (("CPSC 2021: AF vs normal rhythm per 10-s window, leads I+II; folds = every (AF patient, "
                    "normal patient) pair held out"), "data/ecg_cpsc2021", load_cpsc2021),
    "eegmat_ecg_task": (("eegmat ECG: mental arithmetic vs rest per 10-s window, single ECG lead; "
                        "leave-one-subject-out (12 folds)"), "data/eeg_ecg_eegmat", load_eegmat_ecg),
}


def pretrain_variant(out_dir: Path, name: str, steps: int, preset: str = "small", seed: int = 0,
                     batch_size: int = 32, lr: float = 1e-3, **mask_kw) -> Path:
    """Pretrain on the shipped demo sample only (no probe data) into ``out_dir/name``; reuse a finished run."""
    from .pretrain import DEMO_DATA, ArrayLoader, PretrainConfig, pretrain

    run = out_dir / name
    ck = run / "checkpoint.pt"
    if ck.is_file() and torch.load(ck, map_location="cpu", weights_only=True)["step"] >= steps:
        return run
    if run.exists():
        import shutil

        shutil.rmtree(run)
    pre = read_wfdb_windows(records_in(DEMO_DATA))
    cfg = PretrainConfig(data="(in-memory demo sample)", out=str(run), preset=preset, steps=steps,
                         batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20), ckpt_every=100,
                         log_every=10, workers=0, device="cpu", amp="none", seed=seed, **mask_kw)
    pretrain(cfg, loader=ArrayLoader(pre.x, pre.present, batch_size, seed=seed), quiet=True)
    return run


def run_experiment(shared_dir: str | Path, out_dir: str | Path, steps: int = 500, preset: str = "small",
                   seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Random init vs encoders pretrained with patch-only and with dual masking, same linear probe.

    Pretraining sees only the shipped demo sample (CinC 2021 + MIT-BIH 100): no window, subject or
    patient of the probe tasks. Each seed gives its own random init and its own pretraining runs (which
    start from that same init); results are reported per seed and as mean and std over seeds.
    """
    from .model import CBraMod
    from .model.config import PRESETS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {task: loader(Path(shared_dir) / sub) for task, (_, sub, loader) in TASKS.items()}
    per_seed: dict[str, dict[str, list[ProbeResult]]] = {task: {} for task in TASKS}
    for seed in seeds:
        torch.manual_seed(seed * 1_000_003)  # the initial weights the pretraining runs start from
        models = {"random init": CBraMod(**PRESETS[preset].to_dict(), backend="torch")}
        for name, kw in (("patch-only", {"patch_ratio": 0.5, "lead_ratio": 0.0}),
                         ("dual", {"patch_ratio": 0.5, "lead_ratio": 0.25})):
            run = pretrain_variant(out_dir / f"seed{seed}", name, steps, preset, seed, **kw)
            models[f"{name} pretrained"] = CBraMod.from_pretrained(run / "checkpoint.pt", backend="torch")
        for task, (w, y, groups) in data.items():
            for name, m in models.items():
                r = linear_probe(encoder_features(m, w.x, w.present), y, groups, name)
                per_seed[task].setdefault(name, []).append(r)
    report: dict = {"preset": preset, "pretrain_steps": steps, "seeds": list(seeds), "torch": torch.__version__,
                    "pretrain_data": "cbramod_fast/data/ecg_demo (CinC 2021 x25 + MIT-BIH 100)",
                    "probe": "frozen encoder; per present lead mean+std over patches; standardised logistic "
                             "regression (C=0.1, balanced classes)", "tasks": {}}
    for task, (desc, _, _) in TASKS.items():
        w, y, groups = data[task]
        summary = {}
        for name, rs in per_seed[task].items():
            aucs, bals = [r.auc for r in rs], [r.balanced_accuracy for r in rs]
            summary[name] = {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
                             "balanced_accuracy_mean": float(np.mean(bals)),
                             "balanced_accuracy_std": float(np.std(bals)),
                             "per_seed": [asdict(r) for r in rs]}
        report["tasks"][task] = {"description": desc, "n_windows": len(y), "n_positive": int(y.sum()),
                                 "groups": sorted(set(groups.tolist())), "results": summary}
    tmp = out_dir / "probe.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out_dir / "probe.json")
    return report
