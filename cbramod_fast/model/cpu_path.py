"""The encoder's CPU inference path (eval mode, no autograd): each step of a layer through the fastest
implementation this CPU has, chosen by measurement and cached, as ``torch.backends.cudnn.benchmark`` does.

Why measure: the same math runs at very different speeds on different CPUs. oneDNN's pre-packed GEMMs
with fused epilogues win on AVX-512 machines; on AVX2-only ones MKL's GEMM plus a separate GELU is faster
than oneDNN's fused GELU, and oneDNN's bf16 GEMMs need AVX512-BF16 / AMX / AVX-NE-CONVERT (they raise
elsewhere). Every candidate below computes the same function; the plan picks per step.

Steps and candidates (``Plan`` fields):
  qkv   both in-projections          onednn (pre-packed weights) | blas (``torch.addmm`` into a reused buffer)
                                     | cpp (both halves in one call of our packed-panel GEMM, ``kernels/cpu.py``)
  attn  criss-cross attention        cpp (``kernels/cpu.py``, float32) | torch (``kernels/reference.py``)
  out   both output projections      blas (bias add, then ``addmm_`` into the new residual) | cpp (bias and
        + residual                   residual in the GEMM's epilogue, both halves in one call)
  ffn1  linear1 + GELU               onednn+gelu (fused post-op) | onednn or blas, then the C++ bias+GELU
                                     (",gelu") or ATen's GELU (",aten-gelu", on torch's OpenMP threads)
                                     | cpp+gelu (bias and GELU in our GEMM's epilogue, on the tile in registers)
  ffn2  linear2 + bias + residual    onednn+add (fused) | blas (``addmm_`` into the residual) | cpp+add
  ffn   the feed-forward block       split (LayerNorm 2, then the ffn1 and ffn2 steps) | fused (float32: one C++
                                     call, LayerNorm + both GEMMs per block of rows, the hidden activations
                                     never leave the thread's cache); decided among the finalists (below)

bf16 (autocast, or a model in bfloat16) runs either ``bf16-native`` (oneDNN bf16 GEMMs, where the CPU
supports them) or ``bf16-emulated``: float32 GEMMs on operands rounded to bfloat16 (weights once, the
activations that feed a GEMM each call). The products of two bf16 values are exact in float32, so this is a
bf16 GEMM with float32 accumulation, as oneDNN's; other steps stay in float32 (the stream of a bf16 model
is rounded back to bfloat16 after every layer).

Forcing (tests, users): ``CBraMod(cpu_path=...)`` or ``CBRAMOD_FAST_CPU_PATH`` = ``auto`` (measure) |
``onednn`` | ``blas`` | ``cpp`` (all GEMM steps through that library; oneDNN has no output-projection step,
``onednn`` keeps ``blas`` there; ``cpp`` runs the fused feed-forward block) | ``plain`` (the training
path's plain PyTorch ops, no plan). ``CBRAMOD_FAST_CPU_ATTENTION`` = ``auto`` | ``cpp`` | ``torch`` and
``CBRAMOD_FAST_CPU_BF16`` = ``auto`` | ``native`` | ``emulated`` force the other two choices. A forced
choice this CPU cannot run raises ``RuntimeError`` naming what is missing. ``model.cpu_path`` tells what
the last CPU inference call ran.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from ..kernels import cpu, reference

PATHS = ("auto", "onednn", "blas", "cpp", "plain")
ATTENTION = ("auto", "cpp", "torch")
BF16 = ("auto", "native", "emulated")
TUNE_TOKENS = 4096  # plans for bigger batches are measured on a slice of about this many tokens

try:  # private oneDNN ops (the ones Inductor's CPU freezing passes use); absent -> the blas steps only
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise
    _reorder_linear_weight = torch.ops.mkldnn._reorder_linear_weight
except (AttributeError, RuntimeError):
    _linear_pointwise = _reorder_linear_weight = None


# -- what this CPU can run --------------------------------------------------------------------------------
@cache
def onednn_available() -> bool:
    return _linear_pointwise is not None and torch.backends.mkldnn.is_available()


@cache
def onednn_bf16_available() -> bool:
    """oneDNN's bf16 GEMMs need AVX512 (BW/VL/DQ), AVX512-BF16, AMX or AVX-NE-CONVERT; asked of oneDNN."""
    if not onednn_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def capabilities() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn": onednn_available(),
            "onednn_bf16": onednn_bf16_available(), "cpp_attention": cpu.available(),
            "cpp_gemm": cpu.gemm_available(), "cpp_attention_simd": cpu.simd_path()}


