"""Attention and masking kernels. ``backend`` picks the implementation; ``reference.py`` is the
PyTorch twin used on CPU and as the reference in tests and benchmarks.

Precision on CUDA: the Triton attention computes fp32 inputs with IEEE fp32 dots (never TF32). The rest
of the model runs on cuDNN / cuBLAS with PyTorch's defaults, which this package does not change (it sets
no global torch configuration): cuDNN convolutions, i.e. the patch embedding's convs, run in TF32 on
Ampere and newer GPUs (``torch.backends.cudnn.allow_tf32`` is True by default, as in the original
CBraMod; TF32 keeps 10 mantissa bits, so fp32 outputs are expected to move by ~1e-3), while matmuls stay
fp32 (``torch.backends.cuda.matmul.allow_tf32`` is False by default). For fp32 parity with the CPU, as
the fixture tests do, set ``torch.backends.cudnn.allow_tf32 = False``.
"""

from __future__ import annotations

import torch

from . import reference
from .runtime import kernel_device, require_kernel_device, triton_interpreting

__all__ = ["BACKENDS", "compiled_kernel_stats", "criss_cross_attention", "criss_cross_attention_packed",
           "kernel_device", "require_kernel_device", "resolve_backend", "triton_available",
           "triton_interpreting"]

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


def compiled_kernel_stats() -> list[dict]:
    """Every compiled Triton kernel of this package with num_warps, num_stages, shared memory, n_regs and
    n_spills, for a GPU check to print; empty under the interpreter, which compiles nothing."""
    from . import criss_cross, masking_kernel

    return criss_cross.compiled_kernel_stats() + masking_kernel.compiled_kernel_stats()


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
