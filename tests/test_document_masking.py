"""Packed documents without a dense [T, T] mask: varlen attention (cu_seqlens) gives the dense-mask path's outputs
and gradients, in both model families; FlexAttention's document block mask equals the dense mask (its kernel is
refused on CPU and checked on CUDA by benchmarks/check_cuda_paths.py)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from seedlm.model.layers import (
    DocumentSpans,
    causal_attention_mask,
    document_block_mask,
    document_ids,
    packed_cu_seqlens,
)
from tests.test_deltaproduct_model import make_model as make_deltaproduct
from tests.test_gated_moe import make_model as make_gated_moe

# two rows of 24 tokens: documents of 7, 12, 5 and 24 tokens
POSITION_IDS = torch.stack([torch.cat([torch.arange(7), torch.arange(12), torch.arange(5)]), torch.arange(24)])


def packed_batch(vocab_size):
    torch.manual_seed(1)
    input_ids = torch.randint(0, vocab_size, POSITION_IDS.shape)
    return input_ids, POSITION_IDS


def loss_and_grads(model, attn_implementation, input_ids, position_ids):
    model.config._attn_implementation = attn_implementation
    model.zero_grad()
    logits = model(input_ids, position_ids=position_ids).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    (logits * weights).sum().backward()  # a loss that reaches every logit
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


MODELS = {
    "gated_moe": lambda: make_gated_moe(),
    "deltaproduct_hybrid": lambda: make_deltaproduct(attn_layers=[1]),
}


def test_varlen_attention_gets_document_spans_not_a_mask():
    mask = causal_attention_mask("varlen_attention", 24, 0, None, POSITION_IDS, batch_size=2)
    assert isinstance(mask, DocumentSpans)
    assert mask.cu_seqlens.tolist() == [0, 7, 19, 24, 48] and mask.max_seqlen == 24
    assert mask.cu_seqlens.dtype == torch.int32
    # one row of positions shared by a batch of 3: every row starts its own documents
    shared = causal_attention_mask("varlen_attention", 24, 0, None, POSITION_IDS[:1], batch_size=3)
    assert shared.cu_seqlens.tolist() == [0, 7, 19, 24, 31, 43, 48, 55, 67, 72]
    # no packed documents: sdpa's is_causal path; with a padding mask: sdpa's boolean mask
    assert causal_attention_mask("varlen_attention", 24, 0, None, torch.arange(24)[None], batch_size=2) is None
    padding = torch.ones(2, 24, dtype=torch.long)
    padding[0, :3] = 0
    dense = causal_attention_mask("varlen_attention", 24, 0, padding, None, batch_size=2)
    assert dense.shape == (2, 1, 24, 24) and dense.dtype == torch.bool


def test_packed_cu_seqlens_counts_row_starts_as_document_starts():
    docs = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert packed_cu_seqlens(docs).tolist() == [0, 2, 5, 10]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_varlen_attention_matches_dense_mask_forward_and_backward(family):
    model = MODELS[family]().train()
    input_ids, position_ids = packed_batch(model.config.vocab_size)
    dense_logits, dense_grads = loss_and_grads(model, "sdpa", input_ids, position_ids)
    varlen_logits, varlen_grads = loss_and_grads(model, "varlen_attention", input_ids, position_ids)
    torch.testing.assert_close(varlen_logits, dense_logits, rtol=1e-10, atol=1e-10)
    assert varlen_grads.keys() == dense_grads.keys() and len(dense_grads) > 0
    for name, grad in dense_grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)
    # the documents really are kept apart: the first document alone gives the packed row's first logits
    model.config._attn_implementation = "varlen_attention"
    with torch.no_grad():
        alone = model(input_ids[:1, :7]).logits
    torch.testing.assert_close(varlen_logits[:1, :7], alone, rtol=1e-10, atol=1e-10)


def test_flex_attention_is_refused_on_cpu_before_the_forward():
    # torch 2.13's compiled CPU FlexAttention read past the end of q/k/v here (AMD EPYC, AVX2: NaN or wrong logits
    # for this 24-token batch) and has no backward: refused with the reason, in training and under no_grad alike
    model = make_gated_moe(dtype=torch.float32)
    flex_model = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="flex_attention")
    input_ids, position_ids = packed_batch(model.config.vocab_size)
    reason = "'flex_attention' runs on CUDA only.*reads past the end.*use 'sdpa' or 'varlen_attention'"
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=reason):
            flex_model(input_ids, position_ids=position_ids)


def test_flex_attention_block_mask_matches_dense_mask_with_padding_and_a_cache():
    # the BlockMask itself (built on CPU; check_cuda_paths.py runs it through the kernel on CUDA)
    padding = torch.ones(2, 10, dtype=torch.long)
    padding[1, :4] = 0  # left padding in row 1; 6 cached tokens, 4 new ones
    dense = causal_attention_mask("sdpa", 4, 6, padding, None, batch_size=2)  # [2, 1, 4, 10]
    block_mask = document_block_mask(None, padding.bool(), 4, 6, 2, "cpu")
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(10), indexing="ij")
    assert torch.equal(block_mask.mask_mod(b, 0, q, kv), dense[:, 0])
    packed = causal_attention_mask("sdpa", 24, 0, None, POSITION_IDS, batch_size=2)
    block_mask = document_block_mask(document_ids(POSITION_IDS), None, 24, 0, 2, "cpu")
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(24), torch.arange(24), indexing="ij")
    assert torch.equal(block_mask.mask_mod(b, 0, q, kv), packed[:, 0])


@pytest.mark.parametrize("family", sorted(MODELS))
def test_varlen_attention_loads_by_name_and_generates_like_sdpa(family):
    model = MODELS[family]()
    config = copy.deepcopy(model.config)
    loaded = AutoModelForCausalLM.from_config(config, attn_implementation="varlen_attention")
    loaded.load_state_dict(model.state_dict())
    loaded = loaded.to(torch.float64).eval()
    assert loaded.config._attn_implementation == "varlen_attention"
    prompt = torch.randint(1, config.vocab_size, (2, 6))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))
