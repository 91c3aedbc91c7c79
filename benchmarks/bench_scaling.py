"""Scaling: training over 1 and 2 gloo ranks, expert parallelism, and kernel cost against sequence length.

1. Training tokens/s and per-rank memory of `seedlm train` (real DeepSpeed runs, ZeRO 1, CPU gloo) on 1
   rank and on 2 ranks (same per-rank micro batch, so 2 ranks process twice the tokens per step; the
   machine's cores are split between the ranks), and for the MoE preset expert_parallel_size 1 vs 2 on 2
   ranks. Memory: each run's peak resident set of rank 0 (the trainer's metrics) and the model state a
   rank holds after one step (parameters, fp32 masters, optimizer state; bench_trainer.memory_by_stage).
2. The DeltaProduct chunk kernel against sequence length (linear in T) beside causal softmax attention
   (torch SDPA, same heads and head_dim; quadratic in T), forward + backward, fp32, with each one's FLOP
   floor; a log-log PNG of both.

Each of --rounds rounds runs every training run and times every kernel at every T in turn; ratios (vs 1
rank, % of peak, the log-log slope) are taken within a round and reported as min / median / max over the
rounds (benchmarks/rounds.py); times and tokens/s are the median over the rounds.

    python benchmarks/bench_scaling.py                        # ~5 minutes on 2 cores; PNG in benchmarks/results/
    python benchmarks/bench_scaling.py --smoke                # seconds; no PNG unless --plot PATH
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.rounds import Spread, add_rounds_argument, interleaved_rounds, ratio_spread, resolve_rounds  # noqa: E402

DEFAULT_PLOT = REPO / "benchmarks" / "results" / "scaling_seq_len.png"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gated_moe_tiny", help="MoE model preset (configs/models)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per run and round (median tokens/s)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8, help="per rank")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192],
                   help="T values of the kernel sweep")
    p.add_argument("--householder", type=int, nargs="+", default=[1, 2], help="num_householder values")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="K = V = attention head_dim")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point and round (median) after one warmup")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the kernel sweep")
    p.add_argument("--plot", type=Path, default=None,
                   help=f"PNG path (default {DEFAULT_PLOT.relative_to(REPO)}; with --smoke: none)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 3 steps, to check the script runs")
    add_rounds_argument(p)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.steps, args.warmup, args.seq_len, args.micro_batch_size = 3, 1, 64, 2
        args.seq_lens, args.heads, args.head_dim, args.chunk_size, args.repeats = [64, 128, 256], 2, 16, 32, 1
    elif args.plot is None:
        args.plot = DEFAULT_PLOT
    return args


def training_scaling(args) -> list[dict]:
    """One row per run: ranks, expert-parallel size, tokens/s per round (median after warm-up), memory."""
    from benchmarks.bench_trainer import loader_args, memory_by_stage, seedlm_train_records, tiny_corpus_and_tokenizer

    runs = [("1 rank", 1, 1), ("2 ranks", 2, 1), ("2 ranks, expert parallel 2", 2, 2)]
    if args.smoke:  # the plain 2-rank run is the expert-parallel one's code with other overrides: launches are the
        runs.pop(1)  # smoke run's cost (bench_trainer's smoke measures memory on 2 ranks)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus, tok_dir, vocab = tiny_corpus_and_tokenizer(workdir)
        data_args = {**loader_args(corpus, args.seq_len, args.micro_batch_size), "vocab_size": vocab}
        rss = {name: 0.0 for name, _, _ in runs}
        folders = itertools.count()  # each run writes its own output folder

        def tokens_per_sec(name: str, nproc: int, ep: int) -> float:
            records = seedlm_train_records(args.preset, tok_dir, data_args, args.warmup + args.steps, 1e-3, workdir,
                                           f"run{next(folders)}", nproc=nproc,
                                           overrides=["zero_stage=1", f"expert_parallel_size={ep}"])
            steps = [r for r in records if "tokens_per_sec" in r][args.warmup:]
            rss[name] = max(rss[name], *(r.get("memory_gib", 0.0) for r in steps))
            print(f"  done training: {name}", file=sys.stderr)
            return statistics.median(r["tokens_per_sec"] for r in steps)

        rounds = interleaved_rounds({run: lambda run=run: tokens_per_sec(*run) for run in runs}, args.rounds)
        for (name, nproc, ep), tps in rounds.items():
            rows.append({"name": name, "ranks": nproc, "ep": ep, "tokens_per_sec": tps, "rss_gib": rss[name]})
        # model-state bytes per rank (no expert parallelism: memory_by_stage builds the plain model)
        for row in rows:
            if row["ep"] == 1:
                state = memory_by_stage(args.preset, vocab, stages=(1,), nproc=row["ranks"])[1]
                row["state_bytes"] = sum(v for k, v in state.items() if k != "rank")
    return rows


def attention_fn(q, k, v):
    """Causal softmax attention on [B, T, H, d] inputs (the DeltaProduct kernels' layout)."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)  # [B, T, H, d]


def kernel_scaling(args) -> list[dict]:
    """Seconds of each kernel at each T per round (and their median), with its FLOPs; in each round every
    kernel at every T in turn."""
    import torch

    from benchmarks.bench_delta_product import chunk_fn, make_inputs, median_times
    from benchmarks.floors import causal_attention_flops, chunk_delta_product_flops

    torch.set_num_threads(args.threads)
    H, K = args.heads, args.head_dim
    rows, measures = [], {}
    for T in args.seq_lens:
        for n in args.householder:
            inputs, do = make_inputs(T, n, H, K, K)
            rows.append({"kernel": f"DeltaProduct chunk, n_h={n}", "T": T,
                         "flops": chunk_delta_product_flops(T, n, H, K, K, args.chunk_size)})
            measures[len(rows) - 1] = lambda fn=chunk_fn(n, args.chunk_size), inputs=inputs, do=do: median_times(
                [fn], inputs, do, args.repeats)[0]
        (q, k, v, _, _), do = make_inputs(T, 1, H, K, K)
        rows.append({"kernel": "causal attention (SDPA)", "T": T, "flops": causal_attention_flops(T, H, K)})
        measures[len(rows) - 1] = lambda qkv=(q, k, v), do=do: median_times([attention_fn], qkv, do, args.repeats)[0]
    for i, seconds in interleaved_rounds(measures, args.rounds).items():
        rows[i].update(rounds=seconds, seconds=statistics.median(seconds))
    print("  done kernels", file=sys.stderr)
    return rows


def measure(args) -> dict:
    import torch

    return {"args": vars(args), "training": training_scaling(args), "kernels": kernel_scaling(args),
            "threads": torch.get_num_threads()}


def loglog_slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(time) against log(T): 1 for linear cost, 2 for quadratic."""
    xs, ys = [math.log(t) for t, _ in points], [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(result: dict, path: Path, peak_flops: float) -> Path:
    """Log-log PNG: each kernel's measured ms against T (solid) and its FLOP floor (dashed, same colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["args"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kernel in dict.fromkeys(r["kernel"] for r in result["kernels"]):
        rows = [r for r in result["kernels"] if r["kernel"] == kernel]
        Ts = [r["T"] for r in rows]
        (line,) = ax.plot(Ts, [1e3 * r["seconds"] for r in rows], "o-", label=kernel)
        ax.plot(Ts, [1e3 * r["flops"] / peak_flops for r in rows], "--", color=line.get_color(), alpha=0.6,
                label=f"{kernel}: FLOP floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(f"CPU fp32, {result['threads']} threads: H={a['heads']}, head_dim={a['head_dim']}, B=1")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(result: dict, peak_flops: float, plot_link: str | None = None) -> str:
    """Markdown: the training-scaling table, the kernel-scaling table with floors and fitted slopes, the PNG."""

    a, training = result["args"], result["training"]
    one_rank = training[0]["tokens_per_sec"]
    lines = [
        f"`seedlm train` {a['preset']}, ZeRO 1, {a['micro_batch_size']}x{a['seq_len']} tokens per rank and step, "
        f"CPU gloo; median tokens/s (all ranks) over {a['steps']} steps after {a['warmup']}, {a['rounds']} rounds "
        "of the runs in turn: tokens/s the median over the rounds, vs 1 rank min / median / max over the rounds "
        "(each taken within a round); the machine's cores are split between the ranks. Peak RSS: rank 0's "
        "resident set; model state: parameters + fp32 masters + optimizer state a rank holds after one step (not "
        "measured under expert parallelism).",
        "",
        "| run | tokens/s | tokens/s per rank | vs 1 rank | peak RSS per rank (GiB) | model state per rank (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in training:
        state = f"{r['state_bytes'] / 2**20:.2f}" if "state_bytes" in r else "-"
        tps = statistics.median(r["tokens_per_sec"])
        lines.append(f"| {r['name']} | {tps:,.0f} | {tps / r['ranks']:,.0f} | "
                     f"{ratio_spread(r['tokens_per_sec'], one_rank).format('{:.2f}', 'x')} | {r['rss_gib']:.2f} "
                     f"| {state} |")
    lines += [
        "",
        f"Kernels against sequence length: forward + backward, CPU fp32, {result['threads']} threads, B=1, "
        f"H={a['heads']}, K=V=head_dim={a['head_dim']}, DeltaProduct chunk_size {a['chunk_size']}; median of "
        f"{a['repeats']} after one warmup per round, {a['rounds']} rounds: the time is the median over the rounds, "
        "% of peak and the slope min / median / max over them. Floor: matmul FLOPs (benchmarks/floors.py) at the "
        "matmul peak.",
        "",
        "| kernel | " + " | ".join(f"T={T}" for T in a["seq_lens"]) + " | slope (log time / log T) |",
        "|---|" + "---:|" * (len(a["seq_lens"]) + 1),
    ]
    for kernel in dict.fromkeys(r["kernel"] for r in result["kernels"]):
        rows = [r for r in result["kernels"] if r["kernel"] == kernel]
        cells = []
        for r in rows:
            peak_share = Spread.of(100 * r["flops"] / peak_flops / t for t in r["rounds"]).format("{:.0f}", "%")
            cells.append(f"{1e3 * r['seconds']:.1f} ms ({peak_share})")
        slope = Spread.of(loglog_slope([(r["T"], r["rounds"][i]) for r in rows]) for i in range(a["rounds"]))
        lines.append(f"| {kernel} | " + " | ".join(cells) + f" | {slope.format()} |")
    lines += ["", "(% of peak in parentheses.)"]
    if plot_link:
        lines += ["", f"![kernel time against sequence length, log-log]({plot_link})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.floors import matmul_peak_flops

    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    result = measure(args)
    link = None
    if args.plot is not None:
        link = str(plot(result, args.plot, peak))
    print(report(result, peak, link))
    return 0


if __name__ == "__main__":
    sys.exit(main())
