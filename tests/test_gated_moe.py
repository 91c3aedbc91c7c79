"""The gated-attention MoE family: numerics against a plain reference, masking, caching, router losses,
saving and loading, bad configs."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from seedlm.model import GatedMoeConfig, GatedMoeForCausalLM, GatedMoeModel, load_balancing_loss, router_z_loss
from seedlm.model.modeling_gated_moe import CACHE_NAME
from seedlm.model.moe import grouped_linear
from tests.helpers import load_with_every_auto_class_without_seedlm, reference_outputs
from tests.reference_gated_moe import reference_forward


def tiny_config(**overrides) -> GatedMoeConfig:
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        max_position_embeddings=128,
        attn_output_gate="elementwise",
        rope_theta=10000.0,
    )
    fields.update(overrides)
    return GatedMoeConfig(**fields)


def make_model(dtype=torch.float64, seed=0, **overrides) -> GatedMoeForCausalLM:
    torch.manual_seed(seed)
    m = GatedMoeForCausalLM(tiny_config(**overrides))
    with torch.no_grad():  # spread the router so top-k choices are not near-ties
        for block in m.moe_blocks():
            block.gate.weight.normal_(0, 0.5)
    return m.to(dtype).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attn_output_gate="elementwise"),
        dict(attn_output_gate="headwise", norm_topk_prob=False),
        dict(attn_output_gate="none", qk_norm=False, shared_expert_intermediate_size=0),
        dict(num_experts=0),
    ],
    ids=["elementwise", "headwise", "none", "dense"],
)
def test_forward_and_backward_match_plain_reference(overrides):
    m = make_model(**overrides)
    ids = torch.randint(0, 97, (2, 11))
    logits = m(ids).logits
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in m.state_dict().items()}
    ref = reference_forward(sd, m.config, ids)
    torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9)

    # rope frequencies are fp32-rounded buffers in the model and exact in the reference: ~1e-9 relative
    probe = torch.randn_like(ref)
    (logits * probe).sum().backward()
    (ref * probe).sum().backward()
    for name, param in m.named_parameters():
        if name in sd and sd[name].grad is not None:
            torch.testing.assert_close(param.grad, sd[name].grad, rtol=1e-6, atol=1e-6, msg=name)


def test_fp32_grouped_path_matches_float64():
    m64 = make_model(hidden_size=64, head_dim=16, moe_intermediate_size=32)
    m32 = make_model(torch.float32, hidden_size=64, head_dim=16, moe_intermediate_size=32)
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(m32(ids).logits.double(), m64(ids).logits, rtol=1e-4, atol=1e-4)


def per_group_reference(x, w, sizes):
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return torch.cat([x[bounds[e] : bounds[e + 1]] @ w[e].T for e in range(len(sizes))])


@pytest.mark.parametrize(
    "dtype, in_features", [(torch.float32, 16), (torch.float64, 16), (torch.float32, 15)],
    ids=["grouped_mm", "fallback-fp64", "fallback-odd-row-bytes"],
)
def test_grouped_linear_matches_per_group_matmul(dtype, in_features):
    torch.manual_seed(0)
    x, w = torch.randn(20, in_features, dtype=dtype), torch.randn(4, 8, in_features, dtype=dtype)
    sizes = [5, 0, 12, 3]
    torch.testing.assert_close(grouped_linear(x, w, torch.tensor(sizes)), per_group_reference(x, w, sizes))


def test_grouped_linear_gradients_and_it_saves_the_weight_not_a_view():
    """Gradients equal the per-group matmuls' (empty group included). For backward it keeps the weight
    parameter itself: a saved view would pin the weight's storage after ZeRO-3 frees the parameter (it did:
    every expert stayed gathered from forward to backward, 0.8 GB per rank on the startup-memory benchmark)."""
    torch.manual_seed(0)
    x = torch.randn(20, 16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(4, 8, 16))
    sizes = [5, 0, 12, 3]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = grouped_linear(x, w, torch.tensor(sizes))
    assert any(t is w for t in saved) and not any(t is not w and t.untyped_storage().data_ptr()
                                                   == w.untyped_storage().data_ptr() for t in saved)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, w), grad)
    reference = torch.autograd.grad(per_group_reference(x, w, sizes), (x, w), grad)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


# transformers 5.24 renamed past_key_values to cache; exported models run on both sides of the rename
@pytest.mark.parametrize("cache_arg", ["cache", "past_key_values"])
def test_incremental_decoding_gives_full_forward_logits(cache_arg):
    m = make_model()
    ids = torch.randint(0, 97, (2, 12))
    full = m(ids, use_cache=False).logits
    steps, cache, start = [], None, 0
    for length in (5, 3, 1, 1, 2):  # prefill, a chunk with past (explicit mask), single tokens
        out = m(ids[:, start : start + length], **{cache_arg: cache}, use_cache=True)
        cache, start = getattr(out, CACHE_NAME), start + length
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("train_mode", [False, True])
def test_packed_documents_do_not_attend_across(train_mode):
    m = make_model()
    m.train(train_mode)
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    logits = m(packed, position_ids=position_ids).logits
    torch.testing.assert_close(logits[:, :7], m(a).logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[:, 7:], m(b).logits, rtol=1e-10, atol=1e-10)
    ref = reference_forward(m.state_dict(), m.config, packed, position_ids)
    torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9)


def test_left_padding_matches_unpadded_sequences():
    m = make_model()
    long, short = torch.randint(1, 97, (1, 9)), torch.randint(1, 97, (1, 6))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = m(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(logits[0], m(long).logits[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[1, 3:], m(short).logits[0], rtol=1e-10, atol=1e-10)
    # padding is left out of the router statistics: counts cover 9 + 6 real tokens, top-2 each
    out = m(batch, attention_mask=mask, position_ids=position_ids)
    assert out.expert_counts.sum(dim=-1).tolist() == [30.0, 30.0]


def test_generate_greedy_and_sampling_with_left_padding():
    m = make_model(torch.float32)
    prompts = [torch.randint(1, 97, (n,)) for n in (6, 3)]
    singles = [m.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p) :] for p in prompts]
    batch = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 6 - len(p) :], mask[i, 6 - len(p) :] = p, 1
    together = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i in range(2):
        assert together[i, 6:].tolist() == singles[i].tolist()
    torch.manual_seed(1)
    sampled = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (2, 12) and (sampled[:, 6:] < 97).all()


def test_every_expert_that_received_tokens_gets_gradient():
    m = make_model(torch.float32)
    m.train()
    ids = torch.randint(0, 97, (2, 16))
    out = m(ids, labels=ids)
    out.loss.backward()
    for layer, counts in zip(m.model.layers, out.expert_counts):
        grad_up = layer.mlp.experts.gate_up_proj.grad.abs().sum(dim=(1, 2))
        grad_down = layer.mlp.experts.down_proj.grad.abs().sum(dim=(1, 2))
        assert ((grad_up > 0) == (counts > 0)).all() and ((grad_down > 0) == (counts > 0)).all()
        assert layer.mlp.gate.weight.grad.abs().sum() > 0


def test_load_balancing_and_z_loss_hand_computed():
    counts = torch.tensor([2.0, 1.0, 1.0, 0.0])
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # f = [0.5, 0.25, 0.25, 0]; 4 * (0.5*0.4 + 0.25*0.3 + 0.25*0.2) = 1.3
    assert load_balancing_loss(counts, probs).item() == pytest.approx(1.3)
    uniform = load_balancing_loss(torch.full((8,), 3.0), torch.full((8,), 1 / 8))
    assert uniform.item() == pytest.approx(1.0)
    logits = torch.tensor([[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0]])
    # logsumexp = log 2 and log 4
    expected = (torch.log(torch.tensor(2.0)) ** 2 + torch.log(torch.tensor(4.0)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected.item())
    assert router_z_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(torch.log(torch.tensor(2.0)).item() ** 2)


def test_model_loss_adds_weighted_router_losses():
    m = make_model(router_aux_loss_coef=0.3, router_z_loss_coef=0.01)
    ids = torch.randint(0, 97, (2, 10))
    out = m(ids, labels=ids)
    lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_loss + 0.3 * out.aux_loss + 0.01 * out.z_loss)
    # the balancing loss is recomputable from what the output exposes (global-batch balancing)
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(out.expert_counts, out.router_probs))
    assert out.expert_counts.shape == (2, 6) and out.expert_counts.sum().item() == 2 * 20 * 2
    assert m(ids, output_router_logits=True).router_logits[0].shape == (20, 6)


def test_aux_loss_free_bias_steers_selection_and_is_saved(tmp_path):
    m = make_model(router_bias_update_rate=10.0)
    ids = torch.randint(0, 97, (2, 10))
    counts = m(ids).expert_counts
    m.update_router_biases(counts)
    bias = m.moe_blocks()[0].gate.expert_bias
    assert (bias[counts[0] > counts[0].mean()] < 0).all() and (bias[counts[0] < counts[0].mean()] > 0).all()
    assert "model.layers.0.mlp.gate.expert_bias" in m.state_dict()
    m.save_pretrained(tmp_path)
    loaded = GatedMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    torch.testing.assert_close(loaded.moe_blocks()[0].gate.expert_bias, bias.float())
    with pytest.raises(RuntimeError, match="router_bias_update_rate"):
        make_model().update_router_biases(counts)


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 97, (2, 10))
    grads = []
    for checkpointing in (False, True):
        m = make_model()
        m.train()
        if checkpointing:
            m.activation_checkpointing_enable()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_tied_embeddings_and_gate_widths():
    m = make_model(tie_word_embeddings=True)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    widths = {g: make_model(attn_output_gate=g).model.layers[0].self_attn.q_proj.out_features for g in
              ("elementwise", "headwise", "none")}
    assert widths == {"elementwise": 4 * 16, "headwise": 4 * 9, "none": 4 * 8}


def test_yarn_rope_scaling_changes_frequencies():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    m = make_model(rope_parameters=yarn, max_position_embeddings=128)
    plain = make_model()
    assert m.config.rope_parameters["rope_type"] == "yarn"
    assert not torch.allclose(m.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 97, (1, 40))
    assert torch.isfinite(m(ids).logits).all()


def test_eager_attention_returns_weights_and_sdpa_refuses_clearly():
    m = make_model()
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        m(torch.randint(0, 97, (1, 5)), output_attentions=True)
    ids = torch.randint(0, 97, (1, 5))
    sdpa_logits = m(ids).logits
    m.config._attn_implementation = "eager"
    out = m(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, sdpa_logits)  # eager is causal too
    assert torch.equal(out.attentions[0][0, 0].triu(1), torch.zeros(5, 5, dtype=torch.float64))
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 5, 5)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 4, 5, dtype=torch.float64))


def test_save_load_round_trip_and_auto_classes(tmp_path):
    m = make_model()
    m.save_pretrained(tmp_path / "lm")
    m.model.save_pretrained(tmp_path / "base")
    for folder in (tmp_path / "lm", tmp_path / "base"):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "seedlm_gated_moe"
        assert config["auto_map"] == {  # every Auto class, whichever class saved the folder
            "AutoConfig": "configuration_gated_moe.GatedMoeConfig",
            "AutoModel": "modeling_gated_moe.GatedMoeModel",
            "AutoModelForCausalLM": "modeling_gated_moe.GatedMoeForCausalLM",
        }
        for name in ("modeling_gated_moe.py", "configuration_gated_moe.py", "layers.py", "moe.py"):
            assert (folder / name).exists(), name
        assert isinstance(AutoConfig.from_pretrained(folder), GatedMoeConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float64)
    assert type(loaded) is GatedMoeForCausalLM
    ids = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(loaded(ids).logits, m(ids).logits)
    base = AutoModel.from_pretrained(tmp_path / "base", dtype=torch.float64)
    assert type(base) is GatedMoeModel
    torch.testing.assert_close(base(ids).last_hidden_state, m.model(ids).last_hidden_state)


def test_every_auto_class_loads_where_seedlm_is_not_importable(tmp_path):
    m = make_model(torch.float32)
    m.save_pretrained(tmp_path / "lm")
    m.model.save_pretrained(tmp_path / "base")
    outputs = reference_outputs(m, torch.randint(0, 97, (2, 8)))
    # the untied lm_head is not in the base model's folder: AutoModelForCausalLM gets a fresh one there
    ok = load_with_every_auto_class_without_seedlm(
        [(tmp_path / "lm", outputs, True), (tmp_path / "base", outputs, False)], tmp_path
    )
    assert [line.split()[2:] for line in ok] == [["GatedMoeConfig", "GatedMoeModel", "GatedMoeForCausalLM"]] * 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(hidden_size=30, head_dim=None, num_attention_heads=4), "not divisible by num_attention_heads"),
        (dict(attn_output_gate="channelwise"), "not a gate kind"),
        (dict(num_experts=-1), "num_experts=-1"),
        (dict(head_dim=7), "must be even"),
        (dict(hidden_act="gelu"), "SwiGLU"),
    ],
)
def test_bad_configs_fail_with_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_model_package_registers_auto_classes():
    assert AutoConfig.for_model("seedlm_gated_moe").__class__ is GatedMoeConfig
    assert type(AutoModel.from_config(tiny_config())) is GatedMoeModel
    assert type(AutoModelForCausalLM.from_config(tiny_config())) is GatedMoeForCausalLM
