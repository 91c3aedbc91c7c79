"""`seedlm plan CONFIG [--nodes N] [--gpus-per-node G] [--gpu-memory 80GiB] [key=value ...]`."""

import argparse

from seedlm.launch.plan import DEFAULT_GPU_FLOPS, DEFAULT_MFU, MEMORY_MARGIN

DESCRIPTION = f"""\
Per-GPU memory (parameters, gradients, optimizer states, activations, loss), checkpoint size, FLOPs per token and
step time of a run config on a cluster, for each ZeRO stage and expert-parallel size, and which fit. The model is
built on the meta device: nothing is allocated, a 15B model plans in seconds. CONFIG and the overrides are those of
`seedlm train` (checked the same way). Memory: DeepSpeed 0.19.8's model states with AdamW and a {MEMORY_MARGIN:.0%}
margin per GPU; activations from a per-layer model of what each layer keeps for backward (launch/plan.py).

  seedlm plan configs/gated_moe_15a2b_64gpu.yaml --nodes 8 --gpus-per-node 8 --gpu-memory 80GiB
  seedlm plan gated_moe_tiny micro_batch_size=16 train.activation_checkpointing=full --json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("config", help="run preset name (configs/NAME.yaml) or a YAML file, as for seedlm train")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. micro_batch_size=4 train.dtype=bf16 seq_len=4096")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, with a unit (80GiB, 80GB, 141GB)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation for the step time")
    parser.add_argument("--gpu-flops", type=float, default=DEFAULT_GPU_FLOPS,
                        help="peak FLOP/s of one GPU (default: H100/H200 SXM dense bf16)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes), for scripts")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from seedlm.launch.config import load_run_config
    from seedlm.launch.errors import USER_ERRORS
    from seedlm.launch.plan import PlanError, build_plan, format_plan

    try:
        run_config = load_run_config(args.config, args.overrides)
        plan = build_plan(run_config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          gpu_memory=args.gpu_memory, mfu=args.mfu, gpu_flops=args.gpu_flops)
    except (PlanError, *USER_ERRORS) as err:
        print(f"seedlm plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0 if any(row.fits for row in plan.rows) else 1
