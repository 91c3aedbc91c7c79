"""The model inside a DeepSpeed engine: construction, the optimizer and lr schedule, and the mechanics of one
optimizer step (clipping, dropping a non-finite update, the consolidated HF folder a checkpoint holds).

The training loop (launch/trainer.py) calls these; it knows nothing of DeepSpeed's configuration keys.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path

import torch

from seedlm.launch.distributed import DistInfo, all_ranks_true


def lr_lambda(train_cfg):
    """Multiplier of the peak lr at a step: linear warmup, then cosine / WSD decay to min_lr_ratio, or constant.
    With train.lr_restarts the same shape runs again from each restart step to the next (or to max_steps)."""
    warmup, floor = train_cfg.warmup_steps, train_cfg.min_lr_ratio
    starts = [0, *train_cfg.lr_restarts]
    ends = [*train_cfg.lr_restarts, train_cfg.max_steps]

    def multiplier(global_step: int) -> float:
        segment = bisect.bisect_right(starts, global_step) - 1
        step, total = global_step - starts[segment], ends[segment] - starts[segment]
        decay_start = total - int(train_cfg.wsd_decay_fraction * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if train_cfg.schedule == "constant":
            return 1.0
        if train_cfg.schedule == "wsd":  # warmup-stable-decay: flat, then linear decay over the last fraction
            if step < decay_start:
                return 1.0
            return floor + (1 - floor) * max(0.0, (total - step) / max(1, total - decay_start))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def single_process_train_config(train_cfg, world_size: int):
    """ZeRO 1 and 2 partition optimizer states and gradients over ranks: in one process they partition nothing and
    only add DeepSpeed's bookkeeping (9-19% of a small model's step, issue 19), so such a run takes the ZeRO-0 path.
    ZeRO-3 (parameter partitioning, tested in one process too) and CPU optimizer offload keep their stage.
    Returns the train config to run with, and a log line when the stage changed (None otherwise)."""
    if world_size != 1 or train_cfg.zero_stage not in (1, 2) or train_cfg.offload_optimizer:
        return train_cfg, None
    import dataclasses

    note = (f"zero_stage={train_cfg.zero_stage} partitions nothing in one process: running the ZeRO-0 path "
            "(same numbers, none of ZeRO's per-step bookkeeping)")
    return dataclasses.replace(train_cfg, zero_stage=0), note


def trainer_clips_gradients(train_cfg) -> bool:
    """fp32 without ZeRO: no DeepSpeed optimizer checks the gradient norm for inf/NaN, so the trainer clips
    (one fused norm, torch's) and drops a non-finite update itself; DeepSpeed's own clipping is then off."""
    return train_cfg.zero_stage == 0 and train_cfg.dtype != "bf16"


def clip_gradients(module, max_norm: float) -> tuple[float, bool]:
    """Clip the module's gradients to max_norm (0: no clipping); returns (norm, whether it is finite on
    every rank). A non-finite norm leaves the gradients unclipped: the caller drops the update."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = all_ranks_true(bool(torch.isfinite(norm)))
    if finite and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm), finite


