"""Run configuration: a YAML preset plus dotted `key=value` overrides, validated into typed dataclasses.

    model: gated_moe_tiny            # a preset under configs/models, a YAML path, or a mapping with model_type
    model_overrides: {}              # config fields over the preset
    tokenizer: {path: null, vocab_size: 4096}   # path of an existing tokenizer, else one is trained
    data: {...}                      # data_pipeline.DataConfig fields
    train: {...}                     # TrainConfig fields

Overrides address any field (`train.lr=1e-3`, `data.seq_len=128`, `model_overrides.num_experts=4`); a
few everyday ones also work at the top level (`max_steps=20`, see TOP_LEVEL_ALIASES). An unknown key is
refused with the closest valid one; a value of the wrong type says what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seedlm.launch.presets import PRESET_DIR

TOP_LEVEL_ALIASES = {
    "output_dir": "train.output_dir",
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "zero_stage": "train.zero_stage",
    "expert_parallel_size": "train.expert_parallel_size",
    "save_interval": "train.save_interval",
    "resume": "train.resume",
    "micro_batch_size": "data.micro_batch_size",
    "seq_len": "data.seq_len",
}


class ConfigError(ValueError):
    """A mistake in the run configuration; the message names the key and what is allowed."""


@dataclass
class TokenizerConfig:
    path: str | None = None  # an existing tokenizer folder; None trains one into <output_dir>/tokenizer
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe | unigram
    max_chars: int = 5_000_000  # training budget, characters of the training stream
    max_docs: int | None = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 100  # length of the run: the lr schedule spans it
    stop_at_step: int | None = None  # stop early (with a checkpoint) at this step; resume later to max_steps
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | wsd | constant
    wsd_decay_fraction: float = 0.2  # wsd: fraction of max_steps spent decaying at the end
    # warm restarts: at each of these steps the schedule starts over (warmup, then decay until the next restart
    # or max_steps), e.g. where a length curriculum switches to long sequences
    lr_restarts: list[int] = field(default_factory=list)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16
    zero_stage: int = 1  # 0, 1, 2 or 3
    offload_optimizer: bool = False
    expert_parallel_size: int = 1
    seed: int = 0
    save_interval: int = 50
    keep_last: int = 2
    # write each checkpoint in a background thread (a copy to host memory, then the write, while training goes
    # on; `latest` moves once every rank's files are fsynced); false writes during the step boundary
    async_save: bool = True
    # also write the consolidated hf/ folder (the whole model gathered on rank 0) every N steps and at the final
    # save; 0 = never: `seedlm export` and `seedlm eval` make one from any checkpoint's ds/ files
    hf_interval: int = 0
    log_interval: int = 1
    eval_interval: int = 50  # held-out loss every N steps (0 = never)
    eval_batches: int = 4
    eval_tasks: list[str] = field(default_factory=list)  # evaluation tasks run with the held-out loss (seedlm eval)
    eval_limit: int | None = 50  # documents per task at each eval_interval
    resume: str = "auto"  # auto (latest checkpoint if any) | none | a checkpoint folder
    # a Hugging Face folder or Hub id whose config, weights (and tokenizer) start a new run (launch/warm_start.py)
    init_from: str | None = None
    max_consecutive_nonfinite: int = 5  # stop (after saving) when this many steps in a row are not finite
    peak_tflops: float | None = None  # per-device peak for MFU; None measures a matmul at start
    tensorboard: bool = True
    wandb_project: str | None = None
    # none | full (every decoder layer recomputes its forward in backward) | selective (every
    # activation_checkpointing_every-th layer: 0, N, 2N, ...; the others keep their activations). Selective is
    # by layer, not by op: the DeltaProduct layer already recomputes its convs, norms, kernel and output gate
    # in backward. The old booleans still work: true = full, false = none.
    activation_checkpointing: str | bool = "none"
    activation_checkpointing_every: int = 2  # selective: checkpoint one decoder layer in this many (>= 2)
    # sdpa | eager | flex_attention | varlen_attention | flash_attention_2; packed documents take a dense [T, T]
    # mask under sdpa/eager, a document block mask under flex_attention, cu_seqlens under the other two
    attn_implementation: str = "sdpa"
    # torch.compile each decoder block (regional compilation); compile_backend: inductor | aot_eager | eager
    compile: bool = False
    compile_backend: str = "inductor"
    cpu_threads: int | None = None  # torch intra-op threads per process; None keeps torch's default
    # glibc's mmap threshold in bytes, fixed: freed blocks this large go back to the OS instead of staying in the
    # heap (less resident memory, more page faults: launch/host_memory.py); null keeps glibc's self-raising default
    host_mmap_threshold: int | None = None
    # glibc keeps freed blocks for the next step (none mapped on its own): no page faults each step, more resident
    # memory (launch/host_memory.py); the opposite of host_mmap_threshold, so not with it
    host_allocator_cache: bool = False
    progress_bar: bool = True
    export_at_end: bool = False  # export to <output_dir>/export when training ends, then load it and sample
    sample_prompt: str | None = None  # text to continue with the exported model (needs export_at_end)


@dataclass
class RunConfig:
    model: Any = "gated_moe_tiny"
    model_overrides: dict = field(default_factory=dict)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.dtype": ("fp32", "bf16"),
    "train.zero_stage": (0, 1, 2, 3),
    "train.attn_implementation": ("sdpa", "eager", "flex_attention", "varlen_attention", "flash_attention_2"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "tokenizer.model_type": ("bpe", "unigram"),
}
POSITIVE = ("train.max_steps", "train.grad_accum_steps", "train.save_interval", "train.keep_last",
            "train.log_interval", "train.eval_batches", "train.expert_parallel_size", "tokenizer.vocab_size")


def suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(valid)}"


def check_type(path: str, value, annotation) -> Any:
    """Coerce ints to floats where a float is wanted; otherwise require the annotated type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Any": Any})  # annotations are strings (__future__)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(path, value, option)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if annotation is Any:
        return value
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # `lr: 3e-3` in a YAML file is a string to PyYAML
        try:
            return float(value)
        except ValueError:
            pass
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{path} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def build_section(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {prefix}.{key}{suggest(key, fields)}")
        kwargs[key] = check_type(f"{prefix}.{key}", value, fields[key].type)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """["train.lr=1e-3", "max_steps=20"] -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-3 or max_steps=20)")
        key = TOP_LEVEL_ALIASES.get(key, key)
        value = yaml.safe_load(raw) if raw != "" else None
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; users mean the number
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = value
    return nested


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "model":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config_path(config: str | Path) -> Path:
    path = Path(config)
    if path.is_file():
        return path
    candidate = PRESET_DIR / f"{config}.yaml"
    if candidate.is_file():
        return candidate
    configs = PRESET_DIR
    known = sorted(str(p.relative_to(configs).with_suffix("")) for p in configs.rglob("*.yaml")
                   if p.parent.name != "models")
    close = difflib.get_close_matches(str(config), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"config {config!r} is neither a file nor a preset in configs/{hint}; presets: {known}")


def load_run_config(config: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file or preset name (or None: all defaults) and dotted overrides."""
    doc: dict = {}
    if config is not None:
        path = resolve_config_path(config)
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path} must hold a YAML mapping")
        for key in list(doc):
            if key in TOP_LEVEL_ALIASES:  # aliases are allowed in files too
                section, name = TOP_LEVEL_ALIASES[key].split(".")
                doc.setdefault(section, {})[name] = doc.pop(key)
    command_line = parse_overrides(list(overrides))
    doc = merge(doc, command_line)
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    for key in doc:
        if key not in sections:
            raise ConfigError(f"unknown key {key!r}{suggest(key, sections | set(TOP_LEVEL_ALIASES))}")
    run = RunConfig(
        model=doc.get("model", RunConfig.model),
        model_overrides=check_type("model_overrides", doc.get("model_overrides", {}) or {}, dict),
        tokenizer=build_section(TokenizerConfig, doc.get("tokenizer", {}) or {}, "tokenizer"),
        data=check_type("data", doc.get("data", {}) or {}, dict),
        train=build_section(TrainConfig, doc.get("train", {}) or {}, "train"),
    )
    validate(run)
    from seedlm.launch.warm_start import apply_init_from

    apply_init_from(run)
    check_model_fields(run, command_line, path if config is not None else None)
    return run


