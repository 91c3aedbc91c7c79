"""Bytes saved for backward, and forward + backward time, of the DeltaProduct chunk kernel and block.

Saved bytes are counted as in /work/shared/PLATFORM_NOTES.md: a forward under
``torch.autograd.graph.saved_tensors_hooks`` and the sum of each distinct storage's ``nbytes``. They do
not depend on load, so one forward suffices. Compared, fp32, B=1:

- the kernel alone (chunk_delta_product) with today's recompute path and the old path (autograd through
  the whole chunk computation, ``kernels._RECOMPUTE_IN_BACKWARD = False``);
- a DeltaProduct block (n_h = 2, the model's own DeltaProductBlock) against a gated-attention block of
  the same width (the same class with the layer in ``attn_layers``), both with the dense SwiGLU MLP;
- forward + backward time of the kernel, recompute vs old path in turn in each of --rounds rounds: min /
  median / max of each, and of the ratio recompute / old taken within each round (benchmarks/rounds.py).

    python benchmarks/bench_delta_product_memory.py --threads 2
    python benchmarks/bench_delta_product_memory.py --smoke     # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.rounds import Spread, add_rounds_argument, interleaved_rounds, ratio_spread, resolve_rounds  # noqa: E402
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


def time_kernel(T, n, H, K, chunk_size, rounds) -> dict[str, list[float]]:
    """{recompute, old: forward + backward seconds per round}, the two in turn, after one warmup of each."""
    inputs = kernel_inputs(T, n, H, K, K)
    do = torch.randn(1, T, H, K)

    def seconds(recompute: bool) -> float:
        for x in inputs:
            x.grad = None
        t0 = time.perf_counter()
        run_kernel(inputs, n, chunk_size, recompute).backward(do)
        return time.perf_counter() - t0

    paths = {"recompute": lambda: seconds(True), "old": lambda: seconds(False)}
    for path in paths.values():
        path()
    return interleaved_rounds(paths, rounds)


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
    p.add_argument("--smoke", action="store_true", help="small sizes")
    add_rounds_argument(p)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.seq_lens, args.hidden, args.heads, args.head_dim, args.mlp = [128, 256], 128, 2, 32, 256
    return args


def measure(a) -> dict:
    """Per T: saved bytes per token of the kernel (both paths) and of both blocks (once each), then kernel times
    per round."""
    torch.set_num_threads(a.threads)
    n, rows = a.householder, []
    kernel = lambda T, recompute: kernel_bytes_per_token(T, n, a.heads, a.head_dim, a.chunk_size, recompute)
    block = lambda T, attention, weights=True: block_bytes_per_token(T, a.hidden, a.heads, a.head_dim, a.mlp, n,
                                                                     attention=attention, weights=weights)
    for T in a.seq_lens:
        rows.append({"T": T, "kernel_recompute": kernel(T, True), "kernel_old": kernel(T, False),
                     "dp": block(T, False), "attn": block(T, True), "dp_act": block(T, False, weights=False),
                     "attn_act": block(T, True, weights=False)})
    for row in rows:
        row["times"] = time_kernel(row["T"], n, a.heads, a.head_dim, a.chunk_size, a.rounds)
    return {"args": vars(a), "rows": rows}


def report(result: dict, peak_flops: float | None = None) -> str:
    """Markdown: saved KiB per token per T, the block's growth with T, kernel times over the rounds (peak_flops:
    not used)."""
    a, rows = result["args"], result["rows"]
    kib = lambda b: f"{b / 1024:.1f}"
    lines = [
        f"fp32, B=1, {a['heads']} heads x {a['head_dim']}, hidden {a['hidden']}, MLP {a['mlp']}, "
        f"n_h={a['householder']}, chunk_size={a['chunk_size']}, {a['threads']} threads. Saved bytes for backward, "
        "KiB per token (they do not depend on load: measured once).",
        "",
        "| T | kernel, recompute | kernel, old | DeltaProduct block | gated-attention block | DP / attention "
        "| the same without weights |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['T']} | {kib(r['kernel_recompute'])} | {kib(r['kernel_old'])} | {kib(r['dp'])} "
                     f"| {kib(r['attn'])} | {r['dp'] / r['attn']:.2f}x | {kib(r['dp_act'])} / {kib(r['attn_act'])} "
                     f"= {r['dp_act'] / r['attn_act']:.2f}x |")
    lo, hi = rows[0], rows[-1]
    lines += ["", f"DeltaProduct block without weights, total bytes at T={hi['T']} / at T={lo['T']}: "
                  f"{hi['dp_act'] * hi['T'] / (lo['dp_act'] * lo['T']):.2f} for x{hi['T'] / lo['T']:g} tokens.", "",
              f"Kernel forward + backward (s), min / median / max of {a['rounds']} rounds after one warmup, recompute "
              "and old in turn in each round; the ratio taken within each round:", "",
              "| T | recompute | old | recompute / old |", "|---:|---:|---:|---:|"]
    for r in rows:
        times = r["times"]
        lines.append(f"| {r['T']} | {Spread.of(times['recompute']).format('{:.3f}')} | "
                     f"{Spread.of(times['old']).format('{:.3f}')} | "
                     f"{ratio_spread(times['recompute'], times['old']).format('{:.2f}', 'x')} |")
    return "\n".join(lines)


def main(argv=None):
    print(report(measure(parse_args(argv))))


if __name__ == "__main__":
    main()
