"""`seedlm bench`: run the CPU benchmarks beside their baselines and rewrite the README's result tables.

The benchmarks are scripts in a source checkout's `benchmarks/`, not part of the installed package (they
compare against transformers' reference models and time whole `seedlm train` processes). This command
runs `benchmarks/run_benchmarks.py` of the checkout it belongs to, as a subprocess with the same options;
from an installed wheel it says that it needs a checkout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout's root when seedlm runs from one
RUNNER = REPO / "benchmarks" / "run_benchmarks.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "the benchmarks and what each compares: python benchmarks/run_benchmarks.py --help"
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these benchmarks (gated_moe, delta_product, data_pipeline, trainer, "
                             "scaling); None: all of them")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (a few minutes in all, mostly process start-ups): prints the tables, "
                             "writes nothing unless --readme")
    parser.add_argument("--readme", type=Path, default=None, metavar="PATH",
                        help="README whose bench blocks are rewritten; None: the checkout's README.md, "
                             "or with --smoke no README")


def run(args: argparse.Namespace) -> int:
    import subprocess
    import sys

    if not RUNNER.is_file():
        print(f"seedlm bench: the benchmarks are scripts of a source checkout (benchmarks/), not part of the "
              f"installed package; there is no {RUNNER}. Clone the repository and run `seedlm bench` or "
              f"`make bench` there.", file=sys.stderr)
        return 2
    argv = []
    if args.only:
        argv += ["--only", *args.only]
    if args.smoke:
        argv.append("--smoke")
    if args.readme is not None:
        argv += ["--readme", str(args.readme)]
    return subprocess.run([sys.executable, str(RUNNER), *argv]).returncode
