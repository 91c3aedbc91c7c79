"""Synthetic tasks as training data for `seedlm train`: the `data.synthetic` section of a run config.

    data:
      synthetic: {task: state_tracking, group: S3, train_length: 128, test_length: 512}
      micro_batch_size: 64

Instead of text sources, a tokenizer and packing, the run trains on seeded word problems from
`eval.synthetic`: input_ids are group elements and the target at every position t is the running
product e_1 ... e_t, aligned with the input (no shift). The batches carry the targets as `labels`
and as `shift_labels`, so the model's loss (transformers' causal-LM loss) compares the logits at t
with targets[t] instead of shifting by one. Training batches are drawn fresh: batch i of rank r is a
pure function of (seed, rank, i), so the stream never repeats and a resumed run sees the same batches.
An optional length curriculum (`curriculum_length`, `curriculum_steps`) trains the first steps on shorter
sequences. (tokens_seen and tokens/s in the metrics count train_length tokens per sequence throughout.)

The vocabulary is the group's elements (token id = element index) plus <pad> and <unk>: a word-level
tokenizer is written into <output_dir>/tokenizer (no sentencepiece training) and saved with every
checkpoint and export, with the task's description under `seedlm_synthetic` in tokenizer_config.json
(`seedlm eval` reads it: see launch/commands/eval.py).

Evaluation: every eval_interval the held-out loss (on train-length validation sequences) and the
token accuracy on the first `eval_sequences` sequences at train length and at test length; at the
end of training the accuracy on all `num_val` / `num_test` sequences, the run's CPU and wall time,
logged into metrics.jsonl and returned in the trainer's summary.

This module belongs to `launch` (it may use `eval`); `data_pipeline` and `model` know nothing of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from seedlm.launch.config import ConfigError

TASKS = ("state_tracking",)
SPECIAL_TOKENS = ("<pad>", "<unk>")  # after the elements: token id = element index
# data keys that mean something with data.synthetic; the rest belong to text sources
DATA_KEYS_ALLOWED = ("synthetic", "micro_batch_size", "seq_len")
TOKENIZER_MARKER = "seedlm_synthetic"  # key in tokenizer_config.json
STATE_FORMAT = "seedlm.synthetic.v1"


@dataclass
class SyntheticConfig:
    task: str = "state_tracking"
    group: str = "S3"  # S3, S4, S5, A5, Z2 (parity), Zm (addition mod m)
    train_length: int = 128  # length of the training sequences (= data.seq_len), the longest trained on
    # length curriculum: the first curriculum_steps optimizer steps train on sequences of curriculum_length
    curriculum_length: int | None = None
    curriculum_steps: int = 0
    test_length: int | None = None  # length of the test sequences; None = 4 x train_length
    num_val: int = 512  # validation sequences at train_length (held-out loss, in-distribution accuracy)
    num_test: int = 512  # test sequences at test_length
    eval_sequences: int = 128  # sequences of each set scored at every eval_interval (all of them at the end)
    eval_batch_size: int = 64
    seed: int = 0  # data seed: training stream, validation and test sets

    def __post_init__(self):
        if self.test_length is None:
            self.test_length = 4 * self.train_length

    @property
    def name(self) -> str:
        return f"state_{self.group.lower()}"

    def describe(self) -> str:
        curriculum = (f" (length {self.curriculum_length} for the first {self.curriculum_steps} steps)"
                      if self.curriculum_length else "")
        return f"synthetic {self.task} over {self.group}, train length {self.train_length}{curriculum}, test " \
               f"length {self.test_length}"

    def length_at(self, step: int) -> int:
        """Training sequence length at optimizer step `step` (0-based)."""
        return self.curriculum_length if self.curriculum_length and step < self.curriculum_steps else self.train_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def synthetic_config(data: dict) -> SyntheticConfig | None:
    """The run's data.synthetic section checked and typed, or None when the run trains on text.
    Every mistake is a ConfigError naming the key and what is allowed."""
    from seedlm.launch.config import build_section

    if not isinstance(data, dict) or "synthetic" not in data:
        return None
    section = data["synthetic"]
    if not isinstance(section, dict):
        raise ConfigError(f"data.synthetic must be a mapping such as {{task: state_tracking, group: S3, "
                          f"train_length: 128}}, got {section!r}")
    others = sorted(set(data) - set(DATA_KEYS_ALLOWED))
    if others:
        raise ConfigError(f"data.{others[0]} has no meaning with data.synthetic (the data is generated, not read); "
                          f"with data.synthetic the data section takes only {list(DATA_KEYS_ALLOWED)}")
    cfg = build_section(SyntheticConfig, section, "data.synthetic")  # unknown keys and wrong types, as everywhere
    if cfg.task not in TASKS:
        close = difflib.get_close_matches(str(cfg.task), TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"data.synthetic.task={cfg.task!r} is not a training task{hint}; use one of {list(TASKS)}")
    from seedlm.eval.synthetic import Group

    try:
        Group(cfg.group)
    except ValueError as err:
        raise ConfigError(f"data.synthetic.group: {err}") from err
    for key in ("train_length", "test_length", "num_val", "num_test", "eval_sequences", "eval_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"data.synthetic.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.curriculum_length is not None and not 1 <= cfg.curriculum_length < cfg.train_length:
        raise ConfigError(f"data.synthetic.curriculum_length={cfg.curriculum_length} must be between 1 and "
                          f"train_length - 1 ({cfg.train_length - 1}): a curriculum trains on shorter sequences first")
    if (cfg.curriculum_length is None) != (cfg.curriculum_steps == 0):
        raise ConfigError("data.synthetic.curriculum_length and curriculum_steps go together: give both (the first "
                          "curriculum_steps steps train on sequences of curriculum_length) or neither")
    if cfg.curriculum_steps < 0:
        raise ConfigError(f"data.synthetic.curriculum_steps must be >= 0, got {cfg.curriculum_steps}")
    seq_len = data.get("seq_len")
    if seq_len is not None and seq_len != cfg.train_length:
        raise ConfigError(f"data.seq_len={seq_len} but data.synthetic.train_length={cfg.train_length}: with synthetic "
                          "data the sequence length is train_length; leave data.seq_len out")
    return cfg


def check_run(run, cfg: SyntheticConfig, tokenizer_dir: Path) -> None:
    """Run-level choices that make no sense with synthetic data (raised before any compute)."""
    if run.train.eval_tasks:
        raise ConfigError(f"train.eval_tasks={run.train.eval_tasks} are text tasks, but this run's vocabulary is the "
                          f"{cfg.group} elements (data.synthetic); leave eval_tasks empty: the synthetic task's "
                          "accuracy is evaluated every eval_interval anyway")
    path = run.tokenizer.path
    if path and Path(path).resolve() != tokenizer_dir.resolve():
        raise ConfigError(f"tokenizer.path={path!r} cannot be used with data.synthetic: the vocabulary is the "
                          f"{cfg.group} elements, written to {tokenizer_dir}; leave tokenizer.path out")


def data_section(data: dict, cfg: SyntheticConfig) -> dict:
    """The data_pipeline.DataConfig fields the trainer still reads (batch shape) for a synthetic run."""
    out = {k: v for k, v in data.items() if k in ("micro_batch_size",)}
    return {**out, "seq_len": cfg.train_length, "num_workers": 0}


# ---------------------------------------------------------------- vocabulary


def element_names(cfg: SyntheticConfig) -> list[str]:
    from seedlm.eval.synthetic import Group

    g = Group(cfg.group)
    return [g.name_of(i) for i in range(g.order)]


def write_tokenizer(cfg: SyntheticConfig, out_dir: str | Path):
    """A word-level HF tokenizer over the element names (ids = element indices) plus <pad> and <unk>;
    text is element names separated by spaces, e.g. "012 120 201" for S3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = element_names(cfg)
    vocab = {name: i for i, name in enumerate(names)}
    vocab.update({tok: len(names) + i for i, tok in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    meta = {**cfg.to_dict(), "num_elements": len(names),
            "format": "input_ids: element ids; the logits at position t predict the running product of "
                      "input_ids[0..t] (aligned, no shift)"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        model_max_length=max(cfg.test_length, cfg.train_length),
                                        **{TOKENIZER_MARKER: meta})
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def prepare_tokenizer(cfg: SyntheticConfig, output_dir: Path, is_main: bool):
    """Write the vocabulary tokenizer into <output_dir>/tokenizer (rank 0) and load it (every rank)."""
    from transformers import AutoTokenizer

    from seedlm.launch.distributed import barrier

    tok_dir = output_dir / "tokenizer"
    if is_main:
        write_tokenizer(cfg, tok_dir)
    barrier()
    return AutoTokenizer.from_pretrained(tok_dir), tok_dir


# ---------------------------------------------------------------- batches


def _records(cfg: SyntheticConfig, num: int, length: int, seed):
    from seedlm.eval.synthetic import state_tracking_records

    return state_tracking_records(cfg.group, num, length, seed)


def val_records(cfg: SyntheticConfig) -> list[dict]:
    """In-distribution held-out sequences (train_length), disjoint seeds from the training stream."""
    return _records(cfg, cfg.num_val, cfg.train_length, f"val/{cfg.seed}")


def test_records(cfg: SyntheticConfig) -> list[dict]:
    return _records(cfg, cfg.num_test, cfg.test_length, f"test/{cfg.seed}")


def make_batch(records: list[dict]) -> dict:
    """Equal-length records -> {"input_ids", "labels", "shift_labels", "position_ids"}, each [B, T] int64.
    labels = shift_labels = the aligned targets: the model's loss reads shift_labels as they are."""
    import torch

    ids = torch.tensor([r["input_ids"] for r in records], dtype=torch.long)  # [B, T]
    targets = torch.tensor([r["targets"] for r in records], dtype=torch.long)  # [B, T]
    positions = torch.arange(ids.shape[1], dtype=torch.long).expand_as(ids).contiguous()  # [B, T]
    return {"input_ids": ids, "labels": targets, "shift_labels": targets, "position_ids": positions}


class SyntheticLoader:
    """Batches of `micro_batch_size` sequences for one rank, with the data pipeline's loader interface
    (iteration, state_dict, load_state_dict, bad_record_counts).

    split "train": endless; batch i is generated from the seed (cfg.seed, rank, i), with the length of
    optimizer step i // grad_accum_steps (see SyntheticConfig.length_at). split "validation": one pass
    over this rank's share of the validation sequences (train_length)."""

    def __init__(self, cfg: SyntheticConfig, micro_batch_size: int, rank: int, world_size: int, split: str = "train",
                 grad_accum_steps: int = 1):
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        self.cfg, self.micro_batch_size, self.rank, self.world_size, self.split = (
            cfg, micro_batch_size, rank, world_size, split)
        self.grad_accum_steps = grad_accum_steps
        self.taken = 0

    def meta(self) -> dict:
        return {"format": STATE_FORMAT, "task": self.cfg.task, "group": self.cfg.group, "seed": self.cfg.seed,
                "train_length": self.cfg.train_length, "curriculum_length": self.cfg.curriculum_length,
                "curriculum_steps": self.cfg.curriculum_steps, "micro_batch_size": self.micro_batch_size,
                "grad_accum_steps": self.grad_accum_steps, "world_size": self.world_size}

    def __iter__(self):
        if self.split == "validation":
            mine = val_records(self.cfg)[self.rank :: self.world_size]
            for start in range(0, len(mine), self.micro_batch_size):
                yield make_batch(mine[start : start + self.micro_batch_size])
            return
        while True:
            i = self.taken
            self.taken += 1  # before yielding: state_dict() after a batch is taken points past it
            length = self.cfg.length_at(i // self.grad_accum_steps)
            seed = f"train/{self.cfg.seed}/{self.rank}/{i}"
            yield make_batch(_records(self.cfg, self.micro_batch_size, length, seed))

    def state_dict(self) -> dict:
        return {**self.meta(), "batches_taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        from seedlm.data_pipeline import DataError

        saved = {k: v for k, v in state.items() if k != "batches_taken"}
        if saved != self.meta():
            changed = sorted(k for k in set(saved) | set(self.meta()) if saved.get(k) != self.meta().get(k))
            raise DataError(f"cannot resume the synthetic data stream: {changed} changed since the checkpoint "
                            f"(saved {[saved.get(k) for k in changed]}, now {[self.meta().get(k) for k in changed]})")
        self.taken = int(state["batches_taken"])

    def bad_record_counts(self) -> dict:
        return {}


# ---------------------------------------------------------------- evaluation


class SyntheticRun:
    """The data of a synthetic run, with the calls of launch/training_data.py: vocabulary tokenizer, loaders,
    the task's accuracy at each evaluation and at the end, CPU time."""

    def __init__(self, cfg: SyntheticConfig, data: dict | None = None):
        from seedlm.data_pipeline import DataConfig

        self.cfg = cfg
        self.config = DataConfig.from_dict(data_section(data or {}, cfg))
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()
        self._val = self._test = None

    def check(self, run, output_dir: Path) -> None:
        check_run(run, self.cfg, output_dir / "tokenizer")

    def prepare_tokenizer(self, output_dir: Path, dist):
        return prepare_tokenizer(self.cfg, output_dir, dist.is_main)

    def train_loader(self, tokenizer, dist, grad_accum_steps: int) -> SyntheticLoader:
        return SyntheticLoader(self.cfg, self.config.micro_batch_size, dist.rank, dist.world_size, "train",
                               grad_accum_steps)

    def validation_loader(self, tokenizer, dist) -> SyntheticLoader:
        return SyntheticLoader(self.cfg, self.config.micro_batch_size, dist.rank, dist.world_size, "validation")

    def evaluate(self, model) -> dict:
        return self.accuracy(model)

    def accuracy(self, model, final: bool = False) -> dict:
        """Token accuracy (argmax at t == targets[t], over every position) at train and at test length, the
        fraction of sequences right at every position, and the accuracy at the last position; the first
        eval_sequences sequences of each set, or all of them when final. Same numbers on every rank."""
        from seedlm.eval.synthetic import token_accuracy

        if self._val is None:
            self._val, self._test = val_records(self.cfg), test_records(self.cfg)
        out = {}
        for records, length in ((self._val, self.cfg.train_length), (self._test, self.cfg.test_length)):
            chosen = records if final else records[: self.cfg.eval_sequences]
            acc = token_accuracy(model, chosen, batch_size=self.cfg.eval_batch_size)
            prefix = f"eval/{self.cfg.name}"
            out[f"{prefix}/acc_len{length}"] = acc["accuracy"]
            out[f"{prefix}/seq_acc_len{length}"] = acc["sequence_accuracy"]
            out[f"{prefix}/last_acc_len{length}"] = acc["per_position"][-1]
        return out

    def final_report(self, model, step: int) -> dict:
        """The final accuracy on every validation and test sequence, with the run's CPU and wall time so far
        (process CPU time, all threads, from the start of train(); the final evaluation timed on its own)."""
        cpu_train, wall_train = time.process_time() - self.cpu_start, time.perf_counter() - self.wall_start
        cpu0 = time.process_time()
        report = {"step": step, "final": True, **self.accuracy(model, final=True),
                  "num_val": self.cfg.num_val, "num_test": self.cfg.num_test,
                  "cpu_time_s": cpu_train, "wall_time_s": wall_train,
                  "final_eval_cpu_time_s": time.process_time() - cpu0}
        return report

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


def synthetic_run(run) -> SyntheticRun | None:
    """A SyntheticRun when the run config has data.synthetic (checked), else None (text data)."""
    cfg = synthetic_config(run.data)
    return SyntheticRun(cfg, run.data) if cfg is not None else None
