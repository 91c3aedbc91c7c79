"""Configuration of the data pipeline: which text sources, how to pack them, how to read them.

`DataConfig` is what the trainer builds (from the run YAML's `data:` section via
`DataConfig.from_dict`) and hands to `build_dataloader`. `SourceConfig` names one text source.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Any

SOURCE_KINDS = ("hub", "jsonl", "parquet", "text", "files", "stdlib")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")


class DataError(ValueError):
    """A user's mistake about the data (missing files, unknown dataset or field, bad state).

    The message names what is wrong and what to do; it is raised before any compute starts.
    """


@dataclass
class SourceConfig:
    """One text source.

    kind:
      - "hub":     `datasets.load_dataset(path, name, split=split, streaming=True)`; `path` is a Hub
                   dataset id or a local dataset folder (parquet/jsonl files, the same code path).
      - "jsonl":   one JSON object per line, text in `text_field`.
      - "parquet": text in column `text_field`.
      - "text":    plain text files; documents are lines, paragraphs (blank-line separated) or
                   whole files (`sample_by`).
      - "files":   a folder of files matched by `glob`, one document per file.
      - "stdlib":  the embedded default corpus: this Python's standard-library `*.py` files
                   (a "files" source over `sysconfig.get_paths()["stdlib"]`, site-packages excluded).
    For local kinds `path` is a file, a folder (then `glob` picks the files) or a glob pattern.

    Held-out split: local sources put a document in the validation split when a stable hash of its
    key (the file path relative to the root, plus the record index for multi-record files) falls
    under `holdout_fraction`. Hub sources use their own split named `validation_split`.
    """

    kind: str = "stdlib"
    path: str | None = None
    name: str | None = None  # Hub dataset config name
    split: str = "train"  # Hub split used for training
    validation_split: str | None = None  # Hub split used for validation
    text_field: str = "text"
    glob: str | None = None  # file pattern under a folder `path`; default depends on kind
    exclude: list[str] = field(default_factory=list)  # path components to skip, e.g. ["site-packages"]
    sample_by: str = "paragraph"  # kind "text" only: "line" | "paragraph" | "document"
    weight: float = 1.0  # mixture weight (normalised over sources)
    holdout_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            hint = ""
            if ":" in self.kind:  # the string form put where the mapping form's kind goes
                kind, _, path = self.kind.partition(":")
                hint = f" (the mapping form is {{kind: {kind}, path: {path}}}; the string {self.kind} alone works too)"
            raise DataError(f"unknown source kind {self.kind!r}; use one of {', '.join(SOURCE_KINDS)}{hint}")
        if self.kind == "stdlib":
            # The embedded default: real text on every machine, no download.
            self.path = self.path or sysconfig.get_paths()["stdlib"]
            self.glob = self.glob or "**/*.py"
            self.exclude = self.exclude or ["site-packages", "dist-packages", "__pycache__"]
            if self.holdout_fraction == 0.0:
                self.holdout_fraction = 0.02
        if self.kind != "stdlib" and not self.path:
            raise DataError(f"source of kind {self.kind!r} needs `path` (a dataset id, file, folder or glob)")
        if self.sample_by not in TEXT_SAMPLE_BY:
            raise DataError(f"sample_by={self.sample_by!r}; use one of {', '.join(TEXT_SAMPLE_BY)}")
        if not self.weight > 0:
            raise DataError(f"source {self.describe()}: weight must be > 0, got {self.weight}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise DataError(
                f"source {self.describe()}: holdout_fraction must be in [0, 1), got {self.holdout_fraction}"
            )

    def describe(self) -> str:
        if self.kind == "hub":
            return f"hub:{self.path}" + (f"/{self.name}" if self.name else "") + f"[{self.split}]"
        return f"{self.kind}:{self.path}" + (f" ({self.glob})" if self.glob else "")

    @classmethod
    def from_spec(cls, spec: str, **overrides: Any) -> SourceConfig:
        """A source from a command-line spec: "stdlib", "KIND:PATH" (jsonl, parquet, text, files, hub) or a bare
        path whose kind follows from its extension (.jsonl, .parquet, .txt; a folder is one document per file).
        `overrides` are further SourceConfig fields; None values are ignored."""
        extra = {k: v for k, v in overrides.items() if v is not None}
        kind, sep, path = spec.partition(":")
        if spec == "stdlib":
            return cls(kind="stdlib", **extra)
        if sep and kind in SOURCE_KINDS:
            return cls(kind=kind, path=path, **extra)
        suffix = {".jsonl": "jsonl", ".parquet": "parquet", ".txt": "text"}
        for ext, k in suffix.items():
            if spec.endswith(ext):
                return cls(kind=k, path=spec, **extra)
        if os.path.isdir(spec):
            return cls(kind="files", path=spec, **extra)
        raise DataError(
            f"cannot tell the kind of source {spec!r}: write KIND:PATH with KIND one of {', '.join(SOURCE_KINDS)} "
            "(e.g. jsonl:data/*.jsonl, hub:owner/name), or 'stdlib'"
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> SourceConfig:
        """A source from a config entry: the command line's spec string ("stdlib", "jsonl:data/*.jsonl", a
        path), or a mapping of SourceConfig fields ({kind: jsonl, path: data/*.jsonl, text_field: body})."""
        if isinstance(d, str):
            return cls.from_spec(d)
        if not isinstance(d, dict):
            raise DataError(f"data source {d!r} is neither a string (e.g. jsonl:data/*.jsonl) nor a mapping "
                            "(e.g. {kind: jsonl, path: data/*.jsonl})")
        if "kind" not in d and len(d) == 1 and next(iter(d)) in SOURCE_KINDS:  # YAML read `jsonl: x` as a mapping
            kind, path = next(iter(d.items()))
            raise DataError(f"data source {d!r}: write {kind}:{path} (no space after the colon) or "
                            f"{{kind: {kind}, path: {path}}}")
        _check_keys(cls, d, "data source")
        return cls(**d)


DEFAULT_PACKING_LANES = 64  # the least, when data.packing_lanes is not given


@dataclass
class DataConfig:
    """Everything from text sources to batches.

    Batches are `micro_batch_size` rows of `seq_len` tokens. Documents are shuffled within blocks of
    `shuffle_buffer` documents (seeded; the block is also the tokenisation batch). `num_epochs=None`
    repeats the sources forever (training: the trainer stops at max_steps); an integer stops after
    that many passes. `strict` turns skipped bad records into errors.
    """

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    tokenizer: str | None = None  # path of a tokenizer folder (AutoTokenizer.from_pretrained)
    seq_len: int = 512
    micro_batch_size: int = 8
    num_workers: int = 2
    shuffle: bool = True
    shuffle_buffer: int = 256
    # documents packed side by side, a row from each in turn (packing.LanePacker): None = max(64, micro_batch_size),
    # so the rows of a batch, and of the next few batches, come from different documents; 1 packs each document
    # into consecutive rows (README, Data: held-out loss after 1,000 steps 4.79 with 1 lane, 4.05 with 8, 3.59 with 64)
    packing_lanes: int | None = None
    seed: int = 0
    strict: bool = False
    num_epochs: int | None = None
    # token shards from `seedlm data prepare` to train on instead of `sources` (prepared.py): a folder, or a
    # mixture [{path: DIR, weight: w}, ...]; normalised to the list form
    prepared: Any = None
    # local sources (stdlib, files) tokenised once into a cache keyed by sources and tokenizer, then read as
    # prepared data (the topology-free order); off by default: set `data.prepare_local: true` (prepared.py)
    prepare_local: bool = False

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig.from_dict(s) for s in self.sources]
        if not self.sources:
            raise DataError("data.sources is empty; name at least one source (or leave it out for the stdlib default)")
        for key in ("seq_len", "micro_batch_size", "shuffle_buffer", "packing_lanes"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise DataError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"data.num_epochs must be None (repeat forever) or >= 1, got {self.num_epochs}")
        if self.prepared is not None:
            self.prepared = _prepared_sets(self.prepared)
            if self.num_epochs is not None:
                raise DataError("data.num_epochs does not apply to data.prepared (its rows repeat in new permutations; "
                                "train.max_steps ends the run): leave num_epochs out")

        if self.prepare_local and self.num_epochs is not None:
            raise DataError("data.prepare_local reads prepared rows, which repeat in new permutations (no epochs): "
                            "leave num_epochs out, or set prepare_local: false to stream the sources")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        _check_keys(cls, d, "data")
        d = dict(d)
        if "sources" in d:
            sources = d["sources"]
            if isinstance(sources, (str, dict)):  # one source given without the list around it
                sources = [sources]
            if not isinstance(sources, list):
                raise DataError(f"data.sources must be a list of sources, got {sources!r}")
            d["sources"] = [SourceConfig.from_dict(s) for s in sources]
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lanes(self) -> int:
        """Documents packed side by side (packing_lanes; None: max(64, micro_batch_size))."""
        if self.packing_lanes is not None:
            return self.packing_lanes
        return max(DEFAULT_PACKING_LANES, self.micro_batch_size)


def _prepared_sets(value: Any) -> list[dict[str, Any]]:
    """data.prepared as [{path, weight}]: from a folder, a list of folders, or a list of {path, weight}."""
    example = "data.prepared=DIR or data.prepared=[{path: DIR_A, weight: 0.7}, {path: DIR_B, weight: 0.3}]"
    items = value if isinstance(value, list) else [value]
    sets = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "weight"}:
            raise DataError(f"data.prepared entry {item!r} is not a folder or a {{path, weight}} mapping; "
                            f"write {example}")
        weight = item.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"data.prepared entry {item['path']}: weight must be a number > 0, got {weight!r}")
        sets.append({"path": str(item["path"]), "weight": float(weight)})
    if not sets:
        raise DataError(f"data.prepared is empty; write {example}")
    return sets


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise DataError(f"unknown {what} key(s) {unknown}; known keys: {sorted(known)}")


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """A DataConfig from a YAML file: its `data:` section if it has one, else the whole mapping."""
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as err:
        raise DataError(f"cannot read config {path}: {err}") from err
    if not isinstance(doc, dict):
        raise DataError(f"config {path} is not a YAML mapping")
    section = doc.get("data", doc)
    if not isinstance(section, dict):
        raise DataError(f"`data` in {path} is not a mapping")
    return DataConfig.from_dict(section)
