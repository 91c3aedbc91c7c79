"""`seedlm eval MODEL_DIR --tasks ...`: run evaluation tasks on a model folder or a run's latest checkpoint
(the complete one resume would pick: launch/checkpoint.py, resolve_model_dir).

seedlm eval runs/x --tasks tiny_qa,tiny_text                     # shipped YAML tasks (eval/tasks)
seedlm eval export/ --tasks my_task.yaml --include-path tasks/   # YAML paths / folders of YAML tasks
seedlm eval runs/x --tasks parity,state_s5,mqar --limit 100      # synthetic tasks
seedlm eval runs/x --list-tasks
seedlm eval runs/state_tracking/s3_nh2_neg                       # a model trained on data.synthetic: no --tasks

Writes the results as JSON (--output, default MODEL_DIR/eval_results.json) and a markdown table beside it
(.md), and prints the table. A task that fails (a bad task file or data file, an error while it runs) is
reported with its reason and listed under "failed" in the JSON; the other tasks' results are still written,
and the exit status is 1 (2 when no task could be loaded, before the model is).
"""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="an exported model folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--tasks", help="comma-separated task names or YAML paths (see --list-tasks); a model "
                                        "trained on data.synthetic takes none")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of YAML tasks (or one YAML file) to add to the shipped ones; repeatable")
    parser.add_argument("--output", help="results JSON, with a markdown table (.md) beside it; "
                                         "None: MODEL_DIR/eval_results.json")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="at most this many documents per task; None: all")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples per prompt for every task; None: each task's own num_fewshot")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context length in tokens; None: from the model's config")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:1; None: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="weight dtype, e.g. bfloat16; None: as saved")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="'auto': place a model too large for one device over the GPUs, CPU memory and disk "
                             "(accelerate's big-model dispatch); replaces --device")
    parser.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                        help="with --device-map: memory per device, e.g. '0=70GiB,1=70GiB,cpu=200GiB' "
                             "(what does not fit is offloaded to disk)")
    parser.add_argument("--list-tasks", action="store_true",
                        help="list the known tasks (shipped, under --include-path, synthetic) and exit")


