"""The evaluation entry points: tasks on a model, results as JSON and a markdown table.

On a live model during training (every rank calls it; results are the same on every rank):

    from seedlm.eval import evaluate, heldout_loss, flat_metrics
    results = evaluate(model, tokenizer, ["tiny_qa", "parity"], batch_size=16, limit=100)
    # {"tiny_qa": {"acc": 0.52, "acc_stderr": 0.05, "acc_norm": 0.49, ..., "num_docs": 100}, "parity": {...}}
    metrics.update(flat_metrics(results))            # {"eval/tiny_qa/acc": 0.52, ...}
    metrics["eval/loss"] = heldout_loss(model, val_batches, max_batches=20)["loss"]

On a model folder (an exported HF folder, or a checkpoint's hf/ folder; `seedlm eval` and
`seedlm.launch.checkpoint.resolve_model_dir` find the one of a run folder):

    model, tokenizer = load_model_dir("export/x")
    results = evaluate(model, tokenizer, ["tiny_qa"])
    save_results(results, "results.json")            # and results.md beside it
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from .lm import CausalLM, dist_info
from .metrics import aggregate, count_bytes, count_words, exact_match, multiple_choice_scores
from .requests import GenerateUntil, Loglikelihood, LoglikelihoodRolling
from .tasks import Task, TaskError, resolve_tasks

# ---------------------------------------------------------------- model folders


def load_model_dir(path: str | Path, device: str | None = None, dtype: str | None = None, attn_implementation=None,
                   device_map: str | dict | None = None, max_memory: dict | None = None):
    """(model, tokenizer) from a model folder (one with a config.json), in eval mode. seedlm's own families
    load through `import seedlm`; other models through trust_remote_code.

    device_map ("auto", or {module name: device}) places a model too large for one device over the GPUs,
    CPU memory and, past `max_memory`, disk (accelerate's big-model dispatch: each layer's weights move to
    its device as it runs); `device` is then not used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        # the run-folder layout belongs to launch/ (eval does not depend on it): say where to resolve one
        raise FileNotFoundError(f"{folder} holds no config.json: load_model_dir takes a model folder. For a run "
                                "folder, evaluate with `seedlm eval RUN_DIR`, or load "
                                "seedlm.launch.checkpoint.resolve_model_dir(RUN_DIR)")
    kwargs = {"trust_remote_code": True}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    offload_folder = None
    if device_map is not None:
        import tempfile

        offload_folder = tempfile.mkdtemp(prefix="seedlm-offload-")  # weights placed on "disk" are written here
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    net = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if offload_folder is not None:  # the offloaded copy lives as long as the model, not on in /tmp
        import shutil
        import weakref

        weakref.finalize(net, shutil.rmtree, offload_folder, True)
    if device and device_map is None:
        net = net.to(device)
    net.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return net, tokenizer


# ---------------------------------------------------------------- evaluation


