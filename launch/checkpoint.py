"""Checkpoints of a run folder, written so that nothing is lost, and in the background.

    <output_dir>/checkpoints/
        step_00000020/
            ds/                       DeepSpeed engine state: weights, optimizer (ZeRO shards), scheduler
            model/                    the HF config and tokenizer (no weights): what export needs besides ds/
            hf/                       consolidated Hugging Face folder, only every train.hf_interval steps
            rank_00000.pt             this rank's data-pipeline state and RNG states
            trainer_state.json        step, tokens seen, counters, world and expert-parallel sizes
            manifest.json             every file with its size, written last inside the folder
        latest                        name of the newest complete step folder, replaced atomically

A save (CheckpointSaver) runs in two halves. Start, at a step boundary on every rank: each rank copies its
state to page-aligned host buffers (DeepSpeed's own save_checkpoint, its checkpoint engine swapped for one that
keeps a copy of each file's state instead of writing it) and a background thread writes them with O_DIRECT
(launch/direct_write.py) and fsyncs them into `step_XXXXXXXX.tmp/` while training goes on. Publish, at a
later step boundary once every rank's thread is done (learnt through a collective from the training thread,
never from the writer): rank 0 writes the manifest, renames the folder and only then replaces `latest`; older
checkpoints beyond keep_last are renamed `*.pruned` and deleted in a thread. At most one save is in flight;
the next save and the end of the run wait for it. train.async_save=false writes in the training thread.
A process killed mid-write leaves only a `.tmp` folder: `latest` still names the previous complete
checkpoint. On resume, a folder whose manifest is missing or whose files do not match it (a truncated
write) is skipped with a warning in favour of the previous complete one; a checkpoint written under another
world size, expert-parallel size or ZeRO stage is resharded on load (launch/reshard.py). The layout's names
are defined here only (CHECKPOINTS_DIR, LATEST_FILE, STEP_PREFIX, HF_DIR, MODEL_FILES_DIR); export and `seedlm eval`
find a run's checkpoint through `run_checkpoint` and `resolve_model_dir`, with the same manifest check as
resume; a checkpoint without hf/ is exported from ds/ (launch/export.py) when a reader needs one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from seedlm.launch.direct_write import aligned_storage, save_direct
from seedlm.launch.distributed import all_ranks_true, barrier
from seedlm.launch.host_memory import copy_bytes

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # inside a run folder (train.output_dir)
LATEST_FILE = "latest"  # inside CHECKPOINTS_DIR: the newest complete step folder's name
STEP_PREFIX = "step_"
PRUNED_SUFFIX = ".pruned"  # a step folder being deleted: renamed first, so no reader takes a half-deleted one
HF_DIR = "hf"  # inside a step folder: the consolidated Hugging Face folder (train.hf_interval)
MODEL_FILES_DIR = "model"  # inside a step folder: HF config and tokenizer, no weights
EXPORTS_DIR = "exports"  # inside a run folder: hf/ folders exported from ds/ for readers (resolve_model_dir)


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed into this run; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def prepare_output_dir(output_dir: Path) -> None:
    """Create the run folder and prove it writable now, rather than with a traceback at the first save."""
    probe = output_dir / f".seedlm-write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"train.output_dir={str(output_dir)!r} cannot be written ({err.strerror or err}); "
                              "choose a folder you can write, e.g. output_dir=runs/NAME") from None


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


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, a file-size limit); the previous one stays."""


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_failure_message(folder: Path, step: int, err: BaseException) -> str:
    """What went wrong writing a checkpoint, how much room is left, and what to do. torch.save reports a full
    disk as a bare C++ "iostream error", so free space below the previous checkpoint's size is named too."""
    import errno

    previous = find_resume_checkpoint(folder.parent)
    try:
        free = shutil.disk_usage(folder.parent).free
    except OSError:
        free = None
    needed = checkpoint_bytes(previous) if previous else None
    cause = str(err).strip()
    if getattr(err, "errno", None) == errno.ENOSPC:
        cause = "no space left on the device"
    elif free is not None and needed is not None and free < needed:
        cause = f"most likely no space left (a checkpoint takes {needed / 2**20:,.1f} MiB); the write said: {cause}"
    room = f"{free / 2**20:,.1f} MiB free" if free is not None else "free space unknown"
    kept = f"{previous.name} is still the latest checkpoint" if previous else "no earlier checkpoint exists"
    return (f"could not write the checkpoint of step {step} into {folder.parent} ({room}): {cause}. "
            f"The partial {folder.name} was removed and {kept}. Free some space (or lower train.keep_last, "
            "or point train.output_dir at a larger filesystem), then run the same command again to resume.")


