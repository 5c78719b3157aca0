"""Does pretraining help? Linear probes of frozen encoders on real labelled ECG tasks.

    python experiments/pretrain_probe.py --data-dir ../shared/data --out runs/probe    # 11-27 min, 2 cores

Tasks (``TASKS``; labels from the recordings' annotations or conditions, splits by subject/patient):
eegmat ECG rest vs mental arithmetic (leave-one-subject-out), heart rate per window from the annotated beats
of CPSC 2021 and MIT-BIH 100 (leave-one-patient-out ridge regression), CPSC 2021 AF vs normal rhythm.
Each task's encoders are pretrained on every other ECG source in ``--data-dir`` (``Task.exclude``), so no
window, subject or patient of a probe task is in its pretraining. Features: the frozen encoder's output
averaged over patches, and its standard deviation over patches, for each present lead (``FEATURES``: last
layer, or the patch embedding and every layer concatenated); a standardised linear model on top.
Results: ``OUT/probe.json`` (``bench/results/pretrain_probe.json`` is the committed run).

Needs ``wfdb`` (beat and rhythm annotations) and ``pyedflib`` (eegmat EDFs) besides the package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cbramod_fast.atomic import atomic_text
from cbramod_fast.benchmark.device import cpu_model, cpu_uarch
from cbramod_fast.corpus.windows import Windows, concat_windows, read_windows, windows_from_signal
from cbramod_fast.readers import STANDARD_LEADS, read_edf, records_in


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


def load_eegmat_ecg(folder: str | Path, lead: str = "II", leads: tuple[str, ...] = STANDARD_LEADS
                    ) -> tuple[Windows, np.ndarray, np.ndarray]:
    """eegmat's single ECG channel as windows (in the ``lead`` slot of ``leads``), label 1 = mental arithmetic
    (``SubjectXX_2``), 0 = rest (``SubjectXX_1``), and the subject of each window."""
    files = sorted(Path(folder).glob("Subject*_[12].edf"))
    if not files:
        raise FileNotFoundError(f"{folder}: no eegmat SubjectXX_[12].edf files")
    parts = []
    for f in files:
        rec = read_edf(f, leads=("ECG ECG",))
        parts.append(windows_from_signal(rec.signal, rec.fs, [lead], rec.record, leads))
    w = concat_windows(parts, str(folder))
    y = np.asarray([int(r.endswith("_2")) for r in w.record])
    return w, y, np.asarray([r.split("_")[0] for r in w.record])


def patient_of(record: str) -> str:
    """Patient of a record: CPSC 2021 names are ``data_<patient>_<segment>``; MIT-BIH records are patients."""
    return record.split("_")[1] if record.startswith("data_") else f"mitdb{record}"


# WFDB beat-annotation symbols (rhythm notes "+", signal-quality marks etc. are not beats).
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")


def beat_samples(record: str | Path) -> np.ndarray:
    """Sample indices of the annotated beats (R peaks) in ``record.atr``."""
    import wfdb

    ann = wfdb.rdann(str(record), "atr")
    return np.asarray([s for s, sym in zip(ann.sample, ann.symbol) if sym in BEAT_SYMBOLS], np.int64)


def heart_rate_labels(records: list[Path], windows: Windows, fs_rec: dict[str, float],
                      window_s: int = 10) -> np.ndarray:
    """Mean heart rate (bpm) of each window from the annotated beats: 60 · (k − 1) / (t_last − t_first) over
    the k beats inside it; NaN when fewer than 3 beats (the caller drops those)."""
    beats = {Path(r).name: beat_samples(r) for r in records}
    y = np.full(len(windows.record), np.nan)
    for i, (name, t0) in enumerate(zip(windows.record, windows.start_s)):
        fs = fs_rec[name]
        b = beats[name]
        b = b[(b >= t0 * fs) & (b < (t0 + window_s) * fs)]
        if len(b) >= 3:
            y[i] = 60.0 * fs * (len(b) - 1) / (b[-1] - b[0])
    return y


# -- features and the probes -------------------------------------------------------------------------------
FEATURES = ("last", "all")  # last layer only | patch embedding + every layer, concatenated


def _pool(h: torch.Tensor) -> np.ndarray:
    """(B, C, N, D) -> (B, C, 2D): mean and std over patches."""
    return torch.cat([h.mean(dim=2), h.std(dim=2)], dim=-1).numpy()


def _present_leads(f: np.ndarray, present: np.ndarray) -> np.ndarray:
    keep = present[0]  # the probe's windows all have the same present leads
    if not (present == keep).all():
        raise ValueError("features: windows with different lead sets")
    return f[:, keep].reshape(len(f), -1)


@torch.no_grad()
def encoder_features(model: torch.nn.Module, x: np.ndarray, present: np.ndarray, batch: int = 32,
                     layers: str = "last") -> np.ndarray:
    """Frozen-encoder features (eval mode): per present lead, the mean and std over patches of the last
    layer's output (``layers="last"``), or of the patch embedding and of every layer, concatenated
    (``layers="all"``: lower layers may transfer better than the last, which is tuned to reconstruction)."""
    from cbramod_fast.kernels import resolve_backend

    if layers not in FEATURES:
        raise ValueError(f"layers must be one of {FEATURES}, got {layers!r}")
    model.eval()
    feats = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        if layers == "last":
            feats.append(_pool(model.encode(xb)))
            continue
        backend = resolve_backend(model.backend, xb.device)
        h = model.patch_embedding(xb)
        outs = [_pool(h)]
        for layer in model.encoder.layers:
            h = layer(h, backend)
            outs.append(_pool(h))
        feats.append(np.concatenate(outs, axis=-1))
    return _present_leads(np.concatenate(feats), present)


def raw_features(x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The same pooling applied to the raw 200-sample patches: the no-encoder reference."""
    return _present_leads(_pool(torch.from_numpy(x)), present)


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