def evaluate_task(lm: CausalLM, task: Task, limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """One task's aggregated metrics (and num_docs)."""
    docs = task.docs[:limit] if limit else task.docs
    if not docs:
        raise TaskError(f"{task.source}: task {task.name} has no documents to evaluate")
    names = [m["metric"] for m in task.metrics]
    records: list[dict] = []
    if task.output_type == "multiple_choice":
        requests, spans = [], []
        for i, doc in enumerate(docs):
            context, choices = task.context(doc, i, num_fewshot), task.choices(doc)
            spans.append((len(requests), choices, task.target(doc)))
            requests += [Loglikelihood(context, task.target_delimiter + c) for c in choices]
        scores = lm.loglikelihood(requests)
        for start, choices, gold in spans:
            if not 0 <= gold < len(choices):
                raise TaskError(f"{task.source}: doc_to_target gave index {gold} for {len(choices)} choices")
            lps = [lp for lp, _ in scores[start : start + len(choices)]]
            records.append(multiple_choice_scores(lps, choices, gold))
    elif task.output_type == "loglikelihood":
        # as in lm-eval, the continuation is doc_to_target as is (no target_delimiter): a task that
        # wants a space before the answer puts it in doc_to_target, e.g. "{{' ' + answer}}"
        requests = [Loglikelihood(task.context(d, i, num_fewshot), task.target(d)) for i, d in enumerate(docs)]
        records = [{"acc": float(greedy), "logprob": lp} for lp, greedy in lm.loglikelihood(requests)]
    elif task.output_type == "loglikelihood_rolling":
        texts = [task.target(d) for d in docs]
        results = lm.loglikelihood_rolling([LoglikelihoodRolling(t) for t in texts])
        records = [
            {"logprob": r.logprob, "tokens": r.num_tokens, "words": count_words(t), "bytes": count_bytes(t)}
            for r, t in zip(results, texts)
        ]
    else:  # generate_until
        kw = task.generation_kwargs
        until = tuple(kw.get("until") or [])
        max_gen = int(kw.get("max_gen_toks", 256))
        requests = [GenerateUntil(task.context(d, i, num_fewshot), until, max_gen) for i, d in enumerate(docs)]
        outputs = lm.generate_until(requests)
        for out, doc, spec in zip(outputs, docs, [task.metrics] * len(docs)):
            opts = next((m for m in spec if m["metric"] == "exact_match"), {})
            records.append(
                {
                    "exact_match": exact_match(
                        out, task.target(doc), opts.get("ignore_case", False), opts.get("ignore_punctuation", False)
                    )
                }
            )
    out: dict = {}
    for name in names:
        out.update(aggregate(name, records))
    out["num_docs"] = len(docs)
    return out


def evaluate(
    model,
    tokenizer,
    tasks: list[str | Task],
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    include_paths: list[str | Path] | None = None,
    show_progress: bool = True,
    failures: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Evaluate `model` (any causal LM, live or loaded) on tasks; returns {task: {metric: value, ...}}.

    tasks: task names (shipped YAML tasks, tasks under `include_paths`, synthetic task names), YAML paths,
    or `Task` objects. limit: at most this many documents per task. num_fewshot overrides each task's.
    failures: when a dict is given, a task that fails (does not load, or raises while it runs) is recorded
    there as {task: reason} and the other tasks still run; without it the first failure raises.
    Under torch.distributed every rank must call it; each scores a share and all get the full results
    (with `failures`, a task must then fail on every rank, as bad task files and data do).
    The model is put in eval mode and handed back in the mode it came in.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    # load every task (and so report every malformed one) before any compute
    unresolved: dict[str, str] = {}
    names = [t for t in tasks if not isinstance(t, Task)]
    loaded = iter(resolve_tasks(names, include_paths, unresolved if failures is not None else None))
    ordered = [t if isinstance(t, Task) else next(loaded) for t in tasks if isinstance(t, Task) or t not in unresolved]
    if failures is not None:
        failures.update(unresolved)
    lm = CausalLM(model, tokenizer, batch_size=batch_size, max_length=max_length, show_progress=show_progress)
    results = {}
    for task in ordered:
        try:
            results[task.name] = evaluate_task(lm, task, limit, num_fewshot)
        except Exception as err:  # noqa: BLE001 - with `failures`, one task's error does not discard the others
            if failures is None:
                raise
            failures[task.name] = str(err) if isinstance(err, TaskError) else f"{type(err).__name__}: {err}"
    return results


@torch.no_grad()
def heldout_loss(model, batches: Iterable[dict], max_batches: int | None = None) -> dict:
    """Mean next-token loss over held-out batches (dicts with input_ids, labels and optionally
    position_ids / attention_mask, as the data pipeline yields them; labels are shifted by one, as the model
    does). A batch with `shift_labels` (targets aligned with the inputs) is scored against them unshifted.

    Token-weighted over all batches and, under torch.distributed, over all ranks. Returns
    {"loss": mean nats per token, "perplexity", "tokens"}. Router losses are not included.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # [sum of token losses, token count]
    try:
        for n, batch in enumerate(batches):
            if max_batches is not None and n >= max_batches:
                break
            kwargs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
            logits = model(**kwargs, use_cache=False).logits  # [B, T, V]
            if "shift_labels" in batch:  # targets already aligned with the logits (synthetic tasks)
                shift_logits = logits.float().reshape(-1, logits.shape[-1])  # [B*T, V]
                shift_labels = batch["shift_labels"].to(device).reshape(-1)  # [B*T]
            else:
                labels = batch["labels"].to(device)
                shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B*(T-1), V]
                shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
            loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            total += torch.tensor([float(loss), float((shift_labels != -100).sum())], dtype=torch.float64)
    finally:
        model.train(was_training)
    _, world = dist_info()
    if world > 1:
        reduced = total.to(device)
        torch.distributed.all_reduce(reduced)
        total = reduced.cpu()
    loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if loss == loss else float("nan"), "tokens": int(total[1])}


# ---------------------------------------------------------------- reporting


def flat_metrics(results: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    """{"eval/TASK/METRIC": value} for a metrics log (stderrs and num_docs left out)."""
    return {
        f"{prefix}/{task}/{name}": value
        for task, metrics in results.items()
        for name, value in metrics.items()
        if not name.endswith("_stderr") and name != "num_docs"
    }


def markdown_table(results: dict[str, dict], failures: dict[str, str] | None = None) -> str:
    lines = ["| task | metric | value | stderr | docs |", "|---|---|---|---|---|"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name == "num_docs":
                continue
            stderr = metrics.get(f"{name}_stderr")
            err = f"{stderr:.4f}" if isinstance(stderr, float) and stderr == stderr else ""
            lines.append(f"| {task} | {name} | {value:.4f} | {err} | {metrics.get('num_docs', '')} |")
    if failures:
        lines += ["", "Failed tasks:"] + [f"- {task}: {' '.join(reason.split())}" for task, reason in failures.items()]
    return "\n".join(lines) + "\n"


def save_results(
    results: dict[str, dict], path: str | Path, info: dict | None = None, failures: dict[str, str] | None = None
) -> tuple[Path, Path]:
    """Write PATH (JSON: {"results": ..., "info": ...}, and "failed": {task: reason} when tasks failed) and
    the markdown table beside it (PATH with .md)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"results": results, "info": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}}
    if failures:
        payload["failed"] = failures
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown_table(results, failures))
    return path, md
