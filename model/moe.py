"""The fine-grained Mixture-of-Experts FFN: a top-k softmax router, experts stored as 3-D tensors and
computed grouped (dropless), an optional sigmoid-gated shared expert, and the router losses.

Parameter names match transformers' Qwen3-MoE (`mlp.gate.weight`, `mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), so checkpoints convert without renaming. DeepSpeed AutoEP is not used: its
qwen3_moe preset fails at deepspeed.initialize with transformers 5.x, and its layer would replace this block's
forward and rename the weights (see launch/expert_parallel.py). Expert parallelism is not done here:
`launch/` swaps `mlp.experts` for a version that sends tokens to their ranks, with the same parameter
names and the same forward signature.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .layers import SwiGLUMLP, upcast


@dataclass
class RouterOutput:
    """What one MoE layer reports about its routing, for the losses and for logging.

    logits [N, E] fp32 router logits; probs_mean [E] mean router probability per expert over the
    (unmasked) tokens, differentiable; expert_counts [E] number of (token, slot) assignments per expert
    over the unmasked tokens, no gradient: a trainer may sum these over micro-batches and data-parallel
    ranks and pass the sum to `load_balancing_loss` (global-batch balancing); z_loss, a scalar.
    """

    logits: torch.Tensor
    probs_mean: torch.Tensor
    expert_counts: torch.Tensor
    z_loss: torch.Tensor


def load_balancing_loss(expert_counts: torch.Tensor, probs_mean: torch.Tensor) -> torch.Tensor:
    """N_E * sum_i f_i P_i with f_i = expert_counts_i / sum(expert_counts) (the fraction of assignments that
    went to expert i) and P_i the mean router probability. Equals 1 under perfectly uniform routing,
    whatever top-k is. `expert_counts` carries no gradient; it may be summed over a larger batch than
    `probs_mean`. Works per layer ([E]) or for a stack of layers ([L, E], averaged over layers)."""
    num_experts = probs_mean.shape[-1]
    counts = expert_counts.detach().to(probs_mean.dtype)
    fraction = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    return (num_experts * (fraction * probs_mean).sum(dim=-1)).mean()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of logsumexp(router logits)^2 (ST-MoE), keeping the logits small."""
    z = torch.logsumexp(logits, dim=-1).square()  # [N]; logits are already at least fp32
    if token_mask is None:
        return z.mean()
    return (z * token_mask).sum() / token_mask.sum().clamp(min=1)


class TopKRouter(nn.Module):
    """Softmax over experts in fp32, then top-k. With `bias_update_rate > 0`, a per-expert bias shifts the
    scores used to *select* experts (auxiliary-loss-free balancing, DeepSeek-V3); the combine weights stay
    the unbiased probabilities, so the bias changes which experts run, never how outputs are mixed."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool, bias_update_rate: float):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.bias_update_rate = bias_update_rate
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        if bias_update_rate > 0:
            self.expert_bias = nn.Buffer(torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, hidden_states: torch.Tensor):
        # hidden_states [N, hidden] -> logits, probs [N, E]; top_k_weights, top_k_index [N, k]
        logits = upcast(F.linear(hidden_states, self.weight))  # softmax in at least fp32
        probs = logits.softmax(dim=-1)
        if self.expert_bias is None:
            top_k_weights, top_k_index = probs.topk(self.top_k, dim=-1)
        else:
            top_k_index = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices
            top_k_weights = probs.gather(-1, top_k_index)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return logits, probs, top_k_weights, top_k_index

    @torch.no_grad()
    def update_bias(self, expert_counts: torch.Tensor) -> None:
        """Raise the bias of under-loaded experts and lower it for over-loaded ones, by a fixed step."""
        if self.expert_bias is None:
            raise RuntimeError("this router has no expert bias; set router_bias_update_rate > 0 in the config")
        counts = expert_counts.to(self.expert_bias)
        self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """y[rows of group e] = x[rows of group e] @ weight[e].T for rows sorted by group.

    x [N, in], weight [E, out, in], group_sizes [E] -> [N, out]. Uses torch's grouped_mm when the dtype and
    strides allow it (fp32/bf16/fp16, rows a multiple of 16 bytes), one matmul per group otherwise."""
    weight_t = weight.transpose(-2, -1)  # [E, in, out], a view
    row_bytes_ok = all((d * x.element_size()) % 16 == 0 for d in (x.shape[1], weight.shape[1]))
    if (
        hasattr(F, "grouped_mm")
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.dtype == weight.dtype
        and row_bytes_ok
        # torch.compile traces grouped_mm through its meta kernel, which takes bf16 only
        and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling())
    ):
        offsets = group_sizes.cumsum(0).to(torch.int32)
        return _GroupedLinear.apply(x.contiguous(), weight, offsets)
    chunks = x.split(group_sizes.tolist(), dim=0)
    return torch.cat([chunk @ weight_t[e] for e, chunk in enumerate(chunks)], dim=0)


class _GroupedLinear(torch.autograd.Function):
    """grouped_mm(x, weight^T) that saves the weight itself for backward, not the transposed view autograd
    would save: a view pins the weight's storage, so an engine that frees (re-shards) parameters between
    forward and backward, as ZeRO-3 does, could not free it. Same gradients as autograd's (tests)."""

    @staticmethod
    def forward(ctx, x, weight, offsets):
        # x [N, in], weight [E, out, in], offsets [E] (end row of each group) -> [N, out]
        ctx.save_for_backward(x, weight, offsets)
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad_out, weight, offs=offsets)  # [N, out] x [E, out, in] -> [N, in]
        if ctx.needs_input_grad[1]:  # per group: grad_e^T x_e, [E, out, in] like the weight
            # (formed as x^T grad and transposed, the gradient was a strided view that autograd copied into the
            # weight's layout: 8% of a CPU MoE training step, benchmarks/bench_gated_moe.py)
            grad_weight = F.grouped_mm(grad_out.t(), x, offs=offsets)
        return grad_x, grad_weight, None


