"""The DeltaProduct family: the layer against a plain step-by-step reference, prefill + decode, generation,
packed documents, padding, hybrids, saving and loading, bad configs."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, Cache

from seedlm.model import DeltaProductCache, DeltaProductConfig, DeltaProductForCausalLM, DeltaProductModel
from seedlm.model.modeling_gated_moe import CACHE_NAME
from tests.helpers import load_with_every_auto_class_without_seedlm, reference_outputs


def tiny_config(**overrides) -> DeltaProductConfig:
    fields = dict(
        vocab_size=89,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=8,
        expand_v=1.0,
        num_householder=2,
        allow_neg_eigval=True,
        use_forget_gate=True,
        use_short_conv=True,
        conv_size=4,
        intermediate_size=48,
        chunk_size=8,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    fields.update(overrides)
    return DeltaProductConfig(**fields)


def make_model(dtype=torch.float64, seed=0, **overrides) -> DeltaProductForCausalLM:
    torch.manual_seed(seed)
    return DeltaProductForCausalLM(tiny_config(**overrides)).to(dtype).eval()


def reference_layer(layer, x):
    """Plain per-token DeltaProduct mixer for one sequence x [T, hidden] (float64), written from the
    equations: explicit causal convolutions, explicit Householder products (I - beta k k^T) S + beta k v^T."""
    T = x.shape[0]
    H, K, V, n = layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.num_householder

    def conv(inp, module):  # causal depthwise conv then SiLU; module.weight [D, w], last tap = current token
        if module is None:
            return F.silu(inp)
        w = module.weight.shape[1]
        out = torch.stack(
            [sum(module.weight[:, w - 1 - j] * inp[t - j] for j in range(w) if t - j >= 0) for t in range(T)]
        )
        return F.silu(out)

    conv_q, conv_k, conv_v = (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d) if layer.q_conv1d else (None,) * 3
    q = conv(x @ layer.q_proj.weight.T, conv_q).view(T, H, K)
    k = conv(x @ layer.k_proj.weight.T, conv_k).view(T, n, H, K)
    v = conv(x @ layer.v_proj.weight.T, conv_v).view(T, n, H, V)
    beta = torch.sigmoid(x @ layer.b_proj.weight.T).view(T, n, H) * (2.0 if layer.allow_neg_eigval else 1.0)
    outputs = []
    for h in range(H):
        S = torch.zeros(K, V, dtype=x.dtype)
        o_h = []
        for t in range(T):
            if layer.a_proj is not None:
                decay = -layer.A_log[h].exp() * F.softplus(x[t] @ layer.a_proj.weight[h] + layer.dt_bias[h])
                S = decay.exp() * S
            for j in range(n):
                kk = k[t, j, h] / k[t, j, h].norm()
                S = (torch.eye(K, dtype=x.dtype) - beta[t, j, h] * torch.outer(kk, kk)) @ S
                S = S + beta[t, j, h] * torch.outer(kk, v[t, j, h])
            qq = q[t, h] / q[t, h].norm()
            o_h.append(S.T @ qq * K**-0.5)
        outputs.append(torch.stack(o_h))
    o = torch.stack(outputs, dim=1)  # [T, H, V]
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.variance_epsilon) * layer.o_norm.weight
    if layer.g_proj is not None:
        o = o * F.silu(x @ layer.g_proj.weight.T).view(T, H, V)
    return o.reshape(T, H * V) @ layer.o_proj.weight.T


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_householder=1),
        dict(num_householder=2),
        dict(num_householder=3, expand_v=2.0),
        dict(num_householder=2, allow_neg_eigval=False, use_forget_gate=False),
        dict(num_householder=2, use_short_conv=False, use_output_gate=False),
    ],
    ids=["nh1", "nh2", "nh3-expand2", "no-neg-no-gate", "no-conv-no-outgate"],
)
def test_layer_matches_step_by_step_reference_forward_and_backward(overrides):
    m = make_model(**overrides)
    layer = m.model.layers[0].attn
    x = torch.randn(1, 21, 32, dtype=torch.float64, requires_grad=True)  # 21 tokens: not a multiple of chunks
    layer.train()  # chunk kernel path
    out = layer(x)
    ref = reference_layer(layer, x[0])
    torch.testing.assert_close(out[0], ref, rtol=1e-9, atol=1e-10)
    probe = torch.randn_like(ref)
    grads = torch.autograd.grad((out[0] * probe).sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, *layer.parameters()], allow_unused=True)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(
            got, expected if expected is not None else torch.zeros_like(got), rtol=1e-8, atol=1e-9
        )


def decode_in_steps(m, ids, prefill):
    out = m(ids[:, :prefill], use_cache=True)
    logits, cache = [out.logits], getattr(out, CACHE_NAME)
    for t in range(prefill, ids.shape[1]):
        out = m(ids[:, t : t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = getattr(out, CACHE_NAME)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("num_householder", [1, 2, 3])
@pytest.mark.parametrize("hybrid", [False, True], ids=["pure", "hybrid"])
def test_prefill_then_decode_gives_full_forward_logits(num_householder, hybrid):
    extra = dict(num_hidden_layers=3, attn_layers=[1], attn_num_heads=4, attn_num_kv_heads=2) if hybrid else {}
    m = make_model(num_householder=num_householder, **extra)
    ids = torch.randint(0, 89, (2, 17))
    full = m(ids, use_cache=False).logits
    for prefill in (1, 5, 11):  # prompt lengths that are not multiples of the chunk (8 // n_h tokens)
        torch.testing.assert_close(decode_in_steps(m, ids, prefill), full, rtol=1e-9, atol=1e-9)


def test_packed_documents_reset_state_and_convolutions():
    m = make_model(num_hidden_layers=3, attn_layers=[2], attn_num_heads=2, num_experts=4, moe_intermediate_size=16)
    docs = [torch.randint(0, 89, (1, n)) for n in (6, 9, 3, 7)]
    # two packed rows of 15 and 10 tokens, documents never cross a row
    rows = [torch.cat(docs[:2], 1), torch.cat([*docs[2:], torch.randint(0, 89, (1, 5))], 1)]
    positions = [
        torch.cat([torch.arange(6), torch.arange(9)]),
        torch.cat([torch.arange(3), torch.arange(7), torch.arange(5)]),
    ]
    ids = torch.cat([rows[0], rows[1]], 0)
    position_ids = torch.stack(positions)
    for train_mode in (True, False):
        m.train(train_mode)
        logits = m(ids, position_ids=position_ids).logits
        torch.testing.assert_close(logits[0, :6], m(docs[0]).logits[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logits[0, 6:], m(docs[1]).logits[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logits[1, :3], m(docs[2]).logits[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logits[1, 3:10], m(docs[3]).logits[0], rtol=1e-9, atol=1e-9)


def test_left_padding_matches_unpadded_sequences():
    m = make_model(num_hidden_layers=3, attn_layers=[1], attn_num_heads=2)
    long, short = torch.randint(1, 89, (1, 10)), torch.randint(1, 89, (1, 6))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = m(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(logits[0], m(long).logits[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[1, 4:], m(short).logits[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("hybrid", [False, True], ids=["pure", "hybrid"])
def test_generate_greedy_and_sampling_with_left_padding(hybrid):
    extra = dict(num_hidden_layers=3, attn_layers=[1], attn_num_heads=2) if hybrid else {}
    m = make_model(torch.float32, **extra)
    prompts = [torch.randint(1, 89, (n,)) for n in (7, 4)]
    singles = [m.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p) :] for p in prompts]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 7 - len(p) :], mask[i, 7 - len(p) :] = p, 1
    together = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i in range(2):
        assert together[i, 7:].tolist() == singles[i].tolist()
    torch.manual_seed(0)
    sampled = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=True, top_p=0.9, pad_token_id=0)
    assert sampled.shape == (2, 13) and (sampled < 89).all()


@pytest.mark.parametrize("hybrid", [False, True], ids=["pure", "hybrid"])
def test_generate_with_and_without_the_cache_gives_the_same_tokens(hybrid):
    extra = dict(num_hidden_layers=3, attn_layers=[1], attn_num_heads=2) if hybrid else {}
    m = make_model(**extra)
    prompt = torch.randint(1, 89, (2, 5))
    cached = m.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    uncached = m.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.sequences.tolist() == uncached.tolist()
    cache = getattr(cached, CACHE_NAME)
    # a transformers Cache, one layer entry per model layer, that has seen prompt and generated tokens but the last
    assert isinstance(cache, Cache) and isinstance(cache, DeltaProductCache)
    assert len(cache) == (3 if hybrid else 2)
    assert cache.get_seq_length() == 5 + 6 - 1
    assert [type(layer).__name__ for layer in cache.layers] == (
        ["RecurrentLayerState", "DynamicLayer", "RecurrentLayerState"] if hybrid else ["RecurrentLayerState"] * 2)
    # beam search goes through Cache's per-layer batch expansion and reordering
    beams = m.generate(prompt, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, 9)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.recurrent_state(0) is None


def test_hybrid_moe_trains_and_reports_router_losses():
    m = make_model(
        torch.float32,
        num_hidden_layers=4,
        attn_layers=[3],
        attn_num_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        router_aux_loss_coef=0.1,
    )
    m.train()
    assert [blk.is_attention for blk in m.model.layers] == [False, False, False, True]
    ids = torch.randint(0, 89, (2, 12))
    out = m(ids, labels=ids)
    assert out.expert_counts.shape == (4, 4) and out.aux_loss is not None
    out.loss.backward()
    for name, param in m.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert (
        m.model.layers[0].attn.A_log.grad.abs().sum() > 0 and m.model.layers[3].attn.q_proj.weight.grad.abs().sum() > 0
    )


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 89, (2, 10))
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


def test_save_load_round_trip_and_remote_code_without_seedlm(tmp_path):
    m = make_model(torch.float32, num_hidden_layers=3, attn_layers=[1], attn_num_heads=2, tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "lm")
    m.model.save_pretrained(tmp_path / "base")
    for folder in (tmp_path / "lm", tmp_path / "base"):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "seedlm_deltaproduct" and config["attn_layers"] == [1]
        assert config["auto_map"] == {  # every Auto class, whichever class saved the folder
            "AutoConfig": "configuration_deltaproduct.DeltaProductConfig",
            "AutoModel": "modeling_deltaproduct.DeltaProductModel",
            "AutoModelForCausalLM": "modeling_deltaproduct.DeltaProductForCausalLM",
        }
    ids = torch.randint(0, 89, (2, 9))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    torch.testing.assert_close(loaded(ids).logits, m(ids).logits)
    base = AutoModel.from_pretrained(tmp_path / "base")
    assert type(base) is DeltaProductModel
    torch.testing.assert_close(base(ids).last_hidden_state, m.model(ids).last_hidden_state)
    # tied embeddings: the base model's folder holds everything the logits need
    ok = load_with_every_auto_class_without_seedlm(
        [(tmp_path / "lm", reference_outputs(m, ids), True), (tmp_path / "base", reference_outputs(m, ids), True)],
        tmp_path,
    )
    assert [line.split()[2:] for line in ok] == [
        ["DeltaProductConfig", "DeltaProductModel", "DeltaProductForCausalLM"]
    ] * 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_householder=0), "num_householder=0"),
        (dict(attn_layers=[2]), r"attn_layers \[2\] are out of range"),
        (dict(attn_layers=[-1]), "out of range"),
        (dict(attn_layers=[0], attn_num_heads=3, attn_num_kv_heads=2), "multiple of num_key_value_heads"),
        (dict(attn_layers=[0], attn_output_gate="sigmoid"), "not a gate kind"),
        (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok=3"),
        (dict(expand_v=0.3), "positive integer"),
    ],
)
def test_bad_configs_fail_with_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
