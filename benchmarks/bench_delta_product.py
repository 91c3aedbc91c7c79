"""Benchmark the DeltaProduct kernels on CPU, forward + backward, fp32.

Side by side in one run:
- chunk_delta_product vs recurrent_delta_product for each sequence length T and num_householder n_h;
- at n_h = 1, against transformers' torch_chunk_gated_delta_rule (Qwen3-Next), the same computation:
  it always scales q by K**-0.5 (our default scale) and we pass use_qk_l2norm_in_kernel=False with
  keys already L2-normalised, as our layer does. Outputs are checked equal before anything is timed.

Prints a markdown table and the linearity ratio time(T=4096) / time(T=1024) of the chunk kernel. Each of
--rounds rounds times every T in turn (median of --repeats runs after one warmup), so each ratio is taken
within a round and reported as min / median / max over the rounds (benchmarks/rounds.py).

    python benchmarks/bench_delta_product.py --threads 2
    python benchmarks/bench_delta_product.py --smoke          # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# load the kernel file by path: it is self-contained (it is also shipped as Hub remote code)
_KERNELS = Path(__file__).resolve().parents[1] / "model" / "delta_product_kernels.py"
_spec = importlib.util.spec_from_file_location("delta_product_kernels", _KERNELS)
kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.floors import chunk_delta_product_flops, matmul_peak_flops  # noqa: E402
from benchmarks.rounds import Spread, add_rounds_argument, goal, ratio_spread, resolve_rounds  # noqa: E402


def load_transformers_reference():
    """transformers' torch chunked gated delta rule, unwrapped from its hub-kernel dispatcher, or None."""
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as fn
    except Exception as exc:  # transformers missing or moved the function
        print(f"transformers reference unavailable: {exc}", file=sys.stderr)
        return None
    # the decorator may route to flash-linear-attention when installed; we want the torch code path
    return getattr(fn, "__wrapped__", fn)


def make_inputs(T, n, H, K, V, seed=0):
    """fp32 inputs as the layer produces them: unit keys, beta in [0, 2], a forget gate g <= 0."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, K, generator=gen)
    k = F.normalize(torch.randn(1, T * n, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T * n, H, V, generator=gen)
    beta = 2 * torch.rand(1, T * n, H, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 3.0)
    do = torch.randn(1, T, H, V, generator=gen)
    return (q, k, v, beta, g), do


def fwd_bwd(fn, inputs, do):
    """One forward + backward; returns seconds."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    t0 = time.perf_counter()
    o = fn(*leaves)
    o.backward(do)
    return time.perf_counter() - t0


def median_times(fns, inputs, do, repeats, warmup=None):
    """Median seconds per function; the functions take turns so that load from other processes hits all alike."""
    for fn in fns:
        fwd_bwd(fn, *(warmup or (inputs, do)))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(fwd_bwd(fn, inputs, do))
    return [statistics.median(ts) for ts in times]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="T values")
    p.add_argument("--householder", type=int, nargs="+", default=[1, 2, 3], help="num_householder values")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="K = V")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per cell and round (median) after one warmup; chunk and transformers take turns")
    p.add_argument("--recurrence-repeats", type=int, default=1,
                   help="timed runs per round for the (slow) recurrence")
    p.add_argument("--recurrence-max-len", type=int, default=2048,
                   help="skip the recurrence above this T (it is seconds per call there)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: a few seconds, for CI")
    add_rounds_argument(p)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.seq_lens, args.householder, args.heads, args.head_dim = [64, 256], [1, 2], 2, 16
        args.repeats = args.recurrence_repeats = 1
        args.chunk_size = 32
    return args


def chunk_fn(n, chunk_size):
    return lambda q, k, v, b, g: kernels.chunk_delta_product(
        q, k, v, b, g, num_householder=n, chunk_size=chunk_size)[0]


def recurrent_fn(n):
    return lambda q, k, v, b, g: kernels.recurrent_delta_product(q, k, v, b, g, num_householder=n)[0]


def measure(args) -> dict:
    """Check the kernels agree, then time every (n_h, T) cell; progress goes to stderr."""
    torch.set_num_threads(args.threads)
    H, K = args.heads, args.head_dim
    tf_ref = load_transformers_reference()
    chunk = lambda n: chunk_fn(n, args.chunk_size)
    tf = lambda q, k, v, b, g: tf_ref(q, k, v, g, b, chunk_size=args.chunk_size, use_qk_l2norm_in_kernel=False)[0]

    # correctness first: nothing is timed unless the kernels agree
    checks = []
    for n in args.householder:
        inputs, _ = make_inputs(min(args.seq_lens), n, H, K, K, seed=1)
        err = (chunk(n)(*inputs) - recurrent_fn(n)(*inputs)).abs().max().item()
        checks.append(f"n_h={n}: max |chunk - recurrence| = {err:.2e} (T={min(args.seq_lens)})")
        assert err < 1e-3, "chunk and recurrence disagree"
    if tf_ref is not None and 1 in args.householder:
        for T in args.seq_lens:
            inputs, _ = make_inputs(T, 1, H, K, K, seed=2)
            err = (chunk(1)(*inputs) - tf(*inputs)).abs().max().item()
            checks.append(f"n_h=1: max |chunk - transformers| = {err:.2e} (T={T})")
            assert err < 1e-3, "chunk and transformers disagree: not the same computation"

    rows = []
    for n in args.householder:
        cells = {T: make_inputs(T, n, H, K, K) for T in args.seq_lens}
        by_T = {T: {"n_h": n, "T": T, "chunk": [], "recurrence": [], "transformers": [],
                   "flops": chunk_delta_product_flops(T, n, H, K, K, args.chunk_size)} for T in args.seq_lens}
        fns = [chunk(n)] + ([tf] if n == 1 and tf_ref is not None else [])
        short = make_inputs(32, n, H, K, K)  # the recurrence's warmup: a full-length one costs seconds
        for _ in range(args.rounds):  # every T in turn within a round: linearity compares times seconds apart
            for T, (inputs, do) in cells.items():
                t_c, *t_tf = median_times(fns, inputs, do, args.repeats)
                by_T[T]["chunk"].append(t_c)
                by_T[T]["transformers"] += t_tf
                if T <= args.recurrence_max_len:
                    by_T[T]["recurrence"] += median_times([recurrent_fn(n)], inputs, do, args.recurrence_repeats,
                                                         warmup=short)
            print(f"  done a round of n_h={n}", file=sys.stderr)
        rows += by_T.values()
    return {"args": vars(args), "checks": checks, "rows": rows, "torch": torch.__version__}


