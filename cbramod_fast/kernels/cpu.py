"""CPU inference kernels of the encoder, through the C++ extension (``csrc/encoder_cpu.cpp``): the fused
criss-cross attention (float32), LayerNorm into given buffers, bias + GELU in place, rounding to bfloat16
in place. Writing into the caller's (reused) buffers is half the point: a fresh multi-MB tensor per layer
costs page faults whenever the allocator has returned the last one to the OS.

The attention: 
Same contract as ``reference.criss_cross_attention`` (see there): ``qkv_s`` / ``qkv_t`` are ``(B, C, N, 3*D)``
views with unit stride on the last dim, the result is ``(B, C, N, 2*D)`` = ``[spatial | temporal]``. One
C++ pass per sequence handles all heads: q, k and v are read in place (no permute copies), scores and softmax
stay in registers and L1, and the result is written straight into ``out`` (any (B, C, N, 2*D) view with unit
last stride, e.g. a reused workspace). No autograd: this is the inference path's kernel; training and
``torch.compile`` use the PyTorch twin.
"""

from __future__ import annotations

import torch

try:
    from .. import _ext
except ImportError:  # a source tree without the built extension
    _ext = None


def available() -> bool:
    return _ext is not None and hasattr(_ext, "attention_f32")


def simd_path() -> str | None:
    """Which build of the kernels runs: ``'avx2+fma'`` or ``'baseline'`` (``CBRAMOD_FAST_SIMD=baseline``)."""
    return _ext.encoder_simd_path() if available() else None


def thread_team() -> str | None:
    """``"openmp"``: the kernels run on torch's OpenMP threads (the ones its GEMMs use); ``"threads"``: on
    threads of their own (no OpenMP runtime in the process); None without the extension."""
    return _ext.encoder_thread_team() if available() else None


