"""A plain, independent re-implementation of the gated-attention MoE forward pass, for tests.

Written from the paper's equations rather than from model/: explicit per-head, per-token loops for
attention and routing, document ids derived from position_ids, no grouped matmuls, no masks from
transformers. Slow; meant for float64 on tiny shapes.
"""

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    # x [T, D]; rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D)
    D = x.shape[-1]
    half = D // 2
    freqs = theta ** (-torch.arange(half, dtype=x.dtype) * 2 / D)
    angles = positions[:, None].to(x.dtype) * freqs[None, :]  # [T, D/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def document_ids(position_ids):
    # a new document starts wherever the position does not continue the previous one by +1
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    return starts.long().cumsum(0)


def reference_forward(sd, cfg, input_ids, position_ids=None, attention_mask=None):
    """sd: the model's state_dict; input_ids [B, T]; returns logits [B, T, V]."""
    B, T = input_ids.shape
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G = {"elementwise": D, "headwise": 1, "none": 0}[cfg.attn_output_gate]
    eps = cfg.rms_norm_eps
    out = []
    for b in range(B):
        real = attention_mask[b].bool() if attention_mask is not None else torch.ones(T, dtype=torch.bool)
        if position_ids is not None:
            pos = position_ids[b] if position_ids.shape[0] == B else position_ids[0]
        else:
            pos = (real.long().cumsum(0) - 1).clamp(min=0)
        docs = document_ids(pos) if position_ids is not None else torch.zeros(T, dtype=torch.long)
        x = sd["model.embed_tokens.weight"][input_ids[b]]  # [T, hidden]
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
            qg = (h @ sd[p + "self_attn.q_proj.weight"].T).view(T, H, D + G)
            k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(T, Hkv, D)
            v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(T, Hkv, D)
            heads = []
            for head in range(H):
                kvh = head // (H // Hkv)
                q_h, k_h = qg[:, head, :D], k[:, kvh]
                if cfg.qk_norm:
                    q_h = rms_norm(q_h, sd[p + "self_attn.q_norm.weight"], eps)
                    k_h = rms_norm(k_h, sd[p + "self_attn.k_norm.weight"], eps)
                q_h, k_h = rope(q_h, pos, cfg.rope_theta), rope(k_h, pos, cfg.rope_theta)
                o_h = torch.zeros(T, D, dtype=x.dtype)
                for t in range(T):
                    allowed = [s for s in range(t + 1) if real[s] and docs[s] == docs[t]]
                    if not allowed:
                        continue
                    scores = torch.stack([q_h[t] @ k_h[s] for s in allowed]) / math.sqrt(D)
                    w = scores.softmax(0)
                    o_h[t] = sum(w[i] * v[s, kvh] for i, s in enumerate(allowed))
                if G:
                    o_h = o_h * torch.sigmoid(qg[:, head, D:])
                heads.append(o_h)
            x = x + torch.cat(heads, dim=-1) @ sd[p + "self_attn.o_proj.weight"].T
            h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
            x = x + reference_ffn(sd, p + "mlp.", cfg, h)
        x = rms_norm(x, sd["model.norm.weight"], eps)
        lm_head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        out.append(x @ lm_head.T)
    return torch.stack(out)


def swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def reference_ffn(sd, p, cfg, h):
    if cfg.num_experts == 0:
        return swiglu(h, sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"], sd[p + "down_proj.weight"])
    inter = cfg.moe_intermediate_size
    gate_up, down = sd[p + "experts.gate_up_proj"], sd[p + "experts.down_proj"]
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        probs = (h[t] @ sd[p + "gate.weight"].T).softmax(-1)
        top = sorted(range(cfg.num_experts), key=lambda e: -probs[e].item())[: cfg.num_experts_per_tok]
        weights = probs[top]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum()
        for w, e in zip(weights, top):
            out[t] += w * swiglu(h[t : t + 1], gate_up[e, :inter], gate_up[e, inter:], down[e])[0]
        if cfg.shared_expert_intermediate_size:
            s = p + "shared_expert."
            w_gate, w_up, w_down = (sd[s + n + "_proj.weight"] for n in ("gate", "up", "down"))
            shared = swiglu(h[t : t + 1], w_gate, w_up, w_down)
            out[t] += torch.sigmoid(h[t] @ sd[p + "shared_expert_gate.weight"].T) * shared[0]
    return out
