"""Configuration of the DeltaProduct linear RNN (model_type `seedlm_deltaproduct`).

Imports only transformers and its sibling config (it travels with exported checkpoints).
"""

from transformers import PreTrainedConfig

from .configuration_gated_moe import (
    ParameterCounts,
    card_lines,
    complete_auto_map,
    gated_attention_parameters,
    stack_parameter_counts,
    training_flops_per_token,
    validate_attention_fields,
    validate_moe_fields,
)

# Every Auto class of the family (see GATED_MOE_AUTO_MAP for why the config carries them).
DELTAPRODUCT_AUTO_MAP = {
    "AutoConfig": "configuration_deltaproduct.DeltaProductConfig",
    "AutoModel": "modeling_deltaproduct.DeltaProductModel",
    "AutoModelForCausalLM": "modeling_deltaproduct.DeltaProductForCausalLM",
}


class DeltaProductConfig(PreTrainedConfig):
    r"""
    A stack of DeltaProduct layers (Siems et al. 2025): per token, the state S [K, V] of each head is
    decayed by the forget gate and then updated by `num_householder` generalized Householder steps
    S <- (I - beta k k^T) S + beta k v^T. `allow_neg_eigval` doubles beta's range to [0, 2], so the
    transition has eigenvalues in [-1, 1] (Grazzi et al. 2025), which state tracking needs.

    num_heads, head_dim: heads of the recurrent layers (key dim K = head_dim, value dim V = head_dim * expand_v);
        attention layers use `head_dim` too, with `attn_num_heads` / `attn_num_kv_heads` heads.
    use_forget_gate: Mamba2-style decay exp(-exp(A_log) * softplus(a_proj(x) + dt_bias)) per head and token.
    use_short_conv / conv_size: causal depthwise convolutions with SiLU on q, k and v.
    use_output_gate: output RMSNorm gated by SiLU(g_proj(x)); plain RMSNorm otherwise.
    attn_layers: indices of layers that are gated-attention layers (hybrid); empty = pure DeltaProduct.
    num_experts: 0 gives a dense SwiGLU FFN of `intermediate_size`; otherwise the MoE FFN of the gated-MoE
        family, with the same field names.
    """

    model_type = "seedlm_deltaproduct"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_heads: int = 8
    head_dim: int = 128
    expand_v: float = 1.0
    num_householder: int = 2
    allow_neg_eigval: bool = True
    use_forget_gate: bool = True
    use_short_conv: bool = True
    conv_size: int = 4
    use_output_gate: bool = True
    chunk_size: int = 64
    intermediate_size: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    # hybrid attention layers
    attn_layers: list[int] | None = None
    attn_num_heads: int | None = None
    attn_num_kv_heads: int | None = None
    attn_output_gate: str = "elementwise"
    qk_norm: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    # FFN: dense or MoE (same fields as GatedMoeConfig)
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
        if self.num_householder < 1:
            raise ValueError(f"num_householder={self.num_householder} must be >= 1 (Householder steps per token)")
        if self.num_heads < 1 or self.head_dim < 1:
            raise ValueError(f"num_heads={self.num_heads} and head_dim={self.head_dim} must be >= 1")
        if self.head_dim * self.expand_v != int(self.head_dim * self.expand_v) or self.expand_v <= 0:
            raise ValueError(f"head_dim * expand_v = {self.head_dim * self.expand_v} must be a positive integer")
        if self.use_short_conv and self.conv_size < 1:
            raise ValueError(f"conv_size={self.conv_size} must be >= 1 when use_short_conv is set")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.attn_layers = sorted(set(self.attn_layers or []))
        bad = [i for i in self.attn_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"attn_layers {bad} are out of range: layer indices run from 0 to {self.num_hidden_layers - 1}"
            )
        if self.attn_num_heads is None:
            self.attn_num_heads = self.num_heads
        if self.attn_num_kv_heads is None:
            self.attn_num_kv_heads = self.attn_num_heads
        if self.attn_layers:
            validate_attention_fields(self, self.attn_num_heads, self.attn_num_kv_heads, self.head_dim)
        validate_moe_fields(self)
        super().__post_init__(**kwargs)
        self.rope_theta = self.rope_parameters["rope_theta"]
        complete_auto_map(self, DELTAPRODUCT_AUTO_MAP)

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    def recurrent_layer_parameters(self) -> int:
        """One DeltaProduct mixer (model/deltaproduct_layer.py): projections for q, n_h keys, values and
        betas, the forget gate, short convolutions, the output gate, norm and projection."""
        hidden, H, K, V, n = self.hidden_size, self.num_heads, self.head_dim, self.head_v_dim, self.num_householder
        count = hidden * (H * K + n * H * K + n * H * V + n * H) + V + H * V * hidden  # q, k, v, b; o_norm, o_proj
        if self.use_forget_gate:
            count += hidden * H + 2 * H  # a_proj, A_log, dt_bias
        if self.use_short_conv:
            count += (H * K + n * H * K + n * H * V) * self.conv_size
        if self.use_output_gate:
            count += hidden * H * V
        return count

    def parameter_counts(self) -> ParameterCounts:
        attention = gated_attention_parameters(self, self.attn_num_heads, self.attn_num_kv_heads, self.head_dim)
        recurrent = self.recurrent_layer_parameters()
        attn = set(self.attn_layers)
        return stack_parameter_counts(self, [attention if i in attn else recurrent
                                             for i in range(self.num_hidden_layers)])

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at `seq_len` (the numerator of MFU); the recurrences add
        6 * 2 * n_h * heads * K * V per layer (state update and readout)."""
        attn = len(self.attn_layers)
        recurrent = self.num_hidden_layers - attn
        recurrent_flops = 6 * recurrent * 2 * self.num_householder * self.num_heads * self.head_dim * self.head_v_dim
        return training_flops_per_token(self, self.parameter_counts(), attn, self.attn_num_heads, seq_len,
                                        recurrent_flops)

    def card_summary(self) -> str:
        return "DeltaProduct linear RNN (Siems et al. 2025)"

    def card_lines(self) -> list[str]:
        return card_lines(self, f"- DeltaProduct: {self.num_heads} heads of {self.head_dim}, {self.num_householder} "
                                f"Householder steps, negative eigenvalues {self.allow_neg_eigval}, "
                                f"attention layers {self.attn_layers}")


__all__ = ["DeltaProductConfig", "DELTAPRODUCT_AUTO_MAP"]
