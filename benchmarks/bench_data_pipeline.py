"""Data pipeline throughput (tokenise + pack) beside a training step's consumption on the tiny presets.

Goal: the loader is never the bottleneck, i.e. it produces >= 10x the tokens/s a training step consumes.
Each of --rounds rounds measures every pipeline and every step in turn; each ratio pipeline / step is taken
within a round and reported as min / median / max over the rounds (benchmarks/rounds.py).

Measured on the embedded default corpus (the standard library's *.py files, real text, no download):
  - pipeline tokens/s of `build_dataloader` batches (read files, tokenise in batches, shuffle, pack into
    [batch, seq_len] rows with position_ids / labels) in-process and with 1 and 2 workers;
  - training tokens/s of one fwd + bwd + AdamW step of each tiny preset (configs/models/*_tiny.yaml) on
    [batch, seq_len] tokens; "n/a" where the model family is not available in this checkout.

    python benchmarks/bench_data_pipeline.py                  # seq_len 512, batch 8, 4 s per measurement
    python benchmarks/bench_data_pipeline.py --smoke          # a few seconds; CI checks that it runs
    python benchmarks/bench_data_pipeline.py --tokenizer DIR  # use an existing tokenizer folder
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.rounds import Spread, add_rounds_argument, goal, interleaved_rounds, ratio_spread, resolve_rounds  # noqa: E402

PRESETS = ("gated_moe_tiny", "deltaproduct_tiny")  # model presets under configs/models


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer folder; default: train one on the corpus (vocab --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocab of the trained tokenizer (tiny presets: 4096)")
    p.add_argument("--train-chars", type=int, default=5_000_000, help="tokenizer training text budget")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="micro batch size (rows per batch)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to measure")
    p.add_argument("--seconds", type=float, default=4.0, help="time per pipeline measurement and round")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="documents per shuffled, batch-tokenised block")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per preset and round (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the training step")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and short timings, to check the script runs")
    add_rounds_argument(p)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.vocab_size, args.train_chars, args.seq_len, args.batch_size = 512, 300_000, 128, 4
        args.seconds, args.steps, args.shuffle_buffer = 1.0, 1, 16
        args.workers = [0, 1]  # in-process and worker-process loading; a second worker is the same code
    return args


def pipeline_tokens_per_sec(tokenizer, num_workers: int, args: argparse.Namespace) -> float:
    """Tokens/s of packed batches from the stdlib corpus, after the first batch (worker start-up excluded)."""
    from seedlm.data_pipeline import DataConfig, build_dataloader

    cfg = DataConfig(
        seq_len=args.seq_len,
        micro_batch_size=args.batch_size,
        num_workers=num_workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    seconds = args.seconds
    it = iter(build_dataloader(cfg, tokenizer))
    next(it)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def train_step_tokens_per_sec(preset: str, seq_len: int, batch_size: int, steps: int) -> float:
    """Tokens/s of fwd + bwd + AdamW steps of a tiny model preset (configs/models/PRESET.yaml) on [batch_size,
    seq_len]."""
    import torch
    from transformers import AutoModelForCausalLM

    from seedlm.launch.presets import load_model_config

    config = load_model_config(preset)
    net = AutoModelForCausalLM.from_config(config)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g)  # [B, T]
    pos = torch.arange(seq_len).expand(batch_size, seq_len)  # [B, T]

    def step() -> None:
        loss = net(input_ids=ids, labels=ids, position_ids=pos).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * seq_len * steps / (time.perf_counter() - start)


def measure(args) -> dict:
    """Pipeline tokens/s per worker count and training tokens/s per tiny preset, one each per round; step FLOPs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from benchmarks.floors import training_step_flops
    from seedlm.data_pipeline import iter_texts, load_tokenizer, open_sources, train_tokenizer
    from seedlm.data_pipeline.config import DataConfig
    from seedlm.launch.presets import load_model_config

    torch.set_num_threads(args.threads)
    # The stdlib has empty __init__.py files and a few non-UTF-8 test files: skipped and counted, not news here.
    logging.getLogger("data_pipeline").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
            tok_desc = args.tokenizer
        else:
            t0 = time.perf_counter()
            texts = iter_texts(open_sources(DataConfig()), seed=0)
            tok = train_tokenizer(texts, tmp, vocab_size=args.vocab_size, max_chars=args.train_chars)
            tok_desc = f"BPE {len(tok)} trained on {args.train_chars / 1e6:g}M chars in {time.perf_counter() - t0:.1f}s"
        measures = {("pipeline", w): lambda w=w: pipeline_tokens_per_sec(tok, w, args) for w in args.workers}
        measures.update({("train", p): lambda p=p: train_step_tokens_per_sec(p, args.seq_len, args.batch_size,
                                                                              args.steps) for p in PRESETS})
        rounds = interleaved_rounds(measures, args.rounds)
    pipe = {w: rounds["pipeline", w] for w in args.workers}
    train = {p: rounds["train", p] for p in PRESETS}
    flops = {p: training_step_flops(load_model_config(p), args.batch_size, args.seq_len) for p in PRESETS}
    return {"args": vars(args), "tokenizer": tok_desc, "pipeline": pipe, "train": train, "flops": flops}


