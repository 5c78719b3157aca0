"""Atomic file writes: readers see the old file or the complete new one, never half of it.

Every file the package writes (corpus shards and manifests, checkpoints, metrics, plots, results) goes
through :func:`atomic_write`: the content is written to a temporary file beside the target, flushed to disk
and renamed over it. A crash leaves at most a stray ``*.tmp`` file, which corpus builds remove on resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary path beside ``path``, which is then fsynced and renamed to ``path``.

    The temporary name ends in ``.tmp`` (callers that pick a format by suffix, e.g. ``savefig``, must pass
    it) and carries the process id, so concurrent writers of one file do not share it.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # durable before it becomes visible (a resume point must not vanish)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
