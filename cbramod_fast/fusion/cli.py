"""`cbramod-fast evaluate` and `cbramod-fast predict`: the fusion protocol and saved models on the command line.

    cbramod-fast evaluate eegmat EEGMAT_FOLDER --out runs/eegmat --final
    cbramod-fast evaluate dreamer DREAMER.mat --eeg-weights pretrained_weights.pth --ecg-weights ecg.pth --out runs/dreamer
    cbramod-fast predict trial.npz --model runs/eegmat/final      (or an eegmat-style EDF)

Outputs in --out: results.json (model -> target -> metric -> {mean, std, n_folds, pooled}, plus trial_*
metrics and a "_meta" entry with seeds, weights, class balance and each fold's inner choices), results.md,
roc_<target>.png, and everything each fold fitted, in fold_XX/: fusion.pt, eeg.pt, ecg.pt (heads,
standardisation, late-fusion weights), baseline.json (imputation values, scaler, coefficients, chosen C)
and selection.json (the inner choices with their scores); no predictions. --final adds final/ with the same
files, fitted on every subject. Encoder weights are stored once in encoders.pt beside them.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_text, atomic_write
from ..errors import UsageError
from ..model import CBraMod
from ..readers import read_edf_signals
from . import datasets as ds
from .baseline import feature_names, handcrafted_features
from .model import HEADS, FitConfig, FusionModel
from .protocol import EvalConfig, FoldOutput, cached_embeddings, evaluate, fit_fold, markdown_table
from .select import SelectConfig

DEFAULT_THRESHOLD = {"dreamer": 3.0, "npz": 3.0, "eegmat": None}


def load_encoder(weights: str | None, preset: str, seed: int, what: str, cpu_path: str = "auto") -> tuple[CBraMod, str]:
    if weights:
        return CBraMod.from_pretrained(weights, backend="torch", cpu_path=cpu_path).eval(), str(weights)
    torch.manual_seed(seed)
    warnings.warn(f"no --{what}-weights given: the {what.upper()} encoder is RANDOMLY INITIALISED "
                  f"(preset {preset!r}); results measure a random-feature probe, not a pretrained model",
                  stacklevel=2)
    return (CBraMod.from_config(preset, backend="torch", cpu_path=cpu_path).eval(),
            f"random init (preset {preset}, seed {seed})")


def _roc_plot(preds: dict, targets: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    files = []
    for j, t in enumerate(targets):
        y = preds["y"][:, j]
        if len(set(y.tolist())) < 2:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for name in ("fusion", "eeg", "ecg", "baseline"):
            fpr, tpr, _ = roc_curve(y, preds[name][:, j])
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{t}: pooled held-out windows")
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = out / f"roc_{t}.png"
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files.append(path.name)
    return files


def _save_fusion(model: FusionModel, path: Path, targets: list[str], thresholds: dict,
                 with_encoders: bool = False) -> None:
    """Heads, pooling, placeholders, standardisation and late-fusion weights; the encoders too when they were
    fine-tuned (frozen encoders are stored once, in encoders.pt beside the fold folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if with_encoders or not k.startswith("encoders.")}
    payload = {"state": state, "config": asdict(model.cfg), "targets": targets, "thresholds": thresholds}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def save_fitted(folder: Path, models: dict, baselines: list, choices: dict, targets: list[str], thresholds: dict,
                n_channels: int, finetuned: bool) -> None:
    """Everything one fold (or the final fit) learned, and nothing it predicted."""
    for name, model in models.items():
        _save_fusion(model, folder / f"{name}.pt", targets, thresholds, with_encoders=finetuned)
    _save_json(folder / "baseline.json", {"features": feature_names(n_channels),
                                          "targets": {t: b.to_dict() for t, b in zip(targets, baselines)}})
    _save_json(folder / "selection.json", choices)