def _setting(env: str, value: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(env, "auto") if value == "auto" else value
    if value not in allowed:
        raise ValueError(f"{env}: unknown value {value!r}; expected one of {allowed}")
    return value


def cpu_inference(x: torch.Tensor, training: bool, params) -> bool:
    """Whether a call may take the CPU inference kernels: ``x`` on the CPU, eval mode, not being compiled, and no
    gradient wanted for ``x`` or any of ``params`` (e.g. partial fine-tuning runs the plain ops)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return x.device.type == "cpu" and not training and not torch.compiler.is_compiling() and not needs_grad


# -- weights in the layout each step wants, cached per layer ------------------------------------------------
_NAMES = ("in_s", "in_s_b", "in_t", "in_t_b", "out_s", "out_s_b", "out_t", "out_t_b", "l1", "l1_b", "l2", "l2_b",
          "n1w", "n1b", "n2w", "n2b")
_GEMMS = ("in_s", "in_t", "out_s", "out_t", "l1", "l2")


def _params(layer) -> tuple[torch.Tensor, ...]:
    """The layer's parameters in ``_NAMES`` order, through the module dicts (``nn.Module.__getattr__`` is slow
    enough to matter once per layer at batch 1)."""
    mods = layer._modules
    sp, tp = mods["self_attn_s"]._parameters, mods["self_attn_t"]._parameters
    so, to = mods["self_attn_s"]._modules["out_proj"]._parameters, mods["self_attn_t"]._modules["out_proj"]._parameters
    l1, l2, n1, n2 = (mods[k]._parameters for k in ("linear1", "linear2", "norm1", "norm2"))
    return (sp["in_proj_weight"], sp["in_proj_bias"], tp["in_proj_weight"], tp["in_proj_bias"], so["weight"],
            so["bias"], to["weight"], to["bias"], l1["weight"], l1["bias"], l2["weight"], l2["bias"], n1["weight"],
            n1["bias"], n2["weight"], n2["bias"])


class _Weights:
    """One layer's inference weights for one kind: ``fp32``, ``bf16`` (native bf16 GEMMs) or
    ``bf16-rounded`` (float32 holding bf16 values). GEMM weights also come transposed (what ``addmm``
    takes), where oneDNN runs pre-packed in its blocked layout (saves a reorder in every call) and, in
    float32, in our GEMM's panels.
    LayerNorm parameters are kept in float32 and in the GEMMs' dtype."""

    def __init__(self, params: tuple[torch.Tensor, ...], kind: str):
        self.dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        p = dict(zip(_NAMES, (t.detach() for t in params)))
        self.norm = {dt: {k: p[k].to(dt).contiguous() for k in ("n1w", "n1b", "n2w", "n2b")}
                     for dt in {torch.float32, self.dtype}}
        w = {k: p[k].to(torch.bfloat16 if kind != "fp32" else torch.float32).to(self.dtype) for k in _NAMES[:12]}
        w["out_b"] = torch.cat((w["out_s_b"], w["out_t_b"]))
        for k in _GEMMS:
            w[k + "_t"] = w[k].t()
        if onednn_available() and (kind != "bf16" or onednn_bf16_available()):
            for k in _GEMMS:
                w[k + "_p"] = _reorder_linear_weight(w[k], None)
        if kind != "bf16" and cpu.gemm_available():
            for k in _GEMMS:
                w[k + "_c"] = cpu.pack_weight(w[k])
        self.__dict__.update(w)


