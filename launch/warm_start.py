"""`train.init_from=DIR_OR_HUB_ID`: start a new run from the weights of a Hugging Face folder.

The folder is a `seedlm export`, a `seedlm convert` output, a checkpoint's hf/ folder, or a Hub id (downloaded
when the Hub is reachable). The run then takes:
  - the folder's model config, with `model_overrides` applied to fields that keep every weight's shape
    (the `model` key of the run config is not used);
  - the folder's tokenizer when it has one and `tokenizer.path` is not given;
  - its weights as the initial weights (a fresh optimizer and lr schedule), under any ZeRO stage and
    expert-parallel size: they are loaded into the whole model before expert parallelism slices it and
    DeepSpeed partitions it.
A run folder that already holds a checkpoint resumes from it instead (resume=auto): init_from starts runs only.
Every mistake (no such folder, a Hub id while offline, not a seedlm model, overrides that change shapes) is
refused when the config is loaded, before anything is computed or written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from seedlm.launch.config import ConfigError

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def resolve_init_from(spec: str) -> Path:
    """The local folder of train.init_from: the folder itself, or a Hub repository downloaded into the cache."""
    folder = Path(spec).expanduser()
    if folder.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if not folder.is_dir():
            raise ConfigError(f"train.init_from={spec!r}: no such folder (give a `seedlm export` or "
                              "`seedlm convert` output folder, or a Hub id owner/name)")
    else:  # owner/name: a Hub repository
        from huggingface_hub.constants import is_offline_mode

        if is_offline_mode():
            raise ConfigError(f"train.init_from={spec!r} is not a folder here, and the Hub is offline "
                              f"(HF_HUB_OFFLINE=1): download it first (`hf download {spec} --local-dir DIR`) and "
                              "give train.init_from=DIR")
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec))
    if not (folder / "config.json").is_file():
        raise ConfigError(f"train.init_from={spec!r}: {folder} has no config.json (is it a model folder?)")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(f"train.init_from={spec!r}: {folder} has a config.json but no weights "
                          f"({' or '.join(WEIGHT_PATTERNS)})")
    return folder


def init_model_config(folder: Path, overrides: dict):
    """The folder's model config with `overrides` applied; refused when an override changes a weight's shape."""
    from seedlm.launch.presets import PresetError, build_model_config, config_class_for, unknown_field

    saved = json.loads((folder / "config.json").read_text())
    model_type = saved.get("model_type")
    try:
        config_class = config_class_for(model_type)
    except PresetError:
        raise ConfigError(f"train.init_from={str(folder)!r} holds a {model_type!r} model, not a seedlm one: "
                          f"convert it first (`seedlm convert --from {model_type} {folder} OUT_DIR`) where a "
                          "conversion exists") from None
    for name in overrides:
        problem = unknown_field(config_class, name)
        if problem:
            raise ConfigError(f"model_overrides.{name}: {problem}")
    names = {f.name for f in dataclasses.fields(config_class)}
    fields = {k: v for k, v in saved.items() if k in names}
    if "rope_theta" in overrides:
        fields.pop("rope_parameters", None)  # derived from rope_theta when rebuilt
    try:
        original = build_model_config({"model_type": model_type, **fields}, source=str(folder / "config.json"))
        config = build_model_config({"model_type": model_type, **fields, **overrides}, source="model_overrides")
    except ValueError as err:
        raise ConfigError(f"train.init_from={str(folder)!r} with model_overrides {overrides}: {err}") from err
    changed = changed_shapes(original, config)
    if changed:
        raise ConfigError(f"model_overrides {overrides} change the shapes of the weights in {folder} "
                          f"({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}): with train.init_from "
                          "only fields that keep every shape can be overridden (dropout, router coefficients, "
                          "rope_theta...); start a new model without init_from to change its size")
    return config


def changed_shapes(before, after) -> list[str]:
    """'name: [a, b] -> [c, d]' for each weight whose shape differs between two configs (built on meta)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        old = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(before).state_dict().items()}
        new = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(after).state_dict().items()}
    return [f"{k}: {list(old.get(k, ()))} -> {list(new.get(k, ()))}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def apply_init_from(run) -> None:
    """Resolve train.init_from to a local folder (in the run config) and take its tokenizer when the run gives
    none. Called when the run config is loaded, so --print-config shows what the run will use."""
    if not run.train.init_from:
        return
    folder = resolve_init_from(run.train.init_from)
    run.train.init_from = str(folder)
    if run.tokenizer.path is None and (folder / "tokenizer_config.json").is_file():
        run.tokenizer.path = str(folder)