def _summary(choices: dict) -> dict:
    """The inner choices without their score grids (those are in selection.json)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "grid"}
        return [strip(x) for x in v] if isinstance(v, list) else v

    return strip(choices)


def _csv(text: str, kind=str) -> tuple:
    return tuple(kind(v) for v in text.split(",") if v.strip())


def run_evaluate(args: argparse.Namespace) -> dict:
    if args.pooling == "attention" and args.mode == "frozen":
        raise UsageError("--pooling attention learns from tokens: use it with --mode finetune "
                         "(frozen mode caches mean-pooled embeddings)")
    if args.dataset not in ds.LOADERS:
        raise UsageError(f"unknown dataset {args.dataset!r}; expected one of {sorted(ds.LOADERS)}")
    try:
        trials = ds.LOADERS[args.dataset](args.path)
    except ValueError as exc:  # a malformed file: one line naming it, not a traceback
        raise UsageError(str(exc)) from exc
    targets = args.targets.split(",") if args.targets else sorted(trials[0].labels)
    for t in targets:
        if t not in trials[0].labels:
            raise UsageError(f"target {t!r} not in the data's labels {sorted(trials[0].labels)}")
    threshold = DEFAULT_THRESHOLD[args.dataset] if args.threshold is None else args.threshold
    w = ds.make_windows(trials, args.window, baseline_correction=args.baseline_correction, progress=not args.quiet)
    y = np.stack([ds.binarise(w.labels[t], threshold) for t in targets], axis=1)
    eeg, eeg_src = load_encoder(args.eeg_weights, args.preset, args.seed, "eeg", args.cpu_path)
    ecg, ecg_src = load_encoder(args.ecg_weights, args.preset, args.seed + 1, "ecg", args.cpu_path)
    encoders = {"eeg": eeg, "ecg": ecg}
    try:
        select = SelectConfig(enabled=not args.no_select, inner_k=args.inner_k, heads=_csv(args.select_heads),
                              weight_decays=_csv(args.select_weight_decays, float),
                              epochs=_csv(args.select_epochs, int), mix_step=args.mix_step)
    except ValueError as exc:
        raise UsageError(f"--select-*: {exc}") from exc
    if not (select.heads and select.weight_decays and select.epochs) or set(select.heads) - set(HEADS):
        raise UsageError("--select-heads (mlp,linear), --select-weight-decays and --select-epochs need values")
    if args.mix_step and not (0 < args.mix_step <= 1 and abs(round(1 / args.mix_step) * args.mix_step - 1) < 1e-9):
        raise UsageError(f"--mix-step must divide 1 (0.5, 0.25, 0.1, ...), got {args.mix_step}")
    cfg = EvalConfig(scheme=args.scheme, k=args.k, seed=args.seed, pooling=args.pooling, head=args.head,
                     baseline_correction=args.baseline_correction, select=select,
                     fit=FitConfig(mode=args.mode, epochs=args.epochs, lr=args.lr, seed=args.seed,
                                   encoder_lr_scale=args.encoder_lr_scale, freeze=tuple(args.freeze or ())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "encoders.pt", lambda tmp: torch.save(
        {m: {"config": e.config.to_dict(), "state": e.state_dict(), "source": s}
         for m, e, s in (("eeg", eeg, eeg_src), ("ecg", ecg, ecg_src))}, tmp))
    thresholds = {t: threshold for t in targets}
    embs = (cached_embeddings(FusionModel(eeg, ecg, num_outputs=len(targets)), w, args.baseline_correction,
                              not args.quiet) if args.mode == "frozen" else {})
    feats = handcrafted_features(w)
    n_channels = w.eeg.shape[1]
    finetuned = args.mode == "finetune"
    folds_meta = []

    def save_fold(i: int, fold: FoldOutput) -> None:
        subjects = sorted(set(w.subject[fold.train_index].tolist()))
        choices = {"test_subjects": fold.test_subjects, "train_subjects": subjects, **fold.choices}
        save_fitted(out / f"fold_{i:02d}", fold.models, fold.baselines, choices, targets, thresholds, n_channels,
                    finetuned)
        folds_meta.append(_summary(choices))

    results, preds = evaluate(w, y, targets, encoders, cfg, progress=not args.quiet, on_fold=save_fold,
                              embs=embs, feats=feats)
    results["_meta"] = {
        "dataset": args.dataset, "path": str(args.path), "targets": targets, "threshold": threshold,
        "class_balance": {t: float(y[:, j].mean()) for j, t in enumerate(targets)},
        "n_windows": len(y), "n_trials": len(trials), "n_subjects": len(set(w.subject.tolist())),
        "window_s": args.window, "scheme": args.scheme, "seed": args.seed, "mode": args.mode,
        "eeg_weights": eeg_src, "ecg_weights": ecg_src, "epochs": args.epochs, "lr": args.lr,
        "cpu_path": args.cpu_path, "selection": asdict(select), "folds": folds_meta,
    }
    atomic_text(out / "results.json", json.dumps(results, indent=2, allow_nan=True))
    md = markdown_table({k: v for k, v in results.items() if not k.startswith("_")}, targets)
    atomic_text(out / "results.md", md + "\n")
    if not args.no_plots:
        _roc_plot(preds, targets, out)
    if args.final:
        everyone = np.arange(len(y))
        models, baselines, choices = fit_fold(encoders, embs, feats, y, w, everyone, cfg)
        choices = {"test_subjects": [], "train_subjects": sorted(set(w.subject.tolist())), **choices}
        save_fitted(out / "final", models, baselines, choices, targets, thresholds, n_channels, finetuned)
    if not args.quiet:
        print(md)
    return results


def load_fusion(folder: str | Path, name: str = "fusion") -> FusionModel:
    """Rebuild a saved model (``fusion``, ``eeg`` or ``ecg``) of a fold_XX/ or final/ directory of an evaluate run."""
    folder = Path(folder)
    f = folder / f"{name}.pt"
    enc_file = folder.parent / "encoders.pt"
    if not f.is_file() or not enc_file.is_file():
        raise FileNotFoundError(f"{folder}: expected {name}.pt here and encoders.pt beside it")
    payload = torch.load(f, map_location="cpu", weights_only=True)
    enc = torch.load(enc_file, map_location="cpu", weights_only=True)
    encoders = {}
    for m in ("eeg", "ecg"):
        e = CBraMod(**enc[m]["config"], backend="torch")
        e.load_state_dict(enc[m]["state"])
        encoders[m] = e.eval()
    cfg = dict(payload["config"])
    cfg["use"], cfg["branch_heads"] = tuple(cfg["use"]), tuple(cfg["branch_heads"])
    model = FusionModel(encoders["eeg"], encoders["ecg"], **cfg)
    res = model.load_state_dict(payload["state"], strict=False)
    bad = [k for k in res.missing_keys if not k.startswith("encoders.")] + list(res.unexpected_keys)
    if bad:
        raise ValueError(f"{f}: does not match the fusion model it describes ({bad[:5]})")
    model.targets = payload["targets"]
    return model.eval()


def run_predict(args: argparse.Namespace) -> dict:
    model = load_fusion(args.model)
    out = {}
    for path in args.files:
        p = Path(path)
        if p.suffix.lower() == ".edf":
            x, fs, labels = read_edf_signals(p)
            eeg_i, ecg_i = ds.eeg_ecg_channels(labels)
            trial = ds.Trial("?", p.stem, x[eeg_i] if eeg_i else None, fs, x[ecg_i] if ecg_i else None, fs, {})
        elif p.suffix.lower() == ".npz":
            z = np.load(p)
            trial = ds.Trial("?", p.stem, z.get("eeg", None), float(z.get("eeg_fs", 0)),
                             z.get("ecg", None), float(z.get("ecg_fs", 0)), {})
        else:
            raise UsageError(f"{p}: expected an .edf or .npz trial file")
        if args.no_ecg:
            trial.ecg = None
        if args.no_eeg:
            trial.eeg = None
        mods = {}
        for m in ("eeg", "ecg"):
            sig_ = getattr(trial, m)
            if sig_ is not None:
                patches = ds.to_patches(np.asarray(sig_, float), getattr(trial, f"{m}_fs"),
                                      (0.3, 45.0) if m == "eeg" else (0.5, 45.0), None)
                n = patches.shape[1] // args.window
                if n == 0:
                    raise UsageError(f"{p}: {m.upper()} shorter than one {args.window}-s window")
                mods[m] = torch.from_numpy(patches[:, : n * args.window].reshape(
                    patches.shape[0], n, args.window, 200).transpose(1, 0, 2, 3).copy())
        if not mods:
            raise UsageError(f"{p}: neither EEG nor ECG to predict from")
        n = min(len(v) for v in mods.values())
        prob = model.predict(**{m: v[:n] for m, v in mods.items()}).numpy()
        out[str(p)] = {"windows": prob.tolist(), "trial": dict(zip(model.targets, prob.mean(0).tolist())),
                       "modalities": sorted(mods)}
    print(json.dumps(out if args.verbose else {k: v["trial"] for k, v in out.items()}, indent=2))
    return out


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=sorted(ds.LOADERS))
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--eeg-weights")
    p.add_argument("--ecg-weights")
    p.add_argument("--preset", default="base", help="encoder size when no weights are given")
    p.add_argument("--targets", help="comma-separated (default: all labels of the data)")
    p.add_argument("--threshold", type=float, help="label > threshold is 'high' (default 3 for 1-5 scores)")
    p.add_argument("--window", type=int, default=10, help="window length in seconds (= patches)")
    p.add_argument("--scheme", choices=("loso", "kfold"), default="loso")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--mode", choices=("frozen", "finetune"), default="frozen")
    p.add_argument("--encoder-lr-scale", type=float, default=0.1,
                   help="finetune: encoder learning rate = this x the head's")
    p.add_argument("--freeze", choices=("eeg", "ecg"), action="append",
                   help="finetune: keep this modality's encoder fixed (repeatable)")
    p.add_argument("--pooling", choices=("mean", "attention"), default="mean")
    p.add_argument("--head", choices=HEADS, default="mlp")
    p.add_argument("--epochs", type=int, default=150, help="without inner selection (or finetune): epochs per head")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    sel = SelectConfig()
    p.add_argument("--inner-k", type=int, default=sel.inner_k,
                   help="inner subject-grouped splits of each fold's training subjects for the model selection")
    p.add_argument("--no-select", action="store_true",
                   help="no inner selection: every head trained once with --head/--epochs, fusion = the joint head")
    p.add_argument("--select-heads", default=",".join(sel.heads), help="head types the selection tries")
    p.add_argument("--select-weight-decays", default=",".join(f"{v:g}" for v in sel.weight_decays))
    p.add_argument("--select-epochs", default=",".join(map(str, sel.epochs)), help="epoch checkpoints it tries")
    p.add_argument("--mix-step", type=float, default=sel.mix_step,
                   help="late-fusion weight grid step over (joint, eeg, ecg) heads; 0: the joint head alone")
    p.add_argument("--cpu-path", default="plain", choices=("plain", "auto", "blas", "onednn"),
                   help="encoder CPU inference path; 'plain' gives the same embeddings in every run, 'auto' "
                        "measures the fastest per shape (its choice, and so the last bits, may vary between runs)")
    p.add_argument("--baseline-correction", action="store_true")
    p.add_argument("--final", action="store_true", help="also train one model on all subjects (for predict)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help=".npz trial files (generic format) or eegmat-style EDFs")
    p.add_argument("--model", required=True, help="fold_XX/ or final/ folder of an evaluate run")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--no-ecg", action="store_true", help="predict from EEG only")
    p.add_argument("--no-eeg", action="store_true", help="predict from ECG only")
    p.add_argument("--verbose", action="store_true", help="print per-window probabilities too")


def _evaluate_cmd(args: argparse.Namespace) -> int:
    run_evaluate(args)
    return 0


def _predict_cmd(args: argparse.Namespace) -> int:
    run_predict(args)
    return 0


COMMANDS = {"evaluate": (_add_evaluate, _evaluate_cmd), "predict": (_add_predict, _predict_cmd)}
