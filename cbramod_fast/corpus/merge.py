"""Join finished corpora (typically the ``--part i/n`` builds of several machines) by writing one manifest.

No shard is copied: the merged manifest names the parts' shard files by paths relative to the merged
folder, so the parts must stay where they are (or be moved together with it). Window ids of the merged
corpus run through the parts in order (``--part`` parts sorted by ``i``), so merging all parts of a split
build gives the same windows, in the same order, as one build of the whole file list.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .build import MANIFEST, REJECT_REASONS, _Stats, write_json

# settings that must agree for windows to be interchangeable (``sources`` may differ between parts)
_MUST_MATCH = ("leads", "fs", "window_patches", "dtype", "scale", "shape")


def read_manifest(corpus: str | Path) -> dict:
    path = Path(corpus) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{corpus}: no {MANIFEST} (not a finished corpus)")
    return json.loads(path.read_text())


def merge_corpora(parts: list[str | Path], out: str | Path, overwrite: bool = False) -> dict:
    """Write ``out/manifest.json`` joining the corpora ``parts``; returns the merged manifest."""
    if not parts:
        raise ValueError("corpus merge: no parts given")
    out = Path(out)
    parts = [Path(p) for p in parts]
    mans = [read_manifest(p) for p in parts]
    for p, m in zip(parts, mans):
        for key in _MUST_MATCH:
            if m[key] != mans[0][key]:
                raise ValueError(f"corpus merge: {p} has {key}={m[key]!r} but {parts[0]} has {mans[0][key]!r}")
    split = [tuple(m.get("part", (0, 1))) for m in mans]
    if any(n > 1 for _, n in split):
        # parts of one split build: all n parts of the same sources and settings, each exactly once
        n = split[0][1]
        if any(s[1] != n for s in split) or any(m["sources"] != mans[0]["sources"] or m["config"] != mans[0]["config"]
                                                 for m in mans):
            raise ValueError("corpus merge: --part builds to merge must share sources, settings and n")
        have = sorted(i for i, _ in split)
        if have != list(range(n)):
            missing = sorted(set(range(n)) - set(have))
            dup = sorted({i for i in have if have.count(i) > 1})
            raise ValueError(f"corpus merge: parts of a {n}-way build: missing {missing}, duplicated {dup}")
        order = sorted(range(len(parts)), key=lambda k: split[k][0])
        parts, mans = [parts[k] for k in order], [mans[k] for k in order]

    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file() and not overwrite:
        raise ValueError(f"{out} already has a {MANIFEST}; pass --overwrite to replace it")
    sources: list[str] = []
    seen: set[tuple[str, str]] = set()
    shards, records, skipped = [], [], []
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    counts = {"files": 0, "records": 0, "skipped_files": 0, "windows": 0, "flat_leads_masked": 0}
    stats = _Stats(len(mans[0]["leads"]))
    offset = 0
    for p, m in zip(parts, mans):
        remap = {}
        for i, s in enumerate(m["sources"]):
            if s not in sources:
                sources.append(s)
            remap[i] = sources.index(s)
        for sh in m["shards"]:
            shards.append({"x": os.path.relpath(p / sh["x"], out), "present": os.path.relpath(p / sh["present"], out),
                           "n": sh["n"]})
        for r in m["records"]:
            key = (sources[remap[r["source"]]], r["file"])
            if key in seen:
                raise ValueError(f"corpus merge: {key[1]} (source {key[0]}) is in more than one part")
            seen.add(key)
            records.append({**r, "source": remap[r["source"]], "first": r["first"] + offset})
        skipped += [{**s, "source": remap[s["source"]]} for s in m["skipped"]]
        for reason in REJECT_REASONS:
            rejected[reason] += m["counts"]["rejected"][reason]
        for key in counts:
            counts[key] += m["counts"][key]
        st = _Stats.from_dict(m["lead_sums"])
        stats.n += st.n
        stats.s += st.s
        stats.ss += st.ss
        stats.absmax = np.maximum(stats.absmax, st.absmax)
        offset += m["n_windows"]
    first = mans[0]
    fp = hashlib.sha256("".join(m["fingerprint"] for m in mans).encode()).hexdigest()
    merged = {
        **{k: first[k] for k in ("format", "config", "leads", "fs", "patch", "window_patches", "shape", "dtype",
                                 "scale")},
        "fingerprint": fp, "sources": sources, "part": [0, 1],
        "merged_from": [os.path.relpath(p, out) for p in parts],
        "shards": shards, "n_windows": offset,
        "counts": {**counts, "rejected": rejected, "windows_per_lead": stats.n.tolist()},
        "lead_stats": stats.summary(first["leads"], first["window_patches"] * first["patch"]),
        "lead_sums": stats.to_dict(), "records": records, "skipped": skipped,
    }
    write_json(merged, out / MANIFEST)
    return merged