def validate(run: RunConfig) -> None:
    if isinstance(run.train.activation_checkpointing, bool):  # the old boolean form, from YAML files and CLIs
        run.train.activation_checkpointing = "full" if run.train.activation_checkpointing else "none"
    values = {"train": run.train, "tokenizer": run.tokenizer}
    for path, allowed in CHOICES.items():
        section, name = path.split(".")
        if getattr(values[section], name) not in allowed:
            raise ConfigError(f"{path}={getattr(values[section], name)!r} is not allowed; use one of {list(allowed)}")
    for path in POSITIVE:
        section, name = path.split(".")
        if getattr(values[section], name) < 1:
            raise ConfigError(f"{path} must be >= 1, got {getattr(values[section], name)}")
    t = run.train
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.activation_checkpointing_every < 2:
        raise ConfigError(f"train.activation_checkpointing_every must be >= 2, got {t.activation_checkpointing_every}"
                          "; one layer in one is train.activation_checkpointing=full")
    if t.hf_interval < 0:
        raise ConfigError(f"train.hf_interval must be >= 0 (0 = no hf/ folder in checkpoints; `seedlm export` makes "
                          f"one), got {t.hf_interval}")
    if t.compile and t.zero_stage == 3:
        raise ConfigError("train.compile=true with zero_stage=3 is not supported: ZeRO-3 gathers each layer's "
                          "parameters in module hooks that torch.compile does not trace; use zero_stage 0-2, or "
                          "train.compile=false")
    if t.host_mmap_threshold is not None and t.host_mmap_threshold < 1:
        raise ConfigError(f"train.host_mmap_threshold must be a positive number of bytes (or null for glibc's "
                          f"default), got {t.host_mmap_threshold}")
    if t.host_allocator_cache and t.host_mmap_threshold is not None:
        raise ConfigError("train.host_allocator_cache=true keeps freed blocks and train.host_mmap_threshold hands "
                          "them back: choose one (set the other to false / null)")
    if t.cpu_threads is not None and t.cpu_threads < 1:
        raise ConfigError(f"train.cpu_threads must be >= 1 (or null for torch's default), got {t.cpu_threads}")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas must be two numbers, got {t.betas}")
    if t.lr_restarts != sorted(set(t.lr_restarts)) or any(not 0 < s < t.max_steps for s in t.lr_restarts):
        raise ConfigError(f"train.lr_restarts={t.lr_restarts}: give increasing steps between 1 and "
                          f"max_steps - 1 ({t.max_steps - 1}), each where the schedule starts over")
    if "synthetic" in run.data:  # a generated task instead of text sources: checked here, so --print-config too
        from seedlm.launch.training_data import synthetic_config

        synthetic_config(run.data)
    else:  # unknown data keys, source kinds and forms
        from seedlm.data_pipeline import DataConfig

        DataConfig.from_dict(run.data)