def write_on_every_rank(write) -> BaseException | str | None:
    """Run write() on this rank; None when it succeeded on every rank, else this rank's exception (or, on a
    rank whose own write succeeded, a note that another rank failed). A full disk shows as OSError, or as
    RuntimeError from torch.save's C++ stream ("basic_ios::clear: iostream error")."""
    try:
        write()
        error = None
    except (OSError, RuntimeError) as err:
        error = err
    if all_ranks_true(error is None):
        return None
    return error or "another rank could not write its part of the checkpoint; its message says why"


class HostStaging:
    """Host buffers for the copies of one save, reused by the next save: the state has the same storages in the
    same order every time, so from the second save on the copy at the step boundary writes into memory that is
    already mapped instead of faulting in gigabytes of fresh pages (bench_checkpoint_save.py: the boundary is
    most of what a background save costs training). Reuse is safe because at most one save is in flight and
    CheckpointSaver.save waits for the previous write before copying."""

    def __init__(self):
        self.buffers: list[torch.UntypedStorage] = []
        self.used = 0  # buffers handed out in the current save

    def start_save(self) -> None:
        self.used = 0

    def buffer(self, nbytes: int) -> torch.UntypedStorage:
        """The next buffer of this save: the previous save's buffer at this place when it has this size."""
        i, self.used = self.used, self.used + 1
        if i < len(self.buffers) and self.buffers[i].nbytes() == nbytes:
            return self.buffers[i]
        buffer = aligned_storage(nbytes)  # page-aligned: written with O_DIRECT as it is
        if i < len(self.buffers):
            self.buffers[i] = buffer
        else:
            self.buffers.append(buffer)
        return buffer


def host_copy(obj, staging: HostStaging, copies: dict | None = None):
    """`obj` with every tensor copied to host memory (into `staging`'s buffers). A tensor that spans its whole
    storage is copied storage by storage: tensors sharing it (a tied weight, saved under two names as two
    tensor objects) share one copy, as torch.save of the original would. A tensor that is part of a larger
    storage (a parameter in DeepSpeed's flat ZeRO buffer) is copied alone, compactly: what DeepSpeed's
    clone_tensors_for_torch_save does before torch.save, so the engine skips that clone
    (CollectingCheckpointEngine.preserves_storage_sharing) and every byte is copied once, not twice (the clone
    was 0.07 of the 0.36 s a 2-rank expert-parallel save held the loop, by cProfile of one save). The bytes
    move by host_memory.copy_bytes (glibc's memmove on torch's threads, streaming past the caches above glibc's
    non-temporal threshold). The containers DeepSpeed's state dicts are made of are rebuilt; anything else is
    kept as it is."""
    copies = {} if copies is None else copies  # storage data_ptr, or a part's (ptr, offset, shape, ...) -> copy
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        storage = obj.untyped_storage()
        if obj.storage_offset() == 0 and obj.numel() * obj.element_size() == storage.nbytes():
            if storage.data_ptr() not in copies:
                as_bytes = lambda s: torch.empty(0, dtype=torch.uint8, device=s.device).set_(s)
                buffer = staging.buffer(storage.nbytes())
                copy_bytes(as_bytes(buffer), as_bytes(storage))
                copies[storage.data_ptr()] = buffer
            return torch.empty(0, dtype=obj.dtype).set_(copies[storage.data_ptr()], 0, obj.shape, obj.stride())
        part = (storage.data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype)
        if part not in copies:
            buffer = staging.buffer(obj.numel() * obj.element_size())
            copies[part] = copy_bytes(torch.empty(0, dtype=obj.dtype).set_(buffer, 0, obj.shape), obj)
        return copies[part]
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, host_copy(v, staging, copies)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(v, staging, copies) for v in obj)
    return obj


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_and_fsync(files: list[tuple[Path, object]]) -> None:
    """torch.save each (path, state) with O_DIRECT, fsynced (launch/direct_write.py), then fsync the folders."""
    for path, state in files:
        save_direct(state, path)
    for folder in sorted({path.parent for path, _ in files}):
        fsync_path(folder)


