"""Evaluation tasks as YAML files with lm-evaluation-harness's field names, over local data.

A task file (the same file runs in lm-eval through `--include_path`):

    task: tiny_qa                       # the name to ask for (required)
    dataset_path: json                  # json / csv / parquet with dataset_kwargs.data_files, or a Hub dataset
    dataset_kwargs:
      data_files: {test: data/tiny_qa.jsonl}   # relative paths are relative to this YAML file
    test_split: test                    # evaluated split: test_split, else validation_split
    output_type: multiple_choice        # multiple_choice | loglikelihood | loglikelihood_rolling | generate_until
    doc_to_text: "Question: {{question}}\nAnswer:"   # a field name or a Jinja template over the document
    doc_to_target: answer               # field / template; for multiple_choice an index or the choice text
    doc_to_choice: "{{choices}}"        # field, template giving a list, or a YAML list of templates
    metric_list: [{metric: acc}, {metric: acc_norm}]
    num_fewshot: 0                      # few-shot examples from fewshot_split / training_split / validation_split

Also: target_delimiter (" "), fewshot_delimiter ("\\n\\n"), description, generation_kwargs {until,
max_gen_toks}, training_split, validation_split, fewshot_split, `custom_dataset: !function file.fn` (a
function in a .py file beside the YAML returning a DatasetDict or {split: list of dicts}), and
`process_docs: !function file.fn`. Fields lm-eval has but this harness does not implement (filters,
custom result processing, repeats) are refused by name; run such tasks with lm_eval itself.

Every mistake raises `TaskError` naming the file and the field.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import METRICS_BY_OUTPUT_TYPE

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the example tasks that ship with seedlm

OUTPUT_TYPES = tuple(METRICS_BY_OUTPUT_TYPE)
KNOWN_FIELDS = {
    "task", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split",
    "validation_split", "test_split", "fewshot_split", "process_docs", "doc_to_text", "doc_to_target",
    "doc_to_choice", "target_delimiter", "fewshot_delimiter", "description", "num_fewshot", "metric_list",
    "output_type", "generation_kwargs",
}  # fmt: skip
IGNORED_FIELDS = {"tag", "group", "task_alias", "metadata", "should_decontaminate", "doc_to_decontamination_query"}
UNSUPPORTED_FIELDS = {"filter_list", "process_results", "repeats", "use_prompt", "doc_to_image", "doc_to_audio",
                      "fewshot_config", "gen_prefix", "unsafe_code", "class", "include", "samples"}  # fmt: skip
GENERATION_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}


class TaskError(ValueError):
    """A malformed task: the message names the file and the field."""


@dataclass(frozen=True)
class FunctionRef:
    """`!function module.name` in a task YAML: `name` in `module.py` beside the YAML file."""

    yaml_dir: Path
    spec: str

    def load(self):
        *module, name = self.spec.split(".")
        path = self.yaml_dir / (".".join(module) + ".py")
        if not module or not path.is_file():
            raise TaskError(f"!function {self.spec}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"seedlm_task_fn_{path.stem}", path)
        mod = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(mod)
        if not hasattr(mod, name):
            raise TaskError(f"!function {self.spec}: {path} has no function {name!r}")
        return getattr(mod, name)


def _yaml_loader(yaml_dir: Path):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: FunctionRef(yaml_dir, loader.construct_scalar(node)))
    return Loader


@dataclass
class Task:
    """A loaded, validated task. `docs` is the evaluated split; `fewshot_docs` the few-shot pool."""

    name: str
    output_type: str
    metrics: list[dict]
    docs: list[dict]
    doc_to_text: Any = ""
    doc_to_target: Any = None
    doc_to_choice: Any = None
    fewshot_docs: list[dict] = field(default_factory=list)
    num_fewshot: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    generation_kwargs: dict = field(default_factory=dict)
    source: str = "<python>"
    fewshot_seed: int = 1234

    # ------------------------------------------------------------ per-document views

    def _render(self, spec, doc: dict, what: str):
        if callable(spec):
            return spec(doc)
        if isinstance(spec, int) or spec is None:
            return spec
        if isinstance(spec, list):
            return [self._render(s, doc, what) for s in spec]
        if spec in doc:
            return doc[spec]
        import jinja2

        try:
            return _jinja_env().from_string(spec).render(**doc)
        except jinja2.TemplateError as err:
            raise TaskError(
                f"{self.source}: {what} {spec!r} failed on a document with fields {sorted(doc)}: {err}"
            ) from err

    def text(self, doc: dict) -> str:
        return str(self._render(self.doc_to_text, doc, "doc_to_text"))

    def choices(self, doc: dict) -> list[str]:
        value = self._render(self.doc_to_choice, doc, "doc_to_choice")
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as err:
                raise TaskError(f"{self.source}: doc_to_choice gave {value!r}, not a list") from err
        if isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, list) or not value:
            raise TaskError(f"{self.source}: doc_to_choice gave {value!r}, not a non-empty list")
        return [str(v) for v in value]

    def target(self, doc: dict):
        """The gold answer: an int index for multiple_choice, else a string."""
        value = self._render(self.doc_to_target, doc, "doc_to_target")
        if self.output_type != "multiple_choice":
            return str(value)
        if isinstance(value, str):
            if value.strip().isdigit():
                return int(value)
            choices = self.choices(doc)
            if value not in choices:
                raise TaskError(
                    f"{self.source}: doc_to_target gave {value!r}, which is not among the choices {choices}"
                )
            return choices.index(value)
        if not isinstance(value, int):
            raise TaskError(f"{self.source}: doc_to_target gave {value!r}; multiple_choice needs an index or a choice")
        return value

    def target_text(self, doc: dict) -> str:
        gold = self.target(doc)
        return self.choices(doc)[gold] if self.output_type == "multiple_choice" else gold

    def context(self, doc: dict, doc_index: int, num_fewshot: int | None = None) -> str:
        """description + few-shot examples (text, delimiter, target) + this document's text."""
        n = self.num_fewshot if num_fewshot is None else num_fewshot
        prefix = self.description
        if n > 0:
            # seeded per document, so a document's prompt does not depend on which others are evaluated
            rng = random.Random(self.fewshot_seed * 1_000_003 + doc_index)
            pool = [d for d in self.fewshot_docs if d is not doc and d != doc]
            if len(pool) < n:
                raise TaskError(f"{self.source}: num_fewshot={n} but the few-shot split has only {len(pool)} documents")
            shots = rng.sample(pool, n)
            examples = [self.text(d) + self.target_delimiter + self.target_text(d) for d in shots]
            prefix += self.fewshot_delimiter.join(examples) + self.fewshot_delimiter
        return prefix + self.text(doc)