def report(result: dict, peak_flops: float) -> str:
    """Markdown: the setup, the checks, one row per (n_h, T) with the floor, linearity and the goals."""
    a, rows = result["args"], result["rows"]
    ms = lambda times: f"{statistics.median(times) * 1e3:.1f}" if times else "skipped"
    speedup = lambda slow, fast: ratio_spread(slow, fast).format("{:.1f}", "x") if slow else "-"
    lines = [
        f"Forward + backward, CPU fp32, {a['threads']} threads; B=1, H={a['heads']}, K=V={a['head_dim']}, "
        f"chunk_size={a['chunk_size']}, forget gate on, beta in [0, 2]; {a['rounds']} rounds, each timing every T "
        f"in turn: median of {a['repeats']} (recurrence: {a['recurrence_repeats']}) after one warmup, chunk and "
        "transformers interleaved. Times: the median over the rounds; ratios: min / median / max over the rounds, "
        "each taken within a round. Outputs checked before timing: " + "; ".join(result["checks"]) + ". Floor: "
        "the chunk algorithm's matmul FLOPs (benchmarks/floors.py) at the matmul peak.",
        "",
        "| n_h | T | chunk (ms) | recurrence (ms) | chunk speedup vs recurrence | transformers chunk (ms) "
        "| chunk speedup vs transformers | floor (ms) | chunk % of peak |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        floor = r["flops"] / peak_flops
        peak_share = Spread.of(100 * floor / t for t in r["chunk"]).format("{:.0f}", "%")
        tf_ms = ms(r["transformers"]) if r["n_h"] == 1 else "-"
        lines.append(f"| {r['n_h']} | {r['T']} | {ms(r['chunk'])} | {ms(r['recurrence'])} | "
                     f"{speedup(r['recurrence'], r['chunk'])} | {tf_ms} | {speedup(r['transformers'], r['chunk'])} "
                     f"| {1e3 * floor:.1f} | {peak_share} |")
    lines.append("")
    if any(not r["recurrence"] for r in rows):
        lines += [f"Recurrence skipped for T > {a['recurrence_max_len']} (seconds per call; linear in T anyway).", ""]

    # linearity and the goals from the issue, each ratio per round
    chunk_times = {(r["n_h"], r["T"]): r["chunk"] for r in rows}
    tf_times = {r["T"]: r["transformers"] for r in rows if r["transformers"]}
    lo, hi = (1024, 4096) if {1024, 4096} <= set(a["seq_lens"]) else (min(a["seq_lens"]), max(a["seq_lens"]))
    linearity = {n: [h / low for h, low in zip(chunk_times[n, hi], chunk_times[n, lo])] for n in a["householder"]}
    linear = [f"n_h={n} {Spread.of(ratios).format()}" for n, ratios in linearity.items()]
    if len(tf_times) > 1:
        linear.append(f"transformers {ratio_spread(tf_times[hi], tf_times[lo]).format()}")
    lines.append(f"Linearity, time(T={hi}) / time(T={lo}) for x{hi / lo:g} tokens, min / median / max over the "
                 "rounds: " + ", ".join(linear) + ".")
    goals = []
    recurrence_2_1024 = next((r["recurrence"] for r in rows if (r["n_h"], r["T"]) == (2, 1024)), None)
    if recurrence_2_1024:
        goals.append(goal("chunk speedup vs recurrence at T=1024, n_h=2",
                          ratio_spread(recurrence_2_1024, chunk_times[2, 1024]), ">=", 10, "{:.1f}", "x"))
    if tf_times:  # per round, the worst T
        worst = [min(tf_times[T][i] / chunk_times[1, T][i] for T in tf_times) for i in range(a["rounds"])]
        goals.append(goal("chunk speedup vs transformers at n_h=1, worst T", Spread.of(worst), ">=", 1.0, unit="x"))
    worst_lin = [max(ratios[i] for ratios in linearity.values()) for i in range(a["rounds"])]
    goals.append(goal(f"time({hi}) / time({lo}), worst n_h", Spread.of(worst_lin), "<=", 4.5))
    lines.append("Goals (min / median / max over the rounds): " + "; ".join(goals) + ".")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(report(measure(args), matmul_peak_flops()))


if __name__ == "__main__":
    main()
