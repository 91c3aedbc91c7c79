"""`seedlm train`: the training loop around a DeepSpeed engine.

Order of work, so that every user mistake surfaces before compute starts:
  1. process group (one process, torchrun, deepspeed launcher or srun);
  2. configs: model, data, tokenizer (trained on the run's sources when none is given) and vocabulary fit,
     resume compatibility;
  3. model (same seed on every rank), expert parallelism, DeepSpeed engine (ZeRO, AdamW groups, schedule);
  4. loop: micro-batches -> loss -> backward -> step; metrics, held-out loss, checkpoints, signals.
"""

from __future__ import annotations

import bisect
import logging
import math
import signal
import time
from pathlib import Path

import torch
import yaml

from eval import evaluate, flat_metrics, heldout_loss
from launch.checkpoint import (
    check_compatible,
    find_resume_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from launch.config import ConfigError, RunConfig, check_run_config
from launch.distributed import DistInfo, all_ranks_true, barrier, init_distributed
from launch.metrics import MetricsLogger, flops_per_token, measure_peak_flops, memory_stats, plot_loss_curve
from launch.synthetic import synthetic_run
from launch.synthetic import write_report as write_synthetic_report

logger = logging.getLogger("seedlm.train")
# batch keys handed to the model: labels are shifted inside it unless the batch carries shift_labels
# (synthetic tasks: targets aligned with the inputs)
MODEL_INPUTS = ("input_ids", "labels", "shift_labels", "position_ids")


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


def deepspeed_config(run: RunConfig, data_cfg) -> dict:
    t = run.train
    zero = {"stage": t.zero_stage}
    if t.offload_optimizer and t.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": data_cfg.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": 0.0 if trainer_clips_gradients(t) else t.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite gradient norm skips the update in bf16 too (fp32 ZeRO does it anyway)
        "bf16": {"enabled": t.dtype == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_tokenizer(run: RunConfig, data_cfg, dist: DistInfo, output_dir: Path):
    """An existing tokenizer folder, or one trained (on rank 0) from the run's training sources."""
    from data_pipeline import iter_texts, load_tokenizer, open_sources, train_tokenizer

    if run.tokenizer.path:
        return load_tokenizer(run.tokenizer.path), Path(run.tokenizer.path)
    tok_dir = output_dir / "tokenizer"
    if dist.is_main and not (tok_dir / "tokenizer_config.json").is_file():
        logger.info("training a %d-token %s tokenizer into %s", run.tokenizer.vocab_size, run.tokenizer.model_type,
                    tok_dir)
        texts = iter_texts(open_sources(data_cfg, "train"), seed=data_cfg.seed)
        train_tokenizer(texts, tok_dir, vocab_size=run.tokenizer.vocab_size, model_type=run.tokenizer.model_type,
                        max_chars=run.tokenizer.max_chars, max_docs=run.tokenizer.max_docs,
                        show_progress=run.train.progress_bar)
    barrier()
    return load_tokenizer(tok_dir), tok_dir


def build_model(run: RunConfig, model_config, tokenizer):
    from transformers import AutoModelForCausalLM

    model_config.pad_token_id = tokenizer.pad_token_id
    model_config.bos_token_id = tokenizer.bos_token_id
    model_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(run.train.seed)  # identical initial weights on every rank
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation=run.train.attn_implementation)
    if run.train.activation_checkpointing:
        model.activation_checkpointing_enable()
    return model


def in_lockstep(batches):
    """Yield batches while every rank still has one: with expert parallelism a forward is a collective, so
    all ranks must run the same number of them."""
    for batch in batches:
        if not all_ranks_true(True):
            return
        yield batch
    all_ranks_true(False)  # tell the ranks still holding a batch to stop


def step_without_update(engine) -> None:
    """An optimizer step that changes no weight (gradients are zero or dropped): lr 0 for this step, and
    AdamW's decoupled weight decay is scaled by lr too. Keeps DeepSpeed's micro-step bookkeeping in order."""
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    engine.step()  # the scheduler steps inside; its lr for the next step is restored below
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption, time limits): finish the current step, save, exit."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def save_hf_folder_fn(engine, tokenizer, dist: DistInfo, ep_info):
    """A function writing the consolidated HF folder of the current weights (rank 0 writes)."""

    def save(path: Path) -> None:
        import deepspeed

        module = engine.module
        if ep_info.enabled:
            from launch.expert_parallel import gather_full_state_dict

            state = gather_full_state_dict(module, ep_info)
        elif engine.zero_optimization_stage() == 3:
            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().clone() for k, v in module.state_dict().items()} if dist.is_main else None
        else:
            state = module.state_dict() if dist.is_main else None
        if dist.is_main:
            module.save_pretrained(path, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(path)

    return save


def train(run: RunConfig) -> dict:
    """Run training as configured; returns a summary dict (rank 0's numbers)."""
    from data_pipeline import DataConfig, build_dataloader, check_vocab_fits

    stop = StopSignal()  # first, so a preemption signal during start-up is a clean stop, not a killed rank
    dist = init_distributed()
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {dist.rank}] %(levelname)s %(message)s", force=True)
    t = run.train
    if t.cpu_threads:  # e.g. 1 on a small shared CPU machine, where a second thread mostly waits
        torch.set_num_threads(t.cpu_threads)
    output_dir = Path(t.output_dir)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()

    # --- configs and every check, before any compute
    model_config = check_run_config(run, dist.world_size)  # model fields, expert parallel, tokenizer fit
    # data.synthetic: generated task batches with aligned targets and a vocabulary tokenizer (launch/synthetic.py)
    synthetic = synthetic_run(run)
    data_cfg = DataConfig.from_dict(synthetic.data_section(run.data) if synthetic else run.data)
    checkpoint_root = output_dir / "checkpoints"
    resume_from = None
    if t.resume == "auto":
        resume_from = find_resume_checkpoint(checkpoint_root)
    elif t.resume != "none":
        resume_from = Path(t.resume)
        if not resume_from.is_dir():
            raise ConfigError(f"train.resume={t.resume!r}: no such checkpoint folder")
    if synthetic is not None:
        synthetic.check_run(run, output_dir / "tokenizer")
    if t.eval_tasks:  # a misspelt or malformed task fails now, not at the first eval_interval
        from eval.tasks import resolve_tasks

        resolve_tasks(t.eval_tasks, None)
    if synthetic is not None:
        tokenizer, tok_dir = synthetic.prepare_tokenizer(output_dir, dist.is_main)
    else:
        tokenizer, tok_dir = prepare_tokenizer(run, data_cfg, dist, output_dir)
    check_vocab_fits(tokenizer, model_config.vocab_size)
    data_cfg.tokenizer = str(tok_dir)
    if dist.is_main:
        resolved = run.to_dict()
        resolved["tokenizer"]["path"] = str(tok_dir)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    if synthetic is not None:
        train_loader = synthetic.loader(data_cfg.micro_batch_size, dist.rank, dist.world_size,
                                        grad_accum_steps=t.grad_accum_steps)
    else:
        train_loader = build_dataloader(data_cfg, tokenizer, dist.rank, dist.world_size)
    if resume_from is not None:
        import json

        check_compatible(json.loads((resume_from / "trainer_state.json").read_text()), dist.world_size,
                         t.expert_parallel_size, model_config.model_type)

    # --- model, expert parallelism, engine
    import deepspeed

    from launch.expert_parallel import (
        apply_expert_parallel,
        check_engine_expert_parallel,
        expert_parallel_engine_context,
        loss_with_global_balancing,
        optimizer_param_groups,
        sync_expert_weights_after_load,
    )

    model = build_model(run, model_config, tokenizer)
    # EP swaps each MoE block's experts for this rank's slice (a no-op at size 1); the engine must be built
    # inside the context so DeepSpeed reduces expert gradients over the expert-data-parallel group.
    ep_info = apply_expert_parallel(model, t.expert_parallel_size, zero_stage=t.zero_stage)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, t.weight_decay, ep_info), lr=t.lr,
                                  betas=tuple(t.betas), eps=t.eps)
    with expert_parallel_engine_context(ep_info):
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t)),
            config=deepspeed_config(run, data_cfg),
        )
    check_engine_expert_parallel(engine, ep_info)
    if t.zero_stage == 0 and dist.world_size == 1:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank only copies the gradients
    device = engine.device

    step, tokens_seen, skipped_steps = 0, 0, 0
    if resume_from is not None:
        trainer_state, rank_state = load_checkpoint(resume_from, engine, dist.rank)
        sync_expert_weights_after_load(engine, ep_info)
        step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        skipped_steps = trainer_state["skipped_steps"]
        train_loader.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        logger.info("resumed from %s at step %d", resume_from, step)

    def validation_loader():
        if synthetic is not None:
            return synthetic.loader(data_cfg.micro_batch_size, dist.rank, dist.world_size, split="validation")
        return build_dataloader(data_cfg, tokenizer, dist.rank, dist.world_size, split="validation")

    tokens_per_step = data_cfg.micro_batch_size * data_cfg.seq_len * t.grad_accum_steps * dist.world_size
    flops_token = flops_per_token(model_config, data_cfg.seq_len)
    dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
    peak = t.peak_tflops * 1e12 if t.peak_tflops else measure_peak_flops(device, dtype)
    metrics = MetricsLogger(output_dir, dist.is_main, t.tensorboard, t.wandb_project, run.to_dict())
    save_hf = save_hf_folder_fn(engine, tokenizer, dist, ep_info)

    def checkpoint(at_step: int) -> Path:
        trainer_state = {"step": at_step, "tokens_seen": tokens_seen, "skipped_steps": skipped_steps,
                         "world_size": dist.world_size, "expert_parallel_size": t.expert_parallel_size,
                         "model_type": model_config.model_type}
        rank_state = {"data": train_loader.state_dict(), "rng": rng_state()}
        return save_checkpoint(checkpoint_root, at_step, engine, trainer_state, rank_state, save_hf, t.keep_last,
                               dist.rank)

    progress = None
    if dist.is_main and t.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    batches = iter(train_loader)
    consecutive_nonfinite, last_saved, stop_reason = 0, resume_from, "max_steps"
    window_start, window_tokens = time.perf_counter(), 0
    engine.train()
    while step < t.max_steps:
        step_loss, step_aux, finite_micro = 0.0, 0.0, 0
        counts = None
        for _ in range(t.grad_accum_steps):
            batch = next(batches)
            out = engine(**{k: batch[k].to(device) for k in MODEL_INPUTS if k in batch})
            # global-batch balancing: expert counts summed over all ranks before the balancing loss is formed
            loss = loss_with_global_balancing(out, model_config)
            finite = all_ranks_true(bool(torch.isfinite(loss).item()))
            if finite:
                engine.backward(loss)
                step_loss += loss.item()
                step_aux += out.aux_loss.item() if out.aux_loss is not None else 0.0
                finite_micro += 1
                if out.expert_counts is not None:
                    counts = out.expert_counts if counts is None else counts + out.expert_counts
            else:
                # No NaN may reach the weights: this micro-batch contributes a zero gradient instead.
                engine.backward(sum((p * 0.0).sum() for p in engine.module.parameters() if p.requires_grad))
        bad_grads, grad_norm = False, None
        if finite_micro and trainer_clips_gradients(t):
            grad_norm, finite_norm = clip_gradients(engine.module, t.grad_clip)
            bad_grads = not finite_norm
            if bad_grads:
                engine.module.zero_grad()
        if finite_micro == 0 or bad_grads:
            step_without_update(engine)
            skipped_steps += 1
            consecutive_nonfinite += 1
        else:
            ds_skipped = engine.skipped_steps
            engine.step()
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            # DeepSpeed's ZeRO optimizers skip an update whose gradient norm is inf/NaN and count it
            if engine.skipped_steps > ds_skipped or (grad_norm is not None and not math.isfinite(float(grad_norm))):
                skipped_steps += 1
                consecutive_nonfinite += 1
                if engine.skipped_steps > ds_skipped:  # DeepSpeed skipped the scheduler too: keep it on `step`
                    scheduler.step()
            else:
                consecutive_nonfinite = 0
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        if counts is not None and getattr(model_config, "router_bias_update_rate", 0) > 0:
            if torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(counts)
            engine.module.update_router_biases(counts)

        if step % t.log_interval == 0 or step == t.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_sec = window_tokens / max(elapsed, 1e-9)
            record = {
                "step": step,
                "loss": step_loss / max(finite_micro, 1),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm or 0.0),
                "tokens_per_sec": tokens_per_sec,
                "mfu": tokens_per_sec * flops_token / (peak * dist.world_size),
                "tokens_seen": tokens_seen,
                "skipped_steps": skipped_steps,
                **memory_stats(device),
            }
            if counts is not None:
                record["aux_loss"] = step_aux / max(finite_micro, 1)
                load = counts / counts.sum(-1, keepdim=True).clamp(min=1)  # [L, E]
                record["expert_load_max_over_mean"] = (load.max(-1).values / load.mean(-1)).tolist()
            metrics.log(record)
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{tokens_per_sec:,.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if progress is not None:
            progress.update(1)

        if t.eval_interval and (step % t.eval_interval == 0 or step == t.max_steps):
            # the same first eval_batches of the validation split every time; token-weighted over all ranks
            held_out = heldout_loss(engine.module, in_lockstep(validation_loader()), max_batches=t.eval_batches)
            eval_record = {"step": step, "eval_loss": held_out["loss"]}
            if t.eval_tasks:  # every rank takes part: the harness splits the requests and gathers the results
                results = evaluate(engine.module, tokenizer, t.eval_tasks, limit=t.eval_limit, show_progress=False)
                eval_record.update(flat_metrics(results))
            if synthetic is not None:
                eval_record.update(synthetic.accuracy(engine.module))
            metrics.log(eval_record)
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in eval_record.items() if k != "step"))

        signalled = not all_ranks_true(stop.received is None)
        too_many_nonfinite = consecutive_nonfinite >= t.max_consecutive_nonfinite
        stop_here = step == t.stop_at_step
        if step % t.save_interval == 0 or step == t.max_steps or signalled or too_many_nonfinite or stop_here:
            last_saved = checkpoint(step)
        if stop_here:
            stop_reason = f"stop_at_step={step}"
            break
        if signalled:
            stop_reason = f"signal {stop.received or 'on another rank'}"
            break
        if too_many_nonfinite:
            stop_reason = f"{consecutive_nonfinite} non-finite steps in a row"
            logger.error("stopping: %s (checkpoint saved at step %d); lower the lr or check the data", stop_reason,
                         step)
            break

    if progress is not None:
        progress.close()
    synthetic_report = None
    if synthetic is not None and stop_reason == "max_steps":  # accuracy on every held-out sequence, CPU time
        synthetic_report = synthetic.final_report(engine.module, step)
        metrics.log(synthetic_report)
        if dist.is_main:
            write_synthetic_report(output_dir, synthetic_report)
            logger.info(synthetic.summary_line(synthetic_report))
    metrics.close()
    curve = None
    if dist.is_main:
        curve = plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss_curve.png",
                                title=f"{model_config.model_type} ({output_dir.name})")
    export_report = None
    if dist.is_main and t.export_at_end and last_saved is not None:
        from launch.export import export_and_sample

        export_report = export_and_sample(output_dir, t.sample_prompt)
    barrier()
    return {"export": export_report, "step": step, "tokens_seen": tokens_seen, "skipped_steps": skipped_steps,
            "stop_reason": stop_reason,
            "last_checkpoint": str(last_saved) if last_saved else None, "loss_curve": str(curve) if curve else None,
            "output_dir": str(output_dir), "rank": dist.rank,
            "synthetic": synthetic.summary_line(synthetic_report) if synthetic_report else None}
