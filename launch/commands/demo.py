"""`seedlm demo`: build a tiny model of each family, run a forward pass and generate().

A smoke check of an installation; no data or tokenizer needed (the prompt is random token ids).
"""

import argparse

DEMO_PRESETS = ("gated_moe_tiny", "deltaproduct_tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=list(DEMO_PRESETS), help="model presets (configs/models)")
    parser.add_argument("--seq-len", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from seedlm.launch.presets import MODEL_PRESET_DIR, load_model_config

    torch.manual_seed(args.seed)
    for name in args.presets:
        if not (MODEL_PRESET_DIR / f"{name}.yaml").is_file():
            print(f"{name}: preset not in this checkout, skipped")
            continue
        config = load_model_config(name)
        counts = config.parameter_counts()
        net = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(0, config.vocab_size, (2, args.seq_len))
        start = time.perf_counter()
        with torch.no_grad():
            out = net(ids, labels=ids)
        forward_ms = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        generated = net.generate(ids[:, :8], max_new_tokens=args.new_tokens, do_sample=False)
        generate_s = time.perf_counter() - start
        print(
            f"{name} ({config.model_type}): {counts.total / 1e6:.2f}M parameters "
            f"({counts.active / 1e6:.2f}M active), "
            f"forward on {tuple(ids.shape)} loss {out.loss.item():.3f} (ln vocab = "
            f"{torch.log(torch.tensor(float(config.vocab_size))).item():.3f}) in {forward_ms:.0f} ms; "
            f"generate() {args.new_tokens} tokens x 2 in {generate_s:.2f} s -> {generated[0, 8:].tolist()}"
        )
    return 0
