"""glibc's malloc with its default (self-raising) mmap threshold against a fixed 1 MiB threshold and against
keeping freed blocks (train.host_allocator_cache), on a 2-rank `seedlm train`: per-rank peak resident memory and
tokens/s, side by side.

glibc serves allocations below its mmap threshold from the heap and raises the threshold (up to 32 MiB) each
time a larger block is freed, so the blocks a training step frees (a ZeRO-3 layer's gathered weights, its
activations) stay in the heap, resident, after the first step. A fixed threshold (mallopt M_MMAP_THRESHOLD,
or the environment variable MALLOC_MMAP_THRESHOLD_) maps every block of 1 MiB and more on its own and hands it
back when freed, at the price of fresh zero-filled pages at every allocation. This measures both sides:
`seedlm train` (ZeRO 3, 2 gloo ranks, a ~32M-parameter gated MoE in fp32) runs with glibc's default (seedlm's
default too), with the threshold fixed (`train.host_mmap_threshold`: null against 1 MiB) and with glibc keeping
every freed block for reuse (`train.host_allocator_cache=true`: no block mapped on its own), in turn, --rounds
rounds; each rank runs under /usr/bin/time for its peak RSS, and metrics.jsonl gives tokens/s per step
(median after the first two steps).

    python benchmarks/bench_host_allocator.py            # ~4 minutes on 2 cores
    python benchmarks/bench_host_allocator.py --smoke    # a tiny model, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.rounds import (  # noqa: E402
    add_rounds_argument,
    goal,
    interleaved_rounds,
    ratio_spread,
    resolve_rounds,
)

MODES = {"glibc default": {"train.host_mmap_threshold": "null"},
         "fixed 1 MiB": {"train.host_mmap_threshold": str(1 << 20)},
         "glibc cache": {"train.host_allocator_cache": "true"}}
GOAL_SLOWDOWN = 1.05  # what a default-on fixed threshold would have to meet: at most 5% slower


def model_fields(smoke: bool) -> dict:
    if smoke:
        return {}
    return {"model_overrides.hidden_size": 512, "model_overrides.num_hidden_layers": 4,
            "model_overrides.num_attention_heads": 8, "model_overrides.head_dim": 64,
            "model_overrides.moe_intermediate_size": 512, "model_overrides.shared_expert_intermediate_size": 512}


def build_deepspeed_shm_op() -> None:
    """DeepSpeed compiles its shared-memory collectives for CPU (g++, ~1.2 GB resident) in the first gloo run on a
    machine (a torch extension, cached after): built here, in this process, because a rank's peak RSS under
    /usr/bin/time counts the compiler it waited for (rusage of reaped children); a first measured run read
    1.78 GB for the tiny model's rank 1."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def two_rank_train_peak_rss(train_args: list[str], cwd: Path, timeout: float | None = None) -> list[int]:
    """`seedlm train TRAIN_ARGS` on 2 gloo ranks (one thread each), each rank under /usr/bin/time: each rank's
    peak RSS in bytes, in rank order. glibc's own MALLOC_* variables are dropped: the run's settings are what is
    measured."""
    from seedlm.launch.distributed import free_port

    build_deepspeed_shm_op()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(name, None)
    with tempfile.TemporaryDirectory() as tmp:
        # each rank writes its own file, named by the RANK torchrun gives it (sh expands it): one file for all
        # gets the lines in the order the ranks exit, which a loaded machine changes from run to run
        peak_file = Path(tmp) / "peak_rss_kb"
        rank_under_time = 'exec /usr/bin/time -o "$0.$RANK" -f %M "$@"'
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "--no-python", "sh", "-c", rank_under_time, str(peak_file),
               sys.executable, "-m", "seedlm.launch.cli", "train", *train_args]
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"seedlm train on 2 ranks failed:\n{result.stderr[-4000:]}")
        return [int(Path(f"{peak_file}.{rank}").read_text().split()[-1]) * 1024 for rank in range(2)]


def run(a, workdir: Path, corpus: Path, tok: Path, mode: str, index: int) -> dict:
    """One 2-rank ZeRO-3 run: {"peak_rss": worst rank's bytes, "tokens_per_sec": median after step 2}."""
    out = workdir / f"run_{index}"
    fields = {"output_dir": out, "tokenizer.path": tok, "data.sources": f"[{{kind: jsonl, path: {corpus}}}]",
              "data.seq_len": a.seq_len, "data.micro_batch_size": 2, "data.num_workers": 0,
              "model_overrides.vocab_size": 512, "zero_stage": 3, "max_steps": a.steps, "save_interval": 100000,
              "train.eval_interval": 0, "train.log_interval": 1, "train.progress_bar": "false",
              "train.tensorboard": "false", "train.peak_tflops": 1.0, **MODES[mode],
              **model_fields(a.smoke)}
    peaks = two_rank_train_peak_rss(["gated_moe_tiny", *[f"{k}={v}" for k, v in fields.items()]], REPO)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r and r.get("step", 0) > 2]
    return {"peak_rss": max(peaks), "tokens_per_sec": statistics.median(speeds)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="the tiny preset, a few steps")
    add_rounds_argument(p)
    a = p.parse_args(argv)
    resolve_rounds(a)
    if a.smoke:
        a.steps, a.seq_len = 4, 32
    return a


def measure(a) -> dict:
    from benchmarks.bench_trainer import tiny_corpus_and_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus, tok, _ = tiny_corpus_and_tokenizer(workdir)
        counter = iter(range(10**6))
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}

        def measure_once(mode):
            def once():
                results[mode].append(run(a, workdir, corpus, tok, mode, next(counter)))
                return 0.0
            return once

        interleaved_rounds({mode: measure_once(mode) for mode in MODES}, a.rounds)
    return {"args": vars(a), "results": results, "load_average": os.getloadavg()[0]}


def report(result: dict, peak_flops: float | None = None) -> str:
    a, results = result["args"], result["results"]
    default = results["glibc default"]

    def against_default(mode):  # (peak RSS, time per token) of `mode` / the default's, over the rounds
        rows = results[mode]
        return (ratio_spread([r["peak_rss"] for r in rows], [r["peak_rss"] for r in default]),
                ratio_spread([r["tokens_per_sec"] for r in default], [r["tokens_per_sec"] for r in rows]))

    (memory, slowdown), (cache_memory, cache_time) = against_default("fixed 1 MiB"), against_default("glibc cache")
    lines = [f"2 gloo ranks, ZeRO 3, {a['steps']} steps of 2 x {a['seq_len']} tokens, {a['rounds']} rounds "
             f"(load average at the end {result['load_average']:.2f}).", "",
             "| allocator | peak RSS, worst rank, per round | tokens/s, per round |", "|---|---|---|"]
    for mode, rows in results.items():
        peaks = " / ".join(f"{r['peak_rss'] / 2**20:.0f}" for r in rows)
        speeds = " / ".join(f"{r['tokens_per_sec']:.0f}" for r in rows)
        lines.append(f"| {mode} | {peaks} MiB | {speeds} |")
    lines += ["", f"Peak RSS, fixed / default (min / median / max over the rounds): {memory.format('{:.2f}', 'x')}. "
              + goal("Time per token, fixed / default", slowdown, "<=", GOAL_SLOWDOWN, "{:.3f}", "x") + ". "
              f"With the cache (train.host_allocator_cache), against the default: peak RSS "
              f"{cache_memory.format('{:.2f}', 'x')}, time per token {cache_time.format('{:.3f}', 'x')}."]
    return "\n".join(lines)


def main(argv=None) -> None:
    print(report(measure(parse_args(argv))))


if __name__ == "__main__":
    main()