class CollectingCheckpointEngine:
    """Stands in for DeepSpeed's checkpoint engine during engine.save_checkpoint: each file's state is kept
    with its path (copied to host memory first when given `staging`, for a background thread to write). DeepSpeed
    still decides which files exist and what they hold, so ds/ is exactly what engine.load_checkpoint reads.
    (DeepSpeed 0.19.8's own DecoupledCheckpointEngine writes through FastCheckpointEngine, which needs the
    async-io op that CPU builds lack: "cannot find -laio" here.)"""

    name = "seedlm-host-copy"

    def __init__(self, staging: HostStaging | None):
        self.staging = staging
        self.files: list[tuple[Path, object]] = []

    def create(self, info):
        pass

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path):
        self.files.append((Path(path), host_copy(state_dict, self.staging) if self.staging is not None else state_dict))

    def commit(self, info):
        return True

    def is_data_parallel_writer(self, dp_rank):
        return dp_rank == 0

    def is_decoupled(self):
        return False

    def preserves_storage_sharing(self):
        # True: DeepSpeed clones the views of its flat buffers before save(), so that torch.save writes each
        # parameter's bytes only; host_copy does that itself while copying, so with staging it is skipped
        return self.staging is None


def engine_files(engine, folder: Path, staging: HostStaging | None) -> list[tuple[Path, object]]:
    """This rank's DeepSpeed files of a checkpoint into `folder`, as (path, state) pairs, not yet written;
    with `staging` the states are host copies that later training steps do not change."""
    copier, original = CollectingCheckpointEngine(staging), engine.checkpoint_engine
    engine.checkpoint_engine = copier
    try:
        engine.save_checkpoint(str(folder), tag="ds", save_latest=False)
    finally:
        engine.checkpoint_engine = original
    return copier.files


class PendingSave:
    """A checkpoint whose files this rank is writing (or has written) into `tmp`, not yet published."""

    def __init__(self, step: int, tmp: Path, final: Path, trainer_state: dict, files: list, background: bool):
        self.step, self.tmp, self.final, self.trainer_state = step, tmp, final, trainer_state
        self.error: BaseException | None = None
        self.write_seconds = 0.0  # how long the write and fsync took (benchmarks/bench_checkpoint_save.py)
        self.write_cpu_seconds = 0.0  # and the CPU the writing thread used meanwhile, user + system
        self.thread = None
        if background:
            self.thread = threading.Thread(target=self.write, args=(files,), name=f"seedlm-save-{step}", daemon=True)
            self.thread.start()
        else:
            self.write(files)

    def write(self, files) -> None:
        # At normal priority: an O_DIRECT write costs the CPU almost nothing, the thread mostly waits for the disk,
        # and at nice 19 each wake-up waited behind training's threads (3.3 s instead of 1.3 s for 2.4 GiB, so the
        # next save waited for it; bench_checkpoint_save.py)
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            write_and_fsync(files)
        except (OSError, RuntimeError) as err:  # a full disk; torch.save says "iostream error"
            self.error = err
        self.write_seconds, self.write_cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu_start

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