def weights(layer, kind: str) -> _Weights:
    """Cached per layer and kind; rebuilt when any parameter changes (storage or version counter). A plain
    attribute, not a buffer: never in the state dict, dropped when pickling (``CrissCrossLayer``)."""
    params = _params(layer)
    key = tuple((p.data_ptr(), p._version) for p in params)
    cache = layer.__dict__.setdefault("_weight_cache", {})
    hit = cache.get(kind)
    if hit is None or hit[0] != key:
        hit = cache[kind] = (key, _Weights(params, kind))
    return hit[1]


# -- the buffers of one encoder call --------------------------------------------------------------------------
class Frame:
    """Buffers (and their views) that every layer of one call reuses, for one input shape and GEMM dtype:
    fresh multi-MB tensors in every layer cost page faults, and rebuilding views costs time at batch 1."""

    def __init__(self, b: int, c: int, n: int, d: int, ff: int, dtype: torch.dtype):
        half, tok = d // 2, b * c * n
        self.shape, self.tok, self.half, self.d = (b, c, n, d), tok, half, d
        e = lambda *s: torch.empty(s, dtype=dtype)
        self.h_s, self.h_t = e(b, n, c, half), e(b, c, n, half)  # LayerNorm 1 -> projection inputs
        self.h_s2, self.h_t2 = self.h_s.view(tok, half), self.h_t.view(tok, half)
        self.qkv_s, self.qkv_t = e(tok, 3 * half), e(tok, 3 * half)  # blas projection outputs
        self.attn = e(b, c, n, d)  # cpp attention output
        self.a2 = self.attn.view(tok, d)
        self.h = e(tok, d)  # LayerNorm 2
        self.ffn = e(tok, ff)
        self.res = (e(tok, d), e(tok, d))  # residual streams, used in turn
        self.fused_halves = None  # the cpp attention's arguments when it reads the blas outputs
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.h_s, self.h_t, self.qkv_s, self.qkv_t,
                                                                 self.attn, self.h, self.ffn, *self.res))

    def views4(self, qkv_s: torch.Tensor, qkv_t: torch.Tensor):
        b, c, n, _ = self.shape
        return qkv_s.view(b, n, c, -1).transpose(1, 2), qkv_t.view(b, c, n, -1)

    def residual(self, x: torch.Tensor, last: bool = False) -> torch.Tensor:
        """The residual buffer that does not hold ``x``; a fresh tensor for the last layer (the call's output
        must not be a buffer the next call overwrites)."""
        if last:
            return torch.empty_like(x)
        return self.res[1] if x.data_ptr() == self.res[0].data_ptr() else self.res[0]


KEEP_BYTES = 64 << 20  # buffers kept between calls up to this size; bigger calls give theirs back


class Workspace:
    """The frames of the encoder calls of one thread (one per shape and GEMM dtype; tuning may meet several)."""

    def __init__(self):
        self.frames: dict[tuple, Frame] = {}

    def trim(self, keep_bytes: int) -> None:
        """Keep only the most recent frame, and only if it is at most ``keep_bytes``."""
        last = list(self.frames.items())[-1:]
        self.frames = {k: f for k, f in last if f.nbytes <= keep_bytes}

    def frame(self, shape: tuple[int, ...], ff: int, dtype: torch.dtype) -> Frame:
        key = (*shape, ff, dtype)
        fr = self.frames.get(key)
        if fr is None:
            fr = self.frames[key] = Frame(*shape, ff, dtype)
        return fr


def _round_bf16_(t: torch.Tensor) -> torch.Tensor:
    if cpu.available() and t.is_contiguous():
        return cpu.round_bf16_(t)
    return t.copy_(t.to(torch.bfloat16))


def _lp(x, w, b, attr="none"):
    return _linear_pointwise(x, w, b, attr, [], "none" if attr == "gelu" else "")


