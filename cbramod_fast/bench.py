"""`cbramod-fast bench`: latency / throughput / FLOP utilisation report of the encoder, ours vs a reference.

One harness for the CLI and ``bench/bench_encoder.py``. For every (shape, batch, mode) group all variants
(the fast ``CBraMod`` per backend and dtype, the in-repo ``ReferenceCBraMod`` per dtype, optionally the
original implementation from a checkout) get the same weights and the same input, are warmed up, then
timed in interleaved rounds (rotating order) so machine noise hits them alike. Speed-ups are ratios of
medians from the same run.

Measurement definitions (also written into every result file):

- latency: one forward (``infer``: eval mode, ``inference_mode``) or one training step (``train``:
  zero_grad, forward with a fixed Bernoulli(0.5) patch mask, MSE to the clean input, backward, AdamW step);
  CUDA events on GPU, ``time.perf_counter`` on CPU. p50/p90/p99 are linear-interpolated quantiles of the
  repeats (with fewer than ~100 repeats p99 is close to the maximum).
- dtype: ``fp32`` runs in float32; ``bf16``/``fp16`` run under ``torch.autocast`` (weights stay fp32; the
  patch embedding's rFFT has no CPU bf16/fp16 kernel, so casting the whole model is not an option).
- FLOPs: counted analytically from the config (:func:`model_flops`): 2 x multiply-adds of every
  convolution, linear layer and attention matmul; norms, activations, softmax and the rFFT are left out
  (the ``torch.utils.flop_counter`` convention; ``tests/test_bench.py`` cross-checks the two — the counter
  itself counts grouped-conv backward as dense, so it is not used for training). A training step counts
  3 x the forward.
- utilisation: achieved FLOP/s / device peak for the dtype (:func:`device_peak`).
- peak memory: bytes allocated above what was live before one call (weights and input excluded). CUDA:
  ``max_memory_allocated``; CPU: high-water mark of torch's CPU allocator events recorded by
  ``torch.profiler(profile_memory=True)`` (RSS is useless here: glibc keeps freed pages).
- error: relative L2 error ``|y - y_ref| / |y_ref|`` of the output (and, for ``train``, of all parameter
  gradients, dropout off) against the reference model in fp32 on the same input.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UsageError
from .model.config import PRESETS, CBraModConfig

SCHEMA = "cbramod-fast-bench/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
MODES = ("infer", "train")
AUTO_BUDGET_S = 20.0  # per group: --repeats auto fits this many seconds of timed rounds (7..100 rounds)
AUTO_MIN, AUTO_MAX = 7, 100
DEMO_DATA = Path(__file__).resolve().parent / "data" / "ecg_demo"


# ---------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class BenchConfig:
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
    """``MODEL:DTYPE[:TAG]`` entries; MODEL is reference, original or a fast-model backend (torch, triton,
    flash), TAG one of COMPILE_TAGS. E.g. ``reference:fp32,reference:bf16:compile,triton:bf16``."""
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
    from . import kernels

    known = tuple(b for b in kernels.BACKENDS if b != "auto")
    if backend == "flash":
        if "flash" not in kernels.BACKENDS:
            raise UsageError("backend 'flash' is not wired into this cbramod-fast build (available: "
                             f"{', '.join(known)})")
        if importlib.util.find_spec("flash_attn") is None:
            raise UsageError("backend 'flash' needs the flash-attn package, which is not installed")
        if device != "cuda":
            raise UsageError("backend 'flash' runs on CUDA only; use --device cuda")
        return
    if backend not in known:
        raise UsageError(f"unknown --backend {backend!r}: expected some of {', '.join(known + ('flash',))}")
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


# ---------------------------------------------------------------------------------------------------------
# FLOPs and device peaks


def model_flops(cfg: CBraModConfig, c: int, n: int, batch: int = 1, mode: str = "infer") -> int:
    """FLOPs of one forward (``infer``) or training step (``train`` = 3 x forward) of ``batch`` samples.

    Per token (one channel x one patch): patch embedding convs 2*25*8*(49 + 2*25*3), spectral Linear(101->d),
    depthwise positional conv 2*d*19*7; per layer q|k|v and output projections of both halves
    2*d*(3*d/2) + 2*d*(d/2), attention 2 matmuls x 2*L*(d/2) with L = C (spatial half) or N (temporal),
    feed-forward 2*2*d*ff; proj_out 2*d*out_dim.
    """
    d, ff = cfg.d_model, cfg.dim_feedforward
    half = d // 2
    embed = 2 * 25 * 8 * 49 + 2 * 2 * 25 * 8 * 25 * 3 + 2 * (cfg.in_dim // 2 + 1) * d + 2 * d * 19 * 7
    layer = 2 * d * 3 * half + 2 * d * half + 2 * 2 * half * (c + n) + 2 * 2 * d * ff
    per_token = embed + cfg.n_layer * layer + 2 * d * cfg.out_dim
    fwd = per_token * c * n * batch
    return 3 * fwd if mode == "train" else fwd


# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: (name pattern, bf16/fp16 tensor, fp32 non-tensor).
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    (r"H200.*NVL", 835.0, 60.0),
    (r"H200", 989.4, 66.9),
    (r"H100.*PCIe", 756.0, 51.2),
    (r"H100.*NVL", 835.0, 60.0),
    (r"H100", 989.4, 66.9),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    (r"A100", 312.0, 19.5),
)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_uarch() -> str | None:
    """AMD Zen generation from /proc/cpuinfo's family, or None. Cloud VMs report a bare "AMD EPYC", yet
    the generation decides which GEMM library wins (MKL's fp32 path vs oneDNN's AVX-512 kernels), so results
    from different generations must not share a file name or a table heading."""
    info = _cpuinfo()
    if info.get("vendor_id") != "AuthenticAMD":
        return None
    family = info.get("cpu family")
    if family == "23":
        return "Zen 2"
    if family == "25":
        return "Zen 4" if "avx512f" in info.get("flags", "").split() else "Zen 3"
    if family == "26":
        return "Zen 5"
    return None


def cpu_peak() -> dict:
    """Estimated peak FLOP/s of the cores torch uses: threads x clock x FLOP/cycle/core.

    FLOP/cycle/core (fp32) = 2 FMA pipes x (SIMD datapath bits / 32) lanes x 2 FLOP per FMA; the datapath is
    512 bits with AVX-512, except AMD Zen 3/4 (family 25) which run AVX-512 on 256-bit pipes; 256 with
    AVX2/FMA, 128 otherwise. bf16/fp16: x2 with AVX512_BF16 / AVX512_FP16 dot products, 2048 FLOP/cycle
    with AMX, else the fp32 rate (converted). Clock: cpufreq max if exposed, else /proc/cpuinfo "cpu MHz".
    The clock is the nominal one: with turbo the real peak is higher and utilisation is overstated; other
    tenants are ignored (``gemm_flops_measured`` in the result file shows what a matmul got at the start).
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    freq_src = "/proc/cpuinfo cpu MHz"
    try:
        ghz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
        freq_src = "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        ghz = float(info.get("cpu MHz", "0") or 0) / 1e3
    amd_zen34 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    if "avx512f" in flags:
        bits = 256 if amd_zen34 else 512
    elif "avx2" in flags or "fma" in flags:
        bits = 256
    else:
        bits = 128
    fp32_cycle = 2 * (bits // 32) * 2
    bf16_cycle = 2048 if "amx_bf16" in flags else 2 * fp32_cycle if "avx512_bf16" in flags else fp32_cycle
    fp16_cycle = 2048 if "amx_fp16" in flags else 2 * fp32_cycle if "avx512_fp16" in flags else fp32_cycle
    cores = os.cpu_count() or 1
    threads = min(torch.get_num_threads(), cores)
    scale = threads * ghz * 1e9
    return {"fp32": fp32_cycle * scale or None, "bf16": bf16_cycle * scale or None,
            "fp16": fp16_cycle * scale or None,
            "method": f"{threads} threads x {ghz:.3f} GHz ({freq_src}) x FLOP/cycle/core fp32 {fp32_cycle}, "
                      f"bf16 {bf16_cycle}, fp16 {fp16_cycle} ({bits}-bit SIMD datapath, 2 FMA pipes)"}


def gpu_peak(name: str) -> dict:
    for pattern, half, fp32 in GPU_PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return {"fp32": fp32 * 1e12, "bf16": half * 1e12, "fp16": half * 1e12,
                    "method": f"data-sheet dense peak for {pattern!r}: bf16/fp16 {half} TFLOP/s, fp32 {fp32} "
                              "TFLOP/s (non-tensor-core; TF32 off)"}
    return {"fp32": None, "bf16": None, "fp16": None, "method": f"no peak table entry for {name!r}"}


def measure_gemm(device: str, dtypes: tuple[str, ...]) -> dict:
    """Best-of-5 FLOP/s of one square matmul per dtype: what this device delivers right now (a sanity check
    of the data-sheet / SIMD peak, and under load the realistic ceiling)."""
    n = 4096 if device == "cuda" else 1024
    out = {}
    for dt in dtypes:
        a = torch.randn(n, n, device=device).to(DTYPES[dt])
        b = torch.randn(n, n, device=device).to(DTYPES[dt])
        torch.mm(a, b)
        best = min(_timed_call(lambda a=a, b=b: torch.mm(a, b), device) for _ in range(5))
        out[dt] = 2 * n**3 / best
    return out


def device_info(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": name, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "memory_bytes": props.total_memory,
                "sm_count": props.multi_processor_count, "cuda": torch.version.cuda,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "peak_flops": gpu_peak(name)}
    return {"type": "cpu", "name": cpu_model(), "cpu_model": cpu_model(), "uarch": cpu_uarch(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "peak_flops": cpu_peak()}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "numpy", "flash_attn"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package: report it as missing
            out[mod] = None
    from . import __version__

    out["cbramod_fast"] = __version__
    return out


def git_state(cwd: Path | None = None) -> dict:
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd, check=True, timeout=10).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# ---------------------------------------------------------------------------------------------------------
# inputs and models


def demo_patch_stream() -> torch.Tensor:
    """Real 12-lead ECG from the shipped demo records as a (12, P, 200) stream of 1-s patches (µV/100)."""
    from .probe import read_wfdb_windows, records_in

    w = read_wfdb_windows(records_in(DEMO_DATA))
    full = w.present.all(axis=1)  # windows with all 12 leads (the CinC 2021 records)
    x = torch.from_numpy(w.x[full])  # (W, 12, N, 200)
    return x.permute(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[-1]).contiguous()


def make_input(stream: torch.Tensor, batch: int, c: int, n: int) -> torch.Tensor:
    """(batch, c, n, 200): channel j is lead j % 12, sample b takes consecutive patches from b*n on."""
    leads, p = stream.shape[0], stream.shape[1]
    ci = torch.arange(c) % leads
    pi = (torch.arange(batch).view(-1, 1) * n + torch.arange(n)) % p  # (batch, n)
    return stream[ci.view(1, -1, 1), pi.view(batch, 1, n)]


def load_original(root: str | Path) -> type[nn.Module]:
    """The original ``CBraMod`` class from a checkout's ``models/cbramod.py`` (imported in place, never copied).

    Its module imports ``models.criss_cross_transformer``, so the checkout goes on ``sys.path`` for the
    import; other ``models`` modules already loaded are set aside and restored.
    """
    root = str(Path(root).resolve())
    saved = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        mod = importlib.import_module("models.cbramod")
    except Exception as exc:  # noqa: BLE001 - any import failure of foreign code is a usage problem
        raise UsageError(f"--original {root}: importing models/cbramod.py failed: {type(exc).__name__}: {exc}")
    finally:
        sys.path.remove(root)
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    if not hasattr(mod, "CBraMod"):
        raise UsageError(f"--original {root}: models/cbramod.py defines no CBraMod class")
    return mod.CBraMod


@dataclass
class Variant:
    name: str  # "fast[torch]", "reference", "original"
    model_kind: str  # fast | reference | original
    backend: str | None
    dtype: str
    model: nn.Module
    timed: bool = True
    note: str = ""
    opt: torch.optim.Optimizer | None = None
    samples: list[float] = field(default_factory=list)
    cpu_samples: list[float] = field(default_factory=list)  # CPU device: process CPU time per call
    first_call_s: float | None = None
    peak_mem: int | None = None
    rel_err: float | None = None
    grad_rel_err: float | None = None
    compile: str | None = None  # a COMPILE_TAGS key, or None for eager
    eager: nn.Module | None = None  # the uncompiled module (the train-mode error check runs it)
    failed: str | None = None  # where and why the variant failed (it is then untimed)


def build_models(cfg: BenchConfig) -> dict[str, Callable[[], nn.Module]]:
    """A factory per variant model (fast per backend, reference, original), all giving the same weights.

    Factories rather than instances: training variants need their own copy, and ``copy.deepcopy`` is not
    safe on a model that caches backend-packed weights after a call.
    """
    from . import CBraMod, ReferenceCBraMod

    mcfg = PRESETS[cfg.preset]
    args = {k: v for k, v in mcfg.to_dict().items() if k != "dropout"}
    torch.manual_seed(0)
    base = CBraMod(**mcfg.to_dict(), backend="torch").state_dict()  # the seeded init every variant gets

    def make(cls: Callable[..., nn.Module], **kw) -> Callable[[], nn.Module]:
        def factory() -> nn.Module:
            m = cls(**kw)
            m.load_state_dict(base)  # strict: same keys everywhere (the drop-in promise)
            return m
        return factory

    factories = {f"fast[{b}]": make(CBraMod, **mcfg.to_dict(), backend=b) for b in cfg.backends}
    if cfg.reference:
        factories["reference"] = make(ReferenceCBraMod, **args)
    if cfg.original:
        factories["original"] = make(load_original(cfg.original), **args)
    return factories


# ---------------------------------------------------------------------------------------------------------
# measuring


def _autocast(device: str, dtype: str, cache_enabled: bool = True):
    if dtype == "fp32":
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=DTYPES[dtype], cache_enabled=cache_enabled)


