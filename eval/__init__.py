"""seedlm evaluation harness: lm-evaluation-harness request semantics, YAML tasks over local data,
synthetic tasks from the papers, attention-sink and length-extrapolation probes.

    from seedlm.eval import evaluate, heldout_loss, flat_metrics, load_model_dir, save_results

    model, tok = load_model_dir("export/x")                   # a model folder (an export, a checkpoint's hf/)
    results = evaluate(model, tok, ["tiny_qa", "parity"], batch_size=16, limit=200)
    save_results(results, "results.json")                      # + results.md (markdown table)

Modules, one job each: `requests` (request types, token-boundary split, rolling windows), `lm` (batched
scoring and generation on any causal LM, split across ranks), `tasks` (YAML tasks), `metrics`,
`harness` (evaluate, held-out loss, reports), `synthetic` (state tracking, parity, modular arithmetic,
MQAR), `attention_sinks`, `length_extrapolation`. The lm-eval adapter, which also takes run folders, is
`seedlm.launch.lm_eval_adapter`.

Imports are lazy, so `import eval` costs nothing until a name is used. `eval` depends on `model` only.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "harness",
    "evaluate_task": "harness",
    "heldout_loss": "harness",
    "flat_metrics": "harness",
    "markdown_table": "harness",
    "save_results": "harness",
    "load_model_dir": "harness",
    "CausalLM": "lm",
    "Loglikelihood": "requests",
    "LoglikelihoodRolling": "requests",
    "GenerateUntil": "requests",
    "rolling_windows": "requests",
    "Task": "tasks",
    "TaskError": "tasks",
    "load_task_file": "tasks",
    "resolve_tasks": "tasks",
    "attention_sink_stats": "attention_sinks",
    "accuracy_metrics": "synthetic",
    "token_accuracy": "synthetic",
    "loss_by_position": "length_extrapolation",
    "plot_loss_by_position": "length_extrapolation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
