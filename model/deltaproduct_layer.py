"""The DeltaProduct token mixer and its short convolutions.

Per token t and head: q_t, n_h keys k_{t,j}, values v_{t,j} and betas beta_{t,j}; the state S [K, V] is
decayed by exp(g_t), then updated by n_h generalized Householder steps S <- S + beta k (v - S^T k)^T, and
the output is S^T q_t / sqrt(K). The layer owns the projections, the causal convolutions, the L2 norm of
q and k, beta's range, the forget gate and the gated output norm; the kernels own the recurrence.

Imports only torch and sibling files (exported with the checkpoint).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .delta_product_kernels import chunk_delta_product, recurrent_delta_product
from .fla_backend import training_kernel
from .layers import RMSNorm, upcast


class ShortConvolution(nn.Module):
    """Causal depthwise Conv1d + SiLU over [B, T, D], that never mixes tokens of different documents.

    `doc_ids` [B, T] (or None) marks documents: tap j at position t reads x[t - j] only when it belongs to
    the same document. `conv_state` [B, w-1, D] holds the previous inputs when decoding; the new state is
    returned alongside the output."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))  # [D, w]; weight[:, -1] multiplies x[t]

    def forward(self, x, doc_ids=None, conv_state=None):
        B, T, D = x.shape
        w = self.kernel_size
        history = conv_state if conv_state is not None else x.new_zeros(B, w - 1, D)
        padded = torch.cat([history.to(x.dtype), x], dim=1)  # [B, w-1+T, D]
        out = x * self.weight[:, -1]
        for j in range(1, w):  # tap j reads x[t - j]
            shifted = padded[:, w - 1 - j : w - 1 - j + T]  # [B, T, D]
            if doc_ids is not None:
                same_doc = torch.zeros_like(doc_ids, dtype=torch.bool)
                same_doc[:, j:] = doc_ids[:, j:] == doc_ids[:, :-j]
                shifted = shifted * same_doc[..., None].to(x.dtype)
            out = out + shifted * self.weight[:, -1 - j]
        new_state = padded[:, -(w - 1) :] if w > 1 else padded[:, :0]
        return F.silu(out), new_state


