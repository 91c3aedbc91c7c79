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
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels = load_kernels(args.kernel)
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
