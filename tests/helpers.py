"""Shared test helpers."""

import os
import subprocess
import sys
import textwrap

BLOCK_SEEDLM = """
import importlib.abc, sys
class BlockSeedlm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'seedlm':
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

    from seedlm.data_pipeline import train_tokenizer

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


def reference_outputs(causal_lm, ids) -> dict:
    """What seedlm's own causal LM gives on `ids`: its base model's last_hidden_state and its logits."""
    import torch

    with torch.no_grad():
        return {"ids": ids, "hidden": causal_lm.base_model(ids).last_hidden_state, "logits": causal_lm(ids).logits}


def load_with_every_auto_class_without_seedlm(checks: list[tuple], cwd) -> list[str]:
    """Load each folder with AutoConfig, AutoModel and AutoModelForCausalLM (trust_remote_code) where seedlm
    cannot be imported, and compare with seedlm's numbers. `checks` holds (folder, reference_outputs(...),
    logits_too): AutoModel must give the reference hidden states, AutoModelForCausalLM's base model too, and
    its logits when `logits_too` (False for a base-model folder whose lm_head is not tied, hence not saved).
    Returns the 'OK folder config-class model-class lm-class' lines."""
    import torch

    cases = [{"folder": str(folder), "logits_too": logits_too, **outputs} for folder, outputs, logits_too in checks]
    torch.save(cases, cwd / "auto_class_checks.pt")
    result = run_without_seedlm(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        try:
            import seedlm.model
            raise SystemExit("seedlm should not be importable in this check")
        except ImportError:
            pass
        for case in torch.load({str(cwd / "auto_class_checks.pt")!r}):
            folder, ids = case["folder"], case["ids"]
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            base = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=case["hidden"].dtype).eval()
            lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=case["hidden"].dtype)
            lm.eval()
            for loaded in (config, base, lm):  # the folder's own code, not an installed package
                assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
            with torch.no_grad():
                torch.testing.assert_close(base(ids).last_hidden_state, case["hidden"], msg=folder)
                torch.testing.assert_close(lm.base_model(ids).last_hidden_state, case["hidden"], msg=folder)
                if case["logits_too"]:
                    torch.testing.assert_close(lm(ids).logits, case["logits"], msg=folder)
            generated = lm.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
            assert generated.shape == (1, 7), generated.shape
            print("OK", folder, type(config).__name__, type(base).__name__, type(lm).__name__)
        """,
        cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith("OK ")]


def umask_set_to(mask: int):
    """A context manager running its body under umask `mask` (the previous one is restored)."""
    import contextlib
    import os

    @contextlib.contextmanager
    def scope():
        previous = os.umask(mask)
        try:
            yield
        finally:
            os.umask(previous)

    return scope()


def file_modes(folder) -> dict[str, int]:
    """Permission bits of every file under `folder`, by path relative to it."""
    from pathlib import Path

    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in Path(folder).rglob("*") if p.is_file()}
