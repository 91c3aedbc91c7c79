"""The chunked linear + cross-entropy (model/fused_loss.py) against the plain head: logits = hidden @ W^T, then
transformers' ForCausalLMLoss. Same loss and gradients, and far fewer bytes saved for backward."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from seedlm.launch.metrics import saved_bytes_for_backward
from seedlm.model.fused_loss import linear_cross_entropy
from tests.test_deltaproduct_model import make_model as make_deltaproduct
from tests.test_gated_moe import make_model as make_gated_moe

# transformers' loss upcasts the logits to fp32 whatever their dtype (a float64 model's too), and so does the
# fused loss: in float64 and float32 alike the two paths differ by the fp32 rounding of the softmax, computed as
# exp(log_softmax) in one and exp(logits - logsumexp) in the other (worst seen over 20 seeds: 4.4e-8 beyond
# rtol 1e-6)
TOLERANCE = dict(rtol=1e-6, atol=2e-7)


def random_case(dtype, batch=2, seq=13, hidden=24, vocab=50, seed=0):
    """hidden [B, T, H], lm weight [V, H], labels [B, T] with a few -100 (document starts, padding)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.3
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = -100
    labels[1, 7] = -100
    return h, w, labels


def loss_and_grads(loss_fn, h, w):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


LOSS_ARGS = {
    "labels": lambda labels: dict(labels=labels),
    "shift_labels": lambda labels: dict(labels=labels, shift_labels=labels),
    "num_items_in_batch": lambda labels: dict(labels=labels, num_items_in_batch=torch.tensor(40)),
    "shift_labels_and_num_items": lambda labels: dict(labels=labels, shift_labels=labels, num_items_in_batch=7),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", LOSS_ARGS)
@pytest.mark.parametrize("chunk_size", [5, None])  # 5: several chunks, the last one short; None: the default
def test_loss_and_gradients_equal_the_plain_head(dtype, case, chunk_size):
    h, w, labels = random_case(dtype)
    kwargs = LOSS_ARGS[case](labels)
    plain = loss_and_grads(lambda h, w: ForCausalLMLoss(h @ w.T, vocab_size=w.shape[0], **kwargs), h, w)
    fused = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, chunk_size=chunk_size, **kwargs), h, w)
    assert fused[0].dtype == plain[0].dtype == torch.float32  # the loss is fp32, as transformers upcasts
    for name, expected, got in zip(("loss", "grad hidden", "grad weight"), plain, fused):
        torch.testing.assert_close(got, expected, **TOLERANCE, msg=name)
    assert fused[1][0, :2].abs().sum() == 0  # positions whose next token is ignored get no gradient


def test_tied_embedding_gets_both_gradients():
    # the lm_head weight is the embedding table: its gradient is the lookup's plus the head's
    h0, emb, labels = random_case(torch.float64)
    ids = labels.clamp(min=0)

    def loss_fn(head):
        def fn(_, table):
            hidden = torch.tanh(table[ids] + h0)  # [B, T, H], a function of the same table
            return head(hidden, table)

        return fn

    plain = loss_and_grads(loss_fn(lambda x, w: ForCausalLMLoss(x @ w.T, labels, vocab_size=w.shape[0])), h0, emb)
    fused = loss_and_grads(loss_fn(lambda x, w: linear_cross_entropy(x, w, labels, chunk_size=4)), h0, emb)
    torch.testing.assert_close(fused[0], plain[0], **TOLERANCE)
    torch.testing.assert_close(fused[2], plain[2], **TOLERANCE)


def test_bf16_matmul_with_fp32_softmax():
    h, w, labels = random_case(torch.bfloat16, seq=32, hidden=64, vocab=300)
    plain = loss_and_grads(lambda h, w: ForCausalLMLoss(h @ w.T, labels, vocab_size=300), h, w)
    fused = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=16), h, w)
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    # same bf16 logits, same fp32 softmax; the gradients differ by bf16 rounding (the fused weight gradient
    # is summed over chunks in fp32, the plain one in one bf16 matmul)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], plain[1], rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(fused[2], plain[2], rtol=2e-2, atol=1e-4)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_theirs():
    h, w, labels = random_case(torch.float64)
    h = h.clone().requires_grad_()
    ForCausalLMLoss(h @ w.T, labels, vocab_size=50).backward()
    expected, h.grad = h.grad, None
    frozen = w.clone()  # requires no gradient: the loss forms only the hidden states' one
    linear_cross_entropy(h, frozen, labels, chunk_size=5).backward()
    torch.testing.assert_close(h.grad, expected, **TOLERANCE)
    assert frozen.grad is None
    with torch.no_grad():  # no gradient at all: the loss alone, the same
        loss = linear_cross_entropy(h, w, labels, chunk_size=5)
    torch.testing.assert_close(loss, ForCausalLMLoss(h.detach() @ w.T, labels, vocab_size=50), **TOLERANCE)


