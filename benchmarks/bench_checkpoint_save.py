"""Training time lost per checkpoint save: synchronous against background (train.async_save), side by side.

One process (or one torchrun job of --ranks gloo ranks) builds the Trainer once for a ~210M-parameter gated
MoE with tiny batches (1 x --seq-len tokens), so that a step is short and the save of ~2.5 GB of state (fp32
weights and AdamW moments) dominates. Each round then runs three segments of the same number of steps, in
turn: no save; a synchronous save every --every steps; a background save every --every steps (the host copy
at the step boundary into host buffers reused from save to save, the write and fsync in a thread of lowest
priority; launch/checkpoint.py); one saver per mode saves once before the rounds. A segment
saves --saves times, runs --every more steps after its last save, and ends by waiting for the save in flight,
so the whole write is counted. Training time lost per save = (segment time - the same round's no-save
segment) / saves. Goal (issue 15): background <= 20% of synchronous in the worst round.

    python benchmarks/bench_checkpoint_save.py                 # 1 rank ZeRO-0, then 2 ranks ZeRO-2
    python benchmarks/bench_checkpoint_save.py --smoke         # a small model, 1 rank
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.rounds import Spread, add_rounds_argument, goal, resolve_rounds  # noqa: E402

GOAL = 0.20  # background loss per save / synchronous loss per save
MODES = ("none", "sync", "background")


def model_overrides(a) -> list[str]:
    fields = dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                  num_key_value_heads=max(1, a.hidden // 128), head_dim=64, num_experts=a.experts,
                  num_experts_per_tok=4, moe_intermediate_size=a.moe_intermediate,
                  shared_expert_intermediate_size=a.moe_intermediate, vocab_size=512,
                  max_position_embeddings=max(64, a.seq_len))
    return [f"model_overrides.{k}={v}" for k, v in fields.items()]


def run_overrides(a, corpus: str, tok: str, output_dir: str) -> list[str]:
    return [f"output_dir={output_dir}", f"tokenizer.path={tok}", f"data.sources=[{{kind: jsonl, path: {corpus}}}]",
            f"seq_len={a.seq_len}", "micro_batch_size=1", "data.num_workers=0", "data.shuffle_buffer=16",
            f"zero_stage={a.zero_stage}", "max_steps=100000", "save_interval=100000", "train.keep_last=2",
            "train.warmup_steps=0", "train.eval_interval=0", "train.progress_bar=false", "train.tensorboard=false",
            "train.peak_tflops=1.0", "resume=none", *model_overrides(a)]


def worker(a) -> None:
    """Under torchrun or alone: one Trainer, --rounds rounds of the three segments; rank 0 writes the times."""
    import dataclasses

    import torch

    from seedlm.launch.checkpoint import CheckpointSaver
    from seedlm.launch.config import load_run_config
    from seedlm.launch.distributed import barrier
    from seedlm.launch.trainer import Trainer

    trainer = Trainer(load_run_config("gated_moe_tiny", run_overrides(a, a.corpus, a.tok, a.output_dir)))
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    batches = iter(trainer.train_loader)
    trainer.engine.train()
    # one saver per mode for the whole run, as in training: the background saver's host buffers are reused
    savers = {mode: CheckpointSaver(trainer.checkpoint_root, 2, trainer.dist.rank, background=mode == "background")
              for mode in ("sync", "background")}
    for saver in savers.values():  # warm-up: optimizer state exists, each saver has saved once
        trainer.count_step(trainer.train_step(batches))
        trainer.saver = saver
        trainer.checkpoint()
        trainer.checkpoint_published(wait=True)

    def segment(mode: str) -> dict:
        """Seconds for (saves + 1) x every steps with `mode` saves, and the seconds each save held the loop."""
        background = mode == "background"
        trainer.t = dataclasses.replace(trainer.t, async_save=background)
        trainer.saver = savers.get(mode)
        written = len(trainer.saver.write_seconds) if trainer.saver else 0
        boundary = []
        barrier()
        start = time.perf_counter()
        for i in range(1, (a.saves + 1) * a.every + 1):
            trainer.count_step(trainer.train_step(batches))
            if mode != "none" and i % a.every == 0 and i <= a.saves * a.every:
                t0 = time.perf_counter()
                trainer.checkpoint()
                boundary.append(time.perf_counter() - t0)
            elif mode != "none":
                trainer.checkpoint_published()
        if trainer.saver:
            trainer.checkpoint_published(wait=True)  # the last write counts in full
        barrier()
        write = trainer.saver.write_seconds[written:] if trainer.saver else []
        return {"seconds": time.perf_counter() - start, "boundary": boundary, "write": write}

    rounds = []
    for _ in range(a.rounds):
        rounds.append({mode: segment(mode) for mode in MODES})
    if trainer.dist.rank == 0:
        saved = max(trainer.checkpoint_root.glob("step_*"), key=lambda p: p.name)
        state_bytes = sum(f.stat().st_size for f in saved.rglob("*.pt"))
        Path(a.out).write_text(json.dumps({"params": params, "state_bytes": state_bytes, "rounds": rounds,
                                           "threads": torch.get_num_threads()}))


def run_job(a, ranks: int, zero_stage: int, corpus: Path, tok: Path, workdir: Path) -> dict:
    """One worker process (a torchrun job when ranks > 1); its result."""
    from seedlm.launch.distributed import free_port

    out = workdir / f"result_{ranks}_{zero_stage}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    launcher = [sys.executable]
    if ranks > 1:  # the cores are split between the ranks
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    worker_args = ["--worker", "--zero-stage", str(zero_stage), "--corpus", str(corpus), "--tok", str(tok),
                   "--output-dir", str(workdir / f"run_{ranks}_{zero_stage}"), "--out", str(out),
                   "--rounds", str(a.rounds), "--every", str(a.every), "--saves", str(a.saves),
                   "--hidden", str(a.hidden), "--layers", str(a.layers), "--experts", str(a.experts),
                   "--moe-intermediate", str(a.moe_intermediate), "--seq-len", str(a.seq_len)]
    result = subprocess.run([*launcher, str(Path(__file__).resolve()), *worker_args], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"checkpoint-save job ({ranks} ranks, ZeRO {zero_stage}) failed:\n{result.stderr[-3000:]}")
    return {"ranks": ranks, "zero_stage": zero_stage, **json.loads(out.read_text())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default="1:0,2:2", help="RANKS:ZERO_STAGE,... one job each")
    p.add_argument("--every", type=int, default=3, help="steps between saves")
    p.add_argument("--saves", type=int, default=2, help="saves per segment")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="a ~5M-parameter model, 1 rank")
    add_rounds_argument(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero-stage", type=int, default=0, help=argparse.SUPPRESS)
    for hidden in ("--corpus", "--tok", "--output-dir", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.jobs, args.hidden, args.layers, args.experts, args.moe_intermediate = "1:0", 128, 2, 8, 128
        args.every, args.saves = 2, 1
    return args


def measure(a) -> dict:
    from benchmarks.bench_trainer import tiny_corpus_and_tokenizer

    jobs, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus, tok, _ = tiny_corpus_and_tokenizer(workdir)
        for job in a.jobs.split(","):
            ranks, stage = (int(x) for x in job.split(":"))
            jobs.append(run_job(a, ranks, stage, corpus, tok, workdir))
    return {"args": {k: v for k, v in vars(a).items() if k not in ("corpus", "tok", "output_dir", "out")},
            "jobs": jobs, "load_average": [load_before, os.getloadavg()[0]]}


def lost_per_save(job: dict, mode: str, saves: int) -> list[float]:
    """Seconds of training lost per save in each round: (segment - the round's no-save segment) / saves."""
    return [(r[mode]["seconds"] - r["none"]["seconds"]) / saves for r in job["rounds"]]


def report(result: dict, peak_flops: float | None = None) -> str:
    a, jobs = result["args"], result["jobs"]
    steps = (a["saves"] + 1) * a["every"]
    lines = [f"Gated MoE of {jobs[0]['params'] / 1e6:.0f}M parameters (hidden {a['hidden']}, {a['layers']} layers, "
             f"{a['experts']} experts of {a['moe_intermediate']}), fp32 AdamW, batches of 1 x {a['seq_len']} tokens. "
             f"Each of {a['rounds']} rounds runs three segments of {steps} steps in turn: no save, a synchronous save "
             f"every {a['every']} steps, a background save every {a['every']} steps ({a['saves']} saves each, the "
             "last one waited for). Lost per save = (segment - no-save segment) / saves, within a round; "
             "min / median / max over the rounds. Boundary: how long each background save held the training "
             "loop (the host copy); write: how long its writer thread took to write and fsync the files. Load "
             "average (1 min) at the start and the end: " + " / ".join(f"{x:.1f}" for x in result["load_average"])
             + ".", "",
             "| ranks, ZeRO | state per save | step (no save) | lost per save, synchronous | "
             "lost per save, background | boundary, background | write, background | background / synchronous |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    goals = []
    for job in jobs:
        sync, background = lost_per_save(job, "sync", a["saves"]), lost_per_save(job, "background", a["saves"])
        ratio = Spread.of(b / s for b, s in zip(background, sync))
        step = statistics.median(r["none"]["seconds"] / steps for r in job["rounds"])
        boundary = Spread.of(statistics.median(r["background"]["boundary"]) for r in job["rounds"])
        write = Spread.of(statistics.median(r["background"]["write"]) for r in job["rounds"])
        where = f"{job['ranks']} rank{'s' * (job['ranks'] > 1)}, ZeRO {job['zero_stage']}"
        lines.append(f"| {where} | {job['state_bytes'] / 2**30:.2f} GiB | {step:.2f} s "
                     f"| {Spread.of(sync).format('{:.2f}', ' s')} | {Spread.of(background).format('{:.2f}', ' s')} "
                     f"| {boundary.format('{:.2f}', ' s')} | {write.format('{:.1f}', ' s')} "
                     f"| {ratio.format('{:.2f}', 'x')} |")
        goals.append(f"{where}: " + goal("background / synchronous", ratio, "<=", GOAL, "{:.2f}", "x"))
    lines += ["", "Goal (issue 15, min / median / max over the rounds): " + "; ".join(goals) + "."]
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return
    print(report(measure(a)))


if __name__ == "__main__":
    main()
