"""Resume a checkpoint on another topology: world size, expert-parallel (EP) size, ZeRO stage, gradient accumulation.

A checkpoint's `ds/` folder is DeepSpeed's own layout for the topology that wrote it:

    ZeRO 0      mp_rank_00_model_states.pt: full weights, and the torch AdamW state per parameter index
    ZeRO 1/2    zero_pp_rank_<r>_mp_rank_00_optim_states.pt: rank r's slice of each param group's flat fp32
                buffer and of its AdamW moments, with `param_slice_mappings` (name -> where its piece lies);
                a param group marked `moe` is partitioned over the expert-data-parallel group, and its expert
                tensors are the EP rank's slice [E / ep, ...] under the single-process name
    ZeRO 3      zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt: every parameter split in ceil(numel / W)
                pieces, rank r's pieces concatenated in `param_shapes` order

DeepSpeed's universal checkpoint (`ds_to_universal`) reads ZeRO 1/2/3 the same way but not ZeRO 0, and it
concatenates a `moe` group's pieces over all ranks, which mixes the experts of different EP ranks under one
name. So the conversion is written here, per parameter name, in memory:

    full_training_state(folder)      every rank reads the old files and rebuilds, per name, the full fp32
                                     weight, exp_avg, exp_avg_sq and AdamW step (experts [E, ...], EP slices
                                     concatenated in EP-rank order)
    load_full_training_state(...)    writes this rank's part of them into the new engine: the module weights,
                                     the fp32 master partition and the moments of ZeRO 1/2/3 (through the
                                     engine's own fragment maps), or the torch optimizer's state under ZeRO 0

Values are copied, never recomputed: the resumed fp32 state equals the saved one bit for bit. The lr schedule
is topology-free (its step count), and so are the engine's step counters. Each rank holds the full fp32 state
(12 bytes per parameter) while loading; a rank reading only the pieces that overlap its new partition is the
next step at scale.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from seedlm.launch.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")
DS_TAG = "ds"  # the engine's folder inside a step folder (checkpoint.py saves with tag="ds")


class ReshardError(CheckpointError):
    """A checkpoint that cannot be mapped onto this run; the message says why and what to do."""


@dataclass
class SavedTopology:
    """What wrote a checkpoint, read from its own files."""

    world_size: int
    expert_parallel_size: int
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int
    bf16: bool

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def describe(self) -> str:
        return (f"{self.world_size} rank(s), expert_parallel_size {self.expert_parallel_size}, ZeRO {self.zero_stage},"
                f" grad_accum_steps {self.grad_accum_steps}")


def _load(path: Path) -> dict:
    # mmap: a field read from a large file costs only the bytes read
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _model_states_file(folder: Path) -> Path:
    ds = folder / DS_TAG
    zero3 = ds / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return zero3 if zero3.is_file() else ds / "mp_rank_00_model_states.pt"


def saved_topology(folder: Path, trainer_state: dict) -> SavedTopology:
    states = _load(_model_states_file(folder))
    cfg = states["ds_config"]
    return SavedTopology(world_size=trainer_state["world_size"],
                         expert_parallel_size=trainer_state["expert_parallel_size"],
                         zero_stage=int(cfg["zero_optimization"]["stage"]),
                         micro_batch_size=int(cfg["train_micro_batch_size_per_gpu"]),
                         grad_accum_steps=int(cfg["gradient_accumulation_steps"]),
                         bf16=bool(cfg.get("bf16", {}).get("enabled", False)))


def is_expert_name(name: str) -> bool:
    from seedlm.launch.expert_parallel import EXPERT_PARAM_NAMES

    return ".experts." in name and name.rsplit(".", 1)[-1] in EXPERT_PARAM_NAMES


def saved_param_shapes(folder: Path, topology: SavedTopology) -> dict[str, tuple[int, ...]]:
    """The single-process shape of every trainable parameter the checkpoint holds (experts [E, ...])."""
    states = _load(_model_states_file(folder))
    if topology.zero_stage == 0:
        shapes, seen = {}, set()
        for name, tensor in states["module"].items():  # a tied weight (lm_head) is saved under both names, once
            storage = tensor.untyped_storage().data_ptr()
            if name not in states["buffer_names"] and storage not in seen:
                shapes[name] = tuple(tensor.shape)
                seen.add(storage)
        return shapes
    shapes = {}
    for group in states["param_shapes"]:
        for name, shape in group.items():
            shape = tuple(shape)
            if topology.zero_stage < 3 and is_expert_name(name):
                shape = (shape[0] * topology.expert_parallel_size, *shape[1:])
            shapes[name] = shape
    return shapes


def model_param_shapes(model_config) -> dict[str, tuple[int, ...]]:
    """The single-process shape of every parameter of the model model_config builds (on the meta device: free)."""
    from seedlm.launch.materialize import build_meta_model

    return {n: tuple(p.shape) for n, p in build_meta_model(model_config).named_parameters()}


def check_same_shapes(saved: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Refuse another model: a parameter missing, added, or of another shape cannot be resharded."""
    problems = [f"{n}: saved {list(saved[n])}, this run {list(expected[n])}"
                for n in expected if n in saved and tuple(saved[n]) != tuple(expected[n])]
    problems += [f"{n} is not in the checkpoint" for n in expected if n not in saved]
    problems += [f"{n} is in the checkpoint but not in this model" for n in saved if n not in expected]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ReshardError(
            "cannot resume from this checkpoint: it holds another model shape (" + "; ".join(problems[:3]) + more +
            "). Weights cannot be mapped onto another shape: resume with the model settings (model, "
            "model_overrides) that wrote it, or start a new run in a new output_dir.")


