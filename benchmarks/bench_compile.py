"""train.compile on CPU: forward + backward time of each model family eager and with every decoder block
compiled (launch/engine.py compile_blocks, inductor), and the compile time (the first compiled step, less an
eager step; cold only when inductor's on-disk cache, TORCHINDUCTOR_CACHE_DIR, does not hold these graphs yet).

Both models are built from the same seed; each round times the eager and the compiled model in turn
(benchmarks/rounds.py), after one warmup step each, and the speed-up is taken within each round.

    python benchmarks/bench_compile.py --threads 2
    python benchmarks/bench_compile.py --smoke     # small sizes (the compile still takes a while)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_activation_checkpointing import step_seconds  # noqa: E402
from benchmarks.rounds import Spread, add_rounds_argument, interleaved_rounds, ratio_spread, resolve_rounds  # noqa: E402
from seedlm.launch.engine import compile_blocks  # noqa: E402
from seedlm.model import DeltaProductConfig, DeltaProductForCausalLM, GatedMoeConfig, GatedMoeForCausalLM  # noqa: E402


def build(family: str, a):
    torch.manual_seed(0)
    if family == "gated_moe":
        config = GatedMoeConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 128,
                                head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=a.hidden,
                                shared_expert_intermediate_size=a.hidden, max_position_embeddings=a.seq_len)
        return GatedMoeForCausalLM(config).train()
    config = DeltaProductConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                num_heads=a.hidden // 128, head_dim=128, num_householder=2,
                                intermediate_size=a.hidden * 11 // 4)
    return DeltaProductForCausalLM(config).train()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--families", nargs="+", default=["gated_moe", "deltaproduct"])
    p.add_argument("--smoke", action="store_true", help="small sizes")
    add_rounds_argument(p)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.hidden, args.layers, args.seq_len, args.batch, args.vocab = 128, 2, 128, 1, 256
    return args


def measure(a) -> dict:
    torch.set_num_threads(a.threads)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for family in a.families:
        torch._dynamo.reset()
        eager, compiled = build(family, a), build(family, a)
        compile_blocks(compiled)
        eager_first = step_seconds(eager, ids)
        compile_seconds = step_seconds(compiled, ids) - eager_first  # the first compiled step compiles
        models = {"eager": eager, "compiled": compiled}
        times = interleaved_rounds({name: lambda m=m: step_seconds(m, ids) for name, m in models.items()}, a.rounds)
        rows.append({"family": family, "compile_seconds": compile_seconds, **times})
    return {"args": vars(a), "rows": rows}


def report(result: dict) -> str:
    a, rows = result["args"], result["rows"]
    lines = [
        f"fp32, hidden {a['hidden']}, {a['layers']} layers, T={a['seq_len']}, batch {a['batch']}, vocab {a['vocab']}, "
        f"{a['threads']} threads, inductor. Forward + backward (s), min / median / max of {a['rounds']} rounds after "
        "the first step; speed-up = eager / compiled within each round.",
        "",
        "| family | compile time (s) | eager (s) | compiled blocks (s) | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['family']} | {r['compile_seconds']:.0f} | {Spread.of(r['eager']).format('{:.3f}')} "
                     f"| {Spread.of(r['compiled']).format('{:.3f}')} "
                     f"| {ratio_spread(r['eager'], r['compiled']).format('{:.2f}', 'x')} |")
    return "\n".join(lines)


def main(argv=None):
    print(report(measure(parse_args(argv))))


if __name__ == "__main__":
    main()
