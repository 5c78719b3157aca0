"""``cbramod-fast corpus build | merge | info``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..atomic import atomic_write
from .build import CorpusConfig, build_corpus

_D = CorpusConfig()


def _leads(text: str) -> tuple[str, ...]:
    leads = tuple(s.strip() for s in text.split(",") if s.strip())
    if not leads:
        raise argparse.ArgumentTypeError("--leads needs at least one name")
    return leads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{build,merge,info}")
    b = sub.add_parser("build", help="read WFDB/EDF/NumPy records and write shards + manifest (resumable)",
                       description="Build a pretraining corpus. Rerunning an interrupted build resumes it.")
    b.add_argument("--src", nargs="+", required=True, metavar="DIR", help="source folders (searched recursively) "
                   "or files: .hea (WFDB), .edf/.bdf, .npy/.npz")
    b.add_argument("--out", required=True, metavar="CORPUS", help="corpus folder to write")
    b.add_argument("--leads", type=_leads, default=_D.leads, metavar="A,B,...",
                   help="output lead order, comma-separated (default: the 12 standard leads I..V6)")
    b.add_argument("--window", type=int, default=_D.window_patches, metavar="PATCHES",
                   help=f"window length in 1-s patches (default {_D.window_patches})")
    b.add_argument("--stride", type=int, default=None, metavar="PATCHES", help="window hop (default: --window)")
    b.add_argument("--band", type=float, nargs=2, default=_D.band, metavar=("LOW", "HIGH"),
                   help=f"band-pass edges in Hz (default {_D.band[0]} {_D.band[1]})")
    b.add_argument("--notch", type=float, default=None, metavar="HZ", help="mains notch, 50 or 60 (default off)")
    b.add_argument("--scale", type=float, default=_D.scale, help=f"stored value = µV × scale (default {_D.scale})")
    b.add_argument("--max-abs-uv", type=float, default=_D.max_abs_uv,
                   help=f"reject windows with a lead above this many µV (default {_D.max_abs_uv:g})")
    b.add_argument("--flat-uv", type=float, default=_D.flat_uv,
                   help=f"a lead whose window std is below this many µV is flat (default {_D.flat_uv:g})")
    b.add_argument("--flat-leads", choices=("absent", "reject"), default=_D.flat_leads,
                   help="a flat lead is masked as absent in that window, or rejects the window (default absent)")
    b.add_argument("--min-leads", type=int, default=_D.min_leads, help="fewest usable leads a window needs")
    b.add_argument("--dtype", choices=("float16", "float32"), default=_D.dtype, help="stored dtype")
    b.add_argument("--shard-windows", type=int, default=_D.shard_windows, help="windows per shard file")
    b.add_argument("--npy-fs", type=float, default=None, help="sampling rate of .npy files (Hz)")
    b.add_argument("--npy-unit", default=_D.numpy_unit, help="unit of .npy files (uV, mV, V)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    b.add_argument("--part", default=None, metavar="I/N", help="build only block I of N of the sorted file list")
    b.add_argument("--strict", action="store_true", help="fail on an unusable file instead of skipping it")
    b.add_argument("--overwrite", action="store_true", help="delete an existing corpus in --out first")

    m = sub.add_parser("merge", help="join finished corpora (e.g. --part builds) into one manifest, no copying")
    m.add_argument("parts", nargs="+", metavar="CORPUS", help="finished corpus folders")
    m.add_argument("--out", required=True, metavar="CORPUS", help="folder for the merged manifest")
    m.add_argument("--overwrite", action="store_true", help="replace an existing manifest in --out")

    i = sub.add_parser("info", help="summary of a corpus (windows, leads, rejections, skipped files)")
    i.add_argument("corpus", metavar="CORPUS")
    i.add_argument("--json", action="store_true", help="print the manifest's summary fields as JSON")
    i.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw a few random windows (all leads) and the per-lead / rejection counts")


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    try:
        if args.action == "build":
            cfg = CorpusConfig(leads=args.leads, window_patches=args.window, stride_patches=args.stride,
                               band=tuple(args.band), notch=args.notch, scale=args.scale,
                               max_abs_uv=args.max_abs_uv, flat_uv=args.flat_uv, flat_leads=args.flat_leads,
                               min_leads=args.min_leads, dtype=args.dtype, shard_windows=args.shard_windows,
                               numpy_fs=args.npy_fs, numpy_unit=args.npy_unit)
            man = build_corpus(args.src, args.out, cfg, workers=args.workers, part=args.part, strict=args.strict,
                               overwrite=args.overwrite)
            print(summary(man, args.out))
        elif args.action == "merge":
            from .merge import merge_corpora

            print(summary(merge_corpora(args.parts, args.out, overwrite=args.overwrite), args.out))
        else:
            from .merge import read_manifest

            man = read_manifest(args.corpus)
            if args.json:
                keep = ("n_windows", "shape", "dtype", "leads", "fs", "scale", "counts", "lead_stats", "skipped",
                        "config", "part", "sources")
                print(json.dumps({k: man[k] for k in keep if k in man}, indent=1))
            else:
                print(summary(man, args.corpus))
            if args.plot:
                print(f"wrote {plot_corpus(args.corpus, man, args.plot)}")
    except ValueError as exc:  # a bad setting or file (RecordError is one): one line, exit code 2
        if isinstance(exc, UsageError):
            raise
        raise UsageError(str(exc)) from exc
    return 0


def summary(man: dict, where: str | Path) -> str:
    c = man["counts"]
    rej = ", ".join(f"{k} {v}" for k, v in c["rejected"].items())
    head = (f"corpus {where}: {man['n_windows']} windows {tuple(man['shape'])} {man['dtype']} "
            f"in {len(man['shards'])} shards, {man['fs']} Hz, scale {man['scale']}")
    files = (f"  files {c['files']}: records {c['records']}, skipped {c['skipped_files']}; rejected windows: {rej}; "
             f"flat leads masked: {c['flat_leads_masked']}")
    lines = [head, files, "  lead      windows      mean       std   abs max"]
    for lead, s in man["lead_stats"].items():
        lines.append(f"  {lead:<8}{s['windows']:>9} {s['mean']:>9.4f} {s['std']:>9.4f} {s['abs_max']:>9.3f}")
    for s in man["skipped"][:10]:
        lines.append(f"  skipped {s['file']}: {s['error']}")
    if len(man["skipped"]) > 10:
        lines.append(f"  ... {len(man['skipped']) - 10} more skipped files (see manifest.json)")
    return "\n".join(lines)


def plot_corpus(corpus: str | Path, man: dict, png: str | Path, n_windows: int = 3, seed: int = 0) -> Path:
    """PNG: ``n_windows`` random windows (present leads drawn, absent ones named grey) + counts per lead/reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .loader import CorpusLoader

    loader = CorpusLoader(corpus, batch_size=min(n_windows, man["n_windows"]), seed=seed, drop_last=False)
    batch = next(iter(loader))
    x, present, idx = batch["x"].numpy(), batch["present"].numpy(), batch["index"].numpy()
    leads, (n_ch, n_p, p) = man["leads"], man["shape"]
    fig, axes = plt.subplots(1, len(x) + 1, figsize=(5 * (len(x) + 1), 0.45 * n_ch + 2.5), squeeze=False)
    t = np.arange(n_p * p) / man["fs"]
    for ax, xi, pi, gi in zip(axes[0], x, present, idx):
        for c in range(n_ch):
            y = xi[c].reshape(-1)
            span = max(np.abs(y).max(), 1e-6)
            color = "k" if pi[c] else "0.75"
            ax.plot(t, -c + 0.45 * y / span, lw=0.6, color=color)
        ax.set_yticks(-np.arange(n_ch), leads)
        ax.set_xlabel("s")
        ax.set_title(f"window {gi}")
    ax = axes[0][-1]
    per_lead = man["counts"]["windows_per_lead"]
    ax.barh(-np.arange(n_ch), per_lead, color="C0")
    ax.set_yticks(-np.arange(n_ch), leads)
    rej = ", ".join(f"{k}: {v}" for k, v in man["counts"]["rejected"].items())
    ax.set_title(f"windows with the lead present (of {man['n_windows']})\nrejected: {rej}", fontsize=8)
    fig.tight_layout()
    out = Path(png)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return out


COMMANDS = {"corpus": (add_arguments, run)}