def _check(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if t.dim() != 4 or t.stride(-1) != 1:
        raise ValueError(f"{name} must be a 4-D view with unit stride on the last dim, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")


def criss_cross_attention_cpu(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """Spatial (across C) and temporal (across N) attention of all heads in one native call (no autograd)."""
    if not available():
        raise RuntimeError("the C++ extension cbramod_fast._ext is not built: reinstall the package")
    _check("qkv_s", qkv_s)
    _check("qkv_t", qkv_t)
    if qkv_s.shape[:3] != qkv_t.shape[:3] or qkv_s.shape[-1] != qkv_t.shape[-1] or qkv_s.shape[-1] % (3 * heads):
        raise ValueError(f"qkv_s {tuple(qkv_s.shape)} and qkv_t {tuple(qkv_t.shape)} must both be (B, C, N, 3*D) "
                         f"with D divisible by heads={heads}")
    if torch.is_grad_enabled() and (qkv_s.requires_grad or qkv_t.requires_grad):
        raise RuntimeError("criss_cross_attention_cpu has no backward: use kernels.criss_cross_attention")
    b, c, n, three_d = qkv_s.shape
    d = three_d // 3
    if out is None:
        out = qkv_s.new_empty((b, c, n, 2 * d))
    else:
        _check("out", out)
        if tuple(out.shape) != (b, c, n, 2 * d):
            raise ValueError(f"out must be {(b, c, n, 2 * d)}, got {tuple(out.shape)}")
    attention_raw(attention_args(qkv_s, qkv_t, out), heads, d // heads, torch.get_num_threads())
    return out


def attention_args(qkv_s: torch.Tensor, qkv_t: torch.Tensor, out: torch.Tensor) -> list[tuple]:
    """The native call's arguments for (B, C, N, 3*D) views and a (B, C, N, 2*D) output (unchecked)."""
    b, c, n, three_d = qkv_s.shape
    d = three_d // 3
    sb, sc, sn, _ = qkv_s.stride()
    tb, tc, tn, _ = qkv_t.stride()
    ob, oc, on, _ = out.stride()
    ptr = out.data_ptr()
    spatial = (qkv_s.data_ptr(), b, n, sb, sn, sc, ptr, ob, on, oc, c)  # sequences (b, n) of C rows
    temporal = (qkv_t.data_ptr(), b, c, tb, tc, tn, ptr + 4 * d, ob, oc, on, n)  # sequences (b, c) of N rows
    return [spatial, temporal]


def attention_raw(args: list[tuple], heads: int, head_dim: int, threads: int) -> None:
    """The native attention on ``attention_args`` (no checks: for callers that own the buffers)."""
    _ext.attention_f32(args, heads, head_dim, threads)


def round_bf16_(x: torch.Tensor) -> torch.Tensor:
    """Round a contiguous float32 CPU tensor to the nearest bfloat16 values in place (ties to even)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"round_bf16_ needs a contiguous float32 CPU tensor, got {x.dtype} on {x.device}")
    _ext.round_bf16_f32(x.data_ptr(), x.numel(), torch.get_num_threads())
    return x


def bias_gelu_(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x = gelu(x + bias)`` in place (erf form, the arithmetic of ATen's AVX2 GELU) on a float32 CPU matrix
    with unit stride on the last dim; ``bias``: (x.shape[1],) or None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"bias_gelu_ needs a float32 CPU matrix with unit last stride, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()} on {x.device}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (x.shape[1],)
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous float32 ({x.shape[1]},) tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    return bias_gelu_raw(x, bias, torch.get_num_threads())


def bias_gelu_raw(x: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    """``bias_gelu_`` without checks (callers that own the buffers)."""
    _ext.bias_gelu_f32(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), 0 if bias is None else bias.data_ptr(),
                       threads)
    return x


def layer_norm_split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_s: torch.Tensor,
                     out_t: torch.Tensor) -> None:
    """LayerNorm of ``x`` (B, C, N, d) into the attention halves' inputs: features [0, d/2) to ``out_s``
    (B, N, C, d/2), i.e. in the spatial projection's row order, [d/2, d) to ``out_t`` (B, C, N, d/2).
    float32, all contiguous."""
    b, c, n, d = x.shape
    _check_ln(x, weight, bias, d, (out_s, (b, n, c, d // 2)), (out_t, (b, c, n, d - d // 2)))
    layer_norm_raw(x, weight, bias, eps, out_s, out_t, True, torch.get_num_threads())


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """LayerNorm over the last dim of a contiguous float32 ``x`` into ``out`` (same shape, contiguous)."""
    _check_ln(x, weight, bias, x.shape[-1], (out, tuple(x.shape)))
    layer_norm_raw(x, weight, bias, eps, out, out, False, torch.get_num_threads())


def layer_norm_raw(x, weight, bias, eps, out_lo, out_hi, split: bool, threads: int) -> None:
    """The native LayerNorm without checks (callers that own the buffers): ``split`` scatters the halves
    as ``layer_norm_split`` does, else the whole row goes to ``out_lo``. ``x``: (..., d) contiguous."""
    d = x.shape[-1]
    if split:
        b, c, n, _ = x.shape
        _ext.layer_norm_f32(x.data_ptr(), b, c, n, d, weight.data_ptr(), bias.data_ptr(), eps, out_lo.data_ptr(),
                            out_hi.data_ptr(), d // 2, True, threads)
    else:
        _ext.layer_norm_f32(x.data_ptr(), 1, 1, x.numel() // d, d, weight.data_ptr(), bias.data_ptr(), eps,
                            out_lo.data_ptr(), out_lo.data_ptr(), d, False, threads)


def _require_contiguous_f32(op: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous float32 CPU tensor, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def _check_ln(x, weight, bias, d, *outs):
    _require_contiguous_f32("layer_norm", {"x": x, "weight": weight, "bias": bias,
                                           **{f"out{i}": o for i, (o, _) in enumerate(outs)}})
    if tuple(weight.shape) != (d,) or tuple(bias.shape) != (d,):
        raise ValueError(f"layer_norm: weight and bias must be ({d},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    for o, shape in outs:
        if tuple(o.shape) != shape:
            raise ValueError(f"layer_norm: out must be {shape}, got {tuple(o.shape)}")


# -- GEMM with fused epilogue ---------------------------------------------------------------------------------
PANEL = 16  # columns per packed panel (kGemmPanel, the C++ tile width)


def _panels(n: int) -> int:
    return -(-n // PANEL)


def gemm_available() -> bool:
    return _ext is not None and hasattr(_ext, "gemm_f32")


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A ``Linear`` weight (N, K) as the GEMM's packed B = w.T: (ceil(N/16), K, 16) panels, zero past N."""
    n, k = w.shape
    panels = _panels(n)
    b = w.new_zeros(k, panels * PANEL, dtype=torch.float32)
    b[:, :n] = w.t()
    return b.view(k, panels, PANEL).permute(1, 0, 2).contiguous()


def gemm_task(a: torch.Tensor, packed: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
              res: torch.Tensor | None = None, gelu: bool = False) -> tuple:
    """The native call's description of ``out = act(a @ B + bias + res)`` (unchecked: see ``linear``)."""
    m, k = a.shape
    return (a.data_ptr(), a.stride(0), packed.data_ptr(), 0 if bias is None else bias.data_ptr(),
            0 if res is None else res.data_ptr(), 0 if res is None else res.stride(0), out.data_ptr(), out.stride(0),
            m, out.shape[1], k, gelu)


def gemm_raw(tasks: list[tuple], threads: int) -> None:
    """Run ``gemm_task`` descriptions, all in one parallel pass (no checks: callers that own the buffers)."""
    _ext.gemm_f32(tasks, threads)


def linear(a: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None,
           res: torch.Tensor | None = None, gelu: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(a @ w.T + bias + res)`` with ``packed = pack_weight(w)``, ``w`` (n, K); float32 matrices with unit
    last stride (``a``, ``res``, ``out`` may be column slices of wider ones); ``res`` may be ``out`` itself
    (in place); GELU in erf form."""
    if not gemm_available():
        raise RuntimeError("the C++ extension cbramod_fast._ext is not built: reinstall the package")
    mats = {"a": a, "res": res, "out": out}
    for name, t in mats.items():
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 2 or t.stride(1) != 1):
            raise ValueError(f"linear: {name} must be a float32 CPU matrix with unit last stride, got {t.dtype} "
                             f"{tuple(t.shape)} strides {t.stride()} on {t.device}")
    m, k = a.shape
    if packed.dtype != torch.float32 or not packed.is_contiguous() or packed.dim() != 3 or \
            packed.shape[1:] != (k, PANEL) or packed.shape[0] != _panels(n) or n < 1:
        raise ValueError(f"linear: packed must be pack_weight of a ({n}, {k}) weight, got {tuple(packed.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"linear: bias must be a contiguous float32 ({n},) tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    for name, t in (("res", res), ("out", out)):
        if t is not None and tuple(t.shape) != (m, n):
            raise ValueError(f"linear: {name} must be ({m}, {n}), got {tuple(t.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, packed, bias, res)):
        raise RuntimeError("cpu.linear has no backward: it is the inference path's kernel")
    out = a.new_empty((m, n)) if out is None else out
    gemm_raw([gemm_task(a, packed, out, bias, res, gelu)], torch.get_num_threads())
    return out


def ffn_raw(x: torch.Tensor, out: torch.Tensor, ln_w, ln_b, eps: float, w1_packed, b1, w2_packed, b2,
            threads: int) -> torch.Tensor:
    """``feed_forward`` without checks (callers that own the buffers)."""
    m, d = x.shape
    _ext.ffn_f32(x.data_ptr(), out.data_ptr(), m, d, b1.shape[0], ln_w.data_ptr(), ln_b.data_ptr(), eps,
                 w1_packed.data_ptr(), b1.data_ptr(), w2_packed.data_ptr(), b2.data_ptr(), threads)
    return out


def feed_forward(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float, w1_packed: torch.Tensor,
                 b1: torch.Tensor, w2_packed: torch.Tensor, b2: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer's feed-forward block in one native call, ``x + GELU(LayerNorm(x) @ w1.T + b1) @ w2.T + b2``
    (``w1`` (ff, d), ``w2`` (d, ff) given as ``pack_weight``), per block of rows: the (rows, ff) hidden
    activations stay in the thread's cache. ``x`` (M, d) contiguous float32; ``out`` may be ``x``."""
    if not gemm_available():
        raise RuntimeError("the C++ extension cbramod_fast._ext is not built: reinstall the package")
    tensors = {"x": x, "ln_w": ln_w, "ln_b": ln_b, "w1_packed": w1_packed, "b1": b1, "w2_packed": w2_packed, "b2": b2}
    if out is not None:
        tensors["out"] = out
    _require_contiguous_f32("feed_forward", tensors)
    if x.dim() != 2:
        raise ValueError(f"feed_forward: x must be (M, d), got {tuple(x.shape)}")
    m, d = x.shape
    ff = b1.shape[0] if b1.dim() == 1 else -1
    want = {"ln_w": (d,), "ln_b": (d,), "b1": (ff,), "b2": (d,), "w1_packed": (_panels(ff), d, PANEL),
            "w2_packed": (_panels(d), ff, PANEL), "out": (m, d)}
    for name, shape in want.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ValueError(f"feed_forward: {name} must be {shape} for x {tuple(x.shape)} and b1 "
                             f"{tuple(b1.shape)}, got {tuple(tensors[name].shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        raise RuntimeError("cpu.feed_forward has no backward: it is the inference path's kernel")
    return ffn_raw(x, x.new_empty((m, d)) if out is None else out, ln_w, ln_b, eps, w1_packed, b1, w2_packed, b2,
                   torch.get_num_threads())


# -- patch embedding stem -------------------------------------------------------------------------------------
STEM_CHANNELS, STEM_STRIDE, STEM_POSITIONS = 25, 25, 8  # kStemChannels, kStemStride, kStemPositions (C++)
# stem_params' shapes: (conv weight, conv bias, GroupNorm weight, GroupNorm bias) of each conv in turn
STEM_SHAPES = [(STEM_CHANNELS, 1, 1, 49)] + [(STEM_CHANNELS,)] * 3 + \
    ([(STEM_CHANNELS, STEM_CHANNELS, 1, 3)] + [(STEM_CHANNELS,)] * 3) * 2


def stem_available() -> bool:
    return _ext is not None and hasattr(_ext, "patch_stem_f32")


def stem_supports(x: torch.Tensor) -> bool:
    """Whether the native stem computes the patch embedding's conv stack for ``x`` (B, C, N, len): float32 on
    the CPU, and patches of 176..200 samples (the convs then give 8 positions per patch)."""
    return stem_available() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and \
        (x.shape[-1] - 1) // STEM_STRIDE + 1 == STEM_POSITIONS


def stem_params(proj_in: torch.nn.Sequential) -> tuple[torch.Tensor, ...]:
    """``PatchEmbedding.proj_in``'s tensors in ``patch_stem``'s order: (weight, bias, GroupNorm weight, GroupNorm
    bias) of each conv in turn."""
    return tuple(t.detach() for i in (0, 3, 6) for t in (proj_in[i].weight, proj_in[i].bias, proj_in[i + 1].weight,
                                                         proj_in[i + 1].bias))


def patch_stem(x: torch.Tensor, params: tuple[torch.Tensor, ...], eps: float, threads: int) -> torch.Tensor:
    """The patch embedding's conv stack (``PatchEmbedding.proj_in``: three conv + GroupNorm + GELU, erf form) for
    ``x`` (B, C, N, len), returned as (B, C, N, 25 * 8) in the original's feature order (channel * 8 +
    position), in one native call (no autograd). ``params``: ``stem_params(proj_in)``; ``eps``: GroupNorm's."""
    if not stem_available():
        raise RuntimeError("the C++ extension cbramod_fast._ext is not built: reinstall the package")
    if not stem_supports(x):
        raise ValueError(f"patch_stem: x must be a float32 CPU tensor (B, C, N, len) with 176 <= len <= 200, "
                         f"got {x.dtype} {tuple(x.shape)} on {x.device}")
    if [tuple(p.shape) for p in params] != STEM_SHAPES:
        raise ValueError(f"patch_stem: params must be stem_params(proj_in), got shapes "
                         f"{[tuple(p.shape) for p in params]}")
    _require_contiguous_f32("patch_stem", {"x": x, **{f"params[{i}]": p for i, p in enumerate(params)}})
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        raise RuntimeError("cpu.patch_stem has no backward: it is the inference path's kernel")
    b, c, n, length = x.shape
    out = x.new_empty((b, c, n, STEM_CHANNELS * STEM_POSITIONS))
    _ext.patch_stem_f32(x.data_ptr(), out.data_ptr(), b, c * n, length, tuple(p.data_ptr() for p in params), eps,
                        threads)
    return out


# -- patch embedding: spectrum magnitude, positional conv --------------------------------------------------------
def magnitude(z: torch.Tensor, threads: int) -> torch.Tensor:
    """``z.abs()`` for a contiguous complex64 CPU tensor, as sqrt(re^2 + im^2) in double (correctly rounded, no
    overflow; several times faster than ``Tensor.abs`` on the patch spectra), no autograd."""
    if z.dtype != torch.complex64 or z.device.type != "cpu" or not z.is_contiguous():
        raise ValueError(f"magnitude: z must be a contiguous complex64 CPU tensor, got {z.dtype} on {z.device}")
    out = torch.empty(z.shape, dtype=torch.float32)
    _ext.magnitude_f32(z.data_ptr(), out.data_ptr(), z.numel(), threads)
    return out


def pos_conv_supports(h: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether ``positional_conv`` serves ``h`` (B, C, N, d) with this depthwise conv: float32 on the CPU, d a
    multiple of 8, groups = channels = d, stride 1, no dilation, numeric padding."""
    d = h.shape[-1] if h.dim() == 4 else -1
    return (available() and h.dim() == 4 and h.dtype == torch.float32 and h.device.type == "cpu" and d % 8 == 0
            and conv.groups == conv.in_channels == conv.out_channels == d and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and not isinstance(conv.padding, str) and conv.bias is not None
            and conv.weight.dtype == torch.float32)


def positional_conv(h: torch.Tensor, conv: torch.nn.Conv2d, threads: int) -> torch.Tensor:
    """``h + conv(h)`` for ``h`` (B, C, N, d) channels last and the patch embedding's depthwise positional conv
    (``h.permute(0, 3, 1, 2)`` is its input), in one native call (no autograd): each tap's weights are loaded
    once for 4 positions x 24 channels held in registers."""
    if not pos_conv_supports(h, conv):
        raise ValueError(f"positional_conv: needs float32 CPU h (B, C, N, d) with d a multiple of 8 and a depthwise "
                         f"Conv2d(d, d, groups=d, stride 1) with bias; got h {h.dtype} {tuple(h.shape)}, {conv}")
    if torch.is_grad_enabled() and (h.requires_grad or conv.weight.requires_grad or conv.bias.requires_grad):
        raise RuntimeError("cpu.positional_conv has no backward: it is the inference path's kernel")
    h = h.contiguous()
    b, c, n, d = h.shape
    kh, kw = conv.kernel_size
    w = conv.weight.detach()[:, 0].permute(1, 2, 0).contiguous()  # (kh, kw, d)
    bias = conv.bias.detach().contiguous()
    out = torch.empty_like(h)
    _ext.pos_conv_f32(h.data_ptr(), w.data_ptr(), bias.data_ptr(), out.data_ptr(), b, c, n, d, kh, kw,
                      conv.padding[0], conv.padding[1], threads)
    return out
