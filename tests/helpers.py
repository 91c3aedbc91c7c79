"""Shared test helpers."""

import os
import subprocess
import sys
import textwrap

BLOCK_SEEDLM = """
import importlib.abc, sys
class BlockSeedlm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('model', 'launch', 'data_pipeline', 'eval'):
            raise ImportError('seedlm is not installed here: ' + name)
sys.meta_path.insert(0, BlockSeedlm())
"""


def run_without_seedlm(script: str, cwd) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter in which no seedlm package can be imported (as on a machine
    that has only torch, transformers and safetensors), with its own transformers module cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(cwd / "hf_modules")
    return subprocess.run(
        [sys.executable, "-c", BLOCK_SEEDLM + textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


WORDS = "alpha beta gamma delta state token expert router gate value key query".split()


def write_tiny_corpus_and_tokenizer(root):
    """400 short seeded documents as jsonl and a 512-piece tokenizer trained on them: data for fast runs."""
    import json
    import random

    from data_pipeline import train_tokenizer

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(400)]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer(docs, root / "tok", vocab_size=512, max_chars=None)
    return corpus, root / "tok"


def tiny_run_overrides(corpus, tok, **fields) -> list[str]:
    """`seedlm train` overrides for a fast run on write_tiny_corpus_and_tokenizer's data; `fields` add or
    replace dotted keys (or top-level aliases such as max_steps)."""
    args = {
        "tokenizer.path": str(tok),
        "data.sources": f"[{{kind: jsonl, path: {corpus}, holdout_fraction: 0.1}}]",
        "data.seq_len": 64,
        "data.micro_batch_size": 2,
        "data.num_workers": 0,
        "data.shuffle_buffer": 32,
        "model_overrides.vocab_size": 512,
        "train.warmup_steps": 2,
        "train.progress_bar": "false",
        "train.tensorboard": "false",
        "train.peak_tflops": 1.0,
    }
    args.update({k: str(v) for k, v in fields.items()})
    return [f"{k}={v}" for k, v in args.items()]
