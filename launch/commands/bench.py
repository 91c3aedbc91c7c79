"""`seedlm bench`: run the CPU benchmarks beside their baselines and rewrite the README's result tables.

The benchmarks are scripts in a source checkout's `benchmarks/`, not part of the installed package (they
compare against transformers' reference models and time whole `seedlm train` processes). In a checkout this
command takes its options from `benchmarks/run_benchmarks.py` (one definition for both) and runs it; from an
installed wheel it says that it needs a checkout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout's root when seedlm runs from one
RUNNER = REPO / "benchmarks" / "run_benchmarks.py"


def load_runner():
    """This checkout's benchmarks/run_benchmarks.py as a module, or None (an installed wheel has no checkout)."""
    import importlib

    if not RUNNER.is_file():
        return None
    if str(REPO) not in sys.path:  # appended: makes `benchmarks` importable without shadowing anything installed
        sys.path.append(str(REPO))
    return importlib.import_module("benchmarks.run_benchmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    runner = load_runner()
    if runner is not None:
        runner.add_arguments(parser)
    else:  # an installed wheel: no options to know; take every argument as it comes so that run() says why
        parser.prefix_chars = ""  # "--smoke" is then an argument here, not an unknown option
        parser.add_argument("runner_args", nargs="*", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    runner = load_runner()
    if runner is None:
        print(f"seedlm bench: the benchmarks are scripts of a source checkout (benchmarks/), not part of the "
              f"installed package; there is no {RUNNER}. Clone the repository and run `seedlm bench` or "
              f"`make bench` there.", file=sys.stderr)
        return 2
    return runner.run(args)
