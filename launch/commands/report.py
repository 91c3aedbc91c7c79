"""`seedlm report KIND RUN_DIR...`: the rows of a paper experiment (configs/paper/) from finished run folders.

seedlm report gated-attention runs/paper/gated_attention/*
seedlm report length-extrapolation runs/paper/length_extrapolation/* --max-length 4096 --plot extrapolation.png

Runs whose folder names differ only in a trailing `_seedN` (none, none_seed1) are seeds of one variant: the
table gives their mean and min-max. Every number is measured on the run's own held-out split (data sources with
holdout_fraction, as in training) with the run's own tokenizer, on its latest checkpoint (as `seedlm eval`).
A folder that is not a finished text run, or data without a held-out split, is refused (exit 2).

gated-attention: held-out loss (the run's last logged eval_loss) and how much it fell over the last quarter of
  the run's steps (whether it has flattened), the largest finite gradient norm of the run
  (before clipping: training stability), the first token's attention share and the largest activation of the
  residual stream (eval/attention_sinks.py), mean over layers and per layer, on held-out documents from their
  start ([bos] + the first seq_len - 1 tokens: position 0 is a document start, as in training); --plot: the
  held-out loss of every run against step.
length-extrapolation: held-out loss by position up to --max-length (eval/length_extrapolation.py) on held-out
  documents concatenated as in training ([bos] doc [eos] ...), the mean over positions (7/8 p, p] at each of
  --positions, and one PNG of all variants.
"""

from __future__ import annotations

import argparse
import math
import re

