"""Every rank builds only what it owns: the model is constructed on the meta device, then each rank
materialises and initialises its own parameters, module by module.

    model = build_meta_model(config, attn_implementation)     # shapes only: no weight memory, no init time
    ep_info = apply_expert_parallel(model, ep_size)           # swaps in this rank's expert slice, still meta
    materialize(model, seed, zero3_config=...)                # real tensors for what this rank holds

Initialisation is seeded per module from the run seed and the module's name, and per expert from the
seed, the module's name and the expert's *global* index. A parameter's initial value therefore depends on
nothing but (seed, name): one seed gives bit-identical initial weights under any world size, ZeRO stage
or expert-parallel size, and an expert-parallel rank initialises only its experts. The values come from
the model's own `_init_weights` (the scheme a user gets from `from_config`), only the random stream differs.

Under ZeRO-3 each decoder layer (and the embeddings, final norm and LM head) is handed to DeepSpeed's
`zero.Init` right after it is initialised, so a rank holds its partition plus at most one whole layer,
instead of the whole model before `deepspeed.initialize` partitions it. Every rank still draws the random
numbers of every layer (CPU generators cannot skip ahead): memory is per rank, init time is not (yet).

Buffers are built for real at construction (accelerate's `init_empty_weights` keeps them off the meta
device): the rotary tables and router biases are small and their values come from the constructors.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from seedlm.launch.host_memory import release_free_heap
from seedlm.model.moe import Experts

DECODER_LAYER = re.compile(r"^(.*\.layers\.\d+)(\.|$)")  # the HF convention for a decoder layer's name


def build_meta_model(model_config, attn_implementation: str | None = None):
    """The causal LM for model_config with every parameter on the meta device (buffers real), tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attn_implementation)
    model.tie_weights()  # one meta parameter for the embedding and a tied LM head: materialised once
    return model


def is_materialized(model: nn.Module) -> bool:
    return not any(p.is_meta for p in model.parameters())


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a module (or expert) name: stable across processes and versions."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def initialize_module(model, name: str, module: nn.Module, seed: int) -> None:
    """Initialise `module`'s own parameters as the model's `_init_weights` does, from a generator seeded by
    (seed, name). Experts are initialised one expert at a time, seeded by the expert's global index, so an
    expert-parallel slice holds the same values as the same experts of the whole model."""
    with torch.random.fork_rng(devices=[]):
        if isinstance(module, Experts):
            first = getattr(module, "ep_rank", 0) * module.num_experts  # global index of the first local expert
            std = model.config.initializer_range
            with torch.no_grad():
                for local in range(module.num_experts):
                    torch.manual_seed(module_seed(seed, f"{name}.{first + local}"))
                    module.gate_up_proj[local].normal_(0.0, std)  # [2I, H], as init_moe_weights does for all E
                    module.down_proj[local].normal_(0.0, std)  # [H, I]
        else:
            torch.manual_seed(module_seed(seed, name))
            model._init_weights(module)


def unit_of(name: str) -> str:
    """What is materialised (and partitioned) as one piece: a decoder layer, or any other module on its own."""
    layer = DECODER_LAYER.match(name)
    return layer.group(1) if layer else name


def largest_unit_elements(model: nn.Module) -> int:
    """Parameters of the largest unit (tied parameters counted once): what a ZeRO-3 rank holds whole at a time."""
    sizes: dict[str, int] = {}
    for name, param in model.named_parameters():  # named_parameters yields a shared parameter once
        unit = unit_of(name.rsplit(".", 1)[0])
        sizes[unit] = sizes.get(unit, 0) + getattr(param, "ds_numel", param.numel())  # ZeRO-3: whole size
    return max(sizes.values(), default=0)


def materialize(model: nn.Module, seed: int, initialize: bool = True, zero3_config: dict | None = None) -> nn.Module:
    """Give every meta parameter of `model` real storage on the CPU, one module at a time, and initialise it
    (initialize=False leaves it uninitialised: a checkpoint overwrites every parameter on resume).

    zero3_config: DeepSpeed's config dict for a ZeRO-3 run; each decoder layer (or other top-level module) is
    then partitioned with `deepspeed.zero.Init` as soon as it is complete. Python attributes of a parameter
    (expert parallelism's `allreduce` / `group_name` marks) carry over; a parameter shared by two modules
    (tied embeddings) is materialised and initialised once, by the first module that holds it."""
    real_of: dict[int, nn.Parameter] = {}  # id(meta parameter) -> its real replacement
    pending: list[nn.Parameter] = []  # materialised parameters of the current unit, not yet partitioned
    unit = None
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_meta or id(p) in real_of]
        if not own:
            continue
        module_unit = unit_of(name)
        if module_unit != unit:
            partition(pending, zero3_config)
            pending, unit = [], module_unit
        fresh = False
        for param_name, meta in own:
            if id(meta) not in real_of:
                real = nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype), requires_grad=meta.requires_grad)
                real.__dict__.update(meta.__dict__)
                real_of[id(meta)] = real
                pending.append(real)
                fresh = True
            module._parameters[param_name] = real_of[id(meta)]
        if fresh and initialize:
            initialize_module(model, name, module, seed)
    partition(pending, zero3_config)
    return model


def partition(params: list[nn.Parameter], zero3_config: dict | None) -> None:
    """ZeRO-3: hand the parameters to DeepSpeed, which keeps this rank's partition and frees the rest."""
    if zero3_config is None or not params:
        return
    import deepspeed

    holder = nn.Module()  # zero.Init converts the parameters of a module in place: exactly these ones
    for i, param in enumerate(params):
        holder.register_parameter(f"p{i}", param)
    # mem_efficient_linear=False: no global patch of F.linear, the same forward as DeepSpeed's engine path
    deepspeed.zero.Init(module=holder, config_dict_or_path=zero3_config, mem_efficient_linear=False)
    release_free_heap()
