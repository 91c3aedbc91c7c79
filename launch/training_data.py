"""What the trainer trains on: text through the data pipeline, or a generated task (data.synthetic).

Both kinds answer the same calls, so the training loop has no branch for either:
    data.config                         data_pipeline.DataConfig (batch shape, seq_len, sources)
    data.check(run, output_dir)         run-level mistakes, before any compute
    data.prepare_tokenizer(output_dir, dist) -> (tokenizer, folder)
    data.train_loader(tokenizer, dist, grad_accum_steps) / data.validation_loader(tokenizer, dist)
    data.evaluate(model) -> dict        metrics of the data's own task at each evaluation ({} for text)
    data.final_report(model, step)      a closing evaluation row, or None; with summary_line / write_report

A generated task is put together here from its three owners: the task's records and their accuracy
(eval/synthetic.py), the data.synthetic schema, vocabulary tokenizer and aligned-target loader
(data_pipeline/synthetic.py). data_pipeline may not import eval, so the record generator is handed to it.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

from seedlm.launch.config import ConfigError
from seedlm.launch.distributed import DistInfo, barrier

logger = logging.getLogger("seedlm.train")


class TextData:
    """Text sources -> sentencepiece tokenizer (trained on the run's sources when none is given) -> packing."""

    def __init__(self, run):
        from seedlm.data_pipeline import DataConfig

        self.run = run
        self.config = DataConfig.from_dict(run.data)

    def check(self, run, output_dir: Path) -> None:
        """Prepared data (data.prepared): whole sets, the tokenizer they were made with, validation if evaluated."""
        if self.config.prepared:
            from seedlm.data_pipeline.prepared import check_prepared_run

            check_prepared_run(self.config, run.tokenizer.path, needs_validation=run.train.eval_interval > 0)

    def prepare_tokenizer(self, output_dir: Path, dist: DistInfo):
        """An existing tokenizer folder, or one trained (on rank 0) from the run's training sources."""
        from seedlm.data_pipeline import iter_texts, load_tokenizer, open_sources, train_tokenizer

        tok = self.run.tokenizer
        if tok.path:
            return load_tokenizer(tok.path), Path(tok.path)
        tok_dir = output_dir / "tokenizer"
        if dist.is_main and not (tok_dir / "tokenizer_config.json").is_file():
            logger.info("training a %d-token %s tokenizer into %s", tok.vocab_size, tok.model_type, tok_dir)
            texts = iter_texts(open_sources(self.config, "train"), seed=self.config.seed)
            train_tokenizer(texts, tok_dir, vocab_size=tok.vocab_size, model_type=tok.model_type,
                            max_chars=tok.max_chars, max_docs=tok.max_docs, show_progress=self.run.train.progress_bar)
        barrier()
        return load_tokenizer(tok_dir), tok_dir

    def train_loader(self, tokenizer, dist: DistInfo, grad_accum_steps: int):
        from seedlm.data_pipeline import build_dataloader

        return build_dataloader(self.config, tokenizer, dist.rank, dist.world_size, grad_accum_steps=grad_accum_steps)

    def validation_loader(self, tokenizer, dist: DistInfo):
        from seedlm.data_pipeline import build_dataloader

        return build_dataloader(self.config, tokenizer, dist.rank, dist.world_size, split="validation")

    def evaluate(self, model) -> dict:
        return {}

    def final_report(self, model, step: int) -> dict | None:
        return None


class SyntheticData:
    """A generated task (data.synthetic): vocabulary tokenizer, aligned-target loaders, the task's accuracy at each
    evaluation and at the end, CPU time."""

    def __init__(self, cfg, data: dict | None = None):
        from seedlm.data_pipeline.synthetic import synthetic_data_config
        from seedlm.eval.synthetic import state_tracking_records

        self.cfg = cfg
        self.config = synthetic_data_config(data or {}, cfg)
        self.generate = functools.partial(state_tracking_records, cfg.group)  # (num, length, seed) -> records
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()
        self._val = self._test = None

    def check(self, run, output_dir: Path) -> None:
        """Run-level choices that make no sense with synthetic data (raised before any compute)."""
        cfg = self.cfg
        if run.train.eval_tasks:
            raise ConfigError(f"train.eval_tasks={run.train.eval_tasks} are text tasks, but this run's vocabulary is "
                              f"the {cfg.group} elements (data.synthetic); leave eval_tasks empty: the synthetic "
                              "task's accuracy is evaluated every eval_interval anyway")
        path, tokenizer_dir = run.tokenizer.path, output_dir / "tokenizer"
        if path and Path(path).resolve() != tokenizer_dir.resolve():
            raise ConfigError(f"tokenizer.path={path!r} cannot be used with data.synthetic: the vocabulary is the "
                              f"{cfg.group} elements, written to {tokenizer_dir}; leave tokenizer.path out")

    def prepare_tokenizer(self, output_dir: Path, dist: DistInfo):
        """Write the vocabulary tokenizer into <output_dir>/tokenizer (rank 0) and load it (every rank)."""
        from transformers import AutoTokenizer

        from seedlm.data_pipeline.synthetic import write_vocabulary_tokenizer
        from seedlm.eval.synthetic import Group

        tok_dir = output_dir / "tokenizer"
        if dist.is_main:
            group = Group(self.cfg.group)
            write_vocabulary_tokenizer(self.cfg, [group.name_of(i) for i in range(group.order)], tok_dir)
        barrier()
        return AutoTokenizer.from_pretrained(tok_dir), tok_dir

    def train_loader(self, tokenizer, dist: DistInfo, grad_accum_steps: int):
        from seedlm.data_pipeline import SyntheticLoader

        return SyntheticLoader(self.cfg, self.generate, self.config.micro_batch_size, dist.rank, dist.world_size,
                               "train", grad_accum_steps)

    def validation_loader(self, tokenizer, dist: DistInfo):
        from seedlm.data_pipeline import SyntheticLoader

        return SyntheticLoader(self.cfg, self.generate, self.config.micro_batch_size, dist.rank, dist.world_size,
                               "validation")

    def evaluate(self, model) -> dict:
        return self.accuracy(model)

    def accuracy(self, model, final: bool = False) -> dict:
        """The task's accuracy (eval.synthetic.accuracy_metrics) at train and at test length: on the first
        eval_sequences sequences of each set, or all of them when final. Same numbers on every rank."""
        from seedlm.data_pipeline.synthetic import heldout_test_records, validation_records
        from seedlm.eval.synthetic import accuracy_metrics

        if self._val is None:
            self._val = validation_records(self.cfg, self.generate)
            self._test = heldout_test_records(self.cfg, self.generate)
        sets = [self._val, self._test] if final else [r[: self.cfg.eval_sequences] for r in (self._val, self._test)]
        return accuracy_metrics(model, self.cfg.name, sets, batch_size=self.cfg.eval_batch_size)

    def final_report(self, model, step: int) -> dict:
        """The final accuracy on every validation and test sequence, with the run's CPU and wall time so far
        (process CPU time, all threads, from the start of train(); the final evaluation timed on its own)."""
        cpu_train, wall_train = time.process_time() - self.cpu_start, time.perf_counter() - self.wall_start
        cpu0 = time.process_time()
        return {"step": step, "final": True, **self.accuracy(model, final=True),
                "num_val": self.cfg.num_val, "num_test": self.cfg.num_test,
                "cpu_time_s": cpu_train, "wall_time_s": wall_train,
                "final_eval_cpu_time_s": time.process_time() - cpu0}

    def write_report(self, output_dir: Path, report: dict) -> Path:
        path = output_dir / "synthetic_results.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        return path

    def summary_line(self, report: dict) -> str:
        c, p = self.cfg, f"eval/{self.cfg.name}"
        return (f"{c.describe()}: token accuracy {report[f'{p}/acc_len{c.test_length}']:.4f} at length "
                f"{c.test_length} ({c.num_test} sequences), {report[f'{p}/acc_len{c.train_length}']:.4f} at "
                f"length {c.train_length} ({c.num_val}); CPU time {report['cpu_time_s']:.0f} s, wall "
                f"{report['wall_time_s']:.0f} s (training and periodic evaluation)")


def synthetic_config(data: dict):
    """The run's data.synthetic section checked and typed (data_pipeline.SyntheticConfig), or None when the run
    trains on text. Unknown keys and wrong types are ConfigErrors (the schema's checks, as everywhere), the
    values DataErrors from data_pipeline, an unknown group a ConfigError from the task's own check."""
    from seedlm.data_pipeline.synthetic import SyntheticConfig, synthetic_data_config, synthetic_section
    from seedlm.eval.synthetic import Group
    from seedlm.launch.config import build_section

    section = synthetic_section(data)
    if section is None:
        return None
    cfg = build_section(SyntheticConfig, section, "data.synthetic")
    try:
        Group(cfg.group)
    except ValueError as err:
        raise ConfigError(f"data.synthetic.group: {err}") from err
    synthetic_data_config(data, cfg)  # data.seq_len against train_length
    return cfg


def training_data(run):
    """TextData, or SyntheticData for a run config with data.synthetic (checked)."""
    cfg = synthetic_config(run.data)
    return SyntheticData(cfg, run.data) if cfg is not None else TextData(run)
