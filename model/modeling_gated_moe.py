"""The gated-attention Mixture-of-Experts decoder: GatedMoeModel and GatedMoeForCausalLM.

Read top to bottom: decoder layer (pre-norm gated attention, then MoE or dense SwiGLU FFN), the
PreTrainedModel base (weight init, router-bias updates), the backbone, the causal-LM head with the
router losses. Imports only torch, transformers and sibling files (exported with the checkpoint).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_gated_moe import GatedMoeConfig
from .fused_loss import linear_cross_entropy
from .layers import GatedAttention, RMSNorm, RotaryEmbedding, SwiGLUMLP, causal_attention_mask
from .moe import MoeModelMixin, RouterOutput, SparseMoeBlock, load_balancing_loss

# transformers 5.24 renamed the generation cache from `past_key_values` to `cache` (model outputs, forward
# arguments, generate()). Exported checkpoints run this file on either side of the rename, so the outputs
# extend transformers' own output classes (whose field carries the installed name), the forwards accept
# both names, and CACHE_NAME is the name the installed transformers uses.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class GatedMoeModelOutput(MoeModelOutputWithPast):
    router_outputs: tuple[RouterOutput, ...] | None = None  # one per MoE layer


@dataclass
class GatedMoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """loss includes router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss when labels are given.
    aux_loss and z_loss are unweighted means over MoE layers. expert_counts [L_moe, E] (no gradient) and
    router_probs [L_moe, E] let a trainer form the balancing loss over a larger batch."""

    z_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None


class GatedMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: GatedMoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = GatedAttention(
            config,
            layer_idx,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.num_experts > 0:
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, position_embeddings, attention_mask, token_mask=None, cache=None, **kw):
        # hidden_states [B, T, hidden] -> same shape, plus this layer's routing (None when dense)
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, **kw
        )
        hidden_states = hidden_states + attn_out
        ffn_in = self.post_attention_layernorm(hidden_states)
        routing = None
        if isinstance(self.mlp, SparseMoeBlock):
            ffn_out, routing = self.mlp(ffn_in, token_mask)
        else:
            ffn_out = self.mlp(ffn_in)
        return hidden_states + ffn_out, routing, attn_weights


class GatedMoePreTrainedModel(MoeModelMixin, PreTrainedModel):
    config_class = GatedMoeConfig
    config: GatedMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GatedMoeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True  # a document BlockMask from causal_attention_mask
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Embedding, RMSNorm
        self.init_moe_weights(module, self.config.initializer_range)


class GatedMoeModel(GatedMoePreTrainedModel):
    def __init__(self, config: GatedMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(GatedMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,  # the name of `cache` before transformers 5.24
        **kwargs,
    ) -> GatedMoeModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                "output_attentions=True needs the eager attention kernel: load the model with "
                "attn_implementation='eager'"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, hidden]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)  # [1, T]

        batch_size, query_length = inputs_embeds.shape[:2]
        causal_mask = causal_attention_mask(
            self.config._attn_implementation, query_length, past_seen, attention_mask, position_ids, batch_size
        )
        # 1 for real tokens: padding is left out of the router statistics
        token_mask = attention_mask[:, -inputs_embeds.shape[1] :] if attention_mask is not None else None
        if token_mask is not None and token_mask.dim() != 2:
            token_mask = None

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden, all_attn, routings = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, routing, attn_weights = layer(
                hidden_states,
                position_embeddings,
                causal_mask,
                token_mask,
                cache,
                position_ids=position_ids,
                **kwargs,
            )
            if routing is not None:
                routings.append(routing)
            if output_attentions:
                all_attn.append(attn_weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        return GatedMoeModelOutput(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: cache if use_cache else None},
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            router_outputs=tuple(routings) if routings else None,
        )


# keyword arguments of transformers' causal-LM loss: they go to the loss only, never into the layers (where an
# attention kernel could take them for its own)
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def causal_lm_output(config, loss_function, logits, labels, outputs, output_router_logits, lm_loss=None, **loss_kwargs):
    """The causal-LM output of either family: LM loss (labels shifted inside, or `shift_labels` taken as they
    are) plus the weighted router losses (means over MoE layers), the stacked expert counts and mean router
    probabilities, optional router logits. `lm_loss` is the LM loss already computed without logits (then
    `logits` is None)."""
    routings = outputs.router_outputs
    aux_loss = z_loss = expert_counts = router_probs = None
    if routings:
        expert_counts = torch.stack([r.expert_counts for r in routings])  # [L_moe, E]
        router_probs = torch.stack([r.probs_mean for r in routings])  # [L_moe, E]
        aux_loss = load_balancing_loss(expert_counts, router_probs)
        z_loss = torch.stack([r.z_loss for r in routings]).mean()
    loss = lm_loss
    if labels is None:
        labels = loss_kwargs.get("shift_labels")  # aligned targets alone also ask for the loss
    if loss is None and labels is not None:
        loss = loss_function(logits, labels, config.vocab_size, **loss_kwargs)
    if loss is not None and aux_loss is not None:
        loss = loss + config.router_aux_loss_coef * aux_loss + config.router_z_loss_coef * z_loss
    if output_router_logits is None:
        output_router_logits = config.output_router_logits
    return GatedMoeCausalLMOutput(
        loss=loss,
        logits=logits,
        **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        hidden_states=outputs.hidden_states,
        attentions=getattr(outputs, "attentions", None),
        aux_loss=aux_loss,
        z_loss=z_loss,
        expert_counts=expert_counts,
        router_probs=router_probs,
        router_logits=tuple(r.logits for r in routings) if output_router_logits and routings else None,
    )


class CausalLMHeadMixin:
    """The causal-LM head of both families: `self.model` (the backbone) and `self.lm_head`; the loss adds the
    weighted router losses (see causal_lm_output).

    When logits are made: a training step's forward (the model in train mode, autograd recording, and
    `labels` or `shift_labels` given) computes the LM loss with fused_loss.linear_cross_entropy, chunk by
    chunk over the tokens, so the fp32 [tokens, vocab] logits and log-softmax are never all alive, and
    returns `logits=None` (the trainer reads only the loss). Every other forward (eval mode, no_grad,
    no labels: generation and evaluation) returns the logits as transformers models do, and so does any
    forward given `return_logits=True`; `return_logits=False` asks for the fused loss in any mode. Both paths
    give the same loss and gradients (tests/test_fused_loss.py).
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,  # the name of `cache` before transformers 5.24
        return_logits: bool | None = None,
        **kwargs,
    ) -> GatedMoeCausalLMOutput:
        """labels [B, T] are the input ids (the shift happens inside); -100 marks positions not to predict.
        `shift_labels` [B, T] in kwargs are targets already aligned with the logits (the loss at position t
        is against shift_labels[t], no shift), e.g. the synthetic state-tracking tasks; `num_items_in_batch`
        normalises the loss over a whole gradient-accumulation batch. These go to the loss, not the layers.
        `return_logits`: None = the class docstring's rule, True = always logits, False = the fused loss
        without logits whenever there are labels."""
        loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = hidden_states[:, keep, :]  # [B, T_keep, hidden]
        has_targets = labels is not None or loss_kwargs.get("shift_labels") is not None
        if return_logits is None:
            return_logits = not (self.training and torch.is_grad_enabled())
        logits = lm_loss = None
        if has_targets and not return_logits:
            lm_loss = linear_cross_entropy(hidden_states, self.lm_head.weight, labels, **loss_kwargs)
        else:
            logits = self.lm_head(hidden_states)  # [B, T_keep, vocab]

        return causal_lm_output(
            self.config, self.loss_function, logits, labels, outputs, output_router_logits, lm_loss, **loss_kwargs
        )


class GatedMoeForCausalLM(CausalLMHeadMixin, GatedMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GatedMoeConfig):
        super().__init__(config)
        self.model = GatedMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value


__all__ = ["GatedMoePreTrainedModel", "GatedMoeModel", "GatedMoeForCausalLM"]
