"""Building blocks shared by both model families: RMSNorm, rotary embeddings, the gated attention layer
and the SwiGLU MLP.

Imports only torch and transformers (this file travels with exported checkpoints for trust_remote_code).
The attention kernel is chosen through transformers' attention interface (`config._attn_implementation`):
"sdpa" (default, CPU and GPU), "eager" (needed to return attention weights, e.g. for attention-sink
statistics), and for packed documents without a dense [T, T] mask: "flex_attention" (CUDA; a document block mask),
"varlen_attention" (torch's varlen flash kernel from cu_seqlens, registered below) or "flash_attention_2"
(flash-attn's varlen kernel, read from position_ids by transformers; only when flash-attn is installed).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # torch's flash-attention varlen API (CUDA; torch >= 2.10); without it varlen attention loops over documents
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

VARLEN_ATTENTION = "varlen_attention"


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (bf16/fp16 -> fp32; fp64 stays fp64): for softmax, norms, gates and rope tables."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in at least fp32 and cast back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = upcast(hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE over `config.head_dim`. Scaled variants (yarn, linear, dynamic, llama3,
    longrope) come from transformers' rope utilities via `config.rope_parameters["rope_type"]`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "default":
            inv_freq, self.attention_scaling = self.compute_default_rope_parameters(config)
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, device=None)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        # named as transformers expects: PreTrainedModel._init_weights calls it to refill the buffers
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update  # recomputes inv_freq for the "dynamic" and "longrope" types as sequences grow
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, head_dim]
        inv_freq = upcast(self.inv_freq.to(device=x.device, dtype=x.dtype))  # fp32 tables for bf16 models
        freqs = position_ids[..., None].to(inv_freq.dtype) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k [B, heads, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention that also returns the weights. query [B, H, T, D], key/value [B, Hkv, S, D];
    attention_mask is transformers' 4-D additive float mask or boolean mask (True = attend)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, T, S]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, T, H, D]
    return output, weights


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions -> [B, T] document index within each row: a document starts at column 0 and wherever
    the position does not continue the previous one by +1 (packed rows restart positions at 0)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1) - 1


def is_packed(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past_length: int) -> bool:
    """Packed documents are read from position_ids only in a fresh forward without a padding mask (with a
    padding mask, generate() gives pads dummy positions that must not count as document starts)."""
    if position_ids is None or attention_mask is not None or past_length > 0 or position_ids.shape[-1] < 2:
        return False
    return bool((document_ids(position_ids)[:, -1] > 0).any())


def packed_cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] -> cu_seqlens over the B*T flattened tokens: documents and rows both start sequences."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = starts.reshape(-1).nonzero().squeeze(-1)
    return torch.cat([offsets, offsets.new_tensor([B * T])])


class DocumentSpans(NamedTuple):
    """What varlen attention takes in place of a mask: the documents of the B*T flattened tokens as cu_seqlens
    (int32 [N + 1]) and the longest document's length."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


def document_spans(docs: torch.Tensor) -> DocumentSpans:
    cu_seqlens = packed_cu_seqlens(docs).to(torch.int32)
    return DocumentSpans(cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))  # one host sync per forward


