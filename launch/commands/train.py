"""`seedlm train CONFIG [dotted.key=value ...]`."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run preset name (configs/NAME.yaml) or a YAML file")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.lr=1e-3 data.seq_len=128 max_steps=20 output_dir=runs/x",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    import sys

    import yaml

    from launch.config import load_run_config
    from launch.distributed import PeerFailure
    from launch.errors import USER_ERRORS

    try:
        run_config = load_run_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(run_config.to_dict(), sort_keys=False))
            return 0
        from launch.trainer import train

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
