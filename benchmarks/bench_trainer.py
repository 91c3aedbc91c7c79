"""`seedlm train` against a bare PyTorch loop, and per-rank memory of ZeRO 0-3, side by side in one run.

1. Throughput: the same model preset, batch and AdamW hyperparameters, on the same packed batches:
   a bare loop (model, torch.optim.AdamW, clip, no DeepSpeed) and `seedlm train` (ZeRO 0 and ZeRO 1; the
   Trainer itself, paced), each a fresh process so that neither inherits the other's heap or threads, and
   all three stepped in turn one step at a time (paced_loops), so that a machine whose speed drifts slows
   them alike. --rounds rounds of --steps steps after --warmup; each ratio to the bare loop is taken within
   a round and reported as min / median / max over the rounds (benchmarks/rounds.py). Goal: overhead <= 10%
   in the worst round.
2. Memory: on 2 gloo ranks, the bytes each rank holds in parameters (its ZeRO-3 partition), fp32 master
   copies and optimizer state after one step, for ZeRO 0, 1, 2 and 3. Goal: ZeRO-3 <= 0.55x ZeRO-0.

    python benchmarks/bench_trainer.py            # ~4 minutes on 2 cores
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
from benchmarks.rounds import (  # noqa: E402
    Spread,
    add_rounds_argument,
    goal,
    goal_status,
    ratio_spread,
    resolve_rounds,
)


class BareLoop:
    """Plain PyTorch: fetch a batch, forward with labels, backward, clip, AdamW step."""

    def __init__(self, preset: str, tok_dir: Path, data_args: dict, lr: float):
        import torch
        from transformers import AutoModelForCausalLM

        from seedlm.data_pipeline import DataConfig, build_dataloader, load_tokenizer
        from seedlm.launch.presets import load_model_config

        tokenizer = load_tokenizer(tok_dir)
        data_cfg = DataConfig.from_dict({**data_args, "tokenizer": str(tok_dir)})
        self.batches = iter(build_dataloader(data_cfg, tokenizer))
        config = load_model_config(preset, vocab_size=len(tokenizer))
        torch.manual_seed(0)
        self.net = AutoModelForCausalLM.from_config(config).train()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step(self) -> None:
        import torch

        batch = next(self.batches)  # the batch fetch counts, as in the trainer's tokens/s window
        loss = self.net(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- paced loops
# This VM kind's speed drifts from minute to minute (a 2048^3 matmul at 70-145 GFLOP/s within one minute), so
# loops run one after the other, even in rounds, compare different machines. Here each loop lives in its own
# fresh process (its own heap and threads) and the coordinator lets one step run at a time, the loops in turn:
# a drift slows every loop's steps alike.

PACE_GAP_S = 0.05  # between turns: the last loop's OpenMP threads stop spinning before the next one starts


def train_overrides(tok_dir: Path, data_args: dict, max_steps: int, lr: float, out: Path, extra=()) -> list[str]:
    """`seedlm train` overrides for the benchmark loader's data: no eval, one save at the end, no progress bar."""
    return [
        f"output_dir={out}", f"tokenizer.path={tok_dir}", f"max_steps={max_steps}", f"train.lr={lr}",
        "train.warmup_steps=0", "train.eval_interval=0", f"save_interval={max_steps}", "train.progress_bar=false",
        "train.tensorboard=false", "train.peak_tflops=1.0", "resume=none",
        f"model_overrides.vocab_size={data_args['vocab_size']}", *extra,
    ] + [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in data_args.items()
         if k != "vocab_size"]


