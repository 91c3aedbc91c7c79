"""Request types and their tokenisation, with lm-evaluation-harness semantics.

Three kinds of request, as in lm-evaluation-harness:

- `Loglikelihood(context, continuation)`: log P(continuation | context) summed over the continuation's
  tokens, and whether greedy decoding would have produced exactly those tokens. The split into context
  and continuation tokens is made at the token boundary of the *joint* encoding: encode(context +
  continuation), then the first len(encode(context)) tokens are the context, as in lm-eval. Trailing
  spaces of the context move to the continuation first, so "Answer: " + "Paris" is scored as "Answer:"
  + " Paris" (a tokenizer attaches a space to the word after it). A piece that spans the boundary
  (seedlm's sentencepiece BPE has pieces such as "▁is▁a") starts the continuation, so the continuation
  always has a token to score (lm-eval's split would leave it none). An empty context is replaced by the
  prefix token (bos, else eos), so the first continuation token is still conditioned on something.
- `LoglikelihoodRolling(text)`: log P(text) under windows of at most the model's max length. Every token
  is predicted exactly once; the first window is conditioned on the prefix token, each later window on
  the tokens before it (see `rolling_windows`).
- `GenerateUntil(context, until, max_gen_toks)`: greedy generation, cut at the first stop string.

Every scoring request becomes a list of `ScoreItem`s: a token list and the number of trailing tokens to
score. The model runner (`eval.lm`) scores items in length-sorted batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Loglikelihood:
    context: str
    continuation: str


@dataclass(frozen=True)
class LoglikelihoodRolling:
    text: str


@dataclass(frozen=True)
class GenerateUntil:
    context: str
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256


@dataclass(frozen=True)
class ScoreItem:
    """Score the last `num_targets` tokens of `tokens`, each given every token before it (the model sees
    at most its max length of those; the scorer truncates on the left)."""

    tokens: tuple[int, ...]
    num_targets: int


@dataclass
class RollingResult:
    """A rolling request's total log-likelihood (natural log) and how many tokens it covered."""

    logprob: float
    num_tokens: int
    windows: list[ScoreItem] = field(default_factory=list, repr=False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids with the tokenizer's own default for special tokens (as lm-eval's HF model does): a
    tokenizer that adds bos adds it to contexts and whole strings alike, so the split stays aligned."""
    return list(tokenizer(text)["input_ids"])


def prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context: bos when the tokenizer has one, else eos."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a bos nor an eos token: an empty context cannot be scored")


def encode_pair(tokenizer, context: str, continuation: str, encode_fn=None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split at the token boundary of the joint encoding. `encode_fn`
    (text -> ids) replaces `encode` (the lm-eval adapter passes its model's own tok_encode)."""
    encode_text = encode_fn or (lambda text: encode(tokenizer, text))
    if context == "":
        cont = encode_text(continuation)
        prefix = prefix_token_id(tokenizer)
        if cont and cont[0] == prefix:  # the tokenizer already put bos in front: condition on that one
            return cont[:1], cont[1:]
        return [prefix], cont
    # move trailing whitespace of the context to the continuation (word-boundary tokenisation)
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    whole = encode_text(context + continuation)
    context_ids = encode_text(context)
    # The context is the longest run of leading tokens on which the joint encoding agrees with the
    # context's own: all of the context's tokens when no piece spans the boundary (lm-eval's split).
    # "... is" + " a" may encode jointly as [..., "▁is▁a"]: then "▁is▁a" is the continuation, scored
    # given the tokens before it, where lm-eval's split at len(context_ids) would leave no token at all.
    n_context = 0
    while n_context < min(len(whole), len(context_ids)) and whole[n_context] == context_ids[n_context]:
        n_context += 1
    if n_context == 0:  # the very first piece spans the boundary: condition on the prefix token
        return [prefix_token_id(tokenizer)], whole
    return whole[:n_context], whole[n_context:]


def loglikelihood_item(tokenizer, request: Loglikelihood) -> ScoreItem:
    context, continuation = encode_pair(tokenizer, request.context, request.continuation)
    if not continuation:
        raise ValueError(
            f"continuation {request.continuation!r} encodes to no tokens after context {request.context[-40:]!r}"
        )
    return ScoreItem(tuple(context + continuation), len(continuation))


def rolling_windows(
    tokens: list[int], prefix_token: int, max_length: int, stride: int | None = None
) -> list[ScoreItem]:
    """Windows that predict every token of `tokens` exactly once, each at most `max_length` model inputs.

    The first window feeds [prefix] + tokens[:max_length - 1] and predicts tokens[:max_length]. Each later
    window predicts the next `stride` tokens (fewer at the end), given the `max_length` tokens before its
    last target: with stride == max_length (the default, lm-eval's choice) windows are disjoint and each
    is conditioned only on the token before it; a smaller stride gives every prediction at least
    max_length - stride tokens of context, at the cost of more forward passes.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [ScoreItem(tuple([prefix_token] + tokens[:first]), first)]
    predicted = first
    while predicted < len(tokens):
        end = min(predicted + stride, len(tokens))
        # model input: the max_length tokens before `end`'s last target -> tokens[end - max_length - 1 : end - 1]
        start = max(0, end - max_length - 1)
        windows.append(ScoreItem(tuple(tokens[start:end]), end - predicted))
        predicted = end
    return windows


def truncate_for_model(item: ScoreItem, max_length: int) -> tuple[list[int], list[int]]:
    """(model input, targets): the input is tokens[:-1] cut on the left to max_length; the targets are the
    last num_targets tokens, predicted by the last num_targets input positions."""
    if item.num_targets > max_length:
        raise ValueError(
            f"a continuation of {item.num_targets} tokens does not fit the model's max length {max_length}"
        )
    tokens = list(item.tokens)
    inputs = tokens[-(max_length + 1) :][:-1]
    return inputs, tokens[-item.num_targets :]


def cut_at_stop(text: str, until: tuple[str, ...] | list[str]) -> str:
    """text up to the earliest occurrence of any stop string."""
    end = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                end = min(end, i)
    return text[:end]