class DeltaProductAttention(nn.Module):
    """The DeltaProduct mixer. Cache entries for this layer: ("state", [B, H, K, V] fp32) and
    ("conv", (q, k, v) conv histories)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_heads
        self.head_k_dim = K = config.head_dim
        self.head_v_dim = V = config.head_v_dim
        self.num_householder = n = config.num_householder
        self.allow_neg_eigval = config.allow_neg_eigval
        self.chunk_size = config.chunk_size
        hidden = config.hidden_size

        self.q_proj = nn.Linear(hidden, H * K, bias=False)
        self.k_proj = nn.Linear(hidden, n * H * K, bias=False)
        self.v_proj = nn.Linear(hidden, n * H * V, bias=False)
        self.b_proj = nn.Linear(hidden, n * H, bias=False)
        if config.use_forget_gate:
            self.a_proj = nn.Linear(hidden, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
        else:
            self.a_proj = None
        if config.use_short_conv:
            self.q_conv1d = ShortConvolution(H * K, config.conv_size)
            self.k_conv1d = ShortConvolution(n * H * K, config.conv_size)
            self.v_conv1d = ShortConvolution(n * H * V, config.conv_size)
        else:
            self.q_conv1d = None
        self.g_proj = nn.Linear(hidden, H * V, bias=False) if config.use_output_gate else None
        self.o_norm = RMSNorm(V, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(H * V, hidden, bias=False)

    def forward(self, hidden_states, token_mask=None, doc_ids=None, cu_seqlens=None, cache=None):
        """hidden_states [B, T, hidden]; token_mask [B, T] (1 = real token) zeroes padding so it neither
        enters the convolutions nor moves the state; doc_ids [B, T] and cu_seqlens (over the flattened
        B*T tokens) mark packed documents; cache: a DeltaProductCache or None. Returns [B, T, hidden]."""
        B, T, _ = hidden_states.shape
        H, V, n = self.num_heads, self.head_v_dim, self.num_householder
        x = hidden_states
        if token_mask is not None:
            x = x * token_mask[..., None].to(x.dtype)

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*K], [B, T, n*H*K], [B, T, n*H*V]
        beta = torch.sigmoid(upcast(self.b_proj(x))).view(B, T, n, H)  # [B, T, n, H]
        if self.allow_neg_eigval:
            beta = beta * 2.0
        g = None
        if self.a_proj is not None:
            g = -upcast(self.A_log).exp() * F.softplus(upcast(self.a_proj(x)) + upcast(self.dt_bias))  # [B, T, H]
        if token_mask is not None:  # padding: beta = 0 and no decay, so the state passes through unchanged
            keep = token_mask.to(beta.dtype)
            beta = beta * keep[:, :, None, None]
            g = g * keep[..., None] if g is not None else None
        beta = beta.reshape(B, T * n, H).to(q.dtype)

        if cache is not None:
            o = self._mix_tokens(q, k, v, beta, g, doc_ids, cu_seqlens, cache)
        else:
            # recomputed in backward: the block keeps the projections' outputs, not the convs' taps, the
            # normalised q and k or the kernel's inputs (the kernel itself keeps only those and a few states)
            o = _recomputed(self._mix_tokens, q, k, v, beta, g, doc_ids, cu_seqlens, None)

        gate = self.g_proj(hidden_states).view(B, T, H, V) if self.g_proj is not None else None
        o = _recomputed(self._gated_norm, o, gate)  # keeps o and the gate, not the norm's intermediates
        return self.o_proj(o.reshape(B, T, H * V))

    def _mix_tokens(self, q, k, v, beta, g, doc_ids, cu_seqlens, cache):
        """The projections' outputs q [B, T, H*K], k [B, T, n*H*K], v [B, T, n*H*V], beta [B, T*n, H] and
        g [B, T, H] or None -> short convs, q/k norms and the kernel -> o [B, T, H, V]. Reads and updates
        the cache's conv histories and state when there is one."""
        B, T, _ = q.shape
        H, K, V, n = self.num_heads, self.head_k_dim, self.head_v_dim, self.num_householder
        q, k, v = self._conv_and_normalize(q, k, v, doc_ids, cache)
        initial_state = cache.recurrent_state(self.layer_idx) if cache is not None else None
        want_state = cache is not None
        backend = "auto"  # fla where it applies (delta_product_kernels), else torch
        if self.training and torch.is_grad_enabled():  # fla only after a parity check on these head shapes
            backend = training_kernel(H, K, V, n, g is not None, q.dtype, q.device)
        if cu_seqlens is not None:  # packed documents: one row of B*T tokens, state reset per document
            o, final_state = chunk_delta_product(
                q.reshape(1, B * T, H, K), k.reshape(1, B * T * n, H, K), v.reshape(1, B * T * n, H, V),
                beta.reshape(1, B * T * n, H), None if g is None else g.reshape(1, B * T, H),
                cu_seqlens=cu_seqlens, num_householder=n, chunk_size=self.chunk_size, backend=backend,
            )
            o = o.view(B, T, H, V)
        elif T == 1 and not self.training:  # decoding: one step of the recurrence
            o, final_state = recurrent_delta_product(
                q, k, v, beta, g, initial_state=initial_state, output_final_state=want_state, num_householder=n
            )
        else:
            o, final_state = chunk_delta_product(
                q, k, v, beta, g, initial_state=initial_state, output_final_state=want_state,
                num_householder=n, chunk_size=self.chunk_size, backend=backend,
            )
        if cache is not None:
            cache.set_recurrent_state(self.layer_idx, final_state)
        return o

    def _conv_and_normalize(self, q, k, v, doc_ids, cache):
        """Projections' outputs -> short convs (or SiLU) -> L2-normalised q [B, T, H, K], interleaved keys
        k [B, T*n, H, K] and values v [B, T*n, H, V]; the n_h keys of token t at positions t*n ... t*n+n-1."""
        B, T, _ = q.shape
        H, K, V, n = self.num_heads, self.head_k_dim, self.head_v_dim, self.num_householder
        if self.q_conv1d is not None:
            history = cache.conv_states(self.layer_idx) if cache is not None else (None, None, None)
            q, q_hist = self.q_conv1d(q, doc_ids, history[0])
            k, k_hist = self.k_conv1d(k, doc_ids, history[1])
            v, v_hist = self.v_conv1d(v, doc_ids, history[2])
            if cache is not None:
                cache.set_conv_states(self.layer_idx, (q_hist, k_hist, v_hist))
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = F.normalize(q.view(B, T, H, K), p=2, dim=-1)
        k = F.normalize(k.view(B, T, n, H, K), p=2, dim=-1).reshape(B, T * n, H, K)
        v = v.view(B, T, n, H, V).reshape(B, T * n, H, V)
        return q, k, v

    def _gated_norm(self, o, gate):
        """RMSNorm per head of the kernel output o [B, T, H, V], times SiLU(gate) when there is an output gate."""
        o = self.o_norm(o)
        return o * F.silu(gate) if gate is not None else o


def _recomputed(fn, *args):
    """fn(*args), its intermediates recomputed in backward instead of kept (when a gradient is wanted).

    Used for the layer's cheap elementwise stretches around the kernel: they would otherwise keep several
    copies of q, k, v and o per token for backward."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)