def paced_worker(spec: dict) -> None:
    """One loop in this process, stepped by the coordinator over the socket `spec['fd']`: ('ready', name) once
    built, then for each 'go' one step, answered with the seconds from the 'go' to the next step's start (so the
    trainer's own work between steps counts); 'finish' runs the last step untimed and lets the loop end."""
    from multiprocessing.connection import Connection

    import torch

    torch.set_num_threads(2)
    conn = Connection(spec["fd"])
    if spec["loop"] == "bare":
        loop = BareLoop(spec["preset"], Path(spec["tok_dir"]), spec["data_args"], spec["lr"])
        conn.send(("ready", spec["name"]))
        while conn.recv() == "go":
            start = time.perf_counter()
            loop.step()
            conn.send(time.perf_counter() - start)
        return

    from seedlm.launch.config import check_run_config, load_run_config
    from seedlm.launch.distributed import exit_process
    from seedlm.launch.trainer import Trainer

    class PacedTrainer(Trainer):
        go_time: float | None = None
        started = False

        def train_step(self, batches):
            now = time.perf_counter()
            if not self.started:
                conn.send(("ready", spec["name"]))
                self.started = True
            elif self.go_time is not None:
                conn.send(now - self.go_time)
            self.go_time = time.perf_counter() if conn.recv() == "go" else None
            return super().train_step(batches)

    run = load_run_config(spec["preset"], spec["overrides"])
    check_run_config(run)
    PacedTrainer(run).train()
    exit_process(0)  # as the `seedlm` command leaves (gloo's teardown)


def paced_loops(specs: dict[str, dict], warmup: int, steps: int, logdir: Path) -> dict[str, list[float]]:
    """{name: seconds of each timed step}: each loop of `specs` in a fresh process (paced_worker), all built
    first, then one step at a time, the loops in turn, the order rotated each step. A trainer spec runs
    warmup + steps + 1 steps (its max_steps): the last one is the untimed 'finish'."""
    import socket
    from multiprocessing.connection import Connection

    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    procs, conns, logs = {}, {}, {}
    try:
        for name, spec in specs.items():
            ours, theirs = socket.socketpair()
            logs[name] = open(logdir / f"{name}.log", "w+")
            procs[name] = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--paced-worker",
                 json.dumps({**spec, "name": name, "fd": theirs.fileno()})],
                cwd=REPO, env=env, pass_fds=[theirs.fileno()], stdout=logs[name], stderr=subprocess.STDOUT)
            theirs.close()  # the child holds its end: a child that dies closes the socket, and recv raises EOFError
            conns[name] = Connection(ours.detach())

        def receive(name):
            try:
                return conns[name].recv()
            except EOFError:
                procs[name].wait()
                logs[name].seek(0)
                raise RuntimeError(f"{name} loop failed (exit {procs[name].returncode}):\n"
                                   f"{logs[name].read()[-3000:]}") from None

        for name in specs:
            message = receive(name)
            if message != ("ready", name):
                raise RuntimeError(f"{name} loop: expected ('ready', {name!r}), got {message!r}")
        seconds = {name: [] for name in specs}
        names = list(specs)
        for i in range(warmup + steps):
            for name in names[i % len(names):] + names[:i % len(names)]:
                time.sleep(PACE_GAP_S)
                conns[name].send("go")
                busy = receive(name)
                if i >= warmup:
                    seconds[name].append(busy)
        for name in names:
            conns[name].send("finish")
        for name, proc in procs.items():
            if proc.wait(timeout=600) != 0:
                logs[name].seek(0)
                raise RuntimeError(f"{name} loop exited {proc.returncode}:\n{logs[name].read()[-3000:]}")
        return seconds
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs.values():
            f.close()


