"""Request semantics against log-probabilities computed here from the model's own logits."""

import pytest
import torch
import torch.nn.functional as F

from seedlm.eval.lm import CausalLM
from seedlm.eval.requests import (
    GenerateUntil,
    Loglikelihood,
    LoglikelihoodRolling,
    ScoreItem,
    cut_at_stop,
    encode_pair,
    rolling_windows,
)
from tests.test_eval_utils import tiny_model, tiny_tokenizer

REQUESTS = [
    Loglikelihood("The quick brown fox", " jumps over the lazy dog"),
    Loglikelihood("Question: What is the capital of France?\nAnswer: ", "Paris"),  # trailing space moves
    Loglikelihood("def add(a, b):\n", "    return a + b"),
    Loglikelihood("x", " y"),
    Loglikelihood("", "The dog did not move."),  # empty context: conditioned on the prefix token
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module", params=["gated_moe", "deltaproduct"])
def net(request, tok):
    return tiny_model(request.param, len(tok))


def full_logprobs(net, ids: list[int]) -> torch.Tensor:
    """log P(ids[t+1] | ids[:t+1]) for every t: one unbatched forward of the whole sequence -> [T-1]."""
    with torch.no_grad():
        logits = net(torch.tensor([ids])).logits[0].double()  # [T, V]
    return F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_encode_pair_splits_at_the_token_boundary(tok):
    ctx, cont = encode_pair(tok, "Answer: ", "Paris")
    assert ctx + cont == tok("Answer: Paris")["input_ids"]
    assert ctx == tok("Answer:")["input_ids"]  # the trailing space went to the continuation
    assert tok.decode(cont) == " Paris"
    ctx, cont = encode_pair(tok, "", "Paris")
    assert ctx == [tok.bos_token_id] and cont == tok("Paris")["input_ids"]


def test_loglikelihood_matches_hand_computed(net, tok):
    lm = CausalLM(net, tok, batch_size=2, show_progress=False)  # batches of 2: padding and sorting in play
    results = lm.loglikelihood(REQUESTS)
    for req, (logprob, greedy) in zip(REQUESTS, results):
        context = req.context.rstrip()
        continuation = req.context[len(context) :] + req.continuation
        if context:
            whole = tok(context + continuation)["input_ids"]
            n_ctx = len(tok(context)["input_ids"])
        else:
            whole = [tok.bos_token_id] + tok(continuation)["input_ids"]
            n_ctx = 1
        lp = full_logprobs(net, whole)[n_ctx - 1 :]  # the continuation's tokens
        assert logprob == pytest.approx(float(lp.sum()), abs=2e-4)
        with torch.no_grad():
            pred = net(torch.tensor([whole])).logits[0, n_ctx - 1 : -1].argmax(-1)
        assert greedy == bool((pred == torch.tensor(whole[n_ctx:])).all())


def test_loglikelihood_truncates_context_on_the_left(net, tok):
    lm = CausalLM(net, tok, batch_size=4, max_length=16, show_progress=False)
    req = Loglikelihood("The quick brown fox jumps over the lazy dog. The dog did not", " move.")
    ((logprob, _),) = lm.loglikelihood([req])
    whole = tok(req.context + req.continuation)["input_ids"]
    n_cont = len(whole) - len(tok(req.context)["input_ids"])
    assert len(whole) > 17 and n_cont < 16
    window = whole[-17:]  # the model sees the last 16 inputs, predicting the last n_cont tokens
    assert logprob == pytest.approx(float(full_logprobs(net, window)[-n_cont:].sum()), abs=2e-4)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 23, 40])
@pytest.mark.parametrize("max_length, stride", [(8, None), (8, 3), (8, 1), (5, 5)])
def test_rolling_windows_cover_each_token_once(n, max_length, stride):
    tokens = list(range(100, 100 + n))  # distinct values: a token's value names its position
    prefix = -1
    windows = rolling_windows(tokens, prefix, max_length, stride)
    targets = [t for w in windows for t in w.tokens[-w.num_targets :]]
    assert targets == tokens  # every token predicted exactly once, in order
    stream = [prefix] + tokens
    for w in windows:
        assert 1 <= len(w.tokens) - 1 <= max_length  # model inputs fit
        start = stream.index(w.tokens[0])
        assert list(w.tokens) == stream[start : start + len(w.tokens)]  # a contiguous slice
    for w in windows[1:]:  # later windows are full: max_length - stride + 1 tokens of context at least
        assert len(w.tokens) - 1 == min(max_length, n)
        assert w.num_targets <= (stride or max_length)


def test_rolling_loglikelihood_is_the_sum_over_windows(net, tok):
    text = "The quick brown fox jumps over the lazy dog. The dog did not move.\n" * 2
    tokens = tok(text)["input_ids"]
    bos = tok.bos_token_id
    # one window when it fits: log P(tokens | bos)
    lm = CausalLM(net, tok, batch_size=3, max_length=len(tokens) + 5, show_progress=False)
    (result,) = lm.loglikelihood_rolling([LoglikelihoodRolling(text)])
    assert result.num_tokens == len(tokens)
    assert result.logprob == pytest.approx(float(full_logprobs(net, [bos] + tokens).sum()), abs=5e-4)
    # windows of 10 inputs: the first conditioned on bos, each later one on the 10 inputs before its
    # last target (disjoint windows with the default stride; a short last window still gets full context)
    lm = CausalLM(net, tok, batch_size=3, max_length=10, show_progress=False)
    for stride in (None, 4):
        (result,) = lm.loglikelihood_rolling([LoglikelihoodRolling(text)], stride=stride)
        expected = float(full_logprobs(net, [bos] + tokens[:10]).sum())
        predicted = 10
        while predicted < len(tokens):
            end = min(predicted + (stride or 10), len(tokens))
            expected += float(full_logprobs(net, tokens[end - 11 : end])[-(end - predicted) :].sum())
            predicted = end
        assert result.logprob == pytest.approx(expected, abs=5e-4)


def test_generate_until_stops_at_stop_strings(tok):
    net = tiny_model("gated_moe", len(tok))
    lm = CausalLM(net, tok, batch_size=2, show_progress=False)
    contexts = ["The quick brown fox", "def add(a, b):\n", "Question:"]
    free = lm.generate_until([GenerateUntil(c, (), 24) for c in contexts])
    # greedy decoding by hand agrees with the unconstrained generations
    for c, text in zip(contexts, free):
        ids = tok(c)["input_ids"]
        for _ in range(24):
            with torch.no_grad():
                ids.append(int(net(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tok.eos_token_id:
                break
        new = ids[len(tok(c)["input_ids"]) :]
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert text == tok.decode(new, skip_special_tokens=True)
    # stop strings taken from the middle of each generation cut it there, and stop generation early
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    stops = [(text[6:8],) for text in free]
    cut = lm.generate_until([GenerateUntil(c, s, 24) for c, s in zip(contexts, stops)])
    hook.remove()
    for text, stop, out in zip(free, stops, cut):
        assert out == text[: text.find(stop[0])]
        assert stop[0] not in out
    assert len(calls) < 2 * 24  # two batches that ended before max_gen_toks


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc\ndef=g", ("=", "\n")) == "abc"
    assert cut_at_stop("abc", ("x",)) == "abc"


def test_continuation_longer_than_the_context_window_is_refused(tok):
    net = tiny_model("gated_moe", len(tok))
    lm = CausalLM(net, tok, max_length=4, show_progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        lm.score_items([ScoreItem(tuple(range(10, 20)), 6)])
