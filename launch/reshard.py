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
name. So the conversion is written here, per parameter name:

    saved_training_state(folder)     an index of where each parameter's pieces lie in the old files (fp32
                                     weight, exp_avg, exp_avg_sq, AdamW step; experts as [E, ...], EP slices in
                                     EP-rank order); the files are memory-mapped and nothing is read yet
    load_resharded(...)              each rank reads from it only the elements it now owns and writes them into
                                     the new engine: the fp32 master partition and moments of ZeRO 1/2/3
                                     (through the engine's own fragment maps), the module weights (whole under
                                     ZeRO 0-2, which replicate them), or the torch optimizer's state under ZeRO 0

Values are copied, never recomputed: the resumed fp32 state equals the saved one bit for bit. The lr schedule
is topology-free (its step count), and so are the engine's step counters. While loading, a rank holds its new
partition and touches about 1/W of the old files' pages (tests/test_reshard.py measures the peak), never the
whole model's fp32 state.
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
# Reading: the old topology's files -> an index of where each parameter's pieces lie


@dataclass
class _Piece:
    """Elements [start, start + numel) of a parameter's full flat tensor lie in `flats[key]` at `offset`."""

    start: int
    numel: int
    flats: dict  # key ("fp32", "exp_avg", "exp_avg_sq") -> _Chain
    offset: int