def deepspeed_config(train_cfg, micro_batch_size: int, unit_elements: int | None = None) -> dict:
    """DeepSpeed's config for the run; unit_elements (the largest decoder layer's parameter count) sizes ZeRO-3's
    buckets and live-parameter limits."""
    t = train_cfg
    zero = {"stage": t.zero_stage}
    if t.zero_stage == 3 and unit_elements:
        # DeepSpeed's defaults (a 5e8-element reduce bucket, 1e9 live / reuse-distance parameters) keep up to the
        # whole model's gathered weights and gradients on a rank; bound them by the largest unit that
        # materialize.py partitions (a decoder layer), as transformers' "auto" values bound them by hidden size.
        zero.update(reduce_bucket_size=unit_elements, stage3_prefetch_bucket_size=unit_elements,
                    stage3_max_live_parameters=2 * unit_elements, stage3_max_reuse_distance=2 * unit_elements)
    if t.offload_optimizer and t.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": 0.0 if trainer_clips_gradients(t) else t.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite gradient norm skips the update in bf16 too (fp32 ZeRO does it anyway)
        "bf16": {"enabled": t.dtype == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_model(train_cfg, model_config, tokenizer, init_from: str | None = None):
    """The model on the meta device (launch/materialize.py: build_engine gives each rank real storage for what
    it owns), or, with init_from, the weights of that HF folder in fp32 on every rank."""
    from seedlm.launch.materialize import build_meta_model

    model_config.pad_token_id = tokenizer.pad_token_id
    model_config.bos_token_id = tokenizer.bos_token_id
    model_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(train_cfg.seed)  # the same random stream on every rank for whatever draws from it later
    if init_from:  # fp32 master weights whatever dtype the folder holds
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(init_from, config=model_config, dtype=torch.float32,
                                                     attn_implementation=train_cfg.attn_implementation)
    else:
        model = build_meta_model(model_config, train_cfg.attn_implementation)
    apply_activation_checkpointing(model, train_cfg)
    return model


def apply_activation_checkpointing(model, train_cfg) -> None:
    """train.activation_checkpointing on the model's decoder layers: none, full (every layer recomputes its
    forward in backward) or selective (layers 0, N, 2N, ... with N = activation_checkpointing_every; the
    others keep their activations)."""
    mode = train_cfg.activation_checkpointing
    if mode == "none":
        return
    every = train_cfg.activation_checkpointing_every if mode == "selective" else 1
    # transformers counts only the GradientCheckpointingLayer blocks, i.e. the decoder layers
    model.activation_checkpointing_enable(every_n_layers=every)


def compile_blocks(model, backend: str = "inductor") -> int:
    """train.compile: torch.compile each decoder block in place (regional compilation, as torchtitan does).
    Blocks of one shape share their compiled code, so compile time does not grow with depth, and code outside
    the blocks (embeddings, loss) stays eager. Module.compile keeps the parameter names, so checkpoints and
    export see the usual layout. Returns how many blocks were compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]  # the decoder layers
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def build_engine(train_cfg, model, micro_batch_size: int, world_size: int, initialize: bool = True):
    """Expert parallelism (a no-op at size 1), this rank's weights, AdamW and the lr schedule inside a DeepSpeed
    engine. A meta-device model is materialised here, after EP chose this rank's experts and, under ZeRO-3,
    partitioned layer by layer; initialize=False skips the seeded init (a checkpoint will overwrite it).
    Returns (engine, scheduler, ep_info)."""
    import deepspeed

    from seedlm.launch.expert_parallel import (
        apply_expert_parallel,
        check_engine_expert_parallel,
        expert_parallel_engine_context,
        optimizer_param_groups,
    )
    from seedlm.launch.materialize import is_materialized, largest_unit_elements, materialize

    t = train_cfg
    ds_config = deepspeed_config(t, micro_batch_size, largest_unit_elements(model))
    # EP swaps each MoE block's experts for this rank's slice; the engine must be built inside the context so
    # DeepSpeed reduces expert gradients over the expert-data-parallel group.
    ep_info = apply_expert_parallel(model, t.expert_parallel_size, zero_stage=t.zero_stage)
    if not is_materialized(model):
        materialize(model, t.seed, initialize=initialize, zero3_config=ds_config if t.zero_stage == 3 else None)
    if t.compile:
        compile_blocks(model, t.compile_backend)
    # fused: one kernel per tensor updates in place; the default implementation allocates two temporaries the size
    # of the rank's fp32 partition (sqrt(exp_avg_sq) and the denominator) at every step
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, t.weight_decay, ep_info), lr=t.lr,
                                  betas=tuple(t.betas), eps=t.eps, fused=True)
    with expert_parallel_engine_context(ep_info):
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t)),
            config=ds_config,
        )
    check_engine_expert_parallel(engine, ep_info)
    if t.zero_stage == 0 and world_size == 1:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank only copies the gradients
    return engine, scheduler, ep_info


def step_without_update(engine) -> None:
    """An optimizer step that changes no weight (gradients are zero or dropped): lr 0 for this step, and
    AdamW's decoupled weight decay is scaled by lr too. Keeps DeepSpeed's micro-step bookkeeping in order."""
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    engine.step()  # the scheduler steps inside; its lr for the next step is restored below
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr


def optimizer_step(engine, scheduler, train_cfg, any_finite_micro_batch: bool) -> tuple[float | None, bool]:
    """Clip (where the trainer clips) and step; an update with a non-finite gradient norm is dropped.
    Returns (gradient norm or None, whether the update was skipped)."""
    grad_norm = None
    if any_finite_micro_batch and trainer_clips_gradients(train_cfg):
        grad_norm, finite_norm = clip_gradients(engine.module, train_cfg.grad_clip)
        if not finite_norm:
            engine.module.zero_grad()
            any_finite_micro_batch = False
    if not any_finite_micro_batch:
        step_without_update(engine)
        return grad_norm, True
    ds_skipped = engine.skipped_steps
    engine.step()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    if engine.skipped_steps > ds_skipped:  # DeepSpeed's ZeRO optimizers skip a non-finite update, scheduler too:
        scheduler.step()  # keep the schedule on the step count
        return grad_norm, True
    return grad_norm, grad_norm is not None and not math.isfinite(float(grad_norm))


def save_model_files_fn(engine, tokenizer, dist: DistInfo):
    """A function writing the HF config and tokenizer, no weights (rank 0 writes): with ds/ they are all that
    `seedlm export` needs, so a checkpoint needs no consolidated copy of the weights."""

    def save(path: Path) -> None:
        if dist.is_main:
            from seedlm.launch.export import use_umask_file_modes

            engine.module.config.save_pretrained(path)
            tokenizer.save_pretrained(path)
            use_umask_file_modes(path)

    return save


def save_hf_folder_fn(engine, tokenizer, dist: DistInfo, ep_info):
    """A function writing the consolidated HF folder of the current weights (rank 0 writes). It gathers the
    whole model on rank 0: checkpoints call it only every train.hf_interval steps."""

    def save(path: Path) -> None:
        import deepspeed

        module = engine.module
        if ep_info.enabled:
            from seedlm.launch.expert_parallel import gather_full_state_dict

            state = gather_full_state_dict(module, ep_info)
        elif engine.zero_optimization_stage() == 3:
            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().clone() for k, v in module.state_dict().items()} if dist.is_main else None
        else:
            state = module.state_dict() if dist.is_main else None
        if dist.is_main:
            from seedlm.launch.export import use_umask_file_modes

            module.save_pretrained(path, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(path)
            use_umask_file_modes(path)  # safetensors writes 0600; colleagues must be able to read a checkpoint

    return save
