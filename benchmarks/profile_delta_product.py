"""Where the DeltaProduct chunk kernel's time goes: a per-op breakdown of forward + backward on CPU, fp32.

Runs chunk_delta_product (model/delta_product_kernels.py, or another copy of the file given with --kernel,
e.g. an older version to compare) under torch.profiler and prints, for each T:

- forward-only and forward + backward time (median of --repeats after one warmup);
- the ops by self CPU time, with their share of the total, call counts and the FLOP/s the profiler
  attributes to the matmuls (so that a slow small GEMM shows up next to a slow copy or exp);
- the time spent outside any op (python overhead between ops).

Under the profiler, glibc hands fresh pages to many of the ~1 MB intermediates; each page fault (~1 us in a
VM) lands inside whichever op touched the memory first, so a cheap mul or bmm can look 10x slower than it is.
The page-fault count is printed; to see the ops without it, keep freed memory in the process:

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2000000000:glibc.malloc.trim_threshold=4000000000 \
        python benchmarks/profile_delta_product.py

    python benchmarks/profile_delta_product.py --seq-lens 1024 4096 --householder 2
    python benchmarks/profile_delta_product.py --kernel /tmp/old_delta_product_kernels.py

--compare OLD_FILE skips the profiler and times this kernel against another copy side by side instead:
--rounds rounds, the two taking turns within each round (best of 3 calls each), min / median / max per
cell of the time and of the % of the fp32 matmul peak (benchmarks/floors.py) measured right before each
timing, and time(T_max) / time(T_min) per round, as measured and with each time scaled by the peak beside it.

    git show main:model/delta_product_kernels.py > /tmp/old.py
    python benchmarks/profile_delta_product.py --compare /tmp/old.py --householder 1 2 3 --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.floors import chunk_delta_product_flops, cpu_model, matmul_peak_flops  # noqa: E402

_KERNELS = Path(__file__).resolve().parents[1] / "model" / "delta_product_kernels.py"


def load_kernels(path: Path):
    """The kernel file as a module, loaded by path (it imports only torch), so two copies can sit side by side."""
    spec = importlib.util.spec_from_file_location(f"delta_product_kernels_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(T, n, H, K, V, seed=0):
    """fp32 inputs as the layer gives them: unit keys, beta in [0, 2], a forget gate g <= 0."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, T * n, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T * n, H, V, generator=gen)
    beta = 2 * torch.rand(1, T * n, H, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 3.0)
    do = torch.randn(1, T, H, V, generator=gen)
    return [q, k, v, beta, g], do


def forward_backward(kernels, inputs, do, n, chunk_size, backward=True):
    leaves = [x.detach().requires_grad_(backward) for x in inputs]
    o, _ = kernels.chunk_delta_product(*leaves, num_householder=n, chunk_size=chunk_size)
    if backward:
        o.backward(do)


