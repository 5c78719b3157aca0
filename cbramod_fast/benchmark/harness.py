"""The benchmark harness: same weights and input for every variant, warm-up, interleaved timed rounds.

For every (shape, batch, mode) group all variants (the fast ``CBraMod`` per backend and dtype, the in-repo
``ReferenceCBraMod`` per dtype, optionally the original implementation from a checkout) get the same
weights and the same input, are warmed up, checked against the fp32 reference, then timed in interleaved
rounds (rotating order) so machine noise hits them alike. Speed-ups are ratios of medians from the same run.

Measurement definitions (also written into every result file, :func:`definitions`):

- latency: one forward (``infer``: eval mode, ``inference_mode``) or one training step (``train``:
  zero_grad, forward with a fixed Bernoulli(0.5) patch mask, MSE to the clean input, backward, AdamW step);
  CUDA events on GPU, ``time.perf_counter`` on CPU. p50/p90/p99 are linear-interpolated quantiles of the
  repeats (with fewer than ~100 repeats p99 is close to the maximum).
- dtype: ``fp32`` runs in float32; ``bf16``/``fp16`` run under ``torch.autocast`` (weights stay fp32; the
  patch embedding's rFFT has no CPU bf16/fp16 kernel, so casting the whole model is not an option).
- FLOPs: counted analytically from the config (:func:`.device.model_flops`): 2 x multiply-adds of every
  convolution, linear layer and attention matmul; norms, activations, softmax and the rFFT are left out
  (the ``torch.utils.flop_counter`` convention; ``tests/test_benchmark.py`` cross-checks the two — the
  counter itself counts grouped-conv backward as dense, so it is not used for training). A training step
  counts 3 x the forward.
- utilisation: achieved FLOP/s / device peak for the dtype (:func:`.device.device_info`).
- peak memory: bytes allocated above what was live before one call (weights and input excluded). CUDA:
  ``max_memory_allocated``; CPU: high-water mark of torch's CPU allocator events recorded by
  ``torch.profiler(profile_memory=True)`` (RSS is useless here: glibc keeps freed pages).
- error: relative L2 error ``|y - y_ref| / |y_ref|`` of the output (and, for ``train``, of all parameter
  gradients, dropout off) against the reference model in fp32 on the same input.
- CPU path: for the fast model on CPU, ``model.cpu_path`` read after each timed call (what that call ran:
  precision and each layer step's implementation, measured per CPU); None when the call took no CPU
  inference plan (training, a whole-model ``torch.compile`` graph).

Results are handed to ``on_group`` after every (shape, batch, mode) group, so a run that is stopped (a time
limit, a crash in a later group) still leaves the groups it finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..model.config import PRESETS
from .config import AUTO_BUDGET_S, AUTO_MAX, AUTO_MIN, COMPILE_TAGS, DTYPES, SCHEMA, BenchConfig, auto_threads
from .device import device_info, git_state, measure_gemm, model_flops, timed_call, versions
from .inputs import make_input, patch_stream


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
    cpu_paths: dict[str | None, int] = field(default_factory=dict)  # CPU: model.cpu_path per timed call


def build_models(cfg: BenchConfig) -> dict[str, Callable[[], nn.Module]]:
    """A factory per variant model (fast per backend, reference, original), all giving the same weights.

    Factories rather than instances: training variants need their own copy, and ``copy.deepcopy`` is not
    safe on a model that caches backend-packed weights after a call.
    """
    from ..model import CBraMod, ReferenceCBraMod

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


def step_fn(v: Variant, x: torch.Tensor, mask: torch.Tensor, mode: str, device: str):
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_path_model(v: Variant) -> nn.Module | None:
    """The fast model behind ``v`` (through a ``torch.compile`` wrapper), whose ``cpu_path`` says what its
    last CPU inference call ran; None for the other models."""
    if v.model_kind != "fast" or v.model is None:
        return None
    return getattr(v.model, "_orig_mod", v.model)


def _cpu_path_call(v: Variant, step) -> tuple[float, float]:
    """A timed CPU call, and the CPU path it ran. The infer variants of a model share its instance (fp32 and
    bf16, eager and compiled), so the last call's report is cleared first: a call that takes no CPU plan (a
    compiled graph) then reads None, not the previous variant's path. Both outside the timed interval."""
    m = _cpu_path_model(v)
    if m is not None:
        m.encoder.last_cpu_path = None
    wall, cpu = _timed_call_cpu(step)
    if m is not None:
        v.cpu_paths[m.cpu_path] = v.cpu_paths.get(m.cpu_path, 0) + 1
    return wall, cpu


def _cpu_path_text(v: Variant) -> str | None:
    # Several only if the plan changed between calls (it is cached per shape bucket, dtype and threads).
    paths = list(v.cpu_paths)
    return " | ".join(str(p) for p in paths) if len(paths) > 1 else (paths[0] if paths else None)


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


