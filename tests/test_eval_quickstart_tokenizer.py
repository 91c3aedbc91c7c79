"""The shipped tasks on the tokenizer the README quickstart trains (sentencepiece BPE on the stdlib corpus),
whose pieces span words ("▁is▁a"): the context/continuation split and every task end to end."""

import math

import pytest

from seedlm.eval.harness import evaluate
from seedlm.eval.lm import CausalLM
from seedlm.eval.requests import Loglikelihood, encode_pair
from seedlm.eval.synthetic import SYNTHETIC_TASKS
from seedlm.eval.tasks import find_task_files
from tests.test_eval_utils import quickstart_tokenizer, tiny_model


@pytest.fixture(scope="module")
def quickstart_tok(tmp_path_factory):
    tok = quickstart_tokenizer(str(tmp_path_factory.mktemp("tok")))
    assert "▁is▁a" in tok.get_vocab() or "▁of▁the" in tok.get_vocab()  # pieces span words
    return tok


def spanning_pair(tok) -> tuple[str, str]:
    """(context, continuation) whose joint encoding has one piece across the boundary: with the piece
    "▁is▁a", context "... is" + continuation " a"."""
    piece = "▁is▁a" if "▁is▁a" in tok.get_vocab() else "▁of▁the"
    first, last = piece.strip("▁").split("▁")
    return f"It says that this {first}", f" {last}"


def test_a_piece_spanning_the_boundary_starts_the_continuation(quickstart_tok):
    tok = quickstart_tok
    context, continuation = spanning_pair(tok)
    whole, context_own = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    # the broken case itself: cut at len(context_own), the joint encoding leaves the continuation nothing
    assert len(whole) <= len(context_own) or whole[: len(context_own)] != context_own
    ctx, cont = encode_pair(tok, context, continuation)
    assert len(cont) >= 1
    assert ctx + cont == whole
    assert tok.decode(cont).endswith(continuation) and context.startswith(tok.decode(ctx))
    # no spanning piece: the split is lm-eval's, at the context's own token count
    ctx, cont = encode_pair(tok, "x = 1\n", "y = 2")
    assert ctx == tok("x = 1")["input_ids"] and ctx + cont == tok("x = 1\ny = 2")["input_ids"]


def test_spanning_continuation_is_scored_given_the_context_before_it(quickstart_tok):
    tok = quickstart_tok
    net = tiny_model("gated_moe", len(tok))
    context, continuation = spanning_pair(tok)
    ctx, cont = encode_pair(tok, context, continuation)
    import torch

    with torch.no_grad():
        logprobs = torch.log_softmax(net(torch.tensor([ctx + cont])).logits[0].double(), -1)  # [T, V]
    expected = sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    [(got, _)] = CausalLM(net, tok, show_progress=False).loglikelihood([Loglikelihood(context, continuation)])
    assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("family", ["gated_moe", "deltaproduct"])
def test_every_shipped_task_gives_finite_metrics(quickstart_tok, family):
    net = tiny_model(family, len(quickstart_tok))
    shipped = sorted(find_task_files())
    assert {"tiny_arith", "tiny_cloze", "tiny_qa", "tiny_text"} <= set(shipped)
    results = evaluate(net, quickstart_tok, shipped, batch_size=8, show_progress=False)  # every document
    results.update(evaluate(net, quickstart_tok, list(SYNTHETIC_TASKS), batch_size=8, limit=8, show_progress=False))
    assert set(results) == set(shipped) | set(SYNTHETIC_TASKS)
    for task, metrics in results.items():
        values = {k: v for k, v in metrics.items() if not k.endswith("_stderr")}
        assert values["num_docs"] > 0, task
        assert all(math.isfinite(v) for v in values.values()), (task, metrics)
