"""Configuration of the gated-attention Mixture-of-Experts decoder (model_type `seedlm_gated_moe`).

Field names follow transformers' Qwen3-MoE where the idea is the same, so configs and checkpoints
convert by renaming nothing. Imports only the standard library and transformers: this file travels with
exported checkpoints.

The facts both families share also live here: parameter counts and training FLOPs per token computed from
the config alone (no weights, so a 15B preset costs nothing), and the model card's architecture lines.
"""

from dataclasses import dataclass

from transformers import PreTrainedConfig

ATTN_OUTPUT_GATES = ("elementwise", "headwise", "none")

# Every Auto class of the family, as "<file>.<class>" inside a saved folder. transformers' save_pretrained writes
# only the saved class's entry, so without these a folder saved from the causal LM would not load with
# AutoModel(trust_remote_code=True) and vice versa.
GATED_MOE_AUTO_MAP = {
    "AutoConfig": "configuration_gated_moe.GatedMoeConfig",
    "AutoModel": "modeling_gated_moe.GatedMoeModel",
    "AutoModelForCausalLM": "modeling_gated_moe.GatedMoeForCausalLM",
}


def validate_attention_fields(config, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Shared by both families: the gated attention layer's shape and gate checks."""
    if config.attn_output_gate not in ATTN_OUTPUT_GATES:
        raise ValueError(
            f"attn_output_gate={config.attn_output_gate!r} is not a gate kind; use one of {list(ATTN_OUTPUT_GATES)}"
        )
    if num_heads < 1 or num_kv_heads < 1 or head_dim < 1:
        raise ValueError(
            f"attention needs positive sizes, got heads={num_heads}, kv heads={num_kv_heads}, head_dim={head_dim}"
        )
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_attention_heads={num_heads} must be a multiple of num_key_value_heads={num_kv_heads} (GQA groups)"
        )
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")


def complete_auto_map(config, family_auto_map: dict) -> None:
    """Add the family's missing Auto classes to `config.auto_map`; entries already there (a Hub repo's
    prefixed references, say) are kept."""
    config.auto_map = {**family_auto_map, **(getattr(config, "auto_map", None) or {})}


def validate_moe_fields(config) -> None:
    """Shared by both families: the MoE FFN's checks (num_experts == 0 means a dense FFN)."""
    if config.num_experts < 0:
        raise ValueError(f"num_experts={config.num_experts} must be >= 0 (0 gives a dense FFN)")
    if config.num_experts > 0:
        if not 1 <= config.num_experts_per_tok <= config.num_experts:
            raise ValueError(
                f"num_experts_per_tok={config.num_experts_per_tok} must be between 1 and "
                f"num_experts={config.num_experts} (top-k cannot pick more experts than exist)"
            )
        if config.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={config.moe_intermediate_size} must be >= 1")
    if config.shared_expert_intermediate_size < 0:
        raise ValueError("shared_expert_intermediate_size must be >= 0 (0 = no shared expert)")
    if config.router_bias_update_rate < 0:
        raise ValueError("router_bias_update_rate must be >= 0 (0 = no auxiliary-loss-free bias)")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; the FFNs are SwiGLU ('silu')")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the causal LM a config builds (tied weights counted once).

    expert: the routed experts' weights, all of them; each token runs num_experts_per_tok of
    num_experts, so `active` counts that share of them. embedding: the input table and, when untied,
    the lm_head."""

    total: int
    active: int
    expert: int
    embedding: int

    @property
    def non_expert(self) -> int:
        return self.total - self.expert


def gate_dim(attn_output_gate: str, head_dim: int) -> int:
    """Output-gate values per head that q_proj adds to each head's query (model/layers.py, GatedAttention)."""
    return {"elementwise": head_dim, "headwise": 1, "none": 0}[attn_output_gate]