def _graph_step(model: nn.Module, x: torch.Tensor, dtype: str, device: str):
    """One CUDA graph of the eager forward on the static input ``x``; the step replays it (launch overhead
    gone, which is what inference at batch 1 is bound by). Warm-up on a side stream, as capture requires;
    autocast's weight cache off inside the capture (PyTorch's CUDA-graph notes)."""
    if device != "cuda":
        raise UsageError("variant tag 'graph' (CUDA graph capture) needs --device cuda")
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _autocast(device, dtype, cache_enabled=False):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _autocast(device, dtype, cache_enabled=False):
            out = model(x)

    def step():
        graph.replay()
        return out
    return step


def repeated_layers(m: nn.Module) -> nn.ModuleList:
    """The longest ``nn.ModuleList`` of same-type modules (the encoder layers of every CBraMod flavour)."""
    lists = [c for c in m.modules() if isinstance(c, nn.ModuleList) and len(c) > 0
             and len({type(x) for x in c}) == 1]
    if not lists:
        raise UsageError(f"variant tag 'compile-layers': {type(m).__name__} has no list of repeated layers")
    return max(lists, key=len)


def _compile(m: nn.Module, tag: str) -> nn.Module:
    # Dynamo silently falls back to eager past its recompile limit; every (shape, batch) group adds
    # entries, so raise it (the attribute was renamed in torch 2.6).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if tag == "compile-layers":
        for layer in repeated_layers(m):
            layer.compile(dynamic=False)  # in place: m must be this variant's own instance
        return m
    return torch.compile(m, mode="reduce-overhead" if tag == "compile-ro" else None, dynamic=False)


