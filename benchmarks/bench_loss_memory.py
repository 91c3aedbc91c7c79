"""Memory and time of the LM head + loss, plain vs fused, fp32 by default.

- plain: logits = hidden @ W^T, then transformers' ForCausalLMLoss (what the model did before the fused loss,
  and still does with `return_logits=True`);
- fused: model/fused_loss.py linear_cross_entropy, chunk by chunk over the tokens, its gradients formed in the
  forward.

For each vocabulary size, at --tokens tokens and --hidden hidden size:
- saved bytes per token for backward: the distinct storages autograd saves (saved_tensors_hooks), beyond the
  hidden states and the weight, which are alive anyway (a number that does not depend on load). The fused loss
  keeps the gradients of those two instead, formed in its forward: the plain path allocates the same two at the
  start of its backward, so they are in both peaks;
- peak: the most memory one forward + backward held above its inputs (CUDA: max_memory_allocated; CPU: the
  peak RSS of a fresh process that runs one step, above its RSS just before the step), the gradients included;
- step time of forward + backward over --rounds rounds after one warmup, plain and fused in turn in each
  round: min / median / max of each, and of the ratio fused / plain taken within each round
  (benchmarks/rounds.py). Bytes do not depend on load: measured once.

    python benchmarks/bench_loss_memory.py --threads 2
    python benchmarks/bench_loss_memory.py --smoke          # a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fresh_process import fresh_process_context  # noqa: E402
from benchmarks.rounds import Spread, add_rounds_argument, interleaved_rounds, ratio_spread, resolve_rounds  # noqa: E402
from seedlm.launch.metrics import saved_bytes_for_backward  # noqa: E402
from seedlm.model.fused_loss import linear_cross_entropy  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256, help="hidden size (the head's matmuls grow with it)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="one small vocabulary, 512 tokens")
    add_rounds_argument(p)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.vocab, args.tokens = [4096], 512
    return args


def plain_loss(hidden, weight, labels):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=weight.shape[0])


def fused_loss(hidden, weight, labels):
    return linear_cross_entropy(hidden, weight, labels)


LOSSES = {"plain": plain_loss, "fused": fused_loss}


def make_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    """hidden [1, tokens, hidden] and weight [vocab, hidden] needing gradients, labels [1, tokens]."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    return h, w, labels


def saved_bytes_beyond_inputs(loss_fn, h, w, labels) -> int:
    """Bytes of the distinct storages saved for backward, less those of hidden and weight."""
    return saved_bytes_for_backward(lambda: loss_fn(h, w, labels), exclude=(h, w))


def rss_and_peak_bytes() -> tuple[int, int]:
    """This process's resident set size now and its high-water mark (VmRSS, VmHWM of /proc/self/status)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def cpu_peak_in_fresh_process(name, tokens, hidden, vocab, dtype, threads, queue):
    """Runs in a fresh process: peak RSS of one forward + backward above the RSS before it. (Not getrusage's
    ru_maxrss: it can hold a parent's peak.)"""
    if threads:
        torch.set_num_threads(threads)
    LOSSES[name](*make_inputs(256, 16, 64, dtype, "cpu")).backward()  # load kernels and thread pools first
    h, w, labels = make_inputs(tokens, hidden, vocab, dtype, "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the high-water mark to the current RSS
    before, _ = rss_and_peak_bytes()
    LOSSES[name](h, w, labels).backward()
    queue.put(rss_and_peak_bytes()[1] - before)


def peak_bytes(name, args, vocab) -> int:
    dtype = DTYPES[args.dtype]
    if args.device.startswith("cuda"):
        h, w, labels = make_inputs(args.tokens, args.hidden, vocab, dtype, args.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        LOSSES[name](h, w, labels).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    ctx = fresh_process_context("benchmarks.bench_loss_memory")  # a fresh heap: its peak RSS is this step's alone
    queue = ctx.Queue()
    proc = ctx.Process(
        target=cpu_peak_in_fresh_process, args=(name, args.tokens, args.hidden, vocab, dtype, args.threads, queue)
    )
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def step_seconds(loss_fn, h, w, labels, device) -> float:
    """One forward + backward of the head + loss."""
    h.grad = w.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss_fn(h, w, labels).backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(args, vocab) -> dict[str, list[float]]:
    """{plain, fused: seconds per round}, the two in turn in each round, after one warmup step of each."""
    inputs = {name: make_inputs(args.tokens, args.hidden, vocab, DTYPES[args.dtype], args.device) for name in LOSSES}
    steps = {name: lambda name=name: step_seconds(LOSSES[name], *inputs[name], args.device) for name in LOSSES}
    for step in steps.values():
        step()
    return interleaved_rounds(steps, args.rounds)


def check_equal(args, vocab) -> None:
    """Both heads give the same loss and gradients before anything is measured."""
    results = []
    for loss_fn in LOSSES.values():
        h, w, labels = make_inputs(min(args.tokens, 512), args.hidden, vocab, DTYPES[args.dtype], args.device)
        loss = loss_fn(h, w, labels)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for expected, got in zip(*results):
        torch.testing.assert_close(
            got.float(), expected.float(), rtol=2e-2 if args.dtype == "bf16" else 1e-4, atol=1e-5
        )


def measure(args) -> dict:
    """Per vocabulary: both heads checked equal, then saved bytes per token and peak bytes (once each) and step
    times (per round)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for vocab in args.vocab:
        check_equal(args, vocab)
        row = {"vocab": vocab}
        for name, loss_fn in LOSSES.items():
            h, w, labels = make_inputs(args.tokens, args.hidden, vocab, DTYPES[args.dtype], args.device)
            row[f"{name}_saved_per_token"] = saved_bytes_beyond_inputs(loss_fn, h, w, labels) / args.tokens
            del h, w, labels
            row[f"{name}_peak"] = peak_bytes(name, args, vocab)
        for name, times in step_times(args, vocab).items():
            row[f"{name}_times"] = times
        rows.append(row)
    return {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}


def report(result: dict, peak_flops: float | None = None) -> str:
    """Markdown: bytes per vocabulary, step times and the time ratio over the rounds (peak_flops: not used)."""
    a, rows = result["args"], result["rows"]
    ms = lambda times: Spread.of(times).map(lambda t: 1000 * t).format("{:.0f}")
    lines = [
        f"LM head + loss, forward + backward, {a['dtype']}, {a['tokens']} tokens, hidden {a['hidden']}, "
        f"{a['device']}, {result['threads']} threads; step times min / median / max of {a['rounds']} rounds "
        "after one warmup, plain and fused in turn in each round, and the ratio fused / plain taken within each "
        "round. Bytes do not depend on load: measured once.",
        "",
        "| vocab | saved B/token plain | saved B/token fused | peak MB plain | peak MB fused "
        "| step ms plain | step ms fused | time fused / plain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']} | {r['plain_saved_per_token']:.0f} | {r['fused_saved_per_token']:.0f} "
            f"| {r['plain_peak'] / 2**20:.0f} | {r['fused_peak'] / 2**20:.0f} "
            f"| {ms(r['plain_times'])} | {ms(r['fused_times'])} "
            f"| {ratio_spread(r['fused_times'], r['plain_times']).format('{:.2f}', 'x')} |"
        )
    lines.append("")
    lines.append("saved B/token: bytes saved for backward per token beyond the hidden states and the weight; the "
                 "fused loss's are the gradients of those two, formed in its forward (the plain path allocates the "
                 "same two at the start of its backward: both peaks hold them).")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report(measure(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