# -- the steps ------------------------------------------------------------------------------------------------
def _qkv(kind, fr: Frame, w, threads):
    if kind == "onednn":
        return _lp(fr.h_s2, w.in_s_p, w.in_s_b), _lp(fr.h_t2, w.in_t_p, w.in_t_b)
    if kind == "cpp":
        cpu.gemm_raw([cpu.gemm_task(fr.h_s2, w.in_s_c, fr.qkv_s, w.in_s_b),
                      cpu.gemm_task(fr.h_t2, w.in_t_c, fr.qkv_t, w.in_t_b)], threads)
        return fr.qkv_s, fr.qkv_t
    return (torch.addmm(w.in_s_b, fr.h_s2, w.in_s_t, out=fr.qkv_s),
            torch.addmm(w.in_t_b, fr.h_t2, w.in_t_t, out=fr.qkv_t))


def _attn(kind, fr: Frame, qkv_s, qkv_t, heads, threads):
    """-> (tokens, d) matrix [spatial | temporal]."""
    if kind == "cpp":
        if qkv_s is fr.qkv_s and qkv_t is fr.qkv_t:  # the blas outputs: the arguments are fixed per call
            if fr.fused_halves is None:
                fr.fused_halves = cpu.attention_args(*fr.views4(qkv_s, qkv_t), fr.attn)
            args = fr.fused_halves
        else:
            args = cpu.attention_args(*fr.views4(qkv_s, qkv_t), fr.attn)
        cpu.attention_raw(args, heads, fr.half // heads, threads)
        return fr.a2
    return reference.criss_cross_attention(*fr.views4(qkv_s, qkv_t), heads).reshape(fr.tok, fr.d)


def _out(kind, fr: Frame, a, x2, w, threads, last):
    """x2 + [a_s | a_t] @ blockdiag(out_s, out_t)^T + bias, into a new residual buffer."""
    half = fr.half
    x = fr.residual(x2, last)
    if kind == "cpp":
        cpu.gemm_raw([cpu.gemm_task(a[:, :half], w.out_s_c, x[:, :half], w.out_s_b, x2[:, :half]),
                      cpu.gemm_task(a[:, half:], w.out_t_c, x[:, half:], w.out_t_b, x2[:, half:])], threads)
        return x
    # the bias add makes the new residual, the two GEMMs accumulate into it
    torch.add(x2, w.out_b, out=x)
    x[:, :half].addmm_(a[:, :half], w.out_s_t)
    x[:, half:].addmm_(a[:, half:], w.out_t_t)
    return x


def _ffn1(kind, fr: Frame, h, w, threads):
    if kind == "cpp+gelu":
        cpu.gemm_raw([cpu.gemm_task(h, w.l1_c, fr.ffn, w.l1_b, gelu=True)], threads)
        return fr.ffn
    if kind == "onednn+gelu":
        return _lp(h, w.l1_p, w.l1_b, "gelu")  # GELU (erf) as the GEMM's post-op
    # "...,aten-gelu": ATen's GELU, parallel on torch's own OpenMP threads
    native = cpu.available() and h.dtype == torch.float32 and not kind.endswith("aten-gelu")
    if kind.startswith("onednn,"):
        f = _lp(h, w.l1_p, w.l1_b)
        return cpu.bias_gelu_raw(f, None, threads) if native else torch._C._nn.gelu_(f)
    if native:  # the bias rides on the GELU pass, not on a broadcast copy before the GEMM
        return cpu.bias_gelu_raw(torch.mm(h, w.l1_t, out=fr.ffn), w.l1_b, threads)
    return torch._C._nn.gelu_(torch.addmm(w.l1_b, h, w.l1_t, out=fr.ffn))


def _ffn2(kind, f, x, w, threads):
    """x + f @ l2^T + bias; ``blas`` and ``cpp+add`` update ``x`` in place (always a buffer of this call)."""
    if kind == "cpp+add":
        cpu.gemm_raw([cpu.gemm_task(f, w.l2_c, x, w.l2_b, x)], threads)
        return x
    if kind == "onednn+add":
        return _linear_pointwise.binary(f, x, w.l2_p, w.l2_b, "add")
    if kind == "onednn":  # bf16 GEMM output added to a float32 stream (autocast)
        return x + _lp(f, w.l2_p, w.l2_b)
    return x.addmm_(f, w.l2_t).add_(w.l2_b)


_KIND = {"fp32": "fp32", "bf16-native": "bf16", "bf16-emulated": "bf16-rounded"}


def run_layer(layer, x: torch.Tensor, plan, ws: Workspace, last: bool = False) -> torch.Tensor:
    """One criss-cross layer (the math of ``CrissCrossLayer.forward`` in eval mode); ``x``: (B, C, N, d).

    ``plan``: a ``Plan`` (or the tuner, which times every candidate first): its ``precision``, its
    ``native_threads`` and ``choose(step, fn)``, which returns ``fn(candidate)``. ``last``: the result must
    not live in a workspace buffer.
    """
    precision, choose, threads = plan.precision, plan.choose, plan.native_threads
    w = weights(layer, _KIND[precision])
    emulate = precision == "bf16-emulated"
    stream = x.dtype
    x = (x.float() if emulate else x).contiguous()
    cd = w.dtype  # the GEMMs' dtype
    fr = ws.frame(tuple(x.shape), w.l1.shape[0], cd)
    tok, d, half = fr.tok, fr.d, fr.half
    native_ln = cpu.available() and x.dtype == cd == torch.float32
    nx = w.norm[x.dtype]
    # LayerNorm 1 straight into the projections' inputs, the spatial half in (B, N, C) row order: its
    # attention sequences are then contiguous.
    if native_ln:
        cpu.layer_norm_raw(x, nx["n1w"], nx["n1b"], layer.norm1.eps, fr.h_s, fr.h_t, True, threads)
    else:
        h = F.layer_norm(x, (d,), nx["n1w"], nx["n1b"], layer.norm1.eps)
        fr.h_s.copy_(h[..., :half].transpose(1, 2))
        fr.h_t.copy_(h[..., half:])
    if emulate:
        _round_bf16_(fr.h_s)
        _round_bf16_(fr.h_t)
    qkv_s, qkv_t = choose("qkv", lambda k: _qkv(k, fr, w, threads))
    a = choose("attn", lambda k: _attn(k, fr, qkv_s, qkv_t, layer.heads, threads))
    if emulate:
        a = _round_bf16_(a.contiguous())
    x2 = x.view(tok, d)
    if a.dtype == x.dtype:
        x = choose("out", lambda k: _out(k, fr, a, x2, w, threads, last))
    else:  # bf16 GEMMs over a float32 stream (autocast): bf16 outputs added in float32, as autocast does
        o = torch.cat((_lp(a[:, :half], w.out_s_p, w.out_s_b), _lp(a[:, half:], w.out_t_p, w.out_t_b)), -1)
        x = x2 + o
    if choose("ffn", lambda k: k) == "fused":  # float32 only (candidates)
        return cpu.ffn_raw(x, x, nx["n2w"], nx["n2b"], layer.norm2.eps, w.l1_c, w.l1_b, w.l2_c, w.l2_b,
                           threads).view(fr.shape)
    if native_ln:
        cpu.layer_norm_raw(x, nx["n2w"], nx["n2b"], layer.norm2.eps, fr.h, fr.h, False, threads)
        h = fr.h
    else:
        h = F.layer_norm(x, (d,), nx["n2w"], nx["n2b"], layer.norm2.eps).to(cd)
    if emulate:
        _round_bf16_(h)
    f = choose("ffn1", lambda k: _ffn1(k, fr, h, w, threads))
    if emulate:
        _round_bf16_(f)
    x = choose("ffn2", lambda k, copy=False: _ffn2(k, f, x.clone() if copy else x, w, threads)).view(fr.shape)
    if emulate and stream == torch.bfloat16:
        return x.to(stream)  # a bf16 model's stream is bf16 between layers
    return x


# -- choosing a plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    precision: str  # "fp32" | "bf16-native" | "bf16-emulated" | "plain" (the layers' own forward)
    qkv: str = "-"
    attn: str = "-"
    out: str = "-"
    ffn1: str = "-"
    ffn2: str = "-"
    ffn: str = "split"
    native_threads: int = 1  # threads of the C++ kernels (LayerNorm, attention, GELU)
    measured: bool = False  # chosen by timing (False: forced, or one candidate per step)

    def choose(self, step: str, fn):
        return fn(getattr(self, step))

    def describe(self) -> str:
        how = "measured" if self.measured else "fixed"
        ffn = "ffn=fused" if self.ffn == "fused" else f"ffn1={self.ffn1} ffn2={self.ffn2}"
        steps = "" if self.precision == "plain" else \
            f" qkv={self.qkv} attn={self.attn} out={self.out} {ffn} native_threads={self.native_threads}"
        return (f"{self.precision}{steps} ({how}; {torch.get_num_threads()} threads, "
                f"{torch.backends.cpu.get_cpu_capability()})")


def requested_precision(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The precision an inference call asks for, or None when only the plain path serves it (fp16, fp64...)."""
    if torch.is_autocast_enabled("cpu"):
        ok = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
        return "bf16" if ok else None
    if x.dtype == weight.dtype == torch.float32:
        return "fp32"
    if x.dtype == weight.dtype == torch.bfloat16:
        return "bf16"
    return None


def candidates(precision: str, stream_fp32: bool, path: str, attention: str) -> dict[str, list[str]]:
    """Candidates of each step for one precision, after the forcing settings; raises if one is left empty."""
    native = precision == "bf16-native"
    onednn = onednn_available() and (not native or onednn_bf16_available())
    blas = not native  # the blas and cpp steps compute in float32
    gemm = blas and cpu.gemm_available()
    same = not native or not stream_fp32  # residual stream in the GEMMs' dtype -> fused residual add
    c = {"qkv": ["onednn"] * onednn + ["blas"] * blas + ["cpp"] * gemm,
         "attn": ["cpp"] * (not native and cpu.available()) + ["torch"],
         "out": ["blas"] + ["cpp"] * gemm,  # native bf16: ATen's addmm_ (a bf16 stream) or oneDNN (float32)
         "ffn1": ["onednn+gelu", "onednn,gelu", "onednn,aten-gelu"] * onednn + ["blas,gelu", "blas,aten-gelu"] * blas
         + ["cpp+gelu"] * gemm,
         "ffn2": ([("onednn+add" if same else "onednn")] if onednn else []) + ["blas"] * (blas and same)
         + ["cpp+add"] * (gemm and same),
         "ffn": ["split"] + ["fused"] * (gemm and precision == "fp32")}
    if path in ("onednn", "blas", "cpp"):
        c["ffn"] = c["ffn"][-1:] if path == "cpp" else ["split"]
        for step in ("qkv", "out", "ffn1", "ffn2"):
            if step == "out" and path == "onednn":
                continue  # oneDNN has no output-projection step here: it stays as it is
            c[step] = [k for k in c[step] if k.startswith(path)]
    if attention != "auto":
        c["attn"] = [k for k in c["attn"] if k == attention]
    for step, opts in c.items():
        if not opts:
            raise RuntimeError(f"CPU path {precision}: no way to run step {step!r} with path={path!r}, "
                               f"attention={attention!r} on this CPU ({capabilities()})")
    return c


_PLANS: dict[tuple, Plan] = {}


STEP_ROUNDS, FINAL_ROUNDS = 3, 5  # rounds of a step's candidates, of the finalists (whole layers)
FUSED_TIE = 0.03  # a fused-block finalist this much slower than the fastest counts as tied with it (_measure)


def _race(fns: list, rounds: int) -> list[float]:
    """Each function's best time over interleaved rounds, after a warm-up call each (weight packing,
    first-touch of buffers)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def _bucket(b: int, per_sample: int) -> int:
    """The batch bucket a measurement stands for: b rounded up to a power of two, capped near TUNE_TOKENS
    tokens (bigger batches are measured on a slice of this many samples)."""
    cap = max(1, TUNE_TOKENS // per_sample)
    return min(1 << (b - 1).bit_length(), 1 << (cap - 1).bit_length())


def plan_for(layers, x: torch.Tensor, path: str = "auto") -> Plan | None:
    """The plan for inference on ``x`` (B, C, N, d) with these layers, or None for the plain path."""
    path = _setting("CBRAMOD_FAST_CPU_PATH", path, PATHS)
    attention = _setting("CBRAMOD_FAST_CPU_ATTENTION", "auto", ATTENTION)
    bf16 = _setting("CBRAMOD_FAST_CPU_BF16", "auto", BF16)
    layer = layers[0]
    req = requested_precision(x, layer.linear1.weight)
    if path == "plain" or req is None:
        return None
    if req == "fp32":
        precisions = ["fp32"]
    else:
        precisions = ["bf16-native"] * onednn_bf16_available() + ["bf16-emulated"]
        if bf16 != "auto":
            precisions = [p for p in precisions if p == f"bf16-{bf16}"]
            if not precisions:
                raise RuntimeError(f"CBRAMOD_FAST_CPU_BF16=native: this CPU has no oneDNN bf16 GEMMs "
                                   f"({capabilities()})")
        if path in ("blas", "cpp"):  # float32 GEMMs only
            precisions = [p for p in precisions if p != "bf16-native"]
    b, c, n, d = x.shape
    bucket = _bucket(b, c * n)
    stream_fp32 = x.dtype == torch.float32
    key = (c, n, bucket, x.dtype, req, torch.get_num_threads(), d, layer.linear1.weight.shape[0], layer.heads,
           path, attention, bf16)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    options = {p: candidates(p, stream_fp32, path, attention) for p in precisions}
    if len(precisions) == 1 and all(len(v) == 1 for v in options[precisions[0]].values()):
        plan = Plan(precisions[0], **{k: v[0] for k, v in options[precisions[0]].items()},
                    native_threads=torch.get_num_threads())
    else:
        # bf16 through plain ops is ATen's slow bf16 fallback where oneDNN has no bf16: not worth timing
        plan = _measure(layer, x[:min(b, bucket)], options, plain=path == "auto" and (
            req == "fp32" or onednn_bf16_available()))
    _PLANS[key] = plan
    return plan


class _Tuner:
    """Runs a layer like a plan, but times every candidate of a step first and keeps the fastest."""

    def __init__(self, precision: str, options: dict[str, list[str]], native_threads: int):
        self.precision, self.options, self.native_threads = precision, options, native_threads
        self.chosen: dict[str, str] = {}

    def choose(self, step: str, fn):
        opts = self.options[step]
        if step == "ffn":  # the fused block competes as a whole layer among the finalists, not here
            self.chosen[step] = "split"
        elif len(opts) > 1:
            # ffn2's blas candidate updates the residual in place: every ffn2 candidate is timed on a copy
            args = (True,) if step == "ffn2" else ()
            # interleaved rounds: a burst of load from elsewhere hits every candidate, not one
            times = _race([lambda k=k: fn(k, *args) for k in opts], STEP_ROUNDS)
            self.chosen[step] = opts[times.index(min(times))]
        else:
            self.chosen[step] = opts[0]
        return fn(self.chosen[step])


def _measure(layer, x: torch.Tensor, options: dict[str, dict[str, list[str]]], plain: bool) -> Plan:
    """Time every candidate of every step on one layer, per precision; then the whole layer with each
    precision's winners (in float32 also with the fused feed-forward block), with the C++ kernels on all torch
    threads (torch's OpenMP team where it has one, see ``cpu.thread_team``) and on one, and keep the fastest.
    The fastest is kept, except that a fused feed-forward finalist within ``FUSED_TIE`` of it wins the tie.
    With ``plain``, the layer's own forward (the training path's plain ops, about the original's speed)
    competes too: the plan is never slower than it on the measured shape. Candidates and finalists alike are
    timed in interleaved rounds (best of ``STEP_ROUNDS`` / ``FINAL_ROUNDS`` after a warm-up call each), so
    that a burst of load from elsewhere does not decide the choice kept for the process's lifetime."""
    finalists: list[tuple[Plan, object]] = []
    if plain:
        finalists.append((Plan("plain", measured=True), lambda: layer(x)))
    threads = torch.get_num_threads()
    for precision, opts in options.items():
        ws = Workspace()
        first = Plan(precision, **{k: v[0] for k, v in opts.items()}, native_threads=threads)
        run_layer(layer, x, first, ws)  # warm-up: weight packing, buffers
        tuner = _Tuner(precision, opts, threads)
        run_layer(layer, x, tuner, ws)
        for n in sorted({threads, 1}, reverse=True):
            for ffn in opts["ffn"]:
                plan = Plan(precision, **{**tuner.chosen, "ffn": ffn}, native_threads=n, measured=True)
                finalists.append((plan, lambda plan=plan, ws=ws: run_layer(layer, x, plan, ws)))
    times = _race([fn for _, fn in finalists], FINAL_ROUNDS)
    best = min(range(len(times)), key=times.__getitem__)
    if finalists[best][0].precision == "plain":
        return finalists[best][0]
    # Near-ties go to the fused feed-forward block: a one-layer race understates its lead, which comes from
    # the hidden activations staying in cache while a whole stack's weights stream through (Zen 3, 2 threads,
    # 12x10 B=8 and 19x30 B=1: split / fused 1.00-1.06 on one layer, 1.01-1.10 over the 12 layers). Never
    # past the plain path, if it ran.
    limit = min([times[best] * (1 + FUSED_TIE)] + [t for (p, _), t in zip(finalists, times) if p.precision == "plain"])
    tied = [i for i, (p, _) in enumerate(finalists) if p.ffn == "fused" and times[i] <= limit]
    return finalists[min(tied, key=times.__getitem__) if tied else best][0]


# -- the patch embedding: native kernels or modules ------------------------------------------------------------
_EMBEDS: dict[tuple, str] = {}


def embed_for(embedding, x: torch.Tensor, path: str = "auto") -> str:
    """How an inference call on ``x`` (B, C, N, len) runs the patch embedding: ``"cpp"`` (its native kernels,
    ``kernels/cpu.py``: the conv stack in one call, float32 patches of 176..200 samples, the spectrum's magnitude
    and the positional conv with its residual) or ``"torch"`` (its modules: oneDNN convolutions, GroupNorm, GELU,
    ``abs``). ``plain`` forces torch and ``cpp`` the native kernels wherever they apply; otherwise the faster of
    the two whole embeddings on this shape bucket and thread count, measured once as the layers' steps are."""
    path = _setting("CBRAMOD_FAST_CPU_PATH", path, PATHS)
    if path == "plain" or not cpu.stem_supports(x):
        return "torch"
    if path == "cpp":
        return "cpp"
    b, c, n, length = x.shape
    bucket = _bucket(b, c * n)
    key = (c, n, length, bucket, torch.get_num_threads())
    if key not in _EMBEDS:
        xs = x[:min(b, bucket)].contiguous()
        times = _race([lambda: embedding.embed(xs, "cpp"), lambda: embedding.embed(xs, "torch")], STEP_ROUNDS)
        _EMBEDS[key] = "cpp" if times[0] <= times[1] else "torch"
    return _EMBEDS[key]
