"""Expert parallelism (EP) for seedlm's MoE models, applied from `launch/` after the model is built.

The model code is single-process: `SparseMoeBlock.experts` is an `Experts` holding all E experts. Here,
like torchtitan's parallelize step, every such module is swapped for an `ExpertParallelExperts` that holds
only this rank's contiguous slice of E / ep_size experts under the same parameter names
(`gate_up_proj` [E_local, 2I, H], `down_proj` [E_local, H, I]) and the same forward signature. Tokens go
to the rank owning their expert and come back with uneven (dropless) all-to-alls.

Groups (DeepSpeed's, `deepspeed.utils.groups._create_expert_and_data_parallel`, named "ep_size_<n>"):
  expert-parallel group (EP)       consecutive ranks [0..n-1], [n..2n-1], ...: all-to-all of tokens
  expert-data-parallel group (EDP) ranks with the same EP rank: expert gradients are reduced here
  all ranks                        every other gradient, and the router's expert counts

Gradient reduction under ZeRO 1/2. DeepSpeed 0.19.8's ZeRO 1/2 optimizer reduces a parameter over its EDP
group only when (a) the parameter is marked `allreduce = False`, `group_name = "ep_size_<n>"`, (b) it sits in
an optimizer param group with `"moe": True, "name": "ep_size_<n>"`, and (c) the engine's `has_moe_layers`
is True when the ZeRO optimizer is built. (c) is set inside `DeepSpeedEngine.__init__`
(`_configure_distributed_model`) only by finding a `deepspeed.moe.layer.MoE` or an AutoEP layer among the
modules, before the optimizer is created and before `_broadcast_model` (which must broadcast expert slices
over the EDP group only, or rank 0's slice overwrites the others'). Without it, marked parameters make the
ZeRO gradient bucket look up `expert_data_parallel_group[...]` on None, and unmarked expert parameters
would be averaged over all ranks, mixing *different* experts that share a slot. Setting the engine
attribute after `deepspeed.initialize` is too late. So `expert_parallel_engine_context` makes the engine's
MoE scan also match `ExpertParallelExperts`, for the duration of `deepspeed.initialize` only: the engine
module's `MoE` name becomes the tuple `(MoE, ExpertParallelExperts)` and is restored afterwards. Everything
DeepSpeed then does with `has_moe_layers` is its own tested MoE path (EDP reduction dividing by the full
data-parallel size, EDP broadcast, expert grad norms). Checkpoint saving afterwards sees the original `MoE`
name, finds no native MoE layer and writes no per-expert files: the module file holds rank 0's expert
slices only, the ZeRO shards hold every rank's fp32 partitions. `engine.load_checkpoint` followed by
`sync_expert_weights_after_load` resumes exactly; full HF weights come from `gather_full_state_dict`.

ZeRO-3 + EP is refused (`validate_expert_parallel`): ZeRO-3 partitions each parameter over all ranks, but
our expert slices differ per EP rank under one name and would have to be partitioned over the EDP group;
DeepSpeed 0.19.8 does that only for its own AutoEP layers (`_validate_zero3_moe_compatibility` asserts
"MoE not supported with Stage 3" for anything else, native MoE included).

Why not DeepSpeed AutoEP (0.19.8): its `qwen3_moe` preset fails at `deepspeed.initialize` with the installed
transformers (PLATFORM_NOTES). With explicit patterns it replaces the whole MoE block (`mlp`) by an
`AutoEPMoELayer` whose `forward(hidden_states)` takes no token mask and returns the output (or output and
router logits), not our `(output, RouterOutput)`: our decoder layers, router losses (balancing with
global counts, z-loss), expert counts and bias balancing would be lost, and the weights are renamed
`experts.w1/w2/w3`, so checkpoints would no longer have the single-process layout. Why not
`deepspeed.moe.layer.MoE`: top-1/top-2 gating with capacity factors (drops tokens), einsum dispatch, its own
parameter layout. So the token exchange is built here on torch.distributed (a small
autograd all-to-all) and DeepSpeed's groups.

Trainer order: init_distributed -> build the model (same seed everywhere) -> `launch/engine.py` `build_engine`:
apply_expert_parallel -> AdamW over optimizer_param_groups -> deepspeed.initialize inside
expert_parallel_engine_context -> check_engine_expert_parallel; each step's loss via loss_with_global_balancing
(launch/trainer.py); resume: engine.load_checkpoint then sync_expert_weights_after_load (on another topology:
launch/reshard.py, which rebuilds every expert from the ZeRO shards and re-slices it); the full HF weights
(saving an hf/ folder, export): gather_full_state_dict.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from seedlm.model.moe import Experts, SparseMoeBlock, load_balancing_loss

EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")


class ExpertParallelError(ValueError):
    """An expert-parallel setting that cannot work; the message says what to change."""


@dataclass
class ExpertParallelInfo:
    """What apply_expert_parallel did. groups are None when ep_size == 1 (nothing is sharded)."""

    ep_size: int
    ep_rank: int = 0
    group_name: str | None = None  # DeepSpeed's name for the EP / EDP groups, "ep_size_<n>"
    ep_group: object = None
    edp_group: object = None
    num_experts: int = 0
    num_local_experts: int = 0
    expert_param_names: list[str] = field(default_factory=list)  # full names, e.g. model.layers.0.mlp.experts.down_proj

    @property
    def enabled(self) -> bool:
        return self.ep_size > 1


def validate_expert_parallel(ep_size: int, world_size: int, num_experts: int, zero_stage: int | None = None) -> None:
    """Refuse, with one clear message, a setting that cannot run. Call before any compute."""
    if ep_size < 1:
        raise ExpertParallelError(f"expert_parallel_size must be >= 1, got {ep_size}")
    if ep_size == 1:
        return
    if num_experts == 0:
        raise ExpertParallelError(
            f"expert_parallel_size={ep_size} needs an MoE model, but num_experts is 0 (dense FFN); "
            "set expert_parallel_size=1"
        )
    if world_size % ep_size != 0:
        raise ExpertParallelError(
            f"expert_parallel_size={ep_size} must divide the number of ranks ({world_size}); "
            f"use a divisor of {world_size}"
        )
    if num_experts % ep_size != 0:
        raise ExpertParallelError(
            f"expert_parallel_size={ep_size} must divide num_experts={num_experts} so every rank holds "
            "the same number of experts"
        )
    if zero_stage == 3:
        raise ExpertParallelError(
            "ZeRO stage 3 with expert_parallel_size > 1 is not supported: ZeRO-3 partitions each parameter over "
            "all ranks, but expert slices differ per expert-parallel rank, and DeepSpeed 0.19.8 partitions them "
            "over the expert-data-parallel group only for its own AutoEP layers. "
            "Use zero_stage 1 or 2 with expert parallelism, or expert_parallel_size=1 with ZeRO-3."
        )


def mark_expert_param(param: nn.Parameter, group_name: str) -> None:
    """DeepSpeed's MoE marking (deepspeed.moe.utils.is_moe_param): not all-reduced over all ranks, but over
    the expert-data-parallel group named group_name."""
    param.allreduce = False
    param.group_name = group_name


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows over `group`; the backward is the reverse all-to-all of the gradients.
    (torch.distributed.nn.functional.all_to_all_single does the same but is deprecated in torch 2.13.)"""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        # x [sum(send_splits), H] -> [sum(recv_splits), H]
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(send_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware uneven all-to-all: row block i of x goes to rank i of group; zero-row blocks are fine."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


class ExpertParallelExperts(Experts):
    """This EP rank's slice of the experts, computing the same function as `Experts` over the EP group.

    Subclasses `Experts` so the per-expert compute is the single-process code (`Experts.forward`), run on
    the rows this rank receives; `num_experts` is the local count, `num_global_experts` the model's."""

    def __init__(self, full: Experts, ep_group, ep_rank: int, ep_size: int, group_name: str):
        num_local = full.num_experts // ep_size
        _, two_i, hidden = full.gate_up_proj.shape
        with torch.device(full.gate_up_proj.device):  # meta for a model built on the meta device (materialize.py)
            super().__init__(num_local, hidden, two_i // 2)
        self.num_global_experts = full.num_experts
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.ep_group = ep_group
        start = ep_rank * num_local
        with torch.no_grad():  # this rank's slice: of a meta model (shapes only) or of weights every rank built
            for name in EXPERT_PARAM_NAMES:  # gate_up_proj [E_local, 2I, H], down_proj [E_local, H, I]
                whole = getattr(full, name)
                local = nn.Parameter(whole[start : start + num_local].clone(), requires_grad=whole.requires_grad)
                mark_expert_param(local, group_name)
                setattr(self, name, local)

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        # hidden_states [N, H]; top_k_index (global expert ids), top_k_weights [N, k] -> [N, H]
        top_k = top_k_index.shape[1]
        n_local, n_ranks = self.num_experts, self.ep_size
        flat_expert = top_k_index.reshape(-1)  # [N*k]
        order = flat_expert.argsort(stable=True)  # assignments sorted by expert = grouped by owning rank
        token_of_row = order // top_k  # [N*k]
        send_counts = torch.bincount(flat_expert, minlength=self.num_global_experts)  # [E] rows per expert

        # recv_counts[r * n_local + j]: rows rank r sends to my local expert j (equal splits of n_local).
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send_splits = send_counts.view(n_ranks, n_local).sum(1).tolist()  # rows to each rank
        recv_splits = recv_counts.view(n_ranks, n_local).sum(1).tolist()  # rows from each rank

        rows = hidden_states[token_of_row]  # [N*k, H]
        received = all_to_all_rows(rows, send_splits, recv_splits, self.ep_group)  # [R, H], by (source, expert)

        # Each received row is one assignment to one local expert. Experts.forward with top-1 index = that
        # expert and weight 1 runs the single-process grouped SwiGLU and returns the rows in received
        # order; the routing weight is applied below, after the return trip, as in Experts.forward.
        local_expert = torch.arange(n_local, device=recv_counts.device).repeat(n_ranks)  # [n_ranks * n_local]
        local_expert_of_row = local_expert.repeat_interleave(recv_counts)  # [R]
        computed = super().forward(
            received, local_expert_of_row[:, None], received.new_ones(received.shape[0], 1)
        )  # [R, H]

        returned = all_to_all_rows(computed, recv_splits, send_splits, self.ep_group)  # [N*k, H], order of `rows`
        returned = returned * top_k_weights.reshape(-1)[order, None].to(returned.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, token_of_row, returned)

    def extra_repr(self) -> str:
        first = self.ep_rank * self.num_experts
        return f"experts {first}..{first + self.num_experts - 1} of {self.num_global_experts}"


def apply_expert_parallel(model: nn.Module, ep_size: int, zero_stage: int | None = None) -> ExpertParallelInfo:
    """Shard the experts of every SparseMoeBlock over expert-parallel groups of ep_size ranks.

    Call after `deepspeed.init_distributed(...)`, on a model every rank built with the same seed, before
    `optimizer_param_groups` and `deepspeed.initialize`. ep_size == 1 changes nothing."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    num_experts = blocks[0].num_experts if blocks else 0
    if ep_size == 1:
        validate_expert_parallel(ep_size, 1, num_experts, zero_stage)
        return ExpertParallelInfo(ep_size=1, num_experts=num_experts, num_local_experts=num_experts)

    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    if not (dist.is_available() and dist.is_initialized() and ds_comm.is_initialized()):
        raise ExpertParallelError(
            "expert parallelism needs torch.distributed and DeepSpeed's comm initialised: "
            "call deepspeed.init_distributed(dist_backend=...) before apply_expert_parallel"
        )
    validate_expert_parallel(ep_size, dist.get_world_size(), num_experts, zero_stage)

    group_name = f"ep_size_{ep_size}"  # DeepSpeed's naming; the ZeRO optimizer looks groups up by it
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(group_name)
    edp_group = groups._get_expert_data_parallel_group(group_name)
    ep_rank = dist.get_rank(group=ep_group)

    for block in blocks:
        block.experts = ExpertParallelExperts(block.experts, ep_group, ep_rank, ep_size, group_name)
    names = [n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False]
    return ExpertParallelInfo(
        ep_size=ep_size,
        ep_rank=ep_rank,
        group_name=group_name,
        ep_group=ep_group,
        edp_group=edp_group,
        num_experts=num_experts,
        num_local_experts=num_experts // ep_size,
        expert_param_names=names,
    )


@contextlib.contextmanager
def expert_parallel_engine_context(ep_info: ExpertParallelInfo):
    """Wrap `deepspeed.initialize` so the engine takes its MoE path for ExpertParallelExperts (see the
    module docstring for why). A no-op when EP is off. `launch/engine.py` `build_engine` uses it so:

        optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay, ep_info), lr=lr)
        with expert_parallel_engine_context(ep_info):
            engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=..., config=ds_config)
        check_engine_expert_parallel(engine, ep_info)
    """
    if not ep_info.enabled:
        yield
        return
    from deepspeed.moe.layer import MoE
    from deepspeed.runtime import engine as engine_module

    if engine_module.MoE is not MoE:
        raise RuntimeError("deepspeed.runtime.engine.MoE is already patched; nested expert_parallel_engine_context?")
    engine_module.MoE = (MoE, ExpertParallelExperts)  # isinstance(module, MoE) in the engine's MoE scan
    try:
        yield
    finally:
        engine_module.MoE = MoE


def check_engine_expert_parallel(engine, ep_info: ExpertParallelInfo) -> None:
    """Fail loudly if deepspeed.initialize ran outside expert_parallel_engine_context (expert gradients
    would be reduced wrongly)."""
    if ep_info.enabled and not engine.has_moe_layers:
        raise RuntimeError(
            "the DeepSpeed engine did not see the expert-parallel layers; "
            "call deepspeed.initialize inside expert_parallel_engine_context(ep_info)"
        )


def sync_expert_weights_after_load(engine, ep_info: ExpertParallelInfo) -> None:
    """Call right after `engine.load_checkpoint(...)` with EP (ZeRO 1/2).

    DeepSpeed writes the module file from data-parallel rank 0 only, so on load every rank gets EP rank 0's
    expert slices in its module; the ZeRO shards (one per rank) hold each rank's correct fp32 partitions,
    but ZeRO copies them into the module weights only after the next step. Copy them now
    (`update_lp_params`: fp32 partitions -> module weights, all-gathered over each group's DP group), or
    the first step after a resume runs with the wrong experts. Measured: without it a resumed ZeRO-2 run
    diverges (1e-2 after two steps); with it the resume is exact."""
    if ep_info.enabled:
        engine.optimizer.update_lp_params()


def optimizer_param_groups(model: nn.Module, weight_decay: float, ep_info: ExpertParallelInfo | None = None):
    """Param groups for the optimizer, in the form DeepSpeed's ZeRO 1/2 wants.

    Decay: weights with >= 2 dims except embeddings. No decay: 1-D parameters (norms, biases) and the
    input embedding (and the LM head when tied to it: the same tensor). With EP, each of the two groups is
    split by `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` into a dense group
    and an expert group `{"moe": True, "name": "ep_size_<n>"}` (expert params are reduced and partitioned
    over the expert-data-parallel group). Empty groups are dropped."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 parameter's own shape is its empty partition
        if ndim < 2 or id(param) in embedding_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    if ep_info is not None and ep_info.enabled:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------------------
# Global-batch load balancing


def global_expert_counts(local_counts: torch.Tensor, group=None) -> torch.Tensor:
    """Sum expert counts [L, E] over the data-parallel ranks (all ranks by default: with or without EP,
    every rank routes its own tokens). No gradient. A collective: every rank calls it every micro-batch."""
    counts = local_counts.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def balancing_loss_from_global_counts(local_counts: torch.Tensor, router_probs: torch.Tensor, group=None):
    """The load-balancing loss with f from the counts of the global batch and P from this rank's tokens.

    local_counts, router_probs [L_moe, E] (GatedMoeCausalLMOutput.expert_counts / .router_probs).

    "Global batch" here is the current micro-batch of every data-parallel rank: the counts are summed over
    ranks for this micro-batch only. With gradient accumulation the counts of later micro-batches are not
    known when an earlier one runs backward, so each micro-batch's loss uses the counts of its own
    micro-step summed over ranks; the engine then averages these losses over micro-batches. This is exact
    (equal to one process on the concatenated micro-batch of all ranks) when each rank has the same number
    of routed tokens; it is not the balancing loss of the counts summed over all accumulated micro-batches.
    Averaging the per-rank losses (DP gradient averaging) gives N_E * sum_i f_i * mean_r(P_i^r) = the
    single-process loss, since P is a mean over tokens."""
    counts = global_expert_counts(local_counts, group)
    return load_balancing_loss(counts, router_probs)


def loss_with_global_balancing(output, config, group=None) -> torch.Tensor:
    """output.loss (LM + aux_coef * local balancing + z_coef * z) with the balancing term replaced by the
    global-batch one. output: a causal-LM output with loss, aux_loss, expert_counts, router_probs."""
    if output.aux_loss is None:  # dense model
        return output.loss
    global_aux = balancing_loss_from_global_counts(output.expert_counts, output.router_probs, group)
    return output.loss + config.router_aux_loss_coef * (global_aux - output.aux_loss)


# ---------------------------------------------------------------------------------------------------------
# Export


def gather_full_state_dict(model: nn.Module, ep_info: ExpertParallelInfo) -> dict[str, torch.Tensor]:
    """The single-process state dict ({name: tensor}, experts [E, ...]) on global rank 0, {} elsewhere.

    A collective over the EP group: every rank calls it. With ZeRO 1/2 the module holds full (non-expert)
    weights on every rank; under ZeRO-3 (not allowed with EP) gather the parameters first. Use as
    `model.save_pretrained(out_dir, state_dict=gather_full_state_dict(model, ep_info))` on rank 0
    (transformers 5.x's save_pretrained empties the dict it is given: pass a copy to keep using it).
    Like state_dict(), non-expert tensors alias the live parameters: clone to keep a snapshot."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if not ep_info.enabled:
        return state if not dist.is_initialized() or dist.get_rank() == 0 else {}
    expert_names = set(ep_info.expert_param_names)
    for name in sorted(expert_names):  # the same order on every rank
        local = state[name].contiguous()  # [E_local, ...]
        parts = [torch.empty_like(local) for _ in range(ep_info.ep_size)]
        dist.all_gather(parts, local, group=ep_info.ep_group)
        state[name] = torch.cat(parts, dim=0)  # [E, ...], EP rank r's slice at r * E_local
    return state if dist.get_rank() == 0 else {}