class CheckpointSaver:
    """Writes a run's checkpoints, at most one in flight (see the module docstring). Every method is called on
    every rank at the same step boundary: each may run collectives."""

    def __init__(self, checkpoint_root: Path, keep_last: int, rank: int, background: bool = True):
        self.root, self.keep_last, self.rank, self.background = Path(checkpoint_root), keep_last, rank, background
        self.pending: PendingSave | None = None
        self.staging = HostStaging() if background else None
        self.pruning: threading.Thread | None = None  # rank 0: the deletion of old checkpoints in flight
        self.write_seconds: list[float] = []  # per published save, how long its write took
        self.write_cpu_seconds: list[float] = []  # per published save, the CPU its write used

    def save(self, step: int, engine, trainer_state: dict, rank_state: dict, save_model_files,
             save_hf_folder=None) -> None:
        """Start the checkpoint of `step` (after finishing the one in flight). save_model_files(path) and
        save_hf_folder(path) are called on every rank and write on rank 0 only; hf/ gathers the whole model,
        so it is written here, in the training thread, and only when given."""
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from an interrupted save
            tmp.mkdir()
        barrier()
        files = []
        if self.staging is not None:
            self.staging.start_save()  # the previous save's buffers are free: wait() above joined its writer

        def copy_parts():
            files.extend(engine_files(engine, tmp, self.staging))
            rank_file = tmp / f"rank_{self.rank:05d}.pt"
            files.append((rank_file, host_copy(rank_state, self.staging) if self.staging is not None else rank_state))
            save_model_files(tmp / MODEL_FILES_DIR)
            if save_hf_folder is not None:
                save_hf_folder(tmp / HF_DIR)

        failure = write_on_every_rank(copy_parts)
        if failure is not None:
            self.abandon(tmp, step, failure)
        self.pending = PendingSave(step, tmp, final, trainer_state, files, self.background)
        if not self.background:
            self.wait()

    def poll(self) -> Path | None:
        """Publish the save in flight if every rank has written its files (a collective); its folder, or None."""
        if self.pending is None or not all_ranks_true(self.pending.done()):
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Wait for the save in flight on every rank and publish it; its folder (None when none was in flight).
        When any rank failed to write, every rank raises CheckpointWriteError and `latest` is unchanged."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        pending.join()
        self.write_seconds.append(pending.write_seconds)
        self.write_cpu_seconds.append(pending.write_cpu_seconds)

        def check_written():
            if pending.error is not None:
                raise pending.error

        def publish():  # rank 0, once every rank's files are in tmp and fsynced
            tmp, final = pending.tmp, pending.final
            (tmp / "trainer_state.json").write_text(json.dumps(pending.trainer_state, indent=1))
            fsync_path(tmp / "trainer_state.json")
            write_manifest(tmp)
            fsync_path(tmp / "manifest.json")
            fsync_path(tmp)
            if final.exists():  # a checkpoint of this very step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = self.root / (LATEST_FILE + ".tmp")
            latest_tmp.write_text(final.name + "\n")
            fsync_path(latest_tmp)
            os.replace(latest_tmp, self.root / LATEST_FILE)
            fsync_path(self.root)

        failure = write_on_every_rank(check_written)
        if failure is None:
            failure = write_on_every_rank(publish if self.rank == 0 else lambda: None)
        if failure is not None:
            self.abandon(pending.tmp, pending.step, failure)
        if self.rank == 0:
            if self.pruning is not None:
                self.pruning.join()  # one deletion at a time: the next one lists the folders afresh
            self.pruning = prune(self.root, self.keep_last, background=self.background)
            logger.info("saved checkpoint %s", pending.final)
        return pending.final

    def abandon(self, tmp: Path, step: int, failure) -> None:
        """Remove a failed save's partial folder on every rank's word and raise CheckpointWriteError."""
        message = write_failure_message(tmp, step, failure) if isinstance(failure, BaseException) else failure
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (self.root / (LATEST_FILE + ".tmp")).unlink(missing_ok=True)
        barrier()
        raise CheckpointWriteError(message)


def save_checkpoint(checkpoint_root: Path, step: int, engine, trainer_state: dict, rank_state: dict,
                    save_model_files, keep_last: int, rank: int, save_hf_folder=None) -> Path:
    """Write a checkpoint for `step` from every rank, in the calling thread; returns the final folder."""
    saver = CheckpointSaver(checkpoint_root, keep_last, rank, background=False)
    saver.save(step, engine, trainer_state, rank_state, save_model_files, save_hf_folder)
    return checkpoint_root / step_dir_name(step)


