"""What a benchmark run measures: ``BenchConfig``, parsed and checked from the command line's arguments."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..model.config import PRESETS

SCHEMA = "cbramod-fast-bench/1"  # of the result files (bench/report.py renders only this schema)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
MODES = ("infer", "train")
AUTO_BUDGET_S = 20.0  # per group: --repeats auto fits this many seconds of timed rounds (7..100 rounds)
AUTO_MIN, AUTO_MAX = 7, 100


@dataclass(frozen=True)
class BenchConfig:
    """One run: every (shape, batch, mode) group times every variant (models x dtypes, or ``variants``)."""

    device: str = "cpu"
    shapes: tuple[tuple[int, int], ...] = ((19, 30),)
    batches: tuple[int, ...] = (1, 8)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    backends: tuple[str, ...] = ("torch",)
    modes: tuple[str, ...] = ("infer",)
    original: str | None = None
    preset: str = "base"
    repeats: int = 0  # 0 = auto (AUTO_BUDGET_S of timed rounds per group)
    warmup: int = 1
    out: str = "bench/results"
    plot: bool = False
    compile: bool = False
    threads: int = 0  # CPU threads for torch; 0 = auto (cores not busy per the 1-min load average)
    reference: bool = True  # include the in-repo reference (the speed-up baseline)
    quiet: bool = False
    # Explicit variant list, replacing the backends x dtypes cross product: (model, dtype, compile tag) with
    # model "reference", "original" or "fast[<backend>]" and tag None or one of COMPILE_TAGS.
    variants: tuple[tuple[str, str, str | None], ...] = ()


# How a variant is wrapped. dynamic=False throughout: each (shape, batch) group gets its own specialised
# graph instead of dynamo's automatic dynamic shapes after the first recompile.
COMPILE_TAGS = {
    "compile": "torch.compile (default mode)",
    "compile-ro": "torch.compile(mode='reduce-overhead'): Inductor + CUDA graphs",
    "compile-layers": "torch.compile of each repeated layer (regional compilation: the encoder's identical "
                      "layers share one compiled graph, so compiling takes about one layer's time)",
    "graph": "the eager model captured in one torch.cuda.CUDAGraph and replayed (infer, CUDA only)",
}


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for s in _split(text):
        m = re.fullmatch(r"(\d+)[xX](\d+)", s)
        if not m or int(m[1]) < 1 or int(m[2]) < 1:
            raise UsageError(f"bad --shapes entry {s!r}: expected CxN with C channels and N patches >= 1, e.g. 19x30")
        out.append((int(m[1]), int(m[2])))
    if not out:
        raise UsageError(f"--shapes {text!r} names no shape; expected e.g. 12x10,19x30")
    return tuple(out)


def parse_batches(text: str) -> tuple[int, ...]:
    out = []
    for s in _split(text):
        if not s.isdigit() or int(s) < 1:
            raise UsageError(f"bad --batch entry {s!r}: expected positive integers, e.g. 1,8,64")
        out.append(int(s))
    if not out:
        raise UsageError(f"--batch {text!r} names no batch size")
    return tuple(out)


def parse_dtypes(text: str) -> tuple[str, ...]:
    out = []
    for s in _split(text):
        s = _DTYPE_ALIASES.get(s.lower(), s.lower())
        if s not in DTYPES:
            raise UsageError(f"unknown --dtype {s!r}: expected some of {', '.join(DTYPES)}")
        out.append(s)
    if not out:
        raise UsageError(f"--dtype {text!r} names no dtype")
    return tuple(dict.fromkeys(out))


def parse_modes(text: str) -> tuple[str, ...]:
    out = _split(text)
    for s in out:
        if s not in MODES:
            raise UsageError(f"unknown --mode {s!r}: expected some of {', '.join(MODES)}")
    if not out:
        raise UsageError(f"--mode {text!r} names no mode")
    return tuple(dict.fromkeys(out))


def parse_variants(text: str) -> tuple[tuple[str, str, str | None], ...]:
    """``MODEL:DTYPE[:TAG]`` entries; MODEL is reference, original or a fast-model backend (torch, triton),
    TAG one of COMPILE_TAGS. E.g. ``reference:fp32,reference:bf16:compile,triton:bf16``."""
    out = []
    for s in _split(text):
        parts = s.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise UsageError(f"bad --variants entry {s!r}: expected MODEL:DTYPE[:TAG], e.g. triton:bf16:compile")
        model = parts[0] if parts[0] in ("reference", "original") else f"fast[{parts[0]}]"
        (dtype,) = parse_dtypes(parts[1])
        tag = parts[2] if len(parts) == 3 else None
        if tag is not None and tag not in COMPILE_TAGS:
            raise UsageError(f"unknown tag {tag!r} in --variants entry {s!r}: expected one of "
                             f"{', '.join(COMPILE_TAGS)}")
        out.append((model, dtype, tag))
    if not out:
        raise UsageError(f"--variants {text!r} names no variant")
    return tuple(dict.fromkeys(out))


def check_backend(backend: str, device: str) -> None:
    """Raise ``UsageError`` unless ``backend`` can run on ``device`` here."""
    from .. import kernels

    known = tuple(b for b in kernels.BACKENDS if b != "auto")
    if backend not in known:
        raise UsageError(f"unknown --backend {backend!r}: expected some of {', '.join(known)}")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise UsageError("backend 'triton' needs the triton package, which is not installed")
        if not kernels.triton_available():
            raise UsageError("backend 'triton': cbramod_fast.kernels.criss_cross is not importable in this build")
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("backend 'triton' on CPU runs only under the Triton interpreter: set "
                             "TRITON_INTERPRET=1 (correctness only, not timed) or use --device cuda")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    device = args.device.lower()
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {args.device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda asked, but torch {torch.__version__} sees no CUDA device "
                         f"(built with CUDA: {torch.version.cuda or 'no'})")
    if args.preset not in PRESETS:
        raise UsageError(f"unknown --preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
    variants: tuple[tuple[str, str, str | None], ...] = ()
    if args.variants:
        given = [f"--{k}" for k in ("backend", "dtype") if getattr(args, k) is not None]
        if args.compile:
            given.append("--compile")
        if given:
            raise UsageError(f"--variants names backends, dtypes and compilation itself; drop {', '.join(given)}")
        variants = parse_variants(args.variants)
        backends = tuple(dict.fromkeys(m[5:-1] for m, _, _ in variants if m.startswith("fast[")))
        dtypes = tuple(dict.fromkeys(d for _, d, _ in variants))
        if any(m == "original" for m, _, _ in variants) and not args.original:
            raise UsageError("--variants names 'original' but no --original PATH is given")
        if any(t == "graph" for _, _, t in variants):
            if device != "cuda":
                raise UsageError("--variants tag 'graph' (CUDA graph capture) needs --device cuda")
            if "train" in parse_modes(args.mode or "infer"):
                raise UsageError("--variants tag 'graph' captures inference only; use 'compile' for --mode train")
    else:
        backends = tuple(dict.fromkeys(_split(args.backend or "torch")))
        dtypes = parse_dtypes(args.dtype or "fp32,bf16")
    if not backends and not variants:
        raise UsageError(f"--backend {args.backend!r} names no backend")
    for b in backends:
        check_backend(b, device)
    if args.repeats < 0 or args.warmup < 1:
        raise UsageError(f"--repeats must be >= 0 (0 = auto) and --warmup >= 1, got {args.repeats} and "
                         f"{args.warmup}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0 (0 = auto), got {args.threads}")
    original = None
    if args.original:
        root = Path(args.original).expanduser().resolve()
        if not (root / "models" / "cbramod.py").is_file():
            raise FileNotFoundError(f"--original {args.original}: no models/cbramod.py there (expected a "
                                    "checkout of github.com/wjq-learning/CBraMod)")
        original = str(root)
    return BenchConfig(device=device, shapes=parse_shapes(args.shapes), batches=parse_batches(args.batch),
                       dtypes=dtypes, backends=backends, modes=parse_modes(args.mode),
                       original=original, preset=args.preset, repeats=args.repeats, warmup=args.warmup,
                       out=args.out, plot=args.plot, compile=args.compile,
                       threads=args.threads, variants=variants)


def auto_threads() -> int:
    """Cores minus the 1-min load average (at least 1).

    On a shared machine torch's default (one OpenMP thread per core) collapses: a thread descheduled by
    another tenant stalls every parallel region (measured on a loaded 2-core VM: 400 ms instead of 1 ms
    for a tiny forward), so the benchmark uses only the cores that look free.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, cores - round(load)))
