"""Metrics: per-document values and their aggregation over a task, with lm-evaluation-harness meanings.

- acc: multiple_choice: the gold choice has the highest log-likelihood; loglikelihood: the continuation
  is the greedy one.
- acc_norm: multiple_choice, log-likelihood divided by the choice's length in characters.
- perplexity: loglikelihood: exp(-mean over documents of the continuation log-likelihood) (lm-eval's);
  loglikelihood_rolling: per-token perplexity exp(-sum logprob / sum tokens).
- word_perplexity, byte_perplexity, bits_per_byte: loglikelihood_rolling, the total log-likelihood over
  the total words (whitespace-separated) or UTF-8 bytes of the documents.
- exact_match: generate_until, the generation equals the target (optionally ignoring case/punctuation).
"""

from __future__ import annotations

import math
import re
import string

METRICS_BY_OUTPUT_TYPE = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("acc", "perplexity"),
    "loglikelihood_rolling": ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}

# metrics whose value is the mean of per-document scores (they get a standard error)
MEAN_METRICS = ("acc", "acc_norm", "exact_match")


def multiple_choice_scores(logprobs: list[float], choices: list[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one document; ties go to the first choice (argmax)."""
    best = max(range(len(logprobs)), key=lambda i: logprobs[i])
    normed = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices)]
    best_norm = max(range(len(normed)), key=lambda i: normed[i])
    return {"acc": float(best == gold), "acc_norm": float(best_norm == gold)}


def exact_match(prediction: str, reference: str, ignore_case: bool = False, ignore_punctuation: bool = False) -> float:
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(metric: str, records: list[dict]) -> dict[str, float]:
    """Aggregate one metric over per-document records. A record holds what the metric needs:
    mean metrics their 0/1 score under the metric's name; loglikelihood perplexity `logprob`;
    rolling metrics `logprob`, `tokens`, `words`, `bytes`."""
    if not records:
        raise ValueError(f"no documents to aggregate {metric} over")
    if metric in MEAN_METRICS:
        mean, stderr = mean_and_stderr([r[metric] for r in records])
        return {metric: mean, f"{metric}_stderr": stderr}
    total_lp = sum(r["logprob"] for r in records)
    if metric == "perplexity":
        if "tokens" in records[0]:  # rolling: per-token
            return {metric: math.exp(-total_lp / sum(r["tokens"] for r in records))}
        return {metric: math.exp(-total_lp / len(records))}
    if metric == "word_perplexity":
        return {metric: math.exp(-total_lp / sum(r["words"] for r in records))}
    if metric == "byte_perplexity":
        return {metric: math.exp(-total_lp / sum(r["bytes"] for r in records))}
    if metric == "bits_per_byte":
        return {metric: -total_lp / sum(r["bytes"] for r in records) / math.log(2)}
    raise ValueError(f"unknown metric {metric!r}")
