"""Bytes kept for backward, and forward + backward time, with train.activation_checkpointing = none, full and
selective (every N-th decoder layer), for both model families.

Saved bytes are counted as in bench_delta_product_memory.py: one forward under
``torch.autograd.graph.saved_tensors_hooks``, summing each distinct storage's ``nbytes`` and leaving out the
weights (resident anyway). They do not depend on load: measured once. Times are the whole causal LM's forward
(loss included) and backward, fp32, the three modes in turn in each of --rounds rounds after one warmup:
min / median / max of each, and of the ratio to none taken within each round (benchmarks/rounds.py).

    python benchmarks/bench_activation_checkpointing.py --threads 2
    python benchmarks/bench_activation_checkpointing.py --smoke     # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.rounds import Spread, add_rounds_argument, interleaved_rounds, ratio_spread, resolve_rounds  # noqa: E402
from seedlm.launch.config import TrainConfig  # noqa: E402
from seedlm.launch.engine import apply_activation_checkpointing  # noqa: E402
from seedlm.launch.metrics import saved_bytes_for_backward  # noqa: E402
from seedlm.model import DeltaProductConfig, DeltaProductForCausalLM, GatedMoeConfig, GatedMoeForCausalLM  # noqa: E402

MODES = ("none", "full", "selective")


def build(family: str, mode: str, a):
    torch.manual_seed(0)
    if family == "gated_moe":
        config = GatedMoeConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 128,
                                head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=a.hidden,
                                shared_expert_intermediate_size=a.hidden, max_position_embeddings=a.seq_len)
        model = GatedMoeForCausalLM(config)
    else:
        config = DeltaProductConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                    num_heads=a.hidden // 128, head_dim=128, num_householder=2,
                                    intermediate_size=a.hidden * 11 // 4)
        model = DeltaProductForCausalLM(config)
    apply_activation_checkpointing(model, TrainConfig(activation_checkpointing=mode,
                                                      activation_checkpointing_every=a.every))
    return model.train()


def step_seconds(model, ids) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    return time.perf_counter() - t0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--every", type=int, default=2, help="train.activation_checkpointing_every for selective")
    p.add_argument("--smoke", action="store_true", help="small sizes")
    add_rounds_argument(p)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.hidden, args.seq_len, args.batch, args.vocab = 128, 128, 1, 256
    return args


def measure(a) -> dict:
    """Per family and mode: saved bytes per token (once), then forward + backward seconds per round."""
    torch.set_num_threads(a.threads)
    tokens = a.batch * a.seq_len
    ids = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for family in ("gated_moe", "deltaproduct"):
        models = {mode: build(family, mode, a) for mode in MODES}
        for mode, model in models.items():
            forward = lambda model=model: model(ids, labels=ids).loss
            rows.append({"family": family, "mode": mode,
                         "saved_per_token": saved_bytes_for_backward(forward, model.parameters()) / tokens})
        steps = {mode: lambda model=model: step_seconds(model, ids) for mode, model in models.items()}
        for step in steps.values():  # the warmup
            step()
        for row, times in zip(rows[-len(MODES):], interleaved_rounds(steps, a.rounds).values()):
            row["times"] = times
    return {"args": vars(a), "rows": rows}


def report(result: dict, peak_flops: float | None = None) -> str:
    """Markdown: one row per family and mode, bytes and times against none (peak_flops: not used)."""
    a, rows = result["args"], result["rows"]
    lines = [
        f"fp32, hidden {a['hidden']}, {a['layers']} layers, T={a['seq_len']}, batch {a['batch']}, vocab {a['vocab']}, "
        f"selective = layers 0, {a['every']}, ... (every {a['every']}), {a['threads']} threads. Saved bytes for "
        "backward without weights, KiB per token (they do not depend on load: measured once); forward + backward "
        f"(s), min / median / max of {a['rounds']} rounds after one warmup, the three modes in turn in each round, "
        "and the ratio to none taken within each round.",
        "",
        "| family | activation_checkpointing | saved KiB / token | vs none | forward + backward (s) | vs none |",
        "|---|---|---:|---:|---:|---:|",
    ]
    none = {r["family"]: r for r in rows if r["mode"] == "none"}
    for r in rows:
        base = none[r["family"]]
        lines.append(f"| {r['family']} | {r['mode']} | {r['saved_per_token'] / 1024:.1f} "
                     f"| {r['saved_per_token'] / base['saved_per_token']:.2f}x "
                     f"| {Spread.of(r['times']).format('{:.3f}')} "
                     f"| {ratio_spread(r['times'], base['times']).format('{:.2f}', 'x')} |")
    return "\n".join(lines)


def main(argv=None):
    print(report(measure(parse_args(argv))))


if __name__ == "__main__":
    main()
