"""Render the benchmark tables from the committed ``bench/results/*.json`` files.

    python bench/report.py            # rewrite the generated blocks of README.md and docs/benchmarks.md
    python bench/report.py --check    # exit 1 if one is not what the result files say

Run it after committing new result files (bench/results/*.json) and commit the two documents with them;
``tests/test_benchmark.py`` checks them against the result files as committed.

Generated blocks, each between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` wherever a document has one:
``bench-cpu-classes`` (one row per CPU class: our fp32 / bf16 model against the original, from the runs made
with ``--original``; the README's headline table) and ``bench-results`` (every result file in full). Only
``cbramod-fast bench`` result files (schema ``cbramod-fast-bench/1``) are rendered; the full tables are the
same ``markdown_table`` the CLI prints, so no number in either document is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from cbramod_fast.atomic import atomic_text
from cbramod_fast.benchmark.config import SCHEMA
from cbramod_fast.benchmark.report import (
    cpu_path_lines,
    device_label,
    markdown_header,
    markdown_table,
    result_stem,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
DOCUMENTS = ("README.md", "docs/benchmarks.md")  # each holds one or more of the generated blocks


def _keep(docs: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    docs = [(p, d) for p, d in docs if isinstance(d, dict) and d.get("schema") == SCHEMA]

    # CPU first, then GPUs; the default command's result first, then other shapes, training, the original
    def key(pd: tuple[Path, dict]) -> tuple:
        a = pd[1]["args"]
        return (pd[1]["device"]["type"] != "cpu", bool(a.get("original")), a["modes"] != ["infer"],
                a["shapes"] != [[19, 30]], result_stem(pd[1]))

    docs.sort(key=key)
    return docs


def load_results(folder: Path = RESULTS) -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(folder.glob("*.json")):
        try:
            docs.append((path, json.loads(path.read_text())))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}: not valid JSON ({exc})") from exc
    return _keep(docs)


def load_committed(root: Path = ROOT) -> list[tuple[Path, dict]] | None:
    """The result files as committed at HEAD (None outside a git checkout): what the documents must show,
    whatever fresh uncommitted runs left in bench/results."""
    try:
        names = subprocess.run(["git", "ls-files", "bench/results/*.json"], cwd=root, capture_output=True,
                               text=True, check=True, timeout=30).stdout.split()
        docs = [(root / n, json.loads(subprocess.run(["git", "show", f"HEAD:{n}"], cwd=root, capture_output=True,
                                                     text=True, check=True, timeout=30).stdout)) for n in names]
    except (OSError, subprocess.SubprocessError):
        return None
    return _keep(docs)


def _link(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def render(docs: list[tuple[Path, dict]], base: Path = DOCS.parent) -> str:
    """Every result file: heading, run header, full table and plot; links relative to ``base``."""
    if not docs:
        return "No result files yet: run `cbramod-fast bench` and then `python bench/report.py`."
    parts = []
    for path, doc in docs:
        a = doc["args"]
        rel = _link(path, base)
        shapes = ", ".join(f"{c}×{n}" for c, n in a["shapes"])
        title = (f"#### {device_label(doc['device'])} — {', '.join(a['modes'])} {shapes}, preset `{a['preset']}`"
                 f"{' vs the original' if a.get('original') else ''} "
                 f"([`{path.name}`]({rel}))")
        parts += [title, "", markdown_header(doc), "", markdown_table(doc), ""]
        if cpu_path_lines(doc):
            parts += [cpu_path_lines(doc), ""]
        png = path.with_suffix(".png")
        if png.is_file():
            parts += [f"![p50 latency vs batch]({_link(png, base)})", ""]
    return "\n".join(parts).rstrip()


# The per-CPU-class table: (column heading, shape, batch, our dtype, the original's dtype); a cell is the
# original's p50 / ours, both eager, from one run.
CLASS_CELLS = (
    ("fp32 19×30 B=1", (19, 30), 1, "fp32", "fp32"),
    ("fp32 19×30 B=8", (19, 30), 8, "fp32", "fp32"),
    ("fp32 12×10 B=1", (12, 10), 1, "fp32", "fp32"),
    ("fp32 12×10 B=8", (12, 10), 8, "fp32", "fp32"),
    ("bf16 19×30 B=8 vs original bf16", (19, 30), 8, "bf16", "bf16"),
    ("bf16 19×30 B=8 vs original fp32", (19, 30), 8, "bf16", "fp32"),
)


def cpu_class(path: Path) -> str | None:
    """A result file's CPU class, from its name (``cpu-zen4_...`` -> ``cpu-zen4``); None for GPUs."""
    slug = path.stem.split("_", 1)[0]
    return slug if slug == "cpu" or slug.startswith("cpu-") else None


