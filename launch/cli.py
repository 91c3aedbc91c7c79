"""The `seedlm` command line.

Each subcommand lives in its own module under `launch/commands/` and exposes
`add_arguments(parser)` and `run(args) -> int`. Command modules keep their
heavy imports (deepspeed, datasets) inside `run`; `import seedlm` itself loads torch and transformers
(it registers the model families), so `seedlm --help` costs that import and nothing more.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module under launch.commands, one-line help)
COMMANDS = [
    ("train", "train", "train a model: seedlm train CONFIG [dotted.key=value ...]"),
    ("plan", "plan", "per-GPU memory, checkpoint size and step time of a run config on a cluster, and what fits"),
    ("export", "export", "export a run's checkpoint as a Hugging Face folder"),
    ("push", "push", "upload an exported folder to the Hugging Face Hub"),
    ("eval", "eval", "evaluate a model folder or a run's latest checkpoint on YAML or synthetic tasks"),
    ("report", "report", "print a paper experiment's table (configs/paper/) from finished run folders"),
    ("demo", "demo", "build a tiny model of each family, run a forward pass and generate()"),
    ("convert", "convert", "convert a transformers checkpoint (qwen3_moe) into a seedlm model folder"),
    ("tokenizer", "tokenizer", "train or inspect a sentencepiece tokenizer"),
    ("data", "data", "inspect the data pipeline: decode packed rows with document boundaries marked"),
    ("bench", "bench", "run the CPU benchmarks beside their baselines and rewrite the README's result tables"),
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; descriptions and epilogs keep their line breaks (examples)."""


class CommandParser(argparse.ArgumentParser):
    """A parser whose epilog may be a function, called only when the help is shown: a long reference (the
    train config sections) may import heavy modules without slowing down every other command."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="seedlm",
        description="seedlm: pretraining stack for gated-attention MoE and DeltaProduct language models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(f"seedlm.launch.commands.{module_name}")
        except ImportError as err:  # a broken command module is a bug to see, not a command to hide
            raise ImportError(f"seedlm: the {name!r} command (module launch.commands.{module_name}) "
                              f"failed to import: {err}") from err
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may also follow the options (`seedlm plan CONFIG --nodes 8 seq_len=4096`), which
    # argparse alone does not allow once the positionals have been matched
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


def console_main() -> None:
    """The `seedlm` command: main(), then an exit that survives gloo's teardown (launch.distributed.exit_process)."""
    code = main()
    distributed = sys.modules.get("seedlm.launch.distributed")  # imported only by commands that may start it
    if distributed is not None:
        distributed.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