KINDS = ("gated-attention", "length-extrapolation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which experiment's table to print")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders (train.output_dir)")
    parser.add_argument("--num-sequences", type=int, default=None,
                        help="held-out sequences to measure on; None: 64 (gated-attention), 16 (length-extrapolation)")
    parser.add_argument("--max-length", type=int, default=4096, help="length-extrapolation: tokens per sequence")
    parser.add_argument("--positions", default="256,1024,4096",
                        help="length-extrapolation: the table's positions (comma-separated, <= --max-length)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="length-extrapolation: loss by position; gated-attention: held-out loss by step")
    parser.add_argument("--smooth", type=int, default=None, metavar="N",
                        help="length-extrapolation: the plot averages N neighbouring positions (a position's loss "
                             "over a few held-out sequences mostly follows their text); None: --max-length / 32")
    parser.add_argument("--by-step", action="store_true",
                        help="gated-attention: also the sink statistics at every checkpoint each run kept")
    parser.add_argument("--output", default=None, metavar="JSON", help="also write the measurements as JSON")
    parser.add_argument("--device", default=None, help="torch device; None: cuda if available, else cpu")


class ReportError(ValueError):
    """A run folder or option the report cannot use; the message says which and why."""


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from seedlm.data_pipeline import DataError

    try:
        positions = parse_positions(args) if args.kind == "length-extrapolation" else []  # before any loading
        runs = [load_run(Path(d)) for d in args.run_dirs]
        groups = group_seeds(runs)
        if args.kind == "gated-attention":
            rows = [gated_attention_row(name, members, args) for name, members in groups.items()]
            table = gated_attention_table(rows)
            if args.by_step:
                steps = [s for name, members in groups.items() for s in sinks_by_step(name, members, args)]
                table += "\n" + sinks_by_step_table(steps)
        else:
            rows = [length_extrapolation_row(name, members, args) for name, members in groups.items()]
            table = length_extrapolation_table(rows, positions)
    except (ReportError, DataError) as err:
        print(f"seedlm report: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.kind == "gated-attention" and args.plot:
        from seedlm.launch.metrics import plot_heldout_curves

        curves, groups = {}, {}
        for r in rows:
            for seed, curve in zip(r["seeds"], r["curves"]):
                curves[f"{r['variant']} seed {seed}"], groups[f"{r['variant']} seed {seed}"] = curve, r["variant"]
        print(f"wrote {plot_heldout_curves(curves, Path(args.plot), 'held-out loss by step', groups)}")
    if args.kind == "length-extrapolation" and args.plot:
        from seedlm.eval.length_extrapolation import plot_loss_by_position

        curves = {row["variant"]: row["curve"] for row in rows}
        smooth = args.smooth or max(1, args.max_length // 32)
        print(f"wrote {plot_loss_by_position(curves, args.plot, smooth=smooth)}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------- run folders


def load_run(run_dir) -> dict:
    """A finished text run: its resolved config, metrics rows and the model folder of its latest checkpoint."""
    import yaml

    from seedlm.launch.checkpoint import CheckpointError, resolve_model_dir
    from seedlm.launch.metrics import read_metrics

    if not (run_dir / "config.yaml").is_file():
        raise ReportError(f"{run_dir} is not a run folder (no config.yaml): give train.output_dir folders")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if config["data"].get("synthetic"):
        raise ReportError(f"{run_dir} was trained on data.synthetic: this report needs a text run")
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    max_steps = config["train"]["max_steps"]
    if not steps or steps[-1] != max_steps:
        raise ReportError(f"{run_dir} is not finished: step {steps[-1] if steps else 0} of max_steps {max_steps} "
                          "(resume it with the same seedlm train command)")
    try:
        model_dir = resolve_model_dir(run_dir)
    except CheckpointError as err:
        raise ReportError(str(err)) from err
    return {"dir": run_dir, "config": config, "metrics": rows, "model_dir": model_dir}


def flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# what seeds of one variant may differ in: the seed, and settings that leave the training computation as it is
# (where and how often a run writes, how it logs, the host allocator, CPU threads)
NOT_THE_RECIPE = ("train.seed", "train.output_dir", "tokenizer.path", "train.save_interval", "train.keep_last",
                  "train.async_save", "train.hf_interval", "train.log_interval", "train.progress_bar",
                  "train.tensorboard", "train.host_mmap_threshold", "train.cpu_threads")


def group_seeds(runs: list[dict]) -> dict[str, list[dict]]:
    """{variant: runs}: folders named NAME and NAME_seedN are one variant, and must differ only in the seed."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(re.sub(r"_seed\d+$", "", r["dir"].name), []).append(r)
    for name, members in groups.items():
        first = flat(members[0]["config"])
        for other in members[1:]:
            theirs = flat(other["config"])
            differ = sorted(k for k in first.keys() | theirs.keys()
                            if k not in NOT_THE_RECIPE and first.get(k) != theirs.get(k))
            if differ:
                raise ReportError(f"{members[0]['dir']} and {other['dir']} are seeds of variant {name!r} by name "
                                  f"but differ in {', '.join(differ)}; rename one")
        seeds = [m["config"]["train"]["seed"] for m in members]
        if len(set(seeds)) < len(seeds):
            raise ReportError(f"the runs of variant {name!r} share a train.seed ({seeds}): the same run twice?")
    return groups


def heldout_texts(run: dict):
    """The held-out documents of the run's data sources (as its validation loader reads them)."""
    from seedlm.data_pipeline import DataConfig, iter_texts, open_sources

    return iter_texts(open_sources(DataConfig.from_dict(run["config"]["data"]), "validation"))


def load_model(run: dict, args, model_dir=None):
    """(model, tokenizer) of the run's latest checkpoint, or of model_dir."""
    import torch

    from seedlm.eval.harness import load_model_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model_dir(model_dir or run["model_dir"], device=device)


def spread(values: list[float], digits: int) -> str:
    """'mean' for one value, 'mean (min-max)' for several."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def per_layer(lists: list[list[float]], digits: int) -> str:
    """Per-layer means over seeds, 'a / b / c'."""
    return " / ".join(f"{sum(v) / len(v):.{digits}f}" for v in zip(*lists))


def markdown(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] + ["---:"] * (len(header) - 1), *lines]
    return "".join("| " + " | ".join(row) + " |\n" for row in rows)


# ---------------------------------------------------------------- gated attention


def gated_attention_row(name: str, members: list[dict], args) -> dict:
    from seedlm.eval.attention_sinks import attention_sink_stats

    row = {"variant": name, "runs": [str(m["dir"]) for m in members], "seeds": [], "heldout_loss": [],
           "heldout_fall_last_quarter": [], "curves": [], "max_grad_norm": [], "first_token_attention_per_layer": [],
           "max_activation_per_layer": []}
    for m in members:
        evals = [(r["step"], r["eval_loss"]) for r in m["metrics"] if "eval_loss" in r]
        if not evals:
            raise ReportError(f"{m['dir']} logged no held-out loss (train.eval_interval=0?)")
        model, tokenizer = load_model(m, args)
        stats = attention_sink_stats(model, sink_sequences(m, tokenizer, args))
        if not stats["attention_layers"]:
            raise ReportError(f"{m['dir']}: {model.config.model_type} has no attention layers: no attention sinks")
        row["seeds"].append(m["config"]["train"]["seed"])
        row["heldout_loss"].append(evals[-1][1])
        row["heldout_fall_last_quarter"].append(fall_over_last_quarter(evals))
        row["curves"].append(evals)
        norms = [r["grad_norm"] for r in m["metrics"] if math.isfinite(r.get("grad_norm") or math.nan)]
        row["max_grad_norm"].append(max(norms, default=math.nan))  # training stability
        row["first_token_attention_per_layer"].append(stats["first_token_attention_per_layer"])
        row["max_activation_per_layer"].append(stats["max_activation_per_layer"])
        row["gate"], row["lr"] = model.config.attn_output_gate, m["config"]["train"]["lr"]
    return row


def fall_over_last_quarter(evals: list[tuple[int, float]]) -> float:
    """How much the held-out loss fell from the last eval at or before 3/4 of the last eval's step (the first
    eval if none is that early) to the last eval: near 0 once the loss has flattened."""
    quarter = max((e for e in evals if e[0] <= 0.75 * evals[-1][0]), default=evals[0], key=lambda e: e[0])
    return quarter[1] - evals[-1][1]


def gated_attention_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        share = [sum(v) / len(v) for v in r["first_token_attention_per_layer"]]
        act = [max(v) for v in r["max_activation_per_layer"]]
        lines.append([r["variant"], r["gate"], f"{r['lr']:g}", ", ".join(map(str, r["seeds"])),
                      spread(r["heldout_loss"], 3), spread(r["heldout_fall_last_quarter"], 3),
                      spread(r["max_grad_norm"], 2), spread(share, 3),
                      per_layer(r["first_token_attention_per_layer"], 2), spread(act, 1),
                      per_layer(r["max_activation_per_layer"], 1)])
    header = ["variant", "gate", "lr", "seeds", "held-out loss", "fall, last quarter", "max grad norm",
              "first-token share", "per layer", "max activation", "per layer"]
    return markdown(header, lines)


def sink_sequences(run: dict, tokenizer, args):
    """Held-out documents from their start: [bos] + the first seq_len - 1 tokens, as position 0 is in training."""
    from seedlm.eval.length_extrapolation import token_sequences

    try:
        return token_sequences(tokenizer, heldout_texts(run), run["config"]["data"]["seq_len"],
                               args.num_sequences or 64, bos=True, one_per_document=True)
    except ValueError as err:
        raise ReportError(f"{run['dir']}: held-out data: {err}") from err


def sinks_by_step(name: str, members: list[dict], args) -> list[dict]:
    """The sink statistics at every checkpoint a run kept (train.save_interval, keep_last): whether and how
    they grow with training, where the last checkpoint alone cannot say."""
    from seedlm.eval.attention_sinks import attention_sink_stats
    from seedlm.launch.checkpoint import CHECKPOINTS_DIR, checkpoint_model_dir, complete_checkpoints

    out = []
    for m in members:
        for checkpoint in complete_checkpoints(m["dir"] / CHECKPOINTS_DIR):
            model, tokenizer = load_model(m, args, checkpoint_model_dir(m["dir"], checkpoint))
            stats = attention_sink_stats(model, sink_sequences(m, tokenizer, args))
            out.append({"variant": name, "seed": m["config"]["train"]["seed"],
                        "step": int(checkpoint.name.split("_")[-1]),
                        "first_token_attention": stats["first_token_attention"],
                        "max_activation": stats["max_activation"]})
    return out


def sinks_by_step_table(steps: list[dict]) -> str:
    lines = [[s["variant"], str(s["seed"]), str(s["step"]), f"{s['first_token_attention']:.3f}",
              f"{s['max_activation']:.1f}"] for s in sorted(steps, key=lambda s: (s["variant"], s["seed"], s["step"]))]
    return markdown(["variant", "seed", "step", "first-token share", "max activation"], lines)


# ---------------------------------------------------------------- length extrapolation


def parse_positions(args) -> list[int]:
    positions = [int(p) for p in args.positions.split(",") if p.strip()]
    beyond = [p for p in positions if not 1 <= p <= args.max_length]
    if beyond:
        raise ReportError(f"--positions {beyond} outside 1..--max-length {args.max_length}")
    return positions


def length_extrapolation_row(name: str, members: list[dict], args) -> dict:
    from seedlm.eval.length_extrapolation import loss_by_position, loss_near, token_sequences

    positions = parse_positions(args)
    row = {"variant": name, "runs": [str(m["dir"]) for m in members], "seeds": [], "loss_at": []}
    curves = []
    for m in members:
        model, tokenizer = load_model(m, args)
        try:  # max_length + 1 tokens: the last one is predicted at position max_length
            ids = token_sequences(tokenizer, heldout_texts(m), args.max_length + 1, args.num_sequences or 16, bos=True)
        except ValueError as err:
            raise ReportError(f"{m['dir']}: held-out data: {err}") from err
        curve = loss_by_position(model, ids, train_length=m["config"]["data"]["seq_len"], batch_size=2)
        curves.append(curve)
        row["seeds"].append(m["config"]["train"]["seed"])
        row["loss_at"].append({p: loss_near(curve, p) for p in positions})
        row["params"] = model.num_parameters()
        row["num_sequences"] = int(ids.shape[0])
    mean_loss = [sum(v) / len(v) for v in zip(*(c["loss"] for c in curves))]
    row["curve"] = {**curves[0], "loss": mean_loss}  # the mean over seeds, for the plot
    return row


def length_extrapolation_table(rows: list[dict], positions: list[int]) -> str:
    lines = [[r["variant"], f"{r['params'] / 1e6:.2f}M", ", ".join(map(str, r["seeds"])), str(r["num_sequences"]),
              *(spread([at[p] for at in r["loss_at"]], 3) for p in positions)] for r in rows]
    return markdown(["variant", "params", "seeds", "sequences", *(f"loss @{p}" for p in positions)], lines)