_JINJA_ENV = None


def _jinja_env():
    global _JINJA_ENV
    if _JINJA_ENV is None:
        import jinja2

        _JINJA_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return _JINJA_ENV


# ---------------------------------------------------------------- loading YAML


def _read_records(path: Path, source: str) -> list[dict]:
    if not path.is_file():
        raise TaskError(f"{source}: dataset_kwargs.data_files: data file {path} does not exist")
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TaskError(f"{source}: {path} line {n} is not valid JSON: {err}") from err
        return records
    import datasets  # csv, parquet and anything else datasets reads

    builder = {".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(path.suffix)
    if builder is None:
        raise TaskError(f"{source}: cannot read data file {path} (use .jsonl, .json, .csv, .parquet or .txt)")
    return list(datasets.load_dataset(builder, data_files=str(path), split="train"))


def _load_splits(cfg: dict, yaml_dir: Path, source: str) -> dict[str, list[dict]]:
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if cfg.get("custom_dataset") is not None:
        fn = cfg["custom_dataset"]
        if not isinstance(fn, FunctionRef):
            raise TaskError(f"{source}: custom_dataset must be '!function module.name'")
        load = fn.load()
        try:
            data = load(**kwargs)
        except Exception as err:  # noqa: BLE001 - a missing or unreadable data file, reported with the task
            raise TaskError(f"{source}: custom_dataset {fn.spec} failed: {type(err).__name__}: {err}") from err
        return {split: list(docs) for split, docs in data.items()}
    path = cfg.get("dataset_path")
    if not path:
        raise TaskError(f"{source}: missing field 'dataset_path' (e.g. 'json' with dataset_kwargs.data_files)")
    data_files = kwargs.get("data_files")
    if path in ("json", "csv", "parquet", "text"):
        if data_files is None:
            raise TaskError(f"{source}: dataset_path '{path}' needs dataset_kwargs.data_files")
        if isinstance(data_files, (str, list)):
            data_files = {"train": data_files}
        splits = {}
        for split, files in data_files.items():
            files = [files] if isinstance(files, str) else files
            splits[split] = []
            for f in files:
                p = Path(f) if Path(f).is_absolute() else yaml_dir / f
                splits[split].extend(_read_records(p, source))
        return splits
    import datasets  # a Hub dataset (needs the network or a local cache)

    try:
        data = datasets.load_dataset(path, cfg.get("dataset_name"), **kwargs)
    except Exception as err:  # noqa: BLE001 - report any loading failure with the task's name
        raise TaskError(f"{source}: dataset_path {path!r} could not be loaded: {err}") from err
    return {split: list(ds) for split, ds in data.items()}


def _check_metrics(cfg: dict, output_type: str, source: str) -> list[dict]:
    allowed = METRICS_BY_OUTPUT_TYPE[output_type]
    metric_list = cfg.get("metric_list")
    if metric_list is None:
        return [{"metric": m} for m in allowed]
    if not isinstance(metric_list, list) or not metric_list:
        raise TaskError(f"{source}: metric_list must be a non-empty list of {{metric: NAME}} entries")
    out = []
    for i, entry in enumerate(metric_list):
        if isinstance(entry, str):
            entry = {"metric": entry}
        if not isinstance(entry, dict) or "metric" not in entry:
            raise TaskError(f"{source}: metric_list[{i}] must be a mapping with a 'metric' field")
        if entry["metric"] not in allowed:
            raise TaskError(
                f"{source}: metric_list[{i}].metric: unknown metric {entry['metric']!r} for output_type "
                f"{output_type}; known: {', '.join(allowed)}"
            )
        out.append(dict(entry))
    return out


def task_from_config(cfg: dict, yaml_dir: Path, source: str) -> Task:
    """Validate a parsed task mapping and load its documents."""
    if not isinstance(cfg, dict):
        raise TaskError(f"{source}: a task file must be a YAML mapping")
    for key in cfg:
        if key in UNSUPPORTED_FIELDS:
            raise TaskError(
                f"{source}: field '{key}' is not supported by seedlm's harness (run this task with lm_eval)"
            )
        if key not in KNOWN_FIELDS and key not in IGNORED_FIELDS:
            raise TaskError(f"{source}: unknown field '{key}'; known fields: {', '.join(sorted(KNOWN_FIELDS))}")
    if not cfg.get("task") or not isinstance(cfg["task"], str):
        raise TaskError(f"{source}: missing field 'task' (the task's name)")
    output_type = cfg.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(f"{source}: output_type: unknown {output_type!r}; known: {', '.join(OUTPUT_TYPES)}")
    needed = {"multiple_choice": ("doc_to_text", "doc_to_target", "doc_to_choice"),
              "loglikelihood": ("doc_to_text", "doc_to_target"),
              "loglikelihood_rolling": ("doc_to_target",),
              "generate_until": ("doc_to_text", "doc_to_target")}[output_type]  # fmt: skip
    for key in needed:
        if cfg.get(key) is None:
            raise TaskError(f"{source}: missing field '{key}' (needed by output_type {output_type})")
    metrics = _check_metrics(cfg, output_type, source)
    gen_kwargs = dict(cfg.get("generation_kwargs") or {})
    for key in gen_kwargs:
        if key not in GENERATION_KWARGS:
            raise TaskError(f"{source}: generation_kwargs.{key} is not supported; known: {sorted(GENERATION_KWARGS)}")
    if gen_kwargs.get("do_sample"):
        raise TaskError(f"{source}: generation_kwargs.do_sample: only greedy generation is supported")
    if isinstance(gen_kwargs.get("until"), str):
        gen_kwargs["until"] = [gen_kwargs["until"]]
    num_fewshot = cfg.get("num_fewshot") or 0
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise TaskError(f"{source}: num_fewshot must be a non-negative integer, got {num_fewshot!r}")

    splits = _load_splits(cfg, yaml_dir, source)
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    if not eval_split:
        raise TaskError(f"{source}: missing field 'test_split' (or 'validation_split'): which split to evaluate")
    if eval_split not in splits:
        raise TaskError(f"{source}: test_split '{eval_split}' is not among the dataset's splits {sorted(splits)}")
    docs = splits[eval_split]
    fewshot_split = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    fewshot_docs = splits.get(fewshot_split, []) if fewshot_split else []
    if num_fewshot and not fewshot_docs:
        raise TaskError(f"{source}: num_fewshot={num_fewshot} needs a fewshot_split/training_split with documents")
    process_docs = cfg.get("process_docs")
    if process_docs is not None:
        if not isinstance(process_docs, FunctionRef):
            raise TaskError(f"{source}: process_docs must be '!function module.name'")
        fn = process_docs.load()
        docs, fewshot_docs = list(fn(docs)), list(fn(fewshot_docs)) if fewshot_docs else []

    def as_spec(key):
        value = cfg.get(key)
        return value.load() if isinstance(value, FunctionRef) else value

    task = Task(
        name=cfg["task"],
        output_type=output_type,
        metrics=metrics,
        docs=docs,
        doc_to_text=as_spec("doc_to_text") if cfg.get("doc_to_text") is not None else "",
        doc_to_target=as_spec("doc_to_target"),
        doc_to_choice=as_spec("doc_to_choice"),
        fewshot_docs=fewshot_docs,
        num_fewshot=num_fewshot,
        target_delimiter=cfg.get("target_delimiter", " "),
        fewshot_delimiter=cfg.get("fewshot_delimiter", "\n\n"),
        description=cfg.get("description", "") or "",
        generation_kwargs=gen_kwargs,
        source=source,
    )
    if docs:  # render the first document now, so a bad template fails before any compute
        if output_type != "loglikelihood_rolling":
            task.text(docs[0])
        task.target_text(docs[0])
    return task


def load_task_file(path: str | Path) -> Task:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader(path.parent))  # noqa: S506
    except yaml.YAMLError as err:
        raise TaskError(f"{path}: not valid YAML: {err}") from err
    return task_from_config(cfg, path.parent, str(path))


