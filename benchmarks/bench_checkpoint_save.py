"""Training time lost per checkpoint save: synchronous against background (train.async_save), side by side.

One process (or one torchrun job of --ranks gloo ranks) builds the Trainer once for a ~210M-parameter gated MoE
with tiny batches (1 x --seq-len tokens), so that a step is short and the save of ~2.5 GB of state (fp32 weights
and AdamW moments) dominates. Four modes: no save; a synchronous save with torch.save (DeepSpeed's default writer:
buffered, zip CRC); a synchronous save with the O_DIRECT writer (launch/direct_write.py); a background save (the
host copy at the step boundary into page-aligned host buffers reused from save to save, the O_DIRECT write and
fsync in a thread; launch/checkpoint.py). One saver per mode saves once before the rounds. A cycle is one save of a
mode, --every steps, and the wait for that save, so everything a save costs training falls inside its cycle. No
cycle deletes an old checkpoint: between turns, untimed, all but the newest are deleted and the disk is given
--settle seconds (ext4 `discard` trims freed blocks seconds after a delete). Each round runs --saves turns of one
cycle per mode, the order rotated from turn to turn, so a slow stretch of the machine hits the modes alike.
Training time lost per save = what the save call and the wait held the loop, plus a cycle's steps at the difference
of the median step with and without the save (lost_per_save: steps here are sometimes 2x slower in every mode,
saves or not; the paired mean of whole cycles is reported beside it). Goal (issue 15): background <= 20% of
synchronous in the worst round.

    python benchmarks/bench_checkpoint_save.py                 # 1 rank ZeRO-0, then 2 ranks ZeRO-2 EP 2
    python benchmarks/bench_checkpoint_save.py --jobs 2:2      # 2 ranks, ZeRO-2, no expert parallelism
    python benchmarks/bench_checkpoint_save.py --smoke         # a small model, 1 rank
"""

from __future__ import annotations

import argparse
import itertools
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
MODES = ("none", "sync_torch_save", "sync", "background")


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
            f"zero_stage={a.zero_stage}", f"train.expert_parallel_size={a.expert_parallel}", "max_steps=100000",
            "save_interval=100000", "train.keep_last=2",
            "train.warmup_steps=0", "train.eval_interval=0", "train.progress_bar=false", "train.tensorboard=false",
            "train.peak_tflops=1.0", "resume=none",
            # glibc keeps freed blocks: without it ~1.5 GiB of fresh pages are faulted in every step, and steps
            # vary by up to 3x, more than a save costs (launch/host_memory.py)
            "train.host_allocator_cache=true", *model_overrides(a)]


def torch_save_and_fsync(obj, path) -> None:
    """What DeepSpeed's default checkpoint engine does: torch.save (buffered, with the zip CRC), here fsynced."""
    import torch

    from seedlm.launch.checkpoint import fsync_path

    torch.save(obj, path)
    fsync_path(path)


