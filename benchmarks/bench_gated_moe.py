"""Gated-attention MoE: training-step time against transformers' Qwen3-MoE, and the cost of the gate.

Side by side in one run, forward + backward with labels, fp32 on CPU by default:
  1. transformers' Qwen3MoeForCausalLM with each experts implementation ("eager", "grouped_mm"; the
     fastest is the baseline) against our GatedMoeForCausalLM holding the *same weights* (converted,
     gate "none"); the losses are checked equal before timing.
  2. our model with attn_output_gate "headwise" and "elementwise" against "none" (shared weights copied).

Models are timed interleaved (one step of each in turn), so drift in machine load hits all of them alike;
each round (--rounds) gives every model its median step time, and each ratio is reported as min / median /
max over the rounds (benchmarks/rounds.py).

    python benchmarks/bench_gated_moe.py                 # hidden 256, 32 experts top-4, 2 layers, 4x256 tokens
    python benchmarks/bench_gated_moe.py --smoke         # seconds; CI checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

from benchmarks.floors import matmul_peak_flops, training_step_flops  # noqa: E402
from benchmarks.rounds import Spread, add_rounds_argument, goal, ratio_spread, resolve_rounds  # noqa: E402
from seedlm.launch.convert import gated_moe_from_qwen3_moe  # noqa: E402
from seedlm.model import GatedMoeConfig, GatedMoeForCausalLM  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-ffn", type=int, default=256, help="moe_intermediate_size")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and round (their median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the first round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 2 steps, to check the script runs")
    add_rounds_argument(p)
    args = p.parse_args(argv)
    resolve_rounds(args)
    if args.smoke:
        args.hidden, args.experts, args.expert_ffn, args.seq, args.batch = 64, 8, 64, 32, 2
        args.heads, args.kv_heads, args.steps, args.warmup, args.vocab = 4, 2, 2, 1, 512
    return args


def qwen3_moe(args, experts_implementation: str) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_ffn, norm_topk_prob=True, max_position_embeddings=4096,
        experts_implementation=experts_implementation, attn_implementation="sdpa",
    )
    net = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # transformers starts routers at zero; spread them so routing is realistic
        for name, param in net.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.02)
    return net.to(getattr(torch, args.dtype)).train()


def gated_variant(reference: GatedMoeForCausalLM, gate: str) -> GatedMoeForCausalLM:
    """Our model with another output gate, sharing every weight of `reference` (gate="none")."""
    fields = reference.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "dtype"):
        fields.pop(key, None)
    fields["attn_output_gate"] = gate
    variant = GatedMoeForCausalLM(GatedMoeConfig(**fields)).to(reference.dtype)
    state = reference.state_dict()
    with torch.no_grad():
        for name, param in variant.named_parameters():
            if name.endswith("q_proj.weight"):  # per head [q_h | gate_h]: copy q_h, keep the random gate rows
                attn = variant.model.layers[0].self_attn
                packed = param.view(attn.num_heads, attn.head_dim + attn.gate_dim, -1)
                packed[:, : attn.head_dim] = state[name].view(attn.num_heads, attn.head_dim, -1)
            else:
                param.copy_(state[name])
    return variant.train()


def time_interleaved(models: dict, batch: torch.Tensor, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per training step of each model, one step of each in turn."""
    times = {name: [] for name in models}
    for step in range(warmup + steps):
        for name, net in models.items():
            net.zero_grad(set_to_none=True)
            start = time.perf_counter()
            net(input_ids=batch, labels=batch).loss.backward()
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(args) -> dict:
    """Build the models, check that the losses agree, time them interleaved; per-round medians, FLOPs per model."""
    torch.set_num_threads(args.threads)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    baselines = {impl: qwen3_moe(args, impl) for impl in ("eager", "grouped_mm")}
    ours = gated_moe_from_qwen3_moe(baselines["grouped_mm"]).train()
    with torch.no_grad():
        expected = baselines["grouped_mm"](input_ids=batch, labels=batch).loss
        got = ours(input_ids=batch, labels=batch).loss
    lm_only = got - ours.config.router_aux_loss_coef * ours(input_ids=batch).aux_loss.detach()
    tolerance = 1e-4 if args.dtype == "float32" else 5e-2
    assert abs(lm_only.item() - expected.item()) < tolerance, (lm_only.item(), expected.item())

    models = {f"transformers Qwen3-MoE ({impl})": net for impl, net in baselines.items()}
    models["seedlm gate=none"] = ours
    models["seedlm gate=headwise"] = gated_variant(ours, "headwise")
    models["seedlm gate=elementwise"] = gated_variant(ours, "elementwise")
    rounds = {name: [] for name in models}
    for round_ in range(args.rounds):
        medians = time_interleaved(models, batch, args.steps, args.warmup if round_ == 0 else 0)
        for name, seconds in medians.items():
            rounds[name].append(seconds)
    # the transformers models compute what gate=none computes (same weights); a gate adds q_proj rows
    flops = {name: training_step_flops((ours if name.startswith("transformers") else net).config, *batch.shape)
             for name, net in models.items()}
    return {"args": vars(args), "rounds": rounds, "flops": flops, "loss": expected.item()}


