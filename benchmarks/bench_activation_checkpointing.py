"""Bytes kept for backward, and forward + backward time, with train.activation_checkpointing = none, full and
selective (every N-th decoder layer), for both model families.

Saved bytes are counted as in bench_delta_product_memory.py: one forward under
``torch.autograd.graph.saved_tensors_hooks``, summing each distinct storage's ``nbytes`` and leaving out the
weights (resident anyway). They do not depend on load. Times are the whole causal LM's forward (loss
included) and backward, min / median / max of --rounds rounds after one warmup, fp32.

    python benchmarks/bench_activation_checkpointing.py --threads 2
    python benchmarks/bench_activation_checkpointing.py --smoke     # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def step_times(model, ids, rounds) -> list[float]:
    times = []
    for _ in range(rounds + 1):  # the first round warms up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - t0)
    return times[1:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--every", type=int, default=2, help="train.activation_checkpointing_every for selective")
    p.add_argument("--rounds", type=int, default=3, help="timed forward + backward rounds after one warmup")
    p.add_argument("--smoke", action="store_true", help="small sizes, one round")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.seq_len, args.batch, args.vocab, args.rounds = 128, 128, 1, 256, 1
    return args


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    tokens = a.batch * a.seq_len
    ids = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    print(f"fp32, hidden {a.hidden}, {a.layers} layers, T={a.seq_len}, batch {a.batch}, vocab {a.vocab}, "
          f"selective = layers 0, {a.every}, ... (every {a.every}), {a.threads} threads. Saved bytes for backward "
          f"without weights, KiB per token; forward + backward (s), min / median / max of {a.rounds} rounds after "
          "one warmup.\n")
    print("| family | activation_checkpointing | saved KiB / token | vs none | forward + backward (s) | vs none |")
    print("|---|---|---:|---:|---:|---:|")
    for family in ("gated_moe", "deltaproduct"):
        base_bytes = base_time = None
        for mode in MODES:
            model = build(family, mode, a)
            forward = lambda model=model: model(ids, labels=ids).loss  # noqa: E731
            saved = saved_bytes_for_backward(forward, model.parameters()) / tokens
            times = step_times(model, ids, a.rounds)
            median = statistics.median(times)
            base_bytes, base_time = base_bytes or saved, base_time or median
            print(f"| {family} | {mode} | {saved / 1024:.1f} | {saved / base_bytes:.2f}x "
                  f"| {min(times):.3f} / {median:.3f} / {max(times):.3f} | {median / base_time:.2f}x |")


if __name__ == "__main__":
    main()
