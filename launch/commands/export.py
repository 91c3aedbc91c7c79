"""`seedlm export RUN_DIR OUT_DIR [--step N]`."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (train.output_dir)")
    parser.add_argument("out_dir", help="new folder for the Hugging Face model (must not exist or be empty)")
    parser.add_argument("--step", type=int, default=None,
                        help="step of the checkpoint to export; the latest complete one when not given")
    parser.add_argument("--max-shard-size", default="2GB",
                        help="largest size of one safetensors weight file, e.g. 500MB or 5GB")


def run(args: argparse.Namespace) -> int:
    import sys

    from seedlm.launch.errors import USER_ERRORS
    from seedlm.launch.export import export_run

    try:
        out = export_run(args.run_dir, args.out_dir, step=args.step, max_shard_size=args.max_shard_size)
    except USER_ERRORS as err:
        print(f"seedlm export: {err}", file=sys.stderr)
        return 2
    print(f"exported {out}; load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0