class _Chain:
    """Tensors read as one flat tensor without concatenating them (a ZeRO-3 rank's sub-group partitions)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = [t.reshape(-1) for t in tensors]
        self.starts = [0]
        for t in self.tensors:
            self.starts.append(self.starts[-1] + t.numel())

    def narrow(self, offset: int, numel: int) -> list[torch.Tensor]:
        views = []
        for tensor, begin, end in zip(self.tensors, self.starts, self.starts[1:]):
            lo, hi = max(offset, begin), min(offset + numel, end)
            if lo < hi:
                views.append(tensor.narrow(0, lo - begin, hi - lo))
        return views


class SavedTrainingState:
    """Where each parameter's fp32 weight, AdamW moments and step lie in a checkpoint's files, whatever
    topology wrote them. The files are memory-mapped and nothing is copied until `read`, which returns only
    the elements asked for: a rank loading onto a new partition touches ~1/W of the old files and allocates
    only its own part."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], pieces: dict[str, list[_Piece]],
                 steps: dict[str, torch.Tensor]):
        self.shapes, self.pieces, self.steps = shapes, pieces, steps

    def names(self) -> list[str]:
        return list(self.shapes)

    def read(self, name: str, key: str, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """Elements [start, start + numel) of the parameter's flattened full tensor (experts [E, ...]), as a
        new 1-D tensor."""
        total = math.prod(self.shapes[name])
        numel = total - start if numel is None else numel
        if start < 0 or start + numel > total:
            raise ValueError(f"{name}: elements [{start}, {start + numel}) of {total}")
        views = []
        for piece in self.pieces[name]:
            lo, hi = max(start, piece.start), min(start + numel, piece.start + piece.numel)
            if lo < hi:
                views += piece.flats[key].narrow(piece.offset + lo - piece.start, hi - lo)
        out = views[0].clone() if len(views) == 1 else torch.cat(views) if views else torch.empty(0)
        if out.numel() != numel:
            raise ReshardError(f"{name}: the checkpoint holds {out.numel()} of elements [{start}, {start + numel});"
                               " its files are incomplete")
        return out.float()

    def full(self, name: str) -> dict:
        """{"fp32", "exp_avg", "exp_avg_sq": the whole tensor, "step"}: for tools and tests, not for loading."""
        return {**{k: self.read(name, k).view(self.shapes[name]) for k in ("fp32", *MOMENTS)},
                "step": self.steps[name].clone()}


def _zero0_index(folder: Path, names_by_group: dict[str, list[str]]) -> SavedTrainingState:
    """ZeRO 0 (one rank): the module holds the fp32 weights; the optimizer's state is keyed by parameter index,
    in the order of its param groups (optimizer_param_groups' order, named by the group's name)."""
    states = _load(folder / DS_TAG / "mp_rank_00_model_states.pt")
    optimizer = states["optimizer"]
    shapes, pieces, steps = {}, {}, {}
    for group in optimizer["param_groups"]:
        names = names_by_group.get(group.get("name"))
        if names is None or len(names) != len(group["params"]):
            raise ReshardError(f"the optimizer state in {folder} has a param group {group.get('name')!r} of "
                               f"{len(group['params'])} parameters that this model does not have; it cannot be "
                               "resharded: resume on the topology that wrote it")
        for name, index in zip(names, group["params"]):
            state, weight = optimizer["state"][index], states["module"][name]
            shapes[name], steps[name] = tuple(weight.shape), state["step"]
            flats = {"fp32": _Chain([weight]), **{k: _Chain([state[k]]) for k in MOMENTS}}
            pieces[name] = [_Piece(0, weight.numel(), flats, 0)]
    return SavedTrainingState(shapes, pieces, steps)


def _zero12_index(folder: Path, topology: SavedTopology) -> SavedTrainingState:
    """ZeRO 1/2: each parameter's pieces lie in the flat partitions of consecutive ranks of its partition group
    (all ranks; for a `moe` group the ranks of one EP rank, r % ep). Concatenated in rank order they are the
    parameter, flattened (the layout `ds_to_universal` reads), and an expert tensor's EP slices follow each other
    in EP-rank order."""
    slice_shapes = {}
    for group in _load(folder / DS_TAG / "mp_rank_00_model_states.pt")["param_shapes"]:
        slice_shapes.update({n: tuple(s) for n, s in group.items()})  # experts: the EP slice's shape
    ep = topology.expert_parallel_size
    shapes, pieces, steps = {}, {}, {}
    filled: dict[tuple[str, int], int] = {}  # (name, EP rank or 0) -> elements placed so far
    for rank in range(topology.world_size):
        sd = _load(folder / DS_TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            moe = bool(base["param_groups"][g].get("moe", False))
            flats = {"fp32": _Chain([sd["single_partition_of_fp32_groups"][g]]),
                     **{k: _Chain([base["state"][g][k]]) for k in MOMENTS}}
            for name, where in mapping.items():
                slot, shape = rank % ep if moe else 0, slice_shapes[name]
                shapes[name] = (shape[0] * ep, *shape[1:]) if moe else shape
                start = slot * math.prod(shape) + filled.get((name, slot), 0)
                pieces.setdefault(name, []).append(_Piece(start, where.numel, flats, where.start))
                filled[(name, slot)] = filled.get((name, slot), 0) + where.numel
                steps[name] = base["state"][g]["step"]
    return SavedTrainingState(shapes, pieces, steps)


def _zero3_index(folder: Path, topology: SavedTopology) -> SavedTrainingState:
    """ZeRO 3: rank r holds piece r (ceil(numel / W) elements, the last padded) of every parameter, in
    `param_shapes` order across its sub-groups; the moments have the same layout (zero_to_fp32's walk)."""
    world = topology.world_size
    chains, step = [], None
    for rank in range(world):
        sd = _load(folder / DS_TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        state = sd["optimizer_state_dict"]["state"]
        chains.append({"fp32": _Chain(list(sd["fp32_flat_groups"])),
                       **{k: _Chain([state[g][k] for g in sorted(state)]) for k in MOMENTS}})
        step = state[min(state)]["step"]
    shapes = {}
    for group in _load(folder / DS_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]:
        shapes.update({n: tuple(s) for n, s in group.items()})
    pieces, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        piece = math.ceil(numel / world)
        pieces[name] = [_Piece(r * piece, min(piece, numel - r * piece), chains[r], offset)
                        for r in range(world) if r * piece < numel]
        offset += piece
    return SavedTrainingState(shapes, pieces, dict.fromkeys(shapes, step))


def saved_training_state(folder: Path, topology: SavedTopology,
                         names_by_group: dict[str, list[str]]) -> SavedTrainingState:
    """The index of a checkpoint's fp32 weights, AdamW moments and steps, whatever topology wrote it.
    names_by_group: this model's names per optimizer group (ZeRO 0 needs them)."""
    if topology.bf16 and topology.zero_stage == 0:
        raise ReshardError("a bf16 checkpoint written without ZeRO (DeepSpeed's bf16 optimizer layout) cannot be "
                           "resharded yet: resume on the topology that wrote it, or `seedlm export` it and start a "
                           "new run with train.init_from")
    if topology.zero_stage == 0:
        return _zero0_index(folder, names_by_group)
    if topology.zero_stage in (1, 2):
        return _zero12_index(folder, topology)
    return _zero3_index(folder, topology)


def names_by_optimizer_group(module) -> dict[str, list[str]]:
    """This model's parameter names in the order of optimizer_param_groups without expert parallelism (the
    order a one-rank ZeRO-0 optimizer state is indexed in)."""
    from seedlm.launch.expert_parallel import optimizer_param_groups

    name_of = {id(p): n for n, p in module.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in optimizer_param_groups(module, 0.0)}


# ---------------------------------------------------------------------------------------------------------
# Writing: this rank's part of the saved state -> the new engine


def _local_range(name: str, saved: SavedTrainingState, ep_info) -> tuple[int, int, tuple[int, ...]]:
    """(start, numel, shape) of this rank's part of a full tensor: its EP slice of an expert tensor, else all."""
    shape = saved.shapes[name]
    if ep_info.enabled and name in ep_info.expert_param_names:
        n = ep_info.num_local_experts
        per_expert = math.prod(shape[1:])
        return ep_info.ep_rank * n * per_expert, n * per_expert, (n, *shape[1:])
    return 0, math.prod(shape), shape


def _into_zero0(engine, saved: SavedTrainingState, ep_info) -> None:
    optimizer = engine.optimizer
    for name, param in engine.module.named_parameters():
        start, numel, shape = _local_range(name, saved, ep_info)
        with torch.no_grad():
            param.copy_(saved.read(name, "fp32", start, numel).view(shape))
        optimizer.state[param] = {"step": saved.steps[name].clone(),
                                  **{k: saved.read(name, k, start, numel).view(shape) for k in MOMENTS}}


def _into_zero12(engine, saved: SavedTrainingState, ep_info) -> None:
    """Through each parameter's `_hp_mapping` (DeepSpeed's fragment map: where this rank's piece of the
    parameter lies in the param group's flat fp32 partition), reading only that piece of the moments. The
    moments are created here: ZeRO 1/2 create AdamW's state lazily, at the first step."""
    zero = engine.optimizer
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    for params, master in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        moments = {k: torch.zeros_like(master) for k in MOMENTS}
        step = None
        for param in params:
            name = name_of[id(param)]
            start, numel, shape = _local_range(name, saved, ep_info)
            weight = saved.read(name, "fp32", start, numel)  # every rank holds all of it (lp) under ZeRO 1/2
            with torch.no_grad():
                param.copy_(weight.view(shape))
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # no piece of this parameter lies in this rank's partition
                continue
            lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
            master.data.narrow(0, hp.start, hp.numel).copy_(weight.narrow(0, lp.start, lp.numel))
            for key, target in moments.items():
                target.narrow(0, hp.start, hp.numel).copy_(saved.read(name, key, start + lp.start, lp.numel))
            step = saved.steps[name]
        if step is None:  # an empty partition: the step of any parameter (they are all equal)
            step = next(iter(saved.steps.values()))
        zero.optimizer.state[master] = {"step": step.clone(), **moments}


def _into_zero3(engine, saved: SavedTrainingState) -> None:
    """Each sub-group's flat fp32 partition and moments are this rank's pieces of its parameters, in order
    (DeepSpeed's own universal-checkpoint load for ZeRO 3); the module's partitions are then copied from them."""
    import torch.distributed as dist

    zero = engine.optimizer
    rank, world = dist.get_rank(group=zero.dp_process_group), dist.get_world_size(group=zero.dp_process_group)
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    for sub, params in enumerate(zero.fp16_groups):
        master = zero.fp32_partitioned_groups_flat[sub]
        existing = zero.optimizer.state.get(master, {})  # ZeRO 3 creates AdamW's state up front: fill it in place
        moments = {k: existing[k] if k in existing else torch.zeros_like(master) for k in MOMENTS}
        offset, step = 0, None
        for param in params:
            name = name_of[id(param)]
            piece = math.ceil(param.ds_numel / world)
            numel = max(0, min(piece, param.ds_numel - rank * piece))  # the last pieces are padding
            for key, flat in (("fp32", master.data), *moments.items()):
                if numel:
                    flat.narrow(0, offset, numel).copy_(saved.read(name, key, rank * piece, numel))
                flat.narrow(0, offset + numel, piece - numel).zero_()
            offset += piece
            step = saved.steps[name]
        zero.optimizer.state[master] = {"step": step.clone(), **moments}
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
    saved = saved_training_state(folder, topology, names_by_optimizer_group(engine.module))
    stage = engine.zero_optimization_stage()
    if stage == 0:
        if not isinstance(engine.optimizer, torch.optim.Optimizer) or engine.bfloat16_enabled():
            raise ReshardError("resharding into a bf16 run without ZeRO is not supported yet: use zero_stage 1 or 2")
        _into_zero0(engine, saved, ep_info)
    elif stage in (1, 2):
        _into_zero12(engine, saved, ep_info)
    else:
        _into_zero3(engine, saved)
    _buffers(engine, folder)
    _set_schedule_and_counters(engine, folder)
