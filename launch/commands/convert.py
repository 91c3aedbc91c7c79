"""`seedlm convert --from qwen3_moe SRC_DIR OUT_DIR`."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, choices=["qwen3_moe"],
                        help="model_type of the source checkpoint (a seedlm folder needs no conversion)")
    parser.add_argument("src_dir", help="a transformers checkpoint folder (config.json + safetensors)")
    parser.add_argument("out_dir", help="new folder for the seedlm model (must not exist or be empty)")
    parser.add_argument(
        "--verify-tokens", type=int, default=16, help="compare logits on this many random tokens (0 = skip)"
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from seedlm.launch.convert import ConversionError, convert_qwen3_moe

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = convert_qwen3_moe(args.src_dir, args.out_dir, verify_tokens=args.verify_tokens)
    except ConversionError as err:
        print(f"seedlm convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True))")
    return 0
