"""Benchmark the DeltaProduct kernels on CPU, forward + backward, fp32.

Side by side in one run:
- chunk_delta_product vs recurrent_delta_product for each sequence length T and num_householder n_h;
- at n_h = 1, against transformers' torch_chunk_gated_delta_rule (Qwen3-Next), the same computation:
  it always scales q by K**-0.5 (our default scale) and we pass use_qk_l2norm_in_kernel=False with
  keys already L2-normalised, as our layer does. Outputs are checked equal before anything is timed.

Prints a markdown table (median of --repeats timed runs after one warmup) and the linearity ratio
time(T=4096) / time(T=1024) of the chunk kernel.

    python benchmarks/bench_delta_product.py --threads 2
    python benchmarks/bench_delta_product.py --smoke          # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="T values")
    p.add_argument("--householder", type=int, nargs="+", default=[1, 2, 3], help="num_householder values")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="K = V")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per cell (median) after one warmup; chunk and transformers take turns")
    p.add_argument("--recurrence-repeats", type=int, default=3, help="timed runs for the (slow) recurrence")
    p.add_argument("--recurrence-max-len", type=int, default=2048,
                   help="skip the recurrence above this T (it is seconds per call there)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: a few seconds, for CI")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.householder, args.heads, args.head_dim = [64, 256], [1, 2], 2, 16
        args.repeats = args.recurrence_repeats = 1
        args.chunk_size = 32

    torch.set_num_threads(args.threads)
    H, K = args.heads, args.head_dim
    tf_ref = load_transformers_reference()
    chunk = lambda n: lambda q, k, v, b, g: kernels.chunk_delta_product(
        q, k, v, b, g, num_householder=n, chunk_size=args.chunk_size)[0]
    recur = lambda n: lambda q, k, v, b, g: kernels.recurrent_delta_product(q, k, v, b, g, num_householder=n)[0]
    tf = lambda q, k, v, b, g: tf_ref(q, k, v, g, b, chunk_size=args.chunk_size, use_qk_l2norm_in_kernel=False)[0]

    print(f"# DeltaProduct kernels, CPU fp32, forward + backward; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"B=1, H={H}, K=V={K}, chunk_size={args.chunk_size}, forget gate on, beta in [0, 2]; "
          f"median of {args.repeats} (recurrence: {args.recurrence_repeats}) after one warmup\n")

    # correctness first: nothing is timed unless the kernels agree
    for n in args.householder:
        inputs, _ = make_inputs(min(args.seq_lens), n, H, K, K, seed=1)
        err = (chunk(n)(*inputs) - recur(n)(*inputs)).abs().max().item()
        print(f"check n_h={n}: max |chunk - recurrence| = {err:.2e} (T={min(args.seq_lens)})")
        assert err < 1e-3, "chunk and recurrence disagree"
    if tf_ref is not None and 1 in args.householder:
        for T in args.seq_lens:
            inputs, _ = make_inputs(T, 1, H, K, K, seed=2)
            err = (chunk(1)(*inputs) - tf(*inputs)).abs().max().item()
            print(f"check n_h=1: max |chunk - transformers| = {err:.2e} (T={T})")
            assert err < 1e-3, "chunk and transformers disagree: not the same computation"
    print()

    rows, chunk_times, tf_times = [], {}, {}
    for n in args.householder:
        for T in args.seq_lens:
            inputs, do = make_inputs(T, n, H, K, K)
            fns = [chunk(n)] + ([tf] if n == 1 and tf_ref is not None else [])
            t_c, *t_tf = median_times(fns, inputs, do, args.repeats)
            chunk_times[n, T] = t_c
            t_tf = t_tf[0] if t_tf else None
            if t_tf is not None:
                tf_times[T] = t_tf
            t_r = None
            if T <= args.recurrence_max_len:  # warm up on a short input: a full-length warmup costs seconds
                short = make_inputs(32, n, H, K, K)
                t_r = median_times([recur(n)], inputs, do, args.recurrence_repeats, warmup=short)[0]
            rows.append((n, T, t_c, t_r, t_tf))
            print(f"  done n_h={n} T={T}", file=sys.stderr)

    ms = lambda t: f"{t * 1e3:.1f}" if t is not None else "skipped"
    ratio = lambda a, b: f"{a / b:.1f}x" if a is not None and b is not None else "-"
    print("| n_h | T | chunk (ms) | recurrence (ms) | chunk speedup vs recurrence | transformers chunk (ms) "
          "| chunk speedup vs transformers |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, T, t_c, t_r, t_tf in rows:
        tf_ms = ms(t_tf) if n == 1 else "-"
        print(f"| {n} | {T} | {ms(t_c)} | {ms(t_r)} | {ratio(t_r, t_c)} | {tf_ms} | {ratio(t_tf, t_c)} |")
    print()
    if any(T > args.recurrence_max_len for T in args.seq_lens):
        print(f"recurrence skipped for T > {args.recurrence_max_len} (seconds per call; linear in T anyway)")

    # linearity and the goals from the issue
    lo, hi = (1024, 4096) if {1024, 4096} <= set(args.seq_lens) else (min(args.seq_lens), max(args.seq_lens))
    growth = hi / lo
    for n in args.householder:
        r = chunk_times[n, hi] / chunk_times[n, lo]
        print(f"linearity n_h={n}: time(T={hi}) / time(T={lo}) = {r:.2f} (x{growth:g} tokens)")
    if len(tf_times) > 1:
        print(f"linearity transformers: time(T={hi}) / time(T={lo}) = {tf_times[hi] / tf_times[lo]:.2f}")
    if not args.smoke:
        goals = []
        if (2, 1024) in chunk_times and any(r[:2] == (2, 1024) and r[3] for r in rows):
            t_r = next(r[3] for r in rows if r[:2] == (2, 1024))
            goals.append(("chunk >= 10x recurrence at T=1024, n_h=2", t_r / chunk_times[2, 1024], 10.0))
        if tf_times:
            worst = min(tf_times[T] / chunk_times[1, T] for T in tf_times)
            goals.append(("chunk >= 1.0x transformers at n_h=1 (worst T)", worst, 1.0))
        worst_lin = max(chunk_times[n, hi] / chunk_times[n, lo] for n in args.householder)
        goals.append((f"time({hi}) / time({lo}) <= 4.5 (worst n_h)", 4.5 / worst_lin, 1.0))
        print()
        for name, value, need in goals:
            shown = f"{4.5 / value:.2f}" if name.startswith("time(") else f"{value:.2f}x"
            print(f"goal {name}: {shown} -> {'met' if value >= need else 'MISSED'}")


if __name__ == "__main__":
    main()