class Experts(nn.Module):
    """E SwiGLU experts as 3-D tensors: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].

    Dropless: every (token, slot) assignment is computed. Assignments are sorted by expert so each expert
    multiplies one contiguous block of rows."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        # hidden_states [N, H]; top_k_index, top_k_weights [N, k] -> [N, H]
        top_k = top_k_index.shape[1]
        flat_expert = top_k_index.reshape(-1)  # [N*k]
        order = flat_expert.argsort(stable=True)  # assignments grouped by expert
        token_of_row = order // top_k  # [N*k] source token of each sorted row
        group_sizes = torch.bincount(flat_expert, minlength=self.num_experts)  # [E]

        rows = hidden_states[token_of_row]  # [N*k, H]
        gate, up = grouped_linear(rows, self.gate_up_proj, group_sizes).chunk(2, dim=-1)  # [N*k, I] each
        rows = grouped_linear(F.silu(gate) * up, self.down_proj, group_sizes)  # [N*k, H]
        rows = rows * top_k_weights.reshape(-1)[order, None].to(rows.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, token_of_row, rows)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ shared expert). Returns the output and a RouterOutput."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = TopKRouter(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.norm_topk_prob,
            config.router_bias_update_rate,
        )
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLUMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        # hidden_states [B, T, H]; token_mask [B, T] (1 = real token) or None
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)  # [N, H]
        logits, probs, top_k_weights, top_k_index = self.gate(x)
        out = self.experts(x, top_k_index, top_k_weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

        flat_expert = top_k_index.reshape(-1)  # [N*k]
        if token_mask is None:
            probs_mean = probs.mean(dim=0)
            counts = torch.bincount(flat_expert, minlength=self.num_experts).float()
        else:
            mask = token_mask.reshape(-1).to(probs.dtype)  # [N]
            probs_mean = (probs * mask[:, None]).sum(dim=0) / mask.sum().clamp(min=1)
            counts = torch.bincount(flat_expert, weights=mask.repeat_interleave(self.top_k), minlength=self.num_experts)
        z_loss = router_z_loss(logits, None if token_mask is None else token_mask.reshape(-1))
        routing = RouterOutput(logits=logits, probs_mean=probs_mean, expert_counts=counts, z_loss=z_loss)
        return out.view(B, T, H), routing


class MoeModelMixin:
    """For PreTrainedModels whose layers may hold SparseMoeBlocks (both families)."""

    def init_moe_weights(self, module: nn.Module, std: float) -> None:
        """The MoE part of _init_weights: experts and router N(0, std), selection bias zero."""
        if isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.expert_bias is not None:
                init.zeros_(module.expert_bias)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        """The MoE FFNs in layer order (empty for a dense model)."""
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    @torch.no_grad()
    def update_router_biases(self, expert_counts: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing step: expert_counts [L_moe, E], ideally summed over the global batch.
        Call after the optimizer step; needs router_bias_update_rate > 0."""
        blocks = self.moe_blocks()
        if expert_counts.shape[0] != len(blocks):
            raise ValueError(f"expert_counts has {expert_counts.shape[0]} rows, the model has {len(blocks)} MoE layers")
        for block, counts in zip(blocks, expert_counts):
            block.gate.update_bias(counts)
