"""Render the README's benchmark results from the committed ``bench/results/*.json`` files.

    python bench/report.py            # rewrite README.md between the bench-results markers
    python bench/report.py --check    # exit 1 if README.md is not what the result files say

Run it after committing new result files (bench/results/*.json) and commit README.md with them;
``tests/test_bench.py`` checks the README against the result files as committed.

Only ``cbramod-fast bench`` result files (schema ``cbramod-fast-bench/1``) are rendered; the tables are the
same ``markdown_table`` the CLI prints, so no number in the README is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from cbramod_fast.bench import SCHEMA, device_label, markdown_header, markdown_table, result_stem

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- BEGIN bench-results -->", "<!-- END bench-results -->"


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
            raise SystemExit(f"{path}: not valid JSON ({exc})")
    return _keep(docs)


def load_committed(root: Path = ROOT) -> list[tuple[Path, dict]] | None:
    """The result files as committed at HEAD (None outside a git checkout): what the README must show,
    whatever fresh uncommitted runs left in bench/results."""
    try:
        names = subprocess.run(["git", "ls-files", "bench/results/*.json"], cwd=root, capture_output=True,
                               text=True, check=True, timeout=30).stdout.split()
        docs = [(root / n, json.loads(subprocess.run(["git", "show", f"HEAD:{n}"], cwd=root, capture_output=True,
                                                     text=True, check=True, timeout=30).stdout)) for n in names]
    except (OSError, subprocess.SubprocessError):
        return None
    return _keep(docs)


def render(docs: list[tuple[Path, dict]], root: Path = ROOT) -> str:
    if not docs:
        return "No result files yet: run `cbramod-fast bench` and then `python bench/report.py`."
    parts = []
    for path, doc in docs:
        a = doc["args"]
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        shapes = ", ".join(f"{c}×{n}" for c, n in a["shapes"])
        title = (f"#### {device_label(doc['device'])} — {', '.join(a['modes'])} {shapes}, preset `{a['preset']}`"
                 f"{' vs the original' if a.get('original') else ''} "
                 f"([`{rel}`]({rel}))")
        parts += [title, "", markdown_header(doc), "", markdown_table(doc), ""]
        png = path.with_suffix(".png")
        if png.is_file():
            prel = png.relative_to(root).as_posix() if png.is_relative_to(root) else png.name
            parts += [f"![p50 latency vs batch]({prel})", ""]
    return "\n".join(parts).rstrip()


def splice(readme: str, body: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is stale instead of writing it")
    args = p.parse_args(argv)
    old = README.read_text()
    new = splice(old, render(load_results()))
    if args.check:
        if new != old:
            print("README.md benchmark results are stale: run `python bench/report.py`", file=sys.stderr)
            return 1
        return 0
    if new != old:
        tmp = README.with_name(README.name + ".tmp")
        tmp.write_text(new)
        os.replace(tmp, README)
    print(f"README.md: {len(load_results())} result file(s) rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
