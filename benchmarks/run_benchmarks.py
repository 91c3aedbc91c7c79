"""Every CPU benchmark beside its baseline in one run, tables rewritten into the README (`seedlm bench`).

`seedlm bench [--only NAME ...] [--smoke] [--rounds N] [--readme PATH]` takes its options from this file
(`add_arguments`) and runs `run` in a source checkout, so the README's tables name that command;
`python benchmarks/run_benchmarks.py` is the same run.

Each benchmark is a script under `benchmarks/` exposing `parse_args(argv)` (with `--smoke` and `--rounds`),
`measure(args) -> dict` and `report(result, peak_flops) -> str` (markdown); this script runs them in turn,
each measure() in a fresh process (measure_in_child), after measuring the machine's fp32 matmul peak once (the
floors' denominator), prints every table and replaces the text between `<!-- bench:NAME -->` and `<!--
/bench:NAME -->` in the README with it. Nothing outside those markers is touched, so hand-written prose around
the tables stays as it is. Each benchmark times its baseline and its own path in turn over the rounds and
reports every ratio as min / median / max over them (benchmarks/rounds.py); results from different CPUs differ
(an AMD EPYC and an Intel Xeon of the same size differ ~2x in % of peak), so a block says on which machine it
was measured.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: `benchmarks.*` and this checkout's seedlm
    sys.path.insert(0, str(REPO))

from benchmarks.rounds import ROUNDS, SMOKE_ROUNDS, add_rounds_argument, resolve_rounds  # noqa: E402

# (name, module under benchmarks/, what it compares against what)
BENCHMARKS = [
    ("gated_moe", "bench_gated_moe", "gated-attention MoE training step vs transformers' Qwen3-MoE"),
    ("delta_product", "bench_delta_product",
     "DeltaProduct chunk kernel vs our recurrence and transformers' chunked gated delta rule"),
    ("data_pipeline", "bench_data_pipeline", "data pipeline throughput vs a training step's consumption"),
    ("trainer", "bench_trainer", "seedlm train vs a bare PyTorch loop; per-rank memory of ZeRO 0-3"),
    ("scaling", "bench_scaling", "1 vs 2 ranks, expert parallel 1 vs 2; kernel time against sequence length"),
    ("loss_memory", "bench_loss_memory", "LM head + loss, fused vs plain: bytes saved for backward, time"),
    ("delta_product_memory", "bench_delta_product_memory",
     "DeltaProduct kernel and block vs attention: bytes saved for backward, time"),
    ("activation_checkpointing", "bench_activation_checkpointing",
     "activation checkpointing none / full / selective: saved bytes, step time"),
    ("startup_memory", "bench_startup_memory",
     "ZeRO-3 peak memory per rank: whole model then partitioned vs meta device, layer by layer"),
    ("checkpoint_save", "bench_checkpoint_save",
     "training time lost per checkpoint save: background (async_save) vs synchronous"),
    ("host_allocator", "bench_host_allocator",
     "glibc's self-raising mmap threshold vs seedlm's fixed 1 MiB: peak RSS per rank, tokens/s"),
]
NAMES = [name for name, _, _ in BENCHMARKS]
PLOT = Path("benchmarks") / "results" / "scaling_seq_len.png"  # relative to the README's folder


class BenchError(ValueError):
    """A README without the blocks to rewrite."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def check_blocks(text: str, names: list[str], where: str) -> None:
    """Raise BenchError unless each name has exactly one start marker followed by one end marker."""
    problems = []
    for name in names:
        start, end = markers(name)
        n_start, n_end = text.count(start), text.count(end)
        if n_start == 0 and n_end == 0:
            problems.append(f"no block for {name!r}: add the lines {start} and {end} where its tables go")
        elif n_start != 1 or n_end != 1:
            problems.append(f"block {name!r} needs exactly one {start} and one {end} (found {n_start} and {n_end})")
        elif text.index(end) < text.index(start):
            problems.append(f"block {name!r}: {end} comes before {start}")
    if problems:
        raise BenchError(f"{where}: " + "; ".join(problems))


def rewrite_block(text: str, name: str, content: str) -> str:
    """`text` with everything between the markers of block `name` replaced by `content` on its own lines."""
    check_blocks(text, [name], "README")
    start, end = markers(name)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content.strip(chr(10))}\n{end}{tail}"


def read_exact(path: Path) -> str:
    """The file's text with its line endings as they are (no newline translation), so writes keep its bytes."""
    return path.read_bytes().decode("utf-8")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Line breaks kept in the description and the list of benchmarks; each option's default shown."""


