"""Checkpoints of a run folder, written so that nothing is lost.

    <output_dir>/checkpoints/
        step_00000020/
            ds/                       DeepSpeed engine state: weights, optimizer (ZeRO shards), scheduler
            hf/                       consolidated Hugging Face folder (config, safetensors, tokenizer)
            rank_00000.pt             this rank's data-pipeline state and RNG states
            trainer_state.json        step, tokens seen, counters, world and expert-parallel sizes
            manifest.json             every file with its size, written last inside the folder
        latest                        name of the newest complete step folder, replaced atomically

A checkpoint is written into `step_XXXXXXXX.tmp/` by all ranks, then rank 0 writes the manifest,
renames the folder and only then replaces `latest`; the previous checkpoint stays valid until the new
one is complete. On resume, a folder whose manifest is missing or whose files do not match it (a
truncated write) is skipped with a warning in favour of the previous complete one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from launch.distributed import barrier

logger = logging.getLogger(__name__)

STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed into this run; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_manifest(folder: Path) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / "manifest.json")


def is_complete(folder: Path) -> tuple[bool, str]:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False, "no manifest.json (the write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        return False, f"unreadable manifest.json ({err})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return False, f"{name} is missing"
        if path.stat().st_size != size:
            return False, f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
    return True, ""


def save_checkpoint(
    checkpoint_root: Path,
    step: int,
    engine,
    trainer_state: dict,
    rank_state: dict,
    save_hf_folder,
    keep_last: int,
    rank: int,
) -> Path:
    """Write a checkpoint for `step` from every rank; returns the final folder.

    save_hf_folder(path) writes the consolidated HF folder; it is called on every rank (gathering may need
    all of them) and must write files on rank 0 only."""
    final = checkpoint_root / step_dir_name(step)
    tmp = checkpoint_root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted save
        tmp.mkdir()
    barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    save_hf_folder(tmp / "hf")
    barrier()
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        write_manifest(tmp)
        if final.exists():  # a checkpoint of this very step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = checkpoint_root / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, checkpoint_root / "latest")
        prune(checkpoint_root, keep_last)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Step folders, newest first (temporary folders excluded)."""
    if not checkpoint_root.is_dir():
        return []
    folders = [p for p in checkpoint_root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted((p for p in folders if not p.name.endswith(".tmp")), key=lambda p: p.name, reverse=True)


def prune(checkpoint_root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(checkpoint_root)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(checkpoint_root: Path) -> Path | None:
    """The checkpoint `latest` names, or, when it is incomplete, the newest complete one (with a warning)."""
    candidates = complete_checkpoints(checkpoint_root)
    latest_file = checkpoint_root / "latest"
    if latest_file.is_file():
        named = checkpoint_root / latest_file.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for folder in candidates:
        ok, why = is_complete(folder)
        if ok:
            return folder
        logger.warning("checkpoint %s is not usable: %s; falling back to an earlier one", folder, why)
    return None


def check_compatible(saved: dict, world_size: int, expert_parallel_size: int, model_type: str) -> None:
    problems = []
    if saved["world_size"] != world_size:
        problems.append(f"it was written by {saved['world_size']} ranks, this run has {world_size}")
    if saved["expert_parallel_size"] != expert_parallel_size:
        problems.append(
            f"its expert_parallel_size is {saved['expert_parallel_size']}, this run's is {expert_parallel_size}"
        )
    if saved["model_type"] != model_type:
        problems.append(f"it holds a {saved['model_type']} model, this run builds {model_type}")
    if problems:
        raise CheckpointError(
            "cannot resume from this checkpoint: " + "; ".join(problems) + ". Resume with the same launch "
            "settings, or start a fresh run (resume=none with a new output_dir); to continue training the "
            "weights elsewhere, `seedlm export` the run and start from the exported folder."
        )


def load_checkpoint(folder: Path, engine, rank: int) -> tuple[dict, dict]:
    """Restore the engine (weights, optimizer, scheduler) and return (trainer_state, this rank's state)."""
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    load_path, _ = engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {folder / 'ds'}")
    rank_file = folder / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{folder} has no state for rank {rank} ({rank_file.name})")
    rank_state = torch.load(rank_file, weights_only=False)
    return trainer_state, rank_state