def worker(a) -> None:
    """Under torchrun or alone: one Trainer, --rounds rounds of --saves turns of the four modes' cycles; rank 0
    writes the times."""
    import dataclasses

    import torch

    from seedlm.launch import checkpoint
    from seedlm.launch.config import load_run_config
    from seedlm.launch.distributed import barrier
    from seedlm.launch.trainer import Trainer

    trainer = Trainer(load_run_config("gated_moe_tiny", run_overrides(a, a.corpus, a.tok, a.output_dir)))
    params = trainer.engine.module.config.parameter_counts().total  # the whole model (a rank holds 1/EP of the experts)
    # the same 8 batches over and over: reading and tokenizing the stream would add slow steps of its own
    loader = iter(trainer.train_loader)
    batches = itertools.cycle([next(loader) for _ in range(8)])
    trainer.engine.train()
    # one saver per mode for the whole run, as in training: the background saver's host buffers are reused
    # keep_last above a turn's saves: no save deletes an older checkpoint inside a timed cycle (settle() does)
    savers = {mode: checkpoint.CheckpointSaver(trainer.checkpoint_root, len(MODES), trainer.dist.rank,
                                               background=mode == "background") for mode in MODES if mode != "none"}
    direct_writer = checkpoint.save_direct

    def use(mode: str) -> None:
        trainer.t = dataclasses.replace(trainer.t, async_save=mode == "background")
        trainer.saver = savers.get(mode)
        # the torch.save baseline: the same saver with DeepSpeed's writer in place of launch/direct_write.py's
        checkpoint.save_direct = torch_save_and_fsync if mode == "sync_torch_save" else direct_writer

    def settle() -> None:
        """Between turns, untimed: delete all but the newest checkpoint, flush, and give the disk --settle
        seconds. On ext4 mounted with `discard` (these machines) the freed blocks are trimmed after the next
        journal commit, seconds later, and that work would land in whichever cycle ran then; deleting old
        checkpoints costs every mode the same and is not what is measured here."""
        barrier()
        if trainer.dist.rank == 0:
            checkpoint.prune(trainer.checkpoint_root, keep_last=1)
        os.sync()
        time.sleep(a.settle)
        barrier()

    for mode in savers:  # warm-up: optimizer state exists, each saver has saved once
        use(mode)
        trainer.count_step(trainer.train_step(batches))
        trainer.checkpoint()
        trainer.checkpoint_published(wait=True)
    settle()

    def cycle(mode: str) -> dict:
        """One save of `mode` (none: no save), then --every steps, then the wait for the save in flight: all the
        save costs training falls inside the cycle."""
        use(mode)
        written = len(trainer.saver.write_seconds) if trainer.saver else 0
        steps, boundary, wait = [], 0.0, 0.0
        barrier()
        start = time.perf_counter()
        if trainer.saver:
            trainer.checkpoint()
            boundary = time.perf_counter() - start
        for _ in range(a.every):
            t0 = time.perf_counter()
            trainer.count_step(trainer.train_step(batches))
            if trainer.saver:
                trainer.checkpoint_published()
            steps.append(time.perf_counter() - t0)
        if trainer.saver:
            t0 = time.perf_counter()
            trainer.checkpoint_published(wait=True)  # the write counts in full
            wait = time.perf_counter() - t0
        seconds = time.perf_counter() - start
        barrier()
        record = {"seconds": seconds, "steps": steps, "boundary": boundary, "wait": wait}
        if trainer.saver:
            record.update(write=trainer.saver.write_seconds[written],
                          write_cpu=trainer.saver.write_cpu_seconds[written])
        return record

    rounds = []
    for _ in range(a.rounds):
        cycles = {mode: [] for mode in MODES}
        for rep in range(a.saves):  # the modes in turn, the order rotated from save to save
            for mode in MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]:
                cycles[mode].append(cycle(mode))
            settle()
        rounds.append(cycles)
    checkpoint.save_direct = direct_writer
    if trainer.dist.rank == 0:
        saved = max(trainer.checkpoint_root.glob("step_*"), key=lambda p: p.name)
        state_bytes = sum(f.stat().st_size for f in saved.rglob("*.pt"))
        Path(a.out).write_text(json.dumps({"params": params, "state_bytes": state_bytes, "rounds": rounds,
                                           "threads": torch.get_num_threads()}))