def report(result: dict, peak_flops: float) -> str:
    """Markdown: the setup, one row per model (ms, tokens/s, ratios and % of peak over the rounds), the goals."""
    a, rounds, flops = result["args"], result["rounds"], result["flops"]
    tokens = a["batch"] * a["seq"]
    median = {name: statistics.median(times) for name, times in rounds.items()}
    baseline_name = min((n for n in median if n.startswith("transformers")), key=median.get)
    baseline, gate_none = rounds[baseline_name], rounds["seedlm gate=none"]
    lines = [
        f"Training step (forward+backward with labels), {a['dtype']}, {a['threads']} threads: hidden {a['hidden']}, "
        f"{a['layers']} layers, {a['heads']}/{a['kv_heads']} heads, {a['experts']} experts top-{a['top_k']}, "
        f"expert FFN {a['expert_ffn']}, vocab {a['vocab']}, {a['batch']}x{a['seq']} tokens; {a['rounds']} rounds "
        f"of {a['steps']} steps per model after {a['warmup']} warm-up steps, models interleaved step by step. "
        f"Baseline: {baseline_name}; same weights in all models, LM losses checked equal ({result['loss']:.4f}) "
        "before timing. Times: the median over the rounds of each round's median step; ratios: min / median / max "
        "over the rounds, each taken within a round. Floor: the step's FLOPs (attention + router + active experts "
        "+ LM head, 3x forward) at the matmul peak.",
        "",
        "| model | ms / step | tokens/s | speed vs baseline | step time vs gate=none | floor (ms) | % of peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, times in rounds.items():
        shown = f"{name}, baseline" if name == baseline_name else name
        vs_none = ratio_spread(times, gate_none).format("{:.3f}", "x") if name.startswith("seedlm") else ""
        floor = flops[name] / peak_flops
        peak_share = Spread.of(100 * floor / t for t in times).format("{:.0f}", "%")
        lines.append(f"| {shown} | {1000 * median[name]:.1f} | {tokens / median[name]:,.0f} | "
                     f"{ratio_spread(baseline, times).format('{:.2f}', 'x')} | {vs_none} | {1e3 * floor:.1f} | "
                     f"{peak_share} |")
    overhead = lambda gate: ratio_spread(rounds[f"seedlm gate={gate}"], gate_none).map(lambda r: 100 * (r - 1))
    goals = [goal("ours vs transformers", ratio_spread(baseline, gate_none), ">=", 1.0, unit="x"),
             goal("gate overhead headwise", overhead("headwise"), "<=", 3, "{:+.1f}", "%"),
             goal("gate overhead elementwise", overhead("elementwise"), "<=", 8, "{:+.1f}", "%")]
    lines += ["", "Goals (min / median / max over the rounds): " + "; ".join(goals) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(report(measure(args), matmul_peak_flops()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