def report(result: dict, peak_flops: float) -> str:
    """Markdown: pipeline tokens/s per worker count, then each preset's step with the pipeline / step ratios."""
    import statistics

    a, pipe, train = result["args"], result["pipeline"], result["train"]
    shape = f"{a['batch_size']} x {a['seq_len']}"
    names = {w: f"{w} worker{'s' if w != 1 else ''}" for w in pipe}
    tokens = lambda values: f"{statistics.median(values):,.0f}"
    lines = [
        f"Tokenise + pack the stdlib corpus into batches of {shape} tokens (tokenizer: {result['tokenizer']}), "
        f"{a['seconds']:g} s per measurement, beside one fwd + bwd + AdamW step of each tiny preset on the same shape "
        f"(mean over {a['steps']} steps after 1 warm-up), torch threads {a['threads']}; {a['rounds']} rounds, each "
        "measuring every pipeline and step in turn. Tokens/s: the median over the rounds; ratios: min / median / "
        "max over the rounds, each taken within a round. Goal: the pipeline produces >= 10x the tokens/s a step "
        "consumes. % of peak: the step's forward + backward FLOPs (AdamW not counted) at the matmul peak.",
        "",
        "| pipeline (tokenise + pack) | tokens/s |",
        "|---|---:|",
    ]
    for w, tps in pipe.items():
        name = "in the training process (0 workers)" if w == 0 else names[w]
        lines.append(f"| {name} | {tokens(tps)} |")
    lines += [
        "",
        f"| training step (fwd + bwd + AdamW), {shape} | tokens/s | % of peak | "
        + " | ".join(f"pipeline / step, {names[w]}" for w in pipe) + " |",
        "|---|---:|---:|" + "---:|" * len(pipe),
    ]
    for preset, tps in train.items():
        floor = result["flops"][preset] / peak_flops
        peak_share = Spread.of(100 * floor * t / (a["batch_size"] * a["seq_len"]) for t in tps).format("{:.0f}", "%")
        lines.append(f"| {preset} (configs/models/{preset}.yaml) | {tokens(tps)} | {peak_share} | "
                     + " | ".join(ratio_spread(p, tps).format("{:.0f}", "x") for p in pipe.values()) + " |")
    worst = Spread.of(min(p[i] / t[i] for p in pipe.values() for t in train.values()) for i in range(a["rounds"]))
    lines += ["", "Goal (min / median / max over the rounds): "
              + goal("pipeline / step at the worst worker count and preset", worst, ">=", 10, "{:.0f}", "x") + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.floors import matmul_peak_flops

    torch.set_num_threads(args.threads)
    print(report(measure(args), matmul_peak_flops()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
