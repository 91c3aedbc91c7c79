"""Attention-sink statistics of a model's softmax-attention layers (Qiu et al. 2025, "Gated Attention").

    stats = attention_sink_stats(model, input_ids)      # input_ids [B, T], unpadded
    stats["first_token_attention"]        # mean over layers of the first token's attention share
    stats["first_token_attention_per_layer"]
    stats["max_activation"]               # largest |hidden state| in the residual stream, over layers
    stats["max_activation_per_layer"]

The gated-attention paper reports the first-token share falling from 0.467 to 0.048 and the largest
activation from 1053 to 94 with the elementwise output gate (at 1.7B/15B scale, trained).

- First-token share: for every attention layer, head and query position t >= 1, the softmax weight on
  key 0, averaged. Query 0 is left out: it can only attend to itself, so its share is 1 by construction.
- Largest activation: max |h| over the output of every decoder layer (the residual stream, before the
  final norm), which is where massive activations live.

Attention weights come from forward hooks on every `model.layers.GatedAttention` (both families: the
gated-MoE decoder's `self_attn` and a DeltaProduct hybrid's attention layers' `attn`). They exist only
with an eager (weight-returning) kernel, so the model's attention implementation is switched for the
call to a causal eager kernel registered with transformers' attention interface, and switched back after.
A pure DeltaProduct model has no attention layers: its per-layer list is empty.
"""

from __future__ import annotations

import torch


def _attention_modules(model) -> list[tuple[str, torch.nn.Module]]:
    from seedlm.model.layers import GatedAttention

    return [(name, m) for name, m in model.named_modules() if isinstance(m, GatedAttention)]


def _decoder_layers(model) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: cannot read its residual stream")
    return list(layers)


PROBE_KERNEL = "seedlm_causal_eager"


def _causal_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """model.layers.eager_attention_forward with the causal mask made explicit. The model hands the kernel
    no mask where plain causal attention is exact (sdpa's is_causal fast path), but the eager kernel then
    attends to every key, the future included; here the missing mask becomes a causal one."""
    from seedlm.model.layers import eager_attention_forward

    if attention_mask is None:
        T, S = query.shape[2], key.shape[2]
        q_pos = torch.arange(S - T, S, device=query.device)
        attention_mask = (torch.arange(S, device=query.device)[None, :] <= q_pos[:, None])[None, None]  # [1,1,T,S]
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=dropout)


def _set_attn_implementation(model, impl: str) -> None:
    # the attention layers read config._attn_implementation at call time; a name registered with
    # transformers' attention interface is looked up there
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == PROBE_KERNEL and PROBE_KERNEL not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(PROBE_KERNEL, _causal_eager)
    model.config._attn_implementation = impl


@torch.no_grad()
def attention_sink_stats(model, input_ids: torch.Tensor, batch_size: int = 8) -> dict:
    """First-token attention share per attention layer and the largest hidden activation per layer, over
    the rows of input_ids [N, T] (all of one length; no padding)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [N, T] with T >= 2, got {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    attn_modules = _attention_modules(model)
    layers = _decoder_layers(model)
    share_sum = torch.zeros(len(attn_modules), dtype=torch.float64)  # sum over batches of per-batch means
    max_act = torch.zeros(len(layers), dtype=torch.float64)
    current: dict[int, float] = {}

    def attn_hook(index):
        def hook(module, args, output):
            weights = output[1]  # [B, H, T, S]
            if weights is None:
                raise RuntimeError("attention weights are None: the weight-returning kernel is not in use")
            current[index] = float(weights[:, :, 1:, 0].float().mean())  # queries t >= 1, key 0

        return hook

    def layer_hook(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [B, T, hidden]
            max_act[index] = max(float(max_act[index]), float(hidden.detach().abs().max()))

        return hook

    previous_impl = model.config._attn_implementation
    handles = [m.register_forward_hook(attn_hook(i)) for i, (_, m) in enumerate(attn_modules)]
    handles += [layer.register_forward_hook(layer_hook(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        if attn_modules:
            _set_attn_implementation(model, PROBE_KERNEL)
        for start in range(0, input_ids.shape[0], batch_size):
            current.clear()
            model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
            for i in range(len(attn_modules)):
                share_sum[i] += current[i]
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        if attn_modules:
            _set_attn_implementation(model, previous_impl)
        model.train(was_training)
    per_layer = (share_sum / max(n_batches, 1)).tolist()
    return {
        "first_token_attention": sum(per_layer) / len(per_layer) if per_layer else None,
        "first_token_attention_per_layer": per_layer,
        "attention_layers": [name for name, _ in attn_modules],
        "max_activation": float(max_act.max()),
        "max_activation_per_layer": max_act.tolist(),
    }