def benchmark_name(text: str) -> str:
    """argparse type of --only: one of NAMES, or a message naming the closest one and all of them."""
    if text in NAMES:
        return text
    close = difflib.get_close_matches(text, NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise argparse.ArgumentTypeError(f"no benchmark {text!r}{hint}; the benchmarks: {', '.join(NAMES)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `seedlm bench` and of this script (one definition for both)."""
    width = max(len(name) for name in NAMES)
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {name:{width}s}  {what}" for name, _, what in BENCHMARKS)
    parser.add_argument("--only", nargs="+", type=benchmark_name, metavar="NAME",
                        help="run only these benchmarks (listed below); None: all of them")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (a few minutes in all, mostly process start-ups): prints the tables, "
                             "writes nothing unless --readme")
    add_rounds_argument(parser)
    parser.add_argument("--readme", type=Path, default=None, metavar="PATH",
                        help="README whose bench blocks are rewritten; None: the checkout's README.md, "
                             "or with --smoke no README")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/run_benchmarks.py", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    parts = ["seedlm bench"]
    if args.only:
        parts.append("--only " + " ".join(args.only))
    if args.smoke:
        parts.append("--smoke")
    if args.rounds != (SMOKE_ROUNDS if args.smoke else ROUNDS):
        parts.append(f"--rounds {args.rounds}")
    return " ".join(parts)


def _measure(module_name: str, argv: list[str]) -> dict:
    import importlib

    module = importlib.import_module(f"benchmarks.{module_name}")
    return module.measure(module.parse_args(argv))


def measure_in_child(module_name: str, argv: list[str]) -> dict:
    """One benchmark's measure() in a fresh process, its result sent back. Run in this process, what the
    in-process benchmarks allocate stays in it (glibc keeps freed heap, the allocator's caches): on a 24 GiB
    machine the runner held 12.8 GB by the checkpoint benchmark, whose two ranks then ran it out of memory."""
    from concurrent.futures import ProcessPoolExecutor

    from benchmarks.fresh_process import fresh_process_context

    context = fresh_process_context("seedlm", "benchmarks.floors", "benchmarks.rounds")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_measure, module_name, argv).result()


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks (args from add_arguments), print each block and rewrite it in the README."""
    import importlib
    import time

    if str(REPO) not in sys.path:  # the benchmarks import `benchmarks.*` and this checkout's seedlm
        sys.path.insert(0, str(REPO))
    rounds = resolve_rounds(args)
    names = [n for n in NAMES if not args.only or n in args.only]
    readme = args.readme if args.readme is not None else (None if args.smoke else REPO / "README.md")
    try:
        if readme is not None:  # fail before minutes of measurement, not after
            if not readme.is_file():
                raise BenchError(f"--readme {readme}: no such file")
            check_blocks(read_exact(readme), names, str(readme))
    except BenchError as err:
        print(f"seedlm bench: {err}", file=sys.stderr)
        return 2

    from benchmarks.floors import machine_summary, matmul_peak_flops

    command = command_line(args)
    print(f"[seedlm bench] measuring the fp32 matmul peak ({command})", file=sys.stderr, flush=True)
    size = 512 if args.smoke else 2048
    peak = matmul_peak_flops(size=size)
    print(f"[seedlm bench] {machine_summary(peak, size)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    for i, name in enumerate(names, 1):
        module_name, what = next((m, w) for n, m, w in BENCHMARKS if n == name)
        print(f"[{i}/{len(names)}] {name}: {what} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        machine = machine_summary(peak, size)  # the load average as this benchmark starts
        module = importlib.import_module(f"benchmarks.{module_name}")
        result = measure_in_child(module_name, ["--smoke"] * args.smoke + ["--rounds", str(rounds)])
        if name == "scaling":
            plot_path = readme.parent / PLOT if readme is not None else None
            if plot_path is not None:
                module.plot(result, plot_path, peak)
            text = module.report(result, peak, PLOT.as_posix() if plot_path is not None else None)
        else:
            text = module.report(result, peak)
        alone = f" (this block alone: `seedlm bench --only {name}`)" if names != [name] else ""
        block = f"Measured by `{command}`{alone} on {machine}.\n\n{text}"
        print(f"\n## {name}\n\n{block}\n", flush=True)
        note = ""
        if readme is not None:  # re-read: others may have edited the README while this ran
            try:
                readme.write_bytes(rewrite_block(read_exact(readme), name, block).encode("utf-8"))
            except BenchError as err:
                print(f"seedlm bench: {err} (the README changed during the run)", file=sys.stderr)
                return 2
            note = f", block rewritten in {readme}"
        print(f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - t0:.0f} s{note}", file=sys.stderr,
              flush=True)
    print(f"[seedlm bench] all {len(names)} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