def quantile(xs: list[float], p: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    s = sorted(xs)
    pos = p * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def quantiles(xs: list[float]) -> dict:
    return {"p50": quantile(xs, 0.5), "p90": quantile(xs, 0.9), "p99": quantile(xs, 0.99),
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
            steps[id(v)] = step_fn(v, x, mask, mode, device)
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
                seconds = timed_call(steps[id(v)], device)
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
                wall, cpu = _cpu_path_call(v, steps[id(v)])
                v.samples.append(wall)
                v.cpu_samples.append(cpu)
            else:
                v.samples.append(timed_call(steps[id(v)], device))
        if progress is not None:
            progress.set_postfix_str(f"round {r + 1}/{repeats}")
    sync(device)
    return variants


def _row(cfg: BenchConfig, v: Variant, c: int, n: int, batch: int, mode: str, peaks: dict) -> dict:
    flops = model_flops(PRESETS[cfg.preset], c, n, batch, mode)
    row = {"variant": v.name, "model": v.model_kind, "backend": v.backend, "compile": v.compile,
           "dtype": v.dtype, "mode": mode,
           "channels": c, "patches": n, "batch": batch, "timed": v.timed, "repeats": len(v.samples),
           "flops": flops, "rel_err_vs_fp32_reference": v.rel_err,
           "grad_rel_err_vs_fp32_reference": v.grad_rel_err, "peak_mem_bytes": v.peak_mem,
           "first_call_s": v.first_call_s, "note": v.note, "failed": v.failed,
           "cpu_path": _cpu_path_text(v)}
    if v.samples:
        lat = quantiles(v.samples)
        peak = peaks.get(v.dtype)
        row.update({"latency_s": lat, "samples_per_s": batch / lat["p50"], "flops_per_s": flops / lat["p50"],
                    "utilisation": flops / lat["p50"] / peak if peak else None, "times_s": v.samples,
                    "cpu_time_s": quantiles(v.cpu_samples) if v.cpu_samples else None,
                    "cpu_times_s": v.cpu_samples})
    else:
        row.update({"latency_s": None, "samples_per_s": None, "flops_per_s": None, "utilisation": None,
                    "times_s": [], "cpu_time_s": None, "cpu_times_s": []})
    return row


def add_speedups(rows: list[dict]) -> None:
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
            q = quantiles(ratios)
            r["speedup_vs_reference_rounds"] = {"p10": quantile(ratios, 0.1), "p50": q["p50"],
                                                "p90": q["p90"]}
        r["speedup_vs_reference_cpu_time"] = None
        if ok and same and r.get("cpu_time_s") and same.get("cpu_time_s"):
            r["speedup_vs_reference_cpu_time"] = same["cpu_time_s"]["p50"] / r["cpu_time_s"]["p50"]


def run_bench(cfg: BenchConfig, on_group: Callable[[dict], None] | None = None) -> dict:
    """Run every group of ``cfg``; returns the result document (what is written as JSON). ``on_group`` gets
    the document so far after each group but the last (``partial`` says how many groups it holds)."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    threads_before = torch.get_num_threads()
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads or auto_threads())
    try:
        return _run_bench(cfg, created, load_before, on_group)
    finally:
        torch.set_num_threads(threads_before)


def _run_bench(cfg: BenchConfig, created: str, load_before, on_group) -> dict:
    from tqdm import tqdm

    models = build_models(cfg)
    stream = patch_stream()
    dev = device_info(cfg.device)
    dev["gemm_flops_measured"] = measure_gemm(cfg.device, cfg.dtypes)
    peaks = dev["peak_flops"]
    mcfg = PRESETS[cfg.preset]
    doc = {
        "schema": SCHEMA, "created": created, "device": dev, "versions": versions(), "git": git_state(),
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "original": ({"path": cfg.original, **git_state(Path(cfg.original))} if cfg.original else None),
        "load_average": {"before": load_before, "after": None},
        "model_config": mcfg.to_dict(), "input": "real 12-lead ECG (shipped CinC 2021 demo records), leads "
        "repeated to C channels, consecutive 1-s patches", "definitions": definitions(), "results": [],
    }
    groups = [(s, b, m) for m in cfg.modes for s in cfg.shapes for b in cfg.batches]
    with tqdm(groups, desc="bench", unit="group", disable=cfg.quiet, file=sys.stderr) as bar:
        for i, ((c, n), batch, mode) in enumerate(bar):
            bar.set_description(f"bench {mode} {c}x{n} batch {batch}")
            x = make_input(stream, batch, c, n).to(cfg.device)
            for v in bench_group(cfg, models, x, mode, progress=bar):
                doc["results"].append(_row(cfg, v, c, n, batch, mode, peaks))
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
            _finish(doc, load_before)
            if i + 1 < len(groups):
                doc["partial"] = {"groups_done": i + 1, "groups": len(groups)}
                if on_group is not None:
                    on_group(doc)
    doc.pop("partial", None)
    return doc


def _finish(doc: dict, load_before) -> None:
    """Speed-ups and summary over the rows so far (recomputed: later groups do not change earlier ones)."""
    add_speedups(doc["results"])
    doc["load_average"]["after"] = os.getloadavg() if load_before else None
    doc["summary"] = kernel_summary(doc["results"])


def kernel_summary(rows: list[dict], low: str = "bf16") -> list[dict]:
    """Where the Triton kernels stand, per (mode, shape, batch): (a) the original implementation (from
    ``--original``) in fp32 eager, else the eager in-repo reference, (b) the fastest torch-native variant
    (reference / original / fast[torch], any compilation) in ``low`` precision, (c) the fastest Triton
    variant in ``low``; throughput, ratios, (c)'s utilisation.
    Groups without a timed Triton variant are left out."""
    out = []
    groups = dict.fromkeys((r["mode"], r["channels"], r["patches"], r["batch"]) for r in rows)
    for g in groups:
        sel = [r for r in rows if (r["mode"], r["channels"], r["patches"], r["batch"]) == g and r["latency_s"]]

        def fastest(pred, sel=sel):
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


def definitions() -> dict:
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
