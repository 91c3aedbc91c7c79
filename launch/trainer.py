"""`seedlm train`: the training loop around a DeepSpeed engine, in stages (torchtitan's Trainer shape).

    Trainer(run)          build: process group -> checks -> tokenizer -> data -> model -> engine -> resume;
                          every user mistake surfaces here, before compute starts
    trainer.train_step()  one optimizer step: micro-batches -> loss -> backward; non-finite handling,
                          clipping, optimizer and schedule (launch/engine.py)
    trainer.evaluate()    held-out loss, the configured tasks and the data's own task (a synthetic task's accuracy)
    trainer.checkpoint()  save (launch/checkpoint.py); signals and stop conditions decide when
    trainer.finish()      the data's closing evaluation, loss curve, export and report
    trainer.train()       the loop over those stages; returns the run's summary

What the run trains on (text or a generated task) is behind launch/training_data.py, so no stage branches
on it. Ctrl-C, SIGTERM and SIGUSR1 end the run at the next step boundary with a checkpoint.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from seedlm.launch.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointSaver,
    check_compatible,
    find_resume_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    rng_state,
    saved_data_states,
    set_rng_state,
)
from seedlm.launch.config import ConfigError, RunConfig, check_run_config
from seedlm.launch.distributed import PeerFailure, all_ranks_true, barrier, init_distributed
from seedlm.launch.engine import (
    build_engine,
    build_model,
    optimizer_step,
    save_hf_folder_fn,
    save_model_files_fn,
    single_process_train_config,
)
from seedlm.launch.host_memory import host_copy_line, keep_freed_blocks, set_mmap_threshold
from seedlm.launch.metrics import MetricsLogger, measure_peak_flops, memory_stats, plot_loss_curve
from seedlm.launch.training_data import training_data

logger = logging.getLogger("seedlm.train")
# batch keys handed to the model: labels are shifted inside it unless the batch carries shift_labels
# (synthetic tasks: targets aligned with the inputs)
MODEL_INPUTS = ("input_ids", "labels", "shift_labels", "position_ids")


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption, time limits) and Ctrl-C (SIGINT): finish the current step, save,
    exit. A second Ctrl-C exits at once (KeyboardInterrupt), losing the steps since the last checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C interrupts at once
            logger.warning("Ctrl-C: saving a checkpoint at the end of this step, then exiting "
                           "(Ctrl-C again to exit now without saving)")

    def restore(self) -> None:
        """Put back the handlers that were there before (train() may run inside a longer-lived process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def in_lockstep(batches):
    """Yield batches while every rank still has one: with expert parallelism a forward is a collective, so
    all ranks must run the same number of them."""
    for batch in batches:
        if not all_ranks_true(True):
            return
        yield batch
    all_ranks_true(False)  # tell the ranks still holding a batch to stop


@dataclass
class StepResult:
    loss: float  # mean over the finite micro-batches of every rank (the global batch)
    aux_loss: float
    grad_norm: float | None
    skipped: bool  # no update was applied (non-finite loss or gradients)
    expert_counts: torch.Tensor | None = None  # [L, E] tokens routed to each expert, summed over micro-batches


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    last_saved: Path | None = None
    window_start: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0


class Trainer:
    def __init__(self, run: RunConfig, stop: StopSignal | None = None):
        self.run = run
        self.stop = stop or StopSignal()
        self.dist = init_distributed()
        logging.basicConfig(level=logging.INFO if self.dist.is_main else logging.WARNING,
                            format=f"%(asctime)s [rank {self.dist.rank}] %(levelname)s %(message)s", force=True)
        self.t, note = single_process_train_config(run.train, self.dist.world_size)  # run.train stays as asked
        if note:
            logger.info(note)
        if self.t.cpu_threads:  # e.g. 1 on a small shared CPU machine, where a second thread mostly waits
            torch.set_num_threads(self.t.cpu_threads)
        if self.t.host_mmap_threshold is not None:
            logger.info(set_mmap_threshold(self.t.host_mmap_threshold))
        if self.t.host_allocator_cache:
            logger.info(keep_freed_blocks())
        self.output_dir = Path(self.t.output_dir)
        self.checkpoint_root = self.output_dir / CHECKPOINTS_DIR
        self.progress = Progress()
        self.build_checks()
        self.build_data()
        self.build_engine()
        self.resume()
        self.build_metrics()

    # ------------------------------------------------------------------ build

    def build_checks(self) -> None:
        """Every check that needs no tokenizer or model: output folder, model, data, parallelism, resume."""
        t = self.t
        # model fields, expert parallelism, tokenizer fit: the checks `--print-config` runs too
        self.model_config = check_run_config(self.run, self.dist.world_size)
        prepare_output_dir(self.output_dir)  # every rank: a node that cannot write it stops at once
        self.data = training_data(self.run)
        self.resume_from = None
        if t.resume == "auto":
            self.resume_from = find_resume_checkpoint(self.checkpoint_root)
        elif t.resume != "none":
            self.resume_from = Path(t.resume)
            if not self.resume_from.is_dir():
                raise ConfigError(f"train.resume={t.resume!r}: no such checkpoint folder")
        if self.resume_from is not None:
            check_compatible(self.resume_from, self.dist.world_size, t.expert_parallel_size, self.model_config)
        self.data.check(self.run, self.output_dir)
        if t.eval_tasks:  # a misspelt or malformed task fails now, not at the first eval_interval
            from seedlm.eval.tasks import resolve_tasks

            resolve_tasks(t.eval_tasks, None)

    def build_data(self) -> None:
        """Tokenizer (checked against the model's vocabulary), the resolved config file, the training loader."""
        from seedlm.data_pipeline import check_vocab_fits

        self.tokenizer, tok_dir = self.data.prepare_tokenizer(self.output_dir, self.dist)
        check_vocab_fits(self.tokenizer, self.model_config.vocab_size)
        self.data.config.tokenizer = str(tok_dir)
        if self.dist.is_main:
            resolved = self.run.to_dict()
            resolved["tokenizer"]["path"] = str(tok_dir)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.train_loader = self.data.train_loader(self.tokenizer, self.dist, self.t.grad_accum_steps)

    def build_engine(self) -> None:
        init_from = self.t.init_from if self.resume_from is None else None  # a checkpoint, when there is one, wins
        if self.t.init_from:
            logger.info("initial weights from %s", init_from or f"the checkpoint {self.resume_from} (resuming)")
        model = build_model(self.t, self.model_config, self.tokenizer, init_from)
        self.engine, self.scheduler, self.ep_info = build_engine(self.t, model, self.data.config.micro_batch_size,
                                                                 self.dist.world_size,
                                                                 initialize=self.resume_from is None)
        self.device = self.engine.device

    def resume(self) -> None:
        """Weights, optimizer, schedule, data position and RNG from the checkpoint chosen in build_checks, on this
        run's topology (world size, expert-parallel size, ZeRO stage, grad accumulation: resharded if another)."""
        if self.resume_from is None:
            return
        trainer_state, rank_state = load_checkpoint(self.resume_from, self.engine, self.ep_info, self.dist.rank,
                                                    self.dist.world_size)
        p = self.progress
        p.step, p.tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        p.skipped_steps, p.last_saved = trainer_state["skipped_steps"], self.resume_from
        if hasattr(self.train_loader, "load_state_dicts"):  # streaming: readers re-dealt from every rank's state
            self.train_loader.load_state_dicts(saved_data_states(self.resume_from, trainer_state["world_size"]))
        else:  # prepared data (global rows consumed) or a generated task
            self.train_loader.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        logger.info("resumed from %s at step %d", self.resume_from, p.step)

    def build_metrics(self) -> None:
        t, cfg = self.t, self.data.config
        self.tokens_per_step = cfg.micro_batch_size * cfg.seq_len * t.grad_accum_steps * self.dist.world_size
        self.flops_per_token = self.model_config.flops_per_token(cfg.seq_len)  # MFU's numerator
        dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
        self.peak_flops = t.peak_tflops * 1e12 if t.peak_tflops else measure_peak_flops(self.device, dtype)
        self.metrics = MetricsLogger(self.output_dir, self.dist.is_main, t.tensorboard, t.wandb_project,
                                     self.run.to_dict())
        if self.resume_from is not None:
            self.metrics.log_resume(self.progress.step, self.resume_from)
        self.save_hf = save_hf_folder_fn(self.engine, self.tokenizer, self.dist, self.ep_info)
        self.save_model_files = save_model_files_fn(self.engine, self.tokenizer, self.dist)
        self.saver = CheckpointSaver(self.checkpoint_root, self.t.keep_last, self.dist.rank, self.t.async_save)
        if self.t.async_save and self.device.type == "cpu":
            logger.info(host_copy_line())

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> StepResult:
        """grad_accum_steps micro-batches, then one optimizer step. A non-finite loss on any rank contributes a
        zero gradient (no NaN may reach the weights); a non-finite gradient norm drops the update."""
        from seedlm.launch.expert_parallel import loss_with_global_balancing

        engine, total_loss, total_aux, finite_micro, counts = self.engine, 0.0, 0.0, 0, None
        for micro in range(self.t.grad_accum_steps):
            # engine.step() runs once per optimizer step here, so DeepSpeed's own micro-step count cannot tell the
            # last micro-batch (it would update every grad_accum_steps-th call): say which backward ends the batch
            engine.set_gradient_accumulation_boundary(micro == self.t.grad_accum_steps - 1)
            batch = next(batches)
            out = engine(**{k: batch[k].to(self.device) for k in MODEL_INPUTS if k in batch})
            # global-batch balancing: expert counts summed over all ranks before the balancing loss is formed
            loss = loss_with_global_balancing(out, self.model_config)
            if all_ranks_true(bool(torch.isfinite(loss).item())):
                engine.backward(loss)
                total_loss += loss.item()
                total_aux += out.aux_loss.item() if out.aux_loss is not None else 0.0
                finite_micro += 1
                if out.expert_counts is not None:
                    counts = out.expert_counts if counts is None else counts + out.expert_counts
            else:
                engine.backward(sum((p * 0.0).sum() for p in engine.module.parameters() if p.requires_grad))
        grad_norm, skipped = optimizer_step(engine, self.scheduler, self.t, finite_micro > 0)
        if counts is not None and getattr(self.model_config, "router_bias_update_rate", 0) > 0:
            if torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(counts)
            engine.module.update_router_biases(counts)
        if self.dist.world_size > 1:  # the logged loss is the global batch's: every rank's micro-batches
            sums = torch.tensor([total_loss, total_aux, finite_micro], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            total_loss, total_aux, finite_micro = sums.tolist()
        n = max(finite_micro, 1)
        return StepResult(total_loss / n, total_aux / n, grad_norm, skipped, counts)

    def count_step(self, result: StepResult) -> None:
        p = self.progress
        p.step += 1
        p.tokens_seen += self.tokens_per_step
        p.window_tokens += self.tokens_per_step
        if result.skipped:
            p.skipped_steps += 1
            p.consecutive_nonfinite += 1
        else:
            p.consecutive_nonfinite = 0

    def log_step(self, result: StepResult) -> dict:
        """The step's row in metrics.jsonl: throughput over the steps since the last logged one."""
        p = self.progress
        tokens_per_sec = p.window_tokens / max(time.perf_counter() - p.window_start, 1e-9)
        record = {
            "step": p.step,
            "loss": result.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(result.grad_norm or 0.0),
            "tokens_per_sec": tokens_per_sec,
            "mfu": tokens_per_sec * self.flops_per_token / (self.peak_flops * self.dist.world_size),
            "tokens_seen": p.tokens_seen,
            "skipped_steps": p.skipped_steps,
            **memory_stats(self.device),
        }
        if result.expert_counts is not None:
            record["aux_loss"] = result.aux_loss
            load = result.expert_counts / result.expert_counts.sum(-1, keepdim=True).clamp(min=1)  # [L, E]
            record["expert_load_max_over_mean"] = (load.max(-1).values / load.mean(-1)).tolist()
        self.metrics.log(record)
        p.window_start, p.window_tokens = time.perf_counter(), 0
        return record

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self) -> dict:
        """The same first eval_batches of the validation split every time (token-weighted over all ranks),
        the configured tasks (every rank takes part) and the data's own task."""
        from seedlm.eval import evaluate, flat_metrics, heldout_loss

        model, step = self.engine.module, self.progress.step
        validation = in_lockstep(self.data.validation_loader(self.tokenizer, self.dist))
        record = {"step": step, "eval_loss": heldout_loss(model, validation, max_batches=self.t.eval_batches)["loss"]}
        if self.t.eval_tasks:
            results = evaluate(model, self.tokenizer, self.t.eval_tasks, limit=self.t.eval_limit, show_progress=False)
            record.update(flat_metrics(results))
        record.update(self.data.evaluate(model))
        self.metrics.log(record)
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
        return record

    def checkpoint(self, final: bool = False) -> None:
        """Start saving this step (train.async_save: written in the background, published by
        checkpoint_published at a later step boundary); hf/ too every train.hf_interval steps and at the end."""
        p, dist, t = self.progress, self.dist, self.t
        trainer_state = {"step": p.step, "tokens_seen": p.tokens_seen, "skipped_steps": p.skipped_steps,
                         "world_size": dist.world_size, "expert_parallel_size": t.expert_parallel_size,
                         "model_type": self.model_config.model_type}
        rank_state = {"data": self.train_loader.state_dict(), "rng": rng_state()}
        with_hf = t.hf_interval > 0 and (final or p.step % t.hf_interval == 0)
        self.checkpoint_published(wait=True)  # at most one save in flight
        self.saver.save(p.step, self.engine, trainer_state, rank_state, self.save_model_files,
                        self.save_hf if with_hf else None)
        self.checkpoint_published(wait=not t.async_save)

    def checkpoint_published(self, wait: bool = False) -> None:
        """Publish the save in flight once every rank has written it (a collective; every rank calls it at the
        same step boundary); with `wait`, wait for it first."""
        folder = self.saver.wait() if wait else self.saver.poll()
        if folder is not None:
            self.progress.last_saved = folder

    def stop_reason(self) -> str | None:
        """Why the run stops after this step (None: it goes on). Decided the same way on every rank."""
        p, t = self.progress, self.t
        signalled = not all_ranks_true(self.stop.received is None)
        if p.step == t.stop_at_step:
            return f"stop_at_step={p.step}"
        if signalled:
            return f"signal {self.stop.received or 'on another rank'}"
        if p.consecutive_nonfinite >= t.max_consecutive_nonfinite:
            logger.error("stopping: %d non-finite steps in a row (saving a checkpoint at step %d); lower the lr "
                         "or check the data", p.consecutive_nonfinite, p.step)
            return f"{p.consecutive_nonfinite} non-finite steps in a row"
        return "max_steps" if p.step >= t.max_steps else None

    # ------------------------------------------------------------------ the loop and the end

    def train(self) -> dict:
        """Run training as configured; returns a summary dict (rank 0's numbers)."""
        t, p = self.t, self.progress
        bar = None
        if self.dist.is_main and t.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True)
        batches, reason = iter(self.train_loader), "max_steps" if p.step >= t.max_steps else None
        self.engine.train()
        try:
            while reason is None:
                result = self.train_step(batches)
                self.count_step(result)
                if p.step % t.log_interval == 0 or p.step == t.max_steps:
                    record = self.log_step(result)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                        tok_s=f"{record['tokens_per_sec']:,.0f}")
                if bar is not None:
                    bar.update(1)
                if t.eval_interval and (p.step % t.eval_interval == 0 or p.step == t.max_steps):
                    self.evaluate()
                reason = self.stop_reason()
                if p.step % t.save_interval == 0 or reason is not None:
                    self.checkpoint(final=reason is not None)
                else:
                    self.checkpoint_published()
        except Exception as err:
            if self.dist.world_size > 1 and (self.stop.received or isinstance(err, torch.distributed.DistError)):
                raise PeerFailure(self.dist.rank, self.stop.received, err, p.last_saved) from err
            raise
        finally:
            if bar is not None:
                bar.close()
        return self.finish(reason)

    def finish(self, reason: str) -> dict:
        """The data's closing evaluation (a completed run only), loss curve, export; the run's summary."""
        p, dist, report = self.progress, self.dist, None
        self.checkpoint_published(wait=True)  # the run's last save is complete before anything reads it
        if reason == "max_steps":
            report = self.data.final_report(self.engine.module, p.step)
        if report is not None:
            self.metrics.log(report)
            if dist.is_main:
                self.data.write_report(self.output_dir, report)
                logger.info(self.data.summary_line(report))
        self.metrics.close()
        curve = export = None
        if dist.is_main:
            curve = plot_loss_curve(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curve.png",
                                    title=f"{self.model_config.model_type} ({self.output_dir.name})")
            if self.t.export_at_end and p.last_saved is not None:
                from seedlm.launch.export import export_and_sample

                export = export_and_sample(self.output_dir, self.t.sample_prompt)
        barrier()
        return {"export": export, "step": p.step, "tokens_seen": p.tokens_seen, "skipped_steps": p.skipped_steps,
                "stop_reason": reason, "last_checkpoint": str(p.last_saved) if p.last_saved else None,
                "loss_curve": str(curve) if curve else None, "output_dir": str(self.output_dir),
                "rank": dist.rank, "synthetic": self.data.summary_line(report) if report else None}


def train(run: RunConfig) -> dict:
    """Build the trainer and run it (the `seedlm train` entry point); returns rank 0's summary."""
    stop = StopSignal()  # first, so a preemption signal during start-up is a clean stop, not a killed rank
    try:
        return Trainer(run, stop).train()
    finally:
        stop.restore()