def check_model_fields(run: RunConfig, command_line: dict, config_file: Path | None) -> None:
    """Refuse a model field that the model's config class does not have, naming the key as written and where
    (the command line or the YAML file), with the closest valid field; then build the model config, so that
    its own checks of the values run at load too."""
    from seedlm.launch.presets import config_class_for, preset_fields, unknown_field

    def where(section: str, name: str) -> str:
        given = command_line.get(section)
        if section in command_line and (not isinstance(given, dict) or name in given):
            return "from the command line"
        return f"in {config_file}"

    written = [("model_overrides", name) for name in run.model_overrides]
    if run.train.init_from:
        model_type = None  # the folder's config: model_config_from_run checks the overrides against it
    elif isinstance(run.model, dict):
        model_type = run.model.get("model_type")
        written += [("model", name) for name in run.model if name != "model_type"]
    elif isinstance(run.model, str):
        model_type = preset_fields(run.model)[0].get("model_type")
    else:
        model_type = None  # model_config_from_run says what is wrong
    if model_type is not None:
        config_class = config_class_for(model_type)
        for section, name in written:
            problem = unknown_field(config_class, name)
            if problem:
                raise ConfigError(f"{section}.{name} ({where(section, name)}): {problem}")
    model_config_from_run(run)


def world_size_from_environment(env=os.environ) -> tuple[int, str]:
    """The number of ranks the launcher started, and where that was read, without starting a process group
    (torchrun and the deepspeed launcher set WORLD_SIZE, srun SLURM_NTASKS; a plain process is 1)."""
    from seedlm.launch.distributed import detect_launcher

    launcher = detect_launcher(env)
    if launcher == "torchrun/deepspeed":
        return int(env["WORLD_SIZE"]), "WORLD_SIZE"
    if launcher == "srun":
        return int(env["SLURM_NTASKS"]), "SLURM_NTASKS"
    return 1, "one process: neither WORLD_SIZE nor SLURM_NTASKS is set"