# ---------------------------------------------------------------------------------------------------------
# Reading: the old topology's files -> full fp32 state per parameter name


def _zero0_state(folder: Path, names_by_group: dict[str, list[str]]) -> dict[str, dict]:
    """ZeRO 0 (one rank): the module holds the fp32 weights; the optimizer's state is keyed by parameter index,
    in the order of its param groups (optimizer_param_groups' order, named by the group's name)."""
    states = _load(folder / DS_TAG / "mp_rank_00_model_states.pt")
    optimizer = states["optimizer"]
    full = {}
    for group in optimizer["param_groups"]:
        names = names_by_group.get(group.get("name"))
        if names is None or len(names) != len(group["params"]):
            raise ReshardError(f"the optimizer state in {folder} has a param group {group.get('name')!r} of "
                               f"{len(group['params'])} parameters that this model does not have; it cannot be "
                               "resharded: resume on the topology that wrote it")
        for name, index in zip(names, group["params"]):
            state = optimizer["state"][index]
            full[name] = {"fp32": states["module"][name].float().clone(), "step": state["step"].clone(),
                          **{k: state[k].clone() for k in MOMENTS}}
    return full


def _zero12_state(folder: Path, topology: SavedTopology) -> dict[str, dict]:
    """ZeRO 1/2: each parameter's pieces lie in the flat partitions of consecutive ranks of its partition group
    (all ranks; for a `moe` group the ranks of one EP rank, r % ep). Concatenated in rank order they are the
    parameter, flattened: the layout `ds_to_universal` reads, kept apart per EP rank."""
    shapes = {}
    for group in _load(folder / DS_TAG / "mp_rank_00_model_states.pt")["param_shapes"]:
        shapes.update({n: tuple(s) for n, s in group.items()})  # experts: the EP slice's shape
    ep = topology.expert_parallel_size
    pieces: dict[tuple[str, int], dict[str, list]] = {}  # (name, EP rank or 0) -> key -> pieces in rank order
    steps: dict[str, torch.Tensor] = {}
    for rank in range(topology.world_size):
        sd = _load(folder / DS_TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            moe = bool(base["param_groups"][g].get("moe", False))
            flat = {"fp32": sd["single_partition_of_fp32_groups"][g], **{k: base["state"][g][k] for k in MOMENTS}}
            for name, where in mapping.items():
                slot = pieces.setdefault((name, rank % ep if moe else 0), {k: [] for k in flat})
                for key, tensor in flat.items():
                    slot[key].append(tensor.narrow(0, where.start, where.numel).clone())
                steps[name] = base["state"][g]["step"].clone()
    full: dict[str, dict] = {}
    for name in steps:
        slices = [pieces[(name, e)] for e in range(ep) if (name, e) in pieces]
        full[name] = {key: torch.cat([torch.cat(s[key]).view(shapes[name]) for s in slices])
                      for key in ("fp32", *MOMENTS)}  # experts: EP slices along the expert dim
        full[name]["step"] = steps[name]
    return full


def _zero3_state(folder: Path, topology: SavedTopology) -> dict[str, dict]:
    """ZeRO 3: rank r holds piece r (ceil(numel / W) elements, the last padded) of every parameter, in
    `param_shapes` order across its sub-groups; the moments have the same layout (zero_to_fp32's walk)."""
    world = topology.world_size
    flat_of_rank, shapes, step = [], {}, None
    for rank in range(world):
        sd = _load(folder / DS_TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        state = sd["optimizer_state_dict"]["state"]
        flat_of_rank.append({"fp32": torch.cat(list(sd["fp32_flat_groups"])),
                             **{k: torch.cat([state[g][k] for g in sorted(state)]) for k in MOMENTS}})
        step = state[min(state)]["step"]
        if rank == 0:
            for group in _load(folder / DS_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]:
                shapes.update({n: tuple(s) for n, s in group.items()})
    full, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        piece = math.ceil(numel / world)
        full[name] = {key: torch.cat([flat[key].narrow(0, offset, piece) for flat in flat_of_rank])[:numel]
                      .clone().view(shape) for key in ("fp32", *MOMENTS)}
        full[name]["step"] = step.clone()
        offset += piece
    return full


def full_training_state(folder: Path, topology: SavedTopology, names_by_group: dict[str, list[str]]) -> dict:
    """{parameter name: {"fp32", "exp_avg", "exp_avg_sq": full tensors, "step": AdamW's step}} of a checkpoint,
    whatever topology wrote it. names_by_group: this model's names per optimizer group (ZeRO 0 needs them)."""
    if topology.bf16 and topology.zero_stage == 0:
        raise ReshardError("a bf16 checkpoint written without ZeRO (DeepSpeed's bf16 optimizer layout) cannot be "
                           "resharded yet: resume on the topology that wrote it, or `seedlm export` it and start a "
                           "new run with train.init_from")
    if topology.zero_stage == 0:
        return _zero0_state(folder, names_by_group)
    if topology.zero_stage in (1, 2):
        return _zero12_state(folder, topology)
    return _zero3_state(folder, topology)


def names_by_optimizer_group(module) -> dict[str, list[str]]:
    """This model's parameter names in the order of optimizer_param_groups without expert parallelism (the
    order a one-rank ZeRO-0 optimizer state is indexed in)."""
    from seedlm.launch.expert_parallel import optimizer_param_groups

    name_of = {id(p): n for n, p in module.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in optimizer_param_groups(module, 0.0)}


# ---------------------------------------------------------------------------------------------------------
# Writing: full state -> this rank's part of the new engine


def _local(name: str, tensor: torch.Tensor, ep_info) -> torch.Tensor:
    """This rank's part of a full tensor: its EP slice of an expert tensor, else all of it."""
    if ep_info.enabled and name in ep_info.expert_param_names:
        n = ep_info.num_local_experts
        return tensor[ep_info.ep_rank * n : (ep_info.ep_rank + 1) * n]
    return tensor


def _into_zero0(engine, full: dict, ep_info) -> None:
    optimizer = engine.optimizer
    for name, param in engine.module.named_parameters():
        saved = full[name]
        with torch.no_grad():
            param.copy_(_local(name, saved["fp32"], ep_info))
        optimizer.state[param] = {"step": saved["step"].clone(),
                                  **{k: _local(name, saved[k], ep_info).clone() for k in MOMENTS}}


def _into_zero12(engine, full: dict, ep_info) -> None:
    """Through each parameter's `_hp_mapping` (DeepSpeed's fragment map: where this rank's piece of the
    parameter lies in the param group's flat fp32 partition). The moments are created here: ZeRO 1/2 create
    AdamW's state lazily, at the first step."""
    zero = engine.optimizer
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    for params, master in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        moments = {k: torch.zeros_like(master) for k in MOMENTS}
        step = None
        for param in params:
            name = name_of[id(param)]
            saved = {k: _local(name, full[name][k], ep_info) for k in ("fp32", *MOMENTS)}
            with torch.no_grad():
                param.copy_(saved["fp32"])  # the module weight (lp): every rank holds all of it under ZeRO 1/2
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # no piece of this parameter lies in this rank's partition
                continue
            lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
            for key, target in (("fp32", master), *moments.items()):
                target.data.narrow(0, hp.start, hp.numel).copy_(saved[key].reshape(-1).narrow(0, lp.start, lp.numel))
            step = full[name]["step"]
        if step is None:  # an empty partition: the step of any parameter (they are all equal)
            step = next(iter(full.values()))["step"]
        zero.optimizer.state[master] = {"step": step.clone(), **moments}


def _into_zero3(engine, full: dict) -> None:
    """Each sub-group's flat fp32 partition and moments are this rank's pieces of its parameters, in order
    (DeepSpeed's own universal-checkpoint load for ZeRO 3); the module's partitions are then copied from them."""
    import torch.distributed as dist

    zero = engine.optimizer
    rank, world = dist.get_rank(group=zero.dp_process_group), dist.get_world_size(group=zero.dp_process_group)
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    for sub, params in enumerate(zero.fp16_groups):
        master = zero.fp32_partitioned_groups_flat[sub]
        flats = {k: torch.zeros_like(master) for k in ("fp32", *MOMENTS)}
        offset, step = 0, None
        for param in params:
            name = name_of[id(param)]
            piece = math.ceil(param.ds_numel / world)
            for key, flat in flats.items():
                whole = full[name][key].reshape(-1)
                padded = torch.cat([whole, whole.new_zeros(piece * world - whole.numel())])
                flat.narrow(0, offset, piece).copy_(padded.narrow(0, rank * piece, piece))
            offset += piece
            step = full[name]["step"]
        master.data.copy_(flats["fp32"])
        zero.optimizer.state[master] = {"step": step.clone(), **{k: flats[k] for k in MOMENTS}}
        zero.fp16_partitioned_groups_flat[sub].data.copy_(master.data)
        for partitioned, value in zip(zero.fp16_partitioned_groups[sub],
                                      zero.unflatten(zero.fp16_partitioned_groups_flat[sub],
                                                     zero.fp16_partitioned_groups[sub])):
            partitioned.data = value.data


def _set_schedule_and_counters(engine, folder: Path) -> None:
    """The lr schedule by its step count (the number of param groups differs between topologies: each group's
    lr is recomputed as LambdaLR does, base lr x multiplier) and the engine's step counters."""
    states = _load(_model_states_file(folder))
    scheduler, saved = engine.lr_scheduler, states["lr_scheduler"]
    scheduler.last_epoch, scheduler._step_count = saved["last_epoch"], saved["_step_count"]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    engine.global_steps, engine.skipped_steps = states["global_steps"], states["skipped_steps"]
    engine.global_samples = states["global_samples"]


def _buffers(engine, folder: Path) -> None:
    """Persistent buffers (e.g. router biases) are the same on every rank: rank 0's module file holds them."""
    states = _load(_model_states_file(folder))
    own = dict(engine.module.named_buffers())
    with torch.no_grad():
        for name in states.get("buffer_names") or []:
            if name in own and name in states["module"]:
                own[name].copy_(states["module"][name])


def load_resharded(folder: Path, engine, ep_info, topology: SavedTopology) -> None:
    """Load a checkpoint written under another topology into this run's engine (weights, optimizer moments,
    schedule, counters); exact in fp32."""
    full = full_training_state(folder, topology, names_by_optimizer_group(engine.module))
    stage = engine.zero_optimization_stage()
    if stage == 0:
        if not isinstance(engine.optimizer, torch.optim.Optimizer) or engine.bfloat16_enabled():
            raise ReshardError("resharding into a bf16 run without ZeRO is not supported yet: use zero_stage 1 or 2")
        _into_zero0(engine, full, ep_info)
    elif stage in (1, 2):
        _into_zero12(engine, full, ep_info)
    else:
        _into_zero3(engine, full)
    _buffers(engine, folder)
    _set_schedule_and_counters(engine, folder)