def run(args: argparse.Namespace) -> int:
    import sys

    from seedlm.eval.tasks import TaskError, resolve_tasks
    from seedlm.launch.checkpoint import CheckpointError, resolve_model_dir

    prog = "seedlm eval"
    try:
        if args.list_tasks:
            return list_tasks(args.include_path)
        try:  # resolved once (a skipped checkpoint is warned about once); reported after the task errors
            folder, folder_error = resolve_model_dir(args.model_dir), None
        except CheckpointError as err:
            folder, folder_error = None, err
        synthetic = synthetic_meta(folder) if folder is not None else None
        if synthetic is not None:
            return run_synthetic(args, synthetic, folder)
        names = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        if not names:
            print(f"{prog}: give --tasks NAME[,NAME...] (see --list-tasks)", file=sys.stderr)
            return 2
        failures: dict[str, str] = {}  # a task that fails is reported; the others still run
        tasks = resolve_tasks(names, args.include_path, failures)  # every task checked before the model loads
    except TaskError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    for reason in failures.values():
        print(f"{prog}: {reason}", file=sys.stderr)
    if not tasks:
        return 2
    failed_to_load = set(failures)

    from seedlm.eval.harness import evaluate, load_model_dir

    if folder_error is not None:
        print(f"{prog}: {folder_error}", file=sys.stderr)
        return 2
    device = default_device(args)
    try:
        max_memory = parse_max_memory(args.max_memory, args.device_map)
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    model, tokenizer = load_model_dir(folder, device=device, dtype=args.dtype, device_map=args.device_map,
                                      max_memory=max_memory)
    try:
        results = evaluate(
            model,
            tokenizer,
            tasks,
            batch_size=args.batch_size,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            max_length=args.max_length,
            failures=failures,
        )
    except (TaskError, ValueError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    return write_report(args, folder, results, failures, failed_to_load, len(names))


def list_tasks(include_path) -> int:
    from seedlm.eval.synthetic import SYNTHETIC_TASKS
    from seedlm.eval.tasks import find_task_files

    for name, path in sorted(find_task_files(include_path).items()):
        print(f"{name}\t{path}")
    for name in SYNTHETIC_TASKS:
        print(f"{name}\t(synthetic)")
    return 0


def write_report(args, folder, results: dict, failures: dict, failed_to_load: set, num_tasks: int) -> int:
    """The results file and table of the tasks that ran; the failed ones with their reasons (exit 1)."""
    import sys
    from pathlib import Path

    from seedlm.eval.harness import markdown_table, save_results

    output = Path(args.output) if args.output else Path(args.model_dir) / "eval_results.json"
    info = {"model_dir": str(args.model_dir), "checkpoint": str(folder), "limit": args.limit,
            "num_fewshot": args.num_fewshot}
    json_path, md_path = save_results(results, output, info, failures)
    print(markdown_table(results), end="")
    print(f"wrote {json_path} and {md_path}")
    if not failures:
        return 0
    for name, reason in failures.items():
        if name not in failed_to_load:  # those were reported before the model loaded
            print(f"seedlm eval: task {name} failed: {reason}", file=sys.stderr)
    print(f"seedlm eval: {len(failures)} of {num_tasks} tasks failed ({', '.join(failures)}); the results of the "
          f"others are in {json_path}", file=sys.stderr)
    return 1


def default_device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_max_memory(spec: str | None, device_map: str | None) -> dict | None:
    """'0=70GiB,cpu=200GiB' -> {0: '70GiB', 'cpu': '200GiB'} (accelerate's max_memory; GPU indices as ints)."""
    if spec is None:
        return None
    if device_map is None:
        raise ValueError("--max-memory needs --device-map (e.g. --device-map auto)")
    memory = {}
    for item in spec.split(","):
        device, sep, size = item.strip().partition("=")
        if not sep or not device or not size:
            raise ValueError(f"--max-memory: {item!r} is not DEVICE=SIZE (e.g. 0=70GiB or cpu=200GiB)")
        memory[int(device) if device.isdigit() else device] = size
    return memory


def synthetic_meta(folder) -> dict | None:
    """The data.synthetic description saved in the model folder's tokenizer, None for a text model."""
    import json

    from seedlm.data_pipeline.synthetic import TOKENIZER_MARKER

    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    meta = json.loads(config.read_text()).get(TOKENIZER_MARKER)
    return meta if isinstance(meta, dict) else None


def run_synthetic(args: argparse.Namespace, meta: dict, folder) -> int:
    """A model trained on a synthetic task (its vocabulary is the task's tokens): the token accuracy at train
    and test length on the task's own held-out sequences; text tasks do not apply to it."""
    import dataclasses
    import json
    import sys
    from pathlib import Path

    from seedlm.data_pipeline import SyntheticConfig
    from seedlm.eval.harness import load_model_dir
    from seedlm.launch.training_data import SyntheticData

    prog = "seedlm eval"
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    cfg = SyntheticConfig(**{k: v for k, v in meta.items() if k in fields})
    if args.tasks:
        print(f"{prog}: {args.model_dir} was trained on data.synthetic ({cfg.describe()}): its vocabulary is the "
              f"{cfg.group} elements, so text tasks such as {args.tasks!r} do not apply; run `seedlm eval "
              f"{args.model_dir}` without --tasks for its accuracy on the task", file=sys.stderr)
        return 2
    if args.limit:
        cfg.num_val, cfg.num_test = min(cfg.num_val, args.limit), min(cfg.num_test, args.limit)
    cfg.eval_batch_size = args.batch_size
    device = default_device(args)
    model, _ = load_model_dir(folder, device=device, dtype=args.dtype)
    results = SyntheticData(cfg).accuracy(model, final=True)
    output = Path(args.output) if args.output else Path(args.model_dir) / "eval_results.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"synthetic": cfg.to_dict(), "results": results}, indent=1) + "\n")
    for key, value in results.items():
        print(f"{key}\t{value:.4f}" if value is not None else f"{key}\t-")
    print(f"wrote {output}")
    return 0
