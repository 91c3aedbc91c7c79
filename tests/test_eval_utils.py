"""Shared builders for the eval tests (no tests here): a tiny tokenizer and tiny models of both families."""

import functools
import json
from pathlib import Path

import torch

from seedlm.eval.tasks import TASKS_DIR

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog did not move.",
    "def add(a, b):\n    return a + b\n",
    "Question: What is the capital of France?\nAnswer: Paris, Rome, Berlin, Madrid.",
    "parity: 1 0 1 1 = 1\nsum mod 7: 3 5 6 = 0\nrecall: a 1 b 2 ; a 1",
]


def corpus() -> list[str]:
    texts = list(TEXTS)
    for f in sorted((TASKS_DIR / "data").glob("*.jsonl")):
        texts += [json.dumps(json.loads(line)) for line in f.read_text().splitlines() if line.strip()]
    return texts * 4


@functools.cache
def tiny_tokenizer(out_dir: str):
    from seedlm.data_pipeline import train_tokenizer

    return train_tokenizer(corpus(), out_dir, vocab_size=400, num_threads=1)


@functools.cache
def quickstart_tokenizer(out_dir: str):
    """A tokenizer trained as `seedlm train quickstart` trains one (its sources, vocabulary and budget): a
    sentencepiece BPE on the stdlib corpus, with pieces that span words ("▁is▁a", "▁of▁the")."""
    from seedlm.data_pipeline import DataConfig, iter_texts, open_sources, train_tokenizer
    from seedlm.launch.config import load_run_config

    run = load_run_config("quickstart")
    data = DataConfig.from_dict(run.data)
    texts = iter_texts(open_sources(data, "train"), seed=data.seed)
    return train_tokenizer(texts, out_dir, vocab_size=run.tokenizer.vocab_size, model_type=run.tokenizer.model_type,
                           max_chars=run.tokenizer.max_chars)


def tiny_model(family: str, vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer model with weights large enough that log-probabilities differ clearly between tokens."""
    from transformers import AutoModelForCausalLM

    from seedlm.launch.presets import load_model_config

    cfg = load_model_config("gated_moe_tiny" if family == "gated_moe" else "deltaproduct_tiny")
    cfg.vocab_size = vocab_size
    cfg.hidden_size = 64
    cfg.initializer_range = 0.2
    cfg.max_position_embeddings = 256
    if family == "gated_moe":
        cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size = 4, 32, 32
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    else:
        cfg.num_heads, cfg.head_dim, cfg.intermediate_size = 2, 16, 96
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def saved_model_dir(tmp: Path, family: str = "gated_moe", tokenizer=None) -> Path:
    """A saved folder (model + tokenizer, by default the tiny one) for folder-based tests."""
    tok = tokenizer if tokenizer is not None else tiny_tokenizer(str(tmp / "tok"))
    net = tiny_model(family, len(tok))
    out = tmp / f"{family}_model"
    net.save_pretrained(out)
    tok.save_pretrained(out)
    return out
