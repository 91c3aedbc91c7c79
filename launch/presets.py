"""Model presets: YAML files under configs/models/ that name a model_type and its config fields.

`load_model_config("gated_moe_tiny")` or `load_model_config("path/to/file.yaml", hidden_size=256)` returns
the HF config object; an unknown field is refused with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import yaml

# the presets: <repository>/configs in a checkout, seedlm/configs (package data) when installed
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
MODEL_PRESET_DIR = PRESET_DIR / "models"


class PresetError(ValueError):
    """A preset file or field is wrong; the message says which and what is allowed."""


def preset_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise PresetError(f"model preset file {path} does not exist")
        return path
    candidate = MODEL_PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(str(name_or_path), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PresetError(f"no model preset named {name_or_path!r}{hint}; known presets: {known}")
    return candidate


def config_class_for(model_type: str):
    from transformers import CONFIG_MAPPING

    seedlm_types = sorted(t for t in CONFIG_MAPPING.keys() if t.startswith("seedlm_"))
    if model_type not in seedlm_types:
        raise PresetError(f"model_type {model_type!r} is not a seedlm model; use one of {seedlm_types}")
    return CONFIG_MAPPING[model_type]


def unknown_field(config_class, name: str) -> str | None:
    """None when `name` is a field of config_class; else says so, with the closest valid field."""
    valid = {f.name for f in dataclasses.fields(config_class)}
    if name in valid:
        return None
    close = difflib.get_close_matches(name, sorted(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field {name!r} for {config_class.model_type}{hint}"


def build_model_config(fields: dict, source: str = "model config"):
    """fields: {"model_type": ..., <config fields>} -> config object; unknown fields are refused."""
    fields = dict(fields)
    if "model_type" not in fields:
        raise PresetError(f"{source} has no model_type")
    config_class = config_class_for(fields.pop("model_type"))
    for key in fields:
        problem = unknown_field(config_class, key)
        if problem:
            raise PresetError(f"{source}: {problem}")
    return config_class(**fields)


def preset_fields(name_or_path: str | Path) -> tuple[dict, Path]:
    """The fields a preset file holds (model_type included), and the file."""
    path = preset_path(name_or_path)
    fields = yaml.safe_load(path.read_text()) or {}
    if not isinstance(fields, dict):
        raise PresetError(f"{path} must hold a mapping of config fields")
    return fields, path


def load_model_config(name_or_path: str | Path, **overrides):
    fields, path = preset_fields(name_or_path)
    fields.update(overrides)
    return build_model_config(fields, source=str(path))