def _step_fn(v: Variant, x: torch.Tensor, mask: torch.Tensor, mode: str, device: str):
    model = v.model
    if v.compile == "graph":
        if mode != "infer":
            raise UsageError("variant tag 'graph' captures inference only")
        return _graph_step(model, x, v.dtype, device)
    if mode == "infer":
        def step():
            with torch.inference_mode(), _autocast(device, v.dtype):
                return model(x)
        return step

    def step():
        v.opt.zero_grad(set_to_none=True)
        with _autocast(device, v.dtype):
            out = model(x, mask)
        loss = F.mse_loss(out.float(), x)
        loss.backward()
        v.opt.step()
        return loss
    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_call(step, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _timed_call_cpu(step) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): on a shared machine CPU time leaves out the waits for a core."""
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    return time.perf_counter() - t0, time.process_time() - c0


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_memory_call(step, device: str) -> tuple[float, int | None]:
    """Run ``step`` once; return (seconds, bytes allocated above the pre-call level at the peak)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():  # kineto prints "profiler_start/stop" lines on fd 2 for every profile
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        seconds = time.perf_counter() - t0
    try:  # the raw allocator events; FunctionEvents fold most allocations into their op
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
        return seconds, peak
    except AttributeError:  # profiler internals moved: report no number rather than a wrong one
        return seconds, None


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _check_pass(v: Variant, x: torch.Tensor, mask: torch.Tensor, mode: str, device: str):
    """Output (and for train, gradients) with dropout off, in the variant's precision, untimed.

    Compiled variants are checked through their eager module: eval mode would recompile them (a second
    full compilation per group); in infer mode the timed output of the compiled model is checked too."""
    model = v.eager if v.eager is not None else v.model
    was_training = model.training
    model.eval()
    try:
        if mode == "infer":
            with torch.inference_mode(), _autocast(device, v.dtype):
                return model(x).float(), None
        model.zero_grad(set_to_none=True)
        with _autocast(device, v.dtype):
            out = model(x, mask)
        F.mse_loss(out.float(), x).backward()
        grads = torch.cat([p.grad.detach().float().flatten() for _, p in sorted(model.named_parameters())
                           if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return out.detach().float(), grads
    finally:
        model.train(was_training)


def _quantile(xs: list[float], p: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    s = sorted(xs)
    pos = p * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _quantiles(xs: list[float]) -> dict:
    return {"p50": _quantile(xs, 0.5), "p90": _quantile(xs, 0.9), "p99": _quantile(xs, 0.99),
            "mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}


def _interpreted(backend: str | None, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def _guarded(v: Variant, what: str, fn, device: str):
    """``fn()``, or on an error (a compilation or CUDA-graph capture that fails, an OOM) the variant is marked
    failed and left untimed, so one broken variant does not lose the rest of the run; ``run`` then exits 1.
    Usage errors still stop the run (exit 2)."""
    if v.failed:
        return None
    try:
        return fn()
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded in the result file and reported
        msg = (str(exc).strip().splitlines() or [""])[0][:300]
        v.failed = f"{what}: {type(exc).__name__}: {msg}"
        v.timed, v.note, v.opt, v.model, v.eager = False, f"failed in {v.failed}", None, None, None
        print(f"cbramod-fast bench: variant {v.name} {v.dtype} failed in {v.failed}", file=sys.stderr)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return None


def variant_specs(cfg: BenchConfig, models: dict) -> list[tuple[str, str, str | None]]:
    """(model, dtype, compile tag) of every timed variant: ``cfg.variants``, else models x dtypes."""
    if cfg.variants:
        missing = sorted({m for m, _, _ in cfg.variants if m not in models})
        if missing:
            raise UsageError(f"variants name models that were not built: {', '.join(missing)}")
        return list(cfg.variants)
    return [(name, dt, "compile" if cfg.compile else None) for name in models for dt in cfg.dtypes]


def bench_group(cfg: BenchConfig, models: dict[str, Callable[[], nn.Module]], x: torch.Tensor, mode: str,
                progress=None) -> list[Variant]:
    """Warm up, check and time every variant on input ``x`` in ``mode``; returns the filled variants."""
    device = cfg.device
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(x.shape[:3], generator=gen) < 0.5).to(device=device, dtype=torch.long)
    variants: list[Variant] = []
    shared: dict[str, nn.Module] = {}
    for name, dt, tag in variant_specs(cfg, models):
        backend = name[5:-1] if name.startswith("fast[") else None
        kind = "fast" if backend else name
        if mode == "infer" and tag != "compile-layers":
            if name not in shared:
                shared[name] = models[name]().to(device).eval()
            eager = shared[name]
        else:  # training steps change the weights, compile-layers compiles in place: own copy
            eager = models[name]().to(device).train(mode == "train")
        v = Variant(name=name + (f"+{tag}" if tag else ""), model_kind=kind, backend=backend, dtype=dt,
                    model=eager, compile=tag)
        if _interpreted(backend, device):
            v.timed, v.note = False, "Triton interpreter on CPU: correctness only, not timed"
        elif tag == "compile-layers":  # the check gets an eager twin (same initial weights)
            v.model, v.eager = _compile(eager, tag), models[name]().to(device).train(mode == "train")
        elif tag in ("compile", "compile-ro"):
            v.model, v.eager = _compile(eager, tag), eager
        if mode == "train":
            v.opt = torch.optim.AdamW(eager.parameters(), lr=1e-4, weight_decay=0.05)
        variants.append(v)

    # Error reference: the reference model (else the first model) in fp32, dropout off.
    ref_name = "reference" if "reference" in models else next(iter(models))
    ref_model = models[ref_name]().to(device)
    ref_v = Variant(ref_name, ref_name, None, "fp32", ref_model)
    ref_out, ref_grad = _check_pass(ref_v, x, mask, mode, device)
    del ref_model, ref_v

    steps = {}
    for v in variants:
        def make(v=v):
            steps[id(v)] = _step_fn(v, x, mask, mode, device)
        _guarded(v, "setup", make, device)

    for v in [v for v in variants if not v.failed]:
        if mode == "train" or not v.timed:
            def check(v=v):
                out, grads = _check_pass(v, x, mask, mode, device)
                v.rel_err = _rel_err(out, ref_out)
                if grads is not None and ref_grad is not None and grads.numel() == ref_grad.numel():
                    v.grad_rel_err = _rel_err(grads, ref_grad)
            _guarded(v, "check", check, device)
    round_s = 0.0
    for w in range(cfg.warmup):
        round_s = 0.0
        for v in [v for v in variants if v.timed]:
            def warm(v=v, w=w):
                seconds = _timed_call(steps[id(v)], device)
                if w == 0:
                    v.first_call_s = seconds  # includes compilation for compiled variants
                return seconds
            round_s += _guarded(v, "warm-up", warm, device) or 0.0
    # One untimed call after the warm-up (so one-time allocations such as AdamW state are not counted):
    # peak memory, and for infer the output to check.
    for v in [v for v in variants if v.timed]:
        def peak(v=v):
            if mode == "infer":
                holder: list[torch.Tensor] = []
                step = steps[id(v)]
                _, v.peak_mem = _peak_memory_call(lambda s=step, h=holder: h.append(s()), device)
                v.rel_err = _rel_err(holder[0].float(), ref_out)
            else:
                _, v.peak_mem = _peak_memory_call(steps[id(v)], device)
        _guarded(v, "peak-memory call", peak, device)
    timed = [v for v in variants if v.timed]
    repeats = cfg.repeats or max(AUTO_MIN, min(AUTO_MAX, int(AUTO_BUDGET_S / max(round_s, 1e-6))))
    for r in range(repeats):
        order = timed[r % len(timed):] + timed[:r % len(timed)] if timed else []  # rotate: no fixed slot
        for v in order:
            if device == "cpu":
                wall, cpu = _timed_call_cpu(steps[id(v)])
                v.samples.append(wall)
                v.cpu_samples.append(cpu)
            else:
                v.samples.append(_timed_call(steps[id(v)], device))
        if progress is not None:
            progress.set_postfix_str(f"round {r + 1}/{repeats}")
    _sync(device)
    return variants


def _row(cfg: BenchConfig, v: Variant, c: int, n: int, batch: int, mode: str, peaks: dict) -> dict:
    flops = model_flops(PRESETS[cfg.preset], c, n, batch, mode)
    row = {"variant": v.name, "model": v.model_kind, "backend": v.backend, "compile": v.compile,
           "dtype": v.dtype, "mode": mode,
           "channels": c, "patches": n, "batch": batch, "timed": v.timed, "repeats": len(v.samples),
           "flops": flops, "rel_err_vs_fp32_reference": v.rel_err,
           "grad_rel_err_vs_fp32_reference": v.grad_rel_err, "peak_mem_bytes": v.peak_mem,
           "first_call_s": v.first_call_s, "note": v.note, "failed": v.failed}
    if v.samples:
        lat = _quantiles(v.samples)
        peak = peaks.get(v.dtype)
        row.update({"latency_s": lat, "samples_per_s": batch / lat["p50"], "flops_per_s": flops / lat["p50"],
                    "utilisation": flops / lat["p50"] / peak if peak else None, "times_s": v.samples,
                    "cpu_time_s": _quantiles(v.cpu_samples) if v.cpu_samples else None,
                    "cpu_times_s": v.cpu_samples})
    else:
        row.update({"latency_s": None, "samples_per_s": None, "flops_per_s": None, "utilisation": None,
                    "times_s": [], "cpu_time_s": None, "cpu_times_s": []})
    return row


def _add_speedups(rows: list[dict]) -> None:
    def key(r: dict, dtype: str) -> tuple:
        return (r["mode"], r["channels"], r["patches"], r["batch"], dtype)

    # The baseline is the eager reference: a compiled reference is one of the candidates for "best native".
    ref = {key(r, r["dtype"]): r for r in rows
           if r["model"] == "reference" and not r.get("compile") and r["latency_s"]}
    native: dict[tuple, dict] = {}  # fastest variant without custom kernels, per group and dtype
    for r in rows:
        if r["backend"] in (None, "torch") and r["latency_s"]:
            best = native.get(key(r, r["dtype"]))
            if best is None or r["latency_s"]["p50"] < best["latency_s"]["p50"]:
                native[key(r, r["dtype"])] = r
    for r in rows:
        best = native.get(key(r, r["dtype"]))
        r["best_native_variant"] = best["variant"] if best else None
        r["speedup_vs_best_native"] = (best["latency_s"]["p50"] / r["latency_s"]["p50"]
                                       if best and r["latency_s"] else None)
        same, fp32 = ref.get(key(r, r["dtype"])), ref.get(key(r, "fp32"))
        ok = r["latency_s"] is not None
        r["speedup_vs_reference"] = same["latency_s"]["p50"] / r["latency_s"]["p50"] if ok and same else None
        r["speedup_vs_reference_fp32"] = fp32["latency_s"]["p50"] / r["latency_s"]["p50"] if ok and fp32 else None
        # Rounds are interleaved, so round i of both variants saw the same machine state: the spread of the
        # per-round ratios says how much of the speed-up is noise.
        r["speedup_vs_reference_rounds"] = None
        if ok and same and len(same["times_s"]) == len(r["times_s"]):
            ratios = [a / b for a, b in zip(same["times_s"], r["times_s"])]
            q = _quantiles(ratios)
            r["speedup_vs_reference_rounds"] = {"p10": _quantile(ratios, 0.1), "p50": q["p50"],
                                                "p90": q["p90"]}
        r["speedup_vs_reference_cpu_time"] = None
        if ok and same and r.get("cpu_time_s") and same.get("cpu_time_s"):
            r["speedup_vs_reference_cpu_time"] = same["cpu_time_s"]["p50"] / r["cpu_time_s"]["p50"]


def run_bench(cfg: BenchConfig) -> dict:
    """Run every group of ``cfg``; returns the result document (what is written as JSON)."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    threads_before = torch.get_num_threads()
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads or auto_threads())
    try:
        return _run_bench(cfg, created, load_before)
    finally:
        torch.set_num_threads(threads_before)


def _run_bench(cfg: BenchConfig, created: str, load_before) -> dict:
    from tqdm import tqdm

    models = build_models(cfg)
    stream = demo_patch_stream()
    dev = device_info(cfg.device)
    dev["gemm_flops_measured"] = measure_gemm(cfg.device, cfg.dtypes)
    peaks = dev["peak_flops"]
    rows: list[dict] = []
    groups = [(s, b, m) for m in cfg.modes for s in cfg.shapes for b in cfg.batches]
    with tqdm(groups, desc="bench", unit="group", disable=cfg.quiet, file=sys.stderr) as bar:
        for (c, n), batch, mode in bar:
            bar.set_description(f"bench {mode} {c}x{n} batch {batch}")
            x = make_input(stream, batch, c, n).to(cfg.device)
            for v in bench_group(cfg, models, x, mode, progress=bar):
                rows.append(_row(cfg, v, c, n, batch, mode, peaks))
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
    _add_speedups(rows)
    mcfg = PRESETS[cfg.preset]
    doc = {
        "schema": SCHEMA, "created": created, "device": dev, "versions": versions(), "git": git_state(),
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "original": ({"path": cfg.original, **git_state(Path(cfg.original))} if cfg.original else None),
        "load_average": {"before": load_before, "after": os.getloadavg() if load_before else None},
        "model_config": mcfg.to_dict(), "input": "real 12-lead ECG (shipped CinC 2021 demo records), leads "
        "repeated to C channels, consecutive 1-s patches", "definitions": _definitions(), "results": rows,
    }
    doc["summary"] = kernel_summary(rows)
    return doc


def kernel_summary(rows: list[dict], low: str = "bf16") -> list[dict]:
    """The comparison the Triton-kernel issue asks for, per (mode, shape, batch): (a) the original
    implementation (from ``--original``) in fp32 eager, else the eager in-repo reference, (b) the fastest
    torch-native variant (reference / original / fast[torch], any compilation) in ``low`` precision, (c) the fastest Triton variant in ``low``; throughput, ratios, (c)'s utilisation.
    Groups without a timed Triton variant are left out."""
    out = []
    groups = dict.fromkeys((r["mode"], r["channels"], r["patches"], r["batch"]) for r in rows)
    for g in groups:
        sel = [r for r in rows if (r["mode"], r["channels"], r["patches"], r["batch"]) == g and r["latency_s"]]

        def fastest(pred):
            cand = [r for r in sel if pred(r)]
            return min(cand, key=lambda r: r["latency_s"]["p50"]) if cand else None

        a = (fastest(lambda r: r["model"] == "original" and not r.get("compile") and r["dtype"] == "fp32")
             or fastest(lambda r: r["model"] == "reference" and not r.get("compile") and r["dtype"] == "fp32"))
        b = fastest(lambda r: r["backend"] in (None, "torch") and r["dtype"] == low)
        c = fastest(lambda r: r["backend"] == "triton" and r["dtype"] == low)
        if c is None:
            continue

        def brief(r):
            return None if r is None else {"variant": r["variant"], "dtype": r["dtype"],
                                           "samples_per_s": r["samples_per_s"], "p50_s": r["latency_s"]["p50"],
                                           "utilisation": r["utilisation"]}
        out.append({"mode": g[0], "channels": g[1], "patches": g[2], "batch": g[3], "a": brief(a), "b": brief(b),
                    "c": brief(c), "c_over_a": a and a["latency_s"]["p50"] / c["latency_s"]["p50"],
                    "c_over_b": b and b["latency_s"]["p50"] / c["latency_s"]["p50"]})
    return out


def summary_table(summary: list[dict]) -> str:
    """Markdown of :func:`kernel_summary` (empty string when there is nothing to compare)."""
    if not summary:
        return ""
    lines = ["| mode | C×N | batch | (a) fp32 eager | samples/s | (b) best torch-native | samples/s | "
             "(c) ours, Triton | samples/s | p50 ms (c) | (c)/(a) | (c)/(b) | util. (c) |",
             "|---|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        a, b, c = s["a"], s["b"], s["c"]
        lines.append(
            f"| {s['mode']} | {s['channels']}×{s['patches']} | {s['batch']} | {a['variant'] if a else '–'} | "
            f"{_fmt(a and a['samples_per_s'], '.1f')} | {b['variant'] + ' ' + b['dtype'] if b else '–'} | "
            f"{_fmt(b and b['samples_per_s'], '.1f')} | {c['variant']} {c['dtype']} | {c['samples_per_s']:.1f} | "
            f"{c['p50_s'] * 1e3:.3f} | {_fmt(s['c_over_a'], '.2f')} | {_fmt(s['c_over_b'], '.2f')} | "
            f"{_fmt(c['utilisation'] and c['utilisation'] * 100, '.1f')}{'' if c['utilisation'] is None else ' %'} |")
    return "\n".join(lines)


def _definitions() -> dict:
    return {
        "latency": "one forward (infer, eval, inference_mode) or training step (train: zero_grad, forward with "
                   "a Bernoulli(0.5) patch mask, MSE to the input, backward, AdamW); CUDA events on GPU, "
                   "perf_counter on CPU; variants interleaved in rotating order",
        "dtype": "fp32 plain; bf16/fp16 under torch.autocast (weights fp32)",
        "flops": "analytic: 2 x multiply-adds of convs, linears and attention matmuls (norms, activations, "
                 "softmax, rFFT excluded); train = 3 x forward",
        "peak_mem": "bytes allocated above the pre-call level during one call (CUDA max_memory_allocated; CPU: "
                    "torch allocator high-water mark from torch.profiler memory events; 'graph' variants allocate "
                    "nothing per replay: their memory sits in the graph's pool)",
        "speedup": "reference p50 / variant p50 in the same dtype (and vs the fp32 reference); in brackets the "
                   "10th-90th percentile of the per-round ratios (rounds are interleaved, so a round's variants "
                   "share the machine state)",
        "cpu_time": "CPU device only: process CPU time (time.process_time) of the same timed calls; on a "
                    "shared machine it leaves out the time spent waiting for a core, so its ratios are the "
                    "steadier comparison",
        "compile": "per variant: " + "; ".join(f"{k}: {v}" for k, v in COMPILE_TAGS.items())
                   + "; first_call_s includes the compilation",
        "best_native": "speedup_vs_best_native: p50 of the fastest variant without custom kernels (reference, "
                       "original, fast[torch]; any compilation) in the same group and dtype / this p50",
        "rel_err": "|y - y_ref| / |y_ref| of the output (grad_rel_err: of all parameter gradients) vs the "
                   "reference model in fp32, dropout off, same input (train: compiled variants are checked "
                   "through their eager module)",
    }


# ---------------------------------------------------------------------------------------------------------
# output


def result_stem(doc: dict) -> str:
    dev = doc["device"]
    if dev["type"] == "cpu":
        slug = "cpu" + ("-" + re.sub(r"[^a-z0-9]+", "", dev["uarch"].lower()) if dev.get("uarch") else "")
    else:
        slug = "cuda-" + re.sub(r"[^a-z0-9]+", "-", dev["name"].lower()).strip("-")
    a = doc["args"]
    shapes = "-".join(f"{c}x{n}" for c, n in a["shapes"])
    suffix = "_original" if a.get("original") else ""
    return f"{slug}_{a['preset']}_{'-'.join(a['modes'])}_{shapes}{suffix}"


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


_COMPILE_LABELS = {"compile": " + torch.compile", "compile-ro": " + compile (reduce-overhead)",
                   "compile-layers": " + torch.compile per layer",
                   "graph": " + CUDA graph"}


def _variant_label(r: dict) -> str:
    label = f"cbramod-fast ({r['backend']})" if r["model"] == "fast" else r["model"]
    label += _COMPILE_LABELS.get(r.get("compile") or "", "")
    if r.get("failed"):
        return f"{label}, FAILED in {r['failed'].split(':')[0]}"
    return label if r["timed"] else f"{label}, interpreter: error only"


def _speedup_text(r: dict) -> str:
    text = _fmt(r["speedup_vs_reference"], ".2f")
    rounds = r.get("speedup_vs_reference_rounds")
    if rounds and r["model"] != "reference":
        text += f" ({rounds['p10']:.2f}–{rounds['p90']:.2f})"
    return text


def markdown_table(doc: dict) -> str:
    """The result table of one run (used for the .md file and by bench/report.py for the README)."""
    lines = [("| mode | C×N | batch | variant | dtype | p50 ms | p90 ms | p99 ms | samples/s | GFLOP/s | "
              "util. | peak MiB | × ref | × ref fp32 | CPU-time p50 ms | × ref (CPU time) | rel. err |"),
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        lat = r["latency_s"] or {}
        err = _fmt(r["rel_err_vs_fp32_reference"], ".1e")
        if r.get("grad_rel_err_vs_fp32_reference") is not None:
            err += f" (grad {r['grad_rel_err_vs_fp32_reference']:.1e})"
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        lines.append(
            f"| {r['mode']} | {r['channels']}×{r['patches']} | {r['batch']} | {_variant_label(r)} | {r['dtype']} | "
            f"{_fmt(lat.get('p50') and lat['p50'] * 1e3, '.1f')} | {_fmt(lat.get('p90') and lat['p90'] * 1e3, '.1f')} | "
            f"{_fmt(lat.get('p99') and lat['p99'] * 1e3, '.1f')} | {_fmt(r['samples_per_s'], '.1f')} | "
            f"{_fmt(r['flops_per_s'] and r['flops_per_s'] / 1e9, '.1f')} | "
            f"{_fmt(r['utilisation'] and r['utilisation'] * 100, '.1f')}{'' if r['utilisation'] is None else ' %'} | "
            f"{_fmt(mem, '.1f')} | {_speedup_text(r)} | "
            f"{_fmt(r['speedup_vs_reference_fp32'], '.2f')} | "
            f"{_fmt(r.get('cpu_time_s') and r['cpu_time_s']['p50'] * 1e3, '.1f')} | "
            f"{_fmt(r.get('speedup_vs_reference_cpu_time'), '.2f')} | {err} |")
    return "\n".join(lines)


def _repeats_text(doc: dict) -> str:
    counts = sorted({r["repeats"] for r in doc["results"] if r["timed"]})
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}" if counts else "0"
    return f"{span} interleaved rounds" + (" (auto)" if not doc["args"]["repeats"] else "")


def _compile_text(doc: dict) -> str:
    compiled = [r for r in doc["results"] if r.get("compile") in ("compile", "compile-ro", "compile-layers")
                or (doc["args"].get("compile") and "compile" not in r)]  # files from before per-variant tags
    firsts = [r["first_call_s"] for r in compiled if r["first_call_s"] is not None]
    return f", torch.compile (first calls incl. compilation: {min(firsts):.1f}–{max(firsts):.1f} s)" if firsts else ""


def device_label(dev: dict) -> str:
    return f"{dev['name']} ({dev['uarch']})" if dev.get("uarch") else dev["name"]


def markdown_header(doc: dict) -> str:
    dev, ver, git = doc["device"], doc["versions"], doc["git"]
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    peak = dev["peak_flops"]
    mcfg = doc["model_config"]
    a = doc["args"]
    fl = model_flops(CBraModConfig(**mcfg), *a["shapes"][0], 1, "infer") if a["shapes"] else None
    peaks = ", ".join(f"{k} {peak[k] / 1e9:.0f} GFLOP/s" for k in ("fp32", "bf16", "fp16") if peak.get(k))
    gemm = dev.get("gemm_flops_measured") or {}
    gemm_text = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in gemm.items())
    return "\n".join([
        (f"- device: **{device_label(dev)}** ({dev['type']}, {dev['torch_threads']} torch threads of "
         f"{dev['cpu_count']} CPUs); peak used for utilisation: {peaks or 'unknown'} — {peak['method']}"
         + (f"; measured square-matmul rate at start: {gemm_text}" if gemm_text else "")),
        f"- torch {ver['torch']}, triton {ver.get('triton') or '–'}, python {ver['python']}; "
        f"commit {commit}; {doc['created']}"
        + (f"; 1-min load average {doc['load_average']['before'][0]:.1f} before, "
           f"{doc['load_average']['after'][0]:.1f} after" if doc.get("load_average", {}).get("before") else ""),
        (f"- preset `{a['preset']}` ({mcfg['n_layer']} layers, ff {mcfg['dim_feedforward']}); "
         f"{fl / 1e9:.2f} GFLOP per {a['shapes'][0][0]}×{a['shapes'][0][1]} sample forward; warm-up "
         f"{a['warmup']}, repeats {_repeats_text(doc)}"
         f"{_compile_text(doc)}"),
    ])


def render_markdown(doc: dict) -> str:
    summary = summary_table(doc.get("summary") or [])
    summary = (f"Summary: (a) original (else reference) fp32 eager, (b) fastest torch-native variant, (c) "
               f"fastest Triton variant, both bf16; ratios of p50 latencies.\n\n{summary}\n\n") if summary else ""
    return (f"# cbramod-fast bench: {result_stem(doc)}\n\n{markdown_header(doc)}\n\n{summary}"
            f"{markdown_table(doc)}\n\n"
            "Definitions: " + "; ".join(f"**{k}**: {v}" for k, v in doc["definitions"].items()) + "\n")


def plot_latency(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in doc["results"] if r["latency_s"]]
    panels = sorted({(r["mode"], r["channels"], r["patches"]) for r in rows})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (mode, c, n) in zip(axes[0], panels):
        sel = [r for r in rows if (r["mode"], r["channels"], r["patches"]) == (mode, c, n)]
        models = list(dict.fromkeys(_variant_label(r) for r in sel))
        dtypes = list(dict.fromkeys(r["dtype"] for r in sel))
        for (mi, model), (di, dt) in itertools.product(enumerate(models), enumerate(dtypes)):
            pts = sorted((r["batch"], r["latency_s"]["p50"] * 1e3) for r in sel
                         if _variant_label(r) == model and r["dtype"] == dt)
            if pts:  # colour = model, line style = dtype
                ax.plot(*zip(*pts), marker="o", color=f"C{mi}", linestyle=("-", "--", ":")[di % 3],
                        label=f"{model} {dt}")
        batches = sorted({r["batch"] for r in sel})
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="p50 latency (ms)", title=f"{mode} {c}×{n}")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, handlelength=3.5)
    fig.suptitle(f"{device_label(doc['device'])} — preset {doc['args']['preset']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(doc: dict, out: str | Path, plot: bool = False) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(doc)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    _write_text(paths[0], json.dumps(doc, indent=1) + "\n")
    _write_text(paths[1], render_markdown(doc))
    if plot:
        paths.append(out / f"{stem}.png")
        plot_latency(doc, paths[-1])
    return paths


# ---------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--shapes", default="19x30", help="CxN list: channels x 1-s patches (default: 19x30)")
    p.add_argument("--batch", default="1,8", help="batch sizes (default: 1,8)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (low precision = autocast; default: "
                   "fp32,bf16)")
    p.add_argument("--backend", default=None, help="fast-model backends: torch, triton, flash (default: torch)")
    p.add_argument("--mode", default="infer", help="infer (forward) and/or train (training step)")
    p.add_argument("--original", metavar="PATH", help="checkout of github.com/wjq-learning/CBraMod to compare too")
    p.add_argument("--preset", default="base", help=f"model preset: {', '.join(PRESETS)} (default: base)")
    p.add_argument("--repeats", type=int, default=0, help=f"timed rounds per group (default 0 = auto: ~"
                   f"{AUTO_BUDGET_S:.0f} s, {AUTO_MIN}..{AUTO_MAX} rounds)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (>= 1; default 1)")
    p.add_argument("--out", default="bench/results", help="output folder for JSON / markdown / PNG")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default 0 = auto: cores not "
                   "busy per the 1-min load average)")
    p.add_argument("--plot", action="store_true", help="also write a latency-vs-batch PNG")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (first call reported)")
    p.add_argument("--variants", metavar="LIST", help="explicit variants instead of --backend x --dtype: "
                   "MODEL:DTYPE[:TAG] with MODEL reference, original, torch, triton or flash and TAG "
                   f"{', '.join(COMPILE_TAGS)} (e.g. reference:fp32,reference:bf16:compile,triton:bf16)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    doc = run_bench(cfg)
    paths = write_results(doc, cfg.out, plot=cfg.plot)
    print(markdown_header(doc))
    print()
    print(markdown_table(doc))
    if doc.get("summary"):
        print()
        print(summary_table(doc["summary"]))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    failed = [f"{r['variant']} {r['dtype']} ({r['mode']} {r['channels']}x{r['patches']} batch {r['batch']}): "
              f"{r['failed']}" for r in doc["results"] if r.get("failed")]
    for line in failed:
        print(f"cbramod-fast bench: failed variant: {line}", file=sys.stderr)
    return 1 if failed else 0


COMMANDS = {"bench": (add_arguments, run)}
