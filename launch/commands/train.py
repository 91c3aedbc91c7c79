"""`seedlm train CONFIG [dotted.key=value ...]`."""

import argparse

DESCRIPTION = """\
Train a model as a run config says: a preset name (configs/NAME.yaml) or a YAML file, with dotted overrides.

  seedlm train gated_moe_tiny max_steps=20 output_dir=runs/try
  seedlm train configs/my_run.yaml train.lr=1e-3 data.sources=[jsonl:data/*.jsonl] --print-config

Mistakes (unknown keys or model fields, a tokenizer larger than the model's vocabulary, expert parallelism
that does not fit the world size) are refused before anything is computed, by --print-config too."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = config_reference  # a function: called only when the help is shown (launch/cli.py)
    parser.add_argument("config", help="run preset name (configs/NAME.yaml) or a YAML file")
    parser.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.lr=1e-3 data.seq_len=128 max_steps=20 output_dir=runs/x",
    )
    parser.add_argument("--print-config", action="store_true",
                        help="check the config as the run would, print it resolved and exit")


def yaml_value(value) -> str:
    """A default as it is written in an override (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return str(value)


def field_defaults(cls, skip=(), **shown) -> str:
    """`name=default` for every field of a config dataclass; `shown` replaces a default's text."""
    import dataclasses

    items = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        items.append(f"{f.name}={shown.get(f.name, yaml_value(default))}")
    return " ".join(items)


def config_reference() -> str:
    """The sections of a run config with their fields and defaults, and the data-source forms."""
    import shutil
    import textwrap

    from seedlm.data_pipeline import DataConfig, SourceConfig
    from seedlm.launch.config import TOP_LEVEL_ALIASES, TokenizerConfig, TrainConfig
    from seedlm.launch.presets import MODEL_PRESET_DIR

    presets = ", ".join(sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml")))
    rows = [
        ("model", f"a preset under configs/models/ ({presets}), a YAML path, or a mapping with model_type"),
        ("model_overrides", "fields of the model's config over the preset (model/configuration_*.py), "
                            "e.g. model_overrides.num_experts=4"),
        ("tokenizer", field_defaults(TokenizerConfig)
         + ". path: an existing tokenizer folder, or null to train one into <output_dir>/tokenizer"),
        ("data", field_defaults(DataConfig, skip=("tokenizer",), sources="[stdlib]")
         + ". Or data.synthetic: a generated task instead of sources (data_pipeline/synthetic.py)"),
        ("train", field_defaults(TrainConfig)),
    ]
    width = max(60, shutil.get_terminal_size().columns - 2)  # as argparse wraps the options

    def table(rows) -> list[str]:
        return [textwrap.fill(text, width, initial_indent=f"  {name:16s} ", subsequent_indent=" " * 19)
                for name, text in rows]

    def paragraph(text) -> str:
        return textwrap.fill(text, width)

    sources = [
        ("stdlib", "the embedded default corpus (this Python's standard-library *.py files)"),
        ("KIND:PATH", "KIND one of jsonl, parquet, text, files, hub: jsonl:data/*.jsonl, parquet:data/, "
                      "text:notes.txt, files:docs/, hub:owner/name"),
        ("PATH", "a .jsonl, .parquet or .txt file, or a folder (one document per file)"),
        ("{kind: K, ...}", "a mapping with more fields: path, " + field_defaults(SourceConfig, skip=("kind", "path"))),
    ]
    return "\n".join([
        paragraph("run config sections (section.field=value overrides any field; --print-config shows every "
                  "resolved value; the README's Training section and launch/config.py explain them):"),
        *table(rows),
        *table([("top-level keys", " ".join(TOP_LEVEL_ALIASES))]),
        "",
        paragraph("data sources: a YAML list under data: sources:, or data.sources=[SOURCE,...] on the command line "
                  "(the same forms as seedlm tokenizer --source), each one of:"),
        *table(sources),
        "  e.g. data.sources=[jsonl:data/a.jsonl,hub:owner/name]",
        "       'data.sources=[{kind: parquet, path: data/, text_field: content}]'",
    ])


def run(args: argparse.Namespace) -> int:
    import sys

    import yaml

    from seedlm.launch.config import check_run_config, load_run_config
    from seedlm.launch.distributed import PeerFailure
    from seedlm.launch.errors import USER_ERRORS

    try:
        run_config = load_run_config(args.config, args.overrides)
        # what the run would refuse, refused now: before a process group, an output folder or a trained tokenizer
        check_run_config(run_config)
        if args.print_config:
            print(yaml.safe_dump(run_config.to_dict(), sort_keys=False))
            return 0
        from seedlm.launch.trainer import train

        summary = train(run_config)
    except USER_ERRORS as err:
        print(f"seedlm train: {err}", file=sys.stderr)
        return 2
    except PeerFailure as err:  # not this rank's fault: one line instead of a traceback of consequences
        print(f"seedlm train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves at the step boundary)
        print("seedlm train: interrupted; the steps since the last checkpoint are lost", file=sys.stderr)
        return 130
    if summary["rank"] == 0:
        print(f"finished at step {summary['step']} ({summary['stop_reason']}); run folder {summary['output_dir']}")
        if summary.get("synthetic"):
            print(summary["synthetic"])
        if summary.get("export"):
            print(summary["export"])
    return 0