def check_run_config(run: RunConfig, world_size: int | None = None):
    """Every check of a loaded config that needs neither data nor a process group, so that `--print-config`
    refuses what the run would: the model config, expert parallelism against the world size (None: from the
    environment) and ZeRO stage, the tokenizer's fit in the model's vocabulary, and an attention kernel this
    machine cannot train with. Returns the model config."""
    from seedlm.launch.expert_parallel import ExpertParallelError, validate_expert_parallel

    model_config = model_config_from_run(run)
    where = "the process group"
    if world_size is None:
        world_size, where = world_size_from_environment()
    try:
        validate_expert_parallel(run.train.expert_parallel_size, world_size, getattr(model_config, "num_experts", 0),
                                 run.train.zero_stage)
    except ExpertParallelError as err:
        raise ExpertParallelError(f"{err} (world size {world_size}, from {where})") from None
    check_tokenizer_fits(run, model_config.vocab_size)
    if run.train.attn_implementation == "flex_attention":
        import torch

        if not torch.cuda.is_available():  # model/layers.py refuses it too; here before the data and the engine
            raise ConfigError("train.attn_implementation=flex_attention needs CUDA: torch's CPU FlexAttention has no "
                              "backward, and its forward reads past the end of q/k/v at some lengths (wrong values "
                              "or NaN); on CPU use sdpa or varlen_attention")
    return model_config


def check_tokenizer_fits(run: RunConfig, model_vocab_size: int) -> None:
    """Before any tokenizer is trained: the folder at tokenizer.path is loaded and must fit the model's
    vocabulary; a tokenizer still to be trained must not ask for more tokens than the model has."""
    if "synthetic" in run.data:
        return  # the vocabulary is the task's elements (launch/training_data.py checks the run)
    from seedlm.data_pipeline import check_vocab_fits, load_tokenizer

    if run.tokenizer.path:
        check_vocab_fits(load_tokenizer(run.tokenizer.path), model_vocab_size)
    elif run.tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"tokenizer.vocab_size={run.tokenizer.vocab_size} (the tokenizer to train) is larger than the model's "
            f"vocab_size={model_vocab_size}: set tokenizer.vocab_size <= {model_vocab_size}, or "
            f"model_overrides.vocab_size >= {run.tokenizer.vocab_size}"
        )


def model_config_from_run(run: RunConfig):
    """The HF model config named by run.model (preset name, YAML path or mapping) with model_overrides."""
    from seedlm.launch.presets import PresetError, build_model_config, load_model_config

    if run.train.init_from:  # the folder's config (launch/warm_start.py), not run.model
        from seedlm.launch.warm_start import init_model_config

        return init_model_config(Path(run.train.init_from), run.model_overrides)
    if not isinstance(run.model, (dict, str)):
        raise ConfigError(f"model must be a preset name, a YAML path or a mapping, got {run.model!r}")
    try:
        if isinstance(run.model, dict):
            return build_model_config({**run.model, **run.model_overrides}, source="model")
        return load_model_config(run.model, **run.model_overrides)
    except PresetError:
        raise
    except ValueError as err:  # the config class's own checks of the values (e.g. heads not dividing)
        overrides = f" with model_overrides {run.model_overrides}" if run.model_overrides else ""
        name = "model" if isinstance(run.model, dict) else f"model {run.model!r}"
        raise ConfigError(f"{name}{overrides}: {err}") from err
