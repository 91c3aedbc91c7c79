"""`seedlm train` against a bare PyTorch loop, and per-rank memory of ZeRO 0-3, side by side in one run.

1. Throughput: the same model preset, batch and AdamW hyperparameters, on the same packed batches:
   a bare loop (model, torch.optim.AdamW, clip, no DeepSpeed) in this process, then `seedlm train` (one
   process, ZeRO 0 and ZeRO 1) in a subprocess, whose metrics.jsonl gives tokens/s per step. Medians over
   the steps after warm-up. Goal: overhead <= 10%.
2. Memory: on 2 gloo ranks, the bytes each rank holds in parameters (its ZeRO-3 partition), fp32 master
   copies and optimizer state after one step, for ZeRO 0, 1, 2 and 3. Goal: ZeRO-3 <= 0.55x ZeRO-0.

    python benchmarks/bench_trainer.py            # ~3 minutes on 2 cores
    python benchmarks/bench_trainer.py --smoke    # seconds; CI checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bare_loop_tokens_per_sec(preset: str, tok_dir: Path, data_args: dict, steps: int, warmup: int, lr: float) -> float:
    """Plain PyTorch: fetch a batch, forward with labels, backward, clip, AdamW step; per-step times."""
    import torch
    from transformers import AutoModelForCausalLM

    from data_pipeline import DataConfig, build_dataloader, load_tokenizer
    from launch.presets import load_model_config

    tokenizer = load_tokenizer(tok_dir)
    data_cfg = DataConfig.from_dict({**data_args, "tokenizer": str(tok_dir)})
    batches = iter(build_dataloader(data_cfg, tokenizer))
    config = load_model_config(preset, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()  # the batch fetch counts, as in the trainer's tokens/s window
        batch = next(batches)
        loss = net(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return data_cfg.micro_batch_size * data_cfg.seq_len / statistics.median(times)


def seedlm_train_tokens_per_sec(preset, tok_dir, data_args, steps, warmup, lr, zero_stage, workdir) -> float:
    out = workdir / f"run_zero{zero_stage}"
    overrides = [
        f"output_dir={out}", f"tokenizer.path={tok_dir}", f"max_steps={warmup + steps}", f"zero_stage={zero_stage}",
        f"train.lr={lr}", "train.warmup_steps=0", "train.eval_interval=0", f"save_interval={warmup + steps}",
        "train.progress_bar=false", "train.tensorboard=false", "train.peak_tflops=1.0", "resume=none",
        f"model_overrides.vocab_size={data_args['vocab_size']}",
    ] + [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in data_args.items()
         if k != "vocab_size"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", preset, *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][warmup:]
    return statistics.median(per_step)


def memory_worker(zero_stage: int, preset: str, vocab: int, out_dir: Path) -> None:
    """Run under torchrun: one step under DeepSpeed, then write this rank's bytes as JSON into out_dir."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from launch.presets import load_model_config

    deepspeed.init_distributed(dist_backend="gloo")
    config = load_model_config(preset, vocab_size=vocab)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    ids = torch.randint(0, vocab, (1, 32))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()

    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if torch.is_tensor(t) and t.numel() and id(t.untyped_storage()) not in seen:
                seen.add(id(t.untyped_storage()))
                total += t.untyped_storage().nbytes()
        return total

    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]  # ZeRO-3: this rank's partition
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW inside ZeRO 1-3
    masters = [p for g in base.param_groups for p in g["params"]]
    states = [v for s in base.state.values() for v in s.values()]
    report = {"params": count(params), "fp32_masters": count(masters), "optimizer_state": count(states)}
    rank = torch.distributed.get_rank()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **report}))


def memory_by_stage(preset: str, vocab: int, stages=(0, 1, 2, 3)) -> dict[int, dict]:
    from launch.distributed import free_port

    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = {}
    for stage in stages:
        with tempfile.TemporaryDirectory() as report_dir:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", str(Path(__file__).resolve()), "--memory-worker", str(stage),
                   "--preset", preset, "--vocab", str(vocab), "--memory-out", report_dir]
            result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            ranks = [json.loads(f.read_text()) for f in sorted(Path(report_dir).glob("rank*.json"))]
        out[stage] = max(ranks, key=lambda r: sum(v for k, v in r.items() if k != "rank"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gated_moe_tiny", help="model preset (configs/models)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="a few steps, to check the script runs")
    p.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--memory-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args.preset, args.vocab, args.memory_out)
        return 0
    if args.smoke:
        args.steps, args.warmup, args.seq_len, args.micro_batch_size = 3, 1, 64, 2

    import torch

    from data_pipeline import train_tokenizer
    from tests.helpers import WORDS

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus = workdir / "docs.jsonl"
        rng = random.Random(0)
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400))) for _ in range(2000)]
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tokenizer = train_tokenizer(docs, workdir / "tok", vocab_size=512, max_chars=None)
        data_args = {"sources": [{"kind": "jsonl", "path": str(corpus)}], "seq_len": args.seq_len,
                     "micro_batch_size": args.micro_batch_size, "num_workers": 1, "shuffle_buffer": 64}
        vocab = len(tokenizer)
        bare = bare_loop_tokens_per_sec(args.preset, workdir / "tok", data_args, args.steps, args.warmup, 1e-3)
        ours = {stage: seedlm_train_tokens_per_sec(args.preset, workdir / "tok", {**data_args, "vocab_size": vocab},
                                                   args.steps, args.warmup, 1e-3, stage, workdir) for stage in (0, 1)}
        memory = memory_by_stage(args.preset, vocab)

    print(f"# seedlm train vs a bare PyTorch loop: {args.preset}, {args.micro_batch_size}x{args.seq_len} tokens, "
          f"AdamW, one process, {torch.get_num_threads()} threads; median over {args.steps} steps\n")
    print("| loop | tokens/s | vs bare loop |")
    print("|---|---:|---:|")
    print(f"| bare PyTorch loop | {bare:,.0f} | 1.00x |")
    for stage, tps in ours.items():
        print(f"| seedlm train, DeepSpeed ZeRO {stage} | {tps:,.0f} | {tps / bare:.2f}x |")
    worst = min(ours.values()) / bare
    print(f"\noverhead: {100 * (1 - worst):.1f}% at worst (goal <= 10%)\n")
    print(f"# per-rank memory after one step, 2 gloo ranks, {args.preset} (MiB, the larger rank)\n")
    print("| ZeRO stage | parameters | fp32 master copies | optimizer state | total | vs ZeRO 0 |")
    print("|---|---:|---:|---:|---:|---:|")
    base_total = sum(v for k, v in memory[0].items() if k != "rank")
    for stage, r in memory.items():
        total = sum(v for k, v in r.items() if k != "rank")
        mib = [r["params"], r["fp32_masters"], r["optimizer_state"], total]
        print(f"| {stage} | " + " | ".join(f"{v / 2**20:.2f}" for v in mib) + f" | {total / base_total:.2f}x |")
    ratio = sum(v for k, v in memory[3].items() if k != "rank") / base_total
    print(f"\nZeRO-3 / ZeRO-0: {ratio:.2f}x (goal <= 0.55x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