def document_block_mask(docs, key_mask, query_length: int, past_length: int, batch_size: int, device):
    """FlexAttention's BlockMask for causal attention over past + new tokens that skips padded keys (key_mask
    [B, S], True = real token, or None) and keeps packed documents (docs [B, T], or None) apart. Blocks that
    are wholly masked are skipped, so the cost follows the documents' lengths, not T * T."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + past_length
        allowed = kv_idx <= q_pos
        if key_mask is not None:
            allowed = allowed & key_mask[b, kv_idx]
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        return allowed | (kv_idx == q_pos)  # as in the dense mask: a padded query still attends to itself

    key_length = past_length + query_length
    return create_block_mask(mask_mod, batch_size, None, query_length, key_length, device=device)


def causal_attention_mask(
    attn_implementation: str,
    query_length: int,
    past_length: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    batch_size: int = 1,
):
    """The mask transformers' attention interface wants, for causal attention over past + new tokens.

    attention_mask [B, past + T] (1 = real token) or None; position_ids [B or 1, T]; batch_size B.
    flash_attention_2 takes the 2-D padding mask (or None) and reads packed documents from position_ids.
    flex_attention gets a BlockMask (document_block_mask). varlen_attention gets DocumentSpans for packed
    documents, and otherwise what sdpa gets. sdpa gets None when plain causal attention is exact (its
    is_causal fast path); otherwise sdpa and eager get a boolean [B, 1, T, past + T] mask (True = attend)
    that is causal, skips padded keys and keeps packed documents apart. Every query may always attend to
    itself, so a padded query row is never empty (an empty row would make softmax NaN and spread through
    the padded positions).
    """
    packed = is_packed(position_ids, attention_mask, past_length)
    padded = attention_mask is not None and not bool(attention_mask.all())
    docs = document_ids(position_ids.expand(batch_size, -1)) if packed else None  # [B, T]; S == T when packed
    if attn_implementation.startswith("flash_attention"):
        return attention_mask if padded else None
    if attn_implementation == VARLEN_ATTENTION and packed:
        return document_spans(docs)
    key_length = past_length + query_length
    device = position_ids.device if position_ids is not None else attention_mask.device
    key_mask = attention_mask[:, -key_length:].bool() if padded else None
    if attn_implementation == "flex_attention":
        if device.type == "cpu":  # said before the forward: its results would be wrong, and training fails late
            raise ValueError(
                "attn_implementation='flex_attention' runs on CUDA only here: torch's compiled CPU FlexAttention has "
                "no backward, and its forward (torch 2.13) reads past the end of q/k/v at some lengths (seen: "
                "lengths 8, 24, ..., 120 on an AVX2 CPU), returning wrong values or NaN. On CPU use 'sdpa' or "
                "'varlen_attention' (the same attention, exact)")
        return document_block_mask(docs, key_mask, query_length, past_length, batch_size, device)
    plain_causal = not packed and not padded and (past_length == 0 or query_length == 1)
    if attn_implementation in ("sdpa", VARLEN_ATTENTION) and plain_causal:
        return None  # sdpa's is_causal path; the eager kernel always needs the explicit mask
    q_pos = torch.arange(past_length, key_length, device=device)
    k_pos = torch.arange(key_length, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, T, S]
    if padded:
        allowed = allowed & key_mask[:, None]  # [B, T, S]
    if packed:
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]  # [B, 1, T, S]


def varlen_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Causal attention within each packed document, from cu_seqlens instead of a [T, T] mask.
    query [B, H, T, D], key/value [B, Hkv, T, D]; attention_mask is DocumentSpans, or (no packed documents)
    what sdpa takes, and then sdpa runs. On CUDA in bf16/fp16 torch's varlen flash kernel runs; elsewhere
    (CPU, fp32) the same attention runs document by document through SDPA: exact, and slower."""
    if not isinstance(attention_mask, DocumentSpans):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    if dropout > 0:
        raise ValueError("varlen_attention has no attention dropout: set attention_dropout=0 or use sdpa")
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(B * T, H, D)
    k = key.transpose(1, 2).reshape(B * T, Hkv, D)
    v = value.transpose(1, 2).reshape(B * T, Hkv, D)
    cu_seqlens, max_seqlen = attention_mask
    if varlen_attn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scaling,
                          window_size=(-1, 0), enable_gqa=Hkv != H)  # window (-1, 0): causal
    else:
        bounds = cu_seqlens.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                is_causal=True, scale=scaling, enable_gqa=Hkv != H,
            ).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])
        ])
    return out.view(B, T, H, D), None


# a name transformers' attention interface knows, so `attn_implementation="varlen_attention"` loads and runs
ALL_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, varlen_attention_forward)


class GatedAttention(nn.Module):
    """GQA attention with RoPE, optional QK RMSNorm and a sigmoid output gate (Qiu et al. 2025, "G1").

    The gate is computed by q_proj together with the query, from the same normed hidden states. q_proj's
    output is packed per head as [q_h | gate_h] (gate_h has head_dim values for "elementwise", 1 for
    "headwise"): the layout Qwen3-Next uses. Keeping each head's query and gate adjacent means a
    head-sharded (tensor-parallel) q_proj keeps both on the same rank, and the split is a view.
    """

    def __init__(
        self,
        config,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ):
        super().__init__()
        self.config = config  # read for _attn_implementation at call time
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_key_value_groups = num_heads // num_kv_heads
        self.scaling = head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.gate_kind = config.attn_output_gate
        self.gate_dim = {"elementwise": head_dim, "headwise": 1, "none": 0}[self.gate_kind]

        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden_size, num_heads * (head_dim + self.gate_dim), bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = hidden_states.shape
        q_and_gate = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim + self.gate_dim)
        query, gate = q_and_gate.split([self.head_dim, self.gate_dim], dim=-1)  # [B, T, H, D], [B, T, H, G]
        key = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, heads, T, D]

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # attn_output [B, T, H, D]

        if self.gate_dim:
            attn_output = attn_output * torch.sigmoid(gate)  # gate broadcasts over D when headwise
        attn_output = attn_output.reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(attn_output), attn_weights


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