def gated_attention_parameters(config, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """One gated attention layer: q_proj (query and gate), k_proj, v_proj, o_proj, optional QK norms."""
    q_out = num_heads * (head_dim + gate_dim(config.attn_output_gate, head_dim))
    kv_out = num_kv_heads * head_dim
    weights = config.hidden_size * (q_out + 2 * kv_out) + num_heads * head_dim * config.hidden_size
    biases = q_out + 2 * kv_out + config.hidden_size if config.attention_bias else 0
    norms = 2 * head_dim if config.qk_norm else 0
    return weights + biases + norms


def ffn_parameters(config) -> tuple[int, int]:
    """One layer's FFN as (non-expert, expert) parameters: a dense SwiGLU, or the router, the routed
    experts and the optional shared expert with its sigmoid gate."""
    hidden = config.hidden_size
    if config.num_experts == 0:
        return 3 * hidden * config.intermediate_size, 0
    shared = config.shared_expert_intermediate_size
    non_expert = config.num_experts * hidden + (3 * hidden * shared + hidden if shared > 0 else 0)
    return non_expert, config.num_experts * 3 * hidden * config.moe_intermediate_size


def stack_parameter_counts(config, mixer_parameters: list[int]) -> ParameterCounts:
    """Counts of an embedding, one pre-norm block per entry of `mixer_parameters` (its token mixer's
    parameters; each block adds two RMSNorms and an FFN), a final RMSNorm and the lm_head."""
    hidden = config.hidden_size
    ffn, ffn_expert = ffn_parameters(config)
    embedding = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    expert = len(mixer_parameters) * ffn_expert
    total = embedding + sum(mixer_parameters) + len(mixer_parameters) * (2 * hidden + ffn) + expert + hidden
    active_expert = expert * config.num_experts_per_tok // config.num_experts if config.num_experts else 0
    return ParameterCounts(total=total, active=total - expert + active_expert, expert=expert, embedding=embedding)


def training_flops_per_token(config, counts: ParameterCounts, attention_layers: int, attention_heads: int,
                             seq_len: int, recurrent_flops: float = 0) -> float:
    """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs a multiply-add): 6 * active
    non-embedding parameters plus the lm_head matmul, the causal attention score/value matmuls
    (12 * attention layers * heads * head_dim * seq_len / 2), and `recurrent_flops` for state updates."""
    flops = 6.0 * (counts.active - counts.embedding) + 6.0 * config.vocab_size * config.hidden_size
    flops += 12 * attention_layers * attention_heads * config.head_dim * seq_len / 2
    return flops + recurrent_flops


def card_lines(config, mixer_line: str) -> list[str]:
    """The model card's architecture bullets: sizes, parameters, the family's mixer, the MoE FFN."""
    counts = config.parameter_counts()
    lines = [
        f"- model_type `{config.model_type}`, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocabulary {config.vocab_size}",
        f"- parameters: {counts.total / 1e6:.2f}M total, {counts.active / 1e6:.2f}M active per token",
        mixer_line,
    ]
    if config.num_experts:
        lines.append(f"- MoE FFN: {config.num_experts} experts, top-{config.num_experts_per_tok}, expert FFN "
                     f"{config.moe_intermediate_size}")
    return lines


class GatedMoeConfig(PreTrainedConfig):
    r"""
    A decoder whose attention output is multiplied by a sigmoid gate computed from the same normed hidden
    states as the query (the G1 gate of Qiu et al. 2025), with a fine-grained MoE FFN.

    attn_output_gate: "elementwise" (one gate per head and channel: q_proj widens by heads * head_dim),
        "headwise" (one gate per head: q_proj widens by heads) or "none" (plain attention).
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE.
    num_experts: 0 gives a dense SwiGLU FFN of `intermediate_size`; otherwise a top-k MoE of
        `moe_intermediate_size` experts, plus a sigmoid-gated shared expert when
        `shared_expert_intermediate_size > 0`.
    norm_topk_prob: renormalise the top-k router probabilities to sum to one.
    router_aux_loss_coef / router_z_loss_coef: weights of the load-balancing and z losses added to the
        language-model loss when labels are given.
    router_bias_update_rate: > 0 enables auxiliary-loss-free balancing: a per-expert bias added to the
        router scores for top-k selection only, nudged by this rate after each optimizer step
        (`model.update_router_biases(expert_counts)`).
    rope_parameters: transformers' rope dict (e.g. {"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 4096}) for long-context extension; rope_theta fills its base.
    """

    model_type = "seedlm_gated_moe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None
    intermediate_size: int = 2816
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    attn_output_gate: str = "elementwise"
    qk_norm: bool = True
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    router_bias_update_rate: float = 0.0
    output_router_logits: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly or change the head count"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        validate_attention_fields(self, self.num_attention_heads, self.num_key_value_heads, self.head_dim)
        validate_moe_fields(self)
        super().__post_init__(**kwargs)
        # rope_theta lives inside rope_parameters after standardisation; keep the flat field in sync
        self.rope_theta = self.rope_parameters["rope_theta"]
        complete_auto_map(self, GATED_MOE_AUTO_MAP)

    def parameter_counts(self) -> ParameterCounts:
        attention = gated_attention_parameters(self, self.num_attention_heads, self.num_key_value_heads,
                                               self.head_dim)
        return stack_parameter_counts(self, [attention] * self.num_hidden_layers)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at `seq_len` (the numerator of MFU)."""
        return training_flops_per_token(self, self.parameter_counts(), self.num_hidden_layers,
                                        self.num_attention_heads, seq_len)

    def card_summary(self) -> str:
        return "gated-attention Mixture-of-Experts decoder (sigmoid output gate, Qiu et al. 2025)"

    def card_lines(self) -> list[str]:
        return card_lines(self, f"- attention: {self.num_attention_heads} query / {self.num_key_value_heads} KV "
                                f"heads of {self.head_dim}, output gate `{self.attn_output_gate}`, qk_norm "
                                f"{self.qk_norm}")


__all__ = ["GatedMoeConfig", "GATED_MOE_AUTO_MAP", "ParameterCounts"]
