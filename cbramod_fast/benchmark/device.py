"""The machine a benchmark runs on: its peak FLOP/s, what a matmul gets now, versions, git state, timing.

Utilisation is achieved FLOP/s over the device's peak: GPUs from data-sheet dense peaks, CPUs from threads x
clock x FLOP/cycle of the SIMD flags (:func:`cpu_peak`); model FLOPs are counted analytically
(:func:`model_flops`).
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from ..model.config import CBraModConfig
from .config import DTYPES


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
        best = min(timed_call(lambda a=a, b=b: torch.mm(a, b), device) for _ in range(5))
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
    for mod in ("triton", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package: report it as missing
            out[mod] = None
    from .. import __version__

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


def timed_call(step, device: str) -> float:
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
