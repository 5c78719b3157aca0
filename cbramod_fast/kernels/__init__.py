"""Attention and masking kernels. ``backend`` picks the implementation; ``reference.py`` is the
PyTorch twin used on CPU and as the reference in tests and benchmarks.

Precision on CUDA: the Triton attention computes fp32 inputs with IEEE fp32 dots (never TF32). The rest
of the model runs on cuDNN / cuBLAS with PyTorch's defaults, which this package does not change (it sets
no global torch configuration): cuDNN convolutions, i.e. the patch embedding's convs, run in TF32 on
Ampere and newer GPUs (``torch.backends.cudnn.allow_tf32`` is True by default, as in the original
CBraMod; TF32 keeps 10 mantissa bits, so fp32 outputs are expected to move by ~1e-3), while matmuls stay
fp32 (``torch.backends.cuda.matmul.allow_tf32`` is False by default). For fp32 parity with the CPU (the fixture tests do this) set
``torch.backends.cudnn.allow_tf32 = False``.
"""

from __future__ import annotations

import os

import torch

from . import reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``auto`` -> Triton on CUDA (when importable), the PyTorch path elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    return backend


def triton_available() -> bool:
    try:
        from . import criss_cross  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``). Not traceable by
    Dynamo (Triton reads the variable in C++): callers skip it while compiling."""
    try:
        import triton
    except ImportError:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 parses the variable as the decorator does
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def kernel_device(device: torch.device | str | None, *sources) -> torch.device:
    """Where a Triton kernel runs: ``device`` when given, else the first of ``sources`` (tensors or
    generators, None skipped) that is not on the CPU, else the current CUDA device; the CPU only under the
    interpreter (the one place Triton accepts CPU tensors). CPU sources, e.g. a seed tensor or a
    ``torch.Generator``, are then moved (or their draw is) to that device."""
    if device is not None:
        return torch.device(device)
    for source in sources:
        if source is not None and source.device.type != "cpu":
            return source.device
    if torch.cuda.is_available() and (torch.compiler.is_compiling() or not triton_interpreting()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def require_kernel_device(device: torch.device, what: str) -> None:
    """A clear error instead of Triton's when a kernel would get CPU tensors outside the interpreter."""
    if device.type == "cpu" and not torch.compiler.is_compiling() and not triton_interpreting():
        raise ValueError(f"{what}: the Triton kernels need CUDA tensors, got a tensor on {device}; use "
                         f"backend='torch' on CPU (or set TRITON_INTERPRET=1 before triton is imported)")


def compiled_kernel_stats(*jit_functions) -> list[dict]:
    """One row per compiled specialisation of ``jit_functions`` (all of this package's kernels when none
    are given): kernel, num_warps, num_stages, shared memory, n_regs, n_spills. Empty under the interpreter,
    which compiles nothing."""
    if not jit_functions:
        from . import criss_cross, masking_kernel

        return criss_cross.compiled_kernel_stats() + masking_kernel.compiled_kernel_stats()
    rows = []
    for fn in jit_functions:
        # device_caches: device -> (kernel_cache, ...); the tuple's length differs between Triton
        # releases, the kernel cache (specialisation key -> CompiledKernel) is its first entry in all.
        for entry in getattr(fn, "device_caches", {}).values():
            for compiled in list(entry[0].values()):
                meta = getattr(compiled, "metadata", None)
                if meta is None:  # an unfinished asynchronous compile
                    continue
                if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
                    compiled._init_handles()  # register counts are read when the binary is loaded
                rows.append({"kernel": getattr(fn, "__name__", str(fn)), "name": compiled.name,
                             "num_warps": meta.num_warps, "num_stages": getattr(meta, "num_stages", None),
                             "shared": getattr(meta, "shared", None), "n_regs": getattr(compiled, "n_regs", None),
                             "n_spills": getattr(compiled, "n_spills", None)})
    return rows


def _use_triton(backend: str, device: torch.device) -> bool:
    return resolve_backend(backend, device) == "triton"


def criss_cross_attention(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int, dropout_p: float = 0.0,
                          training: bool = False, backend: str = "torch") -> torch.Tensor:
    """Dispatch the criss-cross attention (contract in ``reference.py``) to ``backend``."""
    if _use_triton(backend, qkv_s.device):
        from .criss_cross import criss_cross_attention_triton

        return criss_cross_attention_triton(qkv_s, qkv_t, heads, dropout_p, training)
    return reference.criss_cross_attention(qkv_s, qkv_t, heads, dropout_p, training)


def criss_cross_attention_packed(qkv: torch.Tensor, heads: int, dropout_p: float = 0.0, training: bool = False,
                                 backend: str = "torch") -> torch.Tensor:
    """``criss_cross_attention(qkv[0], qkv[1], ...)`` for the encoder's ``(2, B, C, N, 3*D/2)`` batched-GEMM
    output, with one gradient tensor for ``qkv`` instead of autograd's two zero-filled select-backward
    buffers and their sum. Same results as the two-tensor op, on every backend."""
    if _use_triton(backend, qkv.device):
        from .criss_cross import criss_cross_attention_triton_packed

        return criss_cross_attention_triton_packed(qkv, heads, dropout_p, training)
    return reference.criss_cross_attention_packed(qkv, heads, dropout_p, training)
