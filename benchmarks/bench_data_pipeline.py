"""Data pipeline throughput (tokenise + pack) beside a training step's consumption on the tiny presets.

Goal: the loader is never the bottleneck, i.e. it produces >= 10x the tokens/s a training step consumes.

Measured on the embedded default corpus (the standard library's *.py files, real text, no download):
  - pipeline tokens/s of `build_dataloader` batches (read files, tokenise in batches, shuffle, pack into
    [batch, seq_len] rows with position_ids / labels / cu_seqlens) in-process and with 1 and 2 workers;
  - training tokens/s of one fwd + bwd + AdamW step of each tiny preset (configs/models/*_tiny.yaml) on
    [batch, seq_len] tokens; "n/a" where the model family is not available in this checkout.

    python benchmarks/bench_data_pipeline.py                  # seq_len 512, batch 8, 10 s per measurement
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

PRESETS = ("gated_moe_tiny", "deltaproduct_tiny")  # model presets under configs/models


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer folder; default: train one on the corpus (vocab --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocab of the trained tokenizer (tiny presets: 4096)")
    p.add_argument("--train-chars", type=int, default=5_000_000, help="tokenizer training text budget")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="micro batch size (rows per batch)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to measure")
    p.add_argument("--seconds", type=float, default=10.0, help="time per pipeline measurement")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="documents per shuffled, batch-tokenised block")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per preset (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the training step")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and short timings, to check the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab_size, args.train_chars, args.seq_len, args.batch_size = 512, 300_000, 128, 4
        args.seconds, args.steps, args.shuffle_buffer = 1.0, 1, 16
    return args


def pipeline_tokens_per_sec(tokenizer, num_workers: int, args: argparse.Namespace) -> float:
    """Tokens/s of packed batches from the stdlib corpus, after the first batch (worker start-up excluded)."""
    from data_pipeline import DataConfig, build_dataloader

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


def train_step_tokens_per_sec(preset: str, seq_len: int, batch_size: int, steps: int) -> tuple[float, str]:
    """Tokens/s of fwd + bwd + AdamW steps of a tiny model preset on [batch_size, seq_len], and where it came from."""
    import torch
    from transformers import AutoModelForCausalLM

    from launch.presets import load_model_config

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
    return batch_size * seq_len * steps / (time.perf_counter() - start), f"configs/models/{preset}.yaml"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from data_pipeline import iter_texts, load_tokenizer, open_sources, train_tokenizer
    from data_pipeline.config import DataConfig

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

        pipe = {}
        for w in args.workers:
            pipe[w] = pipeline_tokens_per_sec(tok, w, args)
        train = {p: train_step_tokens_per_sec(p, args.seq_len, args.batch_size, args.steps) for p in PRESETS}

    shape = f"{args.batch_size} x {args.seq_len}"
    print(f"\nData pipeline on the stdlib corpus, batches of {shape} tokens, tokenizer: {tok_desc},")
    print(f"{os.cpu_count()} CPUs, torch threads {args.threads}\n")
    print("| pipeline (tokenise + pack) | tokens/s |")
    print("|---|---:|")
    for w, tps in pipe.items():
        name = "in the training process (0 workers)" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
        print(f"| {name} | {tps:,.0f} |")
    names = {w: f"{w} worker{'s' if w != 1 else ''}" for w in pipe}
    print(
        f"\n| training step (fwd + bwd + AdamW), {shape} | tokens/s | "
        + " | ".join(f"pipeline / step, {names[w]}" for w in pipe)
        + " |"
    )
    print("|---|---:|" + "---:|" * len(pipe))
    for preset, (tps, where) in train.items():
        if tps is None:
            print(f"| {preset} | n/a (model not available: {where}) |" + " |" * len(pipe))
        else:
            print(f"| {preset} ({where}) | {tps:,.0f} | " + " | ".join(f"{p / tps:.0f}x" for p in pipe.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