def step_folders(checkpoint_root: Path) -> list[Path]:
    if not checkpoint_root.is_dir():
        return []
    return [p for p in checkpoint_root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Step folders, newest first (folders being written or deleted excluded)."""
    folders = [p for p in step_folders(checkpoint_root) if not p.name.endswith((".tmp", PRUNED_SUFFIX))]
    return sorted(folders, key=lambda p: p.name, reverse=True)


def prune(checkpoint_root: Path, keep_last: int, background: bool = False) -> threading.Thread | None:
    """Delete all but the newest keep_last checkpoints (and what an interrupted prune left). Each is renamed at
    once; with `background`, the deletion (0.5 s per 2.4 GiB on ext4 here) runs in a thread, which is returned.
    It is not a daemon thread, so the interpreter waits for it at exit."""
    for old in complete_checkpoints(checkpoint_root)[keep_last:]:
        old.rename(old.with_name(old.name + PRUNED_SUFFIX))
    doomed = [p for p in step_folders(checkpoint_root) if p.name.endswith(PRUNED_SUFFIX)]

    def delete():
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)

    if not background:
        delete()
        return None
    thread = threading.Thread(target=delete, name="seedlm-prune")
    thread.start()
    return thread


def find_resume_checkpoint(checkpoint_root: Path) -> Path | None:
    """The checkpoint `latest` names, or, when it is incomplete, the newest complete one (with a warning)."""
    candidates = complete_checkpoints(checkpoint_root)
    latest_file = checkpoint_root / LATEST_FILE
    if latest_file.is_file():
        named = checkpoint_root / latest_file.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for folder in candidates:
        ok, why = is_complete(folder)
        if ok:
            return folder
        logger.warning("checkpoint %s is not usable: %s; falling back to an earlier one", folder, why)
    return None


def run_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """A run folder's complete checkpoint: the one of `step`, or by default the one resume would pick."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINTS_DIR}/ folder: is it a run folder (train.output_dir)?")
    folder = find_resume_checkpoint(root) if step is None else root / step_dir_name(step)
    if folder is None:
        raise CheckpointError(f"{root} holds no complete checkpoint")
    ok, why = is_complete(folder)
    if not ok:
        available = sorted(p.name for p in complete_checkpoints(root))
        raise CheckpointError(f"checkpoint {folder.name} is not usable: {why}; available: {available}")
    return folder


def resolve_model_dir(path: str | Path) -> Path:
    """The Hugging Face folder to load for `path`: the folder itself when it holds a config.json (an export),
    else the hf/ folder of the run folder's checkpoint that resume would pick (a truncated newest one is
    skipped with a warning). A checkpoint saved without hf/ (train.hf_interval) is exported from ds/ once,
    into <run>/exports/<step folder>, and that folder is returned."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not (path / CHECKPOINTS_DIR).is_dir():
        raise CheckpointError(f"{path} is neither a model folder (no config.json) nor a run folder (no "
                              f"{CHECKPOINTS_DIR}/); give an exported folder or a train.output_dir")
    return checkpoint_model_dir(path, run_checkpoint(path))


def checkpoint_model_dir(run_dir: Path, checkpoint: Path) -> Path:
    """The Hugging Face folder of one checkpoint of a run: its hf/, or its export into
    <run>/exports/<step folder>, made from ds/ the first time."""
    if (checkpoint / HF_DIR / "config.json").is_file():
        return checkpoint / HF_DIR
    exported = Path(run_dir) / EXPORTS_DIR / checkpoint.name
    if not (exported / "config.json").is_file():
        from seedlm.launch.export import export_checkpoint

        partial = exported.with_name(exported.name + ".tmp")
        shutil.rmtree(partial, ignore_errors=True)  # left over from an interrupted export
        logger.info("%s has no %s/ folder: exporting it from its DeepSpeed state into %s", checkpoint, HF_DIR,
                    exported)
        export_checkpoint(checkpoint, partial)
        os.replace(partial, exported)
    return exported


def check_compatible(folder: Path, world_size: int, expert_parallel_size: int, model_config) -> None:
    """Refuse, before compute and before anything is written, a checkpoint that cannot continue in this run:
    another model type or shape, or a data position that does not move to another number of ranks. Another
    world size, expert-parallel size, ZeRO stage or gradient accumulation is fine: load_checkpoint reshards."""
    from seedlm.launch.reshard import check_same_shapes, model_param_shapes, saved_param_shapes, saved_topology

    saved = json.loads((folder / "trainer_state.json").read_text())
    if saved["model_type"] != model_config.model_type:
        raise CheckpointError(
            f"cannot resume from this checkpoint: it holds a {saved['model_type']} model, this run builds "
            f"{model_config.model_type}. Resume with the model that wrote it, or start a fresh run (resume=none with "
            "a new output_dir); to continue training the weights elsewhere, `seedlm export` the run and start from "
            "the exported folder.")
    topology = saved_topology(folder, saved)
    check_same_shapes(saved_param_shapes(folder, topology), model_param_shapes(model_config))
    if topology.world_size != world_size:
        check_data_position_moves(torch.load(folder / "rank_00000.pt", weights_only=False)["data"],
                                  topology.world_size, world_size)


def check_data_position_moves(data_state, saved_world_size: int, world_size: int) -> None:
    """The hook for a data position resumed on another number of ranks. Prepared data's position (global rows
    consumed, data_pipeline/prepared.py) is the same on every rank and for any topology. A streaming position
    (data.sources: per-rank readers) or a generated task's (per-rank seeds) does not move yet: refused here;
    a loader whose state becomes topology-free is accepted by extending this check."""
    from seedlm.data_pipeline.loader import can_change_topology

    if can_change_topology(data_state):  # prepared rows consumed, or a streaming position Trainer.resume re-deals
        return
    raise CheckpointError(
        f"cannot resume from this checkpoint: it was written by {saved_world_size} ranks, this run has {world_size}, "
        "and its data position belongs to per-rank streams that do not move to another number of ranks "
        "(data.synthetic, or a data state saved by an older seedlm). Resume with "
        f"{saved_world_size} ranks (expert_parallel_size, zero_stage and grad_accum_steps may change), or train on "
        "prepared data (`seedlm data prepare`, then data.prepared=DIR), whose position holds for any number of ranks.")


def saved_data_states(folder: Path, world_size: int) -> list:
    """Every saved rank's data-pipeline state, in rank order: a streaming position moves to another topology
    only from all of them (data_pipeline/loader.py PackedDataLoader.load_state_dicts)."""
    return [torch.load(folder / f"rank_{r:05d}.pt", weights_only=False)["data"] for r in range(world_size)]


def load_checkpoint(folder: Path, engine, ep_info, rank: int, world_size: int) -> tuple[dict, dict]:
    """Restore the engine (weights, optimizer, scheduler) and return (trainer_state, this rank's state).

    The topology that wrote the checkpoint loads through DeepSpeed's own load_checkpoint; another world size,
    expert-parallel size or ZeRO stage through launch/reshard.py (exact in fp32). A rank the old run did not
    have takes rank 0's data position (the same on every rank with prepared data) and random state."""
    from seedlm.launch.expert_parallel import sync_expert_weights_after_load
    from seedlm.launch.reshard import load_resharded, saved_topology

    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    saved = saved_topology(folder, trainer_state)
    now = (world_size, ep_info.ep_size, engine.zero_optimization_stage())
    if (saved.world_size, saved.expert_parallel_size, saved.zero_stage) == now:
        load_path, _ = engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder / 'ds'}")
        sync_expert_weights_after_load(engine, ep_info)
    else:
        logger.info("resharding %s: written by %s, loading onto %d rank(s), expert_parallel_size %d, ZeRO %d",
                    folder.name, saved.describe(), *now)
        load_resharded(folder, engine, ep_info, saved)
    if saved.global_batch != engine.train_batch_size():
        logger.info("the global batch changes from %d to %d sequences at step %d (micro_batch_size x grad_accum_steps"
                    " x ranks); the run continues with the new batch", saved.global_batch,
                    engine.train_batch_size(), trainer_state["step"])
    rank_file = folder / f"rank_{rank if rank < saved.world_size else 0:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{folder} has no state for rank {rank} ({rank_file.name})")
    rank_state = torch.load(rank_file, weights_only=False)
    return trainer_state, rank_state