@dataclass
class RegressionResult:
    name: str
    mae: float  # bpm, over all held-out windows
    r: float  # Pearson correlation of prediction and label, over all held-out windows
    mae_mean_predictor: float  # MAE when every fold predicts its training mean (the floor a probe must beat)
    folds: list[dict]


RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def ridge_probe(features: np.ndarray, y: np.ndarray, groups: np.ndarray, name: str) -> RegressionResult:
    """Leave-one-group-out standardised ridge regression. The penalty is chosen per fold from
    ``RIDGE_ALPHAS`` by an inner leave-one-group-out over the training groups only (no fixed value
    suits feature sets of 800 to 2,400 dimensions alike; the test group never takes part)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pred, base = np.full(len(y), np.nan), np.full(len(y), np.nan)
    rows = []
    for g in sorted(set(groups.tolist())):
        test = groups == g
        search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": list(RIDGE_ALPHAS)},
                              cv=LeaveOneGroupOut(), scoring="neg_mean_absolute_error")
        search.fit(features[~test], y[~test], groups=groups[~test])
        pred[test] = search.predict(features[test])
        base[test] = y[~test].mean()
        rows.append({"test_groups": [str(g)], "mae": float(np.abs(pred[test] - y[test]).mean()),
                     "alpha": float(search.best_params_["ridge__alpha"]), "n_test": int(test.sum())})
    return RegressionResult(name, float(np.abs(pred - y).mean()), float(np.corrcoef(pred, y)[0, 1]),
                            float(np.abs(base - y).mean()), rows)


# -- data of the experiment ----------------------------------------------------------------------------------
def load_cpsc2021(folder: str | Path, leads: tuple[str, ...] = STANDARD_LEADS
                  ) -> tuple[Windows, np.ndarray, np.ndarray]:
    """CPSC 2021 windows in the layout ``leads`` (I, II present), AF labels, patient of each window."""
    import wfdb

    recs = records_in(folder)
    w = read_windows(recs, leads=leads)
    fs = {r.name: float(wfdb.rdheader(str(r)).fs) for r in recs}
    y = af_labels(recs, w, fs)
    keep = y >= 0
    w = w.select(keep)
    return w, y[keep], np.asarray([patient_of(r) for r in w.record])


def load_heart_rate(data_dir: str | Path, leads: tuple[str, ...] = STANDARD_LEADS
                    ) -> tuple[Windows, np.ndarray, np.ndarray]:
    """CPSC 2021 (4 patients) and MIT-BIH 100 (1 patient) windows in the layout ``leads`` with only lead II
    present (the lead both have), heart rate from the annotated beats, patient of each window."""
    import wfdb

    data_dir = Path(data_dir)
    recs = records_in(data_dir / "ecg_cpsc2021") + records_in(data_dir / "ecg_mitdb_100")
    w = read_windows(recs, leads=("II",))
    x = np.zeros((len(w.x), len(leads), *w.x.shape[2:]), np.float32)
    x[:, leads.index("II")] = w.x[:, 0]
    w = Windows(x, np.tile(np.asarray(leads) == "II", (len(x), 1)), w.record, w.start_s)
    fs = {r.name: float(wfdb.rdheader(str(r)).fs) for r in recs}
    y = heart_rate_labels(recs, w, fs)
    keep = np.isfinite(y)
    w = w.select(keep)
    return w, y[keep], np.asarray([patient_of(r) for r in w.record])


# The experiment's lead layout: the leads of the probe recordings (CPSC 2021: I, II; MIT-BIH: II, V5; eegmat:
# one lead, put in II). CinC 2021 and PTB contribute these 3 of their 12 leads. Nearly every window has only
# 1-2 leads, so a 12-lead layout would spend ~5/6 of the compute on absent (zero) leads.
EXPERIMENT_LEADS = ("I", "II", "V5")

# Every ECG source in the data folder with at least one 10-s window (macecgdb's 8-s record has none).
ECG_SOURCES = {"cpsc2021": "ecg_cpsc2021", "mitdb100": "ecg_mitdb_100", "cinc2021": "ecg_cinc2021",
               "ptbdb": "ecg_ptbdb_s0010_re", "eegmat": "eeg_ecg_eegmat"}


def load_source(data_dir: str | Path, source: str, leads: tuple[str, ...] = EXPERIMENT_LEADS) -> Windows:
    """All windows of one source in the layout ``leads`` (no labels: pretraining input)."""
    folder = Path(data_dir) / ECG_SOURCES[source]
    if source == "eegmat":
        return load_eegmat_ecg(folder, leads=leads)[0]
    return read_windows(records_in(folder), leads=leads)


@dataclass(frozen=True)
class Task:
    description: str
    kind: str  # "classification" (linear_probe) or "regression" (ridge_probe)
    load: object  # data_dir -> (Windows, labels, groups)
    exclude: tuple[str, ...]  # ECG sources kept out of this task's pretraining corpus

    @property
    def probe(self):
        return linear_probe if self.kind == "classification" else ridge_probe

    @property
    def corpus_tag(self) -> str:
        return corpus_tag(self.exclude)


def corpus_tag(exclude: tuple[str, ...]) -> str:
    """Name of the pretraining corpus that leaves out ``exclude`` (run folders and the report)."""
    return "no-" + "+".join(exclude)


TASKS = {
    "eegmat_ecg_task": Task("eegmat ECG: mental arithmetic vs rest per 10-s window, single ECG lead; "
                            "leave-one-subject-out (12 folds)", "classification",
                            lambda d: load_eegmat_ecg(Path(d) / "eeg_ecg_eegmat", leads=EXPERIMENT_LEADS),
                            ("eegmat",)),
    "heart_rate": Task("CPSC 2021 + MIT-BIH 100: heart rate (bpm) per 10-s window from the annotated beats "
                       "(.atr), lead II; leave-one-patient-out (5 folds)", "regression",
                       lambda d: load_heart_rate(d, EXPERIMENT_LEADS),
                       ("cpsc2021", "mitdb100")),
    # Excludes MIT-BIH 100 too, so that it shares the heart-rate task's pretraining runs.
    "cpsc2021_af": Task("CPSC 2021: AF vs normal rhythm per 10-s window, leads I+II; folds = every "
                        "(AF patient, normal patient) pair held out", "classification",
                        lambda d: load_cpsc2021(Path(d) / "ecg_cpsc2021", EXPERIMENT_LEADS),
                        ("cpsc2021", "mitdb100")),
}

MASKINGS = {"patch-only": {"patch_ratio": 0.5, "lead_ratio": 0.0},
            "dual": {"patch_ratio": 0.5, "lead_ratio": 0.25}}


def pretraining_corpus(data_dir: str | Path, exclude: tuple[str, ...]) -> tuple[Windows, list[str]]:
    """Every ECG source except ``exclude`` (the probe task's own recordings), concatenated."""
    sources = [s for s in ECG_SOURCES if s not in exclude]
    return concat_windows([load_source(data_dir, s) for s in sources], "pretraining sources"), sources


# -- the experiment ----------------------------------------------------------------------------------------
def pretrain_variant(run: Path, windows: Windows, steps: int, preset: str, seed: int, batch_size: int,
                     lr: float, weight_init: str = "original", **mask_kw) -> dict:
    """Pretrain on ``windows`` into ``run``; a finished run with the same settings is reused."""
    from cbramod_fast.pretrain import ArrayLoader, PretrainConfig, pretrain

    cfg = PretrainConfig(data="(in-memory windows)", out=str(run), preset=preset, steps=steps,
                         batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20), ckpt_every=steps,
                         log_every=10, workers=0, device="cpu", amp="none", seed=seed, weight_init=weight_init,
                         **mask_kw)
    ck = run / "checkpoint.pt"
    if ck.is_file() and torch.load(ck, map_location="cpu", weights_only=True)["config"] == asdict(cfg):
        return json.loads((run / "summary.json").read_text())
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    pretrain(cfg, loader=ArrayLoader(windows.x, windows.present, batch_size, seed=seed), quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = {"seconds": time.perf_counter() - t0, "first_loss": rows[0]["loss"],
               "final_loss": float(np.mean([r["loss"] for r in rows[-5:]])), "epochs": rows[-1]["epoch"]}
    atomic_text(run / "summary.json", json.dumps(summary))
    return summary


def _summarise(rs: list) -> dict:
    keys = (("auc", "balanced_accuracy") if isinstance(rs[0], ProbeResult)
            else ("mae", "r", "mae_mean_predictor"))
    out = {}
    for k in keys:
        v = [getattr(r, k) for r in rs]
        out[f"{k}_mean"], out[f"{k}_std"] = float(np.mean(v)), float(np.std(v))
    out["per_seed"] = [asdict(r) for r in rs]
    return out


def run_experiment(data_dir: str | Path, out_dir: str | Path, steps: int = 1000, preset: str = "tiny",
                   seeds: tuple[int, ...] = (0, 1, 2), batch_size: int = 32, lr: float = 1e-3,
                   tasks: tuple[str, ...] = tuple(TASKS), weight_init: str = "original") -> dict:
    """Random init vs the same init pretrained with patch-only and with dual masking, same probes.

    Each task's encoders are pretrained on every ECG source of ``data_dir`` except the task's own
    (``Task.exclude``): no window, subject or patient of a probe task is ever seen in its pretraining.
    Each seed gives its own random init, from which its pretraining runs start. Every feature variant
    (``FEATURES``) is reported for every encoder, with the raw-patch features as a no-encoder reference.
    """
    from cbramod_fast.model import PRESETS, CBraMod

    t_start = time.perf_counter()
    data_dir = Path(data_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {t: TASKS[t].load(data_dir) for t in tasks}
    corpora = {}
    for t in tasks:
        ex = TASKS[t].exclude
        if ex not in corpora:
            corpora[ex] = pretraining_corpus(data_dir, ex)
    runs: dict = {}
    res: dict = {t: {f: {} for f in FEATURES} for t in tasks}
    for t in tasks:
        w, y, groups = data[t]
        raw = TASKS[t].probe(raw_features(w.x, w.present), y, groups, "raw patches (no encoder)")
        res[t]["raw"] = {raw.name: _summarise([raw])}
    for seed in seeds:
        torch.manual_seed(seed * 1_000_003)  # the initial weights pretrain() starts from for this seed
        random_init = CBraMod(**PRESETS[preset].to_dict(), backend="torch", weight_init=weight_init)
        trained = {}
        for ex, (windows, _) in corpora.items():
            tag = corpus_tag(ex)
            for name, kw in MASKINGS.items():
                run = out_dir / tag / f"seed{seed}" / name
                runs[f"{tag}/seed{seed}/{name}"] = pretrain_variant(run, windows, steps, preset, seed,
                                                                    batch_size, lr, weight_init, **kw)
                trained[ex, name] = CBraMod.from_pretrained(run / "checkpoint.pt", backend="torch")
        for t in tasks:
            w, y, groups = data[t]
            models = {"random init": random_init,
                      **{f"{n} pretrained": trained[TASKS[t].exclude, n] for n in MASKINGS}}
            for feat in FEATURES:
                for name, m in models.items():
                    r = TASKS[t].probe(encoder_features(m, w.x, w.present, layers=feat), y, groups, name)
                    res[t][feat].setdefault(name, []).append(r)
    report: dict = {
        "command": f"python experiments/pretrain_probe.py --data-dir {data_dir} --out {out_dir} --steps {steps} "
                   f"--preset {preset} --seeds {','.join(map(str, seeds))} --weight-init {weight_init}",
        "preset": preset, "leads": list(EXPERIMENT_LEADS), "pretrain_steps": steps, "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": max(1, steps // 20), "maskings": MASKINGS, "seeds": list(seeds),
        "weight_init": weight_init,
        "init": f"seed s: torch.manual_seed(s * 1000003), then CBraMod(preset, weight_init={weight_init!r}); "
                "pretraining starts from it",
        "features": {"last": "per present lead, mean and std over patches of the last layer's output",
                     "all": "the same for the patch embedding and every layer, concatenated",
                     "raw": "the same pooling of the raw 200-sample patches (no encoder)"},
        "probes": {"classification": "standardised logistic regression, C=0.1, balanced classes",
                   "regression": f"standardised ridge, alpha in {RIDGE_ALPHAS} by inner leave-one-group-out "
                                 "over the training groups"},
        "pretraining_corpora": {corpus_tag(ex): {"sources": src, "n_windows": len(win.x)}
                                for ex, (win, src) in corpora.items()},
        "pretraining_runs": runs,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu": cpu_model(), "uarch": cpu_uarch(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "tasks": {}}
    for t in tasks:
        w, y, groups = data[t]
        report["tasks"][t] = {"description": TASKS[t].description, "kind": TASKS[t].kind,
                              "pretraining_corpus": TASKS[t].corpus_tag, "n_windows": len(y),
                              "groups": sorted(set(groups.tolist())),
                              "results": {f: {n: (v if isinstance(v, dict) else _summarise(v))
                                              for n, v in by.items()} for f, by in res[t].items()}}
        if TASKS[t].kind == "classification":
            report["tasks"][t]["n_positive"] = int(y.sum())
        else:
            report["tasks"][t]["label_mean_std"] = [float(y.mean()), float(y.std())]
    report["total_seconds"] = time.perf_counter() - t_start
    atomic_text(out_dir / "probe.json", json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder holding the ECG sources (" + ", ".join(
        ECG_SOURCES.values()) + ")")
    p.add_argument("--out", required=True, help="run folder: pretraining runs (reused when finished) and probe.json")
    p.add_argument("--steps", type=int, default=1000, help="pretraining steps per run")
    p.add_argument("--preset", default="tiny", help="model size")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks: " + ", ".join(TASKS))
    p.add_argument("--weight-init", default="original", choices=("original", "pytorch"),
                   help="encoder initialisation (the original CBraMod's, or PyTorch's default)")
    args = p.parse_args(argv)
    missing = [name for name in ECG_SOURCES.values() if not (Path(args.data_dir) / name).is_dir()]
    if missing:
        p.error(f"--data-dir {args.data_dir}: missing source folders {missing}")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown --tasks {unknown}; expected some of {list(TASKS)}")
    run_experiment(args.data_dir, args.out, steps=args.steps, preset=args.preset,
                   seeds=tuple(int(s) for s in args.seeds.split(",")), tasks=tasks, weight_init=args.weight_init)
    print(f"wrote {Path(args.out) / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
