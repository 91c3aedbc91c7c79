"""The DeltaProduct language model: DeltaProductModel and DeltaProductForCausalLM.

Each block is pre-norm: a token mixer (the DeltaProduct layer, or on `attn_layers` the gated attention
of the gated-MoE family) and an FFN (dense SwiGLU, or the same MoE FFN). Generation keeps, per layer,
the recurrent state and convolution histories (and keys/values on attention layers) in a
DeltaProductCache: the prompt is prefilled with the chunk kernel, then each new token takes one step of
the recurrence. Imports only torch, transformers and sibling files (exported with the checkpoint).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_deltaproduct import DeltaProductConfig
from .deltaproduct_layer import DeltaProductAttention, ShortConvolution
from .layers import (
    GatedAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLUMLP,
    causal_attention_mask,
    document_ids,
    is_packed,
    packed_cu_seqlens,
)
from .modeling_gated_moe import CACHE_NAME, CausalLMHeadMixin
from .moe import MoeModelMixin, RouterOutput, SparseMoeBlock


class RecurrentLayerState:
    """One DeltaProduct layer's generation state: the recurrent state [B, H, K, V] (fp32) and the short
    convolutions' histories (q, k, v). None until the first forward, and after reset(): start from zero.

    Not a transformers CacheLayerMixin: it holds no keys and values and no sequence length (the cache counts
    the tokens seen), and a recurrent state cannot be rolled back, so it cannot be cropped."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        self.state: torch.Tensor | None = None
        self.conv: tuple = (None, None, None)

    def _map(self, fn):
        self.state = fn(self.state) if self.state is not None else None
        self.conv = tuple(fn(t) if t is not None else None for t in self.conv)

    def reset(self) -> None:
        self.state, self.conv = None, (None, None, None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a DeltaProduct layer's recurrent state cannot be cropped (it keeps no per-token history)")


class DeltaProductCache(Cache):
    """Per-layer generation state, a transformers Cache: a RecurrentLayerState on DeltaProduct layers and a
    transformers DynamicLayer (keys/values [B, Hkv, S, D]) on attention layers, and the number of tokens seen.

    generate() and its utilities (beam reordering, batch expansion, reset) go through Cache's per-layer
    methods. The model builds it on the first forward with use_cache, since DynamicCache cannot hold a
    recurrent state (see DeltaProductForCausalLM._supports_default_dynamic_cache)."""

    def __init__(self, config: DeltaProductConfig):
        layers = [DynamicLayer() if i in config.attn_layers else RecurrentLayerState()
                  for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens  # every layer, recurrent or attention, has seen the same tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0  # (key/value length, offset) of an attention mask

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def recurrent_state(self, layer_idx):
        return self.layers[layer_idx].state

    def set_recurrent_state(self, layer_idx, state):
        self.layers[layer_idx].state = state

    def conv_states(self, layer_idx):
        return self.layers[layer_idx].conv

    def set_conv_states(self, layer_idx, conv):
        self.layers[layer_idx].conv = conv


@dataclass
class DeltaProductModelOutput(BaseModelOutputWithPast):
    """The cache field (`cache`, or `past_key_values` before transformers 5.24) holds a DeltaProductCache."""

    router_outputs: tuple[RouterOutput, ...] | None = None  # one per MoE layer


class DeltaProductBlock(GradientCheckpointingLayer):
    def __init__(self, config: DeltaProductConfig, layer_idx: int):
        super().__init__()
        self.is_attention = layer_idx in config.attn_layers
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.is_attention:
            self.attn = GatedAttention(
                config,
                layer_idx,
                hidden_size=config.hidden_size,
                num_heads=config.attn_num_heads,
                num_kv_heads=config.attn_num_kv_heads,
                head_dim=config.head_dim,
            )
        else:
            self.attn = DeltaProductAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.num_experts > 0:
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, mixer_inputs: dict, token_mask=None, cache=None):
        # hidden_states [B, T, hidden] -> same shape, plus this layer's routing (None when dense)
        normed = self.attn_norm(hidden_states)
        if self.is_attention:
            mixed, _ = self.attn(
                normed,
                mixer_inputs["position_embeddings"],
                mixer_inputs["attention_mask"],
                cache,
                position_ids=mixer_inputs["position_ids"],
            )
        else:
            mixed = self.attn(normed, token_mask, mixer_inputs["doc_ids"], mixer_inputs["cu_seqlens"], cache)
        hidden_states = hidden_states + mixed
        ffn_in = self.mlp_norm(hidden_states)
        routing = None
        if isinstance(self.mlp, SparseMoeBlock):
            ffn_out, routing = self.mlp(ffn_in, token_mask)
        else:
            ffn_out = self.mlp(ffn_in)
        return hidden_states + ffn_out, routing


class DeltaProductPreTrainedModel(MoeModelMixin, PreTrainedModel):
    config_class = DeltaProductConfig
    config: DeltaProductConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeltaProductBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True  # a document BlockMask from causal_attention_mask
    _supports_attention_backend = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Embedding, RMSNorm
        std = self.config.initializer_range
        if isinstance(module, DeltaProductAttention) and module.a_proj is not None:
            # Mamba2's forget-gate init: A ~ U(1, 16); dt ~ logU(1e-3, 1e-1), stored through softplus's inverse
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1, 16).log())
            dt = torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        elif isinstance(module, ShortConvolution):
            bound = 1 / math.sqrt(module.kernel_size)
            init.uniform_(module.weight, -bound, bound)
        else:
            self.init_moe_weights(module, std)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: the model builds its DeltaProductCache


