"""Attention and masking kernels. ``backend`` picks the implementation; ``reference.py`` is the
PyTorch twin used on CPU and as the reference in tests and benchmarks."""

from __future__ import annotations

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


def criss_cross_attention(qkv_s: torch.Tensor, qkv_t: torch.Tensor, heads: int, dropout_p: float = 0.0,
                          training: bool = False, backend: str = "torch") -> torch.Tensor:
    """Dispatch the criss-cross attention (contract in ``reference.py``) to ``backend``."""
    if backend == "triton":
        from .criss_cross import criss_cross_attention_triton

        return criss_cross_attention_triton(qkv_s, qkv_t, heads, dropout_p, training)
    return reference.criss_cross_attention(qkv_s, qkv_t, heads, dropout_p, training)
