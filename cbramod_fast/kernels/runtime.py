"""What the Triton kernel modules share about where and how their kernels run: interpreter detection,
the device a kernel runs on, a clear error for CPU tensors, and the register use of compiled kernels.

Importable without Triton (it is imported lazily), and importing nothing else of the package.
"""

from __future__ import annotations

import os

import torch


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
    """One row per compiled specialisation of ``jit_functions``: kernel, num_warps, num_stages, shared
    memory, n_regs, n_spills. Empty under the interpreter, which compiles nothing."""
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