def find_task_files(include_paths: list[str | Path] | None = None) -> dict[str, Path]:
    """{task name: YAML file} over the shipped tasks and the include paths (later paths win)."""
    import yaml

    found: dict[str, Path] = {}
    for root in [TASKS_DIR, *(include_paths or [])]:
        root = Path(root)
        files = [root] if root.is_file() else sorted(root.rglob("*.yaml")) if root.is_dir() else []
        if not files and not root.exists():
            raise TaskError(f"include path {root} does not exist")
        for f in files:
            try:
                cfg = yaml.load(f.read_text(encoding="utf-8"), Loader=_yaml_loader(f.parent))  # noqa: S506
            except yaml.YAMLError:
                continue  # reported when the task is asked for by path
            if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
                found[cfg["task"]] = f
    return found


def resolve_tasks(
    names: list[str], include_paths: list[str | Path] | None = None, failures: dict[str, str] | None = None
) -> list[Task]:
    """Tasks by name (a shipped task, one under an include path, or a synthetic task from
    `eval.synthetic.SYNTHETIC_TASKS`) or by the path of a YAML file.

    failures: when a dict is given, a name that gives no valid task is recorded there as {name: message}
    and the other tasks are still returned; without it the first such name raises `TaskError`. A missing
    include path always raises: it concerns every name."""
    from .synthetic import SYNTHETIC_TASKS, synthetic_task

    is_path = [name.endswith((".yaml", ".yml")) or Path(name).is_file() for name in names]
    index = find_task_files(include_paths) if not all(is_path) else {}
    tasks = []
    for name, by_path in zip(names, is_path):
        try:
            if by_path:
                tasks.append(load_task_file(name))
            elif name in index:
                tasks.append(load_task_file(index[name]))
            elif name in SYNTHETIC_TASKS:
                tasks.append(synthetic_task(name))
            else:
                known = sorted(set(index) | set(SYNTHETIC_TASKS))
                raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(known)} (or give a YAML file's path)")
        except TaskError as err:
            if failures is None:
                raise
            failures[name] = str(err)
    return tasks