def class_cells(doc: dict) -> list[float | None]:
    """:data:`CLASS_CELLS` of one result document: the original's p50 / ours (None: not timed)."""
    p50 = {(r["model"], r["channels"], r["patches"], r["batch"], r["dtype"]): r["latency_s"]["p50"]
           for r in doc["results"] if r["mode"] == "infer" and not r.get("compile") and r["latency_s"]
           and r["model"] in ("fast", "original")}
    cells = []
    for _, (c, n), b, ours, theirs in CLASS_CELLS:
        mine, orig = p50.get(("fast", c, n, b, ours)), p50.get(("original", c, n, b, theirs))
        cells.append(orig / mine if mine and orig else None)
    return cells


def render_cpu_classes(docs: list[tuple[Path, dict]], base: Path = ROOT) -> str:
    """One row per CPU class with result files: the run against the original with the most cells filled (then
    the most torch threads, then the newest), so every number in a row comes from one file, one thread count
    and one machine state."""
    head = " | ".join(h for h, *_ in CLASS_CELLS)
    lines = [f"| CPU | {head} | torch threads | result file |",
             "|---|" + "---:|" * len(CLASS_CELLS) + "---:|---|"]
    classes: dict[str, list[tuple[Path, dict]]] = {}
    for path, doc in docs:
        if cpu_class(path) and doc["device"]["type"] == "cpu":
            classes.setdefault(cpu_class(path), []).append((path, doc))
    for slug in sorted(classes):
        runs = [(sum(v is not None for v in class_cells(d)), d["device"]["torch_threads"], d["created"], p, d)
                for p, d in classes[slug] if d["args"].get("original")]
        best = max(runs, key=lambda t: t[:3]) if runs else (0, 0, None, None, classes[slug][0][1])
        filled, _, _, path, doc = best
        if not filled:
            dashes = " | ".join("–" for _ in CLASS_CELLS)
            lines.append(f"| {device_label(doc['device'])} | {dashes} | – | no run with `--original` yet |")
            continue
        cells = " | ".join("–" if v is None else f"{v:.2f}" for v in class_cells(doc))
        lines.append(f"| {device_label(doc['device'])} | {cells} | {doc['device']['torch_threads']} | "
                     f"[`{path.stem}`]({_link(path, base)}) |")
    if len(lines) == 2:
        return ("No CPU result files yet: run `cbramod-fast bench --original PATH` and then "
                "`python bench/report.py`.")
    return "\n".join(lines)


RENDERERS = {"bench-cpu-classes": render_cpu_classes, "bench-results": render}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def splice(text: str, body: str, begin: str, end: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def expected(docs: list[tuple[Path, dict]], root: Path = ROOT) -> dict[Path, str]:
    """What README.md and docs/benchmarks.md must hold for the result files ``docs``: every generated block
    a document has, rendered with links relative to that document."""
    out = {}
    for name in DOCUMENTS:
        path = root / name
        text = path.read_text()
        found = [b for b in RENDERERS if markers(b)[0] in text]
        if not found:
            raise SystemExit(f"{name}: no generated block ({', '.join(RENDERERS)})")
        for block in found:
            text = splice(text, RENDERERS[block](docs, path.parent), *markers(block))
        out[path] = text
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a document is stale instead of writing it")
    args = p.parse_args(argv)
    docs = load_results()
    stale = [path for path, text in expected(docs).items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: benchmark tables are stale: run `python bench/report.py`",
                  file=sys.stderr)
        return 1 if stale else 0
    for path, text in expected(docs).items():
        if path in stale:
            atomic_text(path, text)
    print(f"{len(docs)} result file(s) rendered into {', '.join(DOCUMENTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
