"""Bytes saved for backward, and forward + backward time, of the DeltaProduct chunk kernel and block.

Saved bytes are counted as in /work/shared/PLATFORM_NOTES.md: a forward under
``torch.autograd.graph.saved_tensors_hooks`` and the sum of each distinct storage's ``nbytes``. They do
not depend on load, so one forward suffices. Compared, fp32, B=1:

- the kernel alone (chunk_delta_product) with today's recompute path and the old path (autograd through
  the whole chunk computation, ``kernels._RECOMPUTE_IN_BACKWARD = False``);
- a DeltaProduct block (n_h = 2, the model's own DeltaProductBlock) against a gated-attention block of
  the same width (the same class with the layer in ``attn_layers``), both with the dense SwiGLU MLP;
- forward + backward time of the kernel, recompute vs old path, min / median / max of --rounds rounds.

    python benchmarks/bench_delta_product_memory.py --threads 2
    python benchmarks/bench_delta_product_memory.py --smoke     # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seedlm.launch.metrics import saved_bytes_for_backward  # noqa: E402
from seedlm.model import delta_product_kernels as kernels  # noqa: E402
from seedlm.model.configuration_deltaproduct import DeltaProductConfig  # noqa: E402
from seedlm.model.modeling_deltaproduct import DeltaProductModel  # noqa: E402


def kernel_inputs(T, n, H, K, V, seed=0):
    """fp32 leaves as the layer gives them: unit keys, beta in [0, 2], a forget gate g <= 0."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, T * n, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T * n, H, V, generator=gen)
    beta = 2 * torch.rand(1, T * n, H, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 3.0)
    return [x.requires_grad_(True) for x in (q, k, v, beta, g)]


def run_kernel(inputs, n, chunk_size, recompute):
    kernels._RECOMPUTE_IN_BACKWARD = recompute
    try:
        return kernels.chunk_delta_product(*inputs, num_householder=n, chunk_size=chunk_size)[0]
    finally:
        kernels._RECOMPUTE_IN_BACKWARD = True


def kernel_bytes_per_token(T, n, H, K, chunk_size, recompute) -> float:
    inputs = kernel_inputs(T, n, H, K, K)
    return saved_bytes_for_backward(lambda: run_kernel(inputs, n, chunk_size, recompute)) / T


def block_config(hidden, heads, head_dim, mlp, n, attention: bool) -> DeltaProductConfig:
    return DeltaProductConfig(
        vocab_size=16, hidden_size=hidden, num_hidden_layers=1, num_heads=heads, head_dim=head_dim,
        num_householder=n, intermediate_size=mlp, attn_layers=[0] if attention else [],
    )


def block_bytes_per_token(T, hidden, heads, head_dim, mlp, n, attention: bool, weights=True) -> float:
    """Saved bytes per token of one model block: the model's forward with one layer, minus the final norm
    (measured on its own and subtracted). weights=False leaves out the weights the block keeps."""
    torch.manual_seed(0)
    model = DeltaProductModel(block_config(hidden, heads, head_dim, mlp, n, attention)).train()
    x = torch.randn(1, T, hidden, requires_grad=True)
    exclude = () if weights else list(model.parameters())
    whole = saved_bytes_for_backward(lambda: model(inputs_embeds=x).last_hidden_state, exclude)
    final_norm = saved_bytes_for_backward(lambda: model.norm(x), exclude)
    return (whole - final_norm) / T


def time_kernel(T, n, H, K, chunk_size, recompute, rounds) -> list[float]:
    inputs = kernel_inputs(T, n, H, K, K)
    do = torch.randn(1, T, H, K)
    times = []
    for _ in range(rounds + 1):  # the first round warms up
        for x in inputs:
            x.grad = None
        t0 = time.perf_counter()
        run_kernel(inputs, n, chunk_size, recompute).backward(do)
        times.append(time.perf_counter() - t0)
    return times[1:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--mlp", type=int, default=2816)
    p.add_argument("--householder", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed forward + backward rounds after one warmup")
    p.add_argument("--smoke", action="store_true", help="small sizes, one round")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.hidden, args.heads, args.head_dim, args.mlp, args.rounds = [128, 256], 128, 2, 32, 256, 1
    return args


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    n, kib = a.householder, lambda b: f"{b / 1024:.1f}"
    print(f"fp32, B=1, {a.heads} heads x {a.head_dim}, hidden {a.hidden}, MLP {a.mlp}, n_h={n}, "
          f"chunk_size={a.chunk_size}, {a.threads} threads. Saved bytes for backward, KiB per token.\n")
    print("| T | kernel, recompute | kernel, old | DeltaProduct block | gated-attention block | DP / attention "
          "| the same without weights |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    blocks = {}
    for T in a.seq_lens:
        new = kernel_bytes_per_token(T, n, a.heads, a.head_dim, a.chunk_size, recompute=True)
        old = kernel_bytes_per_token(T, n, a.heads, a.head_dim, a.chunk_size, recompute=False)
        dp = block_bytes_per_token(T, a.hidden, a.heads, a.head_dim, a.mlp, n, attention=False)
        attn = block_bytes_per_token(T, a.hidden, a.heads, a.head_dim, a.mlp, n, attention=True)
        dp_act = block_bytes_per_token(T, a.hidden, a.heads, a.head_dim, a.mlp, n, attention=False, weights=False)
        attn_act = block_bytes_per_token(T, a.hidden, a.heads, a.head_dim, a.mlp, n, attention=True, weights=False)
        blocks[T] = dp_act
        print(f"| {T} | {kib(new)} | {kib(old)} | {kib(dp)} | {kib(attn)} | {dp / attn:.2f}x "
              f"| {kib(dp_act)} / {kib(attn_act)} = {dp_act / attn_act:.2f}x |")
    lo, hi = min(a.seq_lens), max(a.seq_lens)
    print(f"\nDeltaProduct block without weights, total bytes at T={hi} / at T={lo}: "
          f"{blocks[hi] * hi / (blocks[lo] * lo):.2f} for x{hi / lo:g} tokens.\n")

    print("Kernel forward + backward (s), min / median / max of", a.rounds, "rounds after one warmup:\n")
    print("| T | recompute | old | median ratio |")
    print("|---:|---:|---:|---:|")
    for T in a.seq_lens:
        new = time_kernel(T, n, a.heads, a.head_dim, a.chunk_size, True, a.rounds)
        old = time_kernel(T, n, a.heads, a.head_dim, a.chunk_size, False, a.rounds)
        fmt = lambda ts: f"{min(ts):.3f} / {statistics.median(ts):.3f} / {max(ts):.3f}"
        print(f"| {T} | {fmt(new)} | {fmt(old)} | {statistics.median(new) / statistics.median(old):.2f}x |")


if __name__ == "__main__":
    main()
