"""`cbramod-fast` command line: a thin dispatcher over the package's modules.

Each subcommand lives in the module that does the work; that module exposes ``COMMANDS``, a dict
``name -> (add_arguments(parser), run(args) -> int)``. Modules are imported only when their command
runs, so ``cbramod-fast bench`` does not pay for the corpus readers and vice versa. Errors a user can fix
(:class:`cbramod_fast.errors.UsageError`, a missing file) are printed as one line with exit code 2;
``CBRAMOD_FAST_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UsageError

# name -> (module, one-line help). Order is the data path: corpus -> pretrain -> fusion, then the benchmark.
_COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": ("cbramod_fast.corpus.cli", "build / merge / inspect an ECG pretraining corpus"),
    "pretrain": ("cbramod_fast.pretrain.cli", "dual-masking ECG pretraining (default: the shipped real-ECG demo)"),
    "export": ("cbramod_fast.pretrain.cli", "write a pretraining run's encoder as an original-layout state dict"),
    "evaluate": ("cbramod_fast.fusion.cli", "subject-independent EEG+ECG fusion evaluation"),
    "predict": ("cbramod_fast.fusion.cli", "predict with a saved fusion model"),
    "bench": ("cbramod_fast.benchmark.cli", "latency / throughput report of the encoder"),
}


def _top_help() -> str:
    lines = ["usage: cbramod-fast COMMAND [options]   (cbramod-fast COMMAND -h for its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    name = argv[0]
    if name not in _COMMANDS:
        print(f"cbramod-fast: error: unknown command {name!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[name][0])
    add_arguments, run = module.COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"cbramod-fast {name}", description=_COMMANDS[name][1])
    add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(run(args) or 0)
    except (UsageError, FileNotFoundError) as exc:
        if os.environ.get("CBRAMOD_FAST_DEBUG"):
            raise
        print(f"cbramod-fast {name}: error: {exc}", file=sys.stderr)
        return 2

