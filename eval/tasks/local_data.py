"""Loader for the example tasks' local data, named in their YAML as `custom_dataset: !function local_data.load`.

lm-evaluation-harness resolves `dataset_kwargs.data_files` against the current directory; this loader
resolves relative paths against this folder instead, so `lm_eval --include_path eval/tasks` works from
anywhere. seedlm's harness calls it the same way. Returns a `datasets.DatasetDict` (what lm-eval expects).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_files=None, **metadata):
    import datasets

    if not data_files:
        raise ValueError("local_data.load needs dataset_kwargs.data_files: {split: path}")
    splits = {}
    for split, path in data_files.items():
        path = Path(path) if Path(path).is_absolute() else HERE / path
        with open(path, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    return datasets.DatasetDict(splits)