def test_a_second_backward_is_refused_with_a_message():
    # the gradients are formed in the forward and scaled in place by the backward: a second backward through
    # the same graph would scale them twice, so it is refused rather than silently wrong
    h, w, labels = random_case(torch.float32)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_no_target_at_all_is_nan_as_in_transformers():
    h, w, labels = random_case(torch.float32)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, labels)) and torch.isnan(ForCausalLMLoss(h @ w.T, labels, 50))


def test_targets_that_do_not_match_the_hidden_states_are_refused():
    h, w, labels = random_case(torch.float32)
    with pytest.raises(ValueError, match="26 targets for 20 hidden states"):
        linear_cross_entropy(h[:, :10], w, labels)


def test_saved_bytes_stay_per_token_small():
    tokens, vocab, hidden = 2048, 32000, 256
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    plain = saved_bytes_for_backward(lambda: ForCausalLMLoss(h @ w.T, labels, vocab_size=vocab))
    fused = saved_bytes_for_backward(lambda: linear_cross_entropy(h, w, labels))
    # the fused loss keeps the gradients it formed in the forward, as large as the hidden states and the weight,
    # and nothing per token beyond them; the plain head keeps the fp32 log-softmax (saved by log_softmax and
    # nll_loss alike), 4 * vocab bytes per token
    bound = h.nbytes + w.nbytes + 64  # and the token count the mean divides by
    assert fused <= bound < plain
    assert plain >= h.nbytes + w.nbytes + 4 * vocab * tokens  # and its targets


@pytest.mark.parametrize(
    "make_model, overrides",
    [
        (make_gated_moe, dict(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)),
        (make_gated_moe, dict(num_experts=0, tie_word_embeddings=True)),
        (make_deltaproduct, dict(attn_layers=[1], attn_num_heads=2, tie_word_embeddings=True)),
        (make_deltaproduct, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    ],
    ids=["gated_moe", "gated_moe-dense-tied", "deltaproduct-hybrid-tied", "deltaproduct-moe"],
)
def test_training_forward_fuses_the_loss_with_the_same_loss_and_gradients(make_model, overrides):
    m = make_model(**overrides).train()
    ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, 0] = -100

    def run(**kwargs):
        m.zero_grad()
        out = m(ids, labels=labels, **kwargs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    fused, fused_grads = run()  # a training step: the fused path
    plain, plain_grads = run(return_logits=True)
    assert fused.logits is None and plain.logits.shape == (2, 12, m.config.vocab_size)
    torch.testing.assert_close(fused.loss, plain.loss, **TOLERANCE)
    assert fused_grads.keys() == plain_grads.keys() == {n for n, p in m.named_parameters() if p.requires_grad}
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **TOLERANCE, msg=name)
    # generation and evaluation still get logits: eval mode, no_grad, or no labels
    with torch.no_grad():
        assert m(ids, labels=labels).logits is not None
    assert m(ids).logits is not None
    m.eval()
    out = m(ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, plain.loss, **TOLERANCE)
    assert m(ids, labels=labels, return_logits=False).logits is None  # asked for: the fused loss in eval too


def test_model_forward_passes_shift_labels_and_num_items_to_the_fused_loss():
    m = make_gated_moe(num_experts=0).train()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    kwargs = dict(shift_labels=targets, num_items_in_batch=torch.tensor(25))
    fused = m(ids, **kwargs)  # aligned targets alone ask for the loss
    plain = m(ids, return_logits=True, **kwargs)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, plain.loss, **TOLERANCE)
    logits = plain.logits.float().reshape(-1, 97)
    by_hand = torch.nn.functional.cross_entropy(logits, targets.reshape(-1), reduction="sum")
    torch.testing.assert_close(fused.loss, by_hand / 25, **TOLERANCE)