class DeltaProductModel(DeltaProductPreTrainedModel):
    def __init__(self, config: DeltaProductConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeltaProductBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config) if config.attn_layers else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DeltaProductCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: DeltaProductCache | None = None,  # the name of `cache` before transformers 5.24
        **kwargs,
    ) -> DeltaProductModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)  # [B, T, hidden]
        B, T, _ = inputs_embeds.shape
        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past_seen)[None]  # [1, T]

        # Packed documents (positions restarting at 0, no padding mask, fresh forward) reset the state and the
        # convolutions at each boundary; such a forward keeps no cache, since there is no single state to continue.
        packed = is_packed(position_ids, attention_mask, past_seen)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if packed:
            use_cache = False
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DeltaProductCache(self.config)

        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            token_mask = attention_mask[:, -T:]
        doc_ids = document_ids(position_ids.expand(B, -1)) if packed else None
        mixer_inputs = {
            "doc_ids": doc_ids,
            "cu_seqlens": packed_cu_seqlens(doc_ids) if packed else None,
            "position_ids": position_ids,
            "attention_mask": None,
            "position_embeddings": None,
        }
        if self.rotary_emb is not None:
            mixer_inputs["position_embeddings"] = self.rotary_emb(inputs_embeds, position_ids)
            mixer_inputs["attention_mask"] = causal_attention_mask(
                self.config._attn_implementation, T, past_seen, attention_mask, position_ids, batch_size=B
            )

        hidden_states = inputs_embeds
        all_hidden, routings = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, routing = layer(hidden_states, mixer_inputs, token_mask, cache)
            if routing is not None:
                routings.append(routing)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if cache is not None:
            cache.seen_tokens += T

        return DeltaProductModelOutput(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: cache},
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            router_outputs=tuple(routings) if routings else None,
        )


class DeltaProductForCausalLM(CausalLMHeadMixin, DeltaProductPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: DeltaProductConfig):
        super().__init__(config)
        self.model = DeltaProductModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value


__all__ = [
    "DeltaProductPreTrainedModel",
    "DeltaProductModel",
    "DeltaProductForCausalLM",
    "DeltaProductCache",
    "RecurrentLayerState",
]
