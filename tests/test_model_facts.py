"""Facts the model configs own: parameter counts and training FLOPs per token computed from the fields alone,
and the model card's description of each family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from seedlm.launch.presets import MODEL_PRESET_DIR, build_model_config, load_model_config
from seedlm.model.moe import Experts
from tests.helpers import run_without_seedlm

# corners of the layer code the presets do not reach: headwise / no output gate, attention biases, no QK norm,
# a shared expert, top-k that does not divide evenly, untied heads, a hybrid DeltaProduct without forget
# gate, convolutions or output gate and with wider values
VARIANTS = {
    "gated_headwise_bias_shared": dict(model_type="seedlm_gated_moe", vocab_size=100, hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       attn_output_gate="headwise", qk_norm=False, attention_bias=True,
                                       num_experts=4, num_experts_per_tok=3, moe_intermediate_size=8,
                                       shared_expert_intermediate_size=16, tie_word_embeddings=True),
    "gated_dense_no_gate": dict(model_type="seedlm_gated_moe", vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=4, attn_output_gate="none"),
    "deltaproduct_bare_hybrid_moe": dict(model_type="seedlm_deltaproduct", vocab_size=100, hidden_size=32,
                                         num_hidden_layers=3, num_heads=2, head_dim=8, expand_v=2.0,
                                         num_householder=3, use_forget_gate=False, use_short_conv=False,
                                         use_output_gate=False, tie_word_embeddings=False, attn_layers=[1],
                                         attn_num_heads=4, attn_num_kv_heads=2, num_experts=3,
                                         num_experts_per_tok=1, moe_intermediate_size=8),
}
PRESETS = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))


def config_for(name):
    return build_model_config(VARIANTS[name]) if name in VARIANTS else load_model_config(name)


def counted_on_meta(config) -> dict:
    """What the built model holds, counted the independent way: build it on the meta device and walk it."""
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in net.parameters())  # tied weights once
    expert = sum(p.numel() for m in net.modules() if isinstance(m, Experts) for p in m.parameters())
    embedding = net.get_input_embeddings().weight.numel()
    if not config.tie_word_embeddings:
        embedding += net.get_output_embeddings().weight.numel()
    return {"total": total, "expert": expert, "embedding": embedding}


@pytest.mark.parametrize("name", PRESETS + sorted(VARIANTS))
def test_parameter_counts_from_the_config_match_the_built_model(name):
    config = config_for(name)
    counts = config.parameter_counts()
    built = counted_on_meta(config)
    assert (counts.total, counts.expert, counts.embedding) == (built["total"], built["expert"], built["embedding"])
    assert counts.non_expert == built["total"] - built["expert"]
    top_k_share = config.num_experts_per_tok / config.num_experts if config.num_experts else 0
    assert counts.active == pytest.approx(counts.non_expert + top_k_share * built["expert"], abs=0.5)
    assert (counts.expert > 0) == (config.num_experts > 0)


def test_paper_sized_presets_keep_their_numbers():
    # the values count_parameters / flops_per_token gave before the counts moved into the configs
    moe = load_model_config("gated_moe_15a2b")
    assert (moe.parameter_counts().total, moe.parameter_counts().active) == (15778553856, 2189008896)
    assert moe.flops_per_token(512) == 11569053696.0
    hybrid = load_model_config("deltaproduct_hybrid_moe")
    assert (hybrid.parameter_counts().total, hybrid.parameter_counts().active) == (1434293280, 377328672)
    assert hybrid.flops_per_token(512) == 2339469504.0
    dense = load_model_config("gated_dense_1p7b")
    assert dense.parameter_counts().active == dense.parameter_counts().total == 1838015488
    assert dense.flops_per_token(512) == 11204253696.0


def test_flops_per_token_by_hand():
    # untied dense gated model: 6 x parameters less the input table (a lookup) + causal attention
    config = build_model_config(VARIANTS["gated_dense_no_gate"])
    total = config.parameter_counts().total
    L, heads, head_dim = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    assert not config.tie_word_embeddings
    lookup = config.vocab_size * config.hidden_size
    assert config.flops_per_token(64) == 6 * (total - lookup) + 12 * L * heads * head_dim * 64 / 2
    # a pure DeltaProduct has no attention: its cost per token does not grow with the sequence
    recurrent = build_model_config(dict(model_type="seedlm_deltaproduct", vocab_size=100, hidden_size=32,
                                        num_hidden_layers=2, num_heads=2, head_dim=8, num_householder=2))
    assert recurrent.flops_per_token(64) == recurrent.flops_per_token(4096)
    assert recurrent.flops_per_token(64) == 6 * recurrent.parameter_counts().total + 6 * 2 * 2 * 2 * 2 * 8 * 8
    # the hybrid pays for its one attention layer only
    hybrid = build_model_config(VARIANTS["deltaproduct_bare_hybrid_moe"])
    assert hybrid.flops_per_token(128) - hybrid.flops_per_token(64) == 12 * 1 * 4 * 8 * 64 / 2


def test_card_lines_describe_each_family():
    moe = load_model_config("gated_moe_tiny")
    lines = moe.card_lines()
    assert "Mixture-of-Experts" in moe.card_summary()
    assert any(line.startswith("- attention: 4 query / 2 KV heads") for line in lines)
    assert any(line.startswith("- MoE FFN: 8 experts, top-2") for line in lines)
    counts = moe.parameter_counts()
    assert f"- parameters: {counts.total / 1e6:.2f}M total, {counts.active / 1e6:.2f}M active per token" in lines
    dp = load_model_config("deltaproduct_tiny")
    assert "DeltaProduct" in dp.card_summary()
    assert any(line.startswith("- DeltaProduct: 2 heads of 32, 2 Householder steps") for line in dp.card_lines())
    assert not any("MoE" in line for line in dp.card_lines())


def test_counts_travel_with_the_exported_config(tmp_path):
    # the config files are remote code: their counts work where only transformers is installed
    expected = {}
    for family in ("gated_moe_tiny", "deltaproduct_tiny"):
        config = load_model_config(family)
        config.save_pretrained(tmp_path / family)
        expected[family] = (config.parameter_counts().total, config.flops_per_token(32))
        assert AutoConfig.from_pretrained(tmp_path / family).parameter_counts() == config.parameter_counts()
    result = run_without_seedlm("""
        from transformers import AutoConfig
        for family in ("gated_moe_tiny", "deltaproduct_tiny"):
            config = AutoConfig.from_pretrained(family, trust_remote_code=True)
            print(family, config.parameter_counts().total, config.flops_per_token(32), config.card_summary())
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    for family, (total, flops) in expected.items():
        assert f"{family} {total} {flops}" in result.stdout
