"""`seedlm export RUN_DIR OUT_DIR`: a run's checkpoint as a self-contained Hugging Face folder.

Every checkpoint already holds the consolidated weights (ZeRO partitions and expert-parallel shards
gathered at save time) in `hf/`; export re-saves them with safetensors sharded by size, the config with
the family's `auto_map`, the remote-code files, the tokenizer, a generation config and a model card, so the
folder loads with `AutoModelForCausalLM` (or AutoModel, AutoConfig) `.from_pretrained(OUT_DIR,
trust_remote_code=True)` without seedlm. Every file gets the mode the umask gives a new file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from seedlm.launch.checkpoint import HF_DIR, CheckpointError, run_checkpoint
from seedlm.launch.metrics import read_metrics


def current_umask() -> int:
    """The process umask. Read from /proc where it can be: os.umask can only read it by setting it, which for
    a moment would give other threads' new files (a background checkpoint save) a wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def use_umask_file_modes(folder: str | Path) -> None:
    """Give every file under `folder` the mode the umask gives a new file (0644 under umask 022).

    safetensors writes each weight file to a private temporary file (mode 0600) and renames it, so without
    this colleagues sharing a filesystem can read the config and code of a saved model but not its weights."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def model_card(model, run_dir: Path, checkpoint: Path, repo_hint: str) -> str:
    config = model.config
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    data = run_config.get("data", {}) or {}
    sources = [s if isinstance(s, str) else s.get("kind", "?") + ":" + str(s.get("path") or "")
               for s in data.get("sources", ["stdlib"])]
    if isinstance(data.get("synthetic"), dict):  # a generated task, not text (data_pipeline/synthetic.py)
        sources = ["synthetic " + ", ".join(f"{k}={v}" for k, v in data["synthetic"].items())]
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r and r["step"] <= state["step"]]
    train_losses = [r for r in records if "loss" in r and r["step"] <= state["step"]]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [seedlm, " + config.model_type + "]",
        "---",
        f"# {repo_hint}",
        "",
        f"A {config.card_summary()}, trained with seedlm.",
        "",
        "## Architecture",
        "",
        *config.card_lines(),
        "",
        "",
        "## Training",
        "",
        f"- data: {', '.join(sources)}",
        f"- steps: {state['step']}, tokens seen: {state['tokens_seen']:,}",
    ]
    if train_losses:
        lines.append(f"- final training loss: {train_losses[-1]['loss']:.4f}")
    if evals:
        lines += ["", "## Evaluation", "", "| step | held-out loss |", "|---|---|"]
        lines += [f"| {r['step']} | {r['eval_loss']:.4f} |" for r in evals]
    finals = [r for r in records if r.get("final") and r["step"] <= state["step"]]
    if finals:  # a synthetic task's final accuracy on all its held-out sequences
        lines += ["", f"Final evaluation at step {finals[-1]['step']}:", ""]
        lines += [f"- {k}: {v:.4f}" for k, v in finals[-1].items() if k.startswith("eval/") and v is not None]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_hint}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_hint}", trust_remote_code=True)',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, max_shard_size: str = "2GB") -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint = run_checkpoint(run_dir, step)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new output folder")
    hf_dir = checkpoint / HF_DIR
    net = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    net.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(model_card(net, run_dir, checkpoint, out_dir.name))
    use_umask_file_modes(out_dir)
    return out_dir


def export_and_sample(run_dir: str | Path, prompt: str | None, max_new_tokens: int = 48) -> str:
    """Export the run's latest checkpoint to <run_dir>/export, load it back with AutoModelForCausalLM
    (trust_remote_code, as a user would) and continue `prompt` greedily. Returns a report for the console."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(run_dir) / "export"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the run's own export is rewritten at each end of training
    export_run(run_dir, out_dir)
    net = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
    report = [f"exported {out_dir} ({type(net).__name__}, loaded back with AutoModelForCausalLM)"]
    if prompt:
        tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
        inputs = tokenizer(prompt, return_tensors="pt")
        generated = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2)
        report.append("sample:\n" + tokenizer.decode(generated[0], skip_special_tokens=True))
    return "\n".join(report)