def seedlm_train_records(preset, tok_dir, data_args, max_steps, lr, workdir, name, nproc=1, overrides=()):
    """Run `seedlm train` (under torchrun with `nproc` gloo ranks when nproc > 1); its metrics.jsonl records.

    The machine's cores are split between the ranks (OMP_NUM_THREADS), so 1 and 2 ranks use the same cores.
    """
    from seedlm.launch.distributed import free_port

    out = workdir / name
    overrides = train_overrides(tok_dir, data_args, max_steps, lr, out, overrides)
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    launcher = [sys.executable]
    if nproc > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    result = subprocess.run([*launcher, "-m", "seedlm.launch.cli", "train", preset, *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"seedlm train ({name}) failed:\n{result.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def memory_worker(zero_stage: int, preset: str, vocab: int, out_dir: Path) -> None:
    """Run under torchrun: one step under DeepSpeed, then write this rank's bytes as JSON into out_dir."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from seedlm.launch.distributed import init_distributed
    from seedlm.launch.presets import load_model_config

    init_distributed()  # seedlm's start of the group, which exit_process below relies on
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


def memory_by_stage(preset: str, vocab: int, stages=(0, 1, 2, 3), nproc: int = 2) -> dict[int, dict]:
    """Per-rank model-state bytes after one step on `nproc` gloo ranks, for each ZeRO stage (the larger rank)."""
    from seedlm.launch.distributed import free_port

    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = {}
    for stage in stages:
        with tempfile.TemporaryDirectory() as report_dir:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", str(Path(__file__).resolve()), "--memory-worker", str(stage),
                   "--preset", preset, "--vocab", str(vocab), "--memory-out", report_dir]
            result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            ranks = [json.loads(f.read_text()) for f in sorted(Path(report_dir).glob("rank*.json"))]
        out[stage] = max(ranks, key=lambda r: sum(v for k, v in r.items() if k != "rank"))
    return out


WORDS = "alpha beta gamma delta state token expert router gate value key query".split()


def tiny_corpus_and_tokenizer(workdir: Path) -> tuple[Path, Path, int]:
    """2000 documents of random words as JSONL and a 512-token BPE trained on them: (corpus, tokenizer, vocab)."""
    from seedlm.data_pipeline import train_tokenizer

    corpus = workdir / "docs.jsonl"
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400))) for _ in range(2000)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = train_tokenizer(docs, workdir / "tok", vocab_size=512, max_chars=None)
    return corpus, workdir / "tok", len(tokenizer)


def loader_args(corpus: Path, seq_len: int, micro_batch_size: int) -> dict:
    return {"sources": [{"kind": "jsonl", "path": str(corpus)}], "seq_len": seq_len,
            "micro_batch_size": micro_batch_size, "num_workers": 1, "shuffle_buffer": 64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gated_moe_tiny", help="model preset (configs/models)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round and loop")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="a few steps, to check the script runs")
    add_rounds_argument(p)
    p.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--paced-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--memory-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.steps, args.warmup, args.seq_len, args.micro_batch_size = 3, 1, 64, 2
    return args


def measure(args) -> dict:
    """Bare loop and `seedlm train` ZeRO 0/1 tokens/s per round (paced_loops: --rounds rounds of --steps steps
    each), per-rank memory of ZeRO 0-3, the step's FLOPs."""
    import torch

    from benchmarks.floors import training_step_flops
    from seedlm.launch.presets import load_model_config

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus, tok_dir, vocab = tiny_corpus_and_tokenizer(workdir)
        data_args = loader_args(corpus, args.seq_len, args.micro_batch_size)
        timed = args.rounds * args.steps
        specs = {"bare": {"loop": "bare", "preset": args.preset, "tok_dir": str(tok_dir), "data_args": data_args,
                          "lr": 1e-3}}
        for stage in (0, 1):
            overrides = train_overrides(tok_dir, {**data_args, "vocab_size": vocab}, args.warmup + timed + 1, 1e-3,
                                        workdir / f"run_zero{stage}", [f"zero_stage={stage}"])
            specs[stage] = {"loop": "seedlm train", "preset": args.preset, "overrides": overrides}
        seconds = paced_loops(specs, args.warmup, timed, workdir)
        tokens = args.micro_batch_size * args.seq_len
        per_round = {name: [tokens / statistics.median(s[r * args.steps:(r + 1) * args.steps])
                            for r in range(args.rounds)] for name, s in seconds.items()}
        bare, ours = per_round.pop("bare"), per_round
        memory = memory_by_stage(args.preset, vocab, stages=(0, 3) if args.smoke else (0, 1, 2, 3))
    flops = training_step_flops(load_model_config(args.preset, vocab_size=vocab), args.micro_batch_size, args.seq_len)
    return {"args": vars(args), "threads": torch.get_num_threads(), "bare": bare, "ours": ours, "memory": memory,
            "flops": flops}


def report(result: dict, peak_flops: float) -> str:
    """Markdown: the loops' tokens/s with the floor, then the per-rank memory of each ZeRO stage."""
    a, bare, ours, memory = result["args"], result["bare"], result["ours"], result["memory"]
    floor = result["flops"] / peak_flops
    tokens = a["micro_batch_size"] * a["seq_len"]
    peak_share = lambda tps: Spread.of(100 * floor * t / tokens for t in tps).format("{:.0f}", "%")
    lines = [
        f"`seedlm train` against a bare PyTorch loop: preset {a['preset']}, {a['micro_batch_size']}x{a['seq_len']} "
        f"batches from the same loader, AdamW, clipping; each loop a fresh process with {result['threads']} threads, "
        f"all three stepped in turn, one step at a time (the order rotated each step, {PACE_GAP_S * 1000:.0f} ms "
        f"between turns, the time from a step's start to the next one's counted); {a['warmup']} warm-up steps, then "
        f"{a['rounds']} rounds of {a['steps']} steps, tokens/s the median step of a round. Tokens/s: the median over "
        "the rounds; ratios: min / median / max over the rounds, each taken within a round. % of peak: the step's "
        "forward + backward FLOPs (AdamW not counted) at the "
        "matmul peak.",
        "",
        "| loop | tokens/s | vs bare loop | % of peak |",
        "|---|---:|---:|---:|",
        f"| bare PyTorch loop | {statistics.median(bare):,.0f} | 1.00x | {peak_share(bare)} |",
    ]
    for stage, tps in ours.items():
        # one process: zero_stage=1 takes the ZeRO-0 path (launch/engine.py single_process_train_config)
        label = "DeepSpeed ZeRO 0" if stage == 0 else f"zero_stage={stage} (runs the ZeRO-0 path in one process)"
        lines.append(f"| seedlm train, {label} | {statistics.median(tps):,.0f} | "
                     f"{ratio_spread(tps, bare).format('{:.2f}', 'x')} | {peak_share(tps)} |")
    overhead = Spread.of(100 * (1 - min(tps[i] for tps in ours.values()) / bare[i]) for i in range(a["rounds"]))
    lines += ["", "Goal (min / median / max over the rounds): "
              + goal("overhead vs the bare loop, worst stage", overhead, "<=", 10, "{:.1f}", "%") + ".",
              "", f"Per-rank memory (MiB, the larger rank) of parameters, fp32 master copies and optimizer state "
              f"after one step on 2 gloo ranks, {a['preset']}:", "",
              "| ZeRO stage | parameters | fp32 master copies | optimizer state | total | vs ZeRO 0 |",
              "|---|---:|---:|---:|---:|---:|"]
    total = lambda r: sum(v for k, v in r.items() if k != "rank")
    base_total = total(memory[0])
    for stage, r in memory.items():
        mib = [r["params"], r["fp32_masters"], r["optimizer_state"], total(r)]
        cells = " | ".join(f"{v / 2**20:.2f}" for v in mib)
        lines.append(f"| {stage} | {cells} | {total(r) / base_total:.2f}x |")
    ratio = total(memory[3]) / base_total  # bytes: the same in every round, so measured once
    lines += ["", f"Goal: ZeRO-3 <= 0.55x ZeRO-0: {ratio:.2f}x, {goal_status(Spread.of([ratio]), '<=', 0.55)}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker is not None:
        from seedlm.launch.distributed import exit_process

        memory_worker(args.memory_worker, args.preset, args.vocab, args.memory_out)
        exit_process(0)  # not the interpreter's teardown, where DeepSpeed's gloo groups can abort the rank
    if args.paced_worker is not None:
        paced_worker(json.loads(args.paced_worker))
        return 0
    import torch

    from benchmarks.floors import matmul_peak_flops

    torch.set_num_threads(2)
    print(report(measure(args), matmul_peak_flops()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
