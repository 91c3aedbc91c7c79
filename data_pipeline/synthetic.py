"""Generated tasks as training data: a run config's `data.synthetic` section, its aligned-target batches and
its word-level vocabulary tokenizer, behind the loader and tokenizer interfaces of the text pipeline.

    data:
      synthetic: {task: state_tracking, group: S3, train_length: 128, test_length: 512}
      micro_batch_size: 64

Instead of text sources, a tokenizer and packing, the run trains on seeded records
{"input_ids": [...], "targets": [...]} whose targets[t] is the answer the logits *at position t* must give
(aligned with the input, no shift); for state tracking the input_ids are group elements and targets[t] is
the running product e_1 ... e_t. The batches carry the targets as `labels` and as `shift_labels`, so the
model's loss (transformers' causal-LM loss) compares the logits at t with targets[t] instead of shifting by
one. Training batches are drawn fresh: batch i of rank r is a pure function of (seed, rank, i), so the
stream never repeats and a resumed run sees the same batches. An optional length curriculum
(`curriculum_length`, `curriculum_steps`) trains the first steps on shorter sequences.

The records come from a generator the caller passes, `generate(num, length, seed) -> list[dict]`: the tasks
themselves are defined in `seedlm.eval.synthetic` (which also scores them, and serves the same groups as
text tasks to the harness), and data_pipeline imports no other seedlm package. `seedlm.launch.training_data`
joins the two.

The vocabulary is the task's words (token id = element index) plus <pad> and <unk>: a word-level tokenizer,
written with the task's description under `seedlm_synthetic` in tokenizer_config.json (`seedlm eval` reads it).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig, DataError

TASKS = ("state_tracking",)
SPECIAL_TOKENS = ("<pad>", "<unk>")  # after the task's words: token id = element index
# data keys that mean something with data.synthetic; the rest belong to text sources
DATA_KEYS_ALLOWED = ("synthetic", "micro_batch_size", "seq_len")
TOKENIZER_MARKER = "seedlm_synthetic"  # key in tokenizer_config.json
STATE_FORMAT = "seedlm.synthetic.v1"

# generate(num, length, seed) -> `num` records of `length` tokens; the same arguments give the same records
RecordGenerator = Callable[[int, int, str], list[dict]]


@dataclass
class SyntheticConfig:
    task: str = "state_tracking"
    group: str = "S3"  # S3, S4, S5, A5, Z2 (parity), Zm (addition mod m): checked by the task's generator
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
        if self.task not in TASKS:
            close = difflib.get_close_matches(str(self.task), TASKS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"data.synthetic.task={self.task!r} is not a training task{hint}; use one of {list(TASKS)}")
        for key in ("train_length", "test_length", "num_val", "num_test", "eval_sequences", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise DataError(f"data.synthetic.{key} must be >= 1, got {getattr(self, key)}")
        if self.curriculum_length is not None and not 1 <= self.curriculum_length < self.train_length:
            raise DataError(f"data.synthetic.curriculum_length={self.curriculum_length} must be between 1 and "
                            f"train_length - 1 ({self.train_length - 1}): a curriculum trains on shorter sequences "
                            "first")
        if (self.curriculum_length is None) != (self.curriculum_steps == 0):
            raise DataError("data.synthetic.curriculum_length and curriculum_steps go together: give both (the first "
                            "curriculum_steps steps train on sequences of curriculum_length) or neither")
        if self.curriculum_steps < 0:
            raise DataError(f"data.synthetic.curriculum_steps must be >= 0, got {self.curriculum_steps}")

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


def synthetic_section(data: dict) -> dict | None:
    """The run's data.synthetic mapping, or None when the run trains on text. The fields themselves are
    checked by SyntheticConfig (built by the caller's config schema, which names unknown keys and bad types)."""
    if not isinstance(data, dict) or "synthetic" not in data:
        return None
    section = data["synthetic"]
    if not isinstance(section, dict):
        raise DataError(f"data.synthetic must be a mapping such as {{task: state_tracking, group: S3, "
                        f"train_length: 128}}, got {section!r}")
    others = sorted(set(data) - set(DATA_KEYS_ALLOWED))
    if others:
        raise DataError(f"data.{others[0]} has no meaning with data.synthetic (the data is generated, not read); "
                        f"with data.synthetic the data section takes only {list(DATA_KEYS_ALLOWED)}")
    return section


def synthetic_data_config(data: dict, cfg: SyntheticConfig) -> DataConfig:
    """The DataConfig fields the trainer reads (batch shape) for a synthetic run."""
    seq_len = data.get("seq_len")
    if seq_len is not None and seq_len != cfg.train_length:
        raise DataError(f"data.seq_len={seq_len} but data.synthetic.train_length={cfg.train_length}: with synthetic "
                        "data the sequence length is train_length; leave data.seq_len out")
    batch = {k: v for k, v in data.items() if k == "micro_batch_size"}
    return DataConfig.from_dict({**batch, "seq_len": cfg.train_length, "num_workers": 0})


# ---------------------------------------------------------------- vocabulary


def write_vocabulary_tokenizer(cfg: SyntheticConfig, words: list[str], out_dir: str | Path):
    """A word-level HF tokenizer over `words` (ids = their indices) plus <pad> and <unk>; text is words separated
    by spaces, e.g. "012 120 201" for S3. Loads with AutoTokenizer.from_pretrained(out_dir)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    vocab.update({tok: len(words) + i for i, tok in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    meta = {**cfg.to_dict(), "num_elements": len(words),
            "format": "input_ids: element ids; the logits at position t predict the running product of "
                      "input_ids[0..t] (aligned, no shift)"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        model_max_length=max(cfg.test_length, cfg.train_length),
                                        **{TOKENIZER_MARKER: meta})
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# ---------------------------------------------------------------- batches


def validation_records(cfg: SyntheticConfig, generate: RecordGenerator) -> list[dict]:
    """In-distribution held-out sequences (train_length), seeds disjoint from the training stream."""
    return generate(cfg.num_val, cfg.train_length, f"val/{cfg.seed}")


def heldout_test_records(cfg: SyntheticConfig, generate: RecordGenerator) -> list[dict]:
    """The test sequences (test_length: longer than trained on, by default)."""
    return generate(cfg.num_test, cfg.test_length, f"test/{cfg.seed}")


def aligned_batch(records: list[dict]) -> dict:
    """Equal-length records -> {"input_ids", "labels", "shift_labels", "position_ids"}, each [B, T] int64.
    labels = shift_labels = the aligned targets: the model's loss reads shift_labels as they are."""
    import torch

    ids = torch.tensor([r["input_ids"] for r in records], dtype=torch.long)  # [B, T]
    targets = torch.tensor([r["targets"] for r in records], dtype=torch.long)  # [B, T]
    positions = torch.arange(ids.shape[1], dtype=torch.long).expand_as(ids).contiguous()  # [B, T]
    return {"input_ids": ids, "labels": targets, "shift_labels": targets, "position_ids": positions}


class SyntheticLoader:
    """Batches of `micro_batch_size` generated sequences for one rank, with the interface of the text loader
    (iteration, state_dict, load_state_dict, bad_record_counts).

    split "train": endless; batch i is generated from the seed (cfg.seed, rank, i), with the length of
    optimizer step i // grad_accum_steps (see SyntheticConfig.length_at). split "validation": one pass
    over this rank's share of the validation sequences (train_length)."""

    def __init__(self, cfg: SyntheticConfig, generate: RecordGenerator, micro_batch_size: int, rank: int,
                 world_size: int, split: str = "train", grad_accum_steps: int = 1):
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        self.cfg, self.generate, self.micro_batch_size, self.rank, self.world_size, self.split = (
            cfg, generate, micro_batch_size, rank, world_size, split)
        self.grad_accum_steps = grad_accum_steps
        self.taken = 0

    def meta(self) -> dict:
        return {"format": STATE_FORMAT, "task": self.cfg.task, "group": self.cfg.group, "seed": self.cfg.seed,
                "train_length": self.cfg.train_length, "curriculum_length": self.cfg.curriculum_length,
                "curriculum_steps": self.cfg.curriculum_steps, "micro_batch_size": self.micro_batch_size,
                "grad_accum_steps": self.grad_accum_steps, "world_size": self.world_size}

    def __iter__(self):
        if self.split == "validation":
            mine = validation_records(self.cfg, self.generate)[self.rank :: self.world_size]
            for start in range(0, len(mine), self.micro_batch_size):
                yield aligned_batch(mine[start : start + self.micro_batch_size])
            return
        while True:
            i = self.taken
            self.taken += 1  # before yielding: state_dict() after a batch is taken points past it
            length = self.cfg.length_at(i // self.grad_accum_steps)
            seed = f"train/{self.cfg.seed}/{self.rank}/{i}"
            yield aligned_batch(self.generate(self.micro_batch_size, length, seed))

    def state_dict(self) -> dict:
        return {**self.meta(), "batches_taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: v for k, v in state.items() if k != "batches_taken"}
        if saved != self.meta():
            changed = sorted(k for k in set(saved) | set(self.meta()) if saved.get(k) != self.meta().get(k))
            raise DataError(f"cannot resume the synthetic data stream: {changed} changed since the checkpoint "
                            f"(saved {[saved.get(k) for k in changed]}, now {[self.meta().get(k) for k in changed]})")
        self.taken = int(state["batches_taken"])

    def bad_record_counts(self) -> dict:
        return {}