def median_seconds(repeats, fn, *fn_args):
    fn(*fn_args)  # warmup
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*fn_args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def op_table(prof, wall_seconds, top):
    """Ops by self CPU time: name, % of wall, ms, calls, GFLOP/s where the profiler counts FLOPs."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self_us = sum(e.self_cpu_time_total for e in events)
    lines = ["| op | % of wall | self ms | calls | GFLOP/s |", "|---|---:|---:|---:|---:|"]
    for e in events[:top]:
        ms = e.self_cpu_time_total / 1e3
        gflops = f"{e.flops / e.self_cpu_time_total / 1e3:.0f}" if e.flops and e.self_cpu_time_total else ""
        lines.append(f"| {e.key} | {100 * ms / 1e3 / wall_seconds:.1f} | {ms:.2f} | {e.count} | {gflops} |")
    outside = wall_seconds - total_self_us / 1e6
    lines.append(f"| (outside any op: python, autograd engine) | {100 * outside / wall_seconds:.1f} | "
                 f"{outside * 1e3:.2f} | | |")
    return "\n".join(lines)


def seconds(fn, *fn_args):
    t0 = time.perf_counter()
    fn(*fn_args)
    return time.perf_counter() - t0


def compare(args, kernels):
    """This kernel against args.compare side by side; prints one line per cell and the linearity per round.

    % of peak is per round, against the matmul peak measured right before that variant's timing in that round's
    cell: on a host whose speed drifts (seen: 70-144 GFLOP/s within a minute on an AMD EPYC VM) a peak taken once
    at the start would measure the drift, not the kernel, and one taken per cell is seconds away from the second
    variant's timing at T = 4096."""
    variants = {"this": kernels, "compared": load_kernels(args.compare)}
    peak = matmul_peak_flops()
    print(f"{cpu_model()}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (best of 3 at the start); "
          f"compared: {args.compare}")
    spread = lambda xs: f"{min(xs):.2f}/{statistics.median(xs):.2f}/{max(xs):.2f}"
    lo, hi = min(args.seq_lens), max(args.seq_lens)
    for n in args.householder:
        data = {T: make_inputs(T, n, args.heads, args.head_dim, args.head_dim) for T in args.seq_lens}
        times = {(name, T): [] for name in variants for T in args.seq_lens}
        peaks = {(name, T): [] for name in variants for T in args.seq_lens}  # measured beside each timing
        for kern in variants.values():  # warmup
            forward_backward(kern, *data[lo], n, args.chunk_size)
        for _ in range(args.rounds):
            for T in args.seq_lens:
                for name, kern in variants.items():
                    peaks[name, T].append(matmul_peak_flops(rounds=1))
                    best = min(seconds(forward_backward, kern, *data[T], n, args.chunk_size) for _ in range(3))
                    times[name, T].append(best)
        for T in args.seq_lens:
            flops = chunk_delta_product_flops(T, n, args.heads, args.head_dim, args.head_dim, args.chunk_size)
            cells = [f"{name} {spread([1e3 * t for t in times[name, T]])} ms, "
                     f"{spread([100 * flops / t / p for t, p in zip(times[name, T], peaks[name, T])])}% of peak"
                     for name in variants]
            beside = [p / 1e9 for name in variants for p in peaks[name, T]]
            print(f"n_h={n} T={T}: " + "; ".join(cells) + f" (peaks beside the timings {spread(beside)} GFLOP/s)")
        if lo != hi:
            ratios = {name: [a / b for a, b in zip(times[name, hi], times[name, lo])] for name in variants}
            print(f"  time({hi}) / time({lo}) per round, min/median/max: "
                  + "; ".join(f"{name} {spread(r)}" for name, r in ratios.items()))
            # each time in matmul-peak units (time x the peak beside it): the drift between the two cells is out
            scaled = {name: [a * pa / (b * pb) for a, b, pa, pb in zip(times[name, hi], times[name, lo],
                                                                          peaks[name, hi], peaks[name, lo])]
                      for name in variants}
            print("  the same, each time scaled by the peak measured beside it: "
                  + "; ".join(f"{name} {spread(r)}" for name, r in scaled.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", type=Path, default=_KERNELS, help="kernel file to profile (default: this repo's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--householder", type=int, nargs="+", default=[2])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="K = V")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25, help="ops listed per table")
    p.add_argument("--compare", type=Path, help="another kernel file: time both side by side, no profiler")
    p.add_argument("--rounds", type=int, default=5, help="rounds of --compare")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels = load_kernels(args.kernel)
    if args.compare is not None:
        return compare(args, kernels)
    print(f"kernel {args.kernel}; {torch.get_num_threads()} threads; H={args.heads}, K=V={args.head_dim}, "
          f"chunk_size={args.chunk_size}")
    for n in args.householder:
        for T in args.seq_lens:
            inputs, do = make_inputs(T, n, args.heads, args.head_dim, args.head_dim)
            run = (kernels, inputs, do, n, args.chunk_size)
            fwd = median_seconds(args.repeats, forward_backward, *run, False)
            both = median_seconds(args.repeats, forward_backward, *run, True)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                t0 = time.perf_counter()
                forward_backward(kernels, inputs, do, n, args.chunk_size)
                wall = time.perf_counter() - t0
            # page faults: fresh memory from the OS costs ~1 us a page in a VM and shows up inside the ops
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            print(f"\n## n_h={n}, T={T}: forward {fwd * 1e3:.1f} ms, forward + backward {both * 1e3:.1f} ms "
                  f"(profiled run {wall * 1e3:.1f} ms, profiler overhead included; {faults} page faults)\n")
            print(op_table(prof, wall, args.top))


if __name__ == "__main__":
    main()