def run_job(a, ranks: int, zero_stage: int, ep: int, corpus: Path, tok: Path, workdir: Path) -> dict:
    """One worker process (a torchrun job when ranks > 1); its result."""
    from seedlm.launch.distributed import free_port

    out = workdir / f"result_{ranks}_{zero_stage}_{ep}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    if a.nt_threshold:
        from seedlm.launch.host_memory import NON_TEMPORAL_TUNABLE

        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(NON_TEMPORAL_TUNABLE)]
        env["GLIBC_TUNABLES"] = ":".join([*tunables, f"{NON_TEMPORAL_TUNABLE}={a.nt_threshold}"])
    launcher = [sys.executable]
    if ranks > 1:  # the cores are split between the ranks
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    worker_args = ["--worker", "--zero-stage", str(zero_stage), "--expert-parallel", str(ep),
                   "--corpus", str(corpus), "--tok", str(tok),
                   "--output-dir", str(workdir / f"run_{ranks}_{zero_stage}_{ep}"), "--out", str(out),
                   "--rounds", str(a.rounds), "--every", str(a.every), "--saves", str(a.saves),
                   "--hidden", str(a.hidden), "--layers", str(a.layers), "--experts", str(a.experts),
                   "--moe-intermediate", str(a.moe_intermediate), "--seq-len", str(a.seq_len),
                   "--settle", str(a.settle)]
    result = subprocess.run([*launcher, str(Path(__file__).resolve()), *worker_args], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"checkpoint-save job ({ranks} ranks, ZeRO {zero_stage}, EP {ep}) failed:\n"
                           f"{result.stderr[-3000:]}")
    return {"ranks": ranks, "zero_stage": zero_stage, "expert_parallel": ep, **json.loads(out.read_text())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 2 ranks with expert parallelism: the 64-GPU EP-8 shape in small, each rank writing its own experts
    # (2:2, the dense model on 2 ranks, is 3.9 s steps of gloo traffic whose noise hides a save's cost)
    p.add_argument("--jobs", default="1:0,2:2:2",
                   help="RANKS:ZERO_STAGE[:EXPERT_PARALLEL],... one job each (expert parallel 1 unless given)")
    p.add_argument("--every", type=int, default=2, help="steps after each save, in its cycle")
    p.add_argument("--saves", type=int, default=4, help="saves per mode and round (turns of the four modes)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--settle", type=float, default=6.0,
                   help="untimed seconds between turns, after deleting the turn's checkpoints (ext4 discard)")
    p.add_argument("--nt-threshold", type=int, default=4 << 20,
                   help="glibc's non-temporal threshold in bytes for the jobs (GLIBC_TUNABLES, launch/host_memory.py: "
                        "the host copies stream above it); 0 leaves glibc's own (~180 MiB on these VMs)")
    p.add_argument("--smoke", action="store_true", help="a ~5M-parameter model, 1 rank")
    p.add_argument("--json", type=Path, help="also write every step's and save's seconds to this file")
    add_rounds_argument(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero-stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--expert-parallel", type=int, default=1, help=argparse.SUPPRESS)
    for hidden in ("--corpus", "--tok", "--output-dir", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    resolve_rounds(args)
    parse_jobs(args.jobs)  # a mistyped --jobs stops here, before any model is built
    if args.smoke:
        args.jobs, args.hidden, args.layers, args.experts, args.moe_intermediate = "1:0", 128, 2, 8, 128
        args.every, args.saves, args.settle = 1, 1, 0.0
    return args


def parse_jobs(spec: str) -> list[tuple[int, int, int]]:
    """"1:0,2:2:2" -> [(ranks, zero stage, expert parallel size), ...]."""
    jobs = []
    for job in spec.split(","):
        fields = job.split(":")
        if not 2 <= len(fields) <= 3 or not all(f.isdigit() for f in fields):
            raise SystemExit(f"--jobs: {job!r} is not RANKS:ZERO_STAGE[:EXPERT_PARALLEL] (e.g. 2:2 or 2:2:2)")
        ranks, stage, ep = (int(f) for f in (*fields, "1")[:3])
        if ranks < 1 or stage not in (0, 1, 2, 3) or ep < 1 or ranks % ep:
            raise SystemExit(f"--jobs: {job!r}: ranks >= 1, ZeRO stage 0-3, and an expert-parallel size that "
                             "divides the ranks")
        jobs.append((ranks, stage, ep))
    return jobs


def measure(a) -> dict:
    from benchmarks.bench_trainer import tiny_corpus_and_tokenizer

    jobs, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus, tok, _ = tiny_corpus_and_tokenizer(workdir)
        for ranks, stage, ep in parse_jobs(a.jobs):
            jobs.append(run_job(a, ranks, stage, ep, corpus, tok, workdir))
    return {"args": {k: v for k, v in vars(a).items() if k not in ("corpus", "tok", "output_dir", "out")},
            "jobs": jobs, "load_average": [load_before, os.getloadavg()[0]]}


def lost_per_save(job: dict, mode: str) -> list[float]:
    """Seconds of training lost per save in each round, robustly: what the save call and the final wait held the
    loop (mean over the round's turns), plus --every steps at the difference between the median step of the
    mode's cycles and of the no-save cycles. A step here is sometimes 2x slower in every mode, saves or not
    (the machine, not the save: see slow_step_share); the medians on both sides leave those out alike, and a
    save that slowed every step it overlaps would still move its median."""
    lost = []
    for r in job["rounds"]:
        held = statistics.mean(c["boundary"] + c["wait"] for c in r[mode])
        step = statistics.median(s for c in r[mode] for s in c["steps"])
        step_none = statistics.median(s for c in r["none"] for s in c["steps"])
        lost.append(held + len(r[mode][0]["steps"]) * (step - step_none))
    return lost


def paired_lost_per_save(job: dict, mode: str) -> list[float]:
    """The same without medians: per round, the mean over turns of (the cycle's seconds - the same turn's
    no-save cycle's seconds). Unbiased, tails and all, but a single slow step moves it by a second."""
    return [statistics.mean(c["seconds"] - n["seconds"] for c, n in zip(r[mode], r["none"])) for r in job["rounds"]]


def slow_step_share(job: dict, mode: str) -> float:
    """Share of the mode's steps (all rounds) over 1.5x the median no-save step."""
    median = statistics.median(s for r in job["rounds"] for c in r["none"] for s in c["steps"])
    steps = [s for r in job["rounds"] for c in r[mode] for s in c["steps"]]
    return sum(s > 1.5 * median for s in steps) / len(steps)


MODE_NAMES = {"none": "no save", "sync_torch_save": "synchronous, torch.save", "sync": "synchronous, O_DIRECT",
              "background": "background (O_DIRECT)"}


def report(result: dict, peak_flops: float | None = None) -> str:
    a, jobs = result["args"], result["jobs"]
    lines = [f"Gated MoE of {jobs[0]['params'] / 1e6:.0f}M parameters (hidden {a['hidden']}, {a['layers']} layers, "
             f"{a['experts']} experts of {a['moe_intermediate']}), fp32 AdamW, batches of 1 x {a['seq_len']} tokens. "
             "Modes: no save; a synchronous save with torch.save (DeepSpeed's default writer: buffered, zip CRC); "
             "a synchronous save with the O_DIRECT writer (launch/direct_write.py); a background save with that "
             f"writer. glibc's non-temporal threshold: "
             + (f"{a['nt_threshold'] / 2**20:g} MiB (GLIBC_TUNABLES: the background save's host copies stream past "
                "the caches). " if a.get("nt_threshold") else "glibc's own. ")
             + f"A cycle: one save, {a['every']} step{'s' * (a['every'] > 1)}, the wait for the save in "
             "flight (old checkpoints are deleted between turns, untimed). Each of "
             f"{a['rounds']} rounds runs {a['saves']} turns of one cycle per mode (order rotated). "
             "Lost per save: the seconds the save call and the final wait held the loop + the steps of a cycle at "
             "(the mode's median step - the no-save median step), per round; paired: the mean over turns of (the "
             "cycle's seconds - the same turn's no-save cycle's seconds), unbiased but moved a second by one slow "
             "step. Slow steps: share over 1.5x the no-save median, all rounds. Held: how long a save call held "
             "the loop (for the background save, the host copy); write: how long the background writer took to "
             "write and fsync the files, and its thread's CPU. min / median / max over the rounds. Load average "
             "(1 min) at the start and the end: " + " / ".join(f"{x:.1f}" for x in result["load_average"]) + ".",
             "", "| ranks, ZeRO | mode | state per save | median step | slow steps | held per save | "
             "lost per save | lost per save, paired | lost / synchronous O_DIRECT | lost / synchronous torch.save |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    goals = []
    for job in jobs:
        where = f"{job['ranks']} rank{'s' * (job['ranks'] > 1)}, ZeRO {job['zero_stage']}"
        if job.get("expert_parallel", 1) > 1:
            where += f", EP {job['expert_parallel']}"
        lost = {mode: lost_per_save(job, mode) for mode in MODES if mode != "none"}
        ratios = {mode: {base: Spread.of(x / y for x, y in zip(lost[mode], lost[base]))
                         for base in ("sync", "sync_torch_save")} for mode in lost}
        for mode in MODES:
            step = statistics.median(s for r in job["rounds"] for c in r[mode] for s in c["steps"])
            cells = [where if mode == "none" else "", MODE_NAMES[mode],
                     f"{job['state_bytes'] / 2**30:.2f} GiB" if mode == "none" else "", f"{step:.2f} s",
                     f"{100 * slow_step_share(job, mode):.0f}%"]
            if mode == "none":
                cells += ["-"] * 5
            else:
                held = Spread.of(statistics.mean(c["boundary"] for c in r[mode]) for r in job["rounds"])
                cells += [held.format("{:.2f}", " s"), Spread.of(lost[mode]).format("{:.2f}", " s"),
                          Spread.of(paired_lost_per_save(job, mode)).format("{:.2f}", " s"),
                          ratios[mode]["sync"].format("{:.2f}", "x"),
                          ratios[mode]["sync_torch_save"].format("{:.2f}", "x")]
            lines.append("| " + " | ".join(cells) + " |")
        write = Spread.of(statistics.median(c["write"] for c in r["background"]) for r in job["rounds"])
        write_cpu = Spread.of(statistics.median(c["write_cpu"] for c in r["background"]) for r in job["rounds"])
        goals.append(f"{where}: " + goal("background / synchronous O_DIRECT", ratios["background"]["sync"], "<=", GOAL,
                                         "{:.2f}", "x")
                     + "; " + goal("background / synchronous torch.save", ratios["background"]["sync_torch_save"],
                                   "<=", GOAL, "{:.2f}", "x")
                     + f" (the background writer took {write.format('{:.1f}', ' s')} and "
                     f"{write_cpu.format('{:.2f}', ' s')} of CPU a save)")
    lines += ["", "Goal (issue 15, min / median / max over the rounds): " + "; ".join(goals) + "."]
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return
    result = measure(a)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1, default=str))
    print(report(result))


if __name__ == "__main__":
    main()
