"""Prepared data (`seedlm data prepare`, data.prepared): prepare throughput, and read throughput per rank beside what
a training step of the tiny presets consumes.

Measured on the embedded default corpus (the standard library's *.py files, real text, no download):
  - prepare tokens/s (read files, tokenise, write uint16 shards, index and manifest; train and validation split)
    with 1 and 2 processes, each into a fresh folder;
  - read tokens/s of one rank's micro-batches from the prepared set (memory map, the global row order, packing
    into [batch, seq_len] rows with position_ids / labels) for world sizes 1 and 4 (rank 0; every rank does the
    same work) and 0 or 2 loader workers;
  - training tokens/s of one fwd + bwd + AdamW step of each tiny preset on [batch, seq_len] tokens.

    python benchmarks/bench_prepared_data.py                  # the whole stdlib, seq_len 512, batch 8
    python benchmarks/bench_prepared_data.py --smoke          # a few seconds; checks that it runs
    python benchmarks/bench_prepared_data.py --tokenizer DIR  # use an existing tokenizer folder
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

from benchmarks.bench_data_pipeline import PRESETS, train_step_tokens_per_sec  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer folder; default: train one on the corpus (vocab --vocab-size)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocab of the trained tokenizer (tiny presets: 4096)")
    p.add_argument("--train-chars", type=int, default=5_000_000, help="tokenizer training text budget")
    p.add_argument("--glob", default="**/*.py", help="files of the stdlib corpus to prepare")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="prepare process counts to measure")
    p.add_argument("--shard-tokens", type=int, default=4 * 2**20, help="tokens per prepared shard")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="micro batch size (rows per batch)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 4], help="world sizes whose rank 0 reads")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to measure")
    p.add_argument("--seconds", type=float, default=5.0, help="time per read measurement")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per preset (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the training step")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every prepare and read measurement, side by side")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and short timings, to check the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab_size, args.train_chars, args.seq_len, args.batch_size = 512, 300_000, 128, 4
        args.glob, args.shard_tokens, args.seconds, args.steps, args.workers = "json/*.py", 20_000, 0.5, 1, [0]
        args.rounds = 1
    return args


def prepare_tokens_per_sec(corpus, tokenizer_dir: str, out: str, num_proc: int, args) -> tuple[float, dict]:
    from seedlm.data_pipeline import prepare

    start = time.perf_counter()
    manifest = prepare(corpus, tokenizer_dir, out, num_proc=num_proc, shard_tokens=args.shard_tokens,
                       show_progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(manifest["splits"][s].get("tokens", 0) for s in ("train", "validation"))
    return tokens / seconds, manifest


def read_tokens_per_sec(prepared: str, tokenizer, world_size: int, workers: int, args) -> float:
    """Tokens/s of rank 0's micro-batches, after the first one (worker start-up excluded)."""
    from seedlm.data_pipeline import DataConfig, build_dataloader

    cfg = DataConfig(prepared=prepared, seq_len=args.seq_len, micro_batch_size=args.batch_size, num_workers=workers)
    it = iter(build_dataloader(cfg, tokenizer, 0, world_size))
    next(it)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def measure(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from seedlm.data_pipeline import DataConfig, SourceConfig, iter_texts, load_tokenizer, open_sources, train_tokenizer

    torch.set_num_threads(args.threads)
    logging.getLogger("seedlm.data_pipeline").setLevel(logging.ERROR)  # skipped stdlib files are not news here
    corpus = DataConfig(sources=[SourceConfig(kind="stdlib", glob=args.glob)])
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer or os.path.join(tmp, "tok")
        if not args.tokenizer:
            texts = iter_texts(open_sources(DataConfig()), seed=0)
            train_tokenizer(texts, tok_dir, vocab_size=args.vocab_size, max_chars=args.train_chars)
        tok = load_tokenizer(tok_dir)
        prepare_rate, read, manifest = {n: [] for n in args.procs}, {}, None
        for r in range(args.rounds):  # the process counts alternate, so a slow spell hits each of them
            for n in args.procs:
                out = os.path.join(tmp, f"round{r}_p{n}")
                rate, manifest = prepare_tokens_per_sec(corpus, tok_dir, out, n, args)
                prepare_rate[n].append(rate)
        for _ in range(args.rounds):
            for w in args.world_sizes:
                for k in args.workers:
                    read.setdefault((w, k), []).append(read_tokens_per_sec(out, tok, w, k, args))
    train = {p: train_step_tokens_per_sec(p, args.seq_len, args.batch_size, args.steps) for p in PRESETS}
    return {"args": vars(args), "tokens": manifest["tokens"], "documents": manifest["documents"],
            "tokenizer_size": len(tok), "prepare": prepare_rate, "read": read, "train": train}


def spread(values: list[float]) -> str:
    """Median, and the range over the rounds."""
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    return f"{median:,.0f}" + (f" ({ordered[0]:,.0f}-{ordered[-1]:,.0f})" if len(ordered) > 1 else "")


def report(result: dict) -> str:
    a = result["args"]
    read = {key: sorted(v)[len(v) // 2] for key, v in result["read"].items()}  # medians
    shape = f"{a['batch_size']} x {a['seq_len']}"
    lines = [
        f"Prepare the stdlib corpus ({a['glob']}: {result['tokens']:,} training tokens in {result['documents']:,} "
        f"documents, tokenizer of {result['tokenizer_size']} tokens) into uint16 shards, then read rank 0's "
        f"micro-batches of {shape} from it ({a['seconds']:g} s per measurement), beside one fwd + bwd + AdamW step "
        f"of each tiny preset on the same shape (mean over {a['steps']} steps after 1 warm-up), torch threads "
        f"{a['threads']}. Median of {a['rounds']} rounds (range).",
        "",
        "| prepare (read, tokenise, write shards) | tokens/s |",
        "|---|---:|",
    ]
    lines += [f"| {n} process{'es' if n != 1 else ''} | {spread(v)} |" for n, v in result["prepare"].items()]
    names = {key: f"world {key[0]}, {key[1]} worker{'s' if key[1] != 1 else ''}" for key in read}
    lines += ["", "| read from prepared data, per rank | tokens/s |", "|---|---:|"]
    lines += [f"| {names[key]} | {spread(v)} |" for key, v in result["read"].items()]
    lines += ["", f"| training step (fwd + bwd + AdamW), {shape} | tokens/s | "
              + " | ".join(f"read / step, {names[key]}" for key in read) + " |",
              "|---|---:|" + "---:|" * len(read)]
    for preset, tps in result["train"].items():
        ratios = " | ".join(f"{r / tps:.0f}x" for r in read.values())
        lines.append(f"| {preset} (configs/models/{preset}.yaml) | {tps:,.0f} | " + ratios
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(report(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
