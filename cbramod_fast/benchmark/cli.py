"""`cbramod-fast bench`: latency / throughput / FLOP utilisation of the encoder, ours vs a reference.

The measurement itself is :mod:`.harness` (definitions in its docstring); results are written by
:mod:`.report`. ``bench/bench_encoder.py`` runs the same harness as a pytest-benchmark suite.
"""

from __future__ import annotations

import argparse
import sys

from ..model.config import PRESETS
from .config import AUTO_BUDGET_S, AUTO_MAX, AUTO_MIN, COMPILE_TAGS, config_from_args
from .harness import run_bench
from .report import cpu_path_lines, markdown_header, markdown_table, summary_table, write_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--shapes", default="19x30", help="CxN list: channels x 1-s patches (default: 19x30)")
    p.add_argument("--batch", default="1,8", help="batch sizes (default: 1,8)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (low precision = autocast; default: "
                   "fp32,bf16)")
    p.add_argument("--backend", default=None, help="fast-model backends: torch, triton (default: torch)")
    p.add_argument("--mode", default="infer", help="infer (forward) and/or train (training step)")
    p.add_argument("--original", metavar="PATH", help="checkout of github.com/wjq-learning/CBraMod to compare too")
    p.add_argument("--preset", default="base", help=f"model preset: {', '.join(PRESETS)} (default: base)")
    p.add_argument("--repeats", type=int, default=0, help=f"timed rounds per group (default 0 = auto: ~"
                   f"{AUTO_BUDGET_S:.0f} s, {AUTO_MIN}..{AUTO_MAX} rounds)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (>= 1; default 1)")
    p.add_argument("--out", default="bench/results", help="output folder for JSON / markdown / PNG")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default 0 = auto: cores not "
                   "busy per the 1-min load average)")
    p.add_argument("--plot", action="store_true", help="also write a latency-vs-batch PNG")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (first call reported)")
    p.add_argument("--variants", metavar="LIST", help="explicit variants instead of --backend x --dtype: "
                   "MODEL:DTYPE[:TAG] with MODEL reference, original, torch or triton and TAG "
                   f"{', '.join(COMPILE_TAGS)} (e.g. reference:fp32,reference:bf16:compile,triton:bf16)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # Written after every group too: a run stopped by a time limit keeps the groups it finished.
    doc = run_bench(cfg, on_group=lambda partial: write_results(partial, cfg.out))
    paths = write_results(doc, cfg.out, plot=cfg.plot)
    print(markdown_header(doc))
    print()
    print(markdown_table(doc))
    if cpu_path_lines(doc):
        print()
        print(cpu_path_lines(doc))
    if doc.get("summary"):
        print()
        print(summary_table(doc["summary"]))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    failed = [f"{r['variant']} {r['dtype']} ({r['mode']} {r['channels']}x{r['patches']} batch {r['batch']}): "
              f"{r['failed']}" for r in doc["results"] if r.get("failed")]
    for line in failed:
        print(f"cbramod-fast bench: failed variant: {line}", file=sys.stderr)
    return 1 if failed else 0


COMMANDS = {"bench": (add_arguments, run)}
