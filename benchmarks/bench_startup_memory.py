"""Peak host memory per rank at start-up under ZeRO-3: the whole model built on every rank and then
partitioned by deepspeed.initialize (what DeepSpeed does without zero.Init; seedlm before meta-device
construction), against seedlm's path (meta device, each decoder layer materialised, initialised and
partitioned in turn: launch/materialize.py), side by side in one run.

Each configuration runs as its own torchrun job of --ranks gloo ranks: build the model, build the engine
(AdamW, ZeRO-3), one training step on a [1, --seq-len] batch. Each rank reports its VmHWM (the peak resident
set of its own address space, /proc/self/status; unlike ru_maxrss it does not carry the launcher's peak
across exec). The ratio is (peak - the same run's peak with a tiny model) / (16 bytes x parameters / ranks):
the rank's ideal model state (fp32 weights, gradients and two AdamW moments, split evenly). Goal (issue 14):
at most 1.5x at 4 ranks for a ~200M-parameter MoE.

    python benchmarks/bench_startup_memory.py              # ~210M-parameter MoE, 4 ranks (a few minutes)
    python benchmarks/bench_startup_memory.py --smoke      # a small model, 2 ranks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL = 1.5
PATHS = {"full": "whole model on every rank, then deepspeed.initialize partitions it",
         "layered": "seedlm: meta device, layer by layer materialised and partitioned"}


def model_fields(a, tiny: bool) -> dict:
    if tiny:
        return dict(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return dict(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 128, head_dim=64,
                num_experts=a.experts, num_experts_per_tok=4, moe_intermediate_size=a.moe_intermediate)


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(a) -> None:
    """One rank: build, engine, one step; append {rank, params, peak_kib} to --out."""
    import torch

    from seedlm.launch.config import TrainConfig
    from seedlm.launch.distributed import init_distributed
    from seedlm.launch.engine import build_engine
    from seedlm.launch.materialize import build_meta_model, materialize
    from seedlm.model import GatedMoeConfig

    torch.set_num_threads(1)
    dist = init_distributed()
    config = GatedMoeConfig(**json.loads(a.fields), max_position_embeddings=a.seq_len)
    train_cfg = TrainConfig(zero_stage=3, seed=0, lr=1e-4, warmup_steps=0, max_steps=10)
    model = build_meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    if a.path == "full":
        materialize(model, seed=0)  # the whole model here; deepspeed.initialize partitions it
    phases = {"build": peak_rss_kib()}
    engine, _, _ = build_engine(train_cfg, model, micro_batch_size=1, world_size=dist.world_size)
    phases["engine"] = peak_rss_kib()
    ids = torch.randint(0, config.vocab_size, (1, a.seq_len), generator=torch.Generator().manual_seed(dist.rank))
    loss = engine(input_ids=ids, labels=ids).loss
    phases["forward"] = peak_rss_kib()
    engine.backward(loss)
    phases["backward"] = peak_rss_kib()
    engine.step()
    phases["step"] = peak_rss_kib()
    with open(a.out, "a") as f:
        f.write(json.dumps({"rank": dist.rank, "params": params, "peak_kib": peak_rss_kib(), "phases": phases}) + "\n")


def run_job(a, path: str, tiny: bool) -> dict:
    """max over ranks of the peak, and the parameter count, of one torchrun job."""
    from seedlm.launch.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.jsonl"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.ranks}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, "--worker", "--path", path,
               "--fields", json.dumps(model_fields(a, tiny)), "--seq-len", str(a.seq_len), "--out", str(out)]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{path} job failed:\n{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    phases = {phase: max(r["phases"][phase] for r in rows) * 1024 for phase in rows[0]["phases"]}
    return {"params": rows[0]["params"], "phases": phases}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="a ~6M-parameter model on 2 ranks")
    p.add_argument("--rounds", type=int, default=1,
                   help="accepted for `seedlm bench`; peak memory does not depend on load, one round is measured")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=sorted(PATHS), help=argparse.SUPPRESS)
    p.add_argument("--fields", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.ranks, args.hidden, args.layers, args.experts, args.moe_intermediate = 2, 256, 2, 8, 256
    return args


def measure(a) -> dict:
    """Per path: the worst rank's peak after building the model, after deepspeed.initialize (start-up) and after
    the first step, each above the tiny-model run's peak at the same point, against the ideal."""
    result = {"ranks": a.ranks, "rows": []}
    for path in PATHS:
        tiny, big = run_job(a, path, tiny=True), run_job(a, path, tiny=False)
        ideal = 16 * big["params"] / a.ranks
        above = {phase: (big["phases"][phase] - tiny["phases"][phase]) / ideal for phase in ("build", "engine", "step")}
        result["rows"].append({"path": path, "params": big["params"], "ideal_bytes": ideal, "peaks": big["phases"],
                               "ratio_build": above["build"], "ratio_startup": above["engine"],
                               "ratio_step": above["step"]})
    return result


def report(result: dict, peak_flops: float | None = None) -> str:
    gib = 2**30
    rows = result["rows"]
    lines = [f"ZeRO-3, {result['ranks']} ranks, {rows[0]['params'] / 1e6:.0f}M-parameter MoE, fp32 AdamW, batch 1. "
             "Peak resident memory of the worst rank (VmHWM) after building the model, after deepspeed.initialize "
             "(start-up) and after the first step, each above the same run with a tiny model, as a multiple of the "
             f"rank's ideal model state 16 B x parameters / ranks = {rows[0]['ideal_bytes'] / gib:.2f} GiB. "
             f"Goal: start-up <= {GOAL}x.", "",
             "| construction | build | start-up | first step | start-up goal |", "|---|---:|---:|---:|---|"]
    for r in rows:
        status = "met" if r["ratio_startup"] <= GOAL else "missed"
        lines.append(f"| {PATHS[r['path']]} | {r['ratio_build']:.2f}x | {r['ratio_startup']:.2f}x "
                     f"| {r['ratio_step']:.2f}x | {status if r['path'] == 'layered' else '--'} |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        from seedlm.launch.distributed import exit_process

        worker(a)
        exit_process(0)  # not the interpreter's teardown, where DeepSpeed's gloo groups can abort the rank
    print(report(measure(a)))


if __name__ == "__main__":
    main()
